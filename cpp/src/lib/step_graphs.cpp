#include "step_graphs.hpp"

#include <string>

#include "manifest.hpp"  // Failure

#ifdef MEGAFUSION_WITH_CUDA
// Not ATen/cuda/CUDAEvent.h: it pulls in cuBLAS and cuSPARSE headers, which a CUDA toolkit may lack.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace megafusion::lib {

#ifdef MEGAFUSION_WITH_CUDA
struct StepGraphs::Graph {
  at::cuda::CUDAGraph graph;
};

namespace {
// Work queued on `waiter` from now on waits for what is queued on `first` so far (torch.cuda's wait_stream).
void wait_stream(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& first) {
  cudaEvent_t e = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  const cudaError_t recorded = cudaEventRecord(e, first.stream());
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(waiter.stream(), e, 0) : recorded;
  cudaEventDestroy(e);  // released once the wait is satisfied
  C10_CUDA_CHECK(waited);
}
}  // namespace
#else
struct StepGraphs::Graph {};
#endif

void denoise_step(StepBuffers& b, bool cfg, int dilation, const UnetCall& unet) {
  const at::Tensor coef = b.tables.index_select(1, b.step);  // (4, 1): this step's column
  const at::Tensor a_t = coef[0], b_t = coef[1], a_s = coef[2], b_s = coef[3];
  const at::Tensor t = b.timesteps.index_select(0, b.step);  // (1,)
  const at::Tensor& z = b.z;
  at::Tensor eps = unet(cfg ? at::cat({z, z}) : z, t, b, dilation);
  if (cfg) {  // [uncond, cond]
    auto parts = eps.chunk(2);
    eps = parts[0] + (parts[1] - parts[0]) * b.guidance;
  }
  at::Tensor x0 = (z - eps * b_t) / a_t;
  b.x0.copy_(x0);
  b.z.copy_(x0 * a_s + eps * b_s);
  b.step.add_(1);
}

void load_stage(StepBuffers& b, const StageInputs& in, size_t steps) {
  const auto n = static_cast<int64_t>(steps);
  at::Tensor rows = at::empty({4, n}, at::kFloat);
  at::Tensor ts = at::empty({n}, at::kFloat);
  const std::vector<float>* cols[4] = {&in.a_t, &in.b_t, &in.a_s, &in.b_s};
  float* r = rows.data_ptr<float>();
  for (int k = 0; k < 4; ++k)
    for (int64_t i = 0; i < n; ++i) r[k * n + i] = cols[k]->at(i);
  for (int64_t i = 0; i < n; ++i) ts.data_ptr<float>()[i] = static_cast<float>(in.timesteps.at(i));
  b.z.copy_(in.z);
  b.step.zero_();
  b.tables.narrow(1, 0, n).copy_(rows);
  b.timesteps.narrow(0, 0, n).copy_(ts);
  b.guidance.fill_(in.guidance);
  b.hidden.copy_(in.hidden);
  if (b.pooled.defined()) {
    b.pooled.copy_(in.pooled);
    b.time_ids.copy_(in.time_ids);
  }
}

StepGraphs::StepGraphs(const at::Device& device, bool capture, int warmup_steps)
    : device_(device), capture_(capture), warmup_steps_(warmup_steps) {
#ifndef MEGAFUSION_WITH_CUDA
  capture_ = false;
#endif
  if (!device_.is_cuda()) capture_ = false;
}

StepGraphs::~StepGraphs() = default;

StepBuffers& StepGraphs::buffers_for(const StepKey& key, const StageInputs& in) {
  auto it = buffers_.find(key);
  if (it != buffers_.end()) return it->second;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
  StepBuffers b;
  b.z = at::zeros({1, 4, key.latent_h, key.latent_w}, f32);
  b.x0 = at::zeros({1, 4, key.latent_h, key.latent_w}, f32);
  b.step = at::zeros({1}, f32.dtype(at::kLong));
  b.tables = at::zeros({4, kMaxStageSteps}, f32);
  b.timesteps = at::ones({kMaxStageSteps}, f32);
  b.guidance = at::zeros({1}, f32);
  b.hidden = at::zeros(in.hidden.sizes(), f32.dtype(key.dtype));
  if (in.pooled.defined()) {
    b.pooled = at::zeros(in.pooled.sizes(), f32.dtype(key.dtype));
    b.time_ids = at::zeros(in.time_ids.sizes(), f32);
  }
  return buffers_.emplace(key, std::move(b)).first->second;
}

