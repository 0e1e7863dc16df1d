"""LoRA weights fused into a loaded model: W <- W + scale * (alpha / r) * up @ down, for every adapted layer.

Two file formats, both safetensors:
- diffusers (what `save_lora_weights` writes): `unet.<module>.lora_A.weight` (down, r x in) and `.lora_B.weight`
  (up, out x r), also `text_encoder.` / `text_encoder_2.`; alpha from the file's `lora_adapter_metadata` when
  present, else alpha = r, as diffusers does.
- kohya (sd-scripts, A1111): `lora_unet_<module, dots as underscores>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_` (SD1.5), `lora_te1_` / `lora_te2_` (SDXL). SDXL files name UNet blocks as the original
  LDM code does (input_blocks_4_1); diffusers' own mapping turns those into diffusers block names.

The fuse is written here rather than with diffusers' `load_lora_weights` + `fuse_lora`: those need peft, which
the deployment machines do not have, and a fused weight is all an engine or a CUDA graph needs. The result is the
same weights (tests/core/test_lora.py checks it against diffusers where peft is installed). Fused weights change
`engine.cache.weights_fingerprint`, so an engine built from a LoRA'd model has its own key.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .loading import ModelBundle


class LoraError(ValueError):
    """A LoRA file that cannot be fused into this model; the message names the file and the bad key."""


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:SCALE]`."""

    path: Path
    """The .safetensors file."""
    scale: float = 1.0
    """Multiplies the LoRA's update (diffusers' `lora_scale` / `fuse_lora(lora_scale=...)`)."""


def parse_lora(text: str) -> LoraSpec:
    """PATH or PATH:SCALE (a path may itself hold ':'; only a trailing number is a scale)."""
    path, sep, tail = text.rpartition(":")
    if sep and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", tail):
        return LoraSpec(Path(path), float(tail))
    return LoraSpec(Path(text))


_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_DIFFUSERS_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                    ".lora.up.weight": "up", ".alpha": "alpha"}


def _targets(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    if getattr(bundle, "transformer", None) is not None:  # SD3 / FLUX (core/dit_lora.py)
        from .dit_lora import dit_targets

        return dit_targets(bundle)
    names = ["text_encoder", "text_encoder_2"][:len(bundle.text_encoders)]
    return {"unet": bundle.unet, **dict(zip(names, bundle.text_encoders))}


def _split(key: str, parts: dict[str, str]) -> tuple[str, str] | None:
    for suffix, part in parts.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], part
    return None


def read_lora_file(spec: LoraSpec) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file; LoraError for a missing, unreadable or empty one."""
    from safetensors import SafetensorError, safe_open

    if not spec.path.is_file():
        raise LoraError(f"--lora {str(spec.path)!r}: no such file")
    try:
        with safe_open(str(spec.path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"--lora {str(spec.path)!r}: not a readable safetensors file ({e})") from None
    if not state:
        raise LoraError(f"--lora {str(spec.path)!r}: holds no tensors")
    return state, metadata


def read_lora(spec: LoraSpec, bundle: ModelBundle) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """{(network, module name): {"down", "up", "alpha"?}} from the file, names resolved against this model."""
    state, metadata = read_lora_file(spec)
    targets = _targets(bundle)
    if "transformer" in targets:  # SD3 / FLUX: kohya FLUX files take diffusers' names first (core/dit_lora.py)
        from .dit_lora import dit_state

        state = dit_state(state, bundle.family, f"--lora {str(spec.path)!r}", LoraError)
    kohya = all(k.startswith(tuple(_KOHYA_PREFIXES)) for k in state)
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    if kohya:
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        state = _maybe_map_sgm_blocks_to_diffusers(state, bundle.unet.config)  # LDM block names (SDXL files)
        flat = {net: {n.replace(".", "_"): n for n, _ in mod.named_modules() if n} for net, mod in targets.items()}
        for net in flat:  # kohya's CLIP names hold text_model_, a level transformers 5 dropped (_text_model_alias)
            flat[net].update({f"text_model_{k}": v for k, v in list(flat[net].items()) if f"text_model_{k}" not in
                              flat[net] and not hasattr(targets[net], "text_model")})
    names = {net: {n for n, _ in mod.named_modules() if n} for net, mod in targets.items()}
    for key, tensor in state.items():
        if kohya:
            prefix = next(p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if key.startswith(p))
            split = _split(key[len(prefix):], _KOHYA_PARTS)
            net = _KOHYA_PREFIXES[prefix]
            module = None if split is None or net not in flat else flat[net].get(split[0])
        else:
            split = _split(key, _DIFFUSERS_PARTS)
            net, _, module = split[0].partition(".") if split else ("", "", None)
            if module not in names.get(net, ()):
                module = _text_model_alias(module, names.get(net, ()))
        if split is None or module is None:
            raise LoraError(f"--lora {str(spec.path)!r}: unknown key {key!r} (not a LoRA of {bundle.family.name}'s "
                            f"{', '.join(targets)})")
        out.setdefault((net, module), {})[split[1]] = tensor
    alphas = _metadata_alphas(metadata)
    for (net, module), parts in out.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"--lora {str(spec.path)!r}: {net}.{module} lacks its "
                            f"{'up' if 'down' in parts else 'down'} matrix")
        if "alpha" not in parts and net in alphas:
            parts["alpha"] = torch.tensor(alphas[net])
    return out


def _text_model_alias(module: str | None, names) -> str | None:
    """`text_model.<rest>` as `<rest>` where the CLIP module has no `text_model` level (transformers 5 flattened
    CLIPTextModel; LoRA files name the layers as transformers 4 did), else None."""
    if module is not None and module.startswith("text_model.") and module[len("text_model."):] in names:
        return module[len("text_model."):]
    return None


def _metadata_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """{network: lora_alpha} from diffusers' `lora_adapter_metadata` (one adapter config per network)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return {k.rsplit(".", 1)[0]: float(v) for k, v in meta.items() if k.endswith(".lora_alpha")}


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None, scale: float,
               shape: torch.Size) -> torch.Tensor:
    """scale * (alpha / r) * up @ down, shaped as the weight (Linear, or Conv2d with a 1x1 up), in float64."""
    r = down.shape[0]
    factor = scale * (r if alpha is None else alpha) / r
    delta = up.double().flatten(1) @ down.double().flatten(1)
    return (factor * delta).reshape(shape)


