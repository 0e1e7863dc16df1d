#include "manifest.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>

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

// `v`, which must be of `kind`, else std::runtime_error naming `what`.
const mfjson::Value& typed(const mfjson::Value& v, mfjson::Value::Kind kind, const std::string& what) {
  if (v.kind != kind) {
    mfjson::Value want;
    want.kind = kind;
    throw std::runtime_error(what + " is " + v.kind_name() + ", expected " + want.kind_name());
  }
  return v;
}

// An integral number in [lo, hi] (a Python-written manifest has ints there), else std::runtime_error.
long long integral(const mfjson::Value& v, const std::string& what, double lo, double hi) {
  typed(v, mfjson::Value::Number, what);
  if (!(v.num == std::floor(v.num)) || v.num < lo || v.num > hi)
    throw std::runtime_error(what + " is " + v.literal + ", expected an integer in [" +
                             std::to_string(static_cast<long long>(lo)) + ", " +
                             std::to_string(static_cast<long long>(hi)) + "]");
  return static_cast<long long>(v.num);
}

std::vector<long long> dims(const mfjson::Value& v, const std::string& what) {
  std::vector<long long> out;
  for (const auto& d : typed(v, mfjson::Value::Array, what).arr)
    out.push_back(integral(d, what + " dimension", -9007199254740992.0, 9007199254740992.0));
  return out;
}

// EngineKey.from_json(k).to_json() (engine/cache.py): the value whose json.dumps(..., sort_keys=True) the
// entry's digest is the sha256 of. Every field EngineKey has, no other (from_json refuses unknown fields);
// ort_optimize left out when "none" (constants when "inside", quantization when "none"); of each profile only
// stage and shapes, each shape [name, min, opt, max].
// Stricter than Python only where no Python build writes otherwise: names must be strings, dilation and stage
// integers, dimensions integral numbers (written back as they were: 16 as 16, 16.0 as 16.0, as Python does).
mfjson::Value python_key(const mfjson::Value& k) {
  static const std::set<std::string> names = {"model",     "weights", "network",         "variant",
                                              "precision", "backend", "backend_version", "device"};
  typed(k, mfjson::Value::Object, "its key");
  mfjson::Value out;
  out.kind = mfjson::Value::Object;
  for (const char* required : {"model", "weights", "network", "variant", "dilation", "precision", "profiles",
                               "backend", "backend_version", "device"})
    if (!k.has(required)) throw std::runtime_error(std::string("its key has no '") + required + "'");
  for (const auto& [name, v] : k.obj) {
    if (names.count(name)) {
      out.obj[name] = typed(v, mfjson::Value::String, "key field '" + name + "'");
    } else if (name == "dilation") {
      integral(v, "key field 'dilation'", INT_MIN, INT_MAX);
      if (!v.integer) throw std::runtime_error("key field 'dilation' is " + v.literal + ", expected an integer");
      out.obj[name] = v;
    } else if (name == "ort_optimize") {
      if (typed(v, mfjson::Value::String, "key field 'ort_optimize'").str != "none") out.obj[name] = v;
    } else if (name == "constants") {  // "apart": mf-build-engines --weights-apart (left out when "inside")
      if (typed(v, mfjson::Value::String, "key field 'constants'").str != "inside") out.obj[name] = v;
    } else if (name == "quantization") {  // an fp8 UNet's FP8 layers (engine/fp8.py fp8_scheme; left out when "none")
      if (typed(v, mfjson::Value::String, "key field 'quantization'").str != "none") out.obj[name] = v;
    } else if (name == "profiles") {
      mfjson::Value& profiles = out.obj[name];
      profiles.kind = mfjson::Value::Array;
      for (const auto& p : typed(v, mfjson::Value::Array, "key field 'profiles'").arr) {
        const std::string what = "profile " + std::to_string(profiles.arr.size());
        typed(p, mfjson::Value::Object, what);
        mfjson::Value q;
        q.kind = mfjson::Value::Object;
        if (!p.has("stage") || !p.has("shapes")) throw std::runtime_error(what + " lacks 'stage' or 'shapes'");
        integral(p["stage"], what + " stage", INT_MIN, INT_MAX);
        if (!p["stage"].integer) throw std::runtime_error(what + " stage is " + p["stage"].literal);
        q.obj["stage"] = p["stage"];
        mfjson::Value& shapes = q.obj["shapes"];
        shapes.kind = mfjson::Value::Array;
        for (const auto& s : typed(p["shapes"], mfjson::Value::Array, what + " shapes").arr) {
          if (typed(s, mfjson::Value::Array, what + " shape").arr.size() != 4)
            throw std::runtime_error(what + " has a shape of " + std::to_string(s.arr.size()) +
                                     " items, expected [name, min, opt, max]");
          typed(s.arr[0], mfjson::Value::String, what + " input name");
          for (int i = 1; i < 4; ++i) dims(s.arr[i], what + " input " + s.arr[0].str);
          shapes.arr.push_back(s);
        }
        profiles.arr.push_back(std::move(q));
      }
    } else {
      throw std::runtime_error("its key has an unknown field '" + name + "'");
    }
  }
  return out;
}

