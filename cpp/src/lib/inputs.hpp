// What a generation takes beyond mf_generate_params (the C API's mf_inputs): a photo to start from,
// ControlNets and an IP-Adapter image or its embeddings, each checked when set; and where a photo enters a plan
// (runtime/img2img.py entry_point).
// Plain C++ (no libtorch), so ctest checks the refusals quickly.
#ifndef MEGAFUSION_LIB_INPUTS_HPP_
#define MEGAFUSION_LIB_INPUTS_HPP_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "megafusion/megafusion.h"  // mf_progress_fn (a C type, no library code)
#include "megafusion/plan.hpp"

namespace megafusion::lib {

struct RgbImage {
  std::vector<uint8_t> rgb;  // height rows of width * 3 bytes
  int width = 0, height = 0;
};

struct InitImage {
  RgbImage image;
  double strength = 0;  // 0: the start stage's first step (only with start_stage >= 1)
  int start_stage = 0;  // 1-based; 0: the stage the strength selects
};

struct ControlInput {
  std::string controlnet;  // a name models.json records, or a weights fingerprint (prefix)
  RgbImage image;
  float scale = 1;
  double start = 0, end = 1;  // fraction of the global schedule
};

// Setters throw Failure(MF_ERROR_INVALID_ARGUMENT) naming the bad value; nothing is changed then.
struct Inputs {
  std::optional<InitImage> init;
  std::vector<ControlInput> controls;

  void set_init_image(const uint8_t* rgb, int width, int height, float strength, int start_stage);
  void add_control(const char* controlnet, const uint8_t* rgb, int width, int height, float scale, float start,
                   float end);

  // IP-Adapter (docs/ENGINES.md "The C API"): the image encoder's image_embeds of the reference image, D floats
  // (D is checked against the folder's unet_ip engines when a generation runs); empty: none.
  std::vector<float> ip_embeds;
  void set_ip_embeds(const float* embeds, size_t n);
  // Or the reference image itself (RGB8, any size), which the folder's image encoder engine turns into them
  // (image_encoder.hpp). One or the other: setting one while the other is set is refused (nothing changes).
  std::optional<RgbImage> ip_image;
  void set_ip_image(const uint8_t* rgb, int width, int height);

  // The progress callback and its user pointer (mf_inputs_set_progress; step_graphs.hpp StepProgress calls it).
  mf_progress_fn progress = nullptr;
  void* progress_user = nullptr;

  // SD3 / FLUX prompts: ids per encoder ("clip_l", "clip_g", "t5"), the negative prompt's apart.
  std::map<std::string, std::vector<int32_t>> tokens, negative_tokens;
  void set_tokens(const char* encoder, const int32_t* ids, size_t n, bool negative);
};

// The double a caller meant by a float: the shortest decimal that rounds to it (0.7f -> 0.7), so int(N * s)
// and i / N < start compare as Python does with the same text (0.7f * 10 in double is 6.99999988).
double as_typed(float value);

// runtime/img2img.py EntryPoint: the first stage that runs, the steps of it skipped, the global step index.
struct EntryPoint {
  size_t stage = 0;
  int step = 0;
  int global_step = 0;
};

// runtime/img2img.py entry_point with the C API's names: strength 0 with a start stage is Python's None.
// Failure(MF_ERROR_INVALID_ARGUMENT) naming the strength or start_stage that does not fit the plan.
EntryPoint entry_point(const StagePlan& plan, double strength, int start_stage);

// runtime/flow_img2img.py flow_entry_point with the C API's names (SD3 / FLUX, diffusers' flow rule): the first
// int(max(N - min(N * strength, N), 0)) of the plan's N steps are skipped; strength 0 with a start stage is
// Python's None (that stage's first step). Failure(MF_ERROR_INVALID_ARGUMENT) as entry_point.
EntryPoint flow_entry_point(const StagePlan& plan, double strength, int start_stage);

// runtime/controlnet.py keep: 1 while global step i of `total` lies in [start, end) of the schedule, else 0.
float control_keep(int i, int total, double start, double end);

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_INPUTS_HPP_
