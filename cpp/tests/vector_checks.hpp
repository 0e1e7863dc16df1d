// What the two test-vector programs (test_vectors.cpp: the C++ core; test_flow_vectors.cpp: the flow schedule)
// share: counted checks, the vector file's reading, and the stage-plan case check (a plan, or a refusal's message).
#pragma once

#include <cmath>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "json.hpp"
#include "megafusion/plan.hpp"

namespace megafusion::vectors {

inline int g_failures = 0;
inline int g_checks = 0;

// Counts every check; prints the first 30 failures.
inline void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok && ++g_failures <= 30) std::cerr << "FAIL: " << what << "\n";
}

inline bool close_rel(double got, double want, double rel) { return std::fabs(got - want) <= rel * std::fabs(want); }

inline std::optional<int> opt_int(const mfjson::Value& v) {
  if (v.is_null()) return std::nullopt;
  return v.as_int();
}

inline std::vector<StageSize> stages_of(const mfjson::Value& v) {
  std::vector<StageSize> out;
  for (const auto& s : v.arr) out.push_back({s[0].as_int(), s[1].as_int(), s[2].as_int()});
  return out;
}

inline std::string plan_text(const std::vector<StageSize>& s) {
  std::string out;
  for (const auto& x : s) out += (out.empty() ? "" : ",") + stage_str(x);
  return out;
}

// Runs `make`; compares the plan (or the refusal's message) with the case's expectation. `stages_expected`: the
// case's "stages" are the plan's expected stages (not only its input).
template <typename F>
void check_plan_case(const mfjson::Value& c, const std::string& what, F make, bool stages_expected) {
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
  if (stages_expected) {
    const auto want = stages_of(c["stages"]);
    check(plan_text(plan.stages) == plan_text(want), what + ": stages " + plan_text(plan.stages) + " != " + plan_text(want));
  }
  check(plan.output_height == c["output"][0].as_int() && plan.output_width == c["output"][1].as_int(),
        what + ": output size differs");
}

// The vector file named on the command line (format 1), or nullopt after one line saying what is wrong.
inline std::optional<mfjson::Value> read_vectors(int argc, char** argv, const std::string& file_name,
                                                 const std::string& writer) {
  const std::string how = "write it with: python -m " + writer + " --output DIR";
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " " << file_name << "  (" << how << ")\n";
    return std::nullopt;
  }
  std::ifstream file(argv[1]);
  if (!file) {
    std::cerr << "cannot read " << argv[1] << "; " << how << "\n";
    return std::nullopt;
  }
  std::stringstream buf;
  buf << file.rdbuf();
  mfjson::Value vec = mfjson::parse(buf.str());
  if (vec["format"].as_int() != 1) {
    std::cerr << "unknown test-vector format\n";
    return std::nullopt;
  }
  return vec;
}

// The programs' last line and exit status.
inline int summary() {
  std::cout << g_checks << " checks, " << g_failures << " failed\n";
  return g_failures == 0 ? 0 : 1;
}

}  // namespace megafusion::vectors
