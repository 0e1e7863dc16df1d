"""LoRA for SD3 and FLUX: the networks a file may adapt, and FLUX's kohya layout turned into diffusers' names, for
core/lora.py's reader and fuse (docs/ALGORITHM.md §18.2).

- diffusers (what `save_lora_weights` of StableDiffusion3Pipeline / FluxPipeline writes):
  `transformer.<module>.lora_A.weight` / `.lora_B.weight`, and `text_encoder.` (CLIP-L), `text_encoder_2.`
  (SD3's CLIP-G); T5 is never adapted by those pipelines, so a key for it is unknown here too.
- kohya / sd-scripts FLUX (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `lora_te1_...`): BFL's
  original module names, converted with diffusers' own `_convert_kohya_flux_lora_to_diffusers` (fused QKV split
  into to_q/to_k/to_v, alpha / r folded into the matrices). That converter skips what it does not know with a
  log line; here such a key is refused instead, before anything is fused.
"""
from __future__ import annotations

import logging

import torch

_DIT_TEXT_ENCODERS = {"sd3": ("text_encoder", "text_encoder_2"), "flux": ("text_encoder",)}
"""The text encoders diffusers' LoRA loaders adapt, by family kind (the CLIP ones, in order; T5 never)."""

_KOHYA_FLUX_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te_")
_KOHYA_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")


def dit_targets(bundle) -> dict[str, torch.nn.Module]:
    """{network name in a LoRA file: module} of a DiTBundle."""
    names = _DIT_TEXT_ENCODERS[bundle.family.kind]
    return {"transformer": bundle.transformer, **dict(zip(names, bundle.text_encoders))}


def is_kohya(state: dict[str, torch.Tensor]) -> bool:
    return bool(state) and all(k.startswith(_KOHYA_FLUX_PREFIXES) for k in state)


def dit_state(state: dict[str, torch.Tensor], family, where: str, error) -> dict[str, torch.Tensor]:
    """The file's tensors under diffusers' names for this family: kohya FLUX converted, kohya SD3 refused."""
    if not is_kohya(state):
        return state
    if family.kind != "flux":
        raise error(f"{where}: a kohya-format file (lora_unet_/lora_te keys); {family.name} takes "
                    "diffusers-format LoRAs (transformer.*.lora_A/B)")
    return kohya_flux_to_diffusers(state, where, error)


def check_dit_lora_file(spec, family) -> None:
    """What can be checked before the model load: the file reads, and every key names a network this family's
    LoRAs adapt, with a LoRA suffix (kohya FLUX after conversion). LoraError naming the file and the first bad key;
    the layers and their shapes are checked against the loaded model (`lora.check_loras`)."""
    from .lora import _DIFFUSERS_PARTS, LoraError, read_lora_file

    where = f"--lora {str(spec.path)!r}"
    state = dit_state(read_lora_file(spec)[0], family, where, LoraError)
    nets = ("transformer", *_DIT_TEXT_ENCODERS[family.kind])
    for key in state:
        if key.partition(".")[0] not in nets or not key.endswith(tuple(_DIFFUSERS_PARTS)):
            raise LoraError(f"{where}: unknown key {key!r} (not a LoRA of {family.name}'s {', '.join(nets)})")


class _Skipped(logging.Handler):
    """Collects the converter's warnings: each names keys it left out."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def kohya_flux_to_diffusers(state: dict[str, torch.Tensor], where: str, error) -> dict[str, torch.Tensor]:
    """A kohya FLUX LoRA under diffusers' names (`transformer.`, `text_encoder.`); `error(message)` for a key the
    conversion would drop or cannot place (the message names it)."""
    from diffusers.loaders import lora_conversion_utils as conv

    odd = next((k for k in state if not k.endswith(_KOHYA_PARTS)), None)
    if odd is not None:  # diff / diff_b / norm keys, which the converter filters out
        raise error(f"{where}: unknown key {odd!r} (a kohya FLUX LoRA holds lora_down, lora_up and alpha only)")
    skipped = _Skipped()
    log = logging.getLogger(conv.__name__)
    saved = log.level, log.propagate
    log.addHandler(skipped)
    log.setLevel(logging.WARNING)
    log.propagate = False  # the refusal below is the one line the user sees
    try:
        out = conv._convert_kohya_flux_lora_to_diffusers(dict(state))
    except (ValueError, KeyError, AssertionError, NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise error(f"{where}: not a kohya FLUX LoRA ({first[:200]})") from None
    finally:
        log.removeHandler(skipped)
        log.setLevel(saved[0])
        log.propagate = saved[1]
    if skipped.messages:
        raise error(f"{where}: keys the FLUX layout does not have: {skipped.messages[0][:200]}")
    return {_peft_text_name(k): v for k, v in out.items()}


_TEXT_RENAMES = tuple((f".{old}_lora.{part}.", f".{new}.lora_{ab}.") for old, new in
                      (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "out_proj"))
                      for part, ab in (("down", "A"), ("up", "B"))) + \
    ((".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."))
"""The converter's text encoder names (diffusers' older attention-processor layout) -> the layers' own names."""


def _peft_text_name(key: str) -> str:
    if not key.startswith("text_encoder."):
        return key
    for old, new in _TEXT_RENAMES:
        key = key.replace(old, new)
    return key
