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
#include "vector_checks.hpp"
#include "megafusion/bicubic.hpp"
#include "megafusion/family.hpp"
#include "megafusion/plan.hpp"
#include "megafusion/schedule.hpp"

using namespace megafusion;
using namespace megafusion::vectors;

namespace {

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
  const auto read = vectors::read_vectors(argc, argv, "test_vectors.json", "megafusion.runtime.test_vectors");
  if (!read) return 2;
  const mfjson::Value& vec = *read;
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
    }, c.has("stages") && c.has("total_steps"));
  }
  idx = 0;
  for (const auto& c : vec["validate"].arr) {
    const Family* f = find_family(c["family"].str);
    const auto stages = stages_of(c["stages"]);
    check_plan_case(c, "validate_plan " + std::to_string(idx++) + " (" + c["family"].str + " " + plan_text(stages) + ")",
                    [&] { return validate_plan(*f, stages, opt_int(c["width"]), opt_int(c["height"])); }, c.has("stages") && c.has("total_steps"));
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
  return vectors::summary();
}
