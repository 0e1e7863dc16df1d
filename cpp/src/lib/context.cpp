#include "context.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

#include "aoti_weights.hpp"
#include "megafusion/bicubic.hpp"
#include "megafusion/flow_schedule.hpp"
#include "megafusion/schedule.hpp"

#ifdef MEGAFUSION_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "relay_bicubic.h"
#endif

#ifdef MEGAFUSION_WITH_TENSORRT
#include "trt_network.hpp"
#endif

#ifndef MEGAFUSION_TORCH_VERSION
#error "MEGAFUSION_TORCH_VERSION must name the torch the library is built against (CMake sets it)"
#endif

namespace megafusion::lib {

namespace {

#ifdef MEGAFUSION_WITH_TENSORRT
constexpr bool kWithTensorRT = true;
#else
constexpr bool kWithTensorRT = false;
#endif

at::ScalarType dtype_of(const std::string& precision) {
  return precision == "fp16" ? at::kHalf : precision == "bf16" ? at::kBFloat16 : at::kFloat;  // bf16: SDXL VAEs on CUDA
}

// core/specs.py text_encoder_name: the networks of the first and second text encoder.
std::string text_encoder_name(int index) { return index == 0 ? "text_encoder" : "text_encoder_2"; }

// Stage coefficients rounded to float32, as the Python runtime's device tensors are.
float sqrt_abar(double abar) { return static_cast<float>(std::sqrt(abar)); }
float sqrt_one_minus_abar(double abar) { return static_cast<float>(std::sqrt(1.0 - abar)); }

}  // namespace

at::Device parse_device(const char* text) {
  const std::string d = text && *text ? text : "cpu";
  try {
    at::Device dev(d);
    if (dev.is_cpu() || dev.is_cuda()) return dev;
  } catch (const std::exception&) {
  }
  throw Failure(MF_ERROR_INVALID_ARGUMENT, "unknown device '" + d + "'; use cpu, cuda or cuda:N");
}

std::string device_name(const at::Device& d) {
  if (d.is_cpu()) return "cpu";
#ifdef MEGAFUSION_WITH_CUDA
  cudaDeviceProp prop{};
  const int index = d.has_index() ? d.index() : 0;
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "no CUDA device " + std::to_string(index));
  return prop.name;
#else
  throw Failure(MF_ERROR_INVALID_ARGUMENT, "this libmegafusion was built without CUDA; use device cpu");
#endif
}

namespace {

// Shapes of a call of `e` whose first input is `first`: the other inputs at their smallest shape, at this call's
// batch where their first axis ranges (the conditioning follows the sample's batch).
std::vector<std::vector<long long>> call_shapes(const Entry& e, const std::vector<long long>& first, long long batch) {
  std::vector<std::vector<long long>> out = {first};
  for (size_t i = 1; i < e.range.size(); ++i) {
    std::vector<long long> s = e.range[i].min;
    if (!s.empty() && e.range[i].min[0] != e.range[i].max[0]) s[0] = batch;
    out.push_back(s);
  }
  return out;
}

// A package's wrapper.so finds libtorch's AOTI shims in the global symbol scope. A host that loaded libtorch
// RTLD_LOCAL (Python: `import torch`, then this library through ctypes) leaves them out of it, and with torch 2.11
// a CUDA package then crashed inside wrapper.so (SIGSEGV; Python's own loader hit it: engine/aoti_backend.py
// _libtorch_global). So the libtorch libraries already loaded are made global before the first package loads.
void libtorch_global() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (const char* name : {"libc10.so", "libtorch_cpu.so", "libtorch.so", "libc10_cuda.so", "libtorch_cuda.so"})
      dlopen(name, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);  // NULL where not loaded (no CUDA): nothing to promote
  });
}

std::unique_ptr<Network> open_network(const std::string& root, const Entry& e, const at::Device& device) {
#ifdef MEGAFUSION_WITH_TENSORRT
  if (e.backend == "tensorrt") return std::make_unique<TrtNetwork>(root, e, device);
#endif
  return std::make_unique<AotiNetwork>(root, e, device);
}

}  // namespace

