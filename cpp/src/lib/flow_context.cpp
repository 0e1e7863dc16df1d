// runtime/flow_pipeline.py (eager mode) and runtime/flow_conditioning.py on packages, in their notation and with
// their float32 rounding: each arithmetic step is the same ATen op on the same dtypes, so a CPU run gives the
// Python run's latent; image to image as runtime/flow_img2img.py; ControlNets in flow_control.cpp; the buffered
// step and its CUDA graphs in flow_steps.cpp.
#include "flow_context.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#ifndef MEGAFUSION_TORCH_VERSION
#error "MEGAFUSION_TORCH_VERSION must name the torch the library is built against (CMake sets it)"
#endif

namespace megafusion::lib {

at::ScalarType flow_dtype(const std::string& precision) {
  return precision == "fp16" ? at::kHalf : precision == "bf16" ? at::kBFloat16 : at::kFloat;
}

at::Tensor pack(const at::Tensor& z) {
  const int64_t b = z.size(0), c = z.size(1), h = z.size(2), w = z.size(3);
  return z.view({b, c, h / 2, 2, w / 2, 2}).permute({0, 2, 4, 1, 3, 5}).reshape({b, (h / 2) * (w / 2), c * 4});
}

at::Tensor unpack(const at::Tensor& x, int64_t h, int64_t w) {
  const int64_t b = x.size(0), d = x.size(2);
  return x.view({b, h / 2, w / 2, d / 4, 2, 2}).permute({0, 3, 1, 4, 2, 5}).reshape({b, d / 4, h, w});
}

namespace {

// runtime/relay.py resize_clamped, with torch's own bicubic (what the Python CPU path runs).
at::Tensor resize_clamped(const at::Tensor& image, int64_t height, int64_t width) {
  return at::upsample_bicubic2d(image.clamp(-1.0, 1.0), {height, width}, false, std::nullopt, std::nullopt)
      .clamp(-1.0, 1.0);
}

}  // namespace

FlowContext::FlowContext(const mf_context_options& o) : device_(at::kCPU) {
  if (!o.engine_dir) throw Failure(MF_ERROR_INVALID_ARGUMENT, "options->engine_dir is NULL");
  family_ = o.model ? find_flow_family(o.model) : nullptr;
  if (!family_) throw Failure(MF_ERROR_INVALID_ARGUMENT, "unknown transformer model");
  device_ = parse_device(o.device);
  device_name_ = device_name(device_);
  folder_ = read_engine_folder(o.engine_dir);
  const std::string& name = family_->base.name;
  auto facts = folder_.models.find(name);
  if (facts != folder_.models.end()) {
    scaling_ = facts->second.vae_scaling_factor;
    shift_ = facts->second.vae_shift_factor;
    vocab_sizes_ = facts->second.vocab_sizes;
  }
  // The transformer's precision: fp32 on the CPU; on a GPU fp16, else bf16; else whatever the folder holds.
  std::vector<std::string> order = device_.is_cuda() ? std::vector<std::string>{"fp16", "bf16", "fp32"}
                                                     : std::vector<std::string>{"fp32", "fp16", "bf16"};
  precision_ = order.front();
  for (auto it = order.rbegin(); it != order.rend(); ++it)
    if (std::any_of(folder_.entries.begin(), folder_.entries.end(), [&](const Entry& e) {
          return e.model == name && e.network == "transformer" && e.backend == "aoti" && e.precision == *it &&
                 e.device == device_name_;
        }))
      precision_ = *it;
  if (device_.is_cuda()) at::globalContext().setBenchmarkCuDNN(true);
  hint_ = plan_build_hint(folder_, name, device_name_, "aoti", precision_, "");
  // Choose every generation's entries now, so a folder without them fails here (each names the build command).
  for (int i = 0; i < num_text_encoders(); ++i) entries(i == 0 ? "text_encoder" : "text_encoder_" + std::to_string(i + 1));
  entries("transformer");
  entries("vae_decoder");
}

const std::vector<Entry>& FlowContext::entries(const std::string& network) {
  auto it = entries_.find(network);
  if (it != entries_.end()) return it->second;
  auto chosen = select_entry_sets(folder_, family_->base.name, {{network, 1}}, precision_, device_name_,
                                  MEGAFUSION_TORCH_VERSION, "aoti");
  return entries_.emplace(network, std::move(chosen.at({network, 1}))).first->second;
}

Network& FlowContext::net(const std::string& network, const std::vector<long long>& first, const std::string& what,
                          const std::string& hint) {
  const std::vector<Entry>& candidates = entries(network);
  const Entry* e = nullptr;
  std::string built;
  for (const Entry& c : candidates) {
    if (!e && !c.range.empty() && holds(c.range[0], first)) e = &c;
    built += (built.empty() ? "" : ", ") + shape_text(c.range.empty() ? std::vector<long long>{} : c.range[0].min);
  }
  if (!e)
    throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "no " + family_->base.name + " " + network + " package in " +
                                                 folder_.root + " takes " + what + " (input " + shape_text(first) +
                                                 "; built: " + built + "). Build them with: " +
                                                 (hint.empty() ? hint_ : hint));
  auto it = nets_.find(e->digest);
  if (it != nets_.end()) return *it->second;
  verify_files(folder_.root, *e);
  return *nets_.emplace(e->digest, std::make_unique<AotiNetwork>(folder_.root, *e, device_)).first->second;
}

