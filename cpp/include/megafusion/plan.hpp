// The stage plan (docs/ALGORITHM.md §2), the same function as core/plan.py: default plans for any output size
// and aspect ratio, validation with the same messages.
#ifndef MEGAFUSION_PLAN_HPP_
#define MEGAFUSION_PLAN_HPP_

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "megafusion/family.hpp"

namespace megafusion {

constexpr int kMaxSide = 16384;
constexpr double kMinStageAreaFraction = 0.75;
constexpr double kMaxRelayFactor = 2.0;  // largest side ratio of one default relay (core/plan.py MAX_RELAY_FACTOR)
constexpr int kMaxTotalSteps = 999;  // as core/plan.py: 1000 steps + offset 1 would need t = 1000

// A plan or size the model cannot run; what() names the bad value (same text as Python's PlanError).
class PlanError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct StagePlan {
  std::vector<StageSize> stages;
  int output_height = 0;
  int output_width = 0;

  int total_steps() const;
  // Re-scheduling factor of stage k (0-based): pixel count over stage 1's.
  double gamma(size_t k) const;
};

// "WxH:steps", as Python's Stage.__str__.
std::string stage_str(const StageSize& s);

// Checks `stages` against the family; output size defaults to the last stage's. Throws PlanError.
StagePlan validate_plan(const Family& f, const std::vector<StageSize>& stages,
                        std::optional<int> width = std::nullopt, std::optional<int> height = std::nullopt);

// The paper's plan carried to any output size (both or neither of width/height). Throws PlanError.
StagePlan default_plan(const Family& f, std::optional<int> width = std::nullopt,
                       std::optional<int> height = std::nullopt, std::optional<int> total_steps = std::nullopt);

// "1920x1080" -> {width, height}; "1024x1024:40,2048x2048:10" -> stages. Throw PlanError.
std::pair<int, int> parse_size(const std::string& text);
std::vector<StageSize> parse_stages(const std::string& text);

}  // namespace megafusion

#endif  // MEGAFUSION_PLAN_HPP_
