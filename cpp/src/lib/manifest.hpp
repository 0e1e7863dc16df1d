// The engine folder as the C++ library reads it (engine/cache.py writes it): manifest.json lists the
// content-addressed entries, models.json the facts of each model's latest build (VAE scaling factor, the
// weights fingerprint of each network). Plain C++: no libtorch, so ctest checks it quickly.
#ifndef MEGAFUSION_LIB_MANIFEST_HPP_
#define MEGAFUSION_LIB_MANIFEST_HPP_

#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "megafusion/megafusion.h"

namespace megafusion::lib {

// An error with the C API's status code; what() names the bad value.
class Failure : public std::runtime_error {
 public:
  Failure(mf_status code, const std::string& message) : std::runtime_error(message), code(code) {}
  mf_status code;
};

struct TensorRange {
  std::string name;
  std::vector<long long> min, opt, max;
};

// One optimization profile (engine/cache.py ShapeProfile): a TensorRT plan has one per plan stage that runs it.
struct Profile {
  int stage = 0;
  std::vector<TensorRange> shapes;  // per input, in the spec's input order
};

struct FileRecord {
  std::string path;  // relative to the engine folder
  std::string sha256;
  long long size = 0;
};

struct Entry {
  std::string digest, model, weights, network, variant, precision, backend, backend_version, device;
  int dilation = 1;
  std::vector<TensorRange> range;  // the first profile (an AOTInductor package has exactly one: its range)
  std::vector<Profile> profiles;   // every profile, in the manifest's order (profiles[0].shapes == range)
  std::vector<FileRecord> files;
  double created = 0;
  std::string constants = "inside";  // "apart": the package holds no weights (mf-build-engines --weights-apart)

