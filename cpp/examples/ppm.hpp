// A binary PPM (P6, maxval 255) reader for the example's --image and --control-image: enough for an example that
// must not depend on an image library (convert a PNG with e.g. `python -c "from PIL import Image;
// Image.open('a.png').convert('RGB').save('a.ppm')"`).
#ifndef MEGAFUSION_EXAMPLES_PPM_HPP_
#define MEGAFUSION_EXAMPLES_PPM_HPP_

#include <cctype>
#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mfppm {

struct Image {
  std::vector<uint8_t> rgb;
  int width = 0, height = 0;
};

// Throws std::runtime_error naming `flag` and the file.
inline Image read(const std::string& flag, const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(flag + " '" + path + "': cannot open the file");
  auto bad = [&](const std::string& why) { return std::runtime_error(flag + " '" + path + "': " + why); };
  auto token = [&]() {
    std::string t;
    int c;
    while ((c = f.get()) != EOF) {
      if (c == '#') {
        while ((c = f.get()) != EOF && c != '\n') {
        }
        continue;
      }
      if (std::isspace(c)) {
        if (!t.empty()) break;
        continue;
      }
      t.push_back(static_cast<char>(c));
    }
    return t;
  };
  if (token() != "P6") throw bad("not a binary PPM (P6) file");
  long long v[3] = {0, 0, 0};
  for (long long& x : v) {
    const std::string t = token();
    if (t.empty() || t.size() > 6 || t.find_first_not_of("0123456789") != std::string::npos)
      throw bad("bad PPM header");
    x = std::stoll(t);
  }
  if (v[0] < 1 || v[1] < 1 || v[2] != 255) throw bad("PPM of size " + std::to_string(v[0]) + "x" +
                                                     std::to_string(v[1]) + ", maxval " + std::to_string(v[2]) +
                                                     " (need sides >= 1 and maxval 255)");
  Image im;
  im.width = static_cast<int>(v[0]), im.height = static_cast<int>(v[1]);
  im.rgb.resize(static_cast<size_t>(im.width) * im.height * 3);
  f.read(reinterpret_cast<char*>(im.rgb.data()), static_cast<std::streamsize>(im.rgb.size()));
  if (f.gcount() != static_cast<std::streamsize>(im.rgb.size())) throw bad("the file ends before its pixels do");
  return im;
}

}  // namespace mfppm

#endif  // MEGAFUSION_EXAMPLES_PPM_HPP_