std::string short_digest(const std::string& d) { return d.substr(0, 16); }

// Problems with an entry's file path as the manifest records it: it must be relative, normalized and stay
// inside the engine folder. "" when it is fine.
std::string path_problem(const std::string& rel) {
  if (rel.empty()) return "is empty";
  if (rel.find('\0') != std::string::npos) return "holds a NUL byte";
  if (rel[0] == '/') return "is absolute";
  size_t start = 0;
  while (true) {
    const size_t end = rel.find('/', start);
    const std::string part = rel.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (part == "..") return "has a '..' component";
    if (part.empty() || part == ".") return "is not a normalized relative path";
    if (end == std::string::npos) return "";
    start = end + 1;
  }
}

std::string entry_name(const Entry& e) { return e.describe() + ", entry " + short_digest(e.digest); }

Entry parse_entry(const mfjson::Value& e, const std::string& manifest) {
  typed(e, mfjson::Value::Object, "the entry");
  Entry out;
  out.digest = typed(e["digest"], mfjson::Value::String, "its digest").str;
  const mfjson::Value key = python_key(e["key"]);
  const auto& k = e["key"];
  out.model = k["model"].str;
  out.weights = k["weights"].str;
  out.network = k["network"].str;
  out.variant = k["variant"].str;
  out.dilation = static_cast<int>(k["dilation"].num);
  out.precision = k["precision"].str;
  out.backend = k["backend"].str;
  out.backend_version = k["backend_version"].str;
  out.device = k["device"].str;
  if (key.has("constants")) out.constants = key["constants"].str;
  out.created = typed(e["created"], mfjson::Value::Number, "its created time").num;
  for (const auto& p : key["profiles"].arr) {
    Profile profile{static_cast<int>(p["stage"].num), {}};
    for (const auto& s : p["shapes"].arr)
      profile.shapes.push_back({s[0].str, dims(s[1], "min"), dims(s[2], "opt"), dims(s[3], "max")});
    out.profiles.push_back(std::move(profile));
  }
  if (!out.profiles.empty()) out.range = out.profiles.front().shapes;
  for (const auto& f : typed(e["files"], mfjson::Value::Array, "its files").arr) {
    typed(f, mfjson::Value::Object, "a file record");
    out.files.push_back({typed(f["path"], mfjson::Value::String, "a file path").str,
                         typed(f["sha256"], mfjson::Value::String, "a file sha256").str,
                         integral(f["size"], "a file size", 0, 9007199254740992.0)});
  }
  // The digest is the entry's address: recomputed as Python computes it, so an edited key (a widened profile,
  // another device) cannot pass for the build it claims to be.
  const std::string actual = sha256_bytes(mfjson::python_dumps(key));
  if (actual != out.digest)
    throw Failure(MF_ERROR_ENGINE, "engine manifest " + manifest + ": entry " + short_digest(out.digest) + " (" +
                                       out.describe() + ") does not match its key (the key hashes to " +
                                       short_digest(actual) + "); the manifest was edited or is corrupt: rebuild "
                                       "with mf-build-engines");
  for (const FileRecord& f : out.files)
    if (const std::string why = path_problem(f.path); !why.empty())
      throw Failure(MF_ERROR_ENGINE, "engine manifest " + manifest + ": entry " + short_digest(out.digest) + " (" +
                                         out.describe() + ") lists file '" + f.path + "', which " + why +
                                         "; engine files must lie inside the engine folder");
  return out;
}

