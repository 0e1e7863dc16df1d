// The C API's context: the engine folder's engines for one model on one device, and the generation that runs
// the stage plan on them (the Python runtime's MegaFusionPipeline.generate). Engines are AOTInductor packages,
// or TensorRT plans (trt_network.hpp) in a library built where CMake finds TensorRT (MEGAFUSION_WITH_TENSORRT).
// The TensorRT path was NOT compiled or run in this repository: it was only syntax-checked against
// declarations of the TensorRT 10 API.
#ifndef MEGAFUSION_LIB_CONTEXT_HPP_
#define MEGAFUSION_LIB_CONTEXT_HPP_

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "manifest.hpp"
#include "megafusion/family.hpp"
#include "megafusion/megafusion.h"
#include "megafusion/plan.hpp"
#include "step_graphs.hpp"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace megafusion::lib {

// One loaded engine with its entry: inputs in the spec's order, outputs in the engine's.
class Network {
 public:
  explicit Network(Entry entry) : entry_(std::move(entry)) {}
  virtual ~Network() = default;
  virtual std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) = 0;
  // Whether `shape` of input `index` lies inside what the engine was built for.
  virtual bool covers(size_t index, const std::vector<long long>& shape) const = 0;
  const Entry& entry() const { return entry_; }

 protected:
  Entry entry_;
};

// An AOTInductor package: one range per input, checked before each run.
class AotiNetwork final : public Network {
 public:
  AotiNetwork(const std::string& root, Entry entry, const at::Device& device);
  ~AotiNetwork() override;
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override;
  bool covers(size_t index, const std::vector<long long>& shape) const override;

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

class Context {
 public:
  explicit Context(const mf_context_options& options);
  ~Context();

  int num_text_encoders() const { return family_->is_xl ? 2 : 1; }
  // CUDA graphs of the denoise step (step_graphs.hpp): on by default; off runs the plain step loop.
  void set_graphs(bool on) { graphs_on_ = on; }
  uint64_t graph_captures() const { return graphs_ ? graphs_->captures() : 0; }
  uint64_t graph_replays() const { return graphs_ ? graphs_->replays() : 0; }
  StagePlan plan_of(const mf_generate_params& p) const;
  void generate(const mf_generate_params& p, uint8_t* rgb, size_t rgb_bytes);

 private:
  const Family* family_;
  at::Device device_;
  std::string device_name_;
  EngineFolder folder_;
  double scaling_ = 0;
  std::vector<long long> vocab_sizes_;
  std::string backend_ = "aoti";  // or "tensorrt" (choose_backend)
  std::string precision_;
  // Per (network, dilation): every valid entry, newest first (several for per-stage static packages).
  std::map<std::pair<std::string, int>, std::vector<Entry>> entries_;
  std::map<std::string, std::unique_ptr<Network>> nets_;  // by entry digest, opened when a call first needs it
  std::string hint_;  // the command that builds what the current plan needs (set by check_coverage)
  bool graphs_on_ = true;
  std::unique_ptr<StepGraphs> graphs_;

  const std::vector<Entry>& entries(const std::string& network, int dilation);
  // The network's entry whose profile holds a call with these input shapes (in the spec's order), opened.
  Network& net_at(const std::string& network, int dilation, const std::vector<std::vector<long long>>& shapes);
  Network& net(const std::string& network, int dilation, const std::vector<at::Tensor>& inputs);
  void check_coverage(const StagePlan& plan, int dilation, bool pixel_relay, int64_t batch);
  at::Tensor run_unet(std::vector<at::Tensor> inputs, int dilation);
  std::pair<at::Tensor, at::Tensor> encode_prompt(const int32_t* const* ids);
  at::Tensor unet(const at::Tensor& sample, int64_t t, const at::Tensor& hidden, const at::Tensor& pooled,
                  const at::Tensor& time_ids, int dilation);
  at::Tensor decode(const at::Tensor& latent);
  at::Tensor encode(const at::Tensor& image);
  at::Tensor relay_resize(const at::Tensor& image, int height, int width, at::ScalarType out);
};

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_CONTEXT_HPP_
