// Fused pixel relay (docs/ALGORITHM.md §8): clamp(-1, 1) -> bicubic resize -> clamp(-1, 1) -> cast, in one pass.
//
// The resize is exactly PyTorch's upsample_bicubic2d (align_corners=False, antialias=False), mirrored
// operation for operation so fp32 results agree with torch to rounding:
//   scale = (float)in / (float)out             (torch's area_pixel_compute_scale, accumulate type float)
//   src   = scale * (dst + 0.5f) - 0.5f        (half-pixel centres; negative allowed for cubic)
//   i = floorf(src), t = src - i; taps i-1 .. i+2 with indices clamped to the border
//   Keys cubic convolution, a = -0.75; rows interpolated along x first, then the 4 row results along y.
// Inputs: NCHW contiguous fp32 / fp16 / bf16. Output: NCHW contiguous, any of the three. Accumulation in float.
//
// Compiled two ways from this one file:
//   * NVRTC (runtime/fused_relay.py): only the extern "C" __global__ entry points below, looked up by name.
//   * nvcc (CMakeLists.txt): additionally the host launcher mf_relay_bicubic() for C++ callers; NVRTC
//     defines __CUDACC_RTC__ and skips it.
// No CUDA headers are needed by the device code (half/bf16 conversions are inline PTX), so NVRTC needs
// no include path.

typedef unsigned short mf_u16;

struct mf_half { mf_u16 bits; };  // storage-only 16-bit types: layout-compatible with torch's
struct mf_bf16 { mf_u16 bits; };

__device__ __forceinline__ float mf_load(const float* p) { return __ldg(p); }
__device__ __forceinline__ float mf_load(const mf_half* p) {
  const mf_u16 b = __ldg(reinterpret_cast<const mf_u16*>(p));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
}
__device__ __forceinline__ float mf_load(const mf_bf16* p) {
  const mf_u16 b = __ldg(reinterpret_cast<const mf_u16*>(p));
  return __uint_as_float(static_cast<unsigned int>(b) << 16);  // bf16 is the top half of fp32: exact
}

__device__ __forceinline__ void mf_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void mf_store(mf_half* p, float v) {
  mf_u16 b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));  // round to nearest even, like torch's .to(half)
  p->bits = b;
}
__device__ __forceinline__ void mf_store(mf_bf16* p, float v) {
#if __CUDA_ARCH__ >= 800
  mf_u16 b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(v));
  p->bits = b;
#else
  // Pre-Ampere has no cvt to bf16: round to nearest even by hand, keeping NaN a (quiet) NaN.
  const unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) { p->bits = static_cast<mf_u16>((u >> 16) | 0x0040u); return; }
  p->bits = static_cast<mf_u16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

// Comparisons, not fminf/fmaxf: NaN must propagate as it does through torch.clamp.
__device__ __forceinline__ float mf_clamp1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Keys cubic convolution, a = -0.75, written as torch writes it (same rounding).
__device__ __forceinline__ float mf_cc1(float x) {  // |x| <= 1
  const float a = -0.75f;
  return ((a + 2.0f) * x - (a + 3.0f)) * x * x + 1.0f;
}
__device__ __forceinline__ float mf_cc2(float x) {  // 1 < |x| < 2
  const float a = -0.75f;
  return ((a * x - 5.0f * a) * x + 8.0f * a) * x - 4.0f * a;
}
__device__ __forceinline__ void mf_weights(float t, float w[4]) {
  w[0] = mf_cc2(t + 1.0f);
  w[1] = mf_cc1(t);
  const float u = 1.0f - t;  // torch forms (1 - t) + 1, not 2 - t: keep its rounding
  w[2] = mf_cc1(u);
  w[3] = mf_cc2(u + 1.0f);
}
__device__ __forceinline__ float mf_interp1d(float x0, float x1, float x2, float x3, const float w[4]) {
  return x0 * w[0] + x1 * w[1] + x2 * w[2] + x3 * w[3];
}

// One thread per output pixel of one (n, c) plane: blockIdx.z = plane, blockIdx.y = output row,
// x along threads so each warp writes a contiguous run of the output row (coalesced stores); the
// 4 input rows a block reads stay in L1/L2 for its neighbours.
template <typename Tin, typename Tout>
__device__ __forceinline__ void mf_relay_bicubic_body(const Tin* __restrict__ in, Tout* __restrict__ out,
                                                      int in_h, int in_w, int out_h, int out_w) {
  const int ox = blockIdx.x * blockDim.x + threadIdx.x;
  const int oy = blockIdx.y;
  if (ox >= out_w || oy >= out_h) return;
  const long long plane = blockIdx.z;
  const Tin* src = in + plane * in_h * in_w;
  Tout* dst = out + plane * out_h * out_w + static_cast<long long>(oy) * out_w + ox;

  if (in_h == out_h && in_w == out_w) {  // torch copies in this case; so do we (keeps NaNs local)
    mf_store(dst, mf_clamp1(mf_load(src + static_cast<long long>(oy) * in_w + ox)));
    return;
  }

  const float scale_h = static_cast<float>(in_h) / static_cast<float>(out_h);
  const float scale_w = static_cast<float>(in_w) / static_cast<float>(out_w);
  const float real_x = scale_w * (static_cast<float>(ox) + 0.5f) - 0.5f;
  const float real_y = scale_h * (static_cast<float>(oy) + 0.5f) - 0.5f;
  const int ix = static_cast<int>(floorf(real_x));
  const int iy = static_cast<int>(floorf(real_y));
  float wx[4], wy[4];
  mf_weights(real_x - static_cast<float>(ix), wx);
  mf_weights(real_y - static_cast<float>(iy), wy);

  int cols[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) cols[k] = min(max(ix - 1 + k, 0), in_w - 1);

  float rows[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const Tin* row = src + static_cast<long long>(min(max(iy - 1 + k, 0), in_h - 1)) * in_w;
    rows[k] = mf_interp1d(mf_clamp1(mf_load(row + cols[0])), mf_clamp1(mf_load(row + cols[1])),
                          mf_clamp1(mf_load(row + cols[2])), mf_clamp1(mf_load(row + cols[3])), wx);
  }
  mf_store(dst, mf_clamp1(mf_interp1d(rows[0], rows[1], rows[2], rows[3], wy)));
}

