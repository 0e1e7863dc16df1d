// The C API's context for SD3 and FLUX (docs/ALGORITHM.md §18): the flow-matching stage loop of
// runtime/flow_pipeline.py on the engine folder's packages (transformer per stage shape, export/dit_aoti.py; text
// encoders and VAE, export/flow_aux_aoti.py). Notation: z the latent, v the (guided) velocity, x0 = z - sigma_t v;
// a stage's sigmas come from plan_flow_schedule (megafusion/flow_schedule.hpp).
#ifndef MEGAFUSION_LIB_FLOW_CONTEXT_HPP_
#define MEGAFUSION_LIB_FLOW_CONTEXT_HPP_

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "context.hpp"
#include "control_entries.hpp"
#include "inputs.hpp"
#include "manifest.hpp"
#include "megafusion/flow_schedule.hpp"
#include "megafusion/megafusion.h"
#include "step_graphs.hpp"

namespace megafusion::lib {

// The transformer's dtype for a precision ("fp16", "bf16", else float32).
at::ScalarType flow_dtype(const std::string& precision);
// FLUX's 2x2 packing of latent cells into tokens and back (engine/flow_networks.py pack / unpack).
at::Tensor pack(const at::Tensor& z);
at::Tensor unpack(const at::Tensor& x, int64_t h, int64_t w);

class FlowContext {
 public:
  explicit FlowContext(const mf_context_options& options);

  int num_text_encoders() const { return family_->cfg() ? 3 : 2; }  // CLIP(s), then T5
  StagePlan plan_of(const mf_generate_params& p) const;
  void generate(const mf_generate_params& p, const Inputs* inputs, uint8_t* rgb, size_t rgb_bytes);
  // CUDA graphs of the Euler step (flow_steps.cpp): on by default; off runs the plain step loop.
  void set_graphs(bool on) { graphs_on_ = on; }
  uint64_t graph_captures() const { return graphs_ ? graphs_->captures() : 0; }
  uint64_t graph_replays() const { return graphs_ ? graphs_->replays() : 0; }

 private:
  struct Conditioning {
    at::Tensor states, pooled;  // (B, L, D), (B, P) float32; B = 2 ([negative, prompt]) under CFG
  };
  // ControlNets (docs/ALGORITHM.md §18 "ControlNet"; runtime/flow_controlnet_engines.py), flow_control.cpp.
  struct FlowControl {
    ControlNetId id;
    ModelFacts::FlowControlFacts facts;
    const ControlInput* input;
  };
  // What a controlled step reads, in tensors that keep their identity across generations (refilled in place), so
  // a captured step reads this generation's values: one per list of ControlNets (their fingerprints in order).
  struct FlowControlBuffers {
    at::Tensor scales;  // (nets, kMaxStageSteps) float32: scale * keep at each global step
    std::vector<std::map<std::pair<int64_t, int64_t>, at::Tensor>> images;  // per net: (latent h, w) -> image, batch 1
  };
  struct FlowControls {
    std::vector<FlowControl> nets;
    std::vector<std::string> residuals;  // the controlled transformer's block-sample inputs (control_layout)
    std::string key;                     // the nets' fingerprints in order: a step graph's descriptor holds it
    FlowControlBuffers* buffers = nullptr;  // control_buffers_[key], filled by prepare_controls
  };
  // Static inputs and outputs of the buffered Euler step (runtime/flow_graphs.py FlowStepBuffers).
  struct FlowStepBuffers {
    at::Tensor z, x0;       // (1, C, h, w) float32: the latent (updated in place), x0 of the last step
    at::Tensor step, first; // (1,) int64: the step counter (advanced by each step), the stage's first global step
    at::Tensor tables;      // (3, kMaxStageSteps) float32: sigma_t, sigma_s - sigma_t, timestep = 1000 sigma_t
    at::Tensor guidance;    // (1,) float32 w
    at::Tensor states, pooled;  // the conditioning, float32
  };

