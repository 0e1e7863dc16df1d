// The built-in model families (core/families.py). Sizes only: the networks come from the engines.
#include "megafusion/family.hpp"

namespace megafusion {

namespace {

std::vector<Family> make_families() {
  // vae_scale = 2^(VAE blocks - 1) = 8 for all; pixel_multiple = vae_scale * 2^(UNet downsamples).
  Family sd15{"sd15", false, 512, 512, 8, 64, {{512, 512, 40}, {768, 768, 5}, {1024, 1024, 5}}, {}};
  Family sdxl{"sdxl", true, 1024, 1024, 8, 32, {{1024, 1024, 40}, {2048, 2048, 10}}, {}};
  Family tiny_sd15{"tiny-sd15", false, 128, 128, 8, 64, {{128, 128, 40}, {192, 192, 5}, {256, 256, 5}}, {}};
  Family tiny_sdxl{"tiny-sdxl", true, 128, 128, 8, 32, {{128, 128, 40}, {256, 256, 10}}, {}};
  return {sd15, sdxl, tiny_sd15, tiny_sdxl};
}

}  // namespace

const std::vector<Family>& families() {
  static const std::vector<Family> table = make_families();
  return table;
}

const Family* find_family(const std::string& name) {
  for (const Family& f : families())
    if (f.name == name) return &f;
  return nullptr;
}

}  // namespace megafusion
