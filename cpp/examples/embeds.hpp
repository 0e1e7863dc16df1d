// The example's --ip-adapter-embeds file: float32 little-endian values, raw (the whole file) or a .npy array
// (format 1.0 to 3.0, dtype '<f4', C order, any shape: numpy.save(path, embeds.astype('<f4'))). Read as the
// values' bytes, on a little-endian host (refused elsewhere).
#ifndef MEGAFUSION_EXAMPLES_EMBEDS_HPP_
#define MEGAFUSION_EXAMPLES_EMBEDS_HPP_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace mfembeds {

// Throws std::runtime_error, one line naming `flag` and the file.
inline std::vector<float> read(const std::string& flag, const std::string& path) {
  auto bad = [&](const std::string& why) { return std::runtime_error(flag + " '" + path + "': " + why); };
  const uint16_t one = 1;
  if (*reinterpret_cast<const uint8_t*>(&one) != 1) throw bad("this host is not little-endian");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw bad("cannot open the file");
  const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t start = 0;
  const bool npy = path.size() >= 4 && path.compare(path.size() - 4, 4, ".npy") == 0;
  if (npy) {
    if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) throw bad("not a .npy file");
    const int major = static_cast<uint8_t>(bytes[6]);
    const size_t wide = major >= 2 ? 4 : 2;  // header length field: 2 bytes in format 1, 4 after
    if (major < 1 || major > 3 || bytes.size() < 8 + wide) throw bad("unknown .npy format " + std::to_string(major));
    size_t len = 0;
    for (size_t i = 0; i < wide; ++i) len |= static_cast<size_t>(static_cast<uint8_t>(bytes[8 + i])) << (8 * i);
    start = 8 + wide + len;
    if (start > bytes.size()) throw bad("the .npy header runs past the file");
    std::string header = bytes.substr(8 + wide, len);
    header.erase(std::remove(header.begin(), header.end(), ' '), header.end());
    if (header.find("'descr':'<f4'") == std::string::npos)
      throw bad("the .npy array is not float32 little-endian ('<f4'); save embeds.astype('<f4')");
    if (header.find("'fortran_order':False") == std::string::npos) throw bad("the .npy array is in Fortran order");
  }
  const size_t n = bytes.size() - start;
  if (n == 0 || n % 4 != 0)
    throw bad(std::to_string(n) + " bytes of values, not a positive multiple of 4 (float32)");
  std::vector<float> out(n / 4);
  std::memcpy(out.data(), bytes.data() + start, n);
  return out;
}

}  // namespace mfembeds

#endif  // MEGAFUSION_EXAMPLES_EMBEDS_HPP_