  const FlowFamily* family_;
  at::Device device_;
  std::string device_name_;
  EngineFolder folder_;
  double scaling_ = 0, shift_ = 0;
  std::vector<long long> vocab_sizes_;  // per encoder: CLIP(s), then T5
  std::string precision_;               // the transformer's (and text encoders')
  std::string hint_;
  std::map<std::string, std::vector<Entry>> entries_;      // per network, every valid entry
  std::map<std::string, std::unique_ptr<Network>> nets_;   // by entry digest
  std::map<std::pair<int64_t, int64_t>, std::pair<at::Tensor, at::Tensor>> rotary_;  // FLUX, per latent size
  std::map<std::pair<std::string, std::string>, std::vector<Entry>> control_entries_;  // (network, weights)
  const FlowControls* controls_ = nullptr;  // the running generation's, else NULL: the plain transformer runs
  std::string control_hint_;                // the plan's build command with its --controlnet folders
  std::map<std::string, FlowControlBuffers> control_buffers_;  // by FlowControls::key
  bool graphs_on_ = true;
  std::unique_ptr<StepGraphs> graphs_;
  std::map<std::string, FlowStepBuffers> step_buffers_;  // by descriptor text

  const std::vector<Entry>& entries(const std::string& network);
  // The network's package whose first input holds `first` (static packages: one per shape), opened and verified;
  // MF_ERROR_UNSUPPORTED_SIZE naming what is built and the command (`hint`, else the plan's) otherwise.
  Network& net(const std::string& network, const std::vector<long long>& first, const std::string& what,
               const std::string& hint = "");
  std::string encoder_network(const std::string& encoder) const;
  // Opens every package the plan's stages from `first` on run (`photo`: the VAE encoder at stage `first` too).
  // With `controls`: their packages and the controlled transformer instead of the transformer, and the VAE
  // encoder at every stage that runs (the control image's encode).
  void check_coverage(const StagePlan& plan, bool pixel_relay, int64_t batch, size_t first = 0, bool photo = false,
                      const FlowControls* controls = nullptr);
  Conditioning encode(const std::map<std::string, std::vector<int32_t>>& tokens);
  // `t`: (B,) float32 1000 sigma_t; `guidance`: (B,) float32 w; `step`: (1,) int64 global step index (the
  // ControlNets' scale table reads it). All on the device, so a captured step reads them from buffers.
  at::Tensor velocity(const at::Tensor& z, const at::Tensor& t, const Conditioning& c, const at::Tensor& guidance,
                      const at::Tensor& step);
  // One Euler step on the buffers (flow_steps.cpp); every operation is capturable.
  void euler_step(FlowStepBuffers& b, bool cfg);
  // A stage's `sigma_t.size()` steps from z through the buffered step (captured once per descriptor on CUDA,
  // replayed every step); returns (z after the last update, x0 of the last step). `first`: the stage's first
  // global step.
  std::pair<at::Tensor, at::Tensor> run_stage(const at::Tensor& z, const std::vector<float>& sigma_t,
                                              const std::vector<float>& d_sigma, const std::vector<float>& timestep,
                                              const Conditioning& c, float w, bool cfg, int64_t first,
                                              StepProgress& progress);
  // The ControlNets named in `in`, resolved and checked (flow_control.cpp), before any work.
  FlowControls resolve_controls(const std::vector<ControlInput>& in, const StagePlan& plan, int64_t batch);
  // The controlnet package of `c` (NULL: the controlled transformer, taking `all`'s block samples) whose first
  // input holds `sample`, opened and verified; MF_ERROR_UNSUPPORTED_SIZE naming what is built and the command.
  Network& control_net(const FlowControls& all, const FlowControl* c, const std::vector<long long>& sample,
                       const std::string& what);
  // runtime/flow_controlnet.py prepare_plan: the scale table, and each control image encoded at the sizes of the
  // stages from `first` on.
  void prepare_controls(FlowControls& c, const StagePlan& plan, size_t first);
  at::Tensor controlled_velocity(const at::Tensor& z, const at::Tensor& t, const Conditioning& c,
                                 const at::Tensor& guidance, const at::Tensor& step);
  const std::pair<at::Tensor, at::Tensor>& rotary(int64_t h, int64_t w);
  at::Tensor decode(const at::Tensor& latent);
  at::Tensor encode_image(const at::Tensor& image);
};

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_FLOW_CONTEXT_HPP_