// ------------------------------------------------------------------------------------------------ AotiNetwork

AotiNetwork::AotiNetwork(const std::string& root, Entry entry, const at::Device& device) : Network(std::move(entry)) {
  const std::string path = root + "/" + entry_.files.front().path;
  if (entry_.constants != "inside" && entry_.constants != "apart")
    throw Failure(MF_ERROR_ENGINE, "engine " + path + " (" + entry_.describe() + ") keeps its constants '" +
                                       entry_.constants + "', which libmegafusion does not know; rebuild it");
  // --weights-apart: the weight file is read (or found shared) before the package is, so a bad file fails first.
  if (entry_.constants == "apart") weights_ = shared_weights(root, entry_, device);
  libtorch_global();
  try {
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        // run_single_threaded: no locking or stream synchronization inside run(), so a CUDA graph can capture
        // it (Python loads with run_single_threaded=True for the same reason); a context is one thread's.
        path, "model", true, 1, device.is_cuda() ? (device.has_index() ? device.index() : 0) : -1);
  } catch (const std::exception& e) {
    throw Failure(MF_ERROR_ENGINE, "cannot load engine " + path + " (" + entry_.describe() + "): " + e.what());
  }
  if (weights_) give_weights(*loader_, *weights_, root, entry_);
}

AotiNetwork::~AotiNetwork() = default;

bool AotiNetwork::covers(size_t index, const std::vector<long long>& shape) const {
  return holds(entry_.range.at(index), shape);
}

std::vector<at::Tensor> AotiNetwork::run(const std::vector<at::Tensor>& inputs) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::vector<long long> s(inputs[i].sizes().begin(), inputs[i].sizes().end());
    if (!covers(i, s))
      throw Failure(MF_ERROR_UNSUPPORTED_SIZE, entry_.describe() + ": input " + entry_.range.at(i).name +
                                                   " of shape " + shape_text(s) + " is outside the compiled range " +
                                                   shape_text(entry_.range[i].min) + " to " +
                                                   shape_text(entry_.range[i].max));
  }
  try {
    return loader_->run(inputs);
  } catch (const std::exception& e) {
    throw Failure(MF_ERROR_RUNTIME, entry_.describe() + " failed: " + e.what());
  }
}

// ------------------------------------------------------------------------------------------------ Context

Context::Context(const mf_context_options& o) : device_(at::kCPU) {
  if (!o.engine_dir) throw Failure(MF_ERROR_INVALID_ARGUMENT, "options->engine_dir is NULL");
  if (!o.model) throw Failure(MF_ERROR_INVALID_ARGUMENT, "options->model is NULL");
  family_ = find_family(o.model);
  if (!family_) {
    std::string known;
    for (const Family& f : families()) known += (known.empty() ? "" : ", ") + f.name;
    for (const FlowFamily& f : flow_families()) known += ", " + f.base.name;
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "unknown model '" + std::string(o.model) + "'; choose one of " + known);
  }
  device_ = parse_device(o.device);
  device_name_ = device_name(device_);
  folder_ = read_engine_folder(o.engine_dir);
  auto facts = folder_.models.find(family_->name);
  if (facts != folder_.models.end()) {
    scaling_ = facts->second.vae_scaling_factor;
    vocab_sizes_ = facts->second.vocab_sizes;
  }
  backend_ = choose_backend(folder_, family_->name, device_.is_cuda(), kWithTensorRT);
  // Packages call cuDNN for their convolutions: let it time its algorithms per shape, as the Python runtime does
  // when it opens aoti engines (engine/aoti_backend.py).
  if (device_.is_cuda()) at::globalContext().setBenchmarkCuDNN(true);
  // UNet precision: fp16 on a GPU, fp32 on the CPU, else whichever the folder has (select_entries then names
  // what is missing if neither).
  precision_ = device_.is_cuda() ? "fp16" : "fp32";
  const std::string other = precision_ == "fp16" ? "fp32" : "fp16";
  auto has_unet = [&](const std::string& prec) {
    return std::any_of(folder_.entries.begin(), folder_.entries.end(), [&](const Entry& e) {
      return e.model == family_->name && e.backend == backend_ && e.network == "unet" && e.precision == prec &&
             e.device == device_name_;
    });
  };
  if (!has_unet(precision_) && has_unet(other)) precision_ = other;
  hint_ = plan_build_hint(folder_, family_->name, device_name_, backend_, precision_, "");
  // Load the text encoders now and choose every generation's entries, so a broken folder or a stale entry fails
  // here rather than mid-request. UNet and VAE packages (one per stage shape when built static) load when a plan
  // first needs them, in check_coverage, before any other work of that generation.
  for (int i = 0; i < num_text_encoders(); ++i) net_at(text_encoder_name(i), 1, {{1, MF_TOKEN_LENGTH}});
  entries("unet", 1);
  entries("vae_decoder", 1);
  entries("vae_encoder", 1);
}