// A word as a POSIX shell reads it back: as is when plain, else in single quotes.
std::string shell_word(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:=@%+,")
                        == std::string::npos)
    return s;
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// The mf-build-engines command that builds what is missing, as Python's engine/load.py build_command words it:
// the weights' source from models.json (random weights and their seed, or the model folder) and the precision.
std::string build_hint(const std::string& model, const std::string& device, const std::string& root,
                       const std::string& backend, const std::string& precision, const std::string& source,
                       const std::string& stages = "") {
  std::string weights;
  if (source.rfind("random:", 0) == 0) {
    const std::string seed = source.substr(7);
    if (model.rfind("tiny-", 0) != 0) weights += " --random-weights";  // tiny models are always random
    if (seed != "0") weights += " --weights-seed " + shell_word(seed);
  } else if (!source.empty()) {
    weights = " --model-path " + shell_word(source);
  }
  return "mf-build-engines --model " + model + weights + (stages.empty() ? "" : " --stages " + shell_word(stages)) +
         " --backend " + backend +
         (precision.empty() ? "" : " --precision " + precision) + " --device " +
         (device == "cpu" ? "cpu" : "cuda") + " --output " + shell_word(root);
}

// The first `n` dot-separated parts of a version, local suffix dropped: "10.13.3.9" -> "10.13.3".
std::string release(const std::string& v, int n) {
  const std::string base = base_version(v);
  size_t end = 0;
  for (int i = 0; i < n; ++i) {
    end = base.find('.', i == 0 ? 0 : end + 1);
    if (end == std::string::npos) return base;
  }
  return base.substr(0, end);
}

// AOTInductor packages are tied to the torch release; TensorRT plans to the TensorRT release (the build
// number may differ between the Python wheel's version and the C++ library's).
bool same_release(const std::string& backend, const std::string& recorded, const std::string& library) {
  if (backend == "tensorrt") return release(recorded, 3) == release(library, 3);
  return base_version(recorded) == base_version(library);
}

// One record of models.json's image_encoders (engine/image_encoder_engines.py record_image_encoder).
ModelFacts::ImageEncoderFacts image_encoder_facts(const mfjson::Value& rec) {
  ModelFacts::ImageEncoderFacts f;
  f.source = rec["source"].str;
  f.image_size = static_cast<long long>(rec["image_size"].num);
  f.projection_dim = static_cast<long long>(rec["projection_dim"].num);
  const mfjson::Value& p = rec["preprocess"];
  f.do_resize = p["do_resize"].b, f.do_center_crop = p["do_center_crop"].b;
  f.do_rescale = p["do_rescale"].b, f.do_normalize = p["do_normalize"].b;
  const mfjson::Value& size = p["size"];
  auto num = [](const mfjson::Value& o, const char* k) { return o.has(k) ? static_cast<long long>(o[k].num) : 0LL; };
  f.shortest_edge = num(size, "shortest_edge");
  f.resize_height = num(size, "height"), f.resize_width = num(size, "width");
  f.crop_height = num(p["crop_size"], "height"), f.crop_width = num(p["crop_size"], "width");
  f.resample = static_cast<int>(p["resample"].num);
  f.rescale_factor = p["rescale_factor"].num;
  for (int c = 0; c < 3; ++c) f.mean[c] = p["image_mean"].arr.at(c).num, f.std[c] = p["image_std"].arr.at(c).num;
  return f;
}

}  // namespace

std::string shape_text(const std::vector<long long>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

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
    for (const auto& e : typed(m["entries"], mfjson::Value::Array, "its entries").arr) {
      try {
        out.entries.push_back(parse_entry(e, manifest));
      } catch (const Failure&) {
        throw;
      } catch (const std::exception& x) {
        const std::string digest = e.has("digest") && e["digest"].kind == mfjson::Value::String
                                       ? " " + short_digest(e["digest"].str)
                                       : "";
        throw std::runtime_error("entry " + std::to_string(out.entries.size()) + digest + ": " + x.what());
      }
    }
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
      if (v.obj.count("vae_shift_factor")) facts.vae_shift_factor = v["vae_shift_factor"].num;
      for (const auto& [net, fp] : v["weights"].obj) facts.weights[net] = fp.str;
      for (const auto& n : v["vocab_sizes"].arr) facts.vocab_sizes.push_back(static_cast<long long>(n.num));
      if (v.obj.count("source") && v["source"].kind == mfjson::Value::String) facts.source = v["source"].str;
      if (v.obj.count("controlnets"))
        for (const auto& [cn, rec] : v["controlnets"].obj) {
          facts.controlnets[cn] = {rec["weights"].str, rec["source"].str};
          if (!rec.has("outputs")) continue;  // a UNet family's ControlNet, or one recorded before the facts
          ModelFacts::FlowControlFacts& fc = facts.flow_controls[rec["weights"].str];
          for (const auto& o : rec["outputs"].arr) fc.outputs.push_back(o.str);
          fc.zero_pooled = rec.has("zero_pooled") && rec["zero_pooled"].b;
          fc.hint_block = rec.has("hint_block") && rec["hint_block"].b;
        }
      if (v.has("image_encoders"))
        for (const auto& [fp, rec] : v["image_encoders"].obj) facts.image_encoders[fp] = image_encoder_facts(rec);
      out.models[name] = facts;
    }
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    throw Failure(MF_ERROR_ENGINE, "model facts file " + models + " is corrupt (" + e.what() + ")");
  }
  return out;
}

