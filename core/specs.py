"""One I/O spec per exportable network: what export, engine build and runtime buffer allocation all read.

A dimension is an int (fixed) or an axis name (dynamic): `batch`, `height`/`width` (latent cells) or
`image_height`/`image_width` (pixels, always vae_scale times the latent axes). Shape profiles give, per plan
stage that uses a network, the min/opt/max shape of every input; stages pin the spatial axes exactly
(one engine profile per stage), batch ranges over what the runtime may send.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .dilation import Variant
from .families import ModelFamily
from .plan import StagePlan

TEXT_LENGTH = 77
"""CLIP context length: every prompt is padded to it."""

LATENT_CHANNELS = 4
"""Channels of the SD/SDXL latent."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                  "int32": torch.int32}
PRECISIONS = ("fp32", "fp16")
"""Precisions of UNet and text encoder engines."""

FP8 = "fp8"
"""A build precision for the UNet only: its transformer projections as FP8 (e4m3) GEMMs (engine/fp8.py), the rest
in bf16; its text encoders and VAE take fp16's rules (`network_precision`)."""

VAE_PRECISIONS = ("fp32", "fp16", "bf16")
"""Precisions of VAE engines: bf16 keeps fp32's exponent range where SDXL's VAE overflows fp16."""

_ELEMENT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

UNET, VAE_ENCODER, VAE_DECODER = "unet", "vae_encoder", "vae_decoder"

SPATIAL_AXES = ("height", "width", "image_height", "image_width")
"""Dynamic axes that carry a latent or pixel side."""

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a network."""

    name: str
    """I/O name in the ONNX graph and engine bindings."""
    dtype: str
    """Element type as numpy spells it (`float32`, `float16`, `int32`)."""
    shape: tuple[Dim, ...]
    """Ints are fixed sizes; strings name dynamic axes."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, axes: dict[str, int]) -> tuple[int, ...]:
        """The shape with every dynamic axis replaced by its value in `axes`."""
        return tuple(d if isinstance(d, int) else axes[d] for d in self.shape)


@dataclass(frozen=True)
class NetworkSpec:
    """One exportable network in one variant and precision."""

    network: str
    """`unet`, `vae_encoder`, `vae_decoder`, `text_encoder` or `text_encoder_2`."""
    variant: str
    """`standard`, or `dilated` for the UNet with the dilated middle."""
    dilation: int
    """Mid-block dilation baked into the export (1 for every network but the dilated UNet)."""
    precision: str
    """`fp32` or `fp16`: the dtype of the module when exported; `fp8` (UNet only): bf16 with FP8 projections."""
    inputs: tuple[TensorSpec, ...]
    """Inputs, in the wrapper module's argument order."""
    outputs: tuple[TensorSpec, ...]
    """Outputs, in the wrapper module's return order."""
    batch_range: tuple[int, int, int]
    """(min, opt, max) batch: the UNet runs the CFG batch of 2, other networks mostly 1."""

    @property
    def name(self) -> str:
        """File-system name: network, variant where it matters, precision."""
        mid = f"-{self.variant}" if self.network == UNET else ""
        return f"{self.network}{mid}-{self.precision}"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`torch.onnx.export`'s dynamic_axes argument."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def axes(self, batch: int, latent_height: int, latent_width: int, vae_scale: int) -> dict[str, int]:
        return {"batch": batch, "height": latent_height, "width": latent_width,
                "image_height": latent_height * vae_scale, "image_width": latent_width * vae_scale}

    def sample_inputs(self, axes: dict[str, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Plausible inputs of the given sizes (token ids in range, timestep 981, SDXL time ids)."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape = t.concrete(axes)
            if t.name == "input_ids":
                x = torch.randint(0, 500, shape, generator=g, dtype=torch.int64)
            elif t.name == "timestep":
                x = torch.full(shape, 981.0)
            elif t.name == "time_ids":
                h, w = axes["image_height"], axes["image_width"]
                x = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32).expand(shape).clone()
            else:
                x = torch.randn(shape, generator=g)
            out.append(x.to(t.torch_dtype))
        return tuple(out)


@dataclass(frozen=True)
class ShapeProfile:
    """Min/opt/max shapes of every input of one network for one plan stage."""

    stage: int
    """0-based plan stage this profile serves (the final VAE decode counts as the last stage)."""
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]
    """(input name, min, opt, max) per input, in the spec's input order."""

    def covers(self, name: str, shape: tuple[int, ...]) -> bool:
        for n, lo, _, hi in self.shapes:
            if n == name:
                return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        return False

    def to_json(self) -> dict:
        return {"stage": self.stage, "shapes": [[n, list(a), list(o), list(b)] for n, a, o, b in self.shapes]}

    @staticmethod
    def from_json(d: dict) -> "ShapeProfile":
        return ShapeProfile(int(d["stage"]), tuple((n, tuple(a), tuple(o), tuple(b)) for n, a, o, b in d["shapes"]))


