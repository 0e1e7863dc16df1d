// A TensorRT engine as the C API runs it (engine/tensorrt_backend.py TrtRunner): the entry's engine.plan, one
// optimization profile per plan stage (select_profile picks it), run on the current CUDA stream.
// Compiled only where CMake finds TensorRT and CUDA (MEGAFUSION_WITH_TENSORRT). Written to TensorRT 10's C++ API;
// NOT compiled or run in this repository, only syntax-checked against declarations of that API.
#ifndef MEGAFUSION_LIB_TRT_NETWORK_HPP_
#define MEGAFUSION_LIB_TRT_NETWORK_HPP_

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "context.hpp"

namespace nvinfer1 {
class IRuntime;
class ICudaEngine;
class IExecutionContext;
}  // namespace nvinfer1

namespace megafusion::lib {

class TrtLogger;

class TrtNetwork final : public Network {
 public:
  TrtNetwork(const std::string& root, Entry entry, const at::Device& device);
  ~TrtNetwork() override;
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override;
  // Whether one of the profiles holds `shape` for input `index`.
  bool covers(size_t index, const std::vector<long long>& shape) const override;

 private:
  struct Output {
    std::string name;
    at::ScalarType dtype;
  };

  at::Device device_;
  std::vector<at::ScalarType> input_dtypes_;  // per input, in the entry's (the spec's) order
  std::vector<Output> outputs_;               // in the engine's IO order, which is the ONNX graph's
  int profile_ = -1;                          // the context's current optimization profile
  // Destroyed in reverse order: the context, its engine, their runtime, then the logger they log through.
  std::unique_ptr<TrtLogger> logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;

  std::string tensorrt_error() const;  // the last error TensorRT logged, as " (TensorRT: ...)" or ""
};

// MAJOR.MINOR.PATCH of the loaded libnvinfer: what a tensorrt entry's backend_version must match.
std::string tensorrt_version();

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_TRT_NETWORK_HPP_
