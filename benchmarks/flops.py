"""Cost accounting (docs/ALGORITHM.md §11), counted on the `meta` device: no weights, no arithmetic, any size.

Two conventions, side by side:
- the paper's "GFLOPs": multiply-accumulates of `nn.Conv2d` and `nn.Linear` only (forward hooks), UNet only,
  CFG counted as batch 2. Attention matmuls, norms and the VAE are left out. This reproduces Table 1's
  SD1.5 rows (135.0K direct, 48.2K MegaFusion at 1024);
- true FLOPs: `torch.utils.flop_counter.FlopCounterMode` (2 per MAC, attention matmuls included), for the
  UNet, the VAE decode/encode of every relay and the final decode; text encoders listed separately.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..core.dilation import set_mid_dilation
from ..core.families import SD15, ModelFamily
from ..core.plan import Stage, StagePlan

PAPER_TABLE1_GMACS = {
    "sd15 1024 direct": 135.0e3,
    "sd15 1024 megafusion": 48.2e3,
    "sdxl 2048 direct": 540.2e3,
    "sdxl 2048 megafusion": 216.1e3,
}
"""Table 1's "GFlops" column (G-MACs), as printed."""

SDXL_NOTE = (
    "The paper's SDXL GFLOPs (540.2K direct, 216.1K MegaFusion at 2048) are its SD1.5 per-step figure at "
    "1024 scaled by pixel count, not SDXL's UNet; the true SDXL figures are given here."
)


@dataclass(frozen=True)
class ForwardCost:
    """What one forward of one network costs."""

    macs: int
    """Multiply-accumulates of Conv2d and Linear layers (the paper's convention)."""
    flops: int
    """All FLOPs FlopCounterMode sees: 2 per MAC, attention matmuls included."""
    attention_flops: int
    """The part of `flops` in attention matmuls (bmm / scaled-dot-product ops)."""

    def __add__(self, other: ForwardCost) -> ForwardCost:
        return ForwardCost(self.macs + other.macs, self.flops + other.flops,
                           self.attention_flops + other.attention_flops)

    def __mul__(self, n: int) -> ForwardCost:
        return ForwardCost(self.macs * n, self.flops * n, self.attention_flops * n)


ZERO = ForwardCost(0, 0, 0)


