"""Several generations with one plan denoised together: B latents in one UNet batch of 2B (docs/ALGORITHM.md §2-10).

The requests share the plan, guidance, re-scheduling, dilation and relay (`check_batchable` names the field that
differs); each keeps its own prompt, negative prompt and seed. Everything per request is done exactly as
`MegaFusionPipeline.generate` does it alone: its text is encoded on its own, and its noise is drawn from its own
generator in the same order and shapes, so only the batched network calls differ (in the last bits at most).

The CFG batch is laid out [uncond_1..uncond_B, cond_1..cond_B], not interleaved: then the step's
`cat([z, z])` / `eps.chunk(2)` (pipeline.guided_eps and the captured graphs' `_step`) work unchanged for any B,
so the eager loop and the CUDA-graphed loop run the same code at B = 1 and B > 1.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..core.plan import StagePlan
from ..core.specs import UNET, VAE_DECODER, VAE_ENCODER

from .conditioning import Conditioning, encode
from .fused_relay import relay_resize
from .pipeline import GenerationOptions, GenerationResult, MegaFusionPipeline, draw_noise, to_uint8
from .relay import bicubic_resize
from .schedule import plan_schedule
from .segments import SegmentClock

SHARED_FIELDS = ("guidance", "reschedule", "dilation", "relay")
"""GenerationOptions fields every request of a batch must share (with the plan); the rest are per request."""


class BatchError(ValueError):
    """Requests that cannot run as one batch (a shared field differs, or the engines do not cover the batch)."""


def check_batchable(options: Sequence[GenerationOptions]) -> None:
    """Raises BatchError naming the first shared field whose value differs from the first request's."""
    if not options:
        raise BatchError("a batch needs at least one request")
    first = options[0]
    for j, o in enumerate(options[1:], start=1):
        for name in SHARED_FIELDS:
            a, b = getattr(first, name), getattr(o, name)
            if a != b:
                raise BatchError(f"{name} {b!r} of request {j} differs from request 0's {a!r}; "
                                 f"a batch shares {', '.join(SHARED_FIELDS)} and the plan")


def max_batch(nets, network: str) -> int | None:
    """The largest batch `nets` runs `network` at (engines: what their profiles cover); None: no limit."""
    limit = getattr(nets, "max_batch", None)
    return None if limit is None else limit(network)


def check_engine_batch(nets, images: int, cfg: bool) -> None:
    """Refuses, in one line, a UNet batch beyond what the engines were built for (before any work)."""
    need = 2 * images if cfg else images
    cover = max_batch(nets, UNET)
    if cover is not None and need > cover:
        raise BatchError(f"a batch of {images} request(s) needs a UNet batch of {need}; the "
                         f"{getattr(nets, 'backend', '') or 'engine'} UNet engines cover batches up to {cover}")


def stack_conditioning(conds: Sequence[Conditioning]) -> Conditioning:
    """Per-request conditionings -> one, laid out [uncond_1..uncond_B, cond_1..cond_B] under CFG."""
    cfg = conds[0].cfg

    def stack(parts: list[torch.Tensor]) -> torch.Tensor:
        if not cfg:
            return torch.cat(parts)
        halves = [p.chunk(2) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    pooled = None if conds[0].pooled is None else stack([c.pooled for c in conds])
    return Conditioning(stack([c.hidden_states for c in conds]), pooled, cfg)


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, limit: int | None) -> torch.Tensor:
    """fn over x's batch, in pieces no larger than `limit` (engines built for batch 1 take one image at a time)."""
    if limit is None or x.shape[0] <= limit:
        return fn(x)
    return torch.cat([fn(x[i:i + limit]) for i in range(0, x.shape[0], limit)])


def _relay(nets, x0: torch.Tensor, height: int, width: int, scaling: float, vae_scale: int,
           mode: str) -> torch.Tensor:
    """runtime.relay.relay on a batch; the VAE halves run in pieces the engines cover."""
    if mode == "latent":
        return bicubic_resize(x0, height // vae_scale, width // vae_scale)
    image = _chunked(nets.vae_decode, x0 / scaling, max_batch(nets, VAE_DECODER))
    resized = relay_resize(image, height, width, nets.vae_dtype)
    return _chunked(nets.vae_encode, resized, max_batch(nets, VAE_ENCODER)) * scaling


def generate_batch(pipe: MegaFusionPipeline, plan: StagePlan, options: Sequence[GenerationOptions],
                   on_step: Callable[[int, int], None] | None = None,
                   on_segment: Callable[[str, float], None] | None = None) -> list[GenerationResult]:
    """One image per options, in order, denoised together. Each result's timings are its share (the batch's
    segment time / B); `on_step` and `on_segment` are called once per batch step and segment."""
    check_batchable(options)
    first = options[0]
    B = len(options)
    check_engine_batch(pipe.nets, B, first.guidance > 1.0)
    dev, fam, nets = pipe.device, pipe.family, pipe.nets
    scaling = float(pipe.bundle.vae.config.scaling_factor)
    vs = fam.vae_scale
    clock = SegmentClock(dev, on_segment)
    mark, timings = clock.mark, clock.timings

    # Text per request, as generate encodes it alone (the text encoders are a small part of the time).
    cond = stack_conditioning([encode(nets, pipe.bundle, o.prompt, o.negative_prompt, o.guidance, dev)
                               for o in options])
    schedules = plan_schedule(plan, fam.scheduler, first.reschedule)
    generators = [torch.Generator("cpu").manual_seed(o.seed) for o in options]
    mark("text encoders")

    def noise(h: int, w: int) -> torch.Tensor:  # each request's own draw, in generate's order and shape
        return torch.cat([draw_noise((1, 4, h, w), g, pipe.noise_dtype, dev) for g in generators])

    z = x0 = None
    last_k = len(plan.stages) - 1
    for k, stage in enumerate(plan.stages):
        c = schedules[k].coefficients(dev)
        h, w = stage.height // vs, stage.width // vs
        if k == 0:
            z = noise(h, w)
        else:
            x0_up = _relay(nets, x0, stage.height, stage.width, scaling, vs, first.relay)
            z = c.sqrt_abar_t[0] * x0_up + c.sqrt_one_minus_abar_t[0] * noise(h, w)
            mark(f"relay {k}->{k + 1}")
        delta = 1 if k == 0 else first.dilation
        time_ids = cond.time_ids(stage.height, stage.width)
        if pipe.graphs is not None:
            z, x0 = pipe.graphs.run_stage(z, c, cond, time_ids, delta, first.guidance, stage.steps)
            for i in range(stage.steps if on_step is not None else 0):
                on_step(k, i)
        else:
            z, x0 = pipe._eager_stage(z, c, cond, time_ids, delta, first.guidance, stage.steps, k < last_k,
                                      lambda i, k=k: on_step and on_step(k, i))
        mark(f"stage {k + 1} ({stage.width}x{stage.height}, {stage.steps} steps)")

    image = _chunked(nets.vae_decode, z / scaling, max_batch(nets, VAE_DECODER))
    top = (image.shape[-2] - plan.output_height) // 2
    left = (image.shape[-1] - plan.output_width) // 2
    images = []
    for j in range(B):
        pixels = to_uint8(image[j:j + 1])[top:top + plan.output_height, left:left + plan.output_width]
        images.append(np.ascontiguousarray(pixels.cpu().numpy()))
    mark("decode")
    peak = clock.peak_memory()
    share = [(name, seconds / B) for name, seconds in timings]
    return [GenerationResult(images[j], plan, list(share), peak, z[j:j + 1]) for j in range(B)]