StagePlan FlowContext::plan_of(const mf_generate_params& p) const {
  return plan_from_params(
      p, [this](const std::vector<StageSize>& s, std::optional<int> w, std::optional<int> h) {
        return validate_flow_plan(*family_, s, w, h);
      },
      [this](std::optional<int> w, std::optional<int> h, std::optional<int> total) {
        return default_flow_plan(*family_, w, h, total);
      });
}

std::string FlowContext::encoder_network(const std::string& encoder) const {
  if (encoder == "clip_l") return "text_encoder";
  if (encoder == "clip_g") return "text_encoder_2";
  return "text_encoder_" + std::to_string(num_text_encoders());  // t5: the last
}

void FlowContext::check_coverage(const StagePlan& plan, bool pixel_relay, int64_t batch, size_t first, bool photo,
                                 const FlowControls* controls) {
  std::string stages;
  for (const StageSize& s : plan.stages) stages += (stages.empty() ? "" : ",") + stage_str(s);
  hint_ = plan_build_hint(folder_, family_->base.name, device_name_, "aoti", precision_, stages);
  if (family_->cfg() && batch == 1) hint_ += " --guidance 1";
  const int vs = family_->base.vae_scale;
  const size_t last = plan.stages.size() - 1;
  for (size_t k = first; k <= last; ++k) {  // image to image: the stages before the photo's do not run
    const StageSize& s = plan.stages[k];
    const long long h = s.height / vs, w = s.width / vs;
    const std::string at = "the " + std::to_string(s.width) + "x" + std::to_string(s.height) + " stage";
    const std::vector<long long> sample = family_->flux()
        ? std::vector<long long>{batch, (h / 2) * (w / 2), family_->latent_channels * 4LL}
        : std::vector<long long>{batch, family_->latent_channels, h, w};
    const std::string at_batch = at + " at batch " + std::to_string(batch);
    if (controls) {
      for (const FlowControl& c : controls->nets) control_net(*controls, &c, sample, at_batch);
      control_net(*controls, nullptr, sample, at_batch);
    } else {
      net("transformer", sample, at_batch);
    }
    if (k == last || pixel_relay) net("vae_decoder", {1, family_->latent_channels, h, w}, at);
    if (k > first && (pixel_relay || controls)) net("vae_encoder", {1, 3, s.height, s.width}, at);
    if (k == first && (photo || controls)) {
      // mf-build-engines builds VAE encoders for the pixel relay's stages after the first; for a photo or control
      // image at the first stage (or under the latent relay) the command to name builds one at this size: the
      // stage twice.
      const StageSize once{s.height, s.width, 1};
      const std::string hint = pixel_relay && k > 0
                                   ? hint_
                                   : plan_build_hint(folder_, family_->base.name, device_name_, "aoti", precision_,
                                                     stage_str(once) + "," + stage_str(once)) + " --networks vae";
      net("vae_encoder", {1, 3, s.height, s.width},
          at + (photo ? " (the photo's entry stage)" : " (the control image's encode)"), hint);
    }
  }
}

