// The engine folder reader without libtorch: SHA-256 against FIPS 180-4 examples, and every way a folder can
// be unusable (missing, corrupt, too deeply nested or foreign manifest, an entry whose digest is not its key's
// as Python computes it, stale entries, missing, altered or swapped files, files outside the folder, links,
// non-regular files) gives Failure(MF_ERROR_ENGINE) with a message naming the file, entry or value. JSON
// written back as Python's json.dumps(sort_keys=True) writes it. TensorRT entries: every profile read, the
// profile a call runs (engine/tensorrt_backend.py select_profile) and the backend a context picks.
// Usage: megafusion_engines_test SCRATCH_DIR
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../src/json.hpp"
#include "../src/lib/manifest.hpp"
#include "../src/lib/sha256.hpp"
#include "python_manifest.hpp"

#include "check.hpp"

using namespace megafusion::lib;

namespace {

using megafusion::testing::check;
using megafusion::testing::g_failures;

template <typename F>
void expect_failure(const std::string& what, const std::string& needle, F&& f, mf_status code = MF_ERROR_ENGINE) {
  megafusion::testing::expect_failure(what, needle, std::forward<F>(f), code, false);
}

// The error message of `f` ("" when it succeeds).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
    return "";
  } catch (const std::exception& e) {
    return std::string("error: ") + e.what();
  }
}

void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string replace_once(std::string s, const std::string& from, const std::string& to) {
  const size_t at = s.find(from);
  return at == std::string::npos ? "(" + from + " not found)" : s.replace(at, from.size(), to);
}

// digests Python computes for the keys below (EngineKey.from_json(key).digest(), engine/cache.py)
const char* kDigestAoti = "2c7824045f781f359d87b2ab61f58b2888a520ae289981cb85c68f6bb642a2d0";
const char* kDigestAotiOrtCpu = "3383f5e043f7a7f691b10699c60804852974067b60b8194bcc993b16a251fa94";
const char* kDigestAotiFp8Scheme = "a863d2fbdfd3e8a99ab34b17f274b1416ffdfbcf06c9f60804cc1d7b8b5ab81c";
const char* kDigestTrt = "ccd56512f66d9d033c9bb051ed6f750501cbb58aeb8556ce74127da9f1a2a752";

// An AOTInductor UNet entry (key digest kDigestAoti); `extra_key` adds key fields, `path` names its file.
std::string entry_json(const std::string& sha, long long size, const std::string& path = "e1/model.pt2",
                       const std::string& digest = kDigestAoti, const std::string& extra_key = "") {
  return R"({"digest": ")" + digest + R"(", "created": 5.0, "key": {"model": "tiny-sd15", "weights": "w1",
    "network": "unet", "variant": "standard", "dilation": 1, "precision": "fp32", "backend": "aoti",
    "backend_version": "2.13.0+cpu", "device": "cpu", )" + extra_key + R"("profiles": [{"stage": 0, "shapes":
    [["sample", [1, 4, 16, 16], [2, 4, 16, 16], [2, 4, 32, 32]]]}]}, "files": [{"path": ")" + path +
         R"(", "sha256": ")" + sha + R"(", "size": )" + std::to_string(size) + "}]}";
}

std::string manifest_of(const std::string& entries) { return "{\"format\": 1, \"entries\": [" + entries + "]}"; }

const char* kModels = R"({"format": 1, "models": {"tiny-sd15": {"vae_scaling_factor": 0.18215,
    "weights": {"unet": "w1"}, "vocab_sizes": [1000]}}})";

// A TensorRT UNet with one profile per stage: 128 px (latent 16) and 256 px (latent 32), batch 1 to 2.
std::string trt_entry_json() {
  return R"({"digest": "ccd56512f66d9d033c9bb051ed6f750501cbb58aeb8556ce74127da9f1a2a752", "created": 6.0, "key": {"model": "tiny-sd15", "weights": "w1", "network": "unet",
    "variant": "standard", "dilation": 1, "precision": "fp16", "backend": "tensorrt", "backend_version": "10.13.3.9",
    "device": "NVIDIA H100 80GB HBM3", "profiles": [
      {"stage": 0, "shapes": [["sample", [1, 4, 16, 16], [2, 4, 16, 16], [2, 4, 16, 16]],
                              ["timestep", [1], [1], [1]]]},
      {"stage": 1, "shapes": [["sample", [1, 4, 32, 32], [2, 4, 32, 32], [2, 4, 32, 32]],
                              ["timestep", [1], [1], [1]]]}]},
    "files": [{"path": "e2/engine.plan", "sha256": "x", "size": 1}]})";
}

using Shapes = std::vector<std::pair<std::string, std::vector<long long>>>;

