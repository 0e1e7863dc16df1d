// The flow-matching schedule with a timestep shift per stage (docs/ALGORITHM.md §18), float64, as
// runtime/flow_schedule.py; and the transformer families (SD3, FLUX) as the C++ core needs them (core/dit_families.py).
// z_s = (1 - s) x0 + s noise; s is the unshifted sigma of the one global list, sigma = shift(s) the sigma a stage
// denoises at: SD3 shifts by a = shift sqrt(gamma), FLUX by a = e^mu(image tokens).
#ifndef MEGAFUSION_FLOW_SCHEDULE_HPP_
#define MEGAFUSION_FLOW_SCHEDULE_HPP_

#include <optional>
#include <string>
#include <vector>

#include "megafusion/family.hpp"
#include "megafusion/plan.hpp"

namespace megafusion {

// FlowMatchEulerDiscreteScheduler's options the relay reads (the others are refused in Python's check_config).
struct FlowSchedulerConfig {
  int num_train_timesteps = 1000;
  double shift = 3.0;
  bool use_dynamic_shifting = false;
  double base_shift = 0.5;
  double max_shift = 1.15;
  long long base_image_seq_len = 256;
  long long max_image_seq_len = 4096;
  std::string time_shift_type = "exponential";  // or "linear"
};

// A transformer family: `base` carries the sizes the stage plan reads (its DDIM scheduler is unused), with
// pixel_multiple = vae_scale * patch; `max_side` 0 when the model takes any side (FLUX's RoPE).
struct FlowFamily {
  Family base;
  std::string kind;  // "sd3" or "flux"
  int patch = 2;     // latent cells per token along a side
  int latent_channels = 16;
  int max_side = 0;
  int t5_max_length = 256;
  double default_guidance = 7.0;
  bool guidance_embeds = false;  // FLUX.1-dev: the guidance value is a transformer input
  std::vector<int> rope_axes;    // FLUX: axes_dims_rope (the rotary tables' widths per position axis)
  FlowSchedulerConfig scheduler;

  bool flux() const { return kind == "flux"; }
  bool cfg() const { return kind == "sd3"; }  // FLUX is guidance-distilled: one pass, no negative prompt
};

// sd3, flux, tiny-sd3, tiny-flux.
const std::vector<FlowFamily>& flow_families();
const FlowFamily* find_flow_family(const std::string& name);

// core/plan.py's validate_plan / default_plan for a transformer family: the UNet families' rules on `base`, then
// the largest side (SD3's position table). Throw PlanError with Python's messages.
StagePlan validate_flow_plan(const FlowFamily& f, const std::vector<StageSize>& stages,
                             std::optional<int> width = std::nullopt, std::optional<int> height = std::nullopt);
StagePlan default_flow_plan(const FlowFamily& f, std::optional<int> width = std::nullopt,
                            std::optional<int> height = std::nullopt, std::optional<int> total_steps = std::nullopt);

// sigma = a s / (1 + (a - 1) s).
double shift_sigma(double s, double a);

// FLUX's mu: linear in the token count, base_shift at base_image_seq_len, max_shift at max_image_seq_len.
double calculate_mu(long long tokens, const FlowSchedulerConfig& c);

// The global unshifted list of n sigmas: FLUX linspace(1, 1/n, n); SD3 linspace over the (shifted, when not
// dynamic) training sigmas' ends (numpy's linspace arithmetic, so the values match bit for bit).
std::vector<double> flow_base_sigmas(int n, const FlowFamily& f);

// The shift factor a of a stage with `tokens` image tokens and pixel ratio `gamma` to stage 1.
double flow_stage_shift(const FlowFamily& f, long long tokens, double gamma);

struct FlowStageSchedule {
  double shift = 1.0;
  std::vector<double> sigma_t;  // sigma at each step of the stage
  std::vector<double> sigma_s;  // sigma after each step (the next base sigma shifted by this stage's a; 0 at the end)
};

// Slices the global list by stage and shifts each slice with its stage's a (stage 1's when `reschedule` is off).
std::vector<FlowStageSchedule> plan_flow_schedule(const StagePlan& plan, const FlowFamily& f, bool reschedule = true);

}  // namespace megafusion

#endif  // MEGAFUSION_FLOW_SCHEDULE_HPP_
