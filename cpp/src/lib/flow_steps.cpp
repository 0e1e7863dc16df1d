// The flow contexts' buffered Euler step and its CUDA graphs: runtime/flow_graphs.py's flow_step on the packages,
// run by StepGraphs (step_graphs.hpp) as the UNet's step is. The whole step (the transformer on the CFG batch, or
// FLUX's one pass with its guidance embedding; the ControlNets' packages and the controlled transformer where the
// generation has them; the guidance combine, x0 = z - sigma_t v, the Euler update and the latent's round trip
// through the model dtype) reads and writes only FlowStepBuffers: its sigmas and timestep are gathered from device
// tables by a device step counter the step advances, so one graph per descriptor (batch, latent size, CFG,
// conditioning shape, which ControlNets) serves every step of every stage. On the CPU it runs eagerly, uncaptured.
#include <algorithm>
#include <string>
#include <tuple>

#include "flow_context.hpp"

namespace megafusion::lib {

void FlowContext::euler_step(FlowStepBuffers& b, bool cfg) {
  const at::Tensor col = b.tables.index_select(1, b.step);  // (3, 1): this step's column
  const at::Tensor sigma_t = col[0], d_sigma = col[1], timestep = col[2];
  const int64_t batch = cfg ? 2 : 1;
  const at::Tensor& z = b.z;
  // The transformer's (B,) inputs, contiguous as the plain loop's at::full makes them.
  const at::Tensor t = timestep.expand({batch}).contiguous();
  const at::Tensor guidance = b.guidance.expand({batch}).contiguous();
  at::Tensor v = velocity(cfg ? at::cat({z, z}) : z, t, Conditioning{b.states, b.pooled}, guidance, b.first + b.step);
  if (cfg) {  // [negative, prompt]
    auto parts = v.chunk(2);
    v = parts[0] + (parts[1] - parts[0]) * b.guidance;
  }
  b.x0.copy_(z - v * sigma_t);
  b.z.copy_((z + v * d_sigma).to(flow_dtype(precision_)).to(at::kFloat));  // Euler, latent in the model's dtype
  b.step.add_(1);
}

std::pair<at::Tensor, at::Tensor> FlowContext::run_stage(const at::Tensor& z, const std::vector<float>& sigma_t,
                                                         const std::vector<float>& d_sigma,
                                                         const std::vector<float>& timestep, const Conditioning& c,
                                                         float w, bool cfg, int64_t first, StepProgress& progress) {
  const size_t steps = sigma_t.size();
  if (steps == 0 || static_cast<int64_t>(steps) > kMaxStageSteps)
    throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "a stage of " + std::to_string(steps) + " steps; the step graphs hold 1 to " +
                                                 std::to_string(kMaxStageSteps));
  if (!graphs_) graphs_ = std::make_unique<StepGraphs>(device_, device_.is_cuda());
  auto dims = [](const at::Tensor& x) {
    std::string s;
    for (int64_t d : x.sizes()) s += (s.empty() ? "" : "x") + std::to_string(d);
    return s;
  };
  const std::string key = "flow z" + dims(z) + (cfg ? " cfg" : "") + " states " + dims(c.states) + " pooled " +
                          dims(c.pooled) + " [" + (controls_ ? controls_->key : "") + "]";
  auto it = step_buffers_.find(key);
  if (it == step_buffers_.end()) {
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
    FlowStepBuffers nb{at::zeros(z.sizes(), f32), at::zeros(z.sizes(), f32), at::zeros({1}, f32.dtype(at::kLong)),
                       at::zeros({1}, f32.dtype(at::kLong)), at::zeros({3, kMaxStageSteps}, f32),
                       at::zeros({1}, f32), at::zeros(c.states.sizes(), f32), at::zeros(c.pooled.sizes(), f32)};
    it = step_buffers_.emplace(key, std::move(nb)).first;
  }
  FlowStepBuffers& b = it->second;
  const auto n = static_cast<int64_t>(steps);
  at::Tensor rows = at::empty({3, n}, at::kFloat);
  const std::vector<float>* cols[3] = {&sigma_t, &d_sigma, &timestep};
  for (int64_t r = 0; r < 3; ++r) std::copy(cols[r]->begin(), cols[r]->end(), rows.data_ptr<float>() + r * n);
  auto load = [&] {
    b.z.copy_(z);
    b.step.zero_();
    b.first.fill_(first);
    b.tables.narrow(1, 0, n).copy_(rows);
    b.guidance.fill_(w);
    b.states.copy_(c.states);
    b.pooled.copy_(c.pooled);
  };
  load();
  graphs_->run_steps(key, steps, [&] { euler_step(b, cfg); }, load, progress);
  return {b.z.clone(), b.x0.clone()};
}

}  // namespace megafusion::lib
