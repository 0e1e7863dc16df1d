// The IP-Adapter image's pixel_values as transformers' CLIPImageProcessor makes them (image_encoder.hpp gives the
// sizes): resized on the 8-bit image, as PIL resizes it, with torch's antialiased kernels, which follow PIL's
// (measured against CLIPImageProcessor: at most 2 levels of 255 apart, mean under 0.01, tests/cpp/
// test_libmegafusion_ip_image.py); then center crop, rescale and normalize in float32.
#include "context.hpp"
#include "image_encoder.hpp"

namespace megafusion::lib {

at::Tensor clip_pixel_values(const RgbImage& im, const ImageEncoderFacts& f) {
  const ClipSteps s = clip_steps(f, im.width, im.height);
  at::Tensor x = at::from_blob(const_cast<uint8_t*>(im.rgb.data()), {1, im.height, im.width, 3}, at::kByte)
                     .permute({0, 3, 1, 2})
                     .contiguous();
  if (s.resize_h > 0) {
    // uint8 in, uint8 out, as PIL rounds and clips its result (a float resize differs by up to 50 levels where
    // bicubic overshoots on an upscale).
    const std::vector<int64_t> size{s.resize_h, s.resize_w};
    x = f.resample == 3 ? at::_upsample_bicubic2d_aa(x, size, false) : at::_upsample_bilinear2d_aa(x, size, false);
  }
  x = x.slice(2, s.top, s.top + s.crop_h).slice(3, s.left, s.left + s.crop_w).to(at::kFloat);
  if (f.do_rescale) x = x * f.rescale_factor;
  if (f.do_normalize) {
    const at::Tensor mean = at::tensor({f.mean[0], f.mean[1], f.mean[2]}, at::kFloat).view({1, 3, 1, 1});
    const at::Tensor std = at::tensor({f.std[0], f.std[1], f.std[2]}, at::kFloat).view({1, 3, 1, 1});
    x = (x - mean) / std;
  }
  return x.contiguous();
}

}  // namespace megafusion::lib
