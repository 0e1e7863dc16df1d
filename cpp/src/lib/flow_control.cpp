// ControlNets on SD3 and FLUX (docs/ALGORITHM.md §18 "ControlNet"): runtime/flow_controlnet_engines.py's step on
// the packages mf-build-engines --model sd3|flux --backend aoti --controlnet DIR builds (the ControlNets' and the
// controlled transformer's, engine/dit_controlnet_engines.py), with runtime/flow_controlnet.py's scale table and
// control images: resized to each stage's size, VAE-encoded there, (mean - shift) c, FLUX's packed into tokens.
#include <algorithm>
#include <set>

#include "flow_context.hpp"

#ifndef MEGAFUSION_TORCH_VERSION
#error "MEGAFUSION_TORCH_VERSION must name the torch the library is built against (CMake sets it)"
#endif

namespace megafusion::lib {

namespace {

// Each package's inputs in its spec's order (the entry's range names them), from what the step made.
std::vector<at::Tensor> by_name(const Network& n, const std::map<std::string, at::Tensor>& given) {
  std::vector<at::Tensor> out;
  for (const TensorRange& r : n.entry().range) {
    auto it = given.find(r.name);
    if (it == given.end())
      throw Failure(MF_ERROR_ENGINE, n.entry().describe() + " package takes an input '" + r.name +
                                         "' that libmegafusion does not make");
    out.push_back(it->second);
  }
  return out;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

}  // namespace

FlowContext::FlowControls FlowContext::resolve_controls(const std::vector<ControlInput>& in, const StagePlan& plan,
                                                        int64_t batch) {
  const std::string& name = family_->base.name;
  std::string stages;
  for (const StageSize& s : plan.stages) stages += (stages.empty() ? "" : ",") + stage_str(s);
  std::string hint = plan_build_hint(folder_, name, device_name_, "aoti", precision_, stages);
  if (family_->cfg() && batch == 1) hint += " --guidance 1";
  auto facts = folder_.models.find(name);
  FlowControls out;
  control_hint_ = hint;
  for (const ControlInput& c : in) {
    FlowControl fc{resolve_controlnet(folder_, name, c.controlnet, hint), {}, &c};
    control_hint_ += " --controlnet " + fc.id.source;
    out.key += (out.key.empty() ? "" : ",") + fc.id.fingerprint;
    const bool known = facts != folder_.models.end() && facts->second.flow_controls.count(fc.id.fingerprint);
    if (!known)
      throw Failure(MF_ERROR_ENGINE, "models.json in " + folder_.root + " records no outputs of controlnet '" +
                                         c.controlnet + "' (built before it recorded them); rebuild with: " + hint +
                                         " --controlnet " + fc.id.source);
    fc.facts = facts->second.flow_controls.at(fc.id.fingerprint);
    if (fc.facts.hint_block)
      throw Failure(MF_ERROR_INVALID_ARGUMENT, "controlnet '" + c.controlnet + "' has a pixel hint block (XLabs' "
                                               "FLUX kind), which libmegafusion does not run yet (mf-generate "
                                               "--engines does)");
    out.nets.push_back(std::move(fc));
  }
  std::vector<std::vector<std::string>> outputs;
  for (const FlowControl& fc : out.nets) outputs.push_back(fc.facts.outputs);
  out.residuals = flow_control_residuals(family_->flux(), outputs);
  return out;
}

Network& FlowContext::control_net(const FlowControls& all, const FlowControl* c, const std::vector<long long>& sample,
                                  const std::string& what) {
  const std::string& name = family_->base.name;
  const std::string network = c ? "controlnet" : "transformer_controlled";
  std::string weights = c ? c->id.fingerprint : "";
  auto facts = folder_.models.find(name);
  if (!c && facts != folder_.models.end() && facts->second.weights.count("transformer"))
    weights = facts->second.weights.at("transformer");  // the controlled transformer's key holds the plain one's
  const std::string label = c ? "controlnet '" + c->id.name + "'" : "controlled transformer";
  auto key = std::make_pair(network, weights);
  auto it = control_entries_.find(key);
  if (it == control_entries_.end())
    it = control_entries_
             .emplace(key, control_entries(folder_, name, network, 1, weights, precision_, device_name_,
                                           MEGAFUSION_TORCH_VERSION, name + " " + label + " " + precision_ + " aoti",
                                           control_hint_))
             .first;
  // The controlled transformer's package must take exactly this generation's block samples.
  auto takes = [&](const Entry& e) {
    if (c) return true;
    std::vector<std::string> names;
    for (const TensorRange& r : e.range)
      if (starts_with(r.name, "block_") || starts_with(r.name, "single_")) names.push_back(r.name);
    return e.variant != "blocks-repeat" && names == all.residuals;
  };
  std::string built;
  for (const Entry& e : it->second) {
    if (!e.range.empty() && holds(e.range[0], sample) && takes(e)) {
      auto n = nets_.find(e.digest);
      if (n != nets_.end()) return *n->second;
      verify_files(folder_.root, e);
      return *nets_.emplace(e.digest, std::make_unique<AotiNetwork>(folder_.root, e, device_)).first->second;
    }
    built += (built.empty() ? "" : ", ") + shape_text(e.range.empty() ? std::vector<long long>{} : e.range[0].min);
  }
  throw Failure(MF_ERROR_UNSUPPORTED_SIZE, "no " + name + " " + label + " package in " + folder_.root + " takes " +
                                               what + " (input " + shape_text(sample) + "; built: " + built +
                                               "). Build them with: " + control_hint_);
}

void FlowContext::prepare_controls(FlowControls& c, const StagePlan& plan, size_t first) {
  // scale * keep over the plan's global steps (all stages, before an image-to-image skip); the rest stays 0.
  const int total = plan.total_steps();
  const int64_t n = static_cast<int64_t>(c.nets.size());
  static_assert(kMaxTotalSteps <= kMaxStageSteps, "the scale table holds every global step of a plan");
  at::Tensor table = at::zeros({n, kMaxStageSteps}, at::kFloat);
  float* t = table.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    const ControlInput& in = *c.nets[j].input;
    for (int i = 0; i < total; ++i) t[j * kMaxStageSteps + i] = in.scale * control_keep(i, total, in.start, in.end);
  }
  // The buffers of this list of nets, kept across generations: refilled in place (a captured step reads them).
  FlowControlBuffers& buf = control_buffers_[c.key];
  c.buffers = &buf;
  if (!buf.scales.defined()) buf.scales = at::zeros({n, kMaxStageSteps}, at::TensorOptions().device(device_));
  buf.scales.copy_(table);
  buf.images.resize(static_cast<size_t>(n));
  const auto f = flow_dtype(precision_);
  const int vs = family_->base.vae_scale;
  for (int64_t j = 0; j < n; ++j) {
    const FlowControl& fc = c.nets[j];
    const at::Tensor image = unit_rgb(fc.input->image).to(device_);
    // InstantX's SD3 nets (zero pooled projection) were trained without the VAE's shift.
    const double shift = fc.facts.zero_pooled ? 0.0 : shift_;
    std::set<std::pair<int64_t, int64_t>> done;  // sizes encoded for this generation
    for (size_t k = first; k < plan.stages.size(); ++k) {
      const StageSize& st = plan.stages[k];
      const auto key = std::make_pair(static_cast<int64_t>(st.height / vs), static_cast<int64_t>(st.width / vs));
      if (!done.insert(key).second) continue;
      at::Tensor latent = (encode_image(resize_control(image, st.height, st.width) * 2 - 1) - shift) * scaling_;
      at::Tensor encoded = (family_->flux() ? pack(latent) : latent).to(f);
      auto& images = buf.images[static_cast<size_t>(j)];
      auto it = images.find(key);
      if (it == images.end())
        images.emplace(key, encoded.contiguous());
      else
        it->second.copy_(encoded);
    }
  }
}

at::Tensor FlowContext::controlled_velocity(const at::Tensor& z, const at::Tensor& t, const Conditioning& c,
                                            const at::Tensor& guidance, const at::Tensor& step) {
  const auto f = flow_dtype(precision_);
  const int64_t b = z.size(0), h = z.size(2), w = z.size(3);
  // The transformer's inputs by name (export/dit_aoti.py dit_spec), as velocity() hands them to the plain one.
  std::map<std::string, at::Tensor> in;
  if (!family_->flux()) {
    in["hidden_states"] = z.to(f).contiguous();
    in["timestep"] = t;
  } else {
    in["hidden_states"] = pack(z).to(f).contiguous();
    in["timestep"] = (t.to(f) / 1000).contiguous();
    in["guidance"] = guidance;
    // The nets' position embedding as the transformer's: the family's rope axes (a net with axes_dims_rope of
    // its own would differ; diffusers' FLUX nets share the transformer's).
    const auto& [cos, sin] = rotary(h, w);
    in["rotary_cos"] = cos;
    in["rotary_sin"] = sin;
  }
  in["encoder_hidden_states"] = c.states.to(f).contiguous();
  in["pooled_projections"] = c.pooled.to(f).contiguous();
  const at::Tensor& sample = in["hidden_states"];
  const std::vector<long long> shape(sample.sizes().begin(), sample.sizes().end());
  std::map<std::string, at::Tensor> total;
  for (size_t j = 0; j < controls_->nets.size(); ++j) {
    const FlowControl& fc = controls_->nets[j];
    std::map<std::string, at::Tensor> own = in;
    if (fc.facts.zero_pooled) own["pooled_projections"] = at::zeros_like(in["pooled_projections"]);
    const at::Tensor& image = controls_->buffers->images.at(j).at({h, w});
    std::vector<int64_t> sizes(image.sizes().begin(), image.sizes().end());
    sizes[0] = b;
    own["controlnet_cond"] = image.expand(sizes).contiguous();
    own["conditioning_scale"] = controls_->buffers->scales[static_cast<int64_t>(j)].index_select(0, step).to(f).contiguous();
    Network& net = control_net(*controls_, &fc, shape, "this latent");
    std::vector<at::Tensor> out = net.run(by_name(net, own));
    if (out.size() != fc.facts.outputs.size())
      throw Failure(MF_ERROR_ENGINE, net.entry().describe() + " package returned " + std::to_string(out.size()) +
                                         " block samples; models.json records " +
                                         std::to_string(fc.facts.outputs.size()) + " for controlnet '" +
                                         fc.id.name + "'");
    // The running sum by name, as the Python step sums the packages' outputs (where both have one).
    for (size_t r = 0; r < out.size(); ++r) {
      const std::string& key = fc.facts.outputs[r];
      if (j == 0)
        total[key] = out[r];
      else if (total.count(key))
        total[key] = total[key] + out[r];
    }
  }
  Network& transformer = control_net(*controls_, nullptr, shape, "this latent");
  // Contiguous, as the Python runner hands every input over (a package may return its own layout).
  for (const std::string& r : controls_->residuals) in[r] = total.at(r).contiguous();
  at::Tensor v = transformer.run(by_name(transformer, in)).at(0).to(at::kFloat);
  return family_->flux() ? unpack(v, h, w) : v;
}

}  // namespace megafusion::lib
