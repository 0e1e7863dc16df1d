"""A `ModelBundle` for runs whose every network is an engine (`mf-generate --engines`): each component's config
read as JSON, the tokenizers, and where the weights came from (which the engines' keys are checked against); no
torch module is built and no diffusers or transformers model class is imported. With random weights the tokenizer is
core/clip_tokenizer.py's, so transformers is not imported at all; a folder's tokenizers are still transformers'.

`load_model(skip=...)` builds the components engines run on the meta device, which imports diffusers' UNet and VAE
and transformers' CLIP modules and constructs them: about 9 s of an SDXL cold start on the H200 (issue #15). The
engines need none of it; the runtime reads only a few config values (the VAE's `scaling_factor` and
`force_upcast`, the sizes `family_for_config` checks). A key that neither the family table nor config.json holds
is the model class's default, as the class would hold it; that lookup imports the class, and only then.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .families import ModelFamily, get_family
from .loading import (COMPONENTS, ModelBundle, WeightsError, WeightsOrigin, _check_folder, _read_config,
                      family_for_config, library_version, named_random_origin, state_signature,
                      weights_source)


def component_class(family: ModelFamily, component: str) -> tuple[str, str]:
    """(library, class name) of the module that holds `component` (`COMPONENTS`), as `build_random` builds it."""
    if component == "unet":
        return "diffusers", "UNet2DConditionModel"
    if component == "vae":
        return "diffusers", "AutoencoderKL"
    te = family.text_encoders[COMPONENTS.index(component) - 2]
    return "transformers", "CLIPTextModelWithProjection" if te.with_projection else "CLIPTextModel"


class ComponentConfig(Mapping):
    """A component's config as its module's `config` reads: the values given (the family's table or the folder's
    config.json), else the model class's default. Item and attribute access, like diffusers' `FrozenDict`."""

    def __init__(self, values: Mapping[str, Any], library: str, class_name: str):
        self._values = dict(values)
        self._library, self._class_name = library, class_name
        self._defaults: dict[str, Any] | None = None

    def _all_defaults(self) -> dict[str, Any]:
        if self._defaults is None:  # imports the class: only code that reads an unlisted key pays for it
            cls = getattr(importlib.import_module(self._library), self._class_name)
            if self._library == "transformers":
                self._defaults = cls.config_class().to_dict()
            else:
                params = list(inspect.signature(cls.__init__).parameters.values())[1:]
                self._defaults = {p.name: p.default for p in params
                                  if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
        return self._defaults

    def __getitem__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        return self._all_defaults()[key]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{self._class_name} config has no {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter({**self._all_defaults(), **self._values})

    def __len__(self) -> int:
        return len({**self._all_defaults(), **self._values})


class EngineComponent(torch.nn.Module):
    """Stands in a bundle for a component that engines run: its config, no layers and no weights (so its
    `state_signature` never changes and the weights' origin stays what the engines are checked against)."""

    def __init__(self, name: str, config: ComponentConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.name, self.config, self._dtype = name, config, dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("meta")  # as `load_model(skip=)` leaves a skipped component

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} runs from engines in this process; it has no torch module")


def engines_bundle(name: str, model_path: str | None = None, random_weights: bool = False, seed: int = 0,
                   allow_pickle: bool = False) -> ModelBundle | None:
    """The bundle `load_model(name, model_path, random_weights, allow_pickle, seed=seed, skip=COMPONENTS)` gives,
    for a run whose every component engines run: same family, tokenizers, origins and configs, without modules
    (`EngineComponent`s). None where that load would read weights anyway (a hub id: its engines are checked
    against the downloaded tensors) or for a family this does not cover (SD3, FLUX, IF)."""
    family = get_family(name)
    if family.kind not in ("sd15", "sdxl"):
        return None
    if model_path is not None and random_weights:
        raise WeightsError("--model-path and --random-weights exclude each other")
    if model_path is None and not (family.tiny or random_weights):
        return None  # a hub id
    if model_path is not None:
        src = weights_source(model_path, lambda root: _check_folder(family, root, allow_pickle))
        if not Path(src).exists():
            return None  # a hub id given as --model-path
        return _folder_bundle(family, Path(src))
    return _random_bundle(family, seed)


def _random_bundle(family: ModelFamily, seed: int) -> ModelBundle:
    from .clip_tokenizer import builtin_clip_tokenizer

    tok = builtin_clip_tokenizer()  # builtin_tokenizer's, without importing transformers where it can
    vocab = family.vocab_size or len(tok)  # as build_random sizes the text encoders
    values = {"unet": family.unet, "vae": family.vae}
    values.update({n: te.transformers_config(vocab) for n, te in zip(COMPONENTS[2:], family.text_encoders)})
    parts, origins = {}, {}
    for n, config in values.items():
        library, cls = component_class(family, n)
        parts[n] = EngineComponent(n, ComponentConfig(config, library, cls))
        # build_random draws on the CPU here (load_model's default device): the origin says so.
        origins[n] = named_random_origin(family, n, cls, library, library_version(library), config, seed, "cpu")
    return _bundle(family, parts, [tok] * (len(parts) - 2), f"random:{seed}", origins, "the built model")


def _folder_bundle(family: ModelFamily, root: Path) -> ModelBundle:
    from transformers import CLIPTokenizer

    subfolders = COMPONENTS[:2 + len(family.text_encoders)]
    parts = {}
    for n in subfolders:
        library, cls = component_class(family, n)
        parts[n] = EngineComponent(n, ComponentConfig(_read_config(root / n / "config.json"), library, cls))
    tokenizers = [CLIPTokenizer.from_pretrained(str(root), subfolder=sub)
                  for sub in ("tokenizer", "tokenizer_2")[:len(family.text_encoders)]]
    real = root.resolve()
    origins = {n: WeightsOrigin("files", folder=str(real / n)) for n in subfolders}
    return _bundle(family, parts, tokenizers, str(root), origins, str(root))


def _bundle(family: ModelFamily, parts: dict[str, EngineComponent], tokenizers: list, source: str,
            origins: dict[str, WeightsOrigin], where: str) -> ModelBundle:
    unet, vae = parts["unet"], parts["vae"]
    family = family_for_config(family, unet.config, vae.config, where)
    encoders = [parts[n] for n in COMPONENTS[2:] if n in parts]
    bundle = ModelBundle(family, unet, vae, encoders, tokenizers, source, origins, skipped=frozenset(parts))
    bundle.loaded_state.update({n: state_signature(m) for n, m in parts.items()})  # () : no tensors
    return bundle
