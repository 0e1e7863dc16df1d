/* Host API of the fused relay kernel (runtime/kernels/relay_bicubic.cu), for C++ callers.
 * Built into libmegafusion_relay by the repository's CMakeLists.txt. */
#ifndef MEGAFUSION_RELAY_BICUBIC_H_
#define MEGAFUSION_RELAY_BICUBIC_H_

#include <cuda_runtime_api.h>

/* dtype codes of input_dtype / output_dtype */
#define MF_RELAY_F32 0
#define MF_RELAY_F16 1
#define MF_RELAY_BF16 2

#ifdef __cplusplus
extern "C" {
#endif

/* clamp(-1, 1) -> bicubic resize (torch's align_corners=False, a = -0.75) -> clamp(-1, 1) -> cast, in one pass.
 * input: (n, c, in_h, in_w) NCHW contiguous; output: (n, c, out_h, out_w) NCHW contiguous; both device
 * pointers. Enqueued on `stream`; returns the launch's cudaError_t as int (cudaSuccess == 0). */
int mf_relay_bicubic(const void* input, int input_dtype, void* output, int output_dtype, int n, int c, int in_h,
                     int in_w, int out_h, int out_w, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* MEGAFUSION_RELAY_BICUBIC_H_ */
