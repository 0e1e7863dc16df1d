// DDIM schedule, float64, operation for operation as runtime/schedule.py (numpy's linspace is
// start + i * step with the last value set to stop; cumprod is a running product).
#include "megafusion/schedule.hpp"

#include <cmath>
#include <stdexcept>

namespace megafusion {

namespace {

std::vector<double> linspace(double start, double stop, int n) {
  std::vector<double> y(n);
  const double step = (stop - start) / (n - 1);
  for (int i = 0; i < n; ++i) y[i] = static_cast<double>(i) * step + start;
  if (n > 1) y[n - 1] = stop;
  return y;
}

}  // namespace

std::vector<double> alphas_cumprod(const SchedulerConfig& c) {
  const int t = c.num_train_timesteps;
  std::vector<double> betas;
  if (c.beta_schedule == "scaled_linear") {
    betas = linspace(std::sqrt(c.beta_start), std::sqrt(c.beta_end), t);
    for (double& b : betas) b = b * b;
  } else if (c.beta_schedule == "linear") {
    betas = linspace(c.beta_start, c.beta_end, t);
  } else {
    throw std::invalid_argument("unsupported beta_schedule '" + c.beta_schedule + "'");
  }
  std::vector<double> abar(t);
  double prod = 1.0;
  for (int i = 0; i < t; ++i) abar[i] = prod *= 1.0 - betas[i];
  return abar;
}

std::vector<int64_t> ddim_timesteps(int n, const SchedulerConfig& c) {
  const int t = c.num_train_timesteps;
  if (n < 1 || n > t)
    throw std::invalid_argument("number of steps must be between 1 and " + std::to_string(t) + ", got " +
                                std::to_string(n));
  if (c.timestep_spacing != "leading")
    throw std::invalid_argument("unsupported timestep_spacing '" + c.timestep_spacing + "'");
  const int64_t ratio = t / n;
  std::vector<int64_t> ts(n);
  for (int i = 0; i < n; ++i) ts[i] = static_cast<int64_t>(n - 1 - i) * ratio + c.steps_offset;
  return ts;
}

double reschedule(double abar, double gamma) { return abar / (gamma - (gamma - 1.0) * abar); }

std::vector<StageSchedule> plan_schedule(const StagePlan& plan, const SchedulerConfig& c, bool reschedule_noise) {
  const std::vector<double> abar = alphas_cumprod(c);
  const std::vector<int64_t> ts = ddim_timesteps(plan.total_steps(), c);
  const double final_abar = c.set_alpha_to_one ? 1.0 : abar[0];
  auto at = [&](int64_t t) {
    if (t < 0 || t >= static_cast<int64_t>(abar.size()))
      throw std::out_of_range("timestep " + std::to_string(t) + " outside the " + std::to_string(abar.size()) +
                              " training steps");
    return abar[t];
  };
  std::vector<StageSchedule> out;
  size_t start = 0;
  for (size_t k = 0; k < plan.stages.size(); ++k) {
    StageSchedule s;
    s.gamma = reschedule_noise && k > 0 ? plan.gamma(k) : 1.0;
    for (size_t i = start; i < start + plan.stages[k].steps; ++i) {
      s.timesteps.push_back(ts[i]);
      s.abar_t.push_back(reschedule(at(ts[i]), s.gamma));
      s.abar_s.push_back(reschedule(i + 1 < ts.size() ? at(ts[i + 1]) : final_abar, s.gamma));
    }
    start += plan.stages[k].steps;
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace megafusion
