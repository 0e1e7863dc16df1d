#include "control_entries.hpp"

#include <algorithm>
#include <map>
#include <set>

namespace megafusion::lib {

namespace {

bool is_hex(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

}  // namespace

ControlNetId resolve_controlnet(const EngineFolder& folder, const std::string& model, const std::string& name,
                                const std::string& plan_hint) {
  auto facts = folder.models.find(model);
  std::string known;
  if (facts != folder.models.end()) {
    auto it = facts->second.controlnets.find(name);
    if (it != facts->second.controlnets.end()) return {name, it->second.first, it->second.second};
    for (const auto& [n, rec] : facts->second.controlnets) known += (known.empty() ? "" : ", ") + n;
  }
  // A fingerprint ("mf2:files:<sha256>"), whole, or a prefix of its sha256 digits.
  const bool prefix = name.size() >= 12 && name.size() <= 64 && is_hex(name);
  {
    std::set<std::string> matches;
    for (const Entry& e : folder.entries) {
      if (e.model != model || e.network != "controlnet") continue;
      const std::string digits = e.weights.substr(e.weights.rfind(':') + 1);
      if (e.weights == name || (prefix && digits.compare(0, name.size(), name) == 0)) matches.insert(e.weights);
    }
    if (matches.size() > 1)
      throw Failure(MF_ERROR_INVALID_ARGUMENT, "controlnet '" + name + "' is a prefix of " +
                                                   std::to_string(matches.size()) + " ControlNets' fingerprints in " +
                                                   folder.root + "; give more digits");
    if (matches.size() == 1) {
      std::string source = name;
      if (facts != folder.models.end())
        for (const auto& [n, rec] : facts->second.controlnets)
          if (rec.first == *matches.begin()) source = rec.second;
      return {name, *matches.begin(), source};
    }
  }
  throw Failure(MF_ERROR_ENGINE, "no ControlNet '" + name + "' for " + model + " in " + folder.root + " (it has " +
                                     (known.empty() ? std::string("none by name") : known) +
                                     "); build its engines with: " + plan_hint + " --controlnet <its folder>");
}

std::vector<Entry> control_entries(const EngineFolder& folder, const std::string& model, const std::string& network,
                                   int dilation, const std::string& weights, const std::string& precision,
                                   const std::string& device, const std::string& version, const std::string& what,
                                   const std::string& hint) {
  std::vector<const Entry*> same, valid;
  for (const Entry& e : folder.entries)
    if (e.model == model && e.backend == "aoti" && e.network == network && e.dilation == dilation &&
        e.precision == precision && e.weights == weights)
      same.push_back(&e);
  if (same.empty())
    throw Failure(MF_ERROR_ENGINE, "no aoti engine for " + what + " in " + folder.root + "; build it with: " + hint);
  for (const Entry* e : same)
    if (base_version(e->backend_version) == base_version(version) && e->device == device) valid.push_back(e);
  if (valid.empty()) {
    const Entry* e = same.front();
    const std::string why = base_version(e->backend_version) != base_version(version)
                                ? "torch " + e->backend_version + " (this library: " + version + ")"
                                : "device '" + e->device + "' (this one: '" + device + "')";
    throw Failure(MF_ERROR_ENGINE, "engine " + what + " in " + folder.root + " was built for " + why +
                                       "; rebuild with: " + hint);
  }
  std::stable_sort(valid.begin(), valid.end(), [](const Entry* a, const Entry* b) { return a->created > b->created; });
  std::vector<Entry> out;
  for (const Entry* e : valid) out.push_back(*e);
  return out;
}

IpAdapterId resolve_ip_adapter(const EngineFolder& folder, const std::string& model, const std::string& unet_weights,
                               const std::string& plan_hint) {
  const std::string prefix = unet_weights + "+ip-adapter:sha256:";
  std::map<std::string, IpAdapterId> found;  // by fingerprint
  for (const Entry& e : folder.entries) {
    if (e.model != model || e.network != "unet_ip" || e.backend != "aoti" || unet_weights.empty() ||
        e.weights.compare(0, prefix.size(), prefix) != 0)
      continue;
    const std::string rest = e.weights.substr(prefix.size());  // "<sha256>@scale:<S>"
    const size_t at = rest.find("@scale:");
    if (at == std::string::npos) continue;
    IpAdapterId id{e.weights, rest.substr(0, at), rest.substr(at + 7), 0};
    for (const TensorRange& r : e.range)
      if (r.name == "image_embeds" && !r.max.empty()) id.dim = r.max.back();
    if (id.dim > 0) found.emplace(e.weights, id);
  }
  const std::string build = plan_hint + " --ip-adapter <IP-Adapter file> --ip-adapter-scale <S>";
  if (found.empty())
    throw Failure(MF_ERROR_ENGINE, "no unet_ip (IP-Adapter) aoti engines for " + model + "'s UNet in " + folder.root +
                                       "; build them with: " + build);
  if (found.size() > 1) {
    std::string list;
    for (const auto& [fp, id] : found)
      list += (list.empty() ? "" : ", ") + id.file_sha256.substr(0, 12) + " at scale " + id.scale;
    throw Failure(MF_ERROR_ENGINE, "the engines in " + folder.root + " hold unet_ip engines of " +
                                       std::to_string(found.size()) + " IP-Adapters (file sha256 " + list +
                                       "); libmegafusion takes a folder with one: build each into its own folder "
                                       "with: " + build);
  }
  return found.begin()->second;
}

std::vector<std::string> flow_control_residuals(bool flux, const std::vector<std::vector<std::string>>& outputs) {
  size_t blocks = 0, singles = 0;
  for (size_t j = 0; j < outputs.size(); ++j) {
    const auto& o = outputs[j];
    const size_t b = std::count_if(o.begin(), o.end(), [](const std::string& n) { return n.rfind("block_", 0) == 0; });
    const size_t s = o.size() - b;
    if (j == 0) {
      blocks = b, singles = s;
    } else if (!flux) {
      blocks = std::min(blocks, b);
    } else {
      blocks = !b || !blocks ? blocks : std::min(blocks, b);
      singles = !s || !singles ? singles : std::min(singles, s);
    }
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < blocks; ++i) out.push_back("block_" + std::to_string(i));
  for (size_t i = 0; i < singles; ++i) out.push_back("single_" + std::to_string(i));
  return out;
}

}  // namespace megafusion::lib
