// runtime/flow_schedule.py and the transformer families' table (core/dit_families.py); the shared test vectors
// (python -m megafusion.runtime.flow_test_vectors) check both.
#include "megafusion/flow_schedule.hpp"

#include <algorithm>
#include <cmath>

namespace megafusion {

namespace {

FlowSchedulerConfig sd3_scheduler() { return {}; }

FlowSchedulerConfig flux_scheduler() {
  FlowSchedulerConfig c;
  c.use_dynamic_shifting = true;
  return c;
}

FlowFamily make(const std::string& name, const std::string& kind, int native, int patch, int max_side, int t5_len,
                double guidance, const FlowSchedulerConfig& c) {
  FlowFamily f;
  // The paper's SD3 plan (§4.1) for both: native size 20 steps, 2x 8 steps.
  f.base = Family{name, false, native, native, 8, 8 * patch, {{native, native, 20}, {2 * native, 2 * native, 8}}, {}};
  f.kind = kind;
  f.patch = patch;
  f.max_side = max_side;
  f.base.max_side = max_side;
  f.t5_max_length = t5_len;
  f.default_guidance = guidance;
  f.scheduler = c;
  return f;
}

FlowFamily with_rope(FlowFamily f, std::vector<int> axes) {
  f.guidance_embeds = true;
  f.rope_axes = std::move(axes);
  return f;
}

std::vector<FlowFamily> make_flow_families() {
  // SD3's position table: pos_embed_max_size (192; tiny 64) patches a side, times vae_scale * patch.
  return {make("sd3", "sd3", 1024, 2, 192 * 16, 256, 7.0, sd3_scheduler()),
          with_rope(make("flux", "flux", 1024, 2, 0, 512, 3.5, flux_scheduler()), {16, 56, 56}),
          make("tiny-sd3", "sd3", 128, 2, 64 * 16, 256, 7.0, sd3_scheduler()),
          with_rope(make("tiny-flux", "flux", 128, 2, 0, 512, 3.5, flux_scheduler()), {4, 6, 6})};
}

// numpy.linspace(start, stop, n): start + i * step, the last value stop exactly.
std::vector<double> linspace(double start, double stop, int n) {
  std::vector<double> out(n);
  if (n == 1) {
    out[0] = start;
    return out;
  }
  const double step = (stop - start) / (n - 1);
  for (int i = 0; i < n; ++i) out[i] = i * step + start;
  out[n - 1] = stop;
  return out;
}

}  // namespace

const std::vector<FlowFamily>& flow_families() {
  static const std::vector<FlowFamily> table = make_flow_families();
  return table;
}

const FlowFamily* find_flow_family(const std::string& name) {
  for (const FlowFamily& f : flow_families())
    if (f.base.name == name) return &f;
  return nullptr;
}

StagePlan validate_flow_plan(const FlowFamily& f, const std::vector<StageSize>& stages, std::optional<int> width,
                             std::optional<int> height) {
  return validate_plan(f.base, stages, width, height);  // base.max_side: checked in validate_plan's stage loop
}

StagePlan default_flow_plan(const FlowFamily& f, std::optional<int> width, std::optional<int> height,
                            std::optional<int> total_steps) {
  return default_plan(f.base, width, height, total_steps);
}

double shift_sigma(double s, double a) { return a * s / (1.0 + (a - 1.0) * s); }

double calculate_mu(long long tokens, const FlowSchedulerConfig& c) {
  const double lo = static_cast<double>(c.base_image_seq_len), hi = static_cast<double>(c.max_image_seq_len);
  return c.base_shift + (c.max_shift - c.base_shift) * (static_cast<double>(tokens) - lo) / (hi - lo);
}

std::vector<double> flow_base_sigmas(int n, const FlowFamily& f) {
  if (n < 1) throw PlanError("number of steps must be at least 1, got " + std::to_string(n));
  if (f.flux()) return linspace(1.0, 1.0 / n, n);
  double hi = 1.0, lo = 1.0 / f.scheduler.num_train_timesteps;
  if (!f.scheduler.use_dynamic_shifting) {
    hi = shift_sigma(hi, f.scheduler.shift);
    lo = shift_sigma(lo, f.scheduler.shift);
  }
  return linspace(hi, lo, n);
}

double flow_stage_shift(const FlowFamily& f, long long tokens, double gamma) {
  const FlowSchedulerConfig& c = f.scheduler;
  if (c.use_dynamic_shifting) {
    const double mu = calculate_mu(tokens, c);
    return c.time_shift_type == "exponential" ? std::exp(mu) : mu;
  }
  return c.shift * std::sqrt(gamma);
}

std::vector<FlowStageSchedule> plan_flow_schedule(const StagePlan& plan, const FlowFamily& f, bool reschedule) {
  const std::vector<double> s = flow_base_sigmas(plan.total_steps(), f);
  const long long per_token = static_cast<long long>(f.base.vae_scale * f.patch) * (f.base.vae_scale * f.patch);
  std::vector<FlowStageSchedule> out;
  size_t start = 0;
  for (size_t k = 0; k < plan.stages.size(); ++k) {
    const size_t kk = reschedule ? k : 0;
    const StageSize& st = plan.stages[kk];
    FlowStageSchedule sched;
    sched.shift = flow_stage_shift(f, static_cast<long long>(st.height) * st.width / per_token, plan.gamma(kk));
    const size_t stop = start + plan.stages[k].steps;
    for (size_t i = start; i < stop; ++i) {
      sched.sigma_t.push_back(shift_sigma(s[i], sched.shift));
      sched.sigma_s.push_back(i + 1 < s.size() ? shift_sigma(s[i + 1], sched.shift) : 0.0);  // the plan ends at 0
    }
    out.push_back(std::move(sched));
    start = stop;
  }
  return out;
}

}  // namespace megafusion
