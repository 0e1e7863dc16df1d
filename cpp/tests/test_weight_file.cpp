// The weight-file index reader (cpp/src/lib/weight_file.hpp) without libtorch: a file as export/aoti_weights.py
// writes it is read back with each tensor's place, dtype, shape and recorded strides; every way a file can be
// damaged or foreign is refused with one line saying what is wrong, before any byte is used as a tensor.
#include <cstdint>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "../src/lib/weight_file.hpp"

#include "check.hpp"

using namespace megafusion::lib;
using megafusion::testing::check;
using megafusion::testing::g_failures;

namespace {

const std::string kMeta =
    R"("__metadata__":{"megafusion.aoti_weights":"{\"format\": 1, \"layout\": {\"b\": [[2, 3], [1, 2]]}}"})";

// A safetensors file: the header's length (little-endian, 8 bytes), the header, `data` bytes of data.
std::string file_of(const std::string& header, size_t data, uint64_t declared = UINT64_MAX) {
  const uint64_t n = declared == UINT64_MAX ? header.size() : declared;
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>(n >> (8 * i) & 0xff);
  return out + header + std::string(data, '\x01');
}

std::string write(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// The error read_weight_index gives for `bytes`, "" when it reads them.
std::string error_of(const std::string& dir, const std::string& bytes) {
  try {
    read_weight_index(write(dir, "w.safetensors", bytes));
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

void expect_error(const std::string& dir, const std::string& what, const std::string& bytes, const std::string& needle) {
  const std::string e = error_of(dir, bytes);
  check(!e.empty() && e.find(needle) != std::string::npos && e.find('\n') == std::string::npos, what + ": " + e);
}

// Tensor a: F32 (2,) at [0, 8); tensor b: F16 (6,) at [8, 20), laid out as (2, 3) with strides (1, 2).
const std::string kTensors =
    R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[6],"data_offsets":[8,20]})";

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return std::cerr << "usage: megafusion_weight_file_test <scratch folder>\n", 2;
  const std::string dir = argv[1];
  std::system(("mkdir -p '" + dir + "'").c_str());

  const std::string good = file_of("{" + kTensors + "," + kMeta + "}", 20);
  try {
    const auto r = read_weight_index(write(dir, "good.safetensors", good));
    const uint64_t data = 8 + good.size() - 8 - 20;
    check(r.size() == 2 && r[0].name == "a" && r[0].dtype == "F32" && r[0].element_size == 4 &&
              r[0].shape == std::vector<int64_t>{2} && r[0].strides.empty() && r[0].offset == data && r[0].bytes == 8,
          "a contiguous tensor: its place, dtype and shape");
    check(r[1].name == "b" && r[1].shape == std::vector<int64_t>{2, 3} && r[1].strides == std::vector<int64_t>{1, 2} &&
              r[1].offset == data + 8 && r[1].bytes == 12,
          "a tensor stored flat: the recorded shape and strides");
  } catch (const std::exception& e) {
    check(false, std::string("the good file: ") + e.what());
  }

  expect_error(dir, "shorter than a header", "abc", "shorter than a safetensors header");
  expect_error(dir, "header longer than the file", file_of("{}", 0, 1000), "declares a header of 1000 bytes");
  expect_error(dir, "header not JSON", file_of("{\"a\":", 0), "has a header that is not JSON");
  expect_error(dir, "header not an object", file_of("[1]", 0), "expected an object");
  expect_error(dir, "no megafusion metadata", file_of("{" + kTensors + "}", 20),
               "is not a megafusion weight file of format 1 (found none)");
  expect_error(dir, "another format",
               file_of("{" + kTensors + R"(,"__metadata__":{"megafusion.aoti_weights":"{\"format\": 2}"}})", 20),
               "of format 1 (found 2)");
  expect_error(dir, "data cut short", file_of("{" + kTensors + "," + kMeta + "}", 19), "lies at bytes [8, 20)");
  expect_error(dir, "bytes after the last tensor", file_of("{" + kTensors + "," + kMeta + "}", 21),
               "holds 1 bytes after its last tensor");
  expect_error(dir, "bytes that do not match dtype and shape",
               file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]},)"
                           R"("__metadata__":{"megafusion.aoti_weights":"{\"format\": 1}"}})",
                       8),
               "tensor a holds 8 bytes, not what its dtype F32 and shape take");
  expect_error(dir, "an unknown dtype",
               file_of(R"({"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8), "has dtype C64");
  expect_error(dir, "a gap between tensors",
               file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", 2),
               "does not start where the one before it ends");
  expect_error(dir, "a negative offset",
               file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", 1), "expected a non-negative integer");
  expect_error(dir, "a layout past the stored elements",
               file_of("{" + kTensors +
                           R"(,"__metadata__":{"megafusion.aoti_weights":"{\"format\": 1, \"layout\": {\"b\": [[2, 3], [3, 2]]}}"}})",
                       20),
               "the layout of b addresses elements past the 6 stored");
  expect_error(dir, "a layout of another size",
               file_of("{" + kTensors +
                           R"(,"__metadata__":{"megafusion.aoti_weights":"{\"format\": 1, \"layout\": {\"b\": [[2, 2], [1, 2]]}}"}})",
                       20),
               "the layout of b does not fit the 6 elements stored for it");
  expect_error(dir, "a layout of a tensor the file lacks",
               file_of("{" + kTensors +
                           R"(,"__metadata__":{"megafusion.aoti_weights":"{\"format\": 1, \"layout\": {\"c\": [[1], [1]]}}"}})",
                       20),
               "lays out c, which the file does not hold");
  try {
    read_weight_index(dir + "/absent.safetensors");
    check(false, "a missing file: no error");
  } catch (const std::exception& e) {
    check(std::string(e.what()).find("cannot be opened (No such file") != std::string::npos,
          std::string("a missing file: ") + e.what());
  }
  std::cout << (g_failures ? "FAILED " : "passed ") << g_failures << " failures\n";
  return g_failures ? 1 : 0;
}
