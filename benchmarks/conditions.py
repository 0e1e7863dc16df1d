"""mf-bench with the extra conditions (issue #18): a LoRA, ControlNets, image to image. Each variant timed gets a
conditioned row beside its plain one, in the same process: the conditioned plan's time, cost and memory against
the plain plan's.

How each variant takes the conditions (as mf-generate does):
- torch variants (torch, graphs, compiled, compiled-fp8): a LoRA is fused into a copy of the UNet and text encoders,
  made before anything runs (the plain rows keep the base weights, and both rows hold both copies, so their memory
  compares); ControlNets wrap the networks' UNet step; without a LoRA the plain row's networks are reused;
- engine variants (engines:aoti, engines:onnxruntime): a LoRA is swapped into the opened engines after their plain
  row, the swap timed on its own; ControlNets run from the ControlNet engines in the folder, beside which the plain
  UNet engines stay closed (engine/load.py `unopened`);
- image to image: the same networks, started from the photo (fewer steps, one VAE encode).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.loading import ModelBundle
from ..core.lora import LoraSpec
from ..core.plan import StagePlan
from ..runtime.img2img import ImageStart
from ..runtime.pipeline import GenerationOptions, MegaFusionPipeline

from .flops import ControlNetCostCounter, MetaCostCounter, PlanCost, conditioned_plan_cost
from .variants import ENGINE_FOLDER_PREFIX, Variant, engine_folder_variant

ControlInput = tuple[str, torch.Tensor, float, float, float]
"""(ControlNet folder, control image (1, 3, H, W) in [0, 1], scale, start, end), as cli/conditions.py reads them."""


@dataclass(frozen=True)
class IPAdapterInput:
    """--ip-adapter FILE, its image encoder folder, its scale, and the reference image (PIL), read before any load."""

    path: str
    encoder: str
    scale: float
    image: object


@dataclass(frozen=True)
class Conditions:
    """The extra conditions of one mf-bench run."""

    loras: tuple[LoraSpec, ...] = ()
    controls: tuple[ControlInput, ...] = ()
    image: ImageStart | None = None
    ip_adapter: IPAdapterInput | None = None
    """Torch variants only: put into a copy of the UNet, made before anything runs (as a LoRA's fuse)."""

    def __bool__(self) -> bool:
        return bool(self.loras or self.controls or self.image or self.ip_adapter)

    def label(self) -> str:
        """A short name for the rows, e.g. "lora style x0.8 + controlnet canny + image to image"."""
        parts = []
        if self.loras:
            parts.append("lora " + ", ".join(f"{Path(s.path).stem} x{s.scale:g}" for s in self.loras))
        if self.controls:
            parts.append("controlnet " + ", ".join(Path(c[0]).name for c in self.controls))
        if self.ip_adapter:
            parts.append(f"ip-adapter {Path(self.ip_adapter.path).stem} x{self.ip_adapter.scale:g}")
        if self.image is not None:
            parts.append("image to image")
        return " + ".join(parts)

    def entry(self, plan: StagePlan):
        """Where the photo enters the plan (image to image), or None."""
        return self.image.entry(plan) if self.image is not None else None

    def describe(self, plan: StagePlan) -> dict:
        """For results.json's settings."""
        entry = self.entry(plan)
        return {
            "lora": [{"path": str(s.path), "scale": s.scale} for s in self.loras],
            "controlnet": [{"path": c[0], "scale": c[2], "start": c[3], "end": c[4]} for c in self.controls],
            "ip_adapter": None if self.ip_adapter is None else {
                "path": self.ip_adapter.path, "encoder": self.ip_adapter.encoder, "scale": self.ip_adapter.scale},
            "image": None if entry is None else {"strength": self.image.strength, "start_stage": entry.stage + 1,
                                                 "steps_run": plan.total_steps - entry.global_step},
        }


def controlnet_counters(family, controls: tuple[ControlInput, ...]) -> tuple[ControlNetCostCounter, ...]:
    """A cost counter per ControlNet, from its config alone; ControlInputError names a folder whose config.json
    does not build a ControlNet."""
    from ..runtime.controlnet import ControlInputError

    out = []
    for c in controls:
        try:
            out.append(ControlNetCostCounter(family, c[0]))
        except (OSError, ValueError, TypeError) as e:
            raise ControlInputError(f"--controlnet {c[0]!r}: its config.json does not build a ControlNetModel "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return tuple(out)


class IPAdapterCostCounter(MetaCostCounter):
    """The UNet with an IP-Adapter's image projection and attention processors, built on the meta device (the file
    read only for its shapes); `unet(...)` is one adapted forward, the image's 4 tokens in every cross-attention."""

    def __init__(self, family, adapter_file: str, encoder_folder: str):
        import warnings

        from ..runtime.ipadapter import read_ip_adapter
        from .dit_conditions import ip_image_embeds_shape

        super().__init__(family)
        state = read_ip_adapter(adapter_file, self.unet_module)  # IPAdapterError names a file that does not fit
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying into a meta parameter is a no-op": meant
            self.unet_module._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
        self.embeds_shape = ip_image_embeds_shape(family, encoder_folder)

    def _unet_inputs(self, height: int, width: int, batch: int):
        from .flops import unet_meta_inputs

        sample, t, states, added = unet_meta_inputs(self.family, height, width, batch)
        with torch.device("meta"):
            added = {**(added or {}), "image_embeds": [torch.empty(batch, *self.embeds_shape)]}
        return sample, t, states, added


def ip_adapter_counter(family, conds: Conditions) -> IPAdapterCostCounter | None:
    ip = conds.ip_adapter
    return None if ip is None else IPAdapterCostCounter(family, ip.path, ip.encoder)


def conditioned_cost(conds: Conditions, counter: MetaCostCounter, plan: StagePlan, cfg: bool, relay: str,
                     dilation: int, controlnets: tuple[ControlNetCostCounter, ...] | None = None,
                     ip_counter: IPAdapterCostCounter | None = None) -> PlanCost:
    """`ip_counter`: with an IP-Adapter, its counter (`ip_adapter_counter`), whose adapted UNet prices the steps."""
    cns = controlnets if controlnets is not None else controlnet_counters(counter.family, conds.controls)
    entry = conds.image.entry(plan) if conds.image is not None else None
    if conds.ip_adapter is not None:
        counter = ip_counter or ip_adapter_counter(counter.family, conds)
    return conditioned_plan_cost(counter, plan, cfg, relay, dilation, cns, entry)


def fused_copy(bundle: ModelBundle, loras: tuple[LoraSpec, ...]) -> tuple[ModelBundle, float]:
    """A bundle whose UNet and text encoders are copies with the LoRAs fused (the VAE is shared), and the fuse's
    seconds. LoraError (from core/lora.py) names a file that does not fit, before anything is timed."""
    from ..core.lora import check_loras, fuse_loras

    check_loras(bundle, list(loras))
    copied = dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet),
                                 text_encoders=[copy.deepcopy(t) for t in bundle.text_encoders],
                                 loaded_state=dict(bundle.loaded_state))
    t0 = time.perf_counter()
    fuse_loras(copied, list(loras))
    if copied.unet.device.type == "cuda":
        torch.cuda.synchronize(copied.unet.device)
    return copied, time.perf_counter() - t0


