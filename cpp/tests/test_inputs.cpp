// The C API's inputs without libtorch (cpp/src/lib/inputs.hpp, control_entries.hpp): every refusal of
// mf_inputs_set_init_image / mf_inputs_add_control is Failure(MF_ERROR_INVALID_ARGUMENT) naming the value;
// where a photo enters a plan is runtime/img2img.py entry_point's answer (the expected values below are
// Python's; flow_entry_point's are runtime/flow_img2img.py's); a ControlNet is found by its recorded name or
// fingerprint prefix, else refused naming it.
#include <cmath>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "../src/lib/control_entries.hpp"
#include "../src/lib/image_encoder.hpp"
#include "../src/lib/inputs.hpp"

#include "check.hpp"

using namespace megafusion;
using namespace megafusion::lib;

namespace {

using megafusion::testing::check;
using megafusion::testing::g_failures;

template <typename F>
void expect_failure(const std::string& what, const std::string& needle, F&& f,
                    mf_status code = MF_ERROR_INVALID_ARGUMENT) {
  megafusion::testing::expect_failure(what, needle, std::forward<F>(f), code, true);
}

StagePlan plan_of(std::vector<int> steps) {  // sizes do not matter to entry_point
  StagePlan p;
  for (int s : steps) p.stages.push_back(StageSize{128, 128, s});
  return p;
}

}  // namespace

