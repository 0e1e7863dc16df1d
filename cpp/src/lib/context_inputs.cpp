// The context's inputs beyond the params (mf_inputs): the photo of image to image (docs/ALGORITHM.md §14,
// runtime/img2img.py) and ControlNets (§16, runtime/controlnet.py), as the Python runtime computes them.
#include <algorithm>

#include "context.hpp"

namespace megafusion::lib {

namespace {

constexpr int64_t kTrainSteps = 1000;  // the scale table's length: one slot per training timestep

at::ScalarType unet_dtype(const std::string& precision) {
  return precision == "fp16" ? at::kHalf : precision == "bf16" ? at::kBFloat16 : at::kFloat;
}

}  // namespace

at::Tensor resize_control(const at::Tensor& image, int height, int width) {
  if (image.size(2) == height && image.size(3) == width) return image;
  return at::upsample_bicubic2d(image, {height, width}, false, std::nullopt, std::nullopt).clamp(0.0, 1.0);
}

at::Tensor unit_rgb(const RgbImage& im) {
  at::Tensor out = at::empty({1, 3, im.height, im.width}, at::kFloat);
  float* o = out.data_ptr<float>();
  const size_t plane = static_cast<size_t>(im.width) * im.height;
  for (size_t i = 0; i < plane; ++i)
    for (int ch = 0; ch < 3; ++ch) o[ch * plane + i] = static_cast<float>(im.rgb[i * 3 + ch]) / 255.0f;
  return out;
}

at::Tensor Context::photo_latent(const RgbImage& photo, const StageSize& stage) {
  // runtime/img2img.py read_image (* 2 - 1, as diffusers' image processor) and encode_image: the pixel relay's
  // resize and encode, times the VAE scaling factor.
  at::Tensor image = (unit_rgb(photo) * 2.0 - 1.0).to(device_);
  const Network& enc = net_at("vae_encoder", 1, {{1, 3, stage.height, stage.width}});
  return encode(relay_resize(image, stage.height, stage.width, unet_dtype(enc.entry().precision))) * scaling_;
}

Network& Context::control_net(const ControlNetId* id, int dilation, const std::vector<long long>& sample, int image_h,
                              int image_w) {
  const std::string network = id ? "controlnet" : "unet_controlled";
  auto facts = folder_.models.find(family_->name);
  std::string weights = id ? id->fingerprint : "";
  if (!id && facts != folder_.models.end() && facts->second.weights.count("unet"))
    weights = facts->second.weights.at("unet");  // the controlled UNet's key holds the UNet's fingerprint
  const std::string variant = dilation == 1 ? "standard" : "dilated";
  const std::string what = network + (id ? " '" + id->name + "'" : "") + " (" + variant + ") " + precision_ + " aoti";
  auto key = std::make_tuple(network, weights, dilation);
  auto it = control_entries_.find(key);
  if (it == control_entries_.end())
    it = control_entries_
             .emplace(key, control_entries(folder_, family_->name, network, dilation, weights, precision_, device_name_,
                                           MEGAFUSION_TORCH_VERSION, what, control_hint_))
             .first;
  const std::vector<Entry>& candidates = it->second;
  auto input = [](const Entry& e, const std::string& name) -> const TensorRange* {
    for (const TensorRange& r : e.range)
      if (r.name == name) return &r;
    return nullptr;
  };
  const std::vector<long long> cond = {sample[0], 3, image_h, image_w};
  for (const Entry& e : candidates) {
    const TensorRange* s = input(e, "sample");
    const TensorRange* c = input(e, "controlnet_cond");
    if (s && holds(*s, sample) && (!id || (c && holds(*c, cond)))) {
      auto n = nets_.find(e.digest);
      if (n != nets_.end()) return *n->second;
      verify_files(folder_.root, e);
      return *nets_.emplace(e.digest, std::make_unique<AotiNetwork>(folder_.root, e, device_)).first->second;
    }
  }
  std::string have;
  for (const Entry& e : candidates) {
    const std::string sizes = served_sizes(e, family_->vae_scale);
    if (have.find(sizes) == std::string::npos) have += (have.empty() ? "" : ", ") + sizes;
  }
  throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "the engines in " + folder_.root + " do not cover " + what + " at " +
                                               std::to_string(image_w) + "x" + std::to_string(image_h) +
                                               "; they cover " + have + ". Build them with: " + control_hint_);
}

