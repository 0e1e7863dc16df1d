// The C API's context: the engine folder's engines for one model on one device, and the generation that runs
// the stage plan on them (the Python runtime's MegaFusionPipeline.generate). Engines are AOTInductor packages,
// or TensorRT plans (trt_network.hpp) in a library built where CMake finds TensorRT (MEGAFUSION_WITH_TENSORRT).
// The TensorRT path was NOT compiled or run in this repository: it was only syntax-checked against
// declarations of the TensorRT 10 API.
#ifndef MEGAFUSION_LIB_CONTEXT_HPP_
#define MEGAFUSION_LIB_CONTEXT_HPP_

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <optional>
#include <tuple>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "control_entries.hpp"
#include "image_encoder.hpp"
#include "inputs.hpp"
#include "manifest.hpp"
#include "megafusion/family.hpp"
#include "megafusion/megafusion.h"
#include "megafusion/plan.hpp"
#include "megafusion/schedule.hpp"
#include "step_graphs.hpp"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace megafusion::lib {

struct SharedWeights;  // aoti_weights.hpp

// The C API's device text ("cpu", "cuda", "cuda:N"; NULL: cpu), and its name as manifests record it.
at::Device parse_device(const char* text);
std::string device_name(const at::Device& d);

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

// An AOTInductor package: one range per input, checked before each run. A --weights-apart package reads the
// tensors of its entry's weight file, shared with every package of the same file (aoti_weights.hpp).
class AotiNetwork final : public Network {
 public:
  AotiNetwork(const std::string& root, Entry entry, const at::Device& device);
  ~AotiNetwork() override;
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override;
  bool covers(size_t index, const std::vector<long long>& shape) const override;

 private:
  std::shared_ptr<const SharedWeights> weights_;  // declared first: outlives the package that reads it
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

// The plan a request asks for: its stages checked by `validate`, else `fallback`'s default plan for its size and
// total steps. A bad size or plan is a Failure with the C API's code (the UNet and the flow contexts share it).
using PlanCheck = std::function<StagePlan(const std::vector<StageSize>&, std::optional<int>, std::optional<int>)>;
using PlanDefault = std::function<StagePlan(std::optional<int>, std::optional<int>, std::optional<int>)>;
StagePlan plan_from_params(const mf_generate_params& p, const PlanCheck& validate, const PlanDefault& fallback);
// The caller's RGB8 buffer: not NULL and large enough for the plan's output (a Failure naming both sizes).
// Returns the bytes the output takes.
size_t check_rgb_buffer(const uint8_t* rgb, size_t rgb_bytes, const StagePlan& plan);

// (1, 3, H, W) float32 in [0, 1], as runtime/image_files.py read_rgb divides (numpy float32: x / 255); the photo
// of image to image is this * 2 - 1 (runtime/img2img.py read_image), for the UNet and flow contexts alike.
at::Tensor unit_rgb(const RgbImage& im);
// The IP-Adapter image's (1, 3, S, S) float32 pixel_values, as the encoder's CLIPImageProcessor makes them
// (clip_image.cpp; image_encoder.hpp clip_steps' refusals).
at::Tensor clip_pixel_values(const RgbImage& im, const ImageEncoderFacts& f);
// runtime/controlnet.py resize_control: bicubic to (height, width), clamped to [0, 1]; the same size as is.
at::Tensor resize_control(const at::Tensor& image, int height, int width);

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
  // `inputs` (may be NULL): a photo to start from, ControlNets, an IP-Adapter image or embeddings (mf_inputs).
  void generate(const mf_generate_params& p, const Inputs* inputs, uint8_t* rgb, size_t rgb_bytes);
  // mf_ip_adapter_image_embeds: the embeddings the folder's image encoder engine gives `image`, into `out` (n
  // floats, the IP-Adapter's length).
  void ip_image_embeds(const RgbImage& image, float* out, size_t n);

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

