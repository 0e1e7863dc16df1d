// The IP-Adapter image encoder of an engine folder (engine/image_encoder_engines.py builds it): which one serves an
// IP-Adapter, and the sizes of the image processor's steps for an image (CLIPImageProcessor: resize the shortest
// side, center crop), which clip_image.cpp then applies. Plain C++ (no libtorch), so ctest checks it quickly.
#ifndef MEGAFUSION_LIB_IMAGE_ENCODER_HPP_
#define MEGAFUSION_LIB_IMAGE_ENCODER_HPP_

#include <string>

#include "manifest.hpp"

namespace megafusion::lib {

using ImageEncoderFacts = ModelFacts::ImageEncoderFacts;

struct ImageEncoderId {
  std::string fingerprint;  // the weights field of its entries
  ImageEncoderFacts facts;  // its models.json record
};

// The image encoder models.json records for `model` whose embeddings have `dim` features and of which the folder has
// aoti image_encoder entries. Failure(MF_ERROR_ENGINE) naming `build` (the command that builds one) when there is
// none, or naming each one's folder when there are several: the C API takes no folder to choose by.
ImageEncoderId resolve_image_encoder(const EngineFolder& folder, const std::string& model, long long dim,
                                     const std::string& build);

// transformers' steps for a width x height image: resized to resize_h x resize_w (0 x 0: not resized), then the
// crop_h x crop_w window at (top, left) kept.
struct ClipSteps {
  long long resize_h = 0, resize_w = 0;
  long long top = 0, left = 0, crop_h = 0, crop_w = 0;
};

// The steps for an image of this size (get_resize_output_image_size with default_to_square=False, center_crop's
// (size - crop) // 2). Failure(MF_ERROR_ENGINE) naming the encoder's record when its resample is not bilinear or
// bicubic, or its steps do not end at image_size x image_size; MF_ERROR_INVALID_ARGUMENT when the image is smaller
// than the crop (transformers would pad it; not done here).
ClipSteps clip_steps(const ImageEncoderFacts& f, int width, int height);

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_IMAGE_ENCODER_HPP_