std::map<std::pair<std::string, int>, std::vector<Entry>> select_entry_sets(
    const EngineFolder& folder, const std::string& model, const std::vector<std::pair<std::string, int>>& wanted,
    const std::string& precision, const std::string& device, const std::string& backend_version,
    const std::string& backend) {
  auto facts = folder.models.find(model);
  const std::string hint = build_hint(model, device, folder.root, backend, precision,
                                      facts == folder.models.end() ? "" : facts->second.source);
  if (facts == folder.models.end())
    throw Failure(MF_ERROR_ENGINE, "no " + model + " engines in " + folder.root + "; build them with: " + hint);
  std::map<std::pair<std::string, int>, std::vector<Entry>> chosen;
  for (const auto& [network, dilation] : wanted) {
    const bool vae = network == "vae_decoder" || network == "vae_encoder";
    auto fp = facts->second.weights.find(network);
    std::vector<const Entry*> same;
    for (const Entry& e : folder.entries)
      if (e.model == model && e.backend == backend && e.network == network && e.dilation == dilation &&
          (vae || e.precision == precision) && fp != facts->second.weights.end() && e.weights == fp->second)
        same.push_back(&e);
    const std::string what = network + (network == "unet" ? " (dilation " + std::to_string(dilation) + ")" : "") +
                             (vae ? "" : " " + precision);
    if (same.empty())
      throw Failure(MF_ERROR_ENGINE, "no " + backend + " engine for " + model + " " + what + " in " + folder.root +
                                         "; build it with: " + hint);
    std::vector<const Entry*> valid;
    for (const Entry* e : same)
      if (same_release(backend, e->backend_version, backend_version) && e->device == device) valid.push_back(e);
    if (valid.empty()) {
      const Entry* e = same.front();
      const std::string library = backend == "tensorrt" ? "TensorRT " : "torch ";
      const std::string why = !same_release(backend, e->backend_version, backend_version)
                                  ? library + e->backend_version + " (this library: " + backend_version + ")"
                                  : "device '" + e->device + "' (this one: '" + device + "')";
      throw Failure(MF_ERROR_ENGINE, "engine " + e->describe() + " in " + folder.root + " was built for " + why +
                                         "; rebuild with: " + hint);
    }
    // Newest first; stable, so entries created at the same time keep the manifest's order.
    std::stable_sort(valid.begin(), valid.end(), [](const Entry* a, const Entry* b) { return a->created > b->created; });
    std::vector<Entry>& out = chosen[{network, dilation}];
    for (const Entry* e : valid) out.push_back(*e);
  }
  return chosen;
}

std::map<std::pair<std::string, int>, Entry> select_entries(const EngineFolder& folder, const std::string& model,
                                                            const std::vector<std::pair<std::string, int>>& wanted,
                                                            const std::string& precision, const std::string& device,
                                                            const std::string& backend_version,
                                                            const std::string& backend) {
  std::map<std::pair<std::string, int>, Entry> newest;
  for (auto& [key, entries] : select_entry_sets(folder, model, wanted, precision, device, backend_version, backend))
    newest[key] = entries.front();
  return newest;
}

