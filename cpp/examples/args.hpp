// mf-generate-cpp's command line, without libtorch or libmegafusion (megafusion.h only for its types), so
// ctest `cli_args` checks it. Every bad value is one line naming the flag and the value, exit status 2:
// numbers are read whole (no trailing junk, no silent 0 or default), within their domain:
//   --seed      an integer, 0 <= seed < 2^64 (no sign)
//   --guidance  a finite number >= 0 (nan, inf and negatives refused; finite as a 32-bit float too)
//   --steps     an integer >= 1 (and not with --stages, which gives the steps per stage)
//   --dilation, --repeats  integers >= 1
//   --size      WIDTHxHEIGHT, each side 1 to 16384 (core/plan.py parse_size)
//   --strength  a number in (0, 1] (default 0.8, or the --start-stage's first step); needs --image
//   --start-stage  an integer >= 1; needs --image
//   --controlnet NAME / --control-image FILE  pairwise; --control-scale/-start/-end once or once per ControlNet
//   --ip-adapter-embeds  a file of float32 values (raw or .npy); not with --controlnet
//   --ip-adapter-image  a binary PPM; not with --controlnet or --ip-adapter-embeds
//   --deadline  a number of seconds >= 0 (0: stop at the first step)
//   --ids       lines "prompt I id..." / "negative I id..." of MF_TOKEN_LENGTH ids each, ids 0 <= id < 2^31
#ifndef MEGAFUSION_EXAMPLES_ARGS_HPP_
#define MEGAFUSION_EXAMPLES_ARGS_HPP_

#include <cstdint>
#include <string>
#include <vector>

#include "megafusion/megafusion.h"

namespace mfcli {

constexpr int kUsageError = 2;
constexpr int kMaxSide = 16384;  // core/plan.py MAX_SIDE
constexpr int kMaxDilation = 8;  // cli/common.py MAX_DILATION

extern const char* const kUsage;

struct CommandLine {
  std::string engines, model, ids, output, stages, relay = "pixel", device = "cpu";
  int repeats = 1;
  bool help = false;
  bool graphs = true;  // --no-graphs: mf_set_cuda_graphs(ctx, 0)
  bool progress = false;  // --progress: "step S/T" on stderr after each step
  float deadline_s = -1;  // --deadline SECONDS (>= 0) from each generation's start; < 0: none
  std::vector<std::vector<int32_t>> prompt, negative;  // per text encoder, from --ids
  // Image to image: --image FILE (binary PPM), --strength S (0: none given), --start-stage K.
  std::string image;
  float strength = 0;
  int start_stage = 0;
  // ControlNets: --controlnet NAME and --control-image FILE (PPM) pairwise; scale/start/end once for all or
  // once per ControlNet (mf-generate's rule).
  std::vector<std::string> controlnets, control_images;
  std::vector<float> control_scales, control_starts, control_ends;
  // IP-Adapter: --ip-adapter-embeds FILE, the image encoder's image_embeds (examples/embeds.hpp reads it), or
  // --ip-adapter-image FILE (PPM), which the folder's image encoder package encodes.
  std::string ip_embeds, ip_image;
};

// A finite float, whole text; false with `error` naming `flag` otherwise.
bool parse_float(const std::string& flag, const std::string& text, float& out, std::string& error);

// Each: true and `out` set, or false and `error` one line naming `flag` and the value. lo >= 0.
bool parse_u64(const std::string& flag, const std::string& text, uint64_t& out, std::string& error);
bool parse_int_at_least(const std::string& flag, const std::string& text, int lo, int& out, std::string& error);
bool parse_guidance(const std::string& flag, const std::string& text, float& out, std::string& error);
bool parse_size(const std::string& flag, const std::string& text, int& width, int& height, std::string& error);
// The token file `mf-tokens` writes; `flag` names it in errors.
bool read_ids(const std::string& flag, const std::string& path, std::vector<std::vector<int32_t>>& prompt,
              std::vector<std::vector<int32_t>>& negative, std::string& error);

// argv into `cl` and `params` (which the caller initialised with mf_generate_params_init; the prompt and
// negative id pointers are left for the caller to set from cl). 0, or kUsageError with `error` one line.
// --help sets cl.help and returns 0 at once.
int parse_command_line(int argc, const char* const* argv, CommandLine& cl, mf_generate_params& params,
                       std::string& error);

}  // namespace mfcli

#endif  // MEGAFUSION_EXAMPLES_ARGS_HPP_