def _text_dim(family: ModelFamily) -> int:
    return int(family.unet["cross_attention_dim"])


def unet_spec(family: ModelFamily, precision: str = "fp32", dilation: int = 1) -> NetworkSpec:
    """eps = UNet(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) at mid dilation `dilation`."""
    # fp8: the UNet around the FP8 GEMMs computes in bf16 (row-wise `_scaled_mm` writes bf16 on CUDA).
    f = {"fp16": "float16", FP8: "bfloat16"}.get(precision, "float32")
    lat = ("batch", LATENT_CHANNELS, "height", "width")
    inputs = [TensorSpec("sample", f, lat),
              # float32 even at fp16: integer timesteps up to 999 and sizes in time ids stay exact.
              TensorSpec("timestep", "float32", (1,)),
              TensorSpec("encoder_hidden_states", f, ("batch", TEXT_LENGTH, _text_dim(family)))]
    if family.is_xl:
        pooled = family.text_encoders[-1].projection_dim
        inputs += [TensorSpec("text_embeds", f, ("batch", pooled)), TensorSpec("time_ids", "float32", ("batch", 6))]
    variant = Variant.STANDARD if dilation == 1 else Variant.DILATED
    return NetworkSpec(UNET, variant, dilation, precision, tuple(inputs), (TensorSpec("eps", f, lat),), (1, 2, 2))


def vae_specs(family: ModelFamily, precision: str = "fp32") -> tuple[NetworkSpec, NetworkSpec]:
    """(encoder: image -> posterior mean, decoder: latent -> image); latents unscaled."""
    f = _ELEMENT[precision]
    lat = TensorSpec("latent", f, ("batch", LATENT_CHANNELS, "height", "width"))
    img = TensorSpec("image", f, ("batch", 3, "image_height", "image_width"))
    enc = NetworkSpec(VAE_ENCODER, Variant.STANDARD, 1, precision, (img,), (lat,), (1, 1, 1))
    dec = NetworkSpec(VAE_DECODER, Variant.STANDARD, 1, precision, (lat,), (img,), (1, 1, 1))
    return enc, dec


def text_encoder_name(index: int) -> str:
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


def text_encoder_specs(family: ModelFamily, precision: str = "fp32") -> tuple[NetworkSpec, ...]:
    """SD1.5: last hidden state. SDXL: penultimate hidden state; the second encoder adds its pooled output."""
    f = "float16" if precision == "fp16" else "float32"
    out = []
    for i, te in enumerate(family.text_encoders):
        outputs = [TensorSpec("hidden_states", f, ("batch", TEXT_LENGTH, te.hidden_size))]
        if te.with_projection:
            outputs.append(TensorSpec("pooled", f, ("batch", te.projection_dim)))
        ids = TensorSpec("input_ids", "int32", ("batch", TEXT_LENGTH))  # int32: what TensorRT binds natively
        out.append(NetworkSpec(text_encoder_name(i), Variant.STANDARD, 1, precision, (ids,), tuple(outputs),
                               (1, 1, 2)))
    return tuple(out)


