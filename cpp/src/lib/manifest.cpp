#include "manifest.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

#include "../json.hpp"
#include "sha256.hpp"

namespace megafusion::lib {

namespace {

constexpr int kManifestFormat = 1;  // engine/cache.py FORMAT
constexpr int kModelsFormat = 1;    // engine/model_facts.py FORMAT

mfjson::Value read_json(const std::string& path, const std::string& what) {
  std::ifstream f(path);
  if (!f) throw Failure(MF_ERROR_ENGINE, what + " " + path + " is missing; build engines with mf-build-engines");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return mfjson::parse(ss.str());
  } catch (const std::exception& e) {
    throw Failure(MF_ERROR_ENGINE, what + " " + path + " is corrupt (" + e.what() + ")");
  }
}

std::vector<long long> dims(const mfjson::Value& v) {
  std::vector<long long> out;
  for (const auto& d : v.arr) out.push_back(static_cast<long long>(d.num));
  return out;
}

Entry parse_entry(const mfjson::Value& e) {
  const auto& k = e["key"];
  Entry out;
  out.digest = e["digest"].str;
  out.model = k["model"].str;
  out.weights = k["weights"].str;
  out.network = k["network"].str;
  out.variant = k["variant"].str;
  out.dilation = k["dilation"].as_int();
  out.precision = k["precision"].str;
  out.backend = k["backend"].str;
  out.backend_version = k["backend_version"].str;
  out.device = k["device"].str;
  out.created = e["created"].num;
  if (k["profiles"].size() > 0)
    for (const auto& s : k["profiles"][0]["shapes"].arr)
      out.range.push_back({s[0].str, dims(s[1]), dims(s[2]), dims(s[3])});
  for (const auto& f : e["files"].arr)
    out.files.push_back({f["path"].str, f["sha256"].str, static_cast<long long>(f["size"].num)});
  return out;
}

std::string build_hint(const std::string& model, const std::string& device, const std::string& root) {
  return "mf-build-engines --model " + model + " --backend aoti --device " + (device == "cpu" ? "cpu" : "cuda") +
         " --output " + root;
}

}  // namespace

std::string Entry::describe() const {
  return network + (network == "unet" ? " (" + variant + ")" : "") + " " + precision + " " + backend;
}

std::string base_version(const std::string& v) { return v.substr(0, v.find('+')); }

EngineFolder read_engine_folder(const std::string& dir) {
  struct stat st {};
  if (dir.empty() || stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw Failure(MF_ERROR_ENGINE, "engine folder '" + dir + "' does not exist");
  EngineFolder out;
  out.root = dir;
  const std::string manifest = dir + "/manifest.json", models = dir + "/models.json";
  const mfjson::Value m = read_json(manifest, "engine manifest");
  try {
    if (m["format"].as_int() != kManifestFormat)
      throw Failure(MF_ERROR_ENGINE, "engine manifest " + manifest + " has format " +
                                         std::to_string(m["format"].as_int()) + ", this library reads " +
                                         std::to_string(kManifestFormat));
    for (const auto& e : m["entries"].arr) out.entries.push_back(parse_entry(e));
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    throw Failure(MF_ERROR_ENGINE, "engine manifest " + manifest + " is corrupt (" + e.what() + ")");
  }
  const mfjson::Value f = read_json(models, "model facts file");
  try {
    if (f["format"].as_int() != kModelsFormat)
      throw Failure(MF_ERROR_ENGINE, "model facts file " + models + " has format " +
                                         std::to_string(f["format"].as_int()));
    for (const auto& [name, v] : f["models"].obj) {
      ModelFacts facts;
      facts.vae_scaling_factor = v["vae_scaling_factor"].num;
      for (const auto& [net, fp] : v["weights"].obj) facts.weights[net] = fp.str;
      for (const auto& n : v["vocab_sizes"].arr) facts.vocab_sizes.push_back(static_cast<long long>(n.num));
      out.models[name] = facts;
    }
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    throw Failure(MF_ERROR_ENGINE, "model facts file " + models + " is corrupt (" + e.what() + ")");
  }
  return out;
}

std::map<std::pair<std::string, int>, Entry> select_entries(const EngineFolder& folder, const std::string& model,
                                                            const std::vector<std::pair<std::string, int>>& wanted,
                                                            const std::string& precision, const std::string& device,
                                                            const std::string& torch_version) {
  const std::string hint = build_hint(model, device, folder.root);
  auto facts = folder.models.find(model);
  if (facts == folder.models.end())
    throw Failure(MF_ERROR_ENGINE, "no " + model + " engines in " + folder.root + "; build them with: " + hint);
  std::map<std::pair<std::string, int>, Entry> chosen;
  for (const auto& [network, dilation] : wanted) {
    const bool vae = network == "vae_decoder" || network == "vae_encoder";
    auto fp = facts->second.weights.find(network);
    std::vector<const Entry*> same;
    for (const Entry& e : folder.entries)
      if (e.model == model && e.backend == "aoti" && e.network == network && e.dilation == dilation &&
          (vae || e.precision == precision) && fp != facts->second.weights.end() && e.weights == fp->second)
        same.push_back(&e);
    const std::string what = network + (network == "unet" ? " (dilation " + std::to_string(dilation) + ")" : "") +
                             (vae ? "" : " " + precision);
    if (same.empty())
      throw Failure(MF_ERROR_ENGINE, "no aoti engine for " + model + " " + what + " in " + folder.root +
                                         "; build it with: " + hint);
    std::vector<const Entry*> valid;
    for (const Entry* e : same)
      if (base_version(e->backend_version) == base_version(torch_version) && e->device == device) valid.push_back(e);
    if (valid.empty()) {
      const Entry* e = same.front();
      const std::string why = base_version(e->backend_version) != base_version(torch_version)
                                  ? "torch " + e->backend_version + " (this library: " + torch_version + ")"
                                  : "device '" + e->device + "' (this one: '" + device + "')";
      throw Failure(MF_ERROR_ENGINE, "engine " + e->describe() + " in " + folder.root + " was built for " + why +
                                         "; rebuild with: " + hint);
    }
    chosen[{network, dilation}] = **std::max_element(
        valid.begin(), valid.end(), [](const Entry* a, const Entry* b) { return a->created < b->created; });
  }
  return chosen;
}

void verify_files(const std::string& root, const Entry& e, bool hashes) {
  if (e.files.empty()) throw Failure(MF_ERROR_ENGINE, "engine " + e.describe() + " lists no files");
  for (const FileRecord& f : e.files) {
    const std::string p = root + "/" + f.path;
    struct stat st {};
    if (stat(p.c_str(), &st) != 0)
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " is missing (" + e.describe() + ")");
    if (static_cast<long long>(st.st_size) != f.size)
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " is " + std::to_string(st.st_size) +
                                         " bytes, the manifest says " + std::to_string(f.size) +
                                         " (truncated or replaced)");
    if (hashes && sha256_file(p) != f.sha256)
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " does not match its sha256 in the manifest");
  }
}

}  // namespace megafusion::lib