// A per-stage static AOTInductor UNet (what mf-build-engines --backend aoti builds by default): spatial sides
// fixed at `side` latent pixels, batch 1 to 2. Digests from Python (EngineKey.from_json(key).digest()).
std::string static_entry_json(long long side, const std::string& digest, double created,
                              const std::string& version = "2.13.0+cpu", const std::string& device = "cpu") {
  const std::string s = std::to_string(side);
  return R"({"digest": ")" + digest + R"(", "created": )" + std::to_string(created) + R"(, "key": {"model":
    "tiny-sd15", "weights": "w1", "network": "unet", "variant": "standard", "dilation": 1, "precision": "fp32",
    "backend": "aoti", "backend_version": ")" + version + R"(", "device": ")" + device + R"(", "profiles":
    [{"stage": 0, "shapes": [["sample", [1, 4, )" + s + ", " + s + "], [2, 4, " + s + ", " + s + "], [2, 4, " + s +
         ", " + s + R"(]], ["timestep", [1], [1], [1]]]}]}, "files": [{"path": "s)" + s + R"(/model.pt2",
    "sha256": "x", "size": 1}]})";
}
const char* kDigestStatic16 = "d03e66bed4f70eed233d81d3cfa7ab99140624310acbb8a897452751a9233c89";
const char* kDigestStatic32 = "879939d70b077b1802ef043550e194218f02e1da76718accb41a63c90c19c7e7";
const char* kDigestStatic48OldTorch = "392d417bcacad315f0d8d4f62951e38922ecd8659e9a10de72e559806e99c1fd";
const char* kDigestStatic24Gpu = "03070c79bf560f4ebb2bc0088cb1009b1aec4019767cfd785dd723b63a14c709";

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return std::cerr << "usage: megafusion_engines_test SCRATCH_DIR\n", 2;
  const std::string dir = argv[1];
  std::system(("rm -rf '" + dir + "' && mkdir -p '" + dir + "/e1' '" + dir + "/old'").c_str());
  // Files for the verified-hash cache, written first: only files unchanged for 2 s are cached (kRacyNs).
  write(dir + "/old/a.pt2", "old-a");
  write(dir + "/old/b.pt2", "old-b");
  const auto old_written = std::chrono::steady_clock::now();

  check(sha256_bytes("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");
  check(sha256_bytes("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256('abc')");
  check(sha256_bytes("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "sha256 of 448 bits (two blocks of padding)");
  {  // the CPU's SHA extensions (where it has them) against the portable code, every length near a block edge
    std::string data;
    uint32_t x = 12345;
    for (int i = 0; i < 5000; ++i) data += static_cast<char>((x = x * 1103515245u + 12345u) >> 24);
    bool same = true;
    for (size_t n : {0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4999, 5000}) {
      const std::string part = data.substr(0, n);
      sha256_portable_only(true);
      const std::string portable = sha256_bytes(part);
      sha256_portable_only(false);
      same = same && sha256_bytes(part) == portable;
    }
    check(same, std::string("sha256: the accelerated path equals the portable one (accelerated here: ") +
                    (sha256_accelerated() ? "yes" : "no") + ")");
  }

  expect_failure("missing folder", dir + "/nope", [&] { read_engine_folder(dir + "/nope"); });
  expect_failure("missing manifest", "manifest.json is missing", [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": [");
  expect_failure("truncated manifest", "manifest.json is corrupt", [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 7, \"entries\": []}");
  write(dir + "/models.json", "{\"format\": 1, \"models\": {}}");
  expect_failure("other manifest format", "has format 7", [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": [{\"digest\": 3}]}");
  expect_failure("entry without key", "manifest.json is corrupt", [&] { read_engine_folder(dir); });

  // JSON the reader refuses, each with the file named and never a crash: nesting (100000 '['), unterminated
  // strings, bad escapes and numbers Python's json.loads refuses too.
  write(dir + "/manifest.json", std::string(100000, '['));
  expect_failure("manifest nested 100000 deep",
                 "engine manifest " + dir + "/manifest.json is corrupt (JSON: nesting deeper than 64 levels",
                 [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": " + std::string(63, '[') + std::string(63, ']') + "}");
  const std::string deep64 = error_of([&] { read_engine_folder(dir); });
  check(deep64.find("manifest.json is corrupt") != std::string::npos && deep64.find("nesting") == std::string::npos,
        "manifest nested 64 deep: parsed (then refused, its entries being arrays): " + deep64);
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": " + std::string(64, '[') + std::string(64, ']') + "}");
  expect_failure("manifest nested 65 deep", "nesting deeper than 64 levels at offset 88",
                 [&] { read_engine_folder(dir); });
  write(dir + "/manifest.json", "{\"format\": 1, \"entries\": []}");
  write(dir + "/models.json", "{\"format\": 1, \"models\": " + std::string(100000, '['));
  expect_failure("model facts nested 100000 deep", "models.json is corrupt (JSON: nesting deeper than 64 levels",
                 [&] { read_engine_folder(dir); });
  for (const auto& [what, text] : std::vector<std::pair<std::string, std::string>>{
           {"unterminated string", "{\"format\": 1, \"entries\": [], \"x\": \"abc"},
           {"string ending in a backslash", "{\"format\": 1, \"entries\": [], \"x\": \"abc\\"},
           {"truncated \\u escape", "{\"format\": 1, \"entries\": [], \"x\": \"\\u12"},
           {"control character in a string", "{\"format\": 1, \"entries\": [], \"x\": \"a\tb\"}"},
           {"hexadecimal number", "{\"format\": 0x1, \"entries\": []}"},
           {"trailing comma", "{\"format\": 1, \"entries\": [],}"},
           {"unclosed object", "{\"format\": 1, \"entries\": []"}}) {
    write(dir + "/manifest.json", text);
    expect_failure("manifest with " + what, "manifest.json is corrupt (JSON: ", [&] { read_engine_folder(dir); });
  }

  // json.dumps(json.loads(text), sort_keys=True) in Python, for numbers and strings of every kind.
  const char* in = R"([1E5, 0.10, -0, 1e400, 2e-324, 2.4703282292062328e-324, 1.7976931348623159e308, 1e-400,
    -1e-400, 100.0e-2, 0.000123456789, 9007199254740993, 9007199254740993.0, 1e15, 123e-20, 5e-5,
    "\u00e9\ud834\udd1e\u007f/\/", {"b": [true, false, null], "a": {}, "\u00e9": [], "Z": 1}, 0.1, 1e16, 1e-05,
    0.0001, 1.5, -0.0, 123456789.0, 1e22, 5e-324, 1234567890123456.0, 12345678901234567.0, NaN, -Infinity,
    123456789012345678901234567890, 2.5e-7, 0.30000000000000004, 0.18215, 1e-7, 1e+16, 9999999999999998.0])";
  const std::string want = R"([100000.0, 0.1, 0, Infinity, 0.0, 5e-324, Infinity, 0.0, -0.0, 1.0, 0.000123456789, )"
      R"(9007199254740993, 9007199254740992.0, 1000000000000000.0, 1.23e-18, 5e-05, "\u00e9\ud834\udd1e\u007f//", )"
      R"({"Z": 1, "a": {}, "b": [true, false, null], "\u00e9": []}, 0.1, 1e+16, 1e-05, 0.0001, 1.5, -0.0, )"
      R"(123456789.0, 1e+22, 5e-324, 1234567890123456.0, 1.2345678901234568e+16, NaN, -Infinity, )"
      R"(123456789012345678901234567890, 2.5e-07, 0.30000000000000004, 0.18215, 1e-07, 1e+16, 9999999999999998.0])";
  std::string got;
  const std::string err = error_of([&] { got = mfjson::python_dumps(mfjson::parse(in)); });
  check(got == want, "json.dumps(sort_keys=True) as Python writes it: " + (err.empty() ? got : err));

  write(dir + "/e1/model.pt2", "abc");
  const std::string sha = sha256_bytes("abc");
  write(dir + "/manifest.json", manifest_of(entry_json(sha, 3)));
  write(dir + "/models.json", "{\"format\": 1, \"models\": {");
  expect_failure("corrupt model facts", "models.json is corrupt", [&] { read_engine_folder(dir); });
  write(dir + "/models.json", kModels);
  EngineFolder f;
  check(error_of([&] { f = read_engine_folder(dir); }).empty(), "a valid folder reads");
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
  // Rebuild hints carry the weights' source that models.json records, as Python's build_command does.
  {
    EngineFolder g = f;
    g.models.at("tiny-sd15").source = "random:3";
    expect_failure("hint: random weights and their seed",
                   "build it with: mf-build-engines --model tiny-sd15 --weights-seed 3 --backend aoti --precision fp16 "
                   "--device cpu --output",
                   [&] { select_entries(g, "tiny-sd15", unet, "fp16", "cpu", "2.13.0"); });
    g.models.at("tiny-sd15").source = "/models/my sd15";
    expect_failure("hint: a model folder, quoted", "--model tiny-sd15 --model-path '/models/my sd15' --backend aoti",
                   [&] { select_entries(g, "tiny-sd15", unet, "fp16", "cpu", "2.13.0"); });
  }

  const std::string e_name = "unet (standard) fp32 aoti, entry 2c7824045f781f35";
  check(error_of([&] { verify_files(dir, e); }) == "", "verify_files on intact files");
  write(dir + "/e1/model.pt2", "abd");  // same size: only the hash tells, and it is checked by default
  expect_failure("altered file (same size), hashes checked by default",
                 "e1/model.pt2 does not match its sha256 in the manifest (" + e_name + ")",
                 [&] { verify_files(dir, e); });
  write(dir + "/e1/model.pt2", "ab");
  expect_failure("truncated file", "is 2 bytes, the manifest says 3", [&] { verify_files(dir, e); });
  std::remove((dir + "/e1/model.pt2").c_str());
  expect_failure("missing file", "model.pt2 is missing", [&] { verify_files(dir, e); });

  // Key digests, recomputed as engine/cache.py does: sha256 of json.dumps(key, sort_keys=True).
  {
    const std::string py = dir + "/python";
    std::system(("mkdir -p '" + py + "'").c_str());
    write(py + "/manifest.json", kPythonManifest);
    write(py + "/models.json", kPythonModels);
    EngineFolder pf;
    check(error_of([&] { pf = read_engine_folder(py); }) == "" && pf.entries.size() == 5 &&
              pf.entries.at(1).digest == "1af9d9acac15c23c1f2463f1e72ea6d9864b95282a0787d3368aca23c7f6e4ef" &&
              pf.entries[1].range.at(0).max == std::vector<long long>({2, 4, 16, 16}),
          "a manifest Python wrote: every digest verifies");
    // Widen the UNet's range (its sample max 16 -> 64 wide) and leave the digest as it was.
    std::string widened = kPythonManifest;
    const size_t unet = widened.find("\"digest\": \"1af9d9acac15c23c");
    const size_t timestep = widened.find("\"timestep\"", unet);
    const size_t last_16 = widened.rfind("16", timestep);
    check(unet != std::string::npos && timestep != std::string::npos && last_16 > unet, "fixture: the UNet's max");
    widened.replace(last_16, 2, "64");
    write(py + "/manifest.json", widened);
    expect_failure("a widened profile max without a new digest",
                   "engine manifest " + py + "/manifest.json: entry 1af9d9acac15c23c (unet (standard) fp32 torch) "
                   "does not match its key (the key hashes to ",
                   [&] { read_engine_folder(py); });
    write(py + "/manifest.json", replace_once(kPythonManifest, "\"device\": \"cpu\"", "\"device\": \"cuda\""));
    expect_failure("another device without a new digest", "entry 08679cb9fa0c3b71 (vae_decoder fp32 torch) does not match",
                   [&] { read_engine_folder(py); });
    // ort_optimize: "none" is left out of the key (the digest of the key without it), any other value kept.
    write(py + "/manifest.json", manifest_of(entry_json(sha, 3, "e1/model.pt2", kDigestAoti, R"("ort_optimize": "none", )")));
    check(error_of([&] { read_engine_folder(py); }) == "", "ort_optimize none: the digest of the key without it");
    write(py + "/manifest.json",
          manifest_of(entry_json(sha, 3, "e1/model.pt2", kDigestAotiOrtCpu, R"("ort_optimize": "cpu", )")));
    check(error_of([&] { read_engine_folder(py); }) == "", "ort_optimize cpu: in the digest");
    write(py + "/manifest.json", manifest_of(entry_json(sha, 3, "e1/model.pt2", kDigestAoti, R"("ort_optimize": "cpu", )")));
    expect_failure("ort_optimize cpu added without a new digest", "entry 2c7824045f781f35 (unet (standard) fp32 aoti) "
                   "does not match its key (the key hashes to 3383f5e043f7a7f6)", [&] { read_engine_folder(py); });
    // quantization (an fp8 UNet's FP8 layers): "none" left out, any other value in the digest (entry_json's key is
    // fp32: the C API opens no FP8 UNet, but reads a folder that also holds them).
    write(py + "/manifest.json", manifest_of(entry_json(sha, 3, "e1/model.pt2", kDigestAoti, R"("quantization": "none", )")));
    check(error_of([&] { read_engine_folder(py); }) == "", "quantization none: the digest of the key without it");
    write(py + "/manifest.json", manifest_of(entry_json(sha, 3, "e1/model.pt2", kDigestAotiFp8Scheme,
                                                        R"("quantization": "e4m3 rows: ff_in", )")));
    check(error_of([&] { read_engine_folder(py); }) == "", "quantization e4m3 rows: ff_in: in the digest");
    write(py + "/manifest.json", manifest_of(entry_json(sha, 3, "e1/model.pt2", kDigestAoti, R"("color": "red", )")));
    expect_failure("a key field EngineKey does not have", "its key has an unknown field 'color'",
                   [&] { read_engine_folder(py); });
    // Floats and non-ASCII text in a key, as Python wrote them (ensure_ascii, and raw UTF-8): same digest.
    const std::string floats = R"({"digest": "19112e4f60363357bd27c5aff3c8abda55ffd723d3303bf1827f5644399aadf2", "key":
      {"model": "tiny-sd15", "weights": "w1", "network": "unet", "variant": "standard", "dilation": 1,
      "precision": "fp32", "profiles": [{"stage": 0, "shapes": [["sample", [1, 4, 16.0, 16], [2, 4, 16, 16],
      [2.0, 4.0, 32.0, 32]]]}], "backend": "aoti", "backend_version": "2.13.0+cpu", "device": )";
    write(py + "/manifest.json", manifest_of(floats + R"("G\u00e9r\u00e4t \u2603 \ud834\udd1e \"q\" \\ \t\u0001"},
      "created": 5.0, "files": []})"));
    check(error_of([&] { read_engine_folder(py); }) == "", "a key with floats and \\u escapes: Python's digest");
    write(py + "/manifest.json", manifest_of(floats + "\"G\xc3\xa9r\xc3\xa4t \xe2\x98\x83 \xf0\x9d\x84\x9e \\\"q\\\" "
                                                      "\\\\ \\t\\u0001\"}, \"created\": 5.0, \"files\": []}"));
    check(error_of([&] { read_engine_folder(py); }) == "", "the same key in raw UTF-8: Python's digest");
  }

  // Content hashes: a same-size swap of one package's file over another's is refused, naming the entry.
  {
    const std::string sw = dir + "/swap";
    std::system(("mkdir -p '" + sw + "/e1' '" + sw + "/e5'").c_str());
    write(sw + "/e1/model.pt2", "package-one");
    write(sw + "/e5/model.pt2", "package-two");
    write(sw + "/manifest.json", manifest_of(entry_json(sha256_bytes("package-one"), 11)));
    write(sw + "/models.json", kModels);
    EngineFolder sf;
    check(error_of([&] { sf = read_engine_folder(sw); }) == "" && sf.entries.size() == 1, "swap: folder reads");
    const Entry one = sf.entries.empty() ? Entry{} : sf.entries[0];
    check(error_of([&] { verify_files(sw, one); }) == "", "swap: intact package verifies");
    std::system(("cp '" + sw + "/e5/model.pt2' '" + sw + "/e1/model.pt2'").c_str());
    expect_failure("same-size swap of another package's file",
                   sw + "/e1/model.pt2 does not match its sha256 in the manifest (" + e_name + ")",
                   [&] { verify_files(sw, one); });
  }

  // Confinement: every file inside the folder, reached through no link, a regular file.
  {
    const std::string cf = dir + "/confined";
    std::system(("mkdir -p '" + cf + "/e1' '" + cf + "/e3' '" + dir + "/elsewhere'").c_str());
    write(cf + "/models.json", kModels);
    write(dir + "/outside.pt2", "outside");
    const std::string out_sha = sha256_bytes("outside");
    write(cf + "/manifest.json", manifest_of(entry_json(out_sha, 7, "../outside.pt2")));
    expect_failure("'../outside.pt2' with a matching hash",
                   "entry 2c7824045f781f35 (unet (standard) fp32 aoti) lists file '../outside.pt2', which has a "
                   "'..' component",
                   [&] { verify_files(cf, read_engine_folder(cf).entries.at(0)); });
    write(cf + "/manifest.json", manifest_of(entry_json(out_sha, 7, "e1/../../outside.pt2")));
    expect_failure("'e1/../../outside.pt2'", "lists file 'e1/../../outside.pt2', which has a '..' component",
                   [&] { verify_files(cf, read_engine_folder(cf).entries.at(0)); });
    write(cf + "/manifest.json", manifest_of(entry_json(out_sha, 7, dir + "/outside.pt2")));
    expect_failure("an absolute path with a matching hash", "lists file '" + dir + "/outside.pt2', which is absolute",
                   [&] { verify_files(cf, read_engine_folder(cf).entries.at(0)); });
    // Entries built elsewhere are checked again when verified.
    Entry outside = f.entries.at(0);
    outside.files = {{"../outside.pt2", out_sha, 7}};
    expect_failure("verify_files: '../outside.pt2'", "lists file '../outside.pt2', which has a '..' component",
                   [&] { verify_files(cf, outside); });

    std::string passwd;
    {
      std::ifstream in("/etc/passwd", std::ios::binary);
      passwd.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    check(symlink("/etc/passwd", (cf + "/e1/model.pt2").c_str()) == 0, "make a link to /etc/passwd");
    write(cf + "/manifest.json", manifest_of(entry_json(sha256_bytes(passwd), passwd.size())));
    expect_failure("a symbolic link to /etc/passwd with a matching hash",
                   cf + "/e1/model.pt2 is a symbolic link (" + e_name + ")",
                   [&] { verify_files(cf, read_engine_folder(cf).entries.at(0)); });

    write(dir + "/elsewhere/model.pt2", "outside");
    check(symlink((dir + "/elsewhere").c_str(), (cf + "/e2").c_str()) == 0, "make a linked folder");
    write(cf + "/manifest.json", manifest_of(entry_json(out_sha, 7, "e2/model.pt2")));
    expect_failure("a file in a linked folder with a matching hash",
                   cf + "/e2/model.pt2: " + cf + "/e2 is a symbolic link (" + e_name + ")",
                   [&] { verify_files(cf, read_engine_folder(cf).entries.at(0)); });

    std::system(("mkdir -p '" + cf + "/e3/model.pt2'").c_str());
    struct stat dst {};
    stat((cf + "/e3/model.pt2").c_str(), &dst);
    write(cf + "/manifest.json", manifest_of(entry_json(sha256_bytes(""), dst.st_size, "e3/model.pt2")));
    expect_failure("a directory in place of a file (its size, the empty file's hash)",
                   cf + "/e3/model.pt2 is a directory, not a regular file (" + e_name + ")",
                   [&] { verify_files(cf, read_engine_folder(cf).entries.at(0)); });
  }

  // The verified-hash cache: an unchanged file is not hashed again; a changed one is, even with its mtime put
  // back (its ctime and inode still tell).
  {
    std::this_thread::sleep_until(old_written + std::chrono::milliseconds(2100));
    Entry a = f.entries.at(0);
    a.files = {{"old/a.pt2", sha256_bytes("old-a"), 5}};
    const size_t before = files_hashed();
    check(error_of([&] { verify_files(dir, a); }) == "" && files_hashed() == before + 1, "cache: first open hashes");
    check(error_of([&] { verify_files(dir, a); }) == "" && files_hashed() == before + 1,
          "cache: second open of the unchanged file hashes nothing");
    {  // kept for the next process as Python keeps it (engine/file_hashes.py reads this file)
      std::ifstream in(dir + "/file-hashes.json");
      std::stringstream ss;
      ss << in.rdbuf();
      std::string got;
      try {
        const mfjson::Value v = mfjson::parse(ss.str());
        got = v["format"].as_int() == 1 ? v["files"][dir + "/old/a.pt2"]["sha256"].str : "format";
      } catch (const std::exception& e) {
        got = e.what();
      }
      check(got == sha256_bytes("old-a"), "cache: the hash of a settled file is written to file-hashes.json (" +
                                              got + ")");
    }
    struct stat ast {};
    stat((dir + "/old/a.pt2").c_str(), &ast);
    std::system(("cp '" + dir + "/old/b.pt2' '" + dir + "/old/a.pt2'").c_str());
    const struct timespec times[2] = {ast.st_atim, ast.st_mtim};
    utimensat(AT_FDCWD, (dir + "/old/a.pt2").c_str(), times, 0);
    expect_failure("cache: same-size swap with the mtime put back",
                   "old/a.pt2 does not match its sha256 in the manifest", [&] { verify_files(dir, a); });
    check(files_hashed() == before + 2, "cache: the swapped file was hashed again");
  }

  // Hashes Python remembered (engine/file_hashes.py writes file-hashes.json so): a record whose stat is the
  // file's gives its hash without a read, and is trusted as Python trusts it; a record of other facts, another
  // format or a malformed file is ignored and the file is read.
  {
    const std::string rr = dir + "/remembered";
    std::system(("mkdir -p '" + rr + "'").c_str());
    for (const char* n : {"a", "b", "c", "d", "e"}) write(rr + "/" + n + ".bin", std::string("bytes of ") + n);
    auto sig = [&](const std::string& name, long long mtime_shift) {
      struct stat s {};
      stat((rr + "/" + name).c_str(), &s);
      auto t = [](const struct timespec& ts) { return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec; };
      return "[" + std::to_string(s.st_size) + ", " + std::to_string(t(s.st_mtim) + mtime_shift) + ", " +
             std::to_string(t(s.st_ctim)) + ", " + std::to_string(s.st_ino) + ", " + std::to_string(s.st_dev) + "]";
    };
    auto record = [&](const std::string& name, const std::string& stat_json, const std::string& sha) {
      return "\"" + rr + "/" + name + "\": {\"stat\": " + stat_json + ", \"sha256\": \"" + sha + "\"}";
    };
    auto entry_of = [&](const std::string& name) {
      Entry e = f.entries.at(0);
      e.files = {{name, sha256_bytes("bytes of " + name.substr(0, 1)), 10}};
      return e;
    };
    write(rr + "/file-hashes.json",
          "{\"format\": 1, \"files\": {" + record("a.bin", sig("a.bin", 0), sha256_bytes("bytes of a")) + ", " +
              record("b.bin", sig("b.bin", 1), sha256_bytes("bytes of b")) + ", " +
              record("c.bin", sig("c.bin", 0), sha256_bytes("not c")) + "}}");
    const size_t hashed = files_hashed(), remembered = files_remembered();
    check(error_of([&] { verify_files(rr, entry_of("a.bin")); }) == "" && files_hashed() == hashed &&
              files_remembered() == remembered + 1,
          "remembered: a matching record answers without a read");
    check(error_of([&] { verify_files(rr, entry_of("b.bin")); }) == "" && files_hashed() == hashed + 1 &&
              files_remembered() == remembered + 1,
          "remembered: a record with another mtime is ignored, the file read");
    expect_failure("remembered: a matching record's hash is the one checked",
                   "c.bin does not match its sha256 in the manifest", [&] { verify_files(rr, entry_of("c.bin")); });
    check(error_of([&] { verify_files(rr, entry_of("d.bin")); }) == "" && files_hashed() == hashed + 2,
          "remembered: a file without a record is read");
    write(rr + "/file-hashes.json", "{\"format\": 2, \"files\": {" +
                                        record("e.bin", sig("e.bin", 0), sha256_bytes("bytes of e")) + "}}");
    check(error_of([&] { verify_files(rr, entry_of("e.bin")); }) == "" && files_hashed() == hashed + 3,
          "remembered: records of another format are ignored");
    write(rr + "/file-hashes.json", "{not json");
    check(error_of([&] { verify_files(rr, entry_of("a.bin")); }) == "", "remembered: a malformed file is ignored");
  }

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
  check(select_entries(t, "tiny-sd15", unet, "fp16", h100, "10.13.3", "tensorrt").at({"unet", 1}).digest == kDigestTrt,
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

  // Per-stage static packages: several entries of one (network, dilation), one per stage shape; each call runs
  // the newest valid entry whose profile holds its shapes. Stale and foreign entries are never candidates.
  {
    const std::string st = dir + "/static";
    std::system(("mkdir -p '" + st + "'").c_str());
    write(st + "/models.json", kModels);
    write(st + "/manifest.json", manifest_of(static_entry_json(16, kDigestStatic16, 5) + ", " +
                                             static_entry_json(32, kDigestStatic32, 6) + ", " +
                                             static_entry_json(48, kDigestStatic48OldTorch, 7, "2.12.0+cpu") + ", " +
                                             static_entry_json(24, kDigestStatic24Gpu, 8, "2.13.0+cpu", "NVIDIA H200")));
    EngineFolder sf;
    check(error_of([&] { sf = read_engine_folder(st); }) == "" && sf.entries.size() == 4, "static: folder reads");
    std::vector<Entry> set;
    const std::string err = error_of([&] { set = select_entry_sets(sf, "tiny-sd15", unet, "fp32", "cpu", "2.13.0").at({"unet", 1}); });
    check(err == "" && set.size() == 2 && set[0].digest == kDigestStatic32 && set[1].digest == kDigestStatic16,
          "static: both valid entries, newest first; the old-torch and the GPU entries left out " + err);
    check(select_entries(sf, "tiny-sd15", unet, "fp32", "cpu", "2.13.0").at({"unet", 1}).digest == kDigestStatic32,
          "static: select_entries still answers the newest");
    const std::string hint = "mf-build-engines --model tiny-sd15 --stages 128x128:2,384x384:2 --backend aoti";
    const std::vector<long long> one = {1};
    check(set.size() == 2 && pick_entry(set, {{"sample", {2, 4, 16, 16}}, {"timestep", one}}, 8, "here", hint) == 1,
          "static: the 128 px call runs the 16-latent package");
    check(set.size() == 2 && pick_entry(set, {{"sample", {1, 4, 32, 32}}, {"timestep", one}}, 8, "here", hint) == 0,
          "static: the 256 px call (batch 1) runs the 32-latent package");
    expect_failure("static: a size no package covers, one line naming the sizes built and the command",
                   "the engines in X do not cover unet (standard) fp32 aoti at 384x384 (input sample (2, 4, 48, 48)); "
                   "they cover 256x256, 128x128. Build them with: " + hint,
                   [&] { pick_entry(set, {{"sample", {2, 4, 48, 48}}, {"timestep", one}}, 8, "the engines in X", hint); },
                   MF_ERROR_UNSUPPORTED_SIZE);
    const std::string msg = error_of([&] { pick_entry(set, {{"sample", {2, 4, 48, 48}}, {"timestep", one}}, 8, "X", hint); });
    check(msg.find('\n') == std::string::npos, "static: the refusal is one line");
    expect_failure("static: batch 3 is outside every package", "at 256x256",
                   [&] { pick_entry(set, {{"sample", {3, 4, 32, 32}}, {"timestep", one}}, 8, "X", hint); },
                   MF_ERROR_UNSUPPORTED_SIZE);
    {
      EngineFolder g = sf;
      g.models.at("tiny-sd15").source = "random:3";
      check(plan_build_hint(g, "tiny-sd15", "NVIDIA H200", "aoti", "fp16", "128x128:2,256x256:2") ==
                "mf-build-engines --model tiny-sd15 --weights-seed 3 --stages 128x128:2,256x256:2 --backend aoti "
                "--precision fp16 --device cuda --output " + st,
            "plan build hint: weights source, stages, device kind");
    }
    check(served_sizes(set.at(0), 8) == "256x256" && served_sizes(f.entries.at(0), 8) == "128x128 to 256x256",
          "served sizes: one size for a static package, a range for a --dynamic one");
    // Only stale or foreign static entries: refused as before, naming why.
    write(st + "/manifest.json", manifest_of(static_entry_json(48, kDigestStatic48OldTorch, 7, "2.12.0+cpu")));
    expect_failure("static: only an entry of another torch", "was built for torch 2.12.0+cpu (this library: 2.13.0)",
                   [&] { select_entry_sets(read_engine_folder(st), "tiny-sd15", unet, "fp32", "cpu", "2.13.0"); });
    write(st + "/manifest.json", manifest_of(static_entry_json(24, kDigestStatic24Gpu, 8, "2.13.0+cpu", "NVIDIA H200")));
    expect_failure("static: only an entry of another device", "device 'NVIDIA H200' (this one: 'cpu')",
                   [&] { select_entry_sets(read_engine_folder(st), "tiny-sd15", unet, "fp32", "cpu", "2.13.0"); });
    // A static package beside a --dynamic range one (same creation time: manifest order kept): each call takes the
    // first that holds it; the range entry alone serves what the static one does not.
    write(st + "/manifest.json", manifest_of(static_entry_json(32, kDigestStatic32, 5) + ", " +
                                             entry_json(sha, 3)));
    std::vector<Entry> mixed;
    check(error_of([&] { mixed = select_entry_sets(read_engine_folder(st), "tiny-sd15", unet, "fp32", "cpu",
                                                   "2.13.0").at({"unet", 1}); }) == "" && mixed.size() == 2,
          "mixed: static and range entries both selected");
    check(mixed.size() == 2 && pick_entry(mixed, {{"sample", {2, 4, 32, 32}}}, 8, "X", hint) == 1,
          "mixed: an input the static entry names but the call lacks (timestep) leaves the range entry");
    check(mixed.size() == 2 && pick_entry(mixed, {{"sample", {2, 4, 32, 32}}, {"timestep", one}}, 8, "X", hint) == 0,
          "mixed: the static entry first where it fits");
    check(mixed.size() == 2 && pick_entry(mixed, {{"sample", {2, 4, 24, 24}}, {"timestep", one}}, 8, "X", hint) == 1,
          "mixed: the range entry for a size between");
  }
  // Range entries unchanged: one entry, its range, every size inside it.
  {
    std::vector<Entry> range;
    check(error_of([&] { range = select_entry_sets(f, "tiny-sd15", unet, "fp32", "cpu", "2.13.0").at({"unet", 1}); }) == "" &&
              range.size() == 1 && range[0].digest == kDigestAoti,
          "range: one entry");
    check(range.size() == 1 && pick_entry(range, {{"sample", {1, 4, 16, 16}}}, 8, "X", "") == 0 &&
              pick_entry(range, {{"sample", {2, 4, 24, 32}}}, 8, "X", "") == 0,
          "range: any size inside it");
    expect_failure("range: a size outside it", "they cover 128x128 to 256x256",
                   [&] { pick_entry(range, {{"sample", {2, 4, 40, 40}}}, 8, "X", "cmd"); }, MF_ERROR_UNSUPPORTED_SIZE);
  }

  std::cout << g_failures << " failure(s)\n";
  return g_failures == 0 ? 0 : 1;
}