  std::string describe() const;  // e.g. "unet (dilated) fp32 aoti"
};

struct ModelFacts {
  double vae_scaling_factor = 0;
  double vae_shift_factor = 0;  // SD3 / FLUX VAEs (absent: 0)
  std::map<std::string, std::string> weights;  // network -> fingerprint of its latest build
  std::string source;  // where the weights came from: "random:<seed>" or a folder (for rebuild hints)
  std::vector<long long> vocab_sizes;          // per text encoder, to refuse out-of-range token ids
  // ControlNets `mf-build-engines --controlnet DIR` built here: DIR's last component -> {weights fingerprint,
  // DIR} (engine/model_facts.py record_controlnets; absent in folders built before it).
  std::map<std::string, std::pair<std::string, std::string>> controlnets;
  // What an SD3 / FLUX ControlNet's record adds (engine/dit_controlnet_engines.py record_flow_controlnets), by
  // weights fingerprint: its outputs' names in order, zero pooled projections and unshifted latent, a hint block.
  struct FlowControlFacts {
    std::vector<std::string> outputs;
    bool zero_pooled = false, hint_block = false;
  };
  std::map<std::string, FlowControlFacts> flow_controls;
  // IP-Adapter image encoders `mf-build-engines --ip-adapter-encoder DIR` built here, by weights fingerprint
  // (engine/image_encoder_engines.py record_image_encoder): their sizes and the image processor's steps
  // (CLIPImageProcessor: resize, center crop, rescale, normalize) that turn an RGB8 image into pixel_values.
  struct ImageEncoderFacts {
    std::string source;  // the folder it was built from
    long long image_size = 0, projection_dim = 0;
    bool do_resize = true, do_center_crop = true, do_rescale = true, do_normalize = true;
    long long shortest_edge = 0, resize_height = 0, resize_width = 0;  // shortest_edge, else height x width
    long long crop_height = 0, crop_width = 0;
    int resample = 3;  // PIL's code: 2 bilinear, 3 bicubic
    double rescale_factor = 1.0 / 255;
    double mean[3] = {0, 0, 0}, std[3] = {1, 1, 1};
  };
  std::map<std::string, ImageEncoderFacts> image_encoders;
};

// Reads DIR/manifest.json and DIR/models.json; Failure(MF_ERROR_ENGINE) naming the file when either is
// missing, not JSON (or nested deeper than 64 levels), or of another format; naming the entry when an entry's
// digest is not the sha256 of its key as engine/cache.py computes it (json.dumps(key, sort_keys=True)), or
// one of its file paths is absolute, has a '..' component or is not normalized.
struct EngineFolder {
  std::string root;
  std::vector<Entry> entries;
  std::map<std::string, ModelFacts> models;
};
EngineFolder read_engine_folder(const std::string& dir);

// The entries of `backend` a run on `device` (its name as the manifest records it: "cpu" or the GPU's name)
// needs for `model`: one per (network, dilation) in `wanted`, built from the weights models.json records,
// precision `precision` (VAE: any), by `backend_version` (aoti: this library's torch, same release; tensorrt:
// the loaded TensorRT, same major.minor.patch). Failure(MF_ERROR_ENGINE) names what is missing or stale and
// the command that builds it.
std::map<std::pair<std::string, int>, Entry> select_entries(const EngineFolder& folder, const std::string& model,
                                                            const std::vector<std::pair<std::string, int>>& wanted,
                                                            const std::string& precision, const std::string& device,
                                                            const std::string& backend_version,
                                                            const std::string& backend = "aoti");

// Every valid entry per (network, dilation), newest first: select_entries' filters and failures, but all the
// valid entries rather than the newest alone. A folder of per-stage static packages has one per stage shape
// (spatial sides fixed, batch 1 to 2); a --dynamic folder one range; both may be there.
std::map<std::pair<std::string, int>, std::vector<Entry>> select_entry_sets(
    const EngineFolder& folder, const std::string& model, const std::vector<std::pair<std::string, int>>& wanted,
    const std::string& precision, const std::string& device, const std::string& backend_version,
    const std::string& backend = "aoti");

// The command that builds `model`'s engines for the plan `stages` ("WxH:steps,...") into the folder, with the
// weights source models.json records (as select_entries' hints): "mf-build-engines --model M [weights] --stages S
// --backend B --precision P --device cpu|cuda --output DIR".
std::string plan_build_hint(const EngineFolder& folder, const std::string& model, const std::string& device,
                            const std::string& backend, const std::string& precision, const std::string& stages);

// The sizes an entry serves, in pixels (`k` pixels per unit of its first input's last two axes): "128x128" for a
// static package, "128x128 to 256x256" for a range, each profile's opt for a TensorRT plan.
std::string served_sizes(const Entry& e, long long k);

// Index of the first of `entries` (in their order, newest first from select_entry_sets) with a profile holding
// every input shape of a call (select_profile over each entry's profiles). Failure(MF_ERROR_UNSUPPORTED_SIZE),
// one line: "<where> do not cover <entry> at WxH; they cover <served_sizes of each>. Build them with: <hint>",
// WxH the first input's last two axes times `k`.
size_t pick_entry(const std::vector<Entry>& entries,
                  const std::vector<std::pair<std::string, std::vector<long long>>>& shapes, long long k,
                  const std::string& where, const std::string& hint);

// The backend a context runs for `model` (engine/load.py _choose_backend, among the backends this library
// has): tensorrt on CUDA when the library has it and the folder has TensorRT UNets for `model`, else aoti.
// Failure(MF_ERROR_ENGINE) when the folder's only UNets for `model` are TensorRT engines this library or
// device cannot run, naming the missing support and what to rebuild.
std::string choose_backend(const EngineFolder& folder, const std::string& model, bool cuda, bool with_tensorrt);

// "(2, 4, 128, 128)": a shape as error messages print it.
std::string shape_text(const std::vector<long long>& s);

// Whether `shape` lies inside [r.min, r.max], rank included.
bool holds(const TensorRange& r, const std::vector<long long>& shape);

// Index of the first profile whose [min, max] holds every input shape of a call, inputs matched by name
// (engine/tensorrt_backend.py select_profile; an input a profile names but the call lacks matches nothing).
// Failure(MF_ERROR_UNSUPPORTED_SIZE) naming the shapes when no profile does.
size_t select_profile(const std::vector<Profile>& profiles,
                      const std::vector<std::pair<std::string, std::vector<long long>>>& shapes);

// Checks each of the entry's files: its path stays inside `root` (relative, no '..', no symbolic link on the
// way, its canonical path under root's), it is a regular file of the recorded size and sha256. Hashes are
// always checked; a file whose (canonical path, device, inode, size, mtime, ctime) are those it had when
// this process last hashed it, or those of its record in root's file-hashes.json (engine/file_hashes.py's
// format: mf-build-engines, Python's runs and this reader keep them), is not read again; a file it reads and
// hashes gets a record there, where the folder can be written.
// Failure(MF_ERROR_ENGINE) names the file and the entry.
void verify_files(const std::string& root, const Entry& e);

// How many files verify_files has hashed in this process (not answered from its cache); for tests.
size_t files_hashed();

// How many files verify_files took the hash of from file-hashes.json; for tests.
size_t files_remembered();

// "2.13.0+cpu" -> "2.13.0": packages are tied to the torch release, the local suffix names the wheel.
std::string base_version(const std::string& v);

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_MANIFEST_HPP_
