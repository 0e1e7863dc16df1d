"""Building or loading an SD3 / FLUX family's networks: random weights or a local diffusers folder.

`loading.load_model` and `loading.resolve_family` hand these families here. The tiny models get the built-in
CLIP tokenizer and the built-in T5 one (`tiny_t5`); a real folder's own tokenizers are loaded from it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dit_families import DiTFamily
from .loading import (PICKLE_SUFFIXES, WeightsError, _read_config, _scale_side, _seeded, builtin_tokenizer,
                      load_options, pipeline_class_name, weights_source)
from .tiny_t5 import tiny_t5_tokenizer

PIPELINE_CLASS = {"sd3": "StableDiffusion3", "flux": "Flux"}
"""What the `_class_name` of a folder's model_index.json starts with, per family kind."""


@dataclass
class DiTBundle:
    """The networks of one transformer family, ready to run."""

    family: DiTFamily
    """Which family, with the native size the transformer's config gives (`dit_family_for_config`)."""
    transformer: torch.nn.Module
    """`SD3Transformer2DModel` or `FluxTransformer2DModel`."""
    vae: torch.nn.Module
    """`AutoencoderKL` with 16 latent channels."""
    text_encoders: list[torch.nn.Module]
    """The CLIP encoders, then T5: SD3 [CLIP-L, CLIP-G, T5], FLUX [CLIP-L, T5]."""
    tokenizers: list[Any]
    """One tokenizer per text encoder."""
    source: str
    """`random:<seed>`, a folder path or a hub id."""

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, *self.text_encoders]


def components(family: DiTFamily) -> tuple[str, ...]:
    """The folders of a diffusers pipeline of this family (networks, then tokenizers)."""
    n = len(family.text_encoders) + 1
    encoders = ["text_encoder"] + [f"text_encoder_{i}" for i in range(2, n + 1)]
    return ("transformer", "vae", *encoders, *(e.replace("text_encoder", "tokenizer") for e in encoders))


def _transformer_class(family: DiTFamily):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return SD3Transformer2DModel if family.kind == "sd3" else FluxTransformer2DModel


def build_random_dit(family: DiTFamily, seed: int = 0, device="cpu", dtype=torch.float32) -> DiTBundle:
    """The family's architecture with random weights and the built-in tokenizers; nothing is downloaded."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok = builtin_tokenizer()
    vocab = family.vocab_size or len(clip_tok)
    with _seeded(seed), torch.device(device):
        transformer = _transformer_class(family)(**family.transformer)
        vae = AutoencoderKL(**family.vae)
        encoders = []
        for te in family.text_encoders:
            cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**te.transformers_config(vocab))))
        encoders.append(T5EncoderModel(T5Config(**family.t5)))
    tokenizers = [clip_tok for _ in family.text_encoders] + [tiny_t5_tokenizer(family.t5_max_length)]
    family = dit_family_for_config(family, transformer.config, vae.config, "the built model")
    return to_device(DiTBundle(family, transformer, vae, encoders, tokenizers, f"random:{seed}"), device, dtype)


T5_FP16_DTYPE = torch.bfloat16
"""T5 in place of fp16: T5 v1.1 (SD3's and FLUX's T5-XXL) was trained in bf16 and its feed-forward activations
overflow fp16's range (transformers keeps its `wo` layers in fp32 for that reason); bf16 and fp32 are safe."""


def to_device(bundle: DiTBundle, device, dtype) -> DiTBundle:
    """Every module on `device` in `dtype` (T5 in bf16 when `dtype` is fp16), in eval mode without gradients
    (in place)."""
    for m in bundle.modules():
        m.to(device=device)
        want = T5_FP16_DTYPE if dtype == torch.float16 and m is bundle.text_encoders[-1] else dtype
        if m.dtype != want:
            m.to(dtype=want)
        m.eval()
        m.requires_grad_(False)
    return bundle


def dit_family_for_config(family: DiTFamily, transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                          where: str) -> DiTFamily:
    """`family` with the native size the configs give (SD3: transformer `sample_size` x VAE scale; FLUX's
    config has none, so the family's stays); the default plan is scaled with it, as `loading.family_for_config`
    does for the UNet families. Refuses a VAE scale, latent width or patch size other than the family's."""
    scale = 2 ** (len(vae_config.get("block_out_channels", family.vae["block_out_channels"])) - 1)
    channels = vae_config.get("latent_channels", family.latent_channels)
    patch = transformer_config.get("patch_size", family.transformer.get("patch_size"))
    if scale != family.vae_scale or channels != family.latent_channels \
            or patch != family.transformer.get("patch_size"):
        raise WeightsError(f"{where}: VAE scale {scale}, {channels} latent channels, patch size {patch}; "
                           f"{family.name} has {family.vae_scale}, {family.latent_channels} and "
                           f"{family.transformer.get('patch_size')}, so this is not a {family.name} model")
    sample = transformer_config.get("sample_size") if family.kind == "sd3" else None
    if sample is None:
        return family
    if not isinstance(sample, int) or isinstance(sample, bool) or sample <= 0:
        raise WeightsError(f"{where}: transformer sample_size {sample!r} is not a positive int")
    n = sample * scale
    pos = transformer_config.get("pos_embed_max_size", family.transformer.get("pos_embed_max_size"))
    if (n, n) == (family.native_height, family.native_width) and pos == family.transformer.get("pos_embed_max_size"):
        return family
    m = family.pixel_multiple
    template = tuple((_scale_side(h, n, family.native_height, m), _scale_side(w, n, family.native_width, m), k)
                     for h, w, k in family.default_stages)
    return dataclasses.replace(family, native_height=n, native_width=n, default_stages=template,
                               transformer={**family.transformer, "pos_embed_max_size": pos})


