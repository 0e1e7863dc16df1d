// The DDIM schedule with noise re-scheduling (docs/ALGORITHM.md §1, §4), float64, as runtime/schedule.py.
#ifndef MEGAFUSION_SCHEDULE_HPP_
#define MEGAFUSION_SCHEDULE_HPP_

#include <cstdint>
#include <vector>

#include "megafusion/family.hpp"
#include "megafusion/plan.hpp"

namespace megafusion {

// abar[t] for t = 0 .. T-1.
std::vector<double> alphas_cumprod(const SchedulerConfig& c);

// The one global descending list of n timesteps ("leading" spacing plus offset): 981, 961, ..., 1 for 50.
std::vector<int64_t> ddim_timesteps(int n, const SchedulerConfig& c);

// abar' = abar / (gamma - (gamma - 1) abar): SNR' = SNR / gamma.
double reschedule(double abar, double gamma);

struct StageSchedule {
  double gamma = 1.0;
  std::vector<int64_t> timesteps;  // this stage's slice of the global list
  std::vector<double> abar_t;      // abar'_t at those timesteps
  std::vector<double> abar_s;      // abar'_s at the next timestep of the global list (or the final abar)
};

// Slices the global list by stage; stages after the first use gamma_k when `reschedule_noise` is on.
std::vector<StageSchedule> plan_schedule(const StagePlan& plan, const SchedulerConfig& c,
                                         bool reschedule_noise = true);

}  // namespace megafusion

#endif  // MEGAFUSION_SCHEDULE_HPP_