def _layer_macs(module: torch.nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features  # Linear: one MAC per input feature per output element


def _is_attention_op(name: str) -> bool:
    return "bmm" in name or "scaled_dot_product" in name


def _sdpa_cpu(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    # FlopCounterMode has no formula for the CPU flash kernel: real CPU tensors would count SDPA as 0.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu} if op is not None else {}


def count_forward(module: torch.nn.Module, call: Callable[[], object]) -> ForwardCost:
    """Runs `call()` (a forward of `module`) once, counting MACs by hooks and FLOPs by FlopCounterMode."""
    macs = [0]

    def hook(m, _inputs, output):
        macs[0] += _layer_macs(m, output)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter, torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in per_op.items() if _is_attention_op(str(k)))
    return ForwardCost(macs[0], int(counter.get_total_flops()), int(attention))


class VaeCostCounter:
    """The VAE passes of a family whose `vae` config builds an `AutoencoderKL`, counted on the meta device and
    memoised; the counters of the UNet and the transformer families add their denoisers."""

    def __init__(self, family):
        from diffusers import AutoencoderKL

        self.family = family
        with torch.device("meta"):
            self.vae_module = AutoencoderKL(**family.vae)
        self._memo: dict[tuple, ForwardCost] = {}

    def _cached(self, key: tuple, make: Callable[[], ForwardCost]) -> ForwardCost:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def vae_decode(self, height: int, width: int) -> ForwardCost:
        """Decoding one latent to a (height, width) image."""
        vs = self.family.vae_scale

        def make():
            with torch.device("meta"):
                z = torch.empty(1, self.vae_module.config.latent_channels, height // vs, width // vs)
            return count_forward(self.vae_module, lambda: self.vae_module.decode(z, return_dict=False))
        return self._cached(("decode", height, width), make)

    def vae_encode(self, height: int, width: int) -> ForwardCost:
        """Encoding one (height, width) image to its posterior mean."""
        def make():
            with torch.device("meta"):
                x = torch.empty(1, 3, height, width)
            return count_forward(self.vae_module, lambda: self.vae_module.encode(x).latent_dist.mean)
        return self._cached(("encode", height, width), make)


def unet_meta_inputs(family: ModelFamily, height: int, width: int, batch: int):
    """(sample, timestep, text states, added conditions) of a UNet-shaped forward at this image size, on the meta
    device (SDXL's pooled text and time ids included): what the UNet and its ControlNets are counted on."""
    cfg, vs = family.unet, family.vae_scale
    with torch.device("meta"):
        sample = torch.empty(batch, cfg["in_channels"], height // vs, width // vs)
        states = torch.empty(batch, 77, cfg["cross_attention_dim"])
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
        t = torch.tensor(981)
    return sample, t, states, added


class MetaCostCounter(VaeCostCounter):
    """A family's networks built on the meta device once; forwards counted on meta tensors, memoised."""

    def __init__(self, family: ModelFamily):
        from diffusers import UNet2DConditionModel

        super().__init__(family)
        with torch.device("meta"):
            self.unet_module = UNet2DConditionModel(**family.unet)
        self._text_modules: list[torch.nn.Module] | None = None

    def unet(self, height: int, width: int, batch: int = 2, dilation: int = 1) -> ForwardCost:
        """One UNet forward at pixel size (height, width); batch 2 is one CFG step."""
        return self._cached(("unet", height, width, batch, dilation),
                            lambda: self._count_unet(height, width, batch, dilation))

    def _unet_inputs(self, height: int, width: int, batch: int):
        """(sample, timestep, text states, added conditions) on meta for one UNet call."""
        return unet_meta_inputs(self.family, height, width, batch)

    def _count_unet(self, height: int, width: int, batch: int, dilation: int) -> ForwardCost:
        sample, t, states, added = self._unet_inputs(height, width, batch)
        set_mid_dilation(self.unet_module, dilation)
        try:
            return count_forward(self.unet_module, lambda: self.unet_module(
                sample, t, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False))
        finally:
            set_mid_dilation(self.unet_module, 1)

    def text_encoders(self) -> ForwardCost:
        """Encoding one prompt (77 tokens) with every text encoder of the family."""
        return self._cached(("text",), self._count_text)

    def _count_text(self) -> ForwardCost:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        vocab = self.family.vocab_size or 514  # tiny models: the built-in tokenizer's size
        total = ZERO
        for te in self.family.text_encoders:
            cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
            with torch.device("meta"):
                enc = cls(CLIPTextConfig(**te.transformers_config(vocab)))
                ids = torch.zeros(1, 77, dtype=torch.long)
            total = total + count_forward(enc, lambda: enc(ids, output_hidden_states=True))
        return total


@dataclass(frozen=True)
class SegmentCost:
    """Cost of one timed segment of a generation, in the pipeline's order of segments."""

    name: str
    """The segment, named as `GenerationResult.timings` names it."""
    kind: str
    """`text`, `stage`, `relay`, `encode` (image to image's photo) or `decode`."""
    paper_gmacs: float
    """The paper's convention: UNet conv/linear G-MACs, CFG as batch 2 (0 outside stages)."""
    true_tflop: float
    """True TFLOP: 2 per MAC, attention included (UNet steps, or the VAE decode/encode)."""
    attention_tflop: float
    """The part of `true_tflop` in attention matmuls."""


@dataclass(frozen=True)
class PlanCost:
    """Cost of one plan, per segment and in total."""

    model: str
    """Family name."""
    plan: str
    """The plan, described."""
    cfg: bool
    """Whether the UNet ran with the CFG batch of 2."""
    segments: tuple[SegmentCost, ...]
    """Text encoders, stage 1, relay 1->2, stage 2, ..., final decode."""

    @property
    def paper_gmacs(self) -> float:
        return sum(s.paper_gmacs for s in self.segments)

    @property
    def true_tflop(self) -> float:
        """UNet + relays + final decode; text encoders are listed separately."""
        return sum(s.true_tflop for s in self.segments if s.kind != "text")

    @property
    def text_tflop(self) -> float:
        return sum(s.true_tflop for s in self.segments if s.kind == "text")

    @property
    def unet_tflop(self) -> float:
        return sum(s.true_tflop for s in self.segments if s.kind == "stage")


def _tera(c: ForwardCost) -> tuple[float, float]:
    return c.flops / 1e12, c.attention_flops / 1e12


def plan_segments(counter: VaeCostCounter, plan: StagePlan, text: ForwardCost,
                  step: Callable[[int, Stage], ForwardCost], relay: str = "pixel") -> tuple[SegmentCost, ...]:
    """The segments of `plan` in the order a stage loop times them: the text encoders (`text`), each stage's
    denoiser steps (`step(k, stage)` is one step of stage k; truncation still runs the last one), each relay's VAE
    decode and encode (pixel relay), the final decode."""
    segs = [SegmentCost("text encoders", "text", 0.0, *_tera(text))]
    for k, st in enumerate(plan.stages):
        if k > 0:
            prev = plan.stages[k - 1]
            vae = ZERO
            if relay == "pixel":
                vae = counter.vae_decode(prev.height, prev.width) + counter.vae_encode(st.height, st.width)
            segs.append(SegmentCost(f"relay {k}->{k + 1}", "relay", 0.0, *_tera(vae)))
        cost = step(k, st) * st.steps
        segs.append(SegmentCost(f"stage {k + 1} ({st.width}x{st.height}, {st.steps} steps)", "stage",
                                cost.macs / 1e9, *_tera(cost)))
    last = plan.stages[-1]
    segs.append(SegmentCost("decode", "decode", 0.0, *_tera(counter.vae_decode(last.height, last.width))))
    return tuple(segs)


def plan_cost(counter: MetaCostCounter, plan: StagePlan, cfg: bool = True, relay: str = "pixel",
              dilation: int = 2) -> PlanCost:
    """Per-segment costs of `plan`, as the engine runs it."""
    fam = counter.family
    text_passes = 1 + (cfg and not fam.is_xl)  # SDXL's empty negative prompt is zeros, not encoded
    batch = 2 if cfg else 1
    segs = plan_segments(counter, plan, counter.text_encoders() * text_passes,
                         lambda k, st: counter.unet(st.height, st.width, batch, 1 if k == 0 else dilation), relay)
    return PlanCost(fam.name, plan.describe(), cfg, segs)


def paper_scaled_gmacs(sd15_counter: MetaCostCounter, plan: StagePlan) -> float:
    """How the paper got its SDXL figures: SD1.5's per-step G-MACs at 1024 times pixels / 1024^2."""
    if sd15_counter.family.name != SD15.name:
        raise ValueError("the paper scales the real SD1.5 UNet's figures; pass a counter for sd15")
    per_step = sd15_counter.unet(1024, 1024).macs / 1e9
    return sum(per_step * st.pixels / 1024**2 * st.steps for st in plan.stages)


@dataclass(frozen=True)
class Throughput:
    """A measured time held against a FLOP count and a peak."""

    tflop_per_s: float
    """Achieved TFLOP/s."""
    fraction_of_peak: float | None
    """Achieved over peak TFLOP/s (None without a peak)."""


def achieved(tflop: float, seconds: float, peak_tflop_per_s: float | None = None) -> Throughput:
    """TFLOP done in `seconds` -> achieved TFLOP/s and its fraction of `peak_tflop_per_s`."""
    if seconds <= 0:
        raise ValueError(f"time must be positive, got {seconds}")
    rate = tflop / seconds
    return Throughput(rate, rate / peak_tflop_per_s if peak_tflop_per_s else None)


def cost_counter(family: ModelFamily):
    """The meta-device counter for `family`: `MetaCostCounter` for the UNet families, `dit_flops.DiTCostCounter`
    for SD3 / FLUX (whose plans `dit_flops.dit_plan_cost` prices)."""
    if family.kind in ("sd3", "flux"):
        from .dit_flops import DiTCostCounter

        return DiTCostCounter(family)
    return MetaCostCounter(family)

# --- DeepFloyd IF (pixel space, docs/ALGORITHM.md §20) ---------------------------------------------------------

PAPER_TABLE1_IF_GMACS = {
    "if stage I 128 direct": 111.7e3,
    "if stage I 128 megafusion": 44.9e3,
    "if stage II 512 direct": 60.7e3,
    "if stage II 512 megafusion": 24.3e3,
}
"""Table 1's Floyd rows as printed (stage I: 100 steps at 128 against 64/80 -> 128/20; stage II: 50 steps at
512 against 256/40 -> 512/10)."""

IF_NOTE = (
    "Counted in the paper's convention (conv/linear MACs, UNet only, CFG batch 2), IF-I-XL and IF-II-L give ten "
    "times the paper's Floyd figures (ours / paper = 9.99 and 10.01 for stage I, 9.97 and 9.98 for stage II) and "
    "its MegaFusion/direct ratios (0.403 vs 0.402, 0.401 vs 0.400). The paper does not say why its Floyd column is "
    "a tenth of the count: a unit of 10 G-MACs, or a tenth of the steps counted, would both give it."
)


class IFCostCounter:
    """An IF cascade's two UNets on the meta device; one forward per (cascade stage, size, batch, dilation)."""

    def __init__(self, family):
        from diffusers import UNet2DConditionModel

        self.family = family
        with torch.device("meta"):
            self.unets = {1: UNet2DConditionModel(**family.unet_1), 2: UNet2DConditionModel(**family.unet_2)}
        self._memo: dict[tuple, ForwardCost] = {}

    def unet(self, cascade: int, height: int, width: int, batch: int = 2, dilation: int = 1) -> ForwardCost:
        key = (cascade, height, width, batch, dilation)
        if key not in self._memo:
            self._memo[key] = self._count(*key)
        return self._memo[key]

    def _count(self, cascade: int, height: int, width: int, batch: int, dilation: int) -> ForwardCost:
        unet = self.unets[cascade]
        cfg = unet.config
        with torch.device("meta"):
            sample = torch.empty(batch, cfg.in_channels, height, width)
            states = torch.empty(batch, self.family.max_length, cfg.encoder_hid_dim)
            labels = torch.zeros(batch, dtype=torch.long) if cascade == 2 else None
            t = torch.tensor(981)
        set_mid_dilation(unet, dilation)
        try:
            return count_forward(unet, lambda: unet(sample, t, encoder_hidden_states=states, class_labels=labels,
                                                    return_dict=False))
        finally:
            set_mid_dilation(unet, 1)

    def plan(self, cascade: int, plan: StagePlan, cfg: bool = True, dilation: int = 2) -> ForwardCost:
        """Every UNet step of one cascade stage's plan (the truncating step included, as it runs)."""
        total = ZERO
        for k, st in enumerate(plan.stages):
            total = total + self.unet(cascade, st.height, st.width, 2 if cfg else 1, 1 if k == 0 else dilation) * st.steps
        return total

# --- Extra conditions (docs/ALGORITHM.md §14-16): ControlNets beside the UNet, image to image ----------------------


class ControlNetCostCounter:
    """One ControlNet, built on the meta device from its folder's config.json; one forward per step and shape,
    memoised. It runs at every step of every stage (runtime/controlnet.py: its scale is zero outside
    [start, end], not skipped), with the UNet's batch and the mid block dilated as the UNet's."""

    def __init__(self, family: ModelFamily, folder: str):
        from diffusers import ControlNetModel

        self.family = family
        with torch.device("meta"):
            self.module = ControlNetModel.from_config(ControlNetModel.load_config(folder))
        self._memo: dict[tuple, ForwardCost] = {}

    def step(self, height: int, width: int, batch: int = 2, dilation: int = 1) -> ForwardCost:
        key = (height, width, batch, dilation)
        if key not in self._memo:
            self._memo[key] = self._count(*key)
        return self._memo[key]

    def _count(self, height: int, width: int, batch: int, dilation: int) -> ForwardCost:
        sample, t, states, added = unet_meta_inputs(self.family, height, width, batch)
        image = torch.empty(batch, 3, height, width, device="meta")
        set_mid_dilation(self.module, dilation)
        try:
            return count_forward(self.module, lambda: self.module(
                sample, t, encoder_hidden_states=states, controlnet_cond=image, conditioning_scale=1.0,
                added_cond_kwargs=added, return_dict=False))
        finally:
            set_mid_dilation(self.module, 1)


def conditioned_plan_cost(counter: MetaCostCounter, plan: StagePlan, cfg: bool = True, relay: str = "pixel",
                          dilation: int = 2, controlnets: tuple[ControlNetCostCounter, ...] = (),
                          entry=None) -> PlanCost:
    """`plan_cost` with the extra conditions, in the segments the pipeline times: each step's ControlNet forwards
    added to the UNet's (paper G-MACs too: the ControlNet is a UNet encoder); with image to image (`entry`, a
    runtime.img2img.EntryPoint) the stages before the entry skipped, the photo's VAE encode at the entry stage's size
    in place of a relay (segment "encode image"), and the entry stage's skipped steps left out. A LoRA fused or
    swapped into the weights costs nothing per step."""
    fam = counter.family
    text_passes = 1 + (cfg and not fam.is_xl)
    batch = 2 if cfg else 1

    def step(k: int, st: Stage) -> ForwardCost:
        d = 1 if k == 0 else dilation
        total = counter.unet(st.height, st.width, batch, d)
        for cn in controlnets:
            total = total + cn.step(st.height, st.width, batch, d)
        return total

    segs = list(plan_segments(counter, plan, counter.text_encoders() * text_passes, step, relay))
    if entry is None:
        return PlanCost(fam.name, plan.describe(), cfg, tuple(segs))
    return PlanCost(fam.name, plan.describe(), cfg, entered_segments(counter, plan, segs, entry, step, [segs[0]]))


def entered_segments(counter, plan: StagePlan, segs: list, entry, step, head: list) -> tuple:
    """An image-to-image run's segments: `head`, the photo's encode at the entry stage and the steps run there
    (`step(k, stage)` is one step's cost), the later relays and stages of the plan's `segs`, and its decode."""
    out = list(head)
    for k, st in enumerate(plan.stages):
        if k < entry.stage:
            continue
        if k == entry.stage:
            out.append(SegmentCost("encode image", "encode", 0.0, *_tera(counter.vae_encode(st.height, st.width))))
            steps = st.steps - entry.step
            cost = step(k, st) * steps
            out.append(SegmentCost(f"stage {k + 1} ({st.width}x{st.height}, {steps} steps)", "stage",
                                   cost.macs / 1e9, *_tera(cost)))
            continue
        out += [s for s in segs if s.name == f"relay {k}->{k + 1}" or s.name.startswith(f"stage {k + 1} (")]
    out.append(segs[-1])
    return tuple(out)
