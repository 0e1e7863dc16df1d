// The engine folder reader without libtorch: SHA-256 against FIPS 180-4 examples, and every way a folder can
// be unusable (missing, corrupt or foreign manifest, stale entries, missing or altered files) gives
// Failure(MF_ERROR_ENGINE) with a message naming the file or value. TensorRT entries: every profile read,
// the profile a call runs (engine/tensorrt_backend.py select_profile) and the backend a context picks.
// Usage: megafusion_engines_test SCRATCH_DIR
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "../src/lib/manifest.hpp"
#include "../src/lib/sha256.hpp"

using namespace megafusion::lib;

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  g_failures += !ok;
}

template <typename F>
void expect_failure(const std::string& what, const std::string& needle, F&& f, mf_status code = MF_ERROR_ENGINE) {
  try {
    f();
    check(false, what + ": no error");
  } catch (const Failure& e) {
    const std::string msg = e.what();
    check(e.code == code && msg.find(needle) != std::string::npos, what + ": " + msg);
  }
}

void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string entry_json(const std::string& version, const std::string& device, const std::string& sha, int size) {
  return R"({"digest": "d1", "created": 5.0, "key": {"model": "tiny-sd15", "weights": "w1", "network": "unet",
    "variant": "standard", "dilation": 1, "precision": "fp32", "backend": "aoti", "backend_version": ")" +
         version + R"(", "device": ")" + device + R"(", "profiles": [{"stage": 0, "shapes": [["sample", [1, 4, 16, 16],
    [2, 4, 16, 16], [2, 4, 32, 32]]]}]}, "files": [{"path": "e1/model.pt2", "sha256": ")" + sha +
         R"(", "size": )" + std::to_string(size) + "}]}";
}

// A TensorRT UNet with one profile per stage: 128 px (latent 16) and 256 px (latent 32), batch 1 to 2.
std::string trt_entry_json() {
  return R"({"digest": "d2", "created": 6.0, "key": {"model": "tiny-sd15", "weights": "w1", "network": "unet",
    "variant": "standard", "dilation": 1, "precision": "fp16", "backend": "tensorrt", "backend_version": "10.13.3.9",
    "device": "NVIDIA H100 80GB HBM3", "profiles": [
      {"stage": 0, "shapes": [["sample", [1, 4, 16, 16], [2, 4, 16, 16], [2, 4, 16, 16]],
                              ["timestep", [1], [1], [1]]]},
      {"stage": 1, "shapes": [["sample", [1, 4, 32, 32], [2, 4, 32, 32], [2, 4, 32, 32]],
                              ["timestep", [1], [1], [1]]]}]},
    "files": [{"path": "e2/engine.plan", "sha256": "x", "size": 1}]})";
}