def ip_adapter_copy(bundle: ModelBundle, ip: IPAdapterInput, device, copied: ModelBundle | None = None):
    """(a bundle whose UNet is a copy with the IP-Adapter put in, the reference image's embeddings), as mf-generate
    puts it in (cli/generate.py); `copied`: a copy made already (a LoRA's), which gets it. IPAdapterError names a
    file that does not fit, before anything is changed."""
    from ..runtime.ipadapter import encode_ip_image, load_image_encoder, load_ip_adapter, read_ip_adapter

    state = read_ip_adapter(ip.path, bundle.unet)
    encoder, processor = load_image_encoder(ip.encoder, device, bundle.unet.dtype)
    if copied is None:
        copied = dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet), loaded_state=dict(bundle.loaded_state))
    load_ip_adapter(copied.unet, state, ip.scale)
    embeds = encode_ip_image(encoder, processor, ip.image, device)
    encoder.to(device="meta")  # the embeddings are all the steps need
    return copied, embeds


def _torch_controlled(nets, modules: list[torch.nn.Module], controls: tuple[ControlInput, ...], device):
    """`nets` with the ControlNets (loaded once, `modules`) on their UNet step, in the networks' UNet dtype."""
    from ..runtime.controlnet import Control, ControlledNetworks

    for m in modules:
        if m.dtype != nets.unet_dtype:  # compiled-fp8 runs bf16; the rows before it have run
            m.to(dtype=nets.unet_dtype)
    made = [Control(m, image, scale, start, end) for m, (_, image, scale, start, end) in zip(modules, controls)]
    return ControlledNetworks(nets, made, device)


