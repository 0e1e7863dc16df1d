#include "image_encoder.hpp"

#include <algorithm>
#include <map>

namespace megafusion::lib {

namespace {

std::string wxh(long long w, long long h) { return std::to_string(w) + "x" + std::to_string(h); }

}  // namespace

ImageEncoderId resolve_image_encoder(const EngineFolder& folder, const std::string& model, long long dim,
                                     const std::string& build) {
  std::map<std::string, ImageEncoderFacts> found;
  auto facts = folder.models.find(model);
  if (facts != folder.models.end())
    for (const Entry& e : folder.entries) {
      if (e.model != model || e.network != "image_encoder" || e.backend != "aoti") continue;
      auto rec = facts->second.image_encoders.find(e.weights);
      if (rec != facts->second.image_encoders.end() && rec->second.projection_dim == dim)
        found.emplace(e.weights, rec->second);
    }
  if (found.empty())
    throw Failure(MF_ERROR_ENGINE, "no image_encoder (IP-Adapter image encoder) aoti engine of " + std::to_string(dim) +
                                       " features for " + model + " in " + folder.root + "; build it with: " + build);
  if (found.size() > 1) {
    std::string list;
    for (const auto& [fp, f] : found) list += (list.empty() ? "" : ", ") + f.source;
    throw Failure(MF_ERROR_ENGINE, "the engines in " + folder.root + " hold " + std::to_string(found.size()) +
                                       " IP-Adapter image encoders of " + std::to_string(dim) + " features (from " +
                                       list + "); libmegafusion takes a folder with one: build each into its own "
                                       "folder with: " + build);
  }
  return {found.begin()->first, found.begin()->second};
}

ClipSteps clip_steps(const ImageEncoderFacts& f, int width, int height) {
  const std::string what = "the IP-Adapter image encoder of " + f.source;
  if (f.resample != 2 && f.resample != 3)
    throw Failure(MF_ERROR_ENGINE, what + " resizes with PIL resample " + std::to_string(f.resample) +
                                       "; libmegafusion reproduces bilinear (2) and bicubic (3) only");
  ClipSteps s;
  long long h = height, w = width;
  if (f.do_resize) {
    if (f.shortest_edge > 0) {  // the shorter side to shortest_edge, the other int(edge * long / short)
      const long long shorter = std::min(h, w), longer = std::max(h, w);
      const auto other = static_cast<long long>(static_cast<double>(f.shortest_edge * longer) / shorter);
      (w <= h ? s.resize_w : s.resize_h) = f.shortest_edge;
      (w <= h ? s.resize_h : s.resize_w) = other;
    } else if (f.resize_height > 0 && f.resize_width > 0) {
      s.resize_h = f.resize_height, s.resize_w = f.resize_width;
    } else {
      throw Failure(MF_ERROR_ENGINE, what + " has no resize size (shortest_edge, or height and width)");
    }
    h = s.resize_h, w = s.resize_w;
  }
  s.crop_h = h, s.crop_w = w;
  if (f.do_center_crop) {
    if (f.crop_height > h || f.crop_width > w)
      throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter image " + wxh(width, height) + " is " + wxh(w, h) +
                                                   " after the resize, smaller than the encoder's crop " +
                                                   wxh(f.crop_width, f.crop_height));
    s.crop_h = f.crop_height, s.crop_w = f.crop_width;
    s.top = (h - s.crop_h) / 2, s.left = (w - s.crop_w) / 2;
  }
  if (s.crop_h != f.image_size || s.crop_w != f.image_size)
    throw Failure(MF_ERROR_ENGINE, what + " makes " + wxh(s.crop_w, s.crop_h) + " pixel values of a " +
                                       wxh(width, height) + " image; its engine takes " +
                                       wxh(f.image_size, f.image_size));
  return s;
}

}  // namespace megafusion::lib
