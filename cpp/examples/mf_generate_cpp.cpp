// mf-generate-cpp: one MegaFusion image from built engines through libmegafusion's C API, written as PNG.
//
//   mf-tokens --model sdxl --prompt "a fox" --output ids.txt
//   mf-generate-cpp --engines DIR --model sdxl --ids ids.txt --size 2048x2048 --seed 0 --output fox.png
//   ... --image photo.ppm --strength 0.6                       (image to image)
//   ... --controlnet canny --control-image edges.ppm           (ControlNet engines built from folder .../canny)
//   ... --ip-adapter-embeds embeds.npy                          (unet_ip engines of mf-build-engines --ip-adapter)
//   ... --ip-adapter-image ref.ppm                              (and its image encoder: --ip-adapter-encoder DIR)
//   ... --progress --deadline 30                                (steps on stderr; stop a generation past 30 s)
//
// The last line of output gives the timings and the CUDA graph counters ("graphs on|off, C captures, R replays");
// the line before it, how the engine files were verified ("N hashed, M by file-hashes.json").
//
// Exit status: 0 on success, 2 on a usage error (one line naming the flag and the value; the rules are in
// args.hpp), else the mf_status of the failing call.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "args.hpp"
#include "embeds.hpp"
#include "megafusion/megafusion.h"
#include "png.hpp"
#include "ppm.hpp"

namespace {

// --progress and --deadline through the progress callback: what a server does with a request's deadline.
struct Watch {
  bool print = false;
  double deadline_s = -1;
  std::chrono::steady_clock::time_point start;
};

int on_step(void* user, int step, int total) {
  const Watch& w = *static_cast<const Watch*>(user);
  if (w.print) std::fprintf(stderr, "step %d/%d\n", step, total);
  const double spent = std::chrono::duration<double>(std::chrono::steady_clock::now() - w.start).count();
  return w.deadline_s >= 0 && spent >= w.deadline_s;  // nonzero: stop here (MF_ERROR_CANCELLED)
}

}  // namespace

int main(int argc, char** argv) {
  mf_generate_params params;
  mf_generate_params_init(&params);
  mfcli::CommandLine cl;
  std::string err;
  if (const int rc = mfcli::parse_command_line(argc, argv, cl, params, err); rc != 0) {
    std::cerr << "mf-generate-cpp: " << err << "\n";
    return rc;
  }
  if (cl.help) return std::cout << mfcli::kUsage, 0;
  const std::string &engines = cl.engines, &model = cl.model, &output = cl.output, &stages = cl.stages,
                    &relay = cl.relay, &device = cl.device;
  const int repeats = cl.repeats;
  for (size_t i = 0; i < cl.prompt.size(); ++i) params.prompt_ids[i] = cl.prompt[i].data();
  for (size_t i = 0; i < cl.negative.size(); ++i) params.negative_ids[i] = cl.negative[i].data();
  params.stages = stages.c_str();
  params.relay = relay.c_str();

  // The photo and control images, read before the engines load (a bad file is a usage error).
  mf_inputs* inputs = nullptr;
  Watch watch{cl.progress, cl.deadline_s, {}};
  if (!cl.image.empty() || !cl.controlnets.empty() || !cl.ip_embeds.empty() || !cl.ip_image.empty() ||
      cl.progress || cl.deadline_s >= 0) {
    if (mf_status s = mf_inputs_create(&inputs); s != MF_OK) return std::cerr << "mf-generate-cpp: " << mf_last_error() << "\n", s;
    try {
      mf_status s = MF_OK;
      if (!cl.image.empty()) {
        const mfppm::Image im = mfppm::read("--image", cl.image);
        s = mf_inputs_set_init_image(inputs, im.rgb.data(), im.width, im.height, cl.strength, cl.start_stage);
      }
      for (size_t j = 0; s == MF_OK && j < cl.controlnets.size(); ++j) {
        const mfppm::Image im = mfppm::read("--control-image", cl.control_images[j]);
        s = mf_inputs_add_control(inputs, cl.controlnets[j].c_str(), im.rgb.data(), im.width, im.height,
                                  cl.control_scales[j], cl.control_starts[j], cl.control_ends[j]);
      }
      if (s == MF_OK && !cl.ip_embeds.empty()) {
        const std::vector<float> e = mfembeds::read("--ip-adapter-embeds", cl.ip_embeds);
        s = mf_inputs_set_ip_adapter_embeds(inputs, e.data(), e.size());
      }
      if (s == MF_OK && !cl.ip_image.empty()) {
        const mfppm::Image im = mfppm::read("--ip-adapter-image", cl.ip_image);
        s = mf_inputs_set_ip_adapter_image(inputs, im.rgb.data(), im.width, im.height);
      }
      if (s == MF_OK && (cl.progress || cl.deadline_s >= 0)) s = mf_inputs_set_progress(inputs, on_step, &watch);
      if (s != MF_OK) throw std::runtime_error(mf_last_error());
    } catch (const std::exception& e) {
      std::cerr << "mf-generate-cpp: " << e.what() << "\n";
      mf_inputs_destroy(inputs);
      return mfcli::kUsageError;
    }
  }
  mf_context_options options{engines.c_str(), model.c_str(), device.c_str(), 0};  // sha256 always checked
  mf_context* ctx = nullptr;
  auto t0 = std::chrono::steady_clock::now();
  if (mf_status s = mf_context_create(&options, &ctx); s != MF_OK) {
    std::cerr << "mf-generate-cpp: " << mf_last_error() << "\n";
    mf_inputs_destroy(inputs);
    return s;
  }
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int width = 0, height = 0;
  mf_status s = mf_set_cuda_graphs(ctx, cl.graphs ? 1 : 0);
  if (s == MF_OK) s = mf_output_size(ctx, &params, &width, &height);
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  std::vector<double> times;
  for (int r = 0; s == MF_OK && r < repeats; ++r) {
    t0 = watch.start = std::chrono::steady_clock::now();
    s = mf_generate_with(ctx, &params, inputs, rgb.data(), rgb.size());
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  uint64_t captures = 0, replays = 0, hashed = 0, remembered = 0;
  if (s == MF_OK) s = mf_graph_counters(ctx, &captures, &replays);
  if (s == MF_OK) s = mf_engine_file_counters(&hashed, &remembered);
  if (s != MF_OK) {
    std::cerr << "mf-generate-cpp: " << mf_last_error() << "\n";
    mf_context_destroy(ctx);
    mf_inputs_destroy(inputs);
    return s;
  }
  mf_context_destroy(ctx);
  mf_inputs_destroy(inputs);
  try {
    mfpng::write_rgb(output, rgb.data(), width, height);
  } catch (const std::exception& e) {
    std::cerr << "mf-generate-cpp: " << e.what() << "\n";
    return 1;
  }
  std::printf("engine files verified: %llu hashed, %llu by file-hashes.json\n", static_cast<unsigned long long>(hashed),
              static_cast<unsigned long long>(remembered));
  std::printf("%dx%d -> %s; engines loaded in %.2f s; generate", width, height, output.c_str(), load_s);
  for (double t : times) std::printf(" %.3f", t);
  std::printf(" s; graphs %s, %llu captures, %llu replays\n", cl.graphs ? "on" : "off",
              static_cast<unsigned long long>(captures), static_cast<unsigned long long>(replays));
  return 0;
}