def _checked_layers(bundle: ModelBundle, specs: list[LoraSpec]) -> list[tuple[LoraSpec, str, str, dict]]:
    """(spec, network, layer name, parts) for every adapted layer, file by file in order, each file read and its
    shapes checked against the model first. LoraError names a file whose shapes do not fit this model (a LoRA
    for another architecture)."""
    targets = _targets(bundle)
    layers = []
    for spec in specs:
        for (net, name), parts in read_lora(spec, bundle).items():
            layer = targets[net].get_submodule(name)
            weight = getattr(layer, "weight", None)
            want = None if weight is None else (weight.shape[0], weight.shape[1])
            if want is None or (parts["up"].shape[0], parts["down"].shape[1]) != want:
                got = (parts["up"].shape[0], parts["down"].shape[1])
                raise LoraError(f"--lora {str(spec.path)!r}: {net}.{name} is {got[0]}x{got[1]} in the LoRA but "
                                f"{'absent' if want is None else f'{want[0]}x{want[1]}'} in {bundle.family.name} "
                                "(a LoRA for another architecture?)")
            layers.append((spec, net, name, parts))
    return layers


def check_loras(bundle: ModelBundle, specs: list[LoraSpec]) -> None:
    """Reads every file and checks it against the model, changing nothing: LoraError as `fuse_loras` raises it."""
    _checked_layers(bundle, specs)


def _delta(spec: LoraSpec, parts: dict, weight: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    alpha = parts.get("alpha")
    down, up = (parts[k] if device is None else parts[k].to(device) for k in ("down", "up"))
    return lora_delta(down, up, None if alpha is None else float(alpha), spec.scale, weight.shape)


def fuse_loras(bundle: ModelBundle, specs: list[LoraSpec]) -> None:
    """Adds every LoRA's update to the model's weights in place (read and checked first: a bad file changes
    nothing). LoraError names a file whose shapes do not fit this model (a LoRA for another architecture)."""
    targets = _targets(bundle)
    layers = _checked_layers(bundle, specs)
    with torch.no_grad():
        for spec, net, name, parts in layers:
            weight = targets[net].get_submodule(name).weight
            weight.add_(_delta(spec, parts, weight).to(weight.device, weight.dtype))


def fused_weights(bundle: ModelBundle, specs: list[LoraSpec],
                  device: torch.device | str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{network: {weight name: weight}}: the weights `fuse_loras` would leave in the layers it changes, computed the
    same way (float64 update, added in the weight's dtype, file by file) on `device` (default: the weights'),
    while the model keeps its own. What a built engine needs swapped in (engine/lora_swap.py)."""
    targets = _targets(bundle)
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for spec, net, name, parts in _checked_layers(bundle, specs):
            base = targets[net].get_submodule(name).weight
            dev = base.device if device is None else torch.device(device)
            weights = out.setdefault(net, {})
            current = weights.get(f"{name}.weight")
            if current is None:
                current = base.detach().to(dev, copy=True)
            weights[f"{name}.weight"] = current + _delta(spec, parts, base, dev).to(dev, base.dtype)
    return out