std::string choose_backend(const EngineFolder& folder, const std::string& model, bool cuda, bool with_tensorrt) {
  auto has_unet = [&](const std::string& backend) {
    return std::any_of(folder.entries.begin(), folder.entries.end(), [&](const Entry& e) {
      return e.model == model && e.backend == backend && e.network == "unet";
    });
  };
  if (!has_unet("tensorrt")) return "aoti";
  if (cuda && with_tensorrt) return "tensorrt";
  if (has_unet("aoti")) return "aoti";
  auto facts = folder.models.find(model);
  const std::string aoti = build_hint(model, cuda ? "cuda" : "cpu", folder.root, "aoti", "",
                                      facts == folder.models.end() ? "" : facts->second.source);
  if (!with_tensorrt)
    throw Failure(MF_ERROR_ENGINE, "the " + model + " engines in " + folder.root +
                                       " are TensorRT engines, and this libmegafusion was built without TensorRT "
                                       "support; rebuild libmegafusion where CMake finds TensorRT and CUDA "
                                       "(-DTENSORRT_ROOT=<TensorRT folder>)" +
                                       (cuda ? "" : " and open them with device cuda") +
                                       ", or build AOTInductor engines with: " + aoti);
  throw Failure(MF_ERROR_ENGINE, "the " + model + " engines in " + folder.root +
                                     " are TensorRT engines, which run on CUDA only; open them with device cuda, "
                                     "or build AOTInductor engines with: " + aoti);
}

bool holds(const TensorRange& r, const std::vector<long long>& shape) {
  if (shape.size() != r.min.size() || shape.size() != r.max.size()) return false;
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] < r.min[i] || shape[i] > r.max[i]) return false;
  return true;
}

size_t select_profile(const std::vector<Profile>& profiles,
                      const std::vector<std::pair<std::string, std::vector<long long>>>& shapes) {
  for (size_t i = 0; i < profiles.size(); ++i) {
    const bool fits = std::all_of(profiles[i].shapes.begin(), profiles[i].shapes.end(), [&](const TensorRange& r) {
      auto s = std::find_if(shapes.begin(), shapes.end(), [&](const auto& named) { return named.first == r.name; });
      return s != shapes.end() && holds(r, s->second);
    });
    if (fits) return i;
  }
  std::string given;
  for (const auto& [name, shape] : shapes) given += (given.empty() ? "" : ", ") + name + ": " + shape_text(shape);
  throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "no optimization profile serves shapes {" + given + "}");
}

std::string plan_build_hint(const EngineFolder& folder, const std::string& model, const std::string& device,
                            const std::string& backend, const std::string& precision, const std::string& stages) {
  auto facts = folder.models.find(model);
  return build_hint(model, device, folder.root, backend, precision,
                    facts == folder.models.end() ? "" : facts->second.source, stages);
}

std::string served_sizes(const Entry& e, long long k) {
  auto side = [&](const std::vector<long long>& s) {
    return std::to_string(s[s.size() - 1] * k) + "x" + std::to_string(s[s.size() - 2] * k);
  };
  auto spatial = [](const std::vector<long long>& s) { return s.size() >= 2; };
  if (e.backend == "aoti") {
    if (e.range.empty() || !spatial(e.range[0].min) || !spatial(e.range[0].max)) return "no image size";
    const TensorRange& r = e.range[0];
    const std::string lo = side(r.min), hi = side(r.max);
    return lo == hi ? lo : lo + " to " + hi;  // a static package: one size
  }
  std::string out;
  for (const Profile& p : e.profiles)
    if (!p.shapes.empty() && p.shapes[0].opt.size() == 4) out += (out.empty() ? "" : ", ") + side(p.shapes[0].opt);
  return out.empty() ? "no image size" : out;
}

size_t pick_entry(const std::vector<Entry>& entries,
                  const std::vector<std::pair<std::string, std::vector<long long>>>& shapes, long long k,
                  const std::string& where, const std::string& hint) {
  if (entries.empty()) throw Failure(MF_ERROR_ENGINE, where + " hold no engine for this network; build them with: " + hint);
  // Every profile of every entry, in order, so select_profile's first fit is the newest entry that fits.
  std::vector<Profile> all;
  std::vector<size_t> owner;
  for (size_t i = 0; i < entries.size(); ++i)
    for (const Profile& p : entries[i].profiles) all.push_back(p), owner.push_back(i);
  try {
    return owner.at(select_profile(all, shapes));
  } catch (const Failure&) {
  }
  const std::vector<long long>& s = shapes.at(0).second;
  const std::string size = s.size() >= 2 ? std::to_string(s[s.size() - 1] * k) + "x" + std::to_string(s[s.size() - 2] * k)
                                         : shape_text(s);
  std::vector<std::string> seen;
  std::string have;
  for (const Entry& e : entries) {
    const std::string sizes = served_sizes(e, k);
    if (std::find(seen.begin(), seen.end(), sizes) != seen.end()) continue;
    seen.push_back(sizes);
    have += (have.empty() ? "" : ", ") + sizes;
  }
  throw Failure(MF_ERROR_UNSUPPORTED_SIZE, where + " do not cover " + entries.front().describe() + " at " + size +
                                               " (input " + shapes.at(0).first + " " + shape_text(s) +
                                               "); they cover " + have + ". Build them with: " + hint);
}

