// mf-generate-cpp: one MegaFusion image from built engines through libmegafusion's C API, written as PNG.
//
//   mf-tokens --model sdxl --prompt "a fox" --output ids.txt
//   mf-generate-cpp --engines DIR --model sdxl --ids ids.txt --size 2048x2048 --seed 0 --output fox.png
//
// Exit status: 0 on success, 2 on a usage error, else the mf_status of the failing call.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "megafusion/megafusion.h"
#include "png.hpp"

namespace {

const char* kUsage =
    "usage: mf-generate-cpp --engines DIR --model NAME --ids FILE --output PNG [--size WxH] [--stages S]\n"
    "                       [--steps N] [--seed N] [--guidance W] [--no-reschedule] [--dilation D]\n"
    "                       [--relay pixel|latent] [--device cpu|cuda[:N]] [--verify-hashes] [--repeats N]\n";

int usage(const std::string& why) {
  std::cerr << "mf-generate-cpp: " << why << "\n" << kUsage;
  return 2;
}

// The token file `mf-tokens` writes: lines "prompt I id..." and "negative I id...".
bool read_ids(const std::string& path, std::vector<std::vector<int32_t>>& prompt,
              std::vector<std::vector<int32_t>>& negative, std::string& err) {
  std::ifstream f(path);
  if (!f) return err = "cannot read token file " + path, false;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream in(line);
    std::string kind;
    size_t index = 0;
    if (!(in >> kind >> index) || (kind != "prompt" && kind != "negative") || index >= MF_MAX_TEXT_ENCODERS)
      return err = "bad line in " + path + ": " + line.substr(0, 60), false;
    auto& dst = kind == "prompt" ? prompt : negative;
    if (dst.size() <= index) dst.resize(index + 1);
    long long id;
    while (in >> id) dst[index].push_back(static_cast<int32_t>(id));
    if (dst[index].size() != MF_TOKEN_LENGTH)
      return err = path + ": " + kind + " " + std::to_string(index) + " has " +
                   std::to_string(dst[index].size()) + " ids, expected " + std::to_string(MF_TOKEN_LENGTH),
             false;
  }
  if (prompt.empty()) return err = path + " has no prompt ids", false;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string engines, model, ids, output, size, stages, relay = "pixel", device = "cpu";
  mf_generate_params params;
  mf_generate_params_init(&params);
  int verify = 0, repeats = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (a == "--no-reschedule") params.reschedule = 0;
    else if (a == "--verify-hashes") verify = 1;
    else if (a == "-h" || a == "--help") return std::cout << kUsage, 0;
    else if (!(v = next())) return usage(a + " needs a value");
    else if (a == "--engines") engines = v;
    else if (a == "--model") model = v;
    else if (a == "--ids") ids = v;
    else if (a == "--output") output = v;
    else if (a == "--size") size = v;
    else if (a == "--stages") stages = v;
    else if (a == "--relay") relay = v;
    else if (a == "--device") device = v;
    else if (a == "--steps") params.total_steps = std::atoi(v);
    else if (a == "--seed") params.seed = std::strtoull(v, nullptr, 10);
    else if (a == "--guidance") params.guidance = std::strtof(v, nullptr);
    else if (a == "--dilation") params.dilation = std::atoi(v);
    else if (a == "--repeats") repeats = std::max(1, std::atoi(v));
    else return usage("unknown argument " + a);
  }
  if (engines.empty() || model.empty() || ids.empty() || output.empty())
    return usage("--engines, --model, --ids and --output are required");
  if (!size.empty() && std::sscanf(size.c_str(), "%dx%d", &params.width, &params.height) != 2)
    return usage("--size must be WxH, got '" + size + "'");
  std::vector<std::vector<int32_t>> prompt, negative;
  std::string err;
  if (!read_ids(ids, prompt, negative, err)) return usage(err);
  for (size_t i = 0; i < prompt.size(); ++i) params.prompt_ids[i] = prompt[i].data();
  for (size_t i = 0; i < negative.size(); ++i) params.negative_ids[i] = negative[i].data();
  params.stages = stages.c_str();
  params.relay = relay.c_str();

  mf_context_options options{engines.c_str(), model.c_str(), device.c_str(), verify};
  mf_context* ctx = nullptr;
  auto t0 = std::chrono::steady_clock::now();
  if (mf_status s = mf_context_create(&options, &ctx); s != MF_OK) {
    std::cerr << "mf-generate-cpp: " << mf_last_error() << "\n";
    return s;
  }
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int width = 0, height = 0;
  mf_status s = mf_output_size(ctx, &params, &width, &height);
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  std::vector<double> times;
  for (int r = 0; s == MF_OK && r < repeats; ++r) {
    t0 = std::chrono::steady_clock::now();
    s = mf_generate(ctx, &params, rgb.data(), rgb.size());
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (s != MF_OK) {
    std::cerr << "mf-generate-cpp: " << mf_last_error() << "\n";
    mf_context_destroy(ctx);
    return s;
  }
  mf_context_destroy(ctx);
  try {
    mfpng::write_rgb(output, rgb.data(), width, height);
  } catch (const std::exception& e) {
    std::cerr << "mf-generate-cpp: " << e.what() << "\n";
    return 1;
  }
  std::printf("%dx%d -> %s; engines loaded in %.2f s; generate", width, height, output.c_str(), load_s);
  for (double t : times) std::printf(" %.3f", t);
  std::printf(" s\n");
  return 0;
}
