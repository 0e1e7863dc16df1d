// The ControlNet engines of an engine folder (engine/controlnet_engines.py writes them): which ControlNet a
// caller's name means, and the entries of the `controlnet` and `unet_controlled` networks for it. Plain C++.
#ifndef MEGAFUSION_LIB_CONTROL_ENTRIES_HPP_
#define MEGAFUSION_LIB_CONTROL_ENTRIES_HPP_

#include <string>
#include <vector>

#include "manifest.hpp"

namespace megafusion::lib {

struct ControlNetId {
  std::string name;         // as the caller gave it
  std::string fingerprint;  // the weights of its entries
  std::string source;       // the folder it was built from (for build hints); the name where unknown
};

// `name`: a ControlNet models.json records for `model` (the last component of the folder given to
// `mf-build-engines --controlnet`), else the weights fingerprint of `model`'s controlnet entries, whole
// ("mf2:files:<sha256>") or a unique prefix of at least 12 of its sha256's hex digits. Failure(MF_ERROR_ENGINE)
// naming it, the ControlNets the folder knows and the command that builds its engines (`plan_hint`: the plan's
// mf-build-engines command); MF_ERROR_INVALID_ARGUMENT for a prefix that more than one ControlNet shares.
ControlNetId resolve_controlnet(const EngineFolder& folder, const std::string& model, const std::string& name,
                                const std::string& plan_hint);

// The valid entries (newest first) of `network` ("controlnet" or "unet_controlled") at `dilation` built from
// `weights`, at `precision`, for `device` by torch `version` (same release), aoti. Failure(MF_ERROR_ENGINE)
// naming `what` and `hint` when there are none, or only stale ones.
std::vector<Entry> control_entries(const EngineFolder& folder, const std::string& model, const std::string& network,
                                   int dilation, const std::string& weights, const std::string& precision,
                                   const std::string& device, const std::string& version, const std::string& what,
                                   const std::string& hint);

// The IP-Adapter whose `unet_ip` engines (engine/ipadapter_engines.py) the folder holds for `model`'s UNet of
// fingerprint `unet_weights`: their weights field "<unet>+ip-adapter:sha256:<file>@scale:<S>" (engine/fingerprint.py
// ip_adapter_fingerprint) and the image embeddings' length D (the last axis of their `image_embeds` input).
struct IpAdapterId {
  std::string fingerprint, file_sha256, scale;
  long long dim = 0;
};

// Failure(MF_ERROR_ENGINE) naming `plan_hint` with --ip-adapter when the folder has no aoti unet_ip entries for that
// UNet, or naming each IP-Adapter (file sha256 and scale) when it has entries of several: the C API takes no file to
// choose by, so such a folder is refused rather than one picked silently.
IpAdapterId resolve_ip_adapter(const EngineFolder& folder, const std::string& model, const std::string& unet_weights,
                               const std::string& plan_hint);

// SD3 / FLUX: the block samples the controlled transformer takes from ControlNets whose outputs are named
// `outputs` (each net's "block_i".. then "single_i"..), as export/dit_controlnet_aoti.py control_layout sums
// them: over the shorter list; for FLUX (`flux`) a net without samples of a kind leaves the running sum's.
std::vector<std::string> flow_control_residuals(bool flux, const std::vector<std::vector<std::string>>& outputs);

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_CONTROL_ENTRIES_HPP_
