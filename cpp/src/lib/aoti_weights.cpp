#include "aoti_weights.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "weight_file.hpp"

namespace megafusion::lib {

namespace {

std::string entry_text(const Entry& e) { return e.describe() + ", entry " + e.digest.substr(0, 16); }

const char* kRebuild = "rebuild the entry with mf-build-engines --weights-apart --force";

at::ScalarType scalar_type(const std::string& dtype) {
  static const std::map<std::string, at::ScalarType> types = {
      {"F64", at::kDouble},           {"F32", at::kFloat},         {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"F8_E4M3", at::kFloat8_e4m3fn}, {"F8_E5M2", at::kFloat8_e5m2}, {"I64", at::kLong}, {"I32", at::kInt},
      {"I16", at::kShort},            {"I8", at::kChar},           {"U8", at::kByte},   {"BOOL", at::kBool}};
  return types.at(dtype);  // read_weight_index admits only these
}

// Each record's bytes into a tensor on `device`, with the shape and strides it was written with.
std::map<std::string, at::Tensor> read_tensors(const std::string& path, const std::vector<WeightRecord>& records,
                                               const at::Device& device) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(std::string("cannot be opened (") + std::strerror(errno) + ")");
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  std::map<std::string, at::Tensor> out;
  for (const WeightRecord& r : records) {
    const int64_t n = static_cast<int64_t>(r.bytes / r.element_size);
    at::Tensor flat = at::empty({n}, at::TensorOptions().dtype(scalar_type(r.dtype)));
    char* dst = static_cast<char*>(flat.data_ptr());
    for (uint64_t done = 0; done < r.bytes;) {
      const ssize_t got = ::pread(fd, dst + done, r.bytes - done, static_cast<off_t>(r.offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) throw std::runtime_error("ends inside tensor " + r.name);
      done += static_cast<uint64_t>(got);
    }
    if (!device.is_cpu()) flat = flat.to(device);
    // Stored flat in memory order, viewed through the recorded strides (export/aoti_weights.py read_weights).
    out.emplace(r.name, r.strides.empty() ? flat.view(r.shape) : flat.as_strided(r.shape, r.strides));
  }
  return out;
}

std::mutex g_mutex;
std::map<std::pair<std::string, std::string>, std::weak_ptr<const SharedWeights>> g_open;  // (sha256, device)
size_t g_reads = 0;

}  // namespace

size_t weight_files_read() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_reads;
}

const FileRecord& weights_record(const std::string& root, const Entry& e) {
  // Files are recorded as `<entry folder>/<name>` (engine/aoti_backend.py finds the weight file so too).
  const std::string suffix = std::string("/") + kWeightsFile;
  auto rec = std::find_if(e.files.begin(), e.files.end(), [&](const FileRecord& f) {
    return f.path.size() > suffix.size() && f.path.compare(f.path.size() - suffix.size(), suffix.size(), suffix) == 0;
  });
  if (rec == e.files.end())
    throw Failure(MF_ERROR_ENGINE, "engine " + entry_text(e) + " in " + root + " was built with --weights-apart but " +
                                       "lists no " + kWeightsFile + "; " + kRebuild);
  return *rec;
}

std::shared_ptr<const SharedWeights> shared_weights(const std::string& root, const Entry& e, const at::Device& device) {
  const FileRecord* rec = &weights_record(root, e);
  const std::string path = root + "/" + rec->path;
  std::lock_guard<std::mutex> lock(g_mutex);  // one reader per file: a second context waits and shares
  const auto key = std::make_pair(rec->sha256, device.str());
  if (auto found = g_open[key].lock()) return found;
  auto w = std::make_shared<SharedWeights>();
  w->sha256 = rec->sha256;
  try {
    w->tensors = read_tensors(path, read_weight_index(path), device);
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& x) {
    throw Failure(MF_ERROR_ENGINE, "weight file " + path + " (" + entry_text(e) + ") " + x.what() + "; " + kRebuild);
  }
  ++g_reads;
  g_open[key] = w;
  return w;
}

void give_weights(torch::inductor::AOTIModelPackageLoader& loader, const SharedWeights& w, const std::string& root,
                  const Entry& e) {
  const std::string file = root + "/" + weights_record(root, e).path;
  // The package's constants by internal name, with the original name (the weight file's) and the dtype it reads.
  auto* runner = loader.get_runner();
  const auto fqns = runner->getConstantNamesToOriginalFQNs();
  const auto dtypes = runner->getConstantNamesToDtypes();
  std::vector<std::string> missing;
  std::unordered_map<std::string, at::Tensor> constants;
  for (const auto& [internal, fqn] : fqns) {
    auto t = w.tensors.find(fqn);
    if (t == w.tensors.end()) {
      missing.push_back(fqn);
      continue;
    }
    auto d = dtypes.find(internal);
    // AOTInductor's dtype codes are c10::ScalarType's values (aoti_torch_dtype_*).
    if (d != dtypes.end() && d->second != static_cast<int32_t>(t->second.scalar_type()))
      throw Failure(MF_ERROR_ENGINE, "weight file " + file + " (" + entry_text(e) + ") holds " + fqn + " as " +
                                         std::string(c10::toString(t->second.scalar_type())) + ", not the " +
                                         std::string(c10::toString(static_cast<at::ScalarType>(d->second))) +
                                         " the package reads; " + kRebuild);
    constants.emplace(fqn, t->second);
  }
  if (!missing.empty()) {
    std::sort(missing.begin(), missing.end());
    throw Failure(MF_ERROR_ENGINE, "weight file " + file + " (" + entry_text(e) + ") lacks " +
                                       std::to_string(missing.size()) + " of the package's constants (first: " +
                                       missing.front() + "); " + kRebuild);
  }
  try {
    // use_inactive false, check_full_update true, user_managed true: Python's load_constants(..., user_managed=True).
    loader.load_constants(constants, false, true, true);
  } catch (const std::exception& x) {
    throw Failure(MF_ERROR_ENGINE, "engine " + entry_text(e) + " did not take the weights of " + file + ": " +
                                       std::string(x.what()).substr(0, std::string(x.what()).find('\n')));
  }
}

}  // namespace megafusion::lib