Context::~Context() = default;

const std::vector<Entry>& Context::entries(const std::string& network, int dilation) {
  auto key = std::make_pair(network, dilation);
  auto it = entries_.find(key);
  if (it != entries_.end()) return it->second;
  std::string version = MEGAFUSION_TORCH_VERSION;  // what built the engines must match this library's
#ifdef MEGAFUSION_WITH_TENSORRT
  if (backend_ == "tensorrt") version = tensorrt_version();
#endif
  auto chosen = select_entry_sets(folder_, family_->name, {key}, precision_, device_name_, version, backend_);
  return entries_.emplace(key, std::move(chosen.at(key))).first->second;
}

Network& Context::net_at(const std::string& network, int dilation, const std::vector<std::vector<long long>>& shapes) {
  const std::vector<Entry>& candidates = entries(network, dilation);
  std::vector<std::pair<std::string, std::vector<long long>>> named;
  const std::vector<TensorRange>& inputs = candidates.front().range;  // one spec: every entry names its inputs so
  for (size_t i = 0; i < shapes.size() && i < inputs.size(); ++i) named.emplace_back(inputs[i].name, shapes[i]);
  const long long k = network == "vae_encoder" ? 1 : family_->vae_scale;
  const Entry& e = candidates[pick_entry(candidates, named, k, "the engines in " + folder_.root, hint_)];
  auto it = nets_.find(e.digest);
  if (it != nets_.end()) return *it->second;
  verify_files(folder_.root, e);  // sizes and sha256, always (options.verify_hashes is no longer needed)
  return *nets_.emplace(e.digest, open_network(folder_.root, e, device_)).first->second;
}

Network& Context::net(const std::string& network, int dilation, const std::vector<at::Tensor>& inputs) {
  std::vector<std::vector<long long>> shapes;
  for (const at::Tensor& t : inputs) shapes.emplace_back(t.sizes().begin(), t.sizes().end());
  return net_at(network, dilation, shapes);
}

StagePlan plan_from_params(const mf_generate_params& p, const PlanCheck& validate, const PlanDefault& fallback) {
  if ((p.width > 0) != (p.height > 0))
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "give both width and height or neither (got " +
                                                 std::to_string(p.width) + "x" + std::to_string(p.height) + ")");
  if (p.width < 0 || p.height < 0)
    throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "negative size " + std::to_string(p.width) + "x" +
                                                 std::to_string(p.height));
  std::optional<int> w, h;
  if (p.width > 0) w = p.width, h = p.height;
  try {
    if (p.stages && *p.stages) return validate(parse_stages(p.stages), w, h);
    std::optional<int> total;
    if (p.total_steps != 0) total = p.total_steps;
    return fallback(w, h, total);
  } catch (const PlanError& e) {
    throw Failure(MF_ERROR_UNSUPPORTED_SIZE, e.what());
  }
}