  // ControlNets (docs/ALGORITHM.md §16; runtime/controlnet.py): what a controlled step reads lives in buffers that
  // keep their identity across generations (a scale table indexed by timestep, one image buffer per UNet batch and
  // latent size), so a captured step reads this generation's values; only which ControlNets run is in its key.
  struct ControlBuffers {
    at::Tensor scales;  // (n, 1000) float32: scale * keep of ControlNet j at timestep t
    std::map<std::tuple<int64_t, int64_t, int64_t>, at::Tensor> images;  // (batch, h, w) -> (n, batch, 3, H, W)
  };
  struct Controls {
    std::vector<ControlNetId> ids;
    std::string key;  // the fingerprints in order: a step graph's descriptor holds it
    ControlBuffers* buffers = nullptr;
  };
  std::map<std::string, ControlBuffers> control_buffers_;  // by Controls::key
  std::map<std::tuple<std::string, std::string, int>, std::vector<Entry>> control_entries_;  // (network, weights, d)
  const Controls* controls_ = nullptr;  // the running generation's, else NULL: run_unet runs the plain UNet
  std::string control_hint_;            // hint_ with the generation's --controlnet folders

  // IP-Adapter (runtime/ipadapter.py EngineIPAdapterNetworks): the folder's unet_ip engines run in the UNet's place
  // with the image embeddings, [zeros, embeds] on the CFG batch, read from one buffer per (adapter, batch) that keeps
  // its identity across generations (a captured step reads this generation's); the adapter is in the step key.
  std::map<std::pair<std::string, int64_t>, at::Tensor> ip_buffers_;
  const IpAdapterId* ip_ = nullptr;  // the running generation's, else NULL
  std::string ip_hint_;              // hint_ with the adapter's --ip-adapter flags
  // The unet_ip package of `ip` whose sample input holds `sample`, opened; MF_ERROR_UNSUPPORTED_SIZE naming the sizes
  // built and the command otherwise.
  Network& ip_net(const IpAdapterId& ip, int dilation, const std::vector<long long>& sample);
  void prepare_ip(const IpAdapterId& ip, const std::vector<float>& embeds, int64_t batch);
  // The folder's one IP-Adapter for this context's UNet (control_entries.hpp resolve_ip_adapter).
  IpAdapterId folder_ip_adapter(const std::string& plan_hint) const;
  // The image encoder engine for `ip` (image_encoder.hpp resolve_image_encoder), its entry checked and opened, and
  // the image's sizes checked against its processor's steps: the refusals, before any network runs.
  Network& ip_encoder(const IpAdapterId& ip, const RgbImage& image, const std::string& plan_hint,
                      ImageEncoderFacts* facts = nullptr);
  // The image's embeddings, ip.dim floats, from that engine.
  std::vector<float> encode_ip_image(const IpAdapterId& ip, const RgbImage& image, const std::string& plan_hint);
  at::Tensor run_ip(std::vector<at::Tensor> inputs, int dilation);

  // runtime/controlnet.py prepare_plan: fills c's buffers (found or made by c.key) for this plan and batch.
  void prepare_controls(Controls& c, const std::vector<ControlInput>& in, const StagePlan& plan,
                        const std::vector<StageSchedule>& schedules, int64_t batch);
  // The controlnet (`id`) or unet_controlled (`id` NULL) package whose sample and control-image inputs hold these
  // shapes, opened; MF_ERROR_UNSUPPORTED_SIZE naming the sizes built and the command otherwise.
  Network& control_net(const ControlNetId* id, int dilation, const std::vector<long long>& sample, int image_h,
                       int image_w);
  at::Tensor run_controlled(std::vector<at::Tensor> inputs, int dilation);
  at::Tensor photo_latent(const RgbImage& photo, const StageSize& stage);

  const std::vector<Entry>& entries(const std::string& network, int dilation);
  // The network's entry whose profile holds a call with these input shapes (in the spec's order), opened.
  Network& net_at(const std::string& network, int dilation, const std::vector<std::vector<long long>>& shapes);
  Network& net(const std::string& network, int dilation, const std::vector<at::Tensor>& inputs);
  // `first`: the first stage that runs (image to image), whose photo the VAE encoder takes when `photo`.
  void check_coverage(const StagePlan& plan, int dilation, bool pixel_relay, int64_t batch, size_t first = 0,
                      bool photo = false, const Controls* controls = nullptr, const IpAdapterId* ip = nullptr);
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