FlowContext::Conditioning FlowContext::encode(const std::map<std::string, std::vector<int32_t>>& tokens) {
  const bool sd3 = family_->cfg();
  std::vector<std::string> clips = sd3 ? std::vector<std::string>{"clip_l", "clip_g"} : std::vector<std::string>{"clip_l"};
  auto run = [&](const std::string& encoder, size_t index) {
    const std::vector<int32_t>& ids = tokens.at(encoder);
    const long long vocab = index < vocab_sizes_.size() ? vocab_sizes_[index] : 0;
    for (size_t j = 0; j < ids.size(); ++j)
      if (vocab > 0 && ids[j] >= vocab)
        throw Failure(MF_ERROR_INVALID_ARGUMENT, encoder + " token id " + std::to_string(ids[j]) + " at position " +
                                                     std::to_string(j) + " is outside its vocabulary of " +
                                                     std::to_string(vocab));
    const long long n = static_cast<long long>(ids.size());
    at::Tensor t = at::from_blob(const_cast<int32_t*>(ids.data()), {1, n}, at::kInt).clone().to(device_);
    std::vector<at::Tensor> out = net(encoder_network(encoder), {1, n}, encoder + " ids").run({t});
    for (auto& x : out) x = x.to(at::kFloat);
    return out;
  };
  std::vector<std::vector<at::Tensor>> clip;
  for (size_t i = 0; i < clips.size(); ++i) clip.push_back(run(clips[i], i));
  at::Tensor t5 = run("t5", clips.size()).at(0);
  if (!sd3) return {t5, clip[0].at(1)};  // FLUX: T5's tokens; pooled = CLIP-L's pooler output
  // SD3: CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's tokens; both pooled side by side.
  at::Tensor hidden = at::cat({clip[0].at(0), clip[1].at(0)}, -1);
  hidden = at::constant_pad_nd(hidden, {0, t5.size(-1) - hidden.size(-1)});
  return {at::cat({hidden, t5}, -2), at::cat({clip[0].at(1), clip[1].at(1)}, -1)};
}

const std::pair<at::Tensor, at::Tensor>& FlowContext::rotary(int64_t h, int64_t w) {
  auto key = std::make_pair(h, w);
  auto it = rotary_.find(key);
  if (it != rotary_.end()) return it->second;
  // FLUX's position ids in the transformer's dtype: text tokens (0, 0, 0), then image tokens (0, row, column);
  // FluxPosEmbed on them (theta 10000, float64 frequencies, cos and sin each interleaved with itself).
  const auto f = flow_dtype(precision_);
  at::Tensor img = at::zeros({h / 2, w / 2, 3});
  img.select(2, 1).add_(at::arange(h / 2, at::kFloat).unsqueeze(1));
  img.select(2, 2).add_(at::arange(w / 2, at::kFloat).unsqueeze(0));
  at::Tensor ids = at::cat({at::zeros({family_->t5_max_length, 3}), img.reshape({-1, 3})}).to(f);
  at::Tensor pos = ids.to(at::kFloat);
  std::vector<at::Tensor> cos, sin;
  for (size_t i = 0; i < family_->rope_axes.size(); ++i) {
    const int d = family_->rope_axes[i];
    at::Tensor freqs = at::reciprocal(at::pow(10000.0, at::arange(0, d, 2, at::kDouble) / d)) * 1.0 / 1.0;
    at::Tensor angles = at::outer(pos.select(1, static_cast<int64_t>(i)), freqs);
    cos.push_back(at::repeat_interleave(angles.cos(), 2, 1).to(at::kFloat));
    sin.push_back(at::repeat_interleave(angles.sin(), 2, 1).to(at::kFloat));
  }
  return rotary_.emplace(key, std::make_pair(at::cat(cos, -1).to(device_), at::cat(sin, -1).to(device_)))
      .first->second;
}

