"""Building or loading a family's networks: random weights, a local diffusers folder, or a hub id."""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .families import ModelFamily, get_family

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class WeightsError(RuntimeError):
    """Weights could not be found or are refused; the message says what was tried and what to pass."""


@dataclass
class ModelBundle:
    """The networks of one family, ready to run."""

    family: ModelFamily
    """Which family these are."""
    unet: torch.nn.Module
    """`UNet2DConditionModel`."""
    vae: torch.nn.Module
    """`AutoencoderKL`."""
    text_encoders: list[torch.nn.Module]
    """CLIP text encoders, in the pipeline's order."""
    tokenizers: list[Any]
    """One tokenizer per text encoder."""
    source: str
    """Where the weights came from: `random:<seed>`, a folder path or a hub id."""

    def module_for(self, network: str) -> torch.nn.Module:
        """The module that runs (or exports) `network`: `unet`, either VAE half (the whole VAE),
        `text_encoder` or `text_encoder_N`."""
        if network == "unet":
            return self.unet
        if network in ("vae_encoder", "vae_decoder"):
            return self.vae
        if network == "text_encoder":
            return self.text_encoders[0]
        prefix, _, n = network.rpartition("_")
        if prefix != "text_encoder" or not n.isdigit() or not 2 <= int(n) <= len(self.text_encoders):
            raise ValueError(f"{self.family.name} has no network {network!r}")
        return self.text_encoders[int(n) - 1]


def builtin_tokenizer(model_max_length: int = 77):
    """A character-level CLIP BPE tokenizer shipped with the package (no merges, 514 tokens).

    The real CLIP vocabulary cannot be downloaded here; for random weights any fixed tokenizer whose ids
    fit the embedding table gives the same cost and the same code path.
    """
    from transformers import CLIPTokenizer

    files = resources.files("megafusion.core") / "assets" / "tiny_tokenizer"
    with resources.as_file(files / "vocab.json") as vocab, resources.as_file(files / "merges.txt") as merges:
        return CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=model_max_length)


@contextlib.contextmanager
def _seeded(seed: int):
    # diffusers/transformers initialise from the global RNG; fork it so loading leaves no trace.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_random(family: ModelFamily, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> ModelBundle:
    """The family's real architecture (or tiny one) with random weights; nothing is downloaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = builtin_tokenizer()
    vocab = family.vocab_size or len(tok)
    # Initialise on the target device: a real-size SDXL UNet initialises in seconds on a GPU.
    init_device = torch.device(device)
    with _seeded(seed), init_device:
        unet = UNet2DConditionModel(**family.unet)
        vae = AutoencoderKL(**family.vae)
        encoders = []
        for te in family.text_encoders:
            cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**te.transformers_config(vocab))))
    bundle = ModelBundle(family, unet, vae, encoders, [tok for _ in encoders], f"random:{seed}")
    return to_device(bundle, device, dtype)


def to_device(bundle: ModelBundle, device, dtype) -> ModelBundle:
    """Every module of `bundle` on `device` in `dtype`, in eval mode without gradients (in place)."""
    for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
        m.to(device=device)
        if m.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
            m.to(dtype=dtype)
        m.eval()
        m.requires_grad_(False)
    return bundle


_COMPONENTS_SD15 = ("unet", "vae", "text_encoder", "tokenizer")
_COMPONENTS_SDXL = _COMPONENTS_SD15 + ("text_encoder_2", "tokenizer_2")


def _check_folder(family: ModelFamily, root: Path, allow_pickle: bool) -> None:
    """Validates a diffusers folder; refuses pickle-only components unless allowed."""
    index = root / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{root} is not a diffusers model folder: {index} is missing")
    try:
        cls_name = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as e:
        raise WeightsError(f"{index} is not valid JSON: {e}") from None
    if ("XL" in cls_name) != family.is_xl:
        raise WeightsError(
            f"{root} holds a {cls_name or 'pipeline of unknown class'}, not a {family.kind} model "
            f"(--model {family.name})"
        )
    needed = _COMPONENTS_SDXL if family.is_xl else _COMPONENTS_SD15
    missing = [c for c in needed if not (root / c).is_dir()]
    if missing:
        raise WeightsError(f"{root} lacks the component folder(s) {', '.join(missing)}")
    has_safetensors = has_pickle = False
    for comp in needed:
        if comp.startswith("tokenizer"):
            continue
        files = list((root / comp).iterdir())
        st = any(f.suffix == ".safetensors" for f in files)
        pk = any(f.suffix in PICKLE_SUFFIXES for f in files)
        if not st and not pk:
            raise WeightsError(f"{root / comp} holds no weights (no .safetensors file)")
        has_safetensors |= st
        has_pickle |= pk and not st
    if has_pickle and not allow_pickle:
        raise WeightsError(
            f"{root} holds pickle checkpoints without safetensors; pickle files can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle if you trust the source"
        )


def load_pretrained(family: ModelFamily, path_or_id: str, device="cpu", dtype=torch.float32,
                    allow_pickle: bool = False) -> ModelBundle:
    """Loads a local diffusers folder, or a hub id where the network allows."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path_or_id).expanduser()
    if root.exists():
        _check_folder(family, root, allow_pickle)
        src: str = str(root)
    elif _HUB_ID_RE.match(path_or_id) and not path_or_id.startswith((".", "/")):
        src = path_or_id
    else:
        raise WeightsError(
            f"model path {path_or_id!r} does not exist; pass --model-path DIR (a local diffusers folder) "
            "or --random-weights"
        )
    # Safetensors only, unless pickle is allowed: then each component takes whichever it has.
    kw: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")]
        if family.is_xl:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2"))
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"could not load {family.name} weights from {src!r}: {first}. Pass --model-path DIR "
            "(a local diffusers folder) or --random-weights"
        ) from None
    return to_device(ModelBundle(family, unet, vae, encoders, tokenizers, src), device, dtype)


def load_model(name: str, model_path: str | None = None, random_weights: bool = False,
               allow_pickle: bool = False, device="cpu", dtype=torch.float32, seed: int = 0) -> ModelBundle:
    """The one entry point: `--model`, `--model-path`, `--random-weights` as the CLI gives them."""
    family = get_family(name)
    if model_path is not None:
        if random_weights:
            raise WeightsError("--model-path and --random-weights exclude each other")
        return load_pretrained(family, model_path, device, dtype, allow_pickle)
    if family.tiny or random_weights:
        return build_random(family, seed, device, dtype)
    return load_pretrained(family, family.hub_id, device, dtype, allow_pickle)
