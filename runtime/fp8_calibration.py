"""Static FP8 input scales for a plan (or a server's plans): eager UNet calls on the calibration recipe's inputs at
every stage shape, then each FP8 layer's scale is fixed at the largest input magnitude it saw (engine/fp8.py
`calibrate_input_scales`). One set of scales serves all stages (the compiled and graphed UNets are shared by the
stages), so it is the maximum over them. Kept in a `ScaleStore` when a folder is given.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.loading import ModelBundle
from ..core.plan import StagePlan
from ..engine.cache import device_name
from ..engine.fp8 import Fp8Policy, calibrate_input_scales, fp8_scheme
from ..engine.fp8_scales import Fp8Calibration, ScalesKey, ScaleStore, recipe_text
from ..engine.networks import TorchNetworks
from .conditioning import encode


@dataclass
class StaticScales:
    """Where a UNet's static scales came from."""

    scales: dict[str, float]
    loaded: bool
    """True: read from the store; False: calibrated in this process."""
    seconds: float
    """The calibration's time in this process (0 when loaded)."""
    key: ScalesKey

    def line(self) -> str:
        how = "loaded from the scale store" if self.loaded else f"calibrated in {self.seconds:.1f} s"
        return f"FP8 static input scales: {len(self.scales)} layers, {how}"


def _plans(plan: StagePlan | Sequence[StagePlan]) -> tuple[StagePlan, ...]:
    return (plan,) if isinstance(plan, StagePlan) else tuple(plan)


def scales_key(weights: str, policy: Fp8Policy, recipe: Fp8Calibration, plan: StagePlan | Sequence[StagePlan],
               dilation: int, cfg: bool, dtype: torch.dtype, device) -> ScalesKey:
    stages = "; ".join(",".join(str(s) for s in p.stages) for p in _plans(plan))
    shapes = f"{stages} dilation {dilation} batch {2 if cfg else 1}"
    return ScalesKey(weights, fp8_scheme(policy), recipe_text(recipe), shapes, str(dtype), device_name(device))


def calibrate_for_plan(bundle: ModelBundle, plan: StagePlan | Sequence[StagePlan], dilation: int, cfg: bool, device,
                       recipe: Fp8Calibration = Fp8Calibration()) -> dict[str, float]:
    """Sets and returns static scales for `bundle.unet`'s FP8 layers (quantized already, not yet compiled or
    captured): the recipe's prompt, random latents per stage (seed + stage index) at each recipe timestep, the
    plan's stage sizes, the mid-block dilated after stage 1 as the plan runs it; over several plans, all of
    their stages."""
    nets = TorchNetworks(bundle)  # the eager modules, whatever faster callables the caller's networks use
    cond = encode(nets, bundle, recipe.prompt, "", 7.0 if cfg else 1.0, device)
    vs, channels = bundle.family.vae_scale, bundle.unet.config.in_channels

    def runs():
        for p in _plans(plan):
            for k, st in enumerate(p.stages):
                g = torch.Generator("cpu").manual_seed(recipe.seed + k)
                x = torch.randn(cond.batch, channels, st.height // vs, st.width // vs, generator=g).to(device)
                for t in recipe.timesteps:
                    nets.unet(x, torch.tensor(t, device=device), cond.hidden_states, cond.pooled,
                              cond.time_ids(st.height, st.width), 1 if k == 0 else dilation)

    return calibrate_input_scales(bundle.unet, runs, recipe.margin)


def static_scales(bundle: ModelBundle, weights: str, policy: Fp8Policy, plan: StagePlan | Sequence[StagePlan],
                  dilation: int, cfg: bool, device, store: ScaleStore | None = None,
                  recipe: Fp8Calibration = Fp8Calibration()) -> StaticScales:
    """The static scales of `bundle.unet` (FP8 layers in place) for this plan (or these plans: a server's sizes):
    from `store` when it holds them for this key, else calibrated now (and saved there). Either way they are set on
    the UNet's layers."""
    from ..engine.fp8 import set_input_scales

    key = scales_key(weights, policy, recipe, plan, dilation, cfg, bundle.unet.dtype, device)
    if store is not None:
        found = store.load(key)
        if found is not None:
            try:
                set_input_scales(bundle.unet, found)
                return StaticScales(found, True, 0.0, key)
            except ValueError:  # layers differ from the key's promise (edited policy code): calibrate again
                pass
    t0 = time.perf_counter()
    scales = calibrate_for_plan(bundle, plan, dilation, cfg, device, recipe)
    seconds = time.perf_counter() - t0
    if store is not None:
        store.save(key, scales, seconds)
    return StaticScales(scales, False, seconds, key)


def static_scales_provider(bundle: ModelBundle, policy: Fp8Policy | None, plan: StagePlan | Sequence[StagePlan],
                           dilation: int, cfg: bool, device, store: ScaleStore | None = None,
                           say=print) -> Callable[[ModelBundle], StaticScales] | None:
    """What `FastTorchNetworks(fp8_scales=)` and the eager paths call once the UNet is quantized: `static_scales`
    for these plans, saying where the scales came from; None unless `policy` is static. The weights fingerprint is
    taken now, while the UNet is as loaded (its origin's fingerprint, no tensor hashing), before anything changes
    it for speed."""
    if policy is None or policy.activations != "static":
        return None
    from ..engine.fingerprint import network_fingerprint

    weights = network_fingerprint(bundle, "unet")

    def provide(b: ModelBundle) -> StaticScales:
        got = static_scales(b, weights, policy, plan, dilation, cfg, device, store)
        say(got.line())
        return got

    return provide


def package_calibrator(bundle: ModelBundle, recipe: Fp8Calibration = Fp8Calibration()):
    """The static-scale calibration of FP8 UNet packages (BuildRequest.fp8_calibrate): a callable (quantized UNet
    copy, spec, profile) -> scales that runs the copy eagerly at the package's one shape (batch, latent size,
    dilation of its spec) on the recipe's inputs and sets the scales on it, so that the export bakes them in. Each
    package gets the scales of its own stage shape. The recipe's prompt is encoded now, on the text encoders'
    device, while they are loaded (a build may free them before the UNet's turn)."""
    import dataclasses

    text_nets, where = TorchNetworks(bundle), next(bundle.text_encoders[0].parameters()).device
    conds = {cfg: encode(text_nets, bundle, recipe.prompt, "", 7.0 if cfg else 1.0, where) for cfg in (True, False)}
    vs = bundle.family.vae_scale

    def calibrate(module: torch.nn.Module, spec, profile) -> dict[str, float]:
        b, c, h, w = next(opt for name, _, opt, _ in profile.shapes if name == "sample")
        cond, dev = conds[b == 2], next(module.parameters()).device
        nets = TorchNetworks(dataclasses.replace(bundle, unet=module))
        hidden = cond.hidden_states.to(dev)
        pooled = None if cond.pooled is None else cond.pooled.to(dev)
        time_ids = None if cond.pooled is None else cond.time_ids(h * vs, w * vs).to(dev)

        def runs():
            g = torch.Generator("cpu").manual_seed(recipe.seed)
            x = torch.randn(b, c, h, w, generator=g).to(dev)
            for t in recipe.timesteps:
                nets.unet(x, torch.tensor(t, device=dev), hidden, pooled, time_ids, spec.dilation)

        return calibrate_input_scales(module, runs, recipe.margin)

    return calibrate
