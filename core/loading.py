"""Building or loading a family's networks: random weights, a local diffusers folder, or a hub id."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .dit_families import is_dit
from .families import ModelFamily, get_family

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class WeightsError(RuntimeError):
    """Weights could not be found or are refused; the message says what was tried and what to pass."""


@dataclass(frozen=True)
class WeightsOrigin:
    """What made one component's weights, known without reading them: the engine cache fingerprints this
    (engine/fingerprint.py) instead of hashing every tensor on every start."""

    kind: str
    """`random` (drawn by `build_random`) or `files` (read from a local diffusers folder)."""
    recipe: str = ""
    """random: canonical JSON of everything that determines the values (`random_origin`)."""
    folder: str = ""
    """files: the component's folder, absolute; every file in it is fingerprinted."""


COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
"""A bundle's modules by the name of their diffusers subfolder (`ModelBundle.component`)."""


@dataclass
class ModelBundle:
    """The networks of one family, ready to run."""

    family: ModelFamily
    """Which family these are, with the native size the networks' own configs give (`family_for_config`)."""
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
    origins: dict[str, WeightsOrigin] = field(default_factory=dict)
    """Each component's `WeightsOrigin` by name (`COMPONENTS`), where known: none for a hub id."""
    loaded_state: dict[str, tuple] = field(default_factory=dict, repr=False)
    """`state_signature` of each component as loaded: an in-place change since (a fused LoRA) shows against it."""
    skipped: frozenset[str] = frozenset()
    """Components built on the meta device only (configs, no weights): engines run them (`load_model(skip=)`)."""

    def component(self, network: str) -> str:
        """The component (`COMPONENTS`) whose module runs `network`."""
        self.module_for(network)  # refuses a network this family lacks
        return "vae" if network in ("vae_encoder", "vae_decoder") else network

    def origin_of(self, network: str) -> WeightsOrigin | None:
        """The origin of `network`'s weights if its module is still as loaded, else None (changed in place since,
        or no origin known): then only its tensors say what it computes."""
        name = self.component(network)
        origin = self.origins.get(name)
        if origin is None or self.loaded_state.get(name) != state_signature(self.module_for(network)):
            return None
        return origin

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


INIT_RECIPE = 2
"""How `build_random` draws weights. 2: each component from its own seed (`component_seed`), so that one can be
built without the others (the ones engines run are skipped); 1 (before) drew all from one stream."""


def component_seed(seed: int, component: str) -> int:
    """The seed `component`'s random weights are drawn from: `seed` itself for the UNet (its weights are those of
    recipe 1), a hash of both for the others."""
    if component == "unet":
        return seed
    digest = hashlib.sha256(f"megafusion-init/{seed}/{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_origin(family: ModelFamily, component: str, cls: type, config: Mapping[str, Any], seed: int,
                  device: str | torch.device) -> WeightsOrigin:
    """Everything that determines `build_random`'s weights for one component: recipe, family and class, config,
    seed, the device and dtype they are drawn on (CPU and CUDA generators differ), and the library versions whose
    initialisers draw them."""
    import diffusers
    import transformers

    lib = diffusers if cls.__module__.startswith("diffusers") else transformers
    return named_random_origin(family, component, cls.__name__, lib.__name__, lib.__version__, config, seed, device)


def named_random_origin(family: ModelFamily, component: str, class_name: str, library: str, version: str,
                        config: Mapping[str, Any], seed: int, device: str | torch.device) -> WeightsOrigin:
    """`random_origin` from the class's and library's names and the library's version, without importing either
    (core/engine_bundle.py: a run whose networks are all engines builds no module)."""
    facts = {"init_recipe": INIT_RECIPE, "family": family.name, "component": component, "class": class_name,
             "config": dict(config), "seed": component_seed(seed, component),
             "init_device": torch.device(device).type, "init_dtype": str(torch.get_default_dtype()),
             "torch": torch.__version__, library: version}
    return WeightsOrigin("random", json.dumps(facts, sort_keys=True, default=str))