size_t check_rgb_buffer(const uint8_t* rgb, size_t rgb_bytes, const StagePlan& plan) {
  if (!rgb) throw Failure(MF_ERROR_INVALID_ARGUMENT, "rgb buffer is NULL");
  const size_t need = static_cast<size_t>(plan.output_width) * plan.output_height * 3;
  if (rgb_bytes < need)
    throw Failure(MF_ERROR_BUFFER_TOO_SMALL, "rgb buffer holds " + std::to_string(rgb_bytes) + " bytes; " +
                                                 std::to_string(plan.output_width) + "x" +
                                                 std::to_string(plan.output_height) + " RGB8 needs " +
                                                 std::to_string(need));
  return need;
}

StagePlan Context::plan_of(const mf_generate_params& p) const {
  return plan_from_params(
      p, [this](const std::vector<StageSize>& s, std::optional<int> w, std::optional<int> h) {
        return validate_plan(*family_, s, w, h);
      },
      [this](std::optional<int> w, std::optional<int> h, std::optional<int> total) {
        return default_plan(*family_, w, h, total);
      });
}

void Context::check_coverage(const StagePlan& plan, int dilation, bool pixel_relay, int64_t batch, size_t first,
                             bool photo, const Controls* controls, const IpAdapterId* ip) {
  const int vs = family_->vae_scale;
  std::string stages;
  for (const StageSize& s : plan.stages) stages += (stages.empty() ? "" : ",") + stage_str(s);
  hint_ = plan_build_hint(folder_, family_->name, device_name_, backend_, precision_, stages);
  control_hint_ = hint_;
  if (controls)
    for (const ControlNetId& id : controls->ids) control_hint_ += " --controlnet " + id.source;
  if (ip)  // the file is known by its sha256 only
    ip_hint_ = hint_ + " --ip-adapter <the IP-Adapter file of sha256 " + ip->file_sha256.substr(0, 12) +
               "...> --ip-adapter-scale " + ip->scale;
  // Opens the package each call of the plan runs (pick_entry refuses a size no entry covers, naming those built).
  auto need = [&](const std::string& network, int d, const StageSize& s, long long b) {
    const bool image = network == "vae_encoder";
    const long long h = image ? s.height : s.height / vs, w = image ? s.width : s.width / vs;
    const Entry& first = entries(network, d).front();
    net_at(network, d, call_shapes(first, {b, image ? 3 : 4, h, w}, b));
  };
  const size_t last = plan.stages.size() - 1;
  for (size_t k = first; k <= last; ++k) {
    const StageSize& s = plan.stages[k];
    const int d = k == 0 ? 1 : dilation;
    if (ip)
      ip_net(*ip, d, {batch, 4, s.height / vs, s.width / vs});
    else if (!controls)
      need("unet", d, s, batch);
    for (const ControlNetId* id = controls ? controls->ids.data() : nullptr;
         controls && id != controls->ids.data() + controls->ids.size(); ++id)
      control_net(id, d, {batch, 4, s.height / vs, s.width / vs}, s.height, s.width);
    if (controls) control_net(nullptr, d, {batch, 4, s.height / vs, s.width / vs}, s.height, s.width);
    if (k == last || pixel_relay) need("vae_decoder", 1, s, 1);
    if ((k > first && pixel_relay) || (k == first && photo)) need("vae_encoder", 1, s, 1);
  }
}

