// Checks the C++ flow schedule and transformer-family table against the Python reference on shared test vectors
// (python -m megafusion.runtime.flow_test_vectors --output DIR): the table exactly, the global sigma list and each
// stage's shift and sigmas within 1e-12 relative (float64).
// Usage: megafusion_flow_core_test DIR/flow_test_vectors.json
#include <cmath>
#include <fstream>
#include <iostream>
#include <sstream>
#include <optional>
#include <string>
#include <vector>

#include "json.hpp"
#include "vector_checks.hpp"
#include "megafusion/flow_schedule.hpp"

using namespace megafusion;
using namespace megafusion::vectors;

namespace {

// A scheduler option, or the default Python's flow_schedule reads when the config leaves it out.
double num_or(const mfjson::Value& s, const std::string& key, double dflt) { return s.has(key) ? s[key].num : dflt; }

void check_families(const mfjson::Value& v) {
  check(v.size() == flow_families().size(), "number of transformer families");
  for (const auto& j : v.arr) {
    const FlowFamily* f = find_flow_family(j["name"].str);
    check(f != nullptr, "family " + j["name"].str + " missing in C++");
    if (f == nullptr) continue;
    const std::string n = f->base.name;
    check(f->kind == j["kind"].str && f->patch == j["patch"].as_int() &&
              f->latent_channels == j["latent_channels"].as_int() && f->max_side == j["max_side"].as_int() &&
              f->t5_max_length == j["t5_max_length"].as_int() && f->default_guidance == j["default_guidance"].num,
          n + ": kind, patch, channels, max side, T5 length or guidance");
    check(f->base.native_height == j["native_height"].as_int() && f->base.native_width == j["native_width"].as_int() &&
              f->base.pixel_multiple == j["pixel_multiple"].as_int() && f->base.vae_scale == j["vae_scale"].as_int(),
          n + ": sizes");
    const auto& ds = j["default_stages"];
    bool same = ds.size() == f->base.default_stages.size();
    for (size_t i = 0; same && i < ds.size(); ++i)
      same = f->base.default_stages[i].height == ds[i][0].as_int() &&
             f->base.default_stages[i].width == ds[i][1].as_int() && f->base.default_stages[i].steps == ds[i][2].as_int();
    check(same, n + ": default stages");
    std::vector<int> axes;
    for (const auto& a : j["rope_axes"].arr) axes.push_back(a.as_int());
    check(f->guidance_embeds == j["guidance_embeds"].b && f->rope_axes == axes, n + ": guidance embedding, rope axes");
    const auto& s = j["scheduler"];
    const FlowSchedulerConfig& c = f->scheduler;
    check(c.num_train_timesteps == s["num_train_timesteps"].as_int() && c.shift == num_or(s, "shift", 1.0) &&
              c.use_dynamic_shifting == (s.has("use_dynamic_shifting") && s["use_dynamic_shifting"].b) &&
              c.base_shift == num_or(s, "base_shift", 0.5) && c.max_shift == num_or(s, "max_shift", 1.15) &&
              c.base_image_seq_len == num_or(s, "base_image_seq_len", 256) &&
              c.max_image_seq_len == num_or(s, "max_image_seq_len", 4096) &&
              c.time_shift_type == (s.has("time_shift_type") ? s["time_shift_type"].str : "exponential"),
          n + ": scheduler");
  }
}

void check_base(const mfjson::Value& v) {
  for (const auto& c : v.arr) {
    const FlowFamily* f = find_flow_family(c["family"].str);
    const std::string what = "base sigmas " + c["family"].str + " n=" + std::to_string(c["n"].as_int());
    const auto got = flow_base_sigmas(c["n"].as_int(), *f);
    check(got.size() == c["sigmas"].size(), what + ": length");
    for (size_t i = 0; i < got.size() && i < c["sigmas"].size(); ++i)
      check(close_rel(got[i], c["sigmas"][i].num, 1e-12), what + " [" + std::to_string(i) + "]");
  }
}

void check_plans(const mfjson::Value& plans, const mfjson::Value& validate) {
  int idx = 0;
  for (const auto& c : plans.arr) {
    const FlowFamily* f = find_flow_family(c["family"].str);
    check_plan_case(c, "default_flow_plan " + std::to_string(idx++) + " (" + c["family"].str + ")", [&] {
      return default_flow_plan(*f, opt_int(c["width"]), opt_int(c["height"]), opt_int(c["total_steps"]));
    }, c.has("stages"));
  }
  idx = 0;
  for (const auto& c : validate.arr) {
    const FlowFamily* f = find_flow_family(c["family"].str);
    const auto stages = stages_of(c["stages"]);
    check_plan_case(c, "validate_flow_plan " + std::to_string(idx++) + " (" + c["family"].str + " " +
                           plan_text(stages) + ")",
                    [&] { return validate_flow_plan(*f, stages, opt_int(c["width"]), opt_int(c["height"])); }, c.has("stages"));
  }
}

void check_schedules(const mfjson::Value& v) {
  int idx = 0;
  for (const auto& c : v.arr) {
    const FlowFamily* f = find_flow_family(c["family"].str);
    StagePlan plan;
    for (const auto& s : c["stages"].arr) plan.stages.push_back({s[0].as_int(), s[1].as_int(), s[2].as_int()});
    const std::string what = "flow schedule " + std::to_string(idx++) + " (" + c["family"].str +
                             (c["reschedule"].b ? "" : ", no reschedule") + ")";
    const auto got = plan_flow_schedule(plan, *f, c["reschedule"].b);
    const auto& want = c["per_stage"];
    check(got.size() == want.size(), what + ": number of stages");
    for (size_t k = 0; k < got.size() && k < want.size(); ++k) {
      const auto& w = want[k];
      const std::string at = what + " stage " + std::to_string(k + 1);
      check(close_rel(got[k].shift, w["shift"].num, 1e-12), at + ": shift");
      check(got[k].sigma_t.size() == w["sigma_t"].size() && got[k].sigma_s.size() == w["sigma_s"].size(),
            at + ": steps");
      for (size_t i = 0; i < got[k].sigma_t.size() && i < w["sigma_t"].size(); ++i) {
        check(close_rel(got[k].sigma_t[i], w["sigma_t"][i].num, 1e-12), at + ": sigma_t " + std::to_string(i));
        check(close_rel(got[k].sigma_s[i], w["sigma_s"][i].num, 1e-12), at + ": sigma_s " + std::to_string(i));
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto read = vectors::read_vectors(argc, argv, "flow_test_vectors.json", "megafusion.runtime.flow_test_vectors");
  if (!read) return 2;
  const mfjson::Value& vec = *read;
  check_families(vec["families"]);
  check_base(vec["base_sigmas"]);
  check_schedules(vec["schedules"]);
  check_plans(vec["plans"], vec["validate"]);
  return vectors::summary();
}
