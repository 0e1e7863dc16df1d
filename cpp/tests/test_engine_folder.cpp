// The engine folder reader without libtorch: SHA-256 against FIPS 180-4 examples, and every way a folder can
// be unusable (missing, corrupt or foreign manifest, stale entries, missing or altered files) gives
// Failure(MF_ERROR_ENGINE) with a message naming the file or value.
// Usage: megafusion_engines_test SCRATCH_DIR
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

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
void expect_failure(const std::string& what, const std::string& needle, F&& f) {
  try {
    f();
    check(false, what + ": no error");
  } catch (const Failure& e) {
    const std::string msg = e.what();
    check(e.code == MF_ERROR_ENGINE && msg.find(needle) != std::string::npos, what + ": " + msg);
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

  std::cout << g_failures << " failure(s)\n";
  return g_failures == 0 ? 0 : 1;
}
