// The context's IP-Adapter (runtime/ipadapter.py EngineIPAdapterNetworks, engine/ipadapter_engines.py): the folder's
// unet_ip packages in the UNet's place, fed the caller's image embeddings, or those the folder's image encoder
// package (engine/image_encoder_engines.py) gives the caller's image.
#include "context.hpp"

#include <algorithm>

namespace megafusion::lib {

Network& Context::ip_net(const IpAdapterId& ip, int dilation, const std::vector<long long>& sample) {
  const std::string variant = dilation == 1 ? "standard" : "dilated";
  const std::string what = "unet_ip (" + variant + ") " + precision_ + " aoti of the IP-Adapter at scale " + ip.scale;
  auto key = std::make_tuple(std::string("unet_ip"), ip.fingerprint, dilation);
  auto it = control_entries_.find(key);
  if (it == control_entries_.end())
    it = control_entries_
             .emplace(key, control_entries(folder_, family_->name, "unet_ip", dilation, ip.fingerprint, precision_,
                                           device_name_, MEGAFUSION_TORCH_VERSION, what, ip_hint_))
             .first;
  std::string have;
  for (const Entry& e : it->second) {
    for (const TensorRange& r : e.range)
      if (r.name == "sample" && holds(r, sample)) {
        auto n = nets_.find(e.digest);
        if (n != nets_.end()) return *n->second;
        verify_files(folder_.root, e);
        return *nets_.emplace(e.digest, std::make_unique<AotiNetwork>(folder_.root, e, device_)).first->second;
      }
    const std::string sizes = served_sizes(e, family_->vae_scale);
    if (have.find(sizes) == std::string::npos) have += (have.empty() ? "" : ", ") + sizes;
  }
  const long long vs = family_->vae_scale;
  throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "the engines in " + folder_.root + " do not cover " + what + " at " +
                                               std::to_string(sample[3] * vs) + "x" + std::to_string(sample[2] * vs) +
                                               "; they cover " + have + ". Build them with: " + ip_hint_);
}

void Context::prepare_ip(const IpAdapterId& ip, const std::vector<float>& embeds, int64_t batch) {
  // (batch, 1, D) in the UNet's dtype: runtime/ipadapter.py cfg_image_embeds, [zeros, embeds] with CFG.
  const auto n = static_cast<int64_t>(embeds.size());
  at::Tensor e = at::from_blob(const_cast<float*>(embeds.data()), {1, 1, n}, at::kFloat).clone();
  if (batch == 2) e = at::cat({at::zeros_like(e), e});
  const at::ScalarType f = precision_ == "fp16" ? at::kHalf : precision_ == "bf16" ? at::kBFloat16 : at::kFloat;
  e = e.to(device_, f);
  auto key = std::make_pair(ip.fingerprint, batch);
  auto it = ip_buffers_.find(key);
  if (it == ip_buffers_.end())
    ip_buffers_.emplace(key, e.contiguous());
  else
    it->second.copy_(e);  // the tensor a captured step reads
}

IpAdapterId Context::folder_ip_adapter(const std::string& plan_hint) const {
  auto facts = folder_.models.find(family_->name);
  const std::string unet_fp =
      facts != folder_.models.end() && facts->second.weights.count("unet") ? facts->second.weights.at("unet") : "";
  return resolve_ip_adapter(folder_, family_->name, unet_fp, plan_hint);
}

Network& Context::ip_encoder(const IpAdapterId& ip, const RgbImage& image, const std::string& plan_hint,
                             ImageEncoderFacts* facts) {
  const std::string build = plan_hint + " --ip-adapter <the IP-Adapter file of sha256 " + ip.file_sha256.substr(0, 12) +
                            "...> --ip-adapter-scale " + ip.scale +
                            " --ip-adapter-encoder <its CLIP vision model folder>";
  const ImageEncoderId enc = resolve_image_encoder(folder_, family_->name, ip.dim, build);
  clip_steps(enc.facts, image.width, image.height);  // the image's refusals, before any work
  if (facts) *facts = enc.facts;
  const std::string what = "image_encoder " + precision_ + " aoti of " + enc.facts.source;
  auto key = std::make_tuple(std::string("image_encoder"), enc.fingerprint, 1);
  auto it = control_entries_.find(key);
  if (it == control_entries_.end())
    it = control_entries_
             .emplace(key, control_entries(folder_, family_->name, "image_encoder", 1, enc.fingerprint, precision_,
                                           device_name_, MEGAFUSION_TORCH_VERSION, what, build))
             .first;
  const Entry& e = it->second.front();  // one fixed shape: the newest valid entry
  auto n = nets_.find(e.digest);
  if (n != nets_.end()) return *n->second;
  verify_files(folder_.root, e);
  return *nets_.emplace(e.digest, std::make_unique<AotiNetwork>(folder_.root, e, device_)).first->second;
}

std::vector<float> Context::encode_ip_image(const IpAdapterId& ip, const RgbImage& image,
                                           const std::string& plan_hint) {
  ImageEncoderFacts facts;
  Network& net = ip_encoder(ip, image, plan_hint, &facts);
  c10::InferenceMode guard;
  const at::ScalarType f = precision_ == "fp16" ? at::kHalf : at::kFloat;  // the entry's, as chosen
  const at::Tensor pixels = clip_pixel_values(image, facts).to(device_, f);
  const at::Tensor e = net.run({pixels}).at(0).to(at::kFloat).cpu().contiguous().reshape({-1});
  if (e.numel() != ip.dim)
    throw Failure(MF_ERROR_ENGINE, "the image_encoder package of " + facts.source + " gave " +
                                       std::to_string(e.numel()) + " values; the unet_ip packages take " +
                                       std::to_string(ip.dim));
  return std::vector<float>(e.data_ptr<float>(), e.data_ptr<float>() + e.numel());
}

void Context::ip_image_embeds(const RgbImage& image, float* out, size_t n) {
  if (backend_ != "aoti")
    throw Failure(MF_ERROR_ENGINE, "IP-Adapters run on aoti packages; the " + family_->name + " engines in " +
                                       folder_.root + " this context runs are " + backend_);
  const std::string hint = plan_build_hint(folder_, family_->name, device_name_, backend_, precision_, "");
  const IpAdapterId ip = folder_ip_adapter(hint);
  if (static_cast<long long>(n) != ip.dim)
    throw Failure(MF_ERROR_INVALID_ARGUMENT, "IP-Adapter embeds: room for " + std::to_string(n) + " floats given, " +
                                                 "the unet_ip engines in " + folder_.root + " take " +
                                                 std::to_string(ip.dim) + " (the image encoder's projection dim)");
  const std::vector<float> e = encode_ip_image(ip, image, hint);
  std::copy(e.begin(), e.end(), out);
}

at::Tensor Context::run_ip(std::vector<at::Tensor> inputs, int dilation) {
  const at::Tensor& sample = inputs[0];
  const std::vector<long long> shape(sample.sizes().begin(), sample.sizes().end());
  Network& n = ip_net(*ip_, dilation, shape);
  inputs.push_back(ip_buffers_.at({ip_->fingerprint, sample.size(0)}));
  return n.run(inputs).at(0).to(at::kFloat);
}

}  // namespace megafusion::lib
