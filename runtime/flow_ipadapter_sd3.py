"""IP-Adapter for SD3 through the relay (docs/ALGORITHM.md §18, "IP-Adapter (SD3)"): diffusers' SD3IPAdapterMixin.

An SD3 IP-Adapter file (`image_proj.*`, `ip_adapter.{i}.*`, the layout `SD3IPAdapterMixin.load_ip_adapter` reads,
InstantX's projection names included) holds a timestep-dependent image projection (`IPAdapterTimeImageProjection`,
SigLIP penultimate features -> image tokens and a time embedding) and, per attention layer, the image attention of
`SD3IPAdapterJointAttnProcessor2_0`. `check_sd3_ip_adapter_file` reads only the names (before any model load),
`read_sd3_ip_adapter` the tensors against the transformer, `load_sd3_ip_adapter` builds diffusers' own modules from
them before it changes the transformer. The SigLIP features are computed once; `SD3IPAdapterNetworks` hands them to
every transformer call, at every stage, and the transformer projects them at that call's timestep. The
transformer changes in place: give it a bundle of its own. Torch path only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.flow_networks import FlowTorchNetworks
from ..engine.networks import WrappedNetworks
from .ipadapter import IPAdapterError

_SD3_MARKS = ("image_proj.time_embedding.linear_1.weight", "ip_adapter.0.norm_ip.linear.weight")
"""Names only an SD3 IP-Adapter has: the projection's time embedding and the per-layer timestep norm."""
_FLUX_XLABS = ("ip_adapter_proj_model.", "double_blocks.")
SIGLIP_TYPES = ("siglip_vision_model", "siglip")


def check_sd3_ip_adapter_file(path: str | Path) -> list[str]:
    """The file's tensor names, refused in one line naming the file unless they are an SD3 IP-Adapter's (a FLUX
    or UNet IP-Adapter has no time embedding). Reads the header only: runs before the model load."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        hint = ("; a pickled .bin (as InstantX ships ip-adapter.bin) is not read: save its image_proj / ip_adapter "
                "dicts as .safetensors, keys image_proj.* and ip_adapter.*") if p.suffix in (".bin", ".pt") else ""
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: not a readable safetensors file ({e}){hint}") from None
    if any(k.startswith(_FLUX_XLABS) for k in keys):
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: a FLUX IP-Adapter (XLabs' ip_adapter_proj_model.* / "
                             "double_blocks.*), not an SD3 one; use it with --model flux")
    stray = next((k for k in keys if not k.startswith(("image_proj.", "ip_adapter."))), None)
    if stray is not None:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: unknown key {stray!r} (expected SD3 IP-Adapter keys "
                             "image_proj.* and ip_adapter.*)")
    missing = [k for k in _SD3_MARKS if k not in keys]
    if missing:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: not an SD3 IP-Adapter (no {missing[0]}: SD3's image "
                             "projection and attention take the timestep; an IP-Adapter for FLUX or a UNet?)")
    return keys


def check_siglip_folder(folder: str | Path) -> None:
    """Refuses an image encoder folder whose config is not a SigLIP vision model's (SD3's IP-Adapter reads SigLIP's
    penultimate hidden states); config only, before any load."""
    p = Path(folder, "config.json")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise IPAdapterError(f"--ip-adapter-encoder {str(folder)!r}: no readable config.json ({e})") from None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind not in SIGLIP_TYPES:
        raise IPAdapterError(f"--ip-adapter-encoder {str(folder)!r}: a {kind!r} model; SD3's IP-Adapter takes a "
                             "SigLIP vision model folder (SiglipVisionModel)")


def read_sd3_ip_adapter(path: str | Path, transformer: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} as SD3IPAdapterMixin.load_ip_adapter splits the file, checked against
    the transformer's attention layers (width and count) before anything changes."""
    from safetensors import safe_open

    check_sd3_ip_adapter_file(path)
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            part, _, rest = key.partition(".")
            out[part][rest] = f.get_tensor(key)
    cfg = transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    layers = len(transformer.attn_processors)
    for i in range(layers):
        w = out["ip_adapter"].get(f"{i}.to_k_ip.weight")
        if w is None or tuple(w.shape) != (width, width):
            raise IPAdapterError(f"--ip-adapter {str(path)!r}: layer {i}'s to_k_ip is "
                                 f"{None if w is None else tuple(w.shape)}, the transformer needs {(width, width)} "
                                 "(an IP-Adapter for another SD3 size?)")
    extra = {k.split(".")[0] for k in out["ip_adapter"]} - {str(i) for i in range(layers)}
    if extra:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: layers {sorted(extra, key=int)[:3]}... beyond the "
                             f"transformer's {layers} attention layers (an IP-Adapter for another SD3 size?)")
    proj = out["image_proj"].get("proj_out.weight")
    if proj is None or proj.shape[0] != width:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: image_proj.proj_out.weight "
                             f"{None if proj is None else tuple(proj.shape)} does not give tokens of the "
                             f"transformer's width {width}")
    return out


