// Checks the C++ core against the Python reference on shared test vectors
// (python -m megafusion.runtime.test_vectors --output DIR):
//   families and stage plans (including refusals and their messages) exactly,
//   per-stage schedules within 1e-12 relative (float64), the clamp/bicubic/clamp within 1e-5 (fp32).
// Usage: megafusion_core_test DIR/test_vectors.json
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "json.hpp"
#include "megafusion/bicubic.hpp"
#include "megafusion/family.hpp"
#include "megafusion/plan.hpp"
#include "megafusion/schedule.hpp"

using namespace megafusion;

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok && ++g_failures <= 30) std::cerr << "FAIL: " << what << "\n";
}

std::optional<int> opt_int(const mfjson::Value& v) {
  if (v.is_null()) return std::nullopt;
  return v.as_int();
}

std::vector<StageSize> stages_of(const mfjson::Value& v) {
  std::vector<StageSize> out;
  for (const auto& s : v.arr) out.push_back({s[0].as_int(), s[1].as_int(), s[2].as_int()});
  return out;
}

std::string plan_text(const std::vector<StageSize>& s) {
  std::string out;
  for (const auto& x : s) out += (out.empty() ? "" : ",") + stage_str(x);
  return out;
}

// Runs `make`; compares the plan (or the refusal's message) with the case's expectation.
template <typename F>
void check_plan_case(const mfjson::Value& c, const std::string& what, F make) {
  std::string got_error;
  StagePlan plan;
  try {
    plan = make();
  } catch (const PlanError& e) {
    got_error = e.what();
  }
  if (c.has("error")) {
    check(got_error == c["error"].str, what + ": expected error \"" + c["error"].str + "\", got " +
                                           (got_error.empty() ? "plan " + plan_text(plan.stages) : "\"" + got_error + "\""));
    return;
  }
  if (!got_error.empty()) {
    check(false, what + ": unexpected error \"" + got_error + "\"");
    return;
  }
  if (c.has("stages") && c.has("total_steps")) {  // default_plan cases also record the stages
    const auto want = stages_of(c["stages"]);
    check(plan_text(plan.stages) == plan_text(want), what + ": stages " + plan_text(plan.stages) + " != " + plan_text(want));
  }
  check(plan.output_height == c["output"][0].as_int() && plan.output_width == c["output"][1].as_int(),
        what + ": output size differs");
}

void check_families(const mfjson::Value& v) {
  check(v.size() == families().size(), "number of families");
  for (const auto& fj : v.arr) {
    const Family* f = find_family(fj["name"].str);
    check(f != nullptr, "family " + fj["name"].str + " missing in C++");
    if (!f) continue;
    const std::string n = f->name;
    check(f->native_height == fj["native_height"].as_int() && f->native_width == fj["native_width"].as_int(),
          n + ": native size");
    check(f->pixel_multiple == fj["pixel_multiple"].as_int(), n + ": pixel multiple");
    check(f->vae_scale == fj["vae_scale"].as_int(), n + ": vae scale");
    check(plan_text(f->default_stages) == plan_text(stages_of(fj["default_stages"])), n + ": default stages");
    const auto& s = fj["scheduler"];
    const SchedulerConfig& c = f->scheduler;
    check(c.num_train_timesteps == s["num_train_timesteps"].as_int() && c.beta_start == s["beta_start"].num &&
              c.beta_end == s["beta_end"].num && c.beta_schedule == s["beta_schedule"].str &&
              c.timestep_spacing == s["timestep_spacing"].str && c.steps_offset == s["steps_offset"].as_int() &&
              c.set_alpha_to_one == s["set_alpha_to_one"].b,
          n + ": scheduler config");
  }
}

bool close_rel(double got, double want, double rel) {
  return std::fabs(got - want) <= rel * std::fabs(want);
}