// Unmangled entry points, one per (input, output) dtype pair: mf_relay_bicubic_<in>_<out>.
#define MF_RELAY_ENTRY(TIN, NIN, TOUT, NOUT)                                                          \
  extern "C" __global__ void __launch_bounds__(256) mf_relay_bicubic_##NIN##_##NOUT(                  \
      const TIN* __restrict__ in, TOUT* __restrict__ out, int in_h, int in_w, int out_h, int out_w) { \
    mf_relay_bicubic_body<TIN, TOUT>(in, out, in_h, in_w, out_h, out_w);                             \
  }

MF_RELAY_ENTRY(float, f32, float, f32)
MF_RELAY_ENTRY(float, f32, mf_half, f16)
MF_RELAY_ENTRY(float, f32, mf_bf16, bf16)
MF_RELAY_ENTRY(mf_half, f16, float, f32)
MF_RELAY_ENTRY(mf_half, f16, mf_half, f16)
MF_RELAY_ENTRY(mf_half, f16, mf_bf16, bf16)
MF_RELAY_ENTRY(mf_bf16, bf16, float, f32)
MF_RELAY_ENTRY(mf_bf16, bf16, mf_half, f16)
MF_RELAY_ENTRY(mf_bf16, bf16, mf_bf16, bf16)

#undef MF_RELAY_ENTRY

#if !defined(__CUDACC_RTC__)
// Host launcher for C++ callers (built by CMakeLists.txt; declared in relay_bicubic.h).
#include <cuda_runtime.h>

#include "relay_bicubic.h"

namespace {

constexpr int kBlock = 128;  // threads along the output row; must match runtime/fused_relay.py

template <typename Tin, typename Tout>
cudaError_t mf_launch(void (*kernel)(const Tin*, Tout*, int, int, int, int), const void* input, void* output,
                      int planes, int in_h, int in_w, int out_h, int out_w, cudaStream_t stream) {
  const dim3 grid((out_w + kBlock - 1) / kBlock, out_h, planes);
  kernel<<<grid, kBlock, 0, stream>>>(static_cast<const Tin*>(input), static_cast<Tout*>(output), in_h, in_w,
                                      out_h, out_w);
  return cudaGetLastError();
}

}  // namespace

extern "C" int mf_relay_bicubic(const void* input, int input_dtype, void* output, int output_dtype, int n, int c,
                                int in_h, int in_w, int out_h, int out_w, cudaStream_t stream) {
  if (n < 0 || c < 0 || in_h <= 0 || in_w <= 0 || out_h <= 0 || out_w <= 0) return cudaErrorInvalidValue;
  const long long planes = static_cast<long long>(n) * c;
  if (planes == 0) return cudaSuccess;
  if (planes > 65535 || out_h > 65535) return cudaErrorInvalidValue;  // grid.z / grid.y limits
  const int p = static_cast<int>(planes);
#define MF_CASE(IN_CODE, OUT_CODE, NIN, NOUT)                                                         \
  if (input_dtype == (IN_CODE) && output_dtype == (OUT_CODE))                                         \
    return mf_launch(mf_relay_bicubic_##NIN##_##NOUT, input, output, p, in_h, in_w, out_h, out_w, stream);
  MF_CASE(MF_RELAY_F32, MF_RELAY_F32, f32, f32)
  MF_CASE(MF_RELAY_F32, MF_RELAY_F16, f32, f16)
  MF_CASE(MF_RELAY_F32, MF_RELAY_BF16, f32, bf16)
  MF_CASE(MF_RELAY_F16, MF_RELAY_F32, f16, f32)
  MF_CASE(MF_RELAY_F16, MF_RELAY_F16, f16, f16)
  MF_CASE(MF_RELAY_F16, MF_RELAY_BF16, f16, bf16)
  MF_CASE(MF_RELAY_BF16, MF_RELAY_F32, bf16, f32)
  MF_CASE(MF_RELAY_BF16, MF_RELAY_F16, bf16, f16)
  MF_CASE(MF_RELAY_BF16, MF_RELAY_BF16, bf16, bf16)
#undef MF_CASE
  return cudaErrorInvalidValue;  // unknown dtype code
}
#endif  // !__CUDACC_RTC__