std::unique_ptr<StepGraphs::Graph> StepGraphs::capture(const std::function<void()>& step) {
#ifdef MEGAFUSION_WITH_CUDA
  const c10::DeviceIndex index = device_.has_index() ? device_.index() : c10::cuda::current_device();
  c10::cuda::CUDAGuard device_guard(index);
  // Warm-up on a side stream (lazy initialisation, AOTInductor's first-run work), as torch.cuda.graphs advises.
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(index);
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, index);
  wait_stream(side, current);
  {
    c10::cuda::CUDAStreamGuard on_side(side);
    for (int i = 0; i < warmup_steps_; ++i) step();
  }
  wait_stream(current, side);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  auto g = std::make_unique<Graph>();
  {
    c10::cuda::CUDAStreamGuard on_side(side);  // capture needs a stream other than the legacy default
    using Pool = decltype(g->graph.pool());  // MempoolId_t, whichever namespace this torch declares it in
    g->graph.capture_begin(Pool{pool_.first, pool_.second});
    try {
      step();
    } catch (const std::exception& e) {
      try {
        g->graph.capture_end();
      } catch (...) {
      }
      throw Failure(MF_ERROR_RUNTIME, std::string("capturing the denoise step in a CUDA graph failed (") + e.what() +
                                          "); run with CUDA graphs off (mf_set_cuda_graphs(ctx, 0), --no-graphs)");
    }
    g->graph.capture_end();
  }
  const auto pool = g->graph.pool();
  pool_ = {pool.first, pool.second};  // later graphs share the first one's pool
  ++captures_;
  return g;
#else
  (void)step;
  throw Failure(MF_ERROR_RUNTIME, "this libmegafusion was built without CUDA: it captures no CUDA graphs");
#endif
}

void StepProgress::step() {
  if (!fn_) return;
  ++done_;
#ifdef MEGAFUSION_WITH_CUDA
  if (device_.is_cuda()) {
    const c10::DeviceIndex index = device_.has_index() ? device_.index() : c10::cuda::current_device();
    c10::cuda::getCurrentCUDAStream(index).synchronize();
  }
#endif
  if (fn_(user_, done_, total_) != 0)
    throw Failure(MF_ERROR_CANCELLED, "cancelled by the progress callback after step " + std::to_string(done_) +
                                          " of " + std::to_string(total_));
}

void StepGraphs::run_steps(const std::string& key, size_t steps, const std::function<void()>& step,
                           const std::function<void()>& reload, StepProgress& progress) {
  if (!capture_) {
    for (size_t i = 0; i < steps; ++i) {
      step();
      progress.step();
    }
    return;
  }
#ifdef MEGAFUSION_WITH_CUDA
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    it = graphs_.emplace(key, capture(step)).first;
    reload();  // the warm-up and capture moved the latent and the counter
  }
  for (size_t i = 0; i < steps; ++i) {
    it->second->graph.replay();
    ++replays_;
    progress.step();
  }
#else
  (void)key, (void)reload;
#endif
}

std::pair<at::Tensor, at::Tensor> StepGraphs::run_stage(const StepKey& key, const StageInputs& in, size_t steps,
                                                        const UnetCall& unet, StepProgress& progress) {
  if (steps == 0 || static_cast<int64_t>(steps) > kMaxStageSteps)
    throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "a stage of " + std::to_string(steps) + " steps; the step graphs hold 1 to " +
                                                 std::to_string(kMaxStageSteps));
  StepBuffers& b = buffers_for(key, in);
  load_stage(b, in, steps);
  // Every StepKey field: the adapter's too, so an IP-Adapter step never replays a plain UNet's graph.
  const std::string text = "unet " + std::to_string(key.latent_h) + "x" + std::to_string(key.latent_w) + " d" +
                           std::to_string(key.dilation) + (key.cfg ? " cfg " : " ") +
                           c10::toString(key.dtype) + " [" + key.controls + "] ip [" + key.ip + "]";
  run_steps(text, steps, [&] { denoise_step(b, key.cfg, key.dilation, unet); }, [&] { load_stage(b, in, steps); },
            progress);
  return {b.z.clone(), b.x0.clone()};
}

}  // namespace megafusion::lib