int main() {
  const std::vector<uint8_t> px(4 * 3 * 3, 7);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  Inputs in;
  expect_failure("photo NULL", "init image: rgb is NULL", [&] { in.set_init_image(nullptr, 4, 3, 0.5f, 0); });
  expect_failure("photo width 0", "init image: size 0x3", [&] { in.set_init_image(px.data(), 0, 3, 0.5f, 0); });
  expect_failure("photo height -1", "init image: size 4x-1", [&] { in.set_init_image(px.data(), 4, -1, 0.5f, 0); });
  expect_failure("photo too large", "size 100000x100000", [&] { in.set_init_image(px.data(), 100000, 100000, 0.5f, 0); });
  expect_failure("strength 0 alone", "strength 0: must be a number in (0, 1]",
                 [&] { in.set_init_image(px.data(), 4, 3, 0.0f, 0); });
  expect_failure("strength 1.5", "strength 1.5: must be", [&] { in.set_init_image(px.data(), 4, 3, 1.5f, 0); });
  expect_failure("strength nan", "strength nan: must be", [&] { in.set_init_image(px.data(), 4, 3, nan, 2); });
  expect_failure("strength -0.5", "strength -0.5", [&] { in.set_init_image(px.data(), 4, 3, -0.5f, 0); });
  expect_failure("start_stage -1", "start_stage -1", [&] { in.set_init_image(px.data(), 4, 3, 0.5f, -1); });
  check(!in.init, "no photo kept after refusals");
  in.set_init_image(px.data(), 4, 3, 0.7f, 0);
  check(in.init && in.init->strength == 0.7 && in.init->image.rgb.size() == px.size(), "photo kept, strength 0.7 as typed");
  in.set_init_image(px.data(), 4, 3, 0.0f, 2);
  check(in.init->strength == 0 && in.init->start_stage == 2, "strength 0 with a start stage: the stage's first step");

  expect_failure("controlnet NULL", "controlnet name is NULL", [&] { in.add_control(nullptr, px.data(), 4, 3, 1, 0, 1); });
  expect_failure("controlnet empty", "controlnet name is NULL or empty", [&] { in.add_control("", px.data(), 4, 3, 1, 0, 1); });
  expect_failure("control image NULL", "control image of controlnet 'edges': rgb is NULL",
                 [&] { in.add_control("edges", nullptr, 4, 3, 1, 0, 1); });
  expect_failure("control image 4x0", "size 4x0", [&] { in.add_control("edges", px.data(), 4, 0, 1, 0, 1); });
  expect_failure("scale nan", "control scale nan of controlnet 'edges'", [&] { in.add_control("edges", px.data(), 4, 3, nan, 0, 1); });
  expect_failure("scale inf", "control scale inf", [&] { in.add_control("edges", px.data(), 4, 3, inf, 0, 1); });
  expect_failure("start >= end", "control start 0.5 / end 0.5 of controlnet 'edges': need 0 <= start < end <= 1",
                 [&] { in.add_control("edges", px.data(), 4, 3, 1, 0.5f, 0.5f); });
  expect_failure("start < 0", "control start -0.1", [&] { in.add_control("edges", px.data(), 4, 3, 1, -0.1f, 1); });
  expect_failure("end > 1", "end 1.5", [&] { in.add_control("edges", px.data(), 4, 3, 1, 0, 1.5f); });
  expect_failure("end nan", "end nan", [&] { in.add_control("edges", px.data(), 4, 3, 1, 0, nan); });
  check(in.controls.empty(), "no control kept after refusals");
  in.add_control("edges", px.data(), 4, 3, 0.9f, 0.1f, 0.8f);
  check(in.controls.size() == 1 && in.controls[0].start == 0.1 && in.controls[0].end == 0.8, "control kept");

  const std::vector<float> embeds = {0.5f, -1.25f, nan};
  expect_failure("embeds NULL", "IP-Adapter embeds are NULL", [&] { in.set_ip_embeds(nullptr, 3); });
  expect_failure("embeds 0 floats", "IP-Adapter embeds: 0 floats (1 to 65536)",
                 [&] { in.set_ip_embeds(embeds.data(), 0); });
  expect_failure("embeds nan", "IP-Adapter embeds: value nan at position 2",
                 [&] { in.set_ip_embeds(embeds.data(), 3); });
  check(in.ip_embeds.empty(), "no embeds kept after refusals");
  in.set_ip_embeds(embeds.data(), 2);
  check(in.ip_embeds == std::vector<float>{0.5f, -1.25f}, "embeds kept");
  expect_failure("image after embeds", "IP-Adapter image: these inputs hold IP-Adapter embeds already; give the image "
                 "or the embeds, not both", [&] { in.set_ip_image(px.data(), 4, 3); });
  check(!in.ip_image && in.ip_embeds.size() == 2, "the embeds stay, no image kept");
  Inputs by_image;
  expect_failure("ip image NULL", "IP-Adapter image: rgb is NULL", [&] { by_image.set_ip_image(nullptr, 4, 3); });
  expect_failure("ip image 0x3", "IP-Adapter image: size 0x3", [&] { by_image.set_ip_image(px.data(), 0, 3); });
  expect_failure("ip image too large", "IP-Adapter image: size 70000x70000",
                 [&] { by_image.set_ip_image(px.data(), 70000, 70000); });
  by_image.set_ip_image(px.data(), 4, 3);
  check(by_image.ip_image && by_image.ip_image->width == 4 && by_image.ip_image->rgb.size() == 36, "ip image kept");
  expect_failure("embeds after image", "IP-Adapter embeds: these inputs hold an IP-Adapter image already",
                 [&] { by_image.set_ip_embeds(embeds.data(), 2); });
  by_image.set_ip_image(px.data(), 2, 3);
  check(by_image.ip_image->width == 2 && by_image.ip_embeds.empty(), "a second image replaces the first");

  // entry_point against Python's: plan 30+10+10 steps.
  const StagePlan p = plan_of({30, 10, 10});
  auto e = entry_point(p, 0.8, 0);  // n = 40, first = 10
  check(e.stage == 0 && e.step == 10 && e.global_step == 10, "strength 0.8 of 50: stage 1, step 10");
  e = entry_point(p, 0.3, 0);  // n = int(15.000000000000002) = 15, first 35 -> stage 2, step 5
  check(e.stage == 1 && e.step == 5 && e.global_step == 35, "strength 0.3 of 50: stage 2, step 5");
  e = entry_point(p, as_typed(0.7f), 0);  // int(50 * 0.7) = 35 in Python (0.7f in double would give 34)
  check(e.global_step == 15, "strength 0.7f reads as 0.7: 35 steps run");
  e = entry_point(p, 0, 3);
  check(e.stage == 2 && e.step == 0 && e.global_step == 40, "start_stage 3, strength 0: stage 3's first step");
  e = entry_point(p, 1.0, 1);
  check(e.stage == 0 && e.step == 0, "strength 1 at start_stage 1");
  expect_failure("strength runs no step", "strength 0.01: runs int(50 * 0.01) = 0 of the plan's 50 steps; give at least 0.02",
                 [&] { entry_point(p, 0.01, 0); });
  expect_failure("start_stage 4 of 3", "start_stage 4: the plan has stages 1 to 3", [&] { entry_point(p, 0.5, 4); });
  expect_failure("strength outside its start stage",
                 "strength 0.5 starts at step 26 of 50, in stage 1, not start_stage 2; stage 2 takes strengths 0.22 to 0.4",
                 [&] { entry_point(p, 0.5, 2); });

  // flow_entry_point (SD3 / FLUX) against runtime/flow_img2img.py's: skip int(max(N - min(N s, N), 0)) steps.
  e = flow_entry_point(p, 0.8, 0);
  check(e.stage == 0 && e.step == 10 && e.global_step == 10, "flow strength 0.8 of 50: stage 1, step 10");
  e = flow_entry_point(p, 0.31, 0);  // int(50 - 15.5) = 34 (the UNet rule runs int(15.5) = 15: first 35)
  check(e.stage == 1 && e.step == 4 && e.global_step == 34, "flow strength 0.31 of 50: stage 2, step 4");
  e = flow_entry_point(p, as_typed(0.7f), 0);
  check(e.global_step == 15, "flow strength 0.7f reads as 0.7: first step 15");
  e = flow_entry_point(p, 0.01, 0);  // the UNet rule refuses it; the flow rule runs the last step
  check(e.stage == 2 && e.step == 9 && e.global_step == 49, "flow strength 0.01 runs the last step");
  e = flow_entry_point(p, 0, 3);
  check(e.stage == 2 && e.step == 0 && e.global_step == 40, "flow start_stage 3, strength 0: stage 3's first step");
  expect_failure("flow start_stage 4 of 3", "start_stage 4: the plan has stages 1 to 3",
                 [&] { flow_entry_point(p, 0.5, 4); });
  expect_failure("flow strength outside its start stage",
                 "strength 0.5 starts at step 26 of 50, in stage 1, not start_stage 2; stage 2 takes strengths above "
                 "0.2 up to 0.4",
                 [&] { flow_entry_point(p, 0.5, 2); });
  expect_failure("flow strength that vanishes beside N", "strength 1e-300: runs none of the plan's 50 steps",
                 [&] { flow_entry_point(p, 1e-300, 0); });

  check(control_keep(0, 10, 0.0, 1.0) == 1 && control_keep(9, 10, 0.0, 1.0) == 1, "keep over the whole schedule");
  check(control_keep(0, 10, 0.1, 1.0) == 0 && control_keep(1, 10, 0.1, 1.0) == 1, "keep from start");
  check(control_keep(7, 10, 0.0, 0.8) == 1 && control_keep(8, 10, 0.0, 0.8) == 0, "keep until end");

  // ControlNet names: recorded, by fingerprint prefix, unknown, ambiguous.
  EngineFolder f;
  f.root = "/engines";
  f.models["tiny-sd15"].controlnets["edges"] = {std::string(64, 'a'), "/models/edges"};
  Entry a, b;
  a.model = b.model = "tiny-sd15";
  a.network = b.network = "controlnet";
  a.weights = "mf2:tensors:" + std::string(63, 'a') + "b";
  b.weights = "mf2:tensors:" + std::string(63, 'a') + "c";
  f.entries = {a, b};
  auto id = resolve_controlnet(f, "tiny-sd15", "edges", "HINT");
  check(id.fingerprint == std::string(64, 'a') && id.source == "/models/edges", "controlnet by recorded name");
  id = resolve_controlnet(f, "tiny-sd15", a.weights, "HINT");
  check(id.fingerprint == a.weights, "controlnet by whole fingerprint");
  id = resolve_controlnet(f, "tiny-sd15", std::string(63, 'a') + "c", "HINT");
  check(id.fingerprint == b.weights, "controlnet by a prefix of its sha256");
  expect_failure("ambiguous prefix", "is a prefix of 2 ControlNets' fingerprints in /engines",
                 [&] { resolve_controlnet(f, "tiny-sd15", std::string(20, 'a'), "HINT"); });
  expect_failure("unknown controlnet",
                 "no ControlNet 'depth' for tiny-sd15 in /engines (it has edges); build its engines with: HINT "
                 "--controlnet <its folder>",
                 [&] { resolve_controlnet(f, "tiny-sd15", "depth", "HINT"); }, MF_ERROR_ENGINE);
  expect_failure("short prefix is a name", "no ControlNet 'aaaa'",
                 [&] { resolve_controlnet(f, "tiny-sd15", "aaaa", "HINT"); }, MF_ERROR_ENGINE);
  expect_failure("no entries for a fingerprint", "no aoti engine for controlnet 'edges' (standard) fp32 aoti in /engines; build it with: HINT",
                 [&] { control_entries(f, "tiny-sd15", "controlnet", 1, std::string(64, 'a'), "fp32", "cpu", "2.13.0",
                                       "controlnet 'edges' (standard) fp32 aoti", "HINT"); }, MF_ERROR_ENGINE);

  // IP-Adapters: the one whose unet_ip entries build on this UNet, none, or several (refused, each named).
  const std::string unet_fp = "mf2:tensors:" + std::string(64, 'u');
  Entry ip1, ip2, other_unet;
  ip1.model = ip2.model = other_unet.model = "tiny-sd15";
  ip1.network = ip2.network = other_unet.network = "unet_ip";
  ip1.backend = ip2.backend = other_unet.backend = "aoti";
  ip1.weights = unet_fp + "+ip-adapter:sha256:" + std::string(64, 'd') + "@scale:0.7";
  ip2.weights = unet_fp + "+ip-adapter:sha256:" + std::string(64, 'e') + "@scale:1.0";
  other_unet.weights =
      "mf2:tensors:" + std::string(64, 'v') + "+ip-adapter:sha256:" + std::string(64, 'f') + "@scale:1.0";
  ip1.range = ip2.range = other_unet.range = {TensorRange{"sample", {2, 4, 16, 16}, {2, 4, 16, 16}, {2, 4, 16, 16}},
                                              TensorRange{"image_embeds", {1, 1, 24}, {1, 1, 24}, {2, 1, 24}}};
  f.entries = {a, ip1, other_unet};
  IpAdapterId ip = resolve_ip_adapter(f, "tiny-sd15", unet_fp, "HINT");
  check(ip.fingerprint == ip1.weights && ip.file_sha256 == std::string(64, 'd') && ip.scale == "0.7" && ip.dim == 24,
        "the IP-Adapter of this UNet, its scale and embedding length");
  expect_failure("no unet_ip for this UNet",
                 "no unet_ip (IP-Adapter) aoti engines for tiny-sd15's UNet in /engines; build them with: HINT "
                 "--ip-adapter <IP-Adapter file> --ip-adapter-scale <S>",
                 [&] { resolve_ip_adapter(f, "tiny-sd15", "mf2:tensors:" + std::string(64, 'w'), "HINT"); },
                 MF_ERROR_ENGINE);
  f.entries.push_back(ip2);
  expect_failure("two IP-Adapters", "hold unet_ip engines of 2 IP-Adapters (file sha256 dddddddddddd at scale 0.7, "
                 "eeeeeeeeeeee at scale 1.0)",
                 [&] { resolve_ip_adapter(f, "tiny-sd15", unet_fp, "HINT"); }, MF_ERROR_ENGINE);

  // IP-Adapter image encoders: the one of the IP-Adapter's length the folder has entries and a record of.
  Entry enc_a, enc_b;
  enc_a.model = enc_b.model = "tiny-sd15";
  enc_a.network = enc_b.network = "image_encoder";
  enc_a.backend = enc_b.backend = "aoti";
  enc_a.weights = "mf2:files:" + std::string(64, 'a'), enc_b.weights = "mf2:files:" + std::string(64, 'b');
  ImageEncoderFacts clip;
  clip.source = "/enc/a", clip.image_size = 224, clip.projection_dim = 24, clip.shortest_edge = 224;
  clip.crop_height = clip.crop_width = 224;
  f.models["tiny-sd15"].image_encoders[enc_a.weights] = clip;
  const std::string build = "HINT --ip-adapter-encoder <folder>";
  expect_failure("no image encoder entries", "no image_encoder (IP-Adapter image encoder) aoti engine of 24 features "
                 "for tiny-sd15 in /engines; build it with: HINT --ip-adapter-encoder <folder>",
                 [&] { resolve_image_encoder(f, "tiny-sd15", 24, build); }, MF_ERROR_ENGINE);
  f.entries.push_back(enc_a);
  ImageEncoderId enc = resolve_image_encoder(f, "tiny-sd15", 24, build);
  check(enc.fingerprint == enc_a.weights && enc.facts.source == "/enc/a", "the recorded encoder with entries");
  expect_failure("an encoder of another length", "no image_encoder (IP-Adapter image encoder) aoti engine of 32",
                 [&] { resolve_image_encoder(f, "tiny-sd15", 32, build); }, MF_ERROR_ENGINE);
  ImageEncoderFacts clip_b = clip;
  clip_b.source = "/enc/b";
  f.models["tiny-sd15"].image_encoders[enc_b.weights] = clip_b;
  f.entries.push_back(enc_b);
  expect_failure("two encoders", "hold 2 IP-Adapter image encoders of 24 features (from /enc/a, /enc/b)",
                 [&] { resolve_image_encoder(f, "tiny-sd15", 24, build); }, MF_ERROR_ENGINE);
  // clip_steps against transformers' (get_resize_output_image_size, center_crop; values from Python).
  ClipSteps s = clip_steps(clip, 640, 480);  // height the shorter: 224 x int(224 * 640 / 480) = 298
  check(s.resize_h == 224 && s.resize_w == 298 && s.top == 0 && s.left == 37 && s.crop_h == 224, "640x480");
  s = clip_steps(clip, 40, 48);  // width the shorter: int(224 * 48 / 40) = 268 (268.8)
  check(s.resize_w == 224 && s.resize_h == 268 && s.top == 22 && s.left == 0, "40x48");
  s = clip_steps(clip, 300, 300);
  check(s.resize_w == 224 && s.resize_h == 224 && s.top == 0 && s.left == 0, "square");
  ImageEncoderFacts odd = clip;
  odd.resample = 1;
  expect_failure("resample lanczos", "resizes with PIL resample 1; libmegafusion reproduces bilinear (2) and bicubic "
                 "(3) only", [&] { clip_steps(odd, 64, 64); }, MF_ERROR_ENGINE);
  odd = clip, odd.do_resize = false;
  expect_failure("image smaller than the crop", "IP-Adapter image 100x300 is 100x300 after the resize, smaller than "
                 "the encoder's crop 224x224", [&] { clip_steps(odd, 100, 300); });
  odd = clip, odd.crop_height = odd.crop_width = 200;
  expect_failure("crop not the engine's side", "makes 200x200 pixel values of a 64x64 image; its engine takes 224x224",
                 [&] { clip_steps(odd, 64, 64); }, MF_ERROR_ENGINE);

  // SD3 / FLUX block samples summed as export/dit_controlnet_aoti.py control_layout sums them (its numbers in
  // tests/engine/test_dit_controlnet_engines.py test_layout_sums_over_the_shorter_list, and SD3's zip).
  using Names = std::vector<std::string>;
  const Names one = {"block_0", "single_0"}, no_singles = {"block_0"};
  check(flow_control_residuals(true, {one}) == one, "flux: one net's samples");
  check(flow_control_residuals(true, {one, no_singles}) == one, "flux: a net without singles keeps the sum's");
  check(flow_control_residuals(true, {no_singles, one}) == no_singles, "flux: a first net without singles: none");
  check(flow_control_residuals(false, {{"block_0", "block_1", "block_2"}, {"block_0", "block_1"}}) ==
            Names{"block_0", "block_1"},
        "sd3: the shorter list");

  std::cout << (g_failures ? "FAILED " : "passed ") << g_failures << " failures\n";
  return g_failures ? 1 : 0;
}