void check_schedules(const mfjson::Value& v) {
  int idx = 0;
  for (const auto& c : v.arr) {
    const std::string what = "schedule " + std::to_string(idx++) + " (" + c["family"].str + " " +
                             plan_text(stages_of(c["stages"])) + (c["reschedule"].b ? "" : ", no reschedule") + ")";
    const Family* f = find_family(c["family"].str);
    StagePlan plan = validate_plan(*f, stages_of(c["stages"]));
    auto got = plan_schedule(plan, f->scheduler, c["reschedule"].b);
    const auto& want = c["per_stage"];
    check(got.size() == want.size(), what + ": number of stages");
    for (size_t k = 0; k < got.size() && k < want.size(); ++k) {
      const auto& w = want[k];
      check(close_rel(got[k].gamma, w["gamma"].num, 1e-12), what + ": gamma of stage " + std::to_string(k + 1));
      check(got[k].timesteps.size() == w["timesteps"].size(), what + ": steps of stage " + std::to_string(k + 1));
      for (size_t i = 0; i < got[k].timesteps.size() && i < w["timesteps"].size(); ++i) {
        const std::string at = what + " stage " + std::to_string(k + 1) + " step " + std::to_string(i);
        check(got[k].timesteps[i] == static_cast<int64_t>(w["timesteps"][i].num), at + ": timestep");
        check(close_rel(got[k].abar_t[i], w["abar_t"][i].num, 1e-12), at + ": abar'_t");
        check(close_rel(got[k].abar_s[i], w["abar_s"][i].num, 1e-12), at + ": abar'_s");
      }
    }
  }
}

void check_bicubic(const mfjson::Value& v) {
  int idx = 0;
  for (const auto& c : v.arr) {
    const int n = c["shape"][0].as_int(), ch = c["shape"][1].as_int();
    const int ih = c["shape"][2].as_int(), iw = c["shape"][3].as_int();
    const int oh = c["out"][0].as_int(), ow = c["out"][1].as_int();
    std::vector<float> in, out(static_cast<size_t>(n) * ch * oh * ow);
    for (const auto& x : c["input"].arr) in.push_back(static_cast<float>(x.num));
    resize_clamped(in.data(), out.data(), static_cast<long long>(n) * ch, ih, iw, oh, ow);
    double worst = 0;
    for (size_t i = 0; i < out.size(); ++i)
      worst = std::max(worst, std::fabs(out[i] - c["output"][i].num) / std::max(1.0, std::fabs(c["output"][i].num)));
    std::ostringstream what;
    what << "bicubic " << idx++ << " (" << ih << "x" << iw << " -> " << oh << "x" << ow << "): max error " << worst;
    check(c["output"].size() == out.size() && worst <= 1e-5, what.str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " test_vectors.json  (write it with: "
              << "python -m megafusion.runtime.test_vectors --output DIR)\n";
    return 2;
  }
  std::ifstream file(argv[1]);
  if (!file) {
    std::cerr << "cannot read " << argv[1] << "; write it with: python -m megafusion.runtime.test_vectors --output DIR\n";
    return 2;
  }
  std::stringstream buf;
  buf << file.rdbuf();
  const mfjson::Value vec = mfjson::parse(buf.str());
  if (vec["format"].as_int() != 1) {
    std::cerr << "unknown test-vector format\n";
    return 2;
  }
  check_families(vec["families"]);
  int idx = 0;
  for (const auto& c : vec["plans"].arr) {
    const Family* f = find_family(c["family"].str);
    std::ostringstream what;
    what << "default_plan " << idx++ << " (" << c["family"].str << ", size " << (c["width"].is_null() ? -1 : c["width"].as_int())
         << "x" << (c["height"].is_null() ? -1 : c["height"].as_int()) << ", steps "
         << (c["total_steps"].is_null() ? -1 : c["total_steps"].as_int()) << ")";
    check_plan_case(c, what.str(), [&] {
      return default_plan(*f, opt_int(c["width"]), opt_int(c["height"]), opt_int(c["total_steps"]));
    });
  }
  idx = 0;
  for (const auto& c : vec["validate"].arr) {
    const Family* f = find_family(c["family"].str);
    const auto stages = stages_of(c["stages"]);
    check_plan_case(c, "validate_plan " + std::to_string(idx++) + " (" + c["family"].str + " " + plan_text(stages) + ")",
                    [&] { return validate_plan(*f, stages, opt_int(c["width"]), opt_int(c["height"])); });
  }
  if (vec.has("parse")) {
    idx = 0;
    for (const auto& c : vec["parse"].arr) {
      const std::string what = "parse_stages " + std::to_string(idx++) + " ('" + c["text"].str + "')";
      std::string got;
      try {
        got = plan_text(parse_stages(c["text"].str));
      } catch (const PlanError& e) {
        got = std::string("error: ") + e.what();
      }
      const std::string want = c.has("error") ? "error: " + c["error"].str : plan_text(stages_of(c["stages"]));
      check(got == want, what + ": got \"" + got + "\", expected \"" + want + "\"");
    }
  }
  check_schedules(vec["schedules"]);
  check_bicubic(vec["bicubic"]);
  std::cout << g_checks << " checks, " << g_failures << " failed\n";
  return g_failures == 0 ? 0 : 1;
}
