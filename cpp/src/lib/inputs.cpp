#include "inputs.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "manifest.hpp"  // Failure

namespace megafusion::lib {

namespace {

constexpr long long kMaxPixels = 1LL << 28;  // 16384 x 16384: core/plan.py's largest side, squared
constexpr size_t kMaxEmbeds = 1 << 16;        // far above any CLIP projection (768, 1024, 1280)

// "%g" as Python prints a float in messages (0.7, 1e-05).
std::string g(double v, const char* format = "%g") {
  char buf[32];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

RgbImage copy_image(const char* what, const uint8_t* rgb, int width, int height) {
  if (!rgb) throw Failure(MF_ERROR_INVALID_ARGUMENT, std::string(what) + ": rgb is NULL");
  if (width <= 0 || height <= 0 || static_cast<long long>(width) * height > kMaxPixels)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, std::string(what) + ": size " + std::to_string(width) + "x" +
                                                 std::to_string(height) + " (each side >= 1, at most " +
                                                 std::to_string(kMaxPixels) + " pixels)");
  RgbImage out;
  out.width = width, out.height = height;
  out.rgb.assign(rgb, rgb + static_cast<size_t>(width) * height * 3);
  return out;
}

}  // namespace

double as_typed(float value) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, value);  // shortest round-trip text
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

void Inputs::set_init_image(const uint8_t* rgb, int width, int height, float strength, int start_stage) {
  if (start_stage < 0)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "start_stage " + std::to_string(start_stage) +
                                                 ": 0 (from the strength) or a 1-based stage");
  const bool from_stage = start_stage > 0 && strength == 0.0f;  // Python's strength None
  if (!from_stage && !(strength > 0.0f && strength <= 1.0f))   // nan fails both comparisons
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "strength " + g(strength) + ": must be a number in (0, 1]" +
                                                 (start_stage == 0 ? "" : " (or 0: the start stage's first step)"));
  InitImage init{copy_image("init image", rgb, width, height), from_stage ? 0.0 : as_typed(strength), start_stage};
  this->init = std::move(init);
}

void Inputs::set_tokens(const char* encoder, const int32_t* ids, size_t n, bool negative) {
  const std::string name = encoder ? encoder : "";
  if (name != "clip_l" && name != "clip_g" && name != "t5")
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "unknown text encoder '" + name + "'; choose clip_l, clip_g or t5");
  if (!ids) throw Failure(MF_ERROR_INVALID_ARGUMENT, name + " token ids are NULL");
  if (n == 0 || n > 4096)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, name + ": " + std::to_string(n) + " token ids (1 to 4096)");
  for (size_t j = 0; j < n; ++j)
    if (ids[j] < 0)
      throw Failure(MF_ERROR_INVALID_ARGUMENT, name + " token id " + std::to_string(ids[j]) + " at position " +
                                                   std::to_string(j) + " is negative");
  (negative ? negative_tokens : tokens)[name].assign(ids, ids + n);
}

void Inputs::set_ip_image(const uint8_t* rgb, int width, int height) {
  if (!ip_embeds.empty())
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter image: these inputs hold IP-Adapter embeds already; give "
                                             "the image or the embeds, not both (a new mf_inputs for the other)");
  ip_image = copy_image("IP-Adapter image", rgb, width, height);
}

void Inputs::set_ip_embeds(const float* embeds, size_t n) {
  if (ip_image)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter embeds: these inputs hold an IP-Adapter image already; give "
                                             "the image or the embeds, not both (a new mf_inputs for the other)");
  if (!embeds) throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter embeds are NULL");
  if (n == 0 || n > kMaxEmbeds)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter embeds: " + std::to_string(n) + " floats (1 to " +
                                                 std::to_string(kMaxEmbeds) + ")");
  for (size_t j = 0; j < n; ++j)
    if (!std::isfinite(embeds[j]))
      throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter embeds: value " + g(embeds[j]) + " at position " +
                                                   std::to_string(j) + " is not a finite number");
  ip_embeds.assign(embeds, embeds + n);
}

void Inputs::add_control(const char* controlnet, const uint8_t* rgb, int width, int height, float scale, float start,
                         float end) {
  if (!controlnet || !*controlnet)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "controlnet name is NULL or empty");
  const std::string name = controlnet;
  if (!std::isfinite(scale))
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "control scale " + g(scale) + " of controlnet '" + name +
                                                 "': must be a finite number");
  if (!(0.0f <= start && start < end && end <= 1.0f))
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "control start " + g(start) + " / end " + g(end) + " of controlnet '" +
                                                 name + "': need 0 <= start < end <= 1");
  controls.push_back(ControlInput{name, copy_image(("control image of controlnet '" + name + "'").c_str(), rgb, width,
                                                   height),
                                  scale, as_typed(start), as_typed(end)});
}

