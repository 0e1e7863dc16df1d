#include "trt_network.hpp"

#include <NvInferRuntime.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <mutex>

namespace megafusion::lib {

// TensorRT reports failures by returning null or false and logging why; keep the last error for the message.
class TrtLogger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity > Severity::kERROR || !msg) return;
    try {
      std::lock_guard<std::mutex> lock(mutex_);  // TensorRT requires a thread-safe logger
      last_error_ = msg;
    } catch (...) {  // log() is noexcept: losing a message beats terminating
    }
  }
  std::string last_error() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return last_error_;
  }

 private:
  mutable std::mutex mutex_;
  std::string last_error_;
};

namespace {

at::ScalarType scalar_type(nvinfer1::DataType t, const std::string& what) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return at::kFloat;
    case nvinfer1::DataType::kHALF: return at::kHalf;
    case nvinfer1::DataType::kBF16: return at::kBFloat16;
    case nvinfer1::DataType::kINT32: return at::kInt;
    case nvinfer1::DataType::kINT64: return at::kLong;
    case nvinfer1::DataType::kINT8: return at::kChar;
    case nvinfer1::DataType::kUINT8: return at::kByte;
    case nvinfer1::DataType::kBOOL: return at::kBool;
    default: break;
  }
  throw Failure(MF_ERROR_ENGINE, what + " has TensorRT data type " + std::to_string(static_cast<int>(t)) +
                                     ", which has no torch equivalent");
}

nvinfer1::Dims dims_of(const at::Tensor& x) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(x.dim());
  for (int64_t i = 0; i < x.dim(); ++i) d.d[i] = x.size(i);
  return d;
}

}  // namespace

TrtNetwork::TrtNetwork(const std::string& root, Entry entry, const at::Device& device)
    : Network(std::move(entry)),
      device_(at::kCUDA, device.has_index() ? device.index() : 0),
      logger_(std::make_unique<TrtLogger>()) {
  const std::string path = root + "/" + entry_.files.front().path;
  auto fail = [&](const std::string& why) {
    return Failure(MF_ERROR_ENGINE, "cannot load engine " + path + " (" + entry_.describe() + "): " + why +
                                        tensorrt_error());
  };
  if (!device.is_cuda()) throw fail("TensorRT engines run on CUDA devices only");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw fail("cannot open it");
  const std::vector<char> plan{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  const c10::cuda::CUDAGuard guard(device_.index());  // the engine's memory lives on this device

  runtime_.reset(nvinfer1::createInferRuntime(*logger_));
  if (!runtime_) throw fail("createInferRuntime failed");
  engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine_) throw fail("TensorRT cannot deserialize it (built by another TensorRT, or for another GPU?)");
  if (engine_->getNbOptimizationProfiles() != static_cast<int32_t>(entry_.profiles.size()))
    throw fail("it has " + std::to_string(engine_->getNbOptimizationProfiles()) +
               " optimization profiles, the manifest lists " + std::to_string(entry_.profiles.size()));

  std::vector<std::string> inputs;
  for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
    char const* name = engine_->getIOTensorName(i);
    const nvinfer1::TensorIOMode mode = engine_->getTensorIOMode(name);
    if (mode == nvinfer1::TensorIOMode::kINPUT)
      inputs.emplace_back(name);
    else if (mode == nvinfer1::TensorIOMode::kOUTPUT)
      outputs_.push_back({name, scalar_type(engine_->getTensorDataType(name), path + " output " + name)});
  }
  // The manifest's profiles name the inputs in the order the context passes them.
  std::string listed;
  for (const TensorRange& r : entry_.range) {
    listed += (listed.empty() ? "" : ", ") + r.name;
    if (std::find(inputs.begin(), inputs.end(), r.name) == inputs.end())
      throw fail("it has no input '" + r.name + "'");
    input_dtypes_.push_back(scalar_type(engine_->getTensorDataType(r.name.c_str()), path + " input " + r.name));
  }
  if (inputs.size() != entry_.range.size())
    throw fail("it has " + std::to_string(inputs.size()) + " inputs, the manifest lists " + listed);
  if (outputs_.empty()) throw fail("it has no outputs");

  context_.reset(engine_->createExecutionContext());
  if (!context_) throw fail("cannot create an execution context");
}

