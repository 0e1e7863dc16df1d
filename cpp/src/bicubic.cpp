// CPU twin of runtime/kernels/relay_bicubic.cu: same float operations in the same order, so it agrees
// with torch's bicubic (align_corners=False, a = -0.75) to rounding.
#include "megafusion/bicubic.hpp"

#include <algorithm>
#include <cmath>

namespace megafusion {

namespace {

// Comparisons, not std::min/max: NaN propagates as through torch.clamp.
inline float clamp1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

inline float cc1(float x) {  // |x| <= 1
  const float a = -0.75f;
  return ((a + 2.0f) * x - (a + 3.0f)) * x * x + 1.0f;
}
inline float cc2(float x) {  // 1 < |x| < 2
  const float a = -0.75f;
  return ((a * x - 5.0f * a) * x + 8.0f * a) * x - 4.0f * a;
}
inline void weights(float t, float w[4]) {
  w[0] = cc2(t + 1.0f);
  w[1] = cc1(t);
  const float u = 1.0f - t;  // torch forms (1 - t) + 1, not 2 - t
  w[2] = cc1(u);
  w[3] = cc2(u + 1.0f);
}
inline float interp(float x0, float x1, float x2, float x3, const float w[4]) {
  return x0 * w[0] + x1 * w[1] + x2 * w[2] + x3 * w[3];
}

}  // namespace

void resize_clamped(const float* input, float* output, long long planes, int in_h, int in_w, int out_h, int out_w) {
  const float scale_h = static_cast<float>(in_h) / static_cast<float>(out_h);
  const float scale_w = static_cast<float>(in_w) / static_cast<float>(out_w);
  const bool same = in_h == out_h && in_w == out_w;  // torch copies in this case
  for (long long p = 0; p < planes; ++p) {
    const float* src = input + p * in_h * in_w;
    float* dst = output + p * out_h * out_w;
    if (same) {
      for (long long i = 0; i < static_cast<long long>(in_h) * in_w; ++i) dst[i] = clamp1(src[i]);
      continue;
    }
    for (int oy = 0; oy < out_h; ++oy) {
      const float real_y = scale_h * (static_cast<float>(oy) + 0.5f) - 0.5f;
      const int iy = static_cast<int>(std::floor(real_y));
      float wy[4];
      weights(real_y - static_cast<float>(iy), wy);
      const float* rows_ptr[4];
      for (int k = 0; k < 4; ++k) rows_ptr[k] = src + static_cast<long long>(std::clamp(iy - 1 + k, 0, in_h - 1)) * in_w;
      for (int ox = 0; ox < out_w; ++ox) {
        const float real_x = scale_w * (static_cast<float>(ox) + 0.5f) - 0.5f;
        const int ix = static_cast<int>(std::floor(real_x));
        float wx[4];
        weights(real_x - static_cast<float>(ix), wx);
        int cols[4];
        for (int k = 0; k < 4; ++k) cols[k] = std::clamp(ix - 1 + k, 0, in_w - 1);
        float rows[4];
        for (int k = 0; k < 4; ++k) {
          const float* r = rows_ptr[k];
          rows[k] = interp(clamp1(r[cols[0]]), clamp1(r[cols[1]]), clamp1(r[cols[2]]), clamp1(r[cols[3]]), wx);
        }
        dst[static_cast<long long>(oy) * out_w + ox] = clamp1(interp(rows[0], rows[1], rows[2], rows[3], wy));
      }
    }
  }
}

}  // namespace megafusion