at::Tensor FlowContext::velocity(const at::Tensor& z, const at::Tensor& t, const Conditioning& c,
                                 const at::Tensor& guidance, const at::Tensor& step) {
  if (controls_) return controlled_velocity(z, t, c, guidance, step);
  const auto f = flow_dtype(precision_);
  const int64_t b = z.size(0), h = z.size(2), w = z.size(3);
  if (!family_->flux()) {
    std::vector<at::Tensor> in = {z.to(f).contiguous(), t, c.states.to(f).contiguous(), c.pooled.to(f).contiguous()};
    return net("transformer", {b, z.size(1), h, w}, "this latent").run(in).at(0).to(at::kFloat);
  }
  at::Tensor tokens = pack(z).to(f).contiguous();
  std::vector<at::Tensor> in = {tokens, (t.to(f) / 1000).contiguous()};
  if (family_->guidance_embeds) in.push_back(guidance);
  const auto& [cos, sin] = rotary(h, w);
  in.insert(in.end(), {c.states.to(f).contiguous(), c.pooled.to(f).contiguous(), cos, sin});
  std::vector<long long> shape(tokens.sizes().begin(), tokens.sizes().end());
  return unpack(net("transformer", shape, "this latent").run(in).at(0).to(at::kFloat), h, w);
}

at::Tensor FlowContext::decode(const at::Tensor& latent) {
  std::vector<long long> s(latent.sizes().begin(), latent.sizes().end());
  return net("vae_decoder", s, "this latent").run({latent.contiguous()}).at(0).to(at::kFloat);
}

at::Tensor FlowContext::encode_image(const at::Tensor& image) {
  std::vector<long long> s(image.sizes().begin(), image.sizes().end());
  return net("vae_encoder", s, "this image").run({image.contiguous()}).at(0).to(at::kFloat);
}

