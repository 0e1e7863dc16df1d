// Weights of --weights-apart AOTInductor packages (engine/aoti_shared.py, export/aoti_weights.py): an entry's
// weights.safetensors read once per process and device, shared by every package whose weight file has the same
// sha256 (SDXL's standard and dilated UNets are the same weights compiled for two shapes: one copy on the
// device), and handed to each package as user-managed constants, so the package reads those very tensors.
#ifndef MEGAFUSION_LIB_AOTI_WEIGHTS_HPP_
#define MEGAFUSION_LIB_AOTI_WEIGHTS_HPP_

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>

#include "manifest.hpp"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace megafusion::lib {

constexpr const char* kWeightsFile = "weights.safetensors";  // export/aoti_weights.py WEIGHTS_FILE

// The record of entry `e`'s weight file; Failure(MF_ERROR_ENGINE) when it lists none.
const FileRecord& weights_record(const std::string& root, const Entry& e);

// One weight file's tensors on one device, by the names the package knows its constants by.
struct SharedWeights {
  std::map<std::string, at::Tensor> tensors;
  std::string sha256;
};

// The tensors of entry `e`'s weight file (under `root`, already checked against its sha256 by verify_files) on
// `device`: those another package of this process already read from a file of the same sha256, while one
// still holds them, else read now. Failure(MF_ERROR_ENGINE), one line naming the file and the entry, when the
// entry lists no weight file or the file is not a megafusion weight file.
std::shared_ptr<const SharedWeights> shared_weights(const std::string& root, const Entry& e, const at::Device& device);

// Hands `w`'s tensors to the package as its constants (load_constants with user_managed: not copied; the
// package reads them as long as it lives, so its owner keeps `w`). Failure(MF_ERROR_ENGINE) naming a constant
// the file lacks or holds in another dtype than the package reads.
void give_weights(torch::inductor::AOTIModelPackageLoader& loader, const SharedWeights& w, const std::string& root,
                  const Entry& e);

// Weight files this process has read (tests: two packages of one file read it once).
size_t weight_files_read();

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_AOTI_WEIGHTS_HPP_