namespace {

// Hashes verify_files has computed (tests: a second open of unchanged files computes none).
size_t g_files_hashed = 0;
// Files whose hash came from the folder's records (file-hashes.json) instead.
size_t g_files_remembered = 0;
constexpr const char* kFileHashes = "file-hashes.json";  // engine/file_hashes.py HASHES
constexpr int kFileHashesFormat = 1;                      // engine/file_hashes.py FORMAT

// The sha256 of each file verify_files hashed, with the stat facts it had then; a file whose facts are all
// unchanged is not hashed again. In memory, per process (the records kept across processes are the folder's
// file-hashes.json, below).
struct Verified {
  dev_t dev;
  ino_t ino;
  off_t size;
  long long mtime_ns, ctime_ns;
  std::string sha256;
};
std::mutex g_verified_mutex;
std::map<std::string, Verified> g_verified;  // by canonical path

// File timestamps tick coarsely (a few ms; whole seconds on some file systems), so a file changed in the same
// tick as it was hashed would keep its facts. Only files unchanged for longer than this are cached.
constexpr long long kRacyNs = 2'000'000'000;

long long ns(const struct timespec& t) { return static_cast<long long>(t.tv_sec) * 1'000'000'000 + t.tv_nsec; }

bool same_facts(const Verified& v, const struct stat& st) {
  return v.dev == st.st_dev && v.ino == st.st_ino && v.size == st.st_size && v.mtime_ns == ns(st.st_mtim) &&
         v.ctime_ns == ns(st.st_ctim);
}

std::string file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISLNK(m)) return "a symbolic link";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m) || S_ISBLK(m)) return "a device";
  return "not a regular file";
}

std::string real_path(const std::string& p) {
  char* r = ::realpath(p.c_str(), nullptr);
  if (!r) return "";
  std::string out(r);
  std::free(r);
  return out;
}

// Records of hashes across processes, in the engine folder's file-hashes.json (engine/file_hashes.py's format,
// which mf-build-engines and Python's runs write too): path (os.path.abspath) -> {"stat": [size, mtime_ns,
// ctime_ns, inode, device], "sha256"}. A record is kept only for a file last changed well before it was read, and
// any later write or replacement changes ctime or the inode, so a record whose stat matches is the file's hash: a
// built SDXL folder's 10.5 GB are not read again by every process (C++ read them all on the H200, where its first
// generation took 68 s against Python's 9 s). The records are a cache: missing, unreadable or malformed, they
// count as empty.
std::string record_key(const std::string& p) { return std::filesystem::absolute(p).lexically_normal().string(); }

std::array<long long, 5> record_stat(const struct stat& st) {
  return {static_cast<long long>(st.st_size), ns(st.st_mtim), ns(st.st_ctim), static_cast<long long>(st.st_ino),
          static_cast<long long>(st.st_dev)};
}

// The records of root's file-hashes.json (an empty object when it is missing, malformed or of another format).
mfjson::Value read_records(const std::string& root) {
  mfjson::Value files;
  files.kind = mfjson::Value::Object;
  std::ifstream in(root + "/" + kFileHashes);
  if (!in) return files;
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    mfjson::Value all = mfjson::parse(ss.str());
    if (all.has("format") && all["format"].as_int() == kFileHashesFormat && all.has("files") &&
        all["files"].kind == mfjson::Value::Object)
      return std::move(all.obj["files"]);
  } catch (const std::exception&) {
  }
  return files;
}