def library_version(name: str) -> str:
    """`name.__version__` (diffusers, transformers) without importing the library where it is not imported yet:
    importing diffusers alone took 4-9 s of a cold start here (it imports torch._dynamo). Then the installed
    distribution's metadata says it, which for a released wheel is the same string (tests/core/test_engine_bundle.py
    checks both libraries)."""
    import sys

    module = sys.modules.get(name)
    if module is not None:
        return module.__version__
    from importlib.metadata import version

    return version(name)


def state_signature(module: torch.nn.Module) -> tuple:
    """Names, shapes and in-place version counters of a module's tensors, without reading them: an in-place write
    since (a fused LoRA's add_, load_state_dict's copy_) or another set of tensors shows; a move or cast (device,
    dtype, channels_last) does not, as the values stay those of the origin. Assigning `.data` is not seen."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return tuple((n, tuple(t.shape), t._version) for n, t in sorted(tensors.items()))


_ORIGIN_ATTR = "_megafusion_origin"


def mark_origin(module: torch.nn.Module, origin: WeightsOrigin) -> None:
    """Records where a module loaded apart from a bundle (a ControlNet) got its weights, with its state now, so
    that `module_origin` can tell later whether it is still as loaded."""
    setattr(module, _ORIGIN_ATTR, (origin, state_signature(module)))


def module_origin(module: torch.nn.Module) -> WeightsOrigin | None:
    """The origin `mark_origin` recorded, if the module is still as it was then (else None: only its tensors say
    what it computes)."""
    mark = getattr(module, _ORIGIN_ATTR, None)
    if mark is None or mark[1] != state_signature(module):
        return None
    return mark[0]


def component_modules(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    """The bundle's modules by component name (`COMPONENTS`)."""
    return dict(zip(COMPONENTS, (bundle.unet, bundle.vae, *bundle.text_encoders)))


def _record_loaded(bundle: ModelBundle) -> ModelBundle:
    bundle.loaded_state.update({n: state_signature(m) for n, m in component_modules(bundle).items()})
    return bundle


