// The index of a --weights-apart entry's weights.safetensors (export/aoti_weights.py writes it): where each
// tensor's bytes lie, with its dtype, shape and the strides the package was compiled for. Plain C++ (no
// libtorch), so ctest checks the reader's refusals quickly; aoti_weights.hpp reads the bytes into tensors.
//
// safetensors: 8 bytes of little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
// "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data, offsets counted from its start.
// megafusion's files carry one metadata entry, "megafusion.aoti_weights": JSON {"format": 1, "layout":
// {name: [shape, strides]}} for tensors stored flat in memory order (channels_last weights); a file without
// it, or of another format, is refused, never read as tensors of the wrong shape.
#ifndef MEGAFUSION_LIB_WEIGHT_FILE_HPP_
#define MEGAFUSION_LIB_WEIGHT_FILE_HPP_

#include <cstdint>
#include <string>
#include <vector>

namespace megafusion::lib {

constexpr int kWeightFileFormat = 1;  // export/aoti_weights.py FORMAT

struct WeightRecord {
  std::string name;   // as the package knows the constant (its original FQN, e.g. "unet.conv_in.weight")
  std::string dtype;  // safetensors' name: "F32", "F16", "BF16", ...
  int element_size = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // empty: the contiguous strides of `shape`
  uint64_t offset = 0;           // of its first byte, from the start of the file
  uint64_t bytes = 0;
};

// The records of the weight file `path`, in the file's order of data. std::runtime_error saying what is
// wrong (no path in it: the caller names the file) when the file cannot be read, its header is not a
// safetensors header, a tensor's bytes do not match its dtype and shape or lie outside the file, the data
// does not end where the file does, or its metadata is not megafusion's of kWeightFileFormat.
std::vector<WeightRecord> read_weight_index(const std::string& path);

// Bytes per element of a safetensors dtype name; 0 when not one this reader knows.
int weight_element_size(const std::string& dtype);

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_WEIGHT_FILE_HPP_