using Shapes = std::vector<std::pair<std::string, std::vector<long long>>>;

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return std::cerr << "usage: megafusion_engines_test SCRATCH_DIR\n", 2;
  const std::string dir = argv[1];
  std::system(("rm -rf '" + dir + "' && mkdir -p '" + dir + "/e1'").c_str());

  check(sha256_bytes("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");
  check(sha256_bytes("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256('abc')");
  check(sha256_bytes("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "sha256 of 448 bits (two blocks of padding)");

  expect_failure("missing folder", dir + "/nope", [&] { read_engine_folder(dir + "/nope"); });
  expect_failure("missing manifest", "manifest.json is missing", [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": [");
  expect_failure("truncated manifest", "manifest.json is corrupt", [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 7, \"entries\": []}");
  write(dir + "/models.json", "{\"format\": 1, \"models\": {}}");
  expect_failure("other manifest format", "has format 7", [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": [{\"digest\": 3}]}");
  expect_failure("entry without key", "manifest.json is corrupt", [&] { read_engine_folder(dir); });

  write(dir + "/e1/model.pt2", "abc");
  const std::string sha = sha256_bytes("abc");
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": [" + entry_json("2.13.0+cpu", "cpu", sha, 3) + "]}");
  write(dir + "/models.json", "{\"format\": 1, \"models\": {");
  expect_failure("corrupt model facts", "models.json is corrupt", [&] { read_engine_folder(dir); });
  write(dir + "/models.json", R"({"format": 1, "models": {"tiny-sd15": {"vae_scaling_factor": 0.18215,
    "weights": {"unet": "w1"}, "vocab_sizes": [1000]}}})");
  const EngineFolder f = read_engine_folder(dir);
  check(f.entries.size() == 1 && f.models.at("tiny-sd15").vae_scaling_factor == 0.18215 &&
            f.models.at("tiny-sd15").vocab_sizes.at(0) == 1000,
        "valid folder read");
  const Entry& e = f.entries.at(0);
  check(e.range.at(0).name == "sample" && e.range[0].max.at(3) == 32 && e.files.at(0).size == 3, "entry fields");
  check(e.profiles.size() == 1 && e.profiles[0].stage == 0 && e.profiles[0].shapes.at(0).max == e.range[0].max,
        "an AOTInductor entry: one profile, its range");
  const std::vector<std::pair<std::string, int>> unet = {{"unet", 1}};
  check(select_entries(f, "tiny-sd15", unet, "fp32", "cpu", "2.13.0").size() == 1, "select: same torch release");
  expect_failure("other torch", "was built for torch 2.13.0+cpu (this library: 2.12.0)",
                 [&] { select_entries(f, "tiny-sd15", unet, "fp32", "cpu", "2.12.0"); });
  expect_failure("other device", "device 'cpu' (this one: 'NVIDIA H100 80GB HBM3')",
                 [&] { select_entries(f, "tiny-sd15", unet, "fp32", "NVIDIA H100 80GB HBM3", "2.13.0"); });
  expect_failure("other precision", "no aoti engine for tiny-sd15 unet (dilation 1) fp16",
                 [&] { select_entries(f, "tiny-sd15", unet, "fp16", "cpu", "2.13.0"); });
  expect_failure("dilated variant not built", "unet (dilation 2)",
                 [&] { select_entries(f, "tiny-sd15", {{"unet", 2}}, "fp32", "cpu", "2.13.0"); });
  expect_failure("other model", "no sdxl engines", [&] { select_entries(f, "sdxl", unet, "fp16", "cpu", "2.13.0"); });

  verify_files(dir, e, true);
  check(true, "verify_files on intact files");
  write(dir + "/e1/model.pt2", "abd");
  verify_files(dir, e, false);  // same size: only the hash tells
  expect_failure("altered file", "does not match its sha256", [&] { verify_files(dir, e, true); });
  write(dir + "/e1/model.pt2", "ab");
  expect_failure("truncated file", "is 2 bytes, the manifest says 3", [&] { verify_files(dir, e, false); });
  std::remove((dir + "/e1/model.pt2").c_str());
  expect_failure("missing file", "model.pt2 is missing", [&] { verify_files(dir, e, false); });

  // TensorRT: all profiles kept, range still the first.
  const std::string trt = dir + "/trt";
  std::system(("mkdir -p '" + trt + "'").c_str());
  write(trt + "/models.json", R"({"format": 1, "models": {"tiny-sd15": {"vae_scaling_factor": 0.18215,
    "weights": {"unet": "w1"}, "vocab_sizes": [1000]}}})");
  write(trt + "/manifest.json", "{\"format\": 1, \"entries\": [" + trt_entry_json() + "]}");
  const EngineFolder t = read_engine_folder(trt);
  const Entry& te = t.entries.at(0);
  check(te.profiles.size() == 2 && te.profiles[1].stage == 1 && te.profiles[1].shapes.at(0).min.at(2) == 32 &&
            te.range.at(0).max.at(2) == 16,
        "TensorRT entry: every profile read, range = the first");

  // select_profile: the first profile holding every input, by name.
  const std::vector<long long> one = {1};
  check(select_profile(te.profiles, {{"sample", {2, 4, 16, 16}}, {"timestep", one}}) == 0, "profile: stage 0 size");
  check(select_profile(te.profiles, {{"timestep", one}, {"sample", {1, 4, 32, 32}}}) == 1,
        "profile: stage 1 size, inputs in any order");
  std::vector<Profile> overlapping = te.profiles;
  overlapping[1].shapes[0].min = {1, 4, 16, 16};
  check(select_profile(overlapping, {{"sample", {2, 4, 16, 16}}, {"timestep", one}}) == 0,
        "profile: the first of two that hold the shapes");
  check(select_profile(overlapping, {{"sample", {2, 4, 24, 24}}, {"timestep", one}}) == 1,
        "profile: only the second holds the shapes");
  expect_failure("profile: no size matches",
                 "no optimization profile serves shapes {sample: (2, 4, 24, 24), timestep: (1)}",
                 [&] { select_profile(te.profiles, {{"sample", {2, 4, 24, 24}}, {"timestep", one}}); },
                 MF_ERROR_UNSUPPORTED_SIZE);
  expect_failure("profile: batch too large", "sample: (3, 4, 16, 16)",
                 [&] { select_profile(te.profiles, {{"sample", {3, 4, 16, 16}}, {"timestep", one}}); },
                 MF_ERROR_UNSUPPORTED_SIZE);
  expect_failure("profile: other rank", "sample: (4, 16, 16)",
                 [&] { select_profile(te.profiles, {{"sample", {4, 16, 16}}, {"timestep", one}}); },
                 MF_ERROR_UNSUPPORTED_SIZE);
  expect_failure("profile: an input missing", "{sample: (2, 4, 16, 16)}",
                 [&] { select_profile(te.profiles, Shapes{{"sample", {2, 4, 16, 16}}}); }, MF_ERROR_UNSUPPORTED_SIZE);

  // select_entries for tensorrt: the TensorRT release (major.minor.patch) must match, the build may differ.
  const std::string h100 = "NVIDIA H100 80GB HBM3";
  check(select_entries(t, "tiny-sd15", unet, "fp16", h100, "10.13.3", "tensorrt").at({"unet", 1}).digest == "d2",
        "select tensorrt: same TensorRT release");
  expect_failure("tensorrt: other release", "was built for TensorRT 10.13.3.9 (this library: 10.12.0)",
                 [&] { select_entries(t, "tiny-sd15", unet, "fp16", h100, "10.12.0", "tensorrt"); });
  expect_failure("tensorrt: other GPU", "device 'NVIDIA H100 80GB HBM3' (this one: 'NVIDIA A100')",
                 [&] { select_entries(t, "tiny-sd15", unet, "fp16", "NVIDIA A100", "10.13.3", "tensorrt"); });
  expect_failure("tensorrt folder, aoti wanted", "no aoti engine for tiny-sd15 unet (dilation 1) fp16",
                 [&] { select_entries(t, "tiny-sd15", unet, "fp16", h100, "2.13.0"); });

  // choose_backend: tensorrt on CUDA where the library has it (engine/load.py order), else aoti, else why not.
  check(choose_backend(f, "tiny-sd15", true, true) == "aoti" && choose_backend(f, "tiny-sd15", false, false) == "aoti",
        "backend: an aoti folder runs aoti");
  check(choose_backend(t, "tiny-sd15", true, true) == "tensorrt", "backend: tensorrt on CUDA with TensorRT");
  expect_failure("backend: library without TensorRT", "built without TensorRT support; rebuild libmegafusion",
                 [&] { choose_backend(t, "tiny-sd15", true, false); });
  expect_failure("backend: TensorRT on the CPU", "are TensorRT engines, which run on CUDA only",
                 [&] { choose_backend(t, "tiny-sd15", false, true); });
  EngineFolder both = t;
  both.entries.push_back(e);
  check(choose_backend(both, "tiny-sd15", true, true) == "tensorrt", "backend: both, CUDA with TensorRT: tensorrt");
  check(choose_backend(both, "tiny-sd15", true, false) == "aoti", "backend: both, library without TensorRT: aoti");
  check(choose_backend(both, "tiny-sd15", false, true) == "aoti", "backend: both, CPU: aoti");
  check(choose_backend(t, "sdxl", true, false) == "aoti", "backend: no engines of the model: aoti (select names them)");

  std::cout << g_failures << " failure(s)\n";
  return g_failures == 0 ? 0 : 1;
}