def network_spec(family: ModelFamily, network: str, precision: str, dilation: int = 1) -> NetworkSpec:
    """The spec of one network by name (what a manifest entry records)."""
    if network == UNET:
        return unet_spec(family, precision, dilation)
    for spec in (*vae_specs(family, precision), *text_encoder_specs(family, precision)):
        if spec.network == network:
            return spec
    raise ValueError(f"{family.name} has no network {network!r}")


def _profile(spec: NetworkSpec, stage: int, lat_h: int, lat_w: int, vae_scale: int) -> ShapeProfile:
    shapes = []
    for t in spec.inputs:
        lo, opt, hi = (t.concrete(spec.axes(b, lat_h, lat_w, vae_scale)) for b in spec.batch_range)
        shapes.append((t.name, lo, opt, hi))
    return ShapeProfile(stage, tuple(shapes))


def profile_sizes(network: str, profiles: tuple[ShapeProfile, ...], vae_scale: int) -> list[str]:
    """Pixel sizes (WIDTHxHEIGHT) the profiles serve; empty for fixed-shape networks (text encoders)."""
    out = []
    for p in profiles:
        shape = p.shapes[0][2]
        if len(shape) == 4:
            s = 1 if network == VAE_ENCODER else vae_scale
            out.append(f"{shape[3] * s}x{shape[2] * s}")
    return out


def default_dtype(device: torch.device) -> torch.dtype:
    """The networks' dtype when none is asked for: fp16 on CUDA, fp32 on CPU (CPUs lack fast fp16 kernels)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def default_vae_dtype(family: ModelFamily, vae_config, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE's dtype when none is asked for: the model's, except a VAE that overflows in fp16 (SDXL's
    `force_upcast`; diffusers' SDXL pipeline upcasts it) under fp16: then bf16 on CUDA (fp32's exponent range at
    half the bytes: SDXL 2048 ran 3.14 s against 3.64 s with fp32 on the H200, peak 13.0 against 18.1 GiB),
    fp32 elsewhere (CPUs lack fast bf16 convolutions). `vae_config` is the loaded VAE's config."""
    if not (family.is_xl and dtype == torch.float16 and vae_config.get("force_upcast", False)):
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def network_precision(precision: str) -> str:
    """The precision a build of `precision` gives a network other than the UNet: fp16 under fp8, whose FP8 GEMMs are
    the UNet's. fp16 rather than bf16 for the text encoders: CLIP runs in fp16 in every fp16 pipeline, fp16 keeps
    three more mantissa bits, and the entries are then the fp16 build's own (one folder holding both builds shares
    them)."""
    return "fp16" if precision == FP8 else precision


def default_vae_precision(family: ModelFamily, precision: str, bf16: bool = False) -> str:
    """For a VAE that overflows in fp16 (SDXL's `force_upcast`) under fp16 (or fp8) engines: bf16 where the backend
    builds it for a GPU (`bf16`; as `default_vae_dtype` runs it), else fp32. Other VAEs take the engines' precision
    (`network_precision`)."""
    precision = network_precision(precision)
    if precision == "fp16" and family.vae.get("force_upcast", False):
        return "bf16" if bf16 else "fp32"
    return precision


@dataclass(frozen=True)
class Requirement:
    """One network a plan needs, with the profiles of the stages that run it."""

    spec: NetworkSpec
    """The network, variant and precision."""
    profiles: tuple[ShapeProfile, ...]
    """One per stage that runs it (stages of equal size share one)."""