std::pair<at::Tensor, at::Tensor> Context::encode_prompt(const int32_t* const* ids) {
  std::vector<at::Tensor> states;
  at::Tensor pooled;
  for (int i = 0; i < num_text_encoders(); ++i) {
    const long long vocab = i < static_cast<int>(vocab_sizes_.size()) ? vocab_sizes_[i] : 0;
    for (int j = 0; j < MF_TOKEN_LENGTH; ++j)
      if (ids[i][j] < 0 || (vocab > 0 && ids[i][j] >= vocab))
        throw Failure(MF_ERROR_INVALID_ARGUMENT, "token id " + std::to_string(ids[i][j]) + " at position " +
                                                     std::to_string(j) + " of text encoder " + std::to_string(i) +
                                                     " is outside its vocabulary of " + std::to_string(vocab));
    at::Tensor t = at::from_blob(const_cast<int32_t*>(ids[i]), {1, MF_TOKEN_LENGTH}, at::kInt).clone().to(device_);
    auto out = net(text_encoder_name(i), 1, {t}).run({t});
    states.push_back(out.at(0).to(at::kFloat));
    if (out.size() > 1) pooled = out[1].to(at::kFloat);
  }
  return {at::cat(states, -1), pooled};
}

at::Tensor Context::unet(const at::Tensor& sample, int64_t t, const at::Tensor& hidden, const at::Tensor& pooled,
                         const at::Tensor& time_ids, int dilation) {
  const auto f = dtype_of(precision_);
  std::vector<at::Tensor> in = {sample.to(f).contiguous(),
                                at::full({1}, static_cast<double>(t), at::TensorOptions().dtype(at::kFloat).device(device_)),
                                hidden.to(f).contiguous()};
  if (family_->is_xl) {
    in.push_back(pooled.to(f).contiguous());
    in.push_back(time_ids.contiguous());
  }
  return run_unet(std::move(in), dilation);
}

at::Tensor Context::run_unet(std::vector<at::Tensor> inputs, int dilation) {
  if (controls_) return run_controlled(std::move(inputs), dilation);
  if (ip_) return run_ip(std::move(inputs), dilation);
  return net("unet", dilation, inputs).run(inputs).at(0).to(at::kFloat);
}

at::Tensor Context::decode(const at::Tensor& latent) {
  Network& n = net("vae_decoder", 1, {latent});
  return n.run({latent.to(dtype_of(n.entry().precision)).contiguous()}).at(0).to(at::kFloat);
}

at::Tensor Context::encode(const at::Tensor& image) {
  Network& n = net("vae_encoder", 1, {image});
  return n.run({image.to(dtype_of(n.entry().precision)).contiguous()}).at(0).to(at::kFloat);
}

at::Tensor Context::relay_resize(const at::Tensor& image, int height, int width, at::ScalarType out) {
  const auto n = image.size(0), c = image.size(1), in_h = image.size(2), in_w = image.size(3);
  if (image.is_cpu()) {  // the C++ core's clamp/bicubic/clamp (ctest: within 1e-5 of torch)
    at::Tensor src = image.to(at::kFloat).contiguous();
    at::Tensor dst = at::empty({n, c, height, width}, src.options());
    resize_clamped(src.data_ptr<float>(), dst.data_ptr<float>(), n * c, static_cast<int>(in_h),
                   static_cast<int>(in_w), height, width);
    return dst.to(out);
  }
#ifdef MEGAFUSION_WITH_CUDA
  if (image.scalar_type() == at::kFloat || image.scalar_type() == at::kHalf) {
    at::Tensor src = image.contiguous();
    at::Tensor dst = at::empty({n, c, height, width}, src.options().dtype(out));
    auto code = [](at::ScalarType t) { return t == at::kHalf ? MF_RELAY_F16 : t == at::kBFloat16 ? MF_RELAY_BF16 : MF_RELAY_F32; };
    const int err = mf_relay_bicubic(src.data_ptr(), code(src.scalar_type()), dst.data_ptr(), code(out),
                                     static_cast<int>(n), static_cast<int>(c), static_cast<int>(in_h),
                                     static_cast<int>(in_w), height, width,
                                     c10::cuda::getCurrentCUDAStream(image.device().index()).stream());
    if (err != 0) throw Failure(MF_ERROR_RUNTIME, "relay kernel launch failed: CUDA error " + std::to_string(err));
    return dst;
  }
#endif
  at::Tensor up = at::upsample_bicubic2d(image.clamp(-1.0, 1.0), {height, width}, false, std::nullopt, std::nullopt);
  return up.clamp(-1.0, 1.0).to(out);
}