// The remembered sha256 of the file `p` when its record's stat is `st`'s, else "". `records`: root's records,
// read at the first call of a verify_files and kept for its other files.
std::string remembered_sha256(const std::string& root, const std::string& p, const struct stat& st,
                              std::optional<mfjson::Value>& records) {
  if (!records) records = read_records(root);
  const mfjson::Value& files = *records;
  const std::string key = record_key(p);
  if (!files.has(key) || !files[key].has("stat") || !files[key].has("sha256")) return "";
  const mfjson::Value& sig = files[key]["stat"];
  const std::array<long long, 5> want = record_stat(st);
  if (sig.kind != mfjson::Value::Array || sig.size() != want.size()) return "";
  for (size_t i = 0; i < want.size(); ++i)  // integers compared as written: nanosecond times exceed a double's
    if (!sig[i].integer || sig[i].literal != std::to_string(want[i])) return "";
  const mfjson::Value& sha = files[key]["sha256"];
  return sha.kind == mfjson::Value::String && sha.str.size() == 64 ? sha.str : "";
}

mfjson::Value integer(long long x) {
  mfjson::Value v;
  v.kind = mfjson::Value::Number;
  v.integer = true;
  v.literal = std::to_string(x);
  v.num = static_cast<double>(x);
  return v;
}

// Adds the record of `p` (hashed as `sha`, its stat `st`) to root's file-hashes.json as Python's FileHashes.save
// does: under the same lock file, merged with the records there (those of files gone dropped), written to a temp
// file and renamed over, so Python and every process read the old records or the new ones. A C++-only server
// then reads no engine file at its next start either. A folder that cannot be written keeps nothing.
void remember_sha256(const std::string& root, const std::string& p, const struct stat& st, const std::string& sha) {
  const int lock = ::open((root + "/." + kFileHashes + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock < 0) return;
  if (flock(lock, LOCK_EX) != 0) {
    ::close(lock);
    return;
  }
  mfjson::Value files;
  files.kind = mfjson::Value::Object;
  for (auto& [k, v] : read_records(root).obj)
    if (v.kind == mfjson::Value::Object && access(k.c_str(), F_OK) == 0) files.obj[k] = std::move(v);
  mfjson::Value& rec = files.obj[record_key(p)];
  rec = mfjson::Value{};
  rec.kind = mfjson::Value::Object;
  rec.obj["stat"].kind = mfjson::Value::Array;
  for (long long x : record_stat(st)) rec.obj["stat"].arr.push_back(integer(x));
  rec.obj["sha256"].kind = mfjson::Value::String;
  rec.obj["sha256"].str = sha;
  mfjson::Value records;
  records.kind = mfjson::Value::Object;
  records.obj["format"] = integer(kFileHashesFormat);
  records.obj["files"] = std::move(files);
  const std::string text = mfjson::python_dumps(records);
  const std::string path = root + "/" + kFileHashes;
  const std::string tmp = root + "/." + kFileHashes + "." + std::to_string(getpid()) + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  bool ok = fd >= 0;
  if (ok) {
    ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && fsync(fd) == 0;
    ::close(fd);
    ok = ok && std::rename(tmp.c_str(), path.c_str()) == 0;
  }
  if (!ok) ::unlink(tmp.c_str());
  flock(lock, LOCK_UN);
  ::close(lock);
}

// The sha256 of the regular file `p` (lstat facts `st`) in the engine folder `root`: from this process's cache
// or the folder's records when the facts are unchanged, else read (and recorded). Opened without following links and checked to be
// the file lstat saw, and unchanged while it was read.
std::string file_sha256(const std::string& root, const std::string& p, const std::string& canonical,
                        const struct stat& st, const std::string& who, std::optional<mfjson::Value>& records) {
  {
    std::lock_guard<std::mutex> lock(g_verified_mutex);
    auto it = g_verified.find(canonical);
    if (it != g_verified.end() && same_facts(it->second, st)) return it->second.sha256;
  }
  if (std::string known = remembered_sha256(root, p, st, records); !known.empty()) {
    std::lock_guard<std::mutex> lock(g_verified_mutex);
    ++g_files_remembered;
    return known;
  }
  struct timespec now {};
  clock_gettime(CLOCK_REALTIME, &now);
  const int fd = ::open(p.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    throw Failure(MF_ERROR_ENGINE, "engine file " + p + " cannot be opened (" + std::strerror(errno) + ") (" + who + ")");
  struct stat before {}, after {};
  std::string sha;
  try {
    if (fstat(fd, &before) != 0 || !S_ISREG(before.st_mode) || before.st_dev != st.st_dev ||
        before.st_ino != st.st_ino)
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " changed while it was being verified (" + who + ")");
    sha = sha256_fd(fd);
    if (fstat(fd, &after) != 0 || after.st_size != before.st_size || ns(after.st_mtim) != ns(before.st_mtim) ||
        ns(after.st_ctim) != ns(before.st_ctim))
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " changed while it was being verified (" + who + ")");
  } catch (const Failure&) {
    ::close(fd);
    throw;
  } catch (const std::exception& e) {
    ::close(fd);
    throw Failure(MF_ERROR_ENGINE, "engine file " + p + " cannot be read (" + e.what() + ") (" + who + ")");
  }
  ::close(fd);
  const bool settled = std::max(ns(after.st_mtim), ns(after.st_ctim)) + kRacyNs <= ns(now);
  {
    std::lock_guard<std::mutex> lock(g_verified_mutex);
    ++g_files_hashed;
    if (settled)
      g_verified[canonical] = {after.st_dev, after.st_ino, after.st_size, ns(after.st_mtim), ns(after.st_ctim), sha};
    else
      g_verified.erase(canonical);
  }
  if (settled) remember_sha256(root, p, after, sha);
  return sha;
}

}  // namespace