void Context::prepare_controls(Controls& c, const std::vector<ControlInput>& in, const StagePlan& plan,
                               const std::vector<StageSchedule>& schedules, int64_t batch) {
  const int64_t n = static_cast<int64_t>(in.size());
  ControlBuffers& buf = control_buffers_[c.key];
  c.buffers = &buf;
  // scale * keep over the plan's global timesteps (all stages, before an image-to-image skip), by timestep.
  std::vector<int64_t> timesteps;
  for (const StageSchedule& s : schedules) timesteps.insert(timesteps.end(), s.timesteps.begin(), s.timesteps.end());
  const int total = static_cast<int>(timesteps.size());
  at::Tensor table = at::zeros({n, kTrainSteps}, at::kFloat);
  float* t = table.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j)
    for (int i = 0; i < total; ++i)
      t[j * kTrainSteps + timesteps[i]] = in[j].scale * control_keep(i, total, in[j].start, in[j].end);
  if (!buf.scales.defined()) buf.scales = at::zeros({n, kTrainSteps}, at::TensorOptions().dtype(at::kFloat).device(device_));
  buf.scales.copy_(table);
  // Each stage's control images at its size, for the UNet batch, in the UNet's dtype.
  const auto f = unet_dtype(precision_);
  std::vector<at::Tensor> images;
  for (const ControlInput& x : in) images.push_back(unit_rgb(x.image));
  const int vs = family_->vae_scale;
  for (const StageSize& st : plan.stages) {
    std::vector<at::Tensor> sized;
    for (const at::Tensor& im : images) sized.push_back(resize_control(im, st.height, st.width)[0]);
    at::Tensor stack = at::stack(sized).unsqueeze(1).expand({-1, batch, -1, -1, -1}).to(device_, f);
    auto key = std::make_tuple(batch, static_cast<int64_t>(st.height / vs), static_cast<int64_t>(st.width / vs));
    auto it = buf.images.find(key);
    if (it == buf.images.end())
      buf.images.emplace(key, stack.contiguous());
    else
      it->second.copy_(stack);  // the tensor a captured step reads
  }
}

at::Tensor Context::run_controlled(std::vector<at::Tensor> inputs, int dilation) {
  // runtime/controlnet.py EngineControlledNetworks.unet: each ControlNet on the UNet's inputs with its image and
  // its scale at this timestep, the residuals summed, then the controlled UNet.
  const at::Tensor& sample = inputs[0];
  const std::vector<long long> shape(sample.sizes().begin(), sample.sizes().end());
  const at::Tensor& images = controls_->buffers->images.at({shape[0], shape[2], shape[3]});
  const int image_h = static_cast<int>(images.size(3)), image_w = static_cast<int>(images.size(4));
  const at::Tensor index = inputs[1].to(at::kLong);
  std::vector<at::Tensor> residuals;
  for (size_t j = 0; j < controls_->ids.size(); ++j) {
    Network& cn = control_net(&controls_->ids[j], dilation, shape, image_h, image_w);
    std::vector<at::Tensor> in = inputs;
    in.push_back(images[static_cast<int64_t>(j)]);
    in.push_back(controls_->buffers->scales[static_cast<int64_t>(j)].index_select(0, index).to(sample.scalar_type()));
    std::vector<at::Tensor> out = cn.run(in);
    if (residuals.empty())
      residuals = std::move(out);
    else
      for (size_t r = 0; r < residuals.size(); ++r) residuals[r] = residuals[r] + out[r];
  }
  Network& unet = control_net(nullptr, dilation, shape, image_h, image_w);
  // Contiguous, as the Python runner hands every input over: the ControlNet's package returns its residuals in
  // the layout it computed them in (channels_last), and the controlled UNet's package reads contiguous strides.
  for (const at::Tensor& r : residuals) inputs.push_back(r.contiguous());
  return unet.run(inputs).at(0).to(at::kFloat);
}

}  // namespace megafusion::lib