void FlowContext::generate(const mf_generate_params& p, const Inputs* inputs, uint8_t* rgb, size_t rgb_bytes) {
  const std::string& name = family_->base.name;
  const StagePlan plan = plan_of(p);
  const std::string relay = p.relay && *p.relay ? p.relay : "pixel";
  if (relay != "pixel" && relay != "latent")
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "unknown relay mode '" + relay + "'; choose pixel or latent");
  if (!(std::isfinite(p.guidance) && p.guidance >= 0))
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "guidance must be a finite number >= 0, got " + std::to_string(p.guidance));
  if (p.dilation != 1 && p.dilation != 2)  // 2: mf_generate_params_init's; a transformer has nothing to dilate
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "dilation " + std::to_string(p.dilation) + ": " + name +
                                                 " has no dilation (leave it at 1 or the default)");
  const size_t need = check_rgb_buffer(rgb, rgb_bytes, plan);
  for (int i = 0; i < MF_MAX_TEXT_ENCODERS; ++i)
    if (p.prompt_ids[i] || p.negative_ids[i])
      throw Failure(MF_ERROR_INVALID_ARGUMENT, name + " takes its token ids through mf_inputs_set_tokens, not "
                                                      "params->prompt_ids / negative_ids");
  if (inputs && (inputs->ip_image || !inputs->ip_embeds.empty()))  // their IP-Adapters run in torch only
    throw Failure(MF_ERROR_INVALID_ARGUMENT, name + " takes no IP-Adapter image or embeds through the C API (its "
                                                    "IP-Adapters run in Python, torch only); SD1.5 and SDXL do");
  // Image to image (docs/ALGORITHM.md §18.1): the stage and step the photo enters at, under the flow rule.
  const InitImage* photo = inputs && inputs->init ? &*inputs->init : nullptr;
  const EntryPoint entry = photo ? flow_entry_point(plan, photo->strength, photo->start_stage) : EntryPoint{};
  const bool cfg = family_->cfg() && p.guidance > 1.0f;
  std::vector<std::string> encoders = family_->cfg() ? std::vector<std::string>{"clip_l", "clip_g", "t5"}
                                                     : std::vector<std::string>{"clip_l", "t5"};
  auto check_tokens = [&](const std::map<std::string, std::vector<int32_t>>& given, const std::string& which) {
    for (const auto& [enc, ids] : given) {
      if (std::find(encoders.begin(), encoders.end(), enc) == encoders.end())
        throw Failure(MF_ERROR_INVALID_ARGUMENT, name + " has no " + enc + " encoder");
      const size_t want = enc == "t5" ? family_->t5_max_length : MF_TOKEN_LENGTH;
      if (ids.size() != want)
        throw Failure(MF_ERROR_INVALID_ARGUMENT, which + enc + ": " + std::to_string(ids.size()) + " token ids; " +
                                                     name + " takes " + std::to_string(want));
    }
    for (const std::string& enc : encoders)
      if (!given.count(enc))
        throw Failure(MF_ERROR_INVALID_ARGUMENT, "no " + which + enc + " token ids; set them with mf_inputs_set_" +
                                                     (which.empty() ? "" : "negative_") + "tokens");
  };
  check_tokens(inputs ? inputs->tokens : std::map<std::string, std::vector<int32_t>>{}, "");
  if (inputs && !inputs->negative_tokens.empty() && !cfg)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, family_->cfg() ? "negative token ids given but guidance <= 1 runs no CFG"
                                                            : name + " is guidance-distilled: it takes no negative prompt");
  if (cfg) check_tokens(inputs->negative_tokens, "negative ");
  if (scaling_ <= 0) throw Failure(MF_ERROR_ENGINE, "models.json in " + folder_.root + " has no VAE scaling factor");
  // ControlNets (§18 "ControlNet"): named, their packages found for every stage that runs, before any work.
  const bool controlled = inputs && !inputs->controls.empty();
  FlowControls controls = controlled ? resolve_controls(inputs->controls, plan, cfg ? 2 : 1) : FlowControls{};
  check_coverage(plan, relay == "pixel", cfg ? 2 : 1, entry.stage, photo != nullptr, controlled ? &controls : nullptr);

  c10::InferenceMode guard;
  Conditioning cond = encode(inputs->tokens);
  if (cfg) {  // batch [negative, prompt]
    Conditioning neg = encode(inputs->negative_tokens);
    cond = {at::cat({neg.states, cond.states}), at::cat({neg.pooled, cond.pooled})};
  }
  const std::vector<FlowStageSchedule> schedules = plan_flow_schedule(plan, *family_, p.reschedule != 0);
  if (controlled) prepare_controls(controls, plan, entry.stage);
  struct Unset {  // the plain transformer again after this generation, however it ends
    const FlowControls*& p;
    ~Unset() { p = nullptr; }
  } unset{controls_};
  controls_ = controlled ? &controls : nullptr;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(p.seed);
  // Noise as diffusers draws it with a CPU generator, in the transformer's dtype (runtime/pipeline.py draw_noise).
  const auto f = flow_dtype(precision_);
  auto draw_noise = [&](int64_t h, int64_t w) {
    return at::randn({1, family_->latent_channels, h, w}, gen, f).to(at::kFloat).to(device_);
  };
  const int vs = family_->base.vae_scale;
  const float w = p.guidance;
  at::Tensor z, x0;
  StepProgress progress(inputs, plan.total_steps() - entry.global_step, device_);
  const size_t last = plan.stages.size() - 1;
  int64_t first_step = 0;  // global index of this stage's first step (skipped steps keep their places)
  for (size_t k = 0; k <= last; first_step += plan.stages[k].steps, ++k) {
    if (photo && k < entry.stage) continue;  // image to image: the photo enters at a later stage
    const StageSize& st = plan.stages[k];
    const FlowStageSchedule& c = schedules[k];
    // FlowStageSchedule.tensors: float32 sigmas, d_sigma = sigma_s - sigma_t and timestep = 1000 sigma_t in float32;
    // at the photo's stage without its first entry.step steps (runtime/flow_img2img.py skip_flow_steps).
    std::vector<float> sigma_t, d_sigma, timestep;
    for (size_t i = photo && k == entry.stage ? entry.step : 0; i < c.sigma_t.size(); ++i) {
      const float t32 = static_cast<float>(c.sigma_t[i]), s32 = static_cast<float>(c.sigma_s[i]);
      sigma_t.push_back(t32);
      d_sigma.push_back(s32 - t32);
      timestep.push_back(t32 * 1000.0f);
    }
    const int64_t h = st.height / vs, wd = st.width / vs;
    at::Tensor noise = draw_noise(h, wd);
    if (photo && k == entry.stage) {
      // The photo as this stage's x0 ((posterior mean - shift) c at the stage's size, resized as the pixel relay
      // resizes), noised to its first kept sigma, in the latent dtype as diffusers' prepare_latents leaves it.
      at::Tensor pixels = resize_clamped((unit_rgb(photo->image) * 2.0 - 1.0).to(device_), st.height, st.width);
      at::Tensor x0_photo = (encode_image(pixels) - shift_) * scaling_;
      z = (x0_photo * (1.0f - sigma_t[0]) + noise * sigma_t[0]).to(f).to(at::kFloat);
    } else if (k == 0) {
      z = noise;
    } else {  // relay the truncated x0 to this stage's size, re-noise z = (1 - sigma') x0_up + sigma' noise
      at::Tensor x0_up;
      if (relay == "pixel") {
        at::Tensor image = decode(x0 / scaling_ + shift_);
        x0_up = (encode_image(resize_clamped(image, st.height, st.width)) - shift_) * scaling_;
      } else {
        x0_up = at::upsample_bicubic2d(x0, {h, wd}, false, std::nullopt, std::nullopt);
      }
      z = x0_up * (1.0f - sigma_t[0]) + noise * sigma_t[0];
    }
    const size_t steps = sigma_t.size();
    const int64_t skipped = static_cast<int64_t>(c.sigma_t.size() - steps);
    if (graphs_on_) {  // the same step, buffered: captured once per descriptor on CUDA, replayed every step
      std::tie(z, x0) = run_stage(z, sigma_t, d_sigma, timestep, cond, w, cfg, first_step + skipped, progress);
      continue;  // a truncated stage keeps its last x0; its updated z is not used
    }
    const int64_t batch = cfg ? 2 : 1;
    const auto fp32 = at::TensorOptions().dtype(at::kFloat).device(device_);
    const at::Tensor guidance = at::full({batch}, w, fp32);
    for (size_t i = 0; i < steps; ++i) {
      const at::Tensor t = at::full({batch}, timestep[i], fp32);  // 1000 sigma_t, float32
      const at::Tensor step = at::full({1}, first_step + skipped + static_cast<int64_t>(i), fp32.dtype(at::kLong));
      at::Tensor v = velocity(cfg ? at::cat({z, z}) : z, t, cond, guidance, step);
      if (cfg) {
        auto parts = v.chunk(2);
        v = parts[0] + (parts[1] - parts[0]) * w;
      }
      x0 = z - v * sigma_t[i];
      progress.step();
      if (k < last && i == steps - 1) break;  // truncate: x0 from the pre-update latent
      z = z + v * d_sigma[i];                  // Euler: z_s = z_t + (sigma_s - sigma_t) v
      z = z.to(f).to(at::kFloat);              // the pipelines keep the latent in the model's dtype
    }
  }
  at::Tensor image = decode(z / scaling_ + shift_);
  at::Tensor px = ((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(at::kByte).permute({1, 2, 0});
  const int64_t top = (px.size(0) - plan.output_height) / 2, left = (px.size(1) - plan.output_width) / 2;
  px = px.slice(0, top, top + plan.output_height).slice(1, left, left + plan.output_width).contiguous().cpu();
  std::memcpy(rgb, px.data_ptr<uint8_t>(), need);
}

}  // namespace megafusion::lib