def check_dit_folder(family: DiTFamily, root: Path, allow_pickle: bool) -> None:
    """Validates a diffusers folder of this family; refuses pickle-only components unless allowed."""
    cls_name = pipeline_class_name(root)
    if not cls_name.startswith(PIPELINE_CLASS[family.kind]):
        raise WeightsError(f"{root} holds a {cls_name or 'pipeline of unknown class'}, not a {family.kind} model "
                           f"(--model {family.name})")
    needed = components(family)
    missing = [c for c in needed if not (root / c).is_dir()]
    if missing:
        raise WeightsError(f"{root} lacks the component folder(s) {', '.join(missing)}")
    pickle_only = []
    for comp in needed:
        if comp.startswith("tokenizer"):
            continue
        files = list((root / comp).iterdir())
        if not any(f.suffix == ".safetensors" for f in files):
            if not any(f.suffix in PICKLE_SUFFIXES for f in files):
                raise WeightsError(f"{root / comp} holds no weights (no .safetensors file)")
            pickle_only.append(comp)
    if pickle_only and not allow_pickle:
        raise WeightsError(
            f"{root} holds pickle checkpoints without safetensors ({', '.join(pickle_only)}); pickle files can run "
            "code when loaded. Convert them to safetensors, or pass --allow-pickle if you trust the source")


def with_folder_scheduler(family: DiTFamily, root: Path) -> DiTFamily:
    """`family` with the folder's own scheduler config where it has one (FLUX.1-schnell shifts by a fixed 1,
    FLUX.1-dev dynamically): the stage loop's shift rule follows the model, not the family's default."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return family
    cfg = {k: v for k, v in _read_config(path).items() if not k.startswith("_")}
    return family if cfg == family.scheduler else dataclasses.replace(family, scheduler=cfg)


def dit_folder_family(family: DiTFamily, root: str | Path) -> DiTFamily:
    """The family a local folder holds, from its configs, without loading weights (as `loading.folder_family`)."""
    root = Path(root).expanduser()
    check_dit_folder(family, root, allow_pickle=True)
    family = dit_family_for_config(family, _read_config(root / "transformer" / "config.json"),
                                   _read_config(root / "vae" / "config.json"), str(root))
    return with_folder_scheduler(family, root)


def load_pretrained_dit(family: DiTFamily, path_or_id: str, device="cpu", dtype=torch.float32,
                        allow_pickle: bool = False) -> DiTBundle:
    """Loads a local diffusers folder (or a hub id where the network allows) with its own tokenizers."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    src = weights_source(path_or_id, lambda root: check_dit_folder(family, root, allow_pickle))
    kw, low_mem = load_options(allow_pickle)
    names = components(family)
    n_enc = len(family.text_encoders) + 1
    try:
        transformer = _transformer_class(family).from_pretrained(src, subfolder="transformer", **kw, **low_mem)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw, **low_mem)
        encoders, tokenizers = [], []
        for te, enc, tok in zip(family.text_encoders, names[2:2 + n_enc], names[2 + n_enc:]):
            cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
            encoders.append(cls.from_pretrained(src, subfolder=enc, **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder=tok))
        encoders.append(T5EncoderModel.from_pretrained(src, subfolder=names[1 + n_enc], **kw))
        tokenizers.append(AutoTokenizer.from_pretrained(src, subfolder=names[-1]))
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"could not load {family.name} weights from {src!r}: {first}. Pass --model-path DIR "
                           "(a local diffusers folder) or --random-weights") from None
    family = dit_family_for_config(family, transformer.config, vae.config, src)
    if Path(src).exists():  # a local folder's own scheduler config
        family = with_folder_scheduler(family, Path(src))
    return to_device(DiTBundle(family, transformer, vae, encoders, tokenizers, src), device, dtype)


def load_dit_model(family: DiTFamily, model_path: str | None = None, random_weights: bool = False,
                   allow_pickle: bool = False, device="cpu", dtype=torch.float32, seed: int = 0) -> DiTBundle:
    """`loading.load_model` for the transformer families."""
    if model_path is not None:
        if random_weights:
            raise WeightsError("--model-path and --random-weights exclude each other")
        return load_pretrained_dit(family, model_path, device, dtype, allow_pickle)
    if family.tiny or random_weights:
        return build_random_dit(family, seed, device, dtype)
    return load_pretrained_dit(family, family.hub_id, device, dtype, allow_pickle)