size_t files_hashed() {
  std::lock_guard<std::mutex> lock(g_verified_mutex);
  return g_files_hashed;
}

size_t files_remembered() {
  std::lock_guard<std::mutex> lock(g_verified_mutex);
  return g_files_remembered;
}

void verify_files(const std::string& root, const Entry& e) {
  if (e.files.empty()) throw Failure(MF_ERROR_ENGINE, "engine " + e.describe() + " lists no files");
  const std::string who = entry_name(e);
  const std::string root_real = real_path(root);
  if (root_real.empty()) throw Failure(MF_ERROR_ENGINE, "engine folder '" + root + "' does not exist");
  std::optional<mfjson::Value> records;  // file-hashes.json, read once for all the entry's files
  for (const FileRecord& f : e.files) {
    if (const std::string why = path_problem(f.path); !why.empty())
      throw Failure(MF_ERROR_ENGINE, "engine " + e.describe() + " (entry " + short_digest(e.digest) +
                                         ") lists file '" + f.path + "', which " + why +
                                         "; engine files must lie inside the engine folder");
    const std::string p = root + "/" + f.path;
    // Every component below the root through lstat: no link is followed, so the file is the one in the folder.
    struct stat st {};
    for (size_t slash = f.path.find('/'); ; slash = f.path.find('/', slash + 1)) {
      const bool last = slash == std::string::npos;
      const std::string q = root + "/" + f.path.substr(0, last ? std::string::npos : slash);
      if (lstat(q.c_str(), &st) != 0) {
        if (errno == ENOENT || errno == ENOTDIR)
          throw Failure(MF_ERROR_ENGINE, "engine file " + p + " is missing (" + who + ")");
        throw Failure(MF_ERROR_ENGINE, "engine file " + p + " cannot be read (" + std::strerror(errno) + ") (" +
                                           who + ")");
      }
      if (S_ISLNK(st.st_mode))
        throw Failure(MF_ERROR_ENGINE, "engine file " + p + (last ? "" : ": " + q) +
                                           " is a symbolic link (" + who +
                                           "); engine folders hold regular files only, rebuild with mf-build-engines");
      if (last) break;
      if (!S_ISDIR(st.st_mode))
        throw Failure(MF_ERROR_ENGINE, "engine file " + p + " is missing (" + q + " is " + file_kind(st.st_mode) +
                                           ") (" + who + ")");
    }
    if (!S_ISREG(st.st_mode))
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " is " + file_kind(st.st_mode) + ", not a regular file (" +
                                         who + ")");
    const std::string real = real_path(p);
    if (real.compare(0, root_real.size() + 1, root_real + "/") != 0)
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " resolves to '" + real + "', outside the engine folder " +
                                         root_real + " (" + who + ")");
    if (static_cast<long long>(st.st_size) != f.size)
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " is " + std::to_string(st.st_size) +
                                         " bytes, the manifest says " + std::to_string(f.size) +
                                         " (truncated or replaced) (" + who + ")");
    if (file_sha256(root, p, real, st, who, records) != f.sha256)
      throw Failure(MF_ERROR_ENGINE, "engine file " + p + " does not match its sha256 in the manifest (" + who +
                                         "): replaced or corrupt; rebuild with mf-build-engines");
  }
}

}  // namespace megafusion::lib