def load_sd3_ip_adapter(transformer: torch.nn.Module, state_dict: dict[str, dict[str, torch.Tensor]],
                        scale: float = 1.0, name: str = "--ip-adapter") -> None:
    """diffusers' `_load_ip_adapter_weights` (what `pipe.load_ip_adapter` calls), in its two halves: both modules
    are built and loaded (strict) first, so a file that does not fit leaves the transformer as it was; then the
    scale on every IP-Adapter processor (what `pipe.set_ip_adapter_scale` sets)."""
    try:
        procs = transformer._convert_ip_adapter_attn_to_diffusers(state_dict["ip_adapter"], low_cpu_mem_usage=False)
        proj = transformer._convert_ip_adapter_image_proj_to_diffusers(state_dict["image_proj"],
                                                                       low_cpu_mem_usage=False)
    except (RuntimeError, KeyError, IndexError) as e:
        why = " ".join(str(e).split())  # torch's strict-load message spans lines: one line, the keys kept
        raise IPAdapterError(f"{name}: does not fit the transformer ({why[:400]})") from None
    where = {"device": transformer.device, "dtype": transformer.dtype}  # the new layers where the model is
    transformer.set_attn_processor({name: proc.to(**where) for name, proc in procs.items()})
    transformer.image_proj = proj.to(**where)
    for proc in transformer.attn_processors.values():
        if hasattr(proc, "norm_ip"):
            proc.scale = scale


def load_siglip_encoder(folder: str | Path, device, dtype):
    """(SiglipVisionModel, SiglipImageProcessor) from a folder, as SD3IPAdapterMixin.load_ip_adapter loads them;
    the processor's own config where the folder has one, SigLIP's defaults otherwise."""
    from transformers import SiglipImageProcessor, SiglipVisionModel

    check_siglip_folder(folder)
    p = Path(folder)
    try:
        encoder = SiglipVisionModel.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise IPAdapterError(f"--ip-adapter-encoder {str(folder)!r}: cannot be loaded "
                             f"({str(e).splitlines()[0]})") from None
    processor = (SiglipImageProcessor.from_pretrained(str(p)) if (p / "preprocessor_config.json").is_file()
                 else SiglipImageProcessor())
    return encoder.to(device=device, dtype=dtype).eval(), processor


@torch.inference_mode()
def encode_sd3_ip_image(encoder, processor, image, device) -> torch.Tensor:
    """(1, N, D) SigLIP penultimate hidden states of a PIL image, as StableDiffusion3Pipeline.encode_image."""
    pixels = processor(image, return_tensors="pt").pixel_values.to(device=device, dtype=encoder.dtype)
    return encoder(pixels, output_hidden_states=True).hidden_states[-2].float()


class SD3IPAdapterNetworks(WrappedNetworks):
    """SD3 networks whose transformer gets the IP-Adapter image features at every call; it projects them at the
    call's timestep itself (the projection is timestep-dependent, so it cannot be computed once)."""

    def __init__(self, base: FlowTorchNetworks, image_embeds: torch.Tensor):
        super().__init__(base)
        if base.bundle.family.kind != "sd3":
            raise ValueError(f"SD3IPAdapterNetworks takes SD3 networks, not {base.bundle.family.name}")
        e = image_embeds.to(base.bundle.transformer.device, base.transformer_dtype)
        self.image_embeds = e
        """(1, N, D) SigLIP features of the IP-Adapter image, StableDiffusion3Pipeline's `encode_image`."""
        self.cfg_embeds = torch.cat([torch.zeros_like(e), e])
        """The CFG batch's [negative, prompt] halves: zeros for the negative, as prepare_ip_adapter_image_embeds."""

    @torch.inference_mode()
    def velocity(self, z, timestep, states, pooled, guidance, extra: dict | None = None) -> torch.Tensor:
        e = self.cfg_embeds if z.shape[0] == 2 else self.image_embeds
        kwargs = {"joint_attention_kwargs": {"ip_adapter_image_embeds": e}}  # a new dict: the transformer pops it
        return self.base.velocity(z, timestep, states, pooled, guidance, {**(extra or {}), **kwargs})
