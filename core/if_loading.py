"""Building or loading a DeepFloyd IF cascade: random weights, or local diffusers folders (IFPipeline for
stage I, IFSuperResolutionPipeline for stage II)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .if_family import IFFamily, get_if_family
from .loading import WeightsError, _seeded, pipeline_class_name


@dataclass
class IFBundle:
    """The networks of one IF cascade, ready to run."""

    family: IFFamily
    """Which family, with the schedulers and UNet configs the loaded folders give."""
    unet_1: torch.nn.Module
    """Stage I `UNet2DConditionModel`."""
    unet_2: torch.nn.Module | None
    """Stage II `UNet2DConditionModel` (None when only a stage I folder was given)."""
    text_encoder: torch.nn.Module
    """`T5EncoderModel`."""
    tokenizer: Any
    """T5 tokenizer."""
    source: str
    """`random:<seed>` or the folder(s) the weights came from."""

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet_1, self.unet_2, self.text_encoder) if m is not None]


def _to(bundle: IFBundle, device, dtype) -> IFBundle:
    for m in bundle.modules():
        m.to(device=device)
        if m.dtype != dtype:
            m.to(dtype=dtype)
        m.eval()
        m.requires_grad_(False)
    return bundle


def build_random_if(family: IFFamily, seed: int = 0, device="cpu", dtype=torch.float32) -> IFBundle:
    """The family's architecture with random weights and the tokenizer built in code (core/tiny_t5.py).

    The real T5 vocabulary cannot be downloaded here; for random weights any fixed tokenizer whose ids fit
    the embedding table gives the same cost and the same code path (as for the latent families)."""
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from .tiny_t5 import tiny_t5_tokenizer, tiny_vocab_size

    if tiny_vocab_size() > family.text_encoder["vocab_size"]:
        raise WeightsError(f"{family.name}: the built-in tokenizer's ids do not fit its T5 vocabulary")
    # Initialise on the target device: the real UNets and T5-XXL (10B parameters) initialise in seconds on a GPU.
    with _seeded(seed), torch.device(device):
        unet_1 = UNet2DConditionModel(**family.unet_1)
        unet_2 = UNet2DConditionModel(**family.unet_2)
        text = T5EncoderModel(T5Config(**family.text_encoder))
    bundle = IFBundle(family, unet_1, unet_2, text, tiny_t5_tokenizer(family.max_length), f"random:{seed}")
    return _to(bundle, device, dtype)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None


def _scheduler_config(path: Path) -> dict[str, Any]:
    cfg = _read_json(path)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _check_if_folder(root: Path, cls: str, needed: tuple[str, ...]) -> None:
    found = pipeline_class_name(root)
    if found != cls:
        raise WeightsError(f"{root} holds a {found or 'pipeline of unknown class'}, not an {cls}")
    missing = [c for c in needed if not (root / c).is_dir()]
    if missing:
        raise WeightsError(f"{root} lacks the component folder(s) {', '.join(missing)}")


def load_if_pretrained(family: IFFamily, stage_1: str | Path, stage_2: str | Path | None = None,
                       device="cpu", dtype=torch.float32) -> IFBundle:
    """An IFPipeline folder (text encoder, tokenizer, stage I UNet, scheduler) and, optionally, an
    IFSuperResolutionPipeline folder (stage II UNet, scheduler, image_noising_scheduler). Safetensors only.

    The schedulers come from the folders, so a model saved with other settings runs as saved."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import AutoTokenizer, T5EncoderModel

    # What diffusers falls back to anyway without accelerate, said up front: no install banner on every load.
    low_mem = {"low_cpu_mem_usage": is_accelerate_available()}
    root_1 = Path(stage_1).expanduser()
    _check_if_folder(root_1, "IFPipeline", ("unet", "text_encoder", "tokenizer", "scheduler"))
    root_2 = Path(stage_2).expanduser() if stage_2 is not None else None
    if root_2 is not None:
        _check_if_folder(root_2, "IFSuperResolutionPipeline", ("unet", "scheduler", "image_noising_scheduler"))
    try:
        unet_1 = UNet2DConditionModel.from_pretrained(root_1, subfolder="unet", use_safetensors=True, **low_mem)
        text = T5EncoderModel.from_pretrained(root_1, subfolder="text_encoder", use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(root_1, subfolder="tokenizer")
        unet_2 = (UNet2DConditionModel.from_pretrained(root_2, subfolder="unet", use_safetensors=True, **low_mem)
                  if root_2 is not None else None)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"could not load {family.name} weights from {root_1}: {first}") from None
    fam = replace(family, unet_1=dict(unet_1.config), text_encoder=text.config.to_dict(),
                  scheduler_1=_scheduler_config(root_1 / "scheduler" / "scheduler_config.json"))
    if unet_2 is not None:
        fam = replace(fam, unet_2=dict(unet_2.config),
                      scheduler_2=_scheduler_config(root_2 / "scheduler" / "scheduler_config.json"),
                      noising_scheduler=_scheduler_config(root_2 / "image_noising_scheduler" / "scheduler_config.json"))
    source = str(root_1) + (f" + {root_2}" if root_2 is not None else "")
    return _to(IFBundle(fam, unet_1, unet_2, text, tok, source), device, dtype)


def load_if_model(name: str, model_path: str | None = None, stage_2_path: str | None = None,
                  device="cpu", dtype=torch.float32, seed: int = 0, random_weights: bool = False) -> IFBundle:
    """`--model`, `--model-path` (stage I folder), the stage II folder and `--random-weights`, as the CLI gives
    them; the tiny model always has random weights."""
    family = get_if_family(name)
    if model_path is None:
        if stage_2_path is not None:
            raise WeightsError("a stage II folder needs the stage I folder too (--model-path)")
        if not (family.tiny or random_weights):
            raise WeightsError(f"{family.name} needs --model-path DIR (an IFPipeline folder) or --random-weights")
        return build_random_if(family, seed, device, dtype)
    return load_if_pretrained(family, model_path, stage_2_path, device, dtype)