def _engine_controlled(backend: str, bundle: ModelBundle, plan: StagePlan, opts: GenerationOptions,
                       controls: tuple[ControlInput, ...], engine_dir, device) -> MegaFusionPipeline:
    """The plan's engines with the ControlNet engines on the UNet step; the plain UNet engines stay closed."""
    from ..engine.controlnet_engines import open_controlnet_runners
    from ..engine.load import open_engines
    from ..runtime.controlnet import Control, EngineControlledNetworks, load_controlnet

    dilation = opts.dilation if len(plan.stages) > 1 else 1
    nets, _ = open_engines(engine_dir, bundle, plan, dilation, opts.relay, device, backend,
                           unopened=frozenset({"unet"}))
    # Loaded as mf-build-engines hashed them: fp32 on the CPU.
    modules = [load_controlnet(c[0], bundle.unet, torch.device("cpu"), torch.float32) for c in controls]
    precision = "fp16" if nets.unet_dtype == torch.float16 else "fp32"
    cns, unets = open_controlnet_runners(engine_dir, bundle, plan, modules, [c[0] for c in controls], nets.backend,
                                         precision, dilation, device, nets.weights.get("unet"))
    for m in modules:  # hashed; the engines hold the weights now
        m.to(device="meta")
    made = [Control(m, image, scale, start, end) for m, (_, image, scale, start, end) in zip(modules, controls)]
    controlled = EngineControlledNetworks(nets, bundle, made, device, cns, unets)
    if torch.device(device).type == "cuda" and controlled.capturable:
        return MegaFusionPipeline.fast(bundle, controlled, device)
    return MegaFusionPipeline(bundle, controlled, device)


def _lora_swapper(get: Callable[[], MegaFusionPipeline], bundle: ModelBundle, plan: StagePlan,
                  opts: GenerationOptions, loras: tuple[LoraSpec, ...], engine_dir, device):
    """setup of a conditioned engine row: the LoRAs swapped into the plain row's opened engines (after it ran),
    returning the swap's seconds; the row then runs a pipeline of its own on them (fresh CUDA graphs). Engines that
    cannot take a LoRA are refused now (SwapRefused), before anything is timed."""
    from ..engine.lora_swap import LoraSwap, swap_rebuild_command

    made: list[MegaFusionPipeline] = []
    nets = get().nets
    precision = next(r.spec.precision for (network, _), r in nets.runners.items() if network == "unet")
    dilation = opts.dilation if len(plan.stages) > 1 else 1
    rebuild = swap_rebuild_command(bundle, plan, nets.backend, precision, dilation, Path(engine_dir), device)
    swap = LoraSwap(nets, bundle, rebuild)

    def setup() -> float:
        seconds = swap.swap(list(loras)).seconds
        fast = torch.device(device).type == "cuda" and nets.capturable
        made.append(MegaFusionPipeline.fast(bundle, nets, device) if fast else MegaFusionPipeline(bundle, nets, device))
        return seconds

    return setup, lambda: made[0]