// The first global step of each stage, after checking that start_stage (0, or 1-based) names one of them.
static std::vector<int> stage_starts(const StagePlan& plan, int start_stage) {
  const int n_stages = static_cast<int>(plan.stages.size());
  if (start_stage != 0 && !(1 <= start_stage && start_stage <= n_stages))
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "start_stage " + std::to_string(start_stage) + ": the plan has stages 1 to " +
                                                 std::to_string(n_stages));
  std::vector<int> starts;
  for (int k = 0, s = 0; k < n_stages; s += plan.stages[k].steps, ++k) starts.push_back(s);
  return starts;
}

EntryPoint entry_point(const StagePlan& plan, double strength, int start_stage) {
  const int total = plan.total_steps();
  const std::vector<int> starts = stage_starts(plan, start_stage);
  auto stop = [&](int k) { return starts[k] + plan.stages[k].steps; };
  int n;
  if (strength == 0 && start_stage != 0) {
    n = total - starts[start_stage - 1];  // counted, not via a float that int() could round down
    strength = static_cast<double>(n) / total;
  } else {
    n = std::min(static_cast<int>(total * strength), total);  // diffusers' init_timestep
  }
  if (n == 0)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "strength " + g(strength) + ": runs int(" + std::to_string(total) + " * " +
                                                 g(strength) + ") = 0 of the plan's " + std::to_string(total) +
                                                 " steps; give at least " + g(1.0 / total, "%.4g"));
  const int first = total - n;
  int k = 0;
  while (!(starts[k] <= first && first < stop(k))) ++k;
  if (start_stage != 0 && k != start_stage - 1) {
    const int s = start_stage - 1;
    const double lo = static_cast<double>(total - stop(s) + 1) / total, hi = static_cast<double>(total - starts[s]) / total;
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "strength " + g(strength) + " starts at step " + std::to_string(first + 1) +
                                                 " of " + std::to_string(total) + ", in stage " + std::to_string(k + 1) +
                                                 ", not start_stage " + std::to_string(start_stage) + "; stage " +
                                                 std::to_string(start_stage) + " takes strengths " + g(lo, "%.4g") + " to " +
                                                 g(hi, "%.4g"));
  }
  return EntryPoint{static_cast<size_t>(k), first - starts[k], first};
}

EntryPoint flow_entry_point(const StagePlan& plan, double strength, int start_stage) {
  const int total = plan.total_steps();
  const std::vector<int> starts = stage_starts(plan, start_stage);
  auto stop = [&](int k) { return starts[k] + plan.stages[k].steps; };
  int first;
  if (strength == 0 && start_stage != 0) {
    first = starts[start_stage - 1];  // counted, not via a float that int() could round down
  } else {                            // diffusers' flow get_timesteps, double for Python's float
    const double n = static_cast<double>(total);
    first = static_cast<int>(std::max(n - std::min(n * strength, n), 0.0));
  }
  if (first >= total)  // a strength so small that N * strength vanishes beside N
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "strength " + g(strength) + ": runs none of the plan's " +
                                                 std::to_string(total) + " steps; give at least " +
                                                 g(1.0 / total, "%.4g"));
  int k = 0;
  while (!(starts[k] <= first && first < stop(k))) ++k;
  if (start_stage != 0 && k != start_stage - 1) {
    const int s = start_stage - 1;
    const double lo = static_cast<double>(total - stop(s)) / total, hi = static_cast<double>(total - starts[s]) / total;
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "strength " + g(strength) + " starts at step " + std::to_string(first + 1) +
                                                 " of " + std::to_string(total) + ", in stage " + std::to_string(k + 1) +
                                                 ", not start_stage " + std::to_string(start_stage) + "; stage " +
                                                 std::to_string(start_stage) + " takes strengths above " +
                                                 g(lo, "%.4g") + " up to " + g(hi, "%.4g"));
  }
  return EntryPoint{static_cast<size_t>(k), first - starts[k], first};
}

float control_keep(int i, int total, double start, double end) {
  const double a = static_cast<double>(i) / total, b = static_cast<double>(i + 1) / total;
  return (a < start || b > end) ? 0.0f : 1.0f;
}

}  // namespace megafusion::lib