TrtNetwork::~TrtNetwork() = default;

std::string TrtNetwork::tensorrt_error() const {
  const std::string e = logger_ ? logger_->last_error() : "";
  return e.empty() ? "" : " (TensorRT: " + e + ")";
}

bool TrtNetwork::covers(size_t index, const std::vector<long long>& shape) const {
  return std::any_of(entry_.profiles.begin(), entry_.profiles.end(),
                     [&](const Profile& p) { return index < p.shapes.size() && holds(p.shapes[index], shape); });
}

std::vector<at::Tensor> TrtNetwork::run(const std::vector<at::Tensor>& inputs) {
  const std::string what = entry_.describe();
  if (inputs.size() != input_dtypes_.size())
    throw Failure(MF_ERROR_RUNTIME, what + ": " + std::to_string(inputs.size()) + " inputs given, the engine takes " +
                                        std::to_string(input_dtypes_.size()));
  const c10::cuda::CUDAGuard guard(device_.index());
  // Inputs as the engine takes them; freeing them at return is safe: the caching allocator reuses their memory
  // in this stream's order, after the engine has read them.
  std::vector<at::Tensor> feeds;
  std::vector<std::pair<std::string, std::vector<long long>>> shapes;
  for (size_t i = 0; i < inputs.size(); ++i) {
    feeds.push_back(inputs[i].to(device_, input_dtypes_[i]).contiguous());
    shapes.emplace_back(entry_.range[i].name, std::vector<long long>(feeds[i].sizes().begin(), feeds[i].sizes().end()));
  }
  size_t profile = 0;
  try {
    profile = select_profile(entry_.profiles, shapes);
  } catch (const Failure& e) {
    throw Failure(e.code, what + ": " + e.what());
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
  auto fail = [&](const std::string& why) { return Failure(MF_ERROR_RUNTIME, what + ": " + why + tensorrt_error()); };
  if (static_cast<int>(profile) != profile_) {
    if (!context_->setOptimizationProfileAsync(static_cast<int32_t>(profile), stream))
      throw fail("cannot select optimization profile " + std::to_string(profile));
    profile_ = static_cast<int>(profile);
  }
  for (size_t i = 0; i < feeds.size(); ++i) {
    char const* name = entry_.range[i].name.c_str();
    if (feeds[i].dim() > nvinfer1::Dims::MAX_DIMS || !context_->setInputShape(name, dims_of(feeds[i])))
      throw fail("TensorRT refuses input " + entry_.range[i].name + " of " + std::to_string(feeds[i].dim()) +
                 " dimensions at profile " + std::to_string(profile));
    if (!context_->setTensorAddress(name, feeds[i].data_ptr())) throw fail("cannot bind input " + entry_.range[i].name);
  }
  std::vector<at::Tensor> out;
  for (const Output& o : outputs_) {
    const nvinfer1::Dims d = context_->getTensorShape(o.name.c_str());
    if (d.nbDims < 0 || std::any_of(d.d, d.d + d.nbDims, [](int64_t n) { return n < 0; }))
      throw fail("TensorRT cannot infer the shape of output " + o.name);
    const std::vector<int64_t> sizes(d.d, d.d + d.nbDims);
    out.push_back(at::empty(sizes, at::TensorOptions().dtype(o.dtype).device(device_)));
    if (!context_->setTensorAddress(o.name.c_str(), out.back().data_ptr())) throw fail("cannot bind output " + o.name);
  }
  if (!context_->enqueueV3(stream)) throw fail("TensorRT enqueueV3 failed");
  return out;
}

std::string tensorrt_version() {
  const int32_t v = getInferLibVersion();  // (MAJOR * 100 + MINOR) * 100 + PATCH
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

}  // namespace megafusion::lib