def conditioned_variants(bundle: ModelBundle, plan: StagePlan, opts: GenerationOptions, device,
                         kinds: tuple[str, ...], conds: Conditions, plain: dict[str, Callable[[], MegaFusionPipeline]],
                         engine_dir=None, engine_bundle: ModelBundle | None = None,
                         lazy_torch: Callable | None = None) -> dict[str, Variant]:
    """One conditioned row per variant in `kinds` (`plain[kind]()` gives that variant's plain pipeline), named
    "<plain row> + <conditions>", role "conditioned", paired with its plain row; by the plain row's name. To run
    right after their plain rows. `lazy_torch(kind, bundle, wrap)` builds a torch variant's pipeline on another
    bundle (variants._lazy_engine)."""
    if not conds:
        return {}
    from ..runtime.controlnet import load_controlnet

    label = conds.label()
    torch_kinds = [k for k in kinds if not k.startswith(ENGINE_FOLDER_PREFIX)]
    # Loaded (and checked against the UNet) now: a ControlNet that does not fit is refused before anything is timed.
    modules = [load_controlnet(c[0], bundle.unet, device, bundle.unet.dtype) for c in conds.controls] \
        if torch_kinds else []
    cns = controlnet_counters(bundle.family, conds.controls)
    ip_counter = ip_adapter_counter(bundle.family, conds)  # the adapter's file checked against the UNet's shapes
    if conds.ip_adapter is not None and len(torch_kinds) < len(kinds):
        from ..runtime.ipadapter import IPAdapterError

        raise IPAdapterError("--ip-adapter runs on the torch variants only (torch, graphs, compiled); leave out "
                             "the engines:<backend> variants")
    copied, fuse_s = fused_copy(bundle, conds.loras) if conds.loras and torch_kinds else (bundle, None)
    embeds = None
    if conds.ip_adapter is not None and torch_kinds:
        copied, embeds = ip_adapter_copy(bundle, conds.ip_adapter, device, copied if conds.loras else None)

    def wrap_torch(nets):  # the IP-Adapter's embeddings on every UNet call, then the ControlNets on the step
        from ..runtime.ipadapter import IPAdapterNetworks

        nets = IPAdapterNetworks(nets, embeds) if embeds is not None else nets
        return _torch_controlled(nets, modules, conds.controls, device) if conds.controls else nets
    if conds.loras and any(k.startswith(ENGINE_FOLDER_PREFIX) for k in kinds):
        from ..core.lora import check_loras

        check_loras(engine_bundle or bundle, list(conds.loras))  # the swap's files, checked before any timing
    out = {}
    for kind in kinds:
        setup, what = None, ""
        if kind.startswith(ENGINE_FOLDER_PREFIX):
            src = engine_bundle or bundle
            backend, _ = engine_folder_variant(kind)  # fp8 ones are refused with conditions (cli/bench.py)
            if conds.controls:  # opened now: missing ControlNet engines are refused before anything is timed
                pipe = _engine_controlled(backend, src, plan, opts, conds.controls, engine_dir, device)
                get = lambda p=pipe: p  # noqa: E731
            elif conds.loras:
                setup, get = _lora_swapper(plain[kind], src, plan, opts, conds.loras, engine_dir, device)
                what = "LoRA swapped into the engines"
            else:
                get = plain[kind]
        elif conds.loras or conds.ip_adapter:
            wrap = wrap_torch if conds.controls or embeds is not None else None
            get = _eager(copied, wrap, device) if kind == "torch" else lazy_torch(kind, copied, wrap)
            if conds.loras:
                setup, what = (lambda s=fuse_s: s), "LoRA fused into a copy of the weights, once"
        elif conds.controls:
            get = _wrapped(plain[kind], bundle, modules, conds.controls, device, kind)
        else:
            get = plain[kind]
        name = f"engine: {kind}"
        out[name] = (Variant(f"{name} + {label}", "conditioned", plan,
                           lambda g=get: g().generate(plan, opts, image=conds.image).timings,
                           f"'{name}' with {label}", pair=name, setup=setup, setup_label=what,
                           cost=lambda counter, cfg, dil: conditioned_cost(conds, counter, plan, cfg, opts.relay, dil,
                                                                           cns, ip_counter)))
    return out


def _wrapped(get: Callable[[], MegaFusionPipeline], bundle: ModelBundle, modules, controls, device, kind: str):
    """The plain variant's networks with the ControlNets on their UNet step, in a pipeline of their own."""
    made: list[MegaFusionPipeline] = []

    def pipe() -> MegaFusionPipeline:
        if not made:
            nets = _torch_controlled(get().nets, modules, controls, device)
            made.append(MegaFusionPipeline(bundle, nets, device) if kind == "torch"
                        else MegaFusionPipeline.fast(bundle, nets, device))
        return made[0]

    return pipe


def _eager(bundle: ModelBundle, wrap, device) -> Callable[[], MegaFusionPipeline]:
    """The torch variant (eager loop) on `bundle`, built at first use."""
    from ..engine.networks import TorchNetworks

    made: list[MegaFusionPipeline] = []

    def pipe() -> MegaFusionPipeline:
        if not made:
            nets = TorchNetworks(bundle)
            made.append(MegaFusionPipeline(bundle, wrap(nets) if wrap else nets, device))
        return made[0]

    return pipe