void Context::generate(const mf_generate_params& p, const Inputs* inputs, uint8_t* rgb, size_t rgb_bytes) {
  const StagePlan plan = plan_of(p);
  const std::string relay = p.relay && *p.relay ? p.relay : "pixel";
  if (relay != "pixel" && relay != "latent")
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "unknown relay mode '" + relay + "'; choose pixel or latent");
  if (p.dilation < 1) throw Failure(MF_ERROR_INVALID_ARGUMENT, "dilation must be >= 1, got " + std::to_string(p.dilation));
  if (!std::isfinite(p.guidance)) throw Failure(MF_ERROR_INVALID_ARGUMENT, "guidance is not a finite number");
  const size_t need = check_rgb_buffer(rgb, rgb_bytes, plan);
  const int encoders = num_text_encoders();
  int negatives = 0;
  for (int i = 0; i < encoders; ++i) {
    if (!p.prompt_ids[i])
      throw Failure(MF_ERROR_INVALID_ARGUMENT, "prompt_ids[" + std::to_string(i) + "] is NULL; " + family_->name +
                                                   " has " + std::to_string(encoders) + " text encoder(s)");
    negatives += p.negative_ids[i] != nullptr;
  }
  const bool cfg = p.guidance > 1.0f;
  if (negatives != 0 && negatives != encoders)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "negative_ids: give all " + std::to_string(encoders) +
                                                 " arrays or none (empty negative prompt)");
  if (cfg && negatives == 0 && !family_->is_xl)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "negative_ids are NULL: " + family_->name +
                                                 " encodes the empty negative prompt, so pass its token ids");
  if (scaling_ <= 0) throw Failure(MF_ERROR_ENGINE, "models.json in " + folder_.root + " has no VAE scaling factor");
  // Image to image (docs/ALGORITHM.md §14): the stage and step the photo enters at.
  const InitImage* photo = inputs && inputs->init ? &*inputs->init : nullptr;
  const EntryPoint entry = photo ? entry_point(plan, photo->strength, photo->start_stage) : EntryPoint{};
  // ControlNets (§16): named, their engines found for every stage that runs, before any work.
  const bool controlled = inputs && !inputs->controls.empty();
  const bool with_ip = inputs && (!inputs->ip_embeds.empty() || inputs->ip_image);
  std::string stages;  // the plan, for the command that builds a missing ControlNet's or IP-Adapter's engines
  for (const StageSize& s : plan.stages) stages += (stages.empty() ? "" : ",") + stage_str(s);
  const std::string hint = plan_build_hint(folder_, family_->name, device_name_, backend_, precision_, stages);
  if ((controlled || with_ip) && backend_ != "aoti")
    throw Failure(MF_ERROR_ENGINE, std::string(controlled ? "ControlNets" : "IP-Adapters") +
                                       " run on aoti packages; the " + family_->name + " engines in " + folder_.root +
                                       " this context runs are " + backend_);
  // IP-Adapter: the folder's one adapter for this UNet, its embedding length (or its image encoder package and the
  // image's sizes) checked, before any work.
  IpAdapterId ip;
  if (with_ip) {
    if (controlled)  // as mf-generate --engines: no unet_ip engine takes ControlNet residuals
      throw Failure(MF_ERROR_INVALID_ARGUMENT, std::string("IP-Adapter ") + (inputs->ip_image ? "image" : "embeds") +
                                                   " with ControlNets: the unet_ip engines take no ControlNet "
                                                   "residuals; give one or the other");
    ip = folder_ip_adapter(hint);
    if (inputs->ip_image)
      ip_encoder(ip, *inputs->ip_image, hint);
    else if (static_cast<long long>(inputs->ip_embeds.size()) != ip.dim)
      throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter embeds: " + std::to_string(inputs->ip_embeds.size()) +
                                                   " floats given, the unet_ip engines in " + folder_.root + " take " +
                                                   std::to_string(ip.dim) + " (the image encoder's projection dim)");
  }
  Controls controls;
  if (controlled) {
    for (const ControlInput& c : inputs->controls) {
      controls.ids.push_back(resolve_controlnet(folder_, family_->name, c.controlnet, hint));
      controls.key += (controls.key.empty() ? "" : ",") + controls.ids.back().fingerprint;
    }
  }
  check_coverage(plan, p.dilation, relay == "pixel", cfg ? 2 : 1, entry.stage, photo != nullptr,
                 controlled ? &controls : nullptr, with_ip ? &ip : nullptr);

  c10::InferenceMode guard;
  // Conditioning, CFG batch [uncond, cond] (runtime/conditioning.py).
  auto [hidden, pooled] = encode_prompt(p.prompt_ids);
  if (cfg) {
    at::Tensor neg_h, neg_p;
    if (negatives == 0) {  // SDXL force_zeros_for_empty_prompt
      neg_h = at::zeros_like(hidden);
      neg_p = at::zeros_like(pooled);
    } else {
      std::tie(neg_h, neg_p) = encode_prompt(p.negative_ids);
    }
    hidden = at::cat({neg_h, hidden});
    if (family_->is_xl) pooled = at::cat({neg_p, pooled});
  }
  const int64_t batch = hidden.size(0);
  std::vector<StageSchedule> schedules = plan_schedule(plan, family_->scheduler, p.reschedule != 0);
  if (controlled) {
    prepare_controls(controls, inputs->controls, plan, schedules, batch);
  }
  if (with_ip)
    prepare_ip(ip, inputs->ip_image ? encode_ip_image(ip, *inputs->ip_image, hint) : inputs->ip_embeds, batch);
  struct Unset {  // the plain UNet again after this generation, however it ends
    const Controls*& p;
    const IpAdapterId*& q;
    ~Unset() { p = nullptr, q = nullptr; }
  } unset{controls_, ip_};
  controls_ = controlled ? &controls : nullptr;
  ip_ = with_ip ? &ip : nullptr;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(p.seed);
  // Noise as diffusers draws it with a CPU generator: on the CPU in the UNet's dtype (the Python runtime's rule:
  // fp16 and fp32 draws differ by rounding, enough to change a random-weight SDXL image), then moved.
  auto draw_noise = [&](int64_t h, int64_t w) {
    return at::randn({1, 4, h, w}, gen, dtype_of(precision_)).to(at::kFloat).to(device_);
  };
  const int vs = family_->vae_scale;
  const double w = p.guidance;

  const auto a = sqrt_abar;            // a_t = sqrt(abar'_t), as runtime/pipeline.py
  const auto b = sqrt_one_minus_abar;  // b_t = sqrt(1 - abar'_t)
  at::Tensor z, x0;
  StepProgress progress(inputs, plan.total_steps() - entry.global_step, device_);
  const size_t last = plan.stages.size() - 1;
  for (size_t k = 0; k <= last; ++k) {
    const StageSize& st = plan.stages[k];
    const StageSchedule& c = schedules[k];
    const int64_t h = st.height / vs, wd = st.width / vs;
    if (photo && k < entry.stage) continue;  // image to image: the photo enters at a later stage
    if (photo && k == entry.stage) {
      // The photo as this stage's x0, noised to its first step that runs (docs/ALGORITHM.md §14).
      StageSchedule& sk = schedules[k];
      sk.timesteps.erase(sk.timesteps.begin(), sk.timesteps.begin() + entry.step);
      sk.abar_t.erase(sk.abar_t.begin(), sk.abar_t.begin() + entry.step);
      sk.abar_s.erase(sk.abar_s.begin(), sk.abar_s.begin() + entry.step);
      at::Tensor x0_photo = photo_latent(photo->image, st);
      at::Tensor noise = draw_noise(h, wd);
      z = x0_photo * a(c.abar_t[0]) + noise * b(c.abar_t[0]);
    } else if (k == 0) {
      z = draw_noise(h, wd);
    } else {  // relay the truncated x0 to this stage's size, re-noise to its first timestep t'
      at::Tensor x0_up;
      if (relay == "pixel") {
        at::Tensor image = decode(x0 / scaling_);
        const auto enc_dtype = dtype_of(net_at("vae_encoder", 1, {{1, 3, st.height, st.width}}).entry().precision);
        x0_up = encode(relay_resize(image, st.height, st.width, enc_dtype)) * scaling_;
      } else {
        x0_up = at::upsample_bicubic2d(x0, {h, wd}, false, std::nullopt, std::nullopt);
      }
      at::Tensor noise = draw_noise(h, wd);
      z = x0_up * a(c.abar_t[0]) + noise * b(c.abar_t[0]);
    }
    const int delta = k == 0 ? 1 : p.dilation;  // no dilation at the native size
    at::Tensor time_ids;
    if (family_->is_xl) {
      const float row[6] = {float(st.height), float(st.width), 0.f, 0.f, float(st.height), float(st.width)};
      time_ids = at::from_blob(const_cast<float*>(row), {1, 6}, at::kFloat).clone().to(device_).expand({batch, 6});
    }
    const size_t steps = c.timesteps.size();
    if (graphs_on_) {  // the same step, buffered: captured once per descriptor on CUDA, replayed every step
      if (!graphs_) graphs_ = std::make_unique<StepGraphs>(device_, device_.is_cuda());
      StageInputs in{z, c.timesteps, {}, {}, {}, {}, hidden, family_->is_xl ? pooled : at::Tensor(),
                     family_->is_xl ? time_ids : at::Tensor(), static_cast<float>(w)};
      for (size_t i = 0; i < steps; ++i) {
        in.a_t.push_back(a(c.abar_t[i]));
        in.b_t.push_back(b(c.abar_t[i]));
        in.a_s.push_back(a(c.abar_s[i]));
        in.b_s.push_back(b(c.abar_s[i]));
      }
      const auto f = dtype_of(precision_);
      auto call = [this, f](const at::Tensor& sample, const at::Tensor& t, const StepBuffers& sb, int d) {
        std::vector<at::Tensor> inputs = {sample.to(f).contiguous(), t, sb.hidden};
        if (family_->is_xl) inputs.push_back(sb.pooled), inputs.push_back(sb.time_ids);
        return run_unet(std::move(inputs), d);
      };
      const StepKey key{h, wd, delta, cfg, f, controls.key, with_ip ? ip.fingerprint : ""};
      std::tie(z, x0) = graphs_->run_stage(key, in, steps, call, progress);
      continue;  // a truncated stage keeps its last x0; its updated z is not used
    }
    for (size_t i = 0; i < steps; ++i) {
      at::Tensor eps = unet(cfg ? at::cat({z, z}) : z, c.timesteps[i], hidden, pooled, time_ids, delta);
      if (cfg) {
        auto parts = eps.chunk(2);
        eps = parts[0] + (parts[1] - parts[0]) * w;
      }
      x0 = (z - eps * b(c.abar_t[i])) / a(c.abar_t[i]);
      progress.step();
      if (k < last && i == steps - 1) break;  // truncate: x0 from the pre-update latent
      z = x0 * a(c.abar_s[i]) + eps * b(c.abar_s[i]);
    }
  }
  at::Tensor image = decode(z / scaling_);
  at::Tensor px = ((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(at::kByte).permute({1, 2, 0});
  const int64_t top = (px.size(0) - plan.output_height) / 2, left = (px.size(1) - plan.output_width) / 2;
  px = px.slice(0, top, top + plan.output_height).slice(1, left, left + plan.output_width).contiguous().cpu();
  std::memcpy(rgb, px.data_ptr<uint8_t>(), need);
}

}  // namespace megafusion::lib