def plan_requirements(family: ModelFamily, plan: StagePlan, precision: str = "fp32", dilation: int = 2,
                      vae_precision: str | None = None, relay: str = "pixel") -> tuple[Requirement, ...]:
    """What a run of `plan` calls, at which shapes (the pixel relay's set covers the latent relay's).

    UNet: standard at stage 1, dilated (unless dilation is 1) at later stages. VAE decoder: every stage
    (truncation decode, final decode) with the pixel relay, else the last; VAE encoder: every stage after
    the first (pixel relay only). Text encoders: fixed shapes.
    """
    vs = family.vae_scale
    lat = [(s.height // vs, s.width // vs) for s in plan.stages]
    unets: dict[int, list[int]] = {}
    for k in range(len(plan.stages)):
        unets.setdefault(1 if k == 0 else dilation, []).append(k)
    enc, dec = vae_specs(family, vae_precision or default_vae_precision(family, precision))
    needs: list[tuple[NetworkSpec, list[int]]] = [(s, [0]) for s in
                                                  text_encoder_specs(family, network_precision(precision))]
    needs += [(unet_spec(family, precision, d), ks) for d, ks in unets.items()]
    pixel = relay == "pixel"
    needs += [(dec, list(range(len(lat))) if pixel else [len(lat) - 1])]
    if len(lat) > 1 and pixel:
        needs += [(enc, list(range(1, len(lat))))]
    return tuple(_requirement(spec, stages, lat, vs) for spec, stages in needs)


def _requirement(spec: NetworkSpec, stages: list[int], lat: list[tuple[int, int]], vs: int) -> Requirement:
    """`spec` at the given stages' latent sizes, one profile per distinct shape."""
    profiles, seen = [], set()
    for k in stages:
        p = _profile(spec, k, *lat[k], vs)
        if p.shapes not in seen:  # text encoders, and repeated stage sizes, need one profile
            seen.add(p.shapes)
            profiles.append(p)
    return Requirement(spec, tuple(profiles))


def unet_stage_requirements(family: ModelFamily, plan: StagePlan, dilation: int,
                            specs_for: Callable[[int], Iterable[NetworkSpec]]) -> tuple[Requirement, ...]:
    """Networks that run where the UNet runs (ControlNets, controlled and IP-Adapter UNets): `specs_for(d)` gives
    their specs at dilation d; standard at stage 1, dilated (unless dilation is 1) later, one profile per distinct
    stage size, as `plan_requirements` gives the UNet's."""
    vs = family.vae_scale
    lat = [(s.height // vs, s.width // vs) for s in plan.stages]
    by_dilation: dict[int, list[int]] = {}
    for k in range(len(plan.stages)):
        by_dilation.setdefault(1 if k == 0 else dilation, []).append(k)
    return tuple(_requirement(spec, stages, lat, vs) for d, stages in by_dilation.items() for spec in specs_for(d))


# Range profiles: one engine serving every side between a plan's smallest and largest (AOTInductor packages).

def latent_range(family: ModelFamily, plan: StagePlan) -> tuple[int, int]:
    """(smallest, largest) latent side over every stage of `plan`, both axes."""
    sides = [side // family.vae_scale for s in plan.stages for side in (s.height, s.width)]
    return min(sides), max(sides)


def range_profile(family: ModelFamily, spec: NetworkSpec, plan: StagePlan) -> ShapeProfile:
    """One profile whose min/max are what the package accepts: batch over the spec's range, sides over the plan's."""
    lo, hi = latent_range(family, plan)
    s1 = plan.stages[0]
    shapes = []
    for t in spec.inputs:
        # opt: stage 1's size (what the runtime runs most), at the spec's usual batch.
        dims = [spec.axes(b, h, w, family.vae_scale) for b, h, w in
                ((spec.batch_range[0], lo, lo), (spec.batch_range[1], s1.height // family.vae_scale,
                                                  s1.width // family.vae_scale), (spec.batch_range[2], hi, hi))]
        shapes.append((t.name, *(t.concrete(d) for d in dims)))
    return ShapeProfile(0, tuple(shapes))


def describe_range(family: ModelFamily, spec: NetworkSpec, profile: ShapeProfile) -> str:
    """The pixel sizes a package accepts, e.g. '128x128 to 256x256 (sides in steps of 64)'; '' for fixed shapes."""
    for t, (_, lo, _, hi) in zip(spec.inputs, profile.shapes):
        if len(t.shape) == 4 and t.shape[2] in SPATIAL_AXES:
            s = 1 if t.shape[2] == "image_height" else family.vae_scale
            return (f"{lo[3] * s}x{lo[2] * s} to {hi[3] * s}x{hi[2] * s} "
                    f"(sides in steps of {family.pixel_multiple})")
    return ""
