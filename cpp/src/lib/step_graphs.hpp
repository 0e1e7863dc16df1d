// Whole-step CUDA graphs for libmegafusion: the C++ twin of runtime/graphs.py. One graph per stage descriptor
// (latent size, dilation, CFG on/off, UNet dtype, ControlNets, IP-Adapter) serves every step of every stage with
// that descriptor.
//
// The captured step is docs/ALGORITHM.md §6 whole: UNet on the CFG batch, the guidance combine, x0 and the DDIM
// update. Its timestep and coefficients are gathered from device tables by a device step counter that the graph
// itself advances, so a stage is loaded (tables in, counter to 0) and then replayed `steps` times. The buffers
// live outside the graph, allocated once per descriptor; the graphs share one memory pool. The truncation x0 of
// a stage's last step stays in its buffer.
//
// On the CPU (or in a library built without CUDA) the same buffered step runs eagerly, counting neither
// captures nor replays: the step's arithmetic is checked there against the plain loop.
//
// The capture and replay themselves (run_steps) take any step on buffers of its own: the flow contexts' Euler
// step uses them too (flow_steps.cpp), with its own descriptor.
#ifndef MEGAFUSION_LIB_STEP_GRAPHS_HPP_
#define MEGAFUSION_LIB_STEP_GRAPHS_HPP_

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "inputs.hpp"
#include "megafusion/megafusion.h"  // mf_progress_fn

namespace megafusion::lib {

constexpr int64_t kMaxStageSteps = 1000;  // capacity of the coefficient tables (DDIM over 1000 training steps)

// What a captured step depends on: one graph per distinct descriptor (StepGraphs::run_stage names every field in
// the graph's descriptor text).
struct StepKey {
  int64_t latent_h = 0, latent_w = 0;
  int dilation = 1;
  bool cfg = false;
  at::ScalarType dtype = at::kFloat;  // the UNet's
  // Which ControlNets the step runs (their fingerprints; "" none). Their scales and images are not in the key:
  // they are buffers the step reads, refilled in place for each generation.
  std::string controls;
  // The IP-Adapter whose unet_ip engines the step runs (its fingerprint; "" the plain UNet). Its embeddings are a
  // buffer the step reads, as the ControlNets' images.
  std::string ip;
  bool operator<(const StepKey& o) const {
    return std::tie(latent_h, latent_w, dilation, cfg, dtype, controls, ip) <
           std::tie(o.latent_h, o.latent_w, o.dilation, o.cfg, o.dtype, o.controls, o.ip);
  }
};

// Static inputs and outputs of a step; a captured step reads and writes only these.
struct StepBuffers {
  at::Tensor z;          // (1, 4, h, w) float32 latent, updated in place by each step
  at::Tensor x0;         // (1, 4, h, w) float32 x0 of the last step (the truncation x0)
  at::Tensor step;       // (1,) int64 step counter, advanced by each step
  at::Tensor tables;     // (4, kMaxStageSteps) float32: a_t, b_t, a_s, b_s of each step
  at::Tensor timesteps;  // (kMaxStageSteps,) float32 UNet timesteps
  at::Tensor guidance;   // (1,) float32 guidance weight w
  at::Tensor hidden;     // (B, 77, D) encoder hidden states in the UNet's dtype
  at::Tensor pooled;     // (B, P) pooled embedding in the UNet's dtype (SDXL), else undefined
  at::Tensor time_ids;   // (B, 6) float32 SDXL time ids, else undefined
};

// One stage's inputs: per-step coefficients as float32 (runtime/schedule.py rounds them so), the conditioning.
struct StageInputs {
  at::Tensor z;                            // (1, 4, h, w) float32 first latent
  std::vector<int64_t> timesteps;
  std::vector<float> a_t, b_t, a_s, b_s;   // sqrt(abar'_t), sqrt(1-abar'_t), sqrt(abar'_s), sqrt(1-abar'_s)
  at::Tensor hidden, pooled, time_ids;     // pooled and time_ids undefined without SDXL
  float guidance = 1;
};

// The UNet on (sample (B, 4, h, w) float32, timestep (1,) float32, the buffers' conditioning) -> eps float32.
using UnetCall = std::function<at::Tensor(const at::Tensor& sample, const at::Tensor& timestep, const StepBuffers& b,
                                          int dilation)>;

// A generation's progress callback (mf_inputs_set_progress, held by `inputs`; none when NULL): `step()` after each
// denoise step that runs calls it with the steps done and `total`, on CUDA once the step has run on the device (the
// current stream is synchronized first, so the count is real time and a stop takes effect at once). A nonzero
// return throws Failure(MF_ERROR_CANCELLED). Without a callback `step()` does nothing (no synchronization).
class StepProgress {
 public:
  StepProgress(const Inputs* inputs, int total, const at::Device& device)
      : fn_(inputs ? inputs->progress : nullptr), user_(inputs ? inputs->progress_user : nullptr), total_(total),
        device_(device) {}
  void step();

 private:
  mf_progress_fn fn_;
  void* user_;
  int total_, done_ = 0;
  at::Device device_;
};

class StepGraphs {
 public:
  // `capture`: CUDA graphs (device must be CUDA); else the buffered step runs eagerly.
  StepGraphs(const at::Device& device, bool capture, int warmup_steps = 2);
  ~StepGraphs();

  // Runs `steps` steps from in.z; returns (z after the last update, x0 of the last step), both new tensors.
  std::pair<at::Tensor, at::Tensor> run_stage(const StepKey& key, const StageInputs& in, size_t steps,
                                              const UnetCall& unet, StepProgress& progress);

  // The generic core: `step` (reading and writing only buffers that outlive it) run `steps` times: eagerly
  // without capture; else replays of the graph captured for `key` (any text naming the descriptor) on its first
  // use, after which `reload` restores what the warm-up and capture moved. `progress.step()` after each (not
  // after the capture's warm-up steps).
  void run_steps(const std::string& key, size_t steps, const std::function<void()>& step,
                 const std::function<void()>& reload, StepProgress& progress);

  uint64_t captures() const { return captures_; }
  uint64_t replays() const { return replays_; }

 private:
  struct Graph;  // at::cuda::CUDAGraph where the library has CUDA
  at::Device device_;
  bool capture_;
  int warmup_steps_;
  uint64_t captures_ = 0, replays_ = 0;
  std::map<StepKey, StepBuffers> buffers_;
  std::map<std::string, std::unique_ptr<Graph>> graphs_;  // by descriptor text (UNet and flow keys differ)
  std::pair<unsigned long long, unsigned long long> pool_{0, 0};  // the graphs' shared memory pool (MempoolId_t), once captured

  StepBuffers& buffers_for(const StepKey& key, const StageInputs& in);
  std::unique_ptr<Graph> capture(const std::function<void()>& step);
};

// One denoise step on the buffers, in docs/ALGORITHM.md's notation; every operation is capturable.
void denoise_step(StepBuffers& b, bool cfg, int dilation, const UnetCall& unet);

// Loads a stage into the buffers: latent, tables, counter 0, guidance and conditioning.
void load_stage(StepBuffers& b, const StageInputs& in, size_t steps);

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_STEP_GRAPHS_HPP_
