// Stage plans, operation for operation as core/plan.py (Python's round() is round-half-even, as
// std::nearbyint in the default rounding mode), so plans come out identical.
#include "megafusion/plan.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <numeric>

namespace megafusion {

namespace {

int round_to(double x, int m) { return std::max(m, static_cast<int>(std::nearbyint(x / m)) * m); }

int ceil_to(int x, int m) {
  const int up = (x + m - 1) / m * m;  // x > 0 here
  return std::max(m, up);
}

std::string size_str(int w, int h) { return std::to_string(w) + "x" + std::to_string(h); }

std::vector<int> split_steps(int total, const std::vector<int>& tmpl) {
  if (total < static_cast<int>(tmpl.size()))
    throw PlanError(std::to_string(total) + " steps cannot fill a " + std::to_string(tmpl.size()) + "-stage plan");
  const int t = std::accumulate(tmpl.begin(), tmpl.end(), 0);
  std::vector<int> out(tmpl.size());
  int rest = 0;
  for (size_t i = 1; i < tmpl.size(); ++i) {
    out[i] = std::max(1, static_cast<int>(std::nearbyint(static_cast<double>(total) * tmpl[i] / t)));
    rest += out[i];
  }
  out[0] = total - rest;
  return out;
}

std::string quoted(const std::string& s) { return "'" + s + "'"; }  // Python's repr of a plain string

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

}  // namespace

int StagePlan::total_steps() const {
  int n = 0;
  for (const StageSize& s : stages) n += s.steps;
  return n;
}

double StagePlan::gamma(size_t k) const {
  const double p0 = static_cast<double>(stages[0].height) * stages[0].width;
  return static_cast<double>(stages[k].height) * stages[k].width / p0;
}

std::string stage_str(const StageSize& s) { return size_str(s.width, s.height) + ":" + std::to_string(s.steps); }

StagePlan validate_plan(const Family& f, const std::vector<StageSize>& stages, std::optional<int> width,
                        std::optional<int> height) {
  if (stages.empty()) throw PlanError("the stage plan is empty");
  const int m = f.pixel_multiple;
  const std::string native = size_str(f.native_width, f.native_height);
  int total = 0;
  for (size_t i = 0; i < stages.size(); ++i) {
    const StageSize& s = stages[i];
    const std::string k = std::to_string(i + 1);
    if (s.steps <= 0)
      throw PlanError("stage " + k + " (" + stage_str(s) + ") has " + std::to_string(s.steps) +
                      " steps; each stage needs at least 1");
    for (auto [name, side] : {std::pair<const char*, int>{"height", s.height}, {"width", s.width}}) {
      if (side <= 0 || side > kMaxSide || side % m)
        throw PlanError("stage " + k + " (" + stage_str(s) + "): " + name + " " + std::to_string(side) +
                        " is not a positive multiple of " + std::to_string(m) + " (what " + f.name +
                        "'s UNet accepts), at most " + std::to_string(kMaxSide));
    }
    if (f.max_side > 0 && std::max(s.height, s.width) > f.max_side)  // SD3's position table (core/plan.py)
      throw PlanError("stage " + k + " (" + stage_str(s) + "): a side above " + std::to_string(f.max_side) +
                      ", the largest " + f.name + " takes");
    if (static_cast<double>(s.height) * s.width < kMinStageAreaFraction * static_cast<double>(f.native_pixels()))
      throw PlanError("stage " + k + " (" + size_str(s.width, s.height) + ") is smaller than " + f.name +
                      "'s native " + native);
    if (i > 0) {
      const StageSize& p = stages[i - 1];
      if (s.height < p.height || s.width < p.width)
        throw PlanError("stage " + k + " (" + size_str(s.width, s.height) + ") is smaller than stage " +
                        std::to_string(i) + " (" + size_str(p.width, p.height) +
                        ") on a side; stages go coarse to fine");
    }
    total += s.steps;
  }
  if (total > kMaxTotalSteps)
    throw PlanError(std::to_string(total) + " steps in all; at most " + std::to_string(kMaxTotalSteps));
  const StageSize& last = stages.back();
  const int out_w = width.value_or(last.width), out_h = height.value_or(last.height);
  if (!(last.width - m < out_w && out_w <= last.width && last.height - m < out_h && out_h <= last.height))
    throw PlanError("output size " + size_str(out_w, out_h) + " does not fit the last stage " +
                    size_str(last.width, last.height) + ": each side must be at most the stage's and within " +
                    std::to_string(m - 1) + " pixels of it");
  return StagePlan{stages, out_h, out_w};
}

// Past the template's reach (docs/ALGORITHM.md §2, "Large sizes"; core/plan.py _doubling_stages): K = 1 +
// ceil(log2 ratio) stages whose sides grow by the same factor, at most 2x per relay; stage 1 keeps the template's
// steps, the later stages share the rest evenly.
static std::vector<StageSize> doubling_stages(const Family& f, int h1, int w1, int hf, int wf, double ratio,
                                              std::optional<int> total_steps) {
  const int m = f.pixel_multiple;
  const int k_last = static_cast<int>(std::ceil(std::log2(ratio) - 1e-9));
  int rest = 0;
  for (size_t i = 1; i < f.default_stages.size(); ++i) rest += f.default_stages[i].steps;
  std::vector<int> steps{f.default_stages[0].steps};
  for (int k = 0; k < k_last; ++k) steps.push_back(rest / k_last + (k < rest % k_last ? 1 : 0));
  if (total_steps) steps = split_steps(*total_steps, steps);
  std::vector<StageSize> stages;
  for (int k = 0; k <= k_last; ++k) {
    const double frac = static_cast<double>(k) / k_last;
    const int hk = k == k_last ? hf : round_to(h1 * std::pow(static_cast<double>(hf) / h1, frac), m);
    const int wk = k == k_last ? wf : round_to(w1 * std::pow(static_cast<double>(wf) / w1, frac), m);
    if (!stages.empty() && stages.back().height == hk && stages.back().width == wk)
      stages.back().steps += steps[k];
    else
      stages.push_back({hk, wk, steps[k]});
  }
  return stages;
}

StagePlan default_plan(const Family& f, std::optional<int> width, std::optional<int> height,
                       std::optional<int> total_steps) {
  int w = 0, h = 0;
  if (!width || !height) {
    const StageSize& last = f.default_stages.back();
    // As Python's `width or w`: a missing (or zero) side takes the default plan's last stage's.
    w = width && *width ? *width : last.width;
    h = height && *height ? *height : last.height;
  } else {
    w = *width;
    h = *height;
  }
  const int m = f.pixel_multiple;
  const double native = static_cast<double>(f.native_pixels());
  if (static_cast<double>(w) * h < kMinStageAreaFraction * native)
    throw PlanError("size " + size_str(w, h) + " is smaller than " + f.name + "'s native " +
                    size_str(f.native_width, f.native_height) + "; MegaFusion generates at native size or above");
  const int hf = ceil_to(h, m), wf = ceil_to(w, m);
  const int h1 = std::min(hf, round_to(std::sqrt(static_cast<double>(f.native_pixels() * h) / w), m));
  const int w1 = std::min(wf, round_to(std::sqrt(static_cast<double>(f.native_pixels() * w) / h), m));
  std::vector<int> steps;
  for (const StageSize& s : f.default_stages) steps.push_back(s.steps);
  const int n_total = total_steps ? *total_steps : std::accumulate(steps.begin(), steps.end(), 0);
  if (h1 == hf && w1 == wf) return validate_plan(f, {{hf, wf, n_total}}, w, h);
  const int k_last = static_cast<int>(f.default_stages.size()) - 1;
  const double ratio = std::max(static_cast<double>(hf) / h1, static_cast<double>(wf) / w1);
  if (1 + (ratio - 1) / std::max(k_last, 1) > kMaxRelayFactor)  // the template's first relay would pass 2x a side
    return validate_plan(f, doubling_stages(f, h1, w1, hf, wf, ratio, total_steps), w, h);
  if (total_steps) steps = split_steps(*total_steps, steps);
  std::vector<StageSize> stages;
  for (int k = 0; k <= k_last; ++k) {
    const double frac = static_cast<double>(k) / k_last;
    const int hk = k == k_last ? hf : round_to(h1 + (hf - h1) * frac, m);
    const int wk = k == k_last ? wf : round_to(w1 + (wf - w1) * frac, m);
    if (!stages.empty() && stages.back().height == hk && stages.back().width == wk)
      stages.back().steps += steps[k];  // merge a stage that rounding made empty
    else
      stages.push_back({hk, wk, steps[k]});
  }
  return validate_plan(f, stages, w, h);
}

std::pair<int, int> parse_size(const std::string& text) {
  const std::string t = strip(text);
  const size_t x = t.find_first_of("xX");
  auto digits = [](const std::string& s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
  };
  const std::string a = x == std::string::npos ? "" : strip(t.substr(0, x));
  const std::string b = x == std::string::npos ? "" : strip(t.substr(x + 1));
  if (!digits(a) || !digits(b))
    throw PlanError("malformed size " + quoted(text) + ": expected WIDTHxHEIGHT, e.g. 1920x1080");
  auto side = [&](const std::string& s) {  // more than 9 digits is out of range anyway
    return s.size() > 9 ? kMaxSide + 1 : std::stoi(s);
  };
  const int w = side(a), h = side(b);
  for (int v : {w, h})
    if (v <= 0 || v > kMaxSide)
      throw PlanError("size " + quoted(text) + ": each side must be between 1 and " + std::to_string(kMaxSide) +
                      " pixels");
  return {w, h};
}

std::vector<StageSize> parse_stages(const std::string& text) {
  std::vector<StageSize> out;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string part = strip(text.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    const size_t colon = part.rfind(':');
    if (colon == std::string::npos)
      throw PlanError("malformed stage " + quoted(part) + " in --stages: expected WIDTHxHEIGHT:STEPS");
    const auto [w, h] = parse_size(part.substr(0, colon));
    const std::string steps = strip(part.substr(colon + 1));
    const bool neg = !steps.empty() && (steps[0] == '-' || steps[0] == '+');
    const std::string body = neg ? steps.substr(1) : steps;
    if (body.empty() || body.size() > 9 ||
        !std::all_of(body.begin(), body.end(), [](unsigned char c) { return std::isdigit(c); }))
      throw PlanError("malformed step count " + quoted(part.substr(colon + 1)) + " in stage " + quoted(part));
    out.push_back({h, w, std::stoi(steps)});
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace megafusion
