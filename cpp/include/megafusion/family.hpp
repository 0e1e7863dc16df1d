// Model families as the C++ core needs them: native size, size multiple, default plan, scheduler.
// Mirrors core/families.py; the shared test vectors check that the two tables agree.
#ifndef MEGAFUSION_FAMILY_HPP_
#define MEGAFUSION_FAMILY_HPP_

#include <string>
#include <vector>

namespace megafusion {

struct SchedulerConfig {
  int num_train_timesteps = 1000;
  double beta_start = 0.00085;
  double beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";  // or "linear"
  std::string timestep_spacing = "leading";     // the only spacing supported (docs/ALGORITHM.md §1)
  int steps_offset = 1;
  bool set_alpha_to_one = false;
};

struct StageSize {
  int height = 0;
  int width = 0;
  int steps = 0;
};

struct Family {
  std::string name;
  bool is_xl = false;
  int native_height = 0;
  int native_width = 0;
  int vae_scale = 8;        // pixels per latent cell along a side
  int pixel_multiple = 64;  // stage sides must be multiples of this (latent divisible by 2^downsamples)
  std::vector<StageSize> default_stages;
  SchedulerConfig scheduler;
  int max_side = 0;  // the largest stage side the model takes (SD3's position table); 0: no limit

  long long native_pixels() const { return static_cast<long long>(native_height) * native_width; }
};

// The built-in families (sd15, sdxl, tiny-sd15, tiny-sdxl).
const std::vector<Family>& families();

// The family called `name`, or nullptr.
const Family* find_family(const std::string& name);

}  // namespace megafusion

#endif  // MEGAFUSION_FAMILY_HPP_
