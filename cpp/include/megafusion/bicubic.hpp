// The pixel relay's clamp(-1, 1) -> bicubic resize -> clamp(-1, 1) on the CPU, fp32, the same operations
// as runtime/kernels/relay_bicubic.cu (torch's bicubic, align_corners=False, a = -0.75).
#ifndef MEGAFUSION_BICUBIC_HPP_
#define MEGAFUSION_BICUBIC_HPP_

namespace megafusion {

// input (planes, in_h, in_w) contiguous, output (planes, out_h, out_w) contiguous; planes = n * c.
void resize_clamped(const float* input, float* output, long long planes, int in_h, int in_w, int out_h, int out_w);

}  // namespace megafusion

#endif  // MEGAFUSION_BICUBIC_HPP_
