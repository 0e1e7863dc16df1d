// The context's IP-Adapter (runtime/ipadapter.py EngineIPAdapterNetworks, engine/ipadapter_engines.py): the folder's
// unet_ip packages in the UNet's place, fed the caller's image embeddings.
#include "context.hpp"

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

at::Tensor Context::run_ip(std::vector<at::Tensor> inputs, int dilation) {
  const at::Tensor& sample = inputs[0];
  const std::vector<long long> shape(sample.sizes().begin(), sample.sizes().end());
  Network& n = ip_net(*ip_, dilation, shape);
  inputs.push_back(ip_buffers_.at({ip_->fingerprint, sample.size(0)}));
  return n.run(inputs).at(0).to(at::kFloat);
}

}  // namespace megafusion::lib