def build_random(family: ModelFamily, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, skip: frozenset[str] = frozenset()) -> ModelBundle:
    """The family's real architecture (or tiny one) with random weights; nothing is downloaded. Components named
    in `skip` are built on the meta device (their configs, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = builtin_tokenizer()
    vocab = family.vocab_size or len(tok)
    parts: dict[str, tuple[type, dict, Callable]] = {
        "unet": (UNet2DConditionModel, family.unet, lambda cfg: UNet2DConditionModel(**cfg)),
        "vae": (AutoencoderKL, family.vae, lambda cfg: AutoencoderKL(**cfg))}
    for name, te in zip(COMPONENTS[2:], family.text_encoders):
        cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
        parts[name] = (cls, te.transformers_config(vocab), lambda cfg, cls=cls: cls(CLIPTextConfig(**cfg)))
    modules, origins = {}, {}
    for name, (cls, config, make) in parts.items():
        # Initialise on the target device: a real-size SDXL UNet initialises in seconds on a GPU.
        with _seeded(component_seed(seed, name)), torch.device("meta" if name in skip else device):
            modules[name] = make(config)
        origins[name] = random_origin(family, name, cls, config, seed, device)
    unet, vae = modules.pop("unet"), modules.pop("vae")
    family = family_for_config(family, unet.config, vae.config, "the built model")
    encoders = list(modules.values())
    bundle = ModelBundle(family, unet, vae, encoders, [tok for _ in encoders], f"random:{seed}", origins,
                         skipped=frozenset(skip) & set(parts))
    return _record_loaded(to_device(bundle, device, dtype))


def to_device(bundle: ModelBundle, device, dtype) -> ModelBundle:
    """Every module of `bundle` on `device` in `dtype`, in eval mode without gradients (in place)."""
    for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
        if m.device.type != "meta":  # a skipped component stays a placeholder
            m.to(device=device)
        if m.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
            m.to(dtype=dtype)
        m.eval()
        m.requires_grad_(False)
    return bundle


_COMPONENTS_SD15 = ("unet", "vae", "text_encoder", "tokenizer")
_COMPONENTS_SDXL = _COMPONENTS_SD15 + ("text_encoder_2", "tokenizer_2")


def pipeline_class_name(root: Path) -> str:
    """The `_class_name` of a diffusers folder's model_index.json ('' if it names none); WeightsError naming the
    folder when the index is missing, or the file when it is not a JSON object."""
    index = root / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{root} is not a diffusers model folder: {index} is missing")
    try:
        return str(json.loads(index.read_text()).get("_class_name", ""))
    except (json.JSONDecodeError, AttributeError) as e:
        raise WeightsError(f"{index} is not valid JSON: {e}") from None


def _check_folder(family: ModelFamily, root: Path, allow_pickle: bool) -> None:
    """Validates a diffusers folder; refuses pickle-only components unless allowed."""
    cls_name = pipeline_class_name(root)
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


def _scale_side(side: int, native_new: int, native_old: int, m: int) -> int:
    return max(m, round(side * native_new / native_old / m) * m)


def family_for_config(family: ModelFamily, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                      where: str) -> ModelFamily:
    """`family` with the native size a model's own configs give, as diffusers' pipelines take it: the UNet's
    `sample_size` (an int, or a [height, width] pair) times the VAE scale 2^(len(block_out_channels) - 1).

    The default plan's template is scaled with it, side by side and rounded to the pixel multiple, so that with
    no size given the output stays 2x native per side (docs/ALGORITHM.md §2). Returns `family` itself when the
    configs agree with it, and refuses a model whose down-sampling differs from the family's (the latent sizes
    and the pixel multiple come from the family). `where` names the model in messages.
    """
    scale = 2 ** (len(vae_config.get("block_out_channels", family.vae["block_out_channels"])) - 1)
    downs = len(unet_config.get("block_out_channels", family.unet["block_out_channels"])) - 1
    if scale != family.vae_scale or downs != family.unet_downsamples:
        raise WeightsError(
            f"{where}: a VAE scale of {scale} and {downs} UNet down-samplings; {family.name} has "
            f"{family.vae_scale} and {family.unet_downsamples}, so this is not a {family.name} model"
        )
    sample = unet_config.get("sample_size")
    if sample is None:  # nothing to go by: the family's own
        return family
    if isinstance(sample, int) and not isinstance(sample, bool):
        h = w = sample
    elif isinstance(sample, (list, tuple)) and len(sample) == 2 and all(isinstance(v, int) for v in sample):
        h, w = sample
    else:
        raise WeightsError(f"{where}: UNet sample_size {sample!r} is neither an int nor a [height, width] pair")
    if h <= 0 or w <= 0:
        raise WeightsError(f"{where}: UNet sample_size {sample!r} is not positive")
    nh, nw = h * scale, w * scale
    if (nh, nw) == (family.native_height, family.native_width):
        return family
    m = family.pixel_multiple
    template = tuple((_scale_side(sh, nh, family.native_height, m), _scale_side(sw, nw, family.native_width, m), n)
                     for sh, sw, n in family.default_stages)
    return dataclasses.replace(family, native_height=nh, native_width=nw, default_stages=template)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} could not be read as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return cfg


def folder_family(family: ModelFamily, root: str | Path) -> ModelFamily:
    """The family a local diffusers folder holds, its native size from `unet/config.json` and
    `vae/config.json` (`family_for_config`), read without loading any weights.

    The folder is checked as `load_model` checks it (all but the pickle rule, which loading applies), so a tool
    can plan against it, and refuse, before the expensive load."""
    root = Path(root).expanduser()
    _check_folder(family, root, allow_pickle=True)
    return family_for_config(family, _read_config(root / "unet" / "config.json"),
                             _read_config(root / "vae" / "config.json"), str(root))


def resolve_family(name: str, model_path: str | None = None) -> ModelFamily:
    """The family `load_model(name, model_path)` will return, known before loading: what the tools plan with.

    With a local folder its configs give the native size; without one, the built-in family (for a hub id,
    `load_model` takes the size from the downloaded configs)."""
    family = get_family(name)
    if model_path is None or not Path(model_path).expanduser().exists():
        return family
    if is_dit(family):
        from .dit_loading import dit_folder_family

        return dit_folder_family(family, model_path)
    return folder_family(family, model_path)


def weights_source(path_or_id: str, check_folder: Callable[[Path], None]) -> str:
    """A local folder (checked by `check_folder`) or a hub id; WeightsError naming a path that does not exist."""
    root = Path(path_or_id).expanduser()
    if root.exists():
        check_folder(root)
        return str(root)
    if _HUB_ID_RE.match(path_or_id) and not path_or_id.startswith((".", "/")):
        return path_or_id
    raise WeightsError(f"model path {path_or_id!r} does not exist; pass --model-path DIR (a local diffusers folder) "
                       "or --random-weights")


def load_options(allow_pickle: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """diffusers' from_pretrained keywords: safetensors only unless pickle is allowed (then each component takes
    whichever it has), and low_cpu_mem_usage as diffusers falls back to anyway without accelerate, said up front
    (no install banner on every load)."""
    from diffusers.utils import is_accelerate_available

    return {"use_safetensors": None if allow_pickle else True}, {"low_cpu_mem_usage": is_accelerate_available()}


def load_pretrained(family: ModelFamily, path_or_id: str, device="cpu", dtype=torch.float32,
                    allow_pickle: bool = False, skip: frozenset[str] = frozenset()) -> ModelBundle:
    """Loads a local diffusers folder, or a hub id where the network allows. From a local folder, components
    named in `skip` are built from their config on the meta device, their weights not read (a hub id loads
    everything: without files to fingerprint, the engine check hashes the loaded tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src = weights_source(path_or_id, lambda root: _check_folder(family, root, allow_pickle))
    kw, low_mem = load_options(allow_pickle)
    local = Path(src).exists()
    skip = frozenset(skip) if local else frozenset()

    def part(cls, sub: str, extra: dict):
        if sub not in skip:
            return cls.from_pretrained(src, subfolder=sub, **kw, **extra)
        if cls in (UNet2DConditionModel, AutoencoderKL):
            config = cls.load_config(src, subfolder=sub)
            with torch.device("meta"):
                return cls.from_config(config)
        config = CLIPTextConfig.from_pretrained(src, subfolder=sub)
        with torch.device("meta"):
            return cls(config)

    try:
        unet = part(UNet2DConditionModel, "unet", low_mem)
        vae = part(AutoencoderKL, "vae", low_mem)
        encoders = [part(CLIPTextModel, "text_encoder", {})]
        tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")]
        if family.is_xl:
            encoders.append(part(CLIPTextModelWithProjection, "text_encoder_2", {}))
            tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2"))
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"could not load {family.name} weights from {src!r}: {first}. Pass --model-path DIR "
            "(a local diffusers folder) or --random-weights"
        ) from None
    family = family_for_config(family, unet.config, vae.config, src)
    bundle = ModelBundle(family, unet, vae, encoders, tokenizers, src, skipped=skip & set(COMPONENTS))
    if local:
        root = Path(src).resolve()
        bundle.origins.update({n: WeightsOrigin("files", folder=str(root / n)) for n in component_modules(bundle)})
    return _record_loaded(to_device(bundle, device, dtype))


def load_model(name: str, model_path: str | None = None, random_weights: bool = False,
               allow_pickle: bool = False, device="cpu", dtype=torch.float32, seed: int = 0,
               skip: frozenset[str] = frozenset()) -> ModelBundle:
    """The one entry point: `--model`, `--model-path`, `--random-weights` as the CLI gives them. `skip` names
    components (`COMPONENTS`) to build on the meta device without weights, for those engines run
    (engine/load.py `modules_served`). SD3 / FLUX families give a `dit_loading.DiTBundle`."""
    family = get_family(name)
    if is_dit(family):
        from .dit_loading import load_dit_model

        return load_dit_model(family, model_path, random_weights, allow_pickle, device, dtype, seed)
    if model_path is not None:
        if random_weights:
            raise WeightsError("--model-path and --random-weights exclude each other")
        return load_pretrained(family, model_path, device, dtype, allow_pickle, skip)
    if family.tiny or random_weights:
        return build_random(family, seed, device, dtype, skip)
    return load_pretrained(family, family.hub_id, device, dtype, allow_pickle, skip)
