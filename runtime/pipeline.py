"""The MegaFusion stage loop (docs/ALGORITHM.md §2-10), in its notation.

z is the latent, eps the guided noise prediction, x0 the predicted clean latent; a_t = sqrt(abar'_t),
b_t = sqrt(1 - abar'_t), likewise a_s, b_s for the next timestep s. All coefficients are device tensors
indexed by step, so the loop never waits on the host.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.networks import Networks, TorchNetworks
from ..core.loading import ModelBundle
from ..core.plan import StagePlan

from .conditioning import Conditioning, encode
from .graphs import GraphedDenoiser
from .img2img import ImageStart, encode_image, skip_steps
from .relay import RELAY_MODES, relay
from .schedule import StageCoefficients, plan_schedule
from .segments import SegmentClock


SEED_LIMIT = 2**64
"""Seeds are integers 0 <= seed < 2^64, as torch.Generator.manual_seed and the C++ tools take them."""

MAX_DILATION = 8
"""Past 8 a 3x3 kernel's taps lie farther apart than SD1.5's 8x8 native mid-block map (the paper uses 2)."""


@dataclass(frozen=True)
class GenerationOptions:
    """What one generation asks for, besides the stage plan."""

    prompt: str
    """Text prompt."""
    negative_prompt: str = ""
    """Negative prompt; empty gives zero embeddings on SDXL, the empty-string encoding on SD1.5."""
    guidance: float = 7.0
    """Classifier-free guidance weight w; CFG is off at w <= 1."""
    seed: int = 0
    """Seed of the one generator that draws every noise tensor."""
    reschedule: bool = True
    """Noise re-scheduling (SNR / gamma_k) at stages after the first."""
    dilation: int = 2
    """Mid-block dilation delta at stages after the first (1 turns dilation off)."""
    relay: str = "pixel"
    """`pixel` (VAE decode, bicubic, encode) or `latent` (bicubic on the latent)."""

    def __post_init__(self):
        if self.relay not in RELAY_MODES:
            raise ValueError(f"unknown relay mode {self.relay!r}; choose one of {', '.join(RELAY_MODES)}")
        if not 1 <= self.dilation <= MAX_DILATION:
            raise ValueError(f"dilation must be between 1 and {MAX_DILATION}, got {self.dilation}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):  # nan would turn CFG off, inf a black image
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer 0 <= seed < 2^64, got {self.seed!r}")


@dataclass
class GenerationResult:
    """The image and what it took."""

    image: np.ndarray
    """(H, W, 3) uint8 at exactly the plan's output size."""
    plan: StagePlan
    """The plan that ran."""
    timings: list[tuple[str, float]] = field(default_factory=list)
    """(segment, seconds): text encoding, each stage, each relay, decode."""
    peak_memory_bytes: int | None = None
    """Peak device memory allocated during the generation (CUDA only)."""
    latent: torch.Tensor | None = None
    """The final latent z (before decoding), float32."""
    peak_detail: str = ""
    """Where the memory peaks were reached (`SegmentClock.peak_detail`; '' off CUDA)."""

    def to_pil(self):
        from PIL import Image

        return Image.fromarray(self.image)

    def png_bytes(self) -> bytes:
        """The image as PNG: what mf-generate writes and mf-serve answers, byte for byte."""
        return encode_png(self.image)


PNG_COMPRESS_LEVEL = 1
"""zlib level of the PNGs written and served. PIL's default, 6, took 163 ms for a 1024 image and 668 ms for a 2048
one on the CI CPU; level 1 took 79 and 344 ms for files 12% larger: on a request's latency, not a size budget."""


def encode_png(image) -> bytes:
    """An RGB8 array as PNG bytes (PNG_COMPRESS_LEVEL)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    """Noise as diffusers' `randn_tensor` draws it with a CPU generator: on the CPU in `dtype`, then moved."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device).float()


def guided_eps(nets: Networks, z: torch.Tensor, t: torch.Tensor, cond: Conditioning,
               time_ids: torch.Tensor | None, dilation: int, w: float) -> torch.Tensor:
    """eps = eps_u + w (eps_c - eps_u) over the batch [uncond, cond]."""
    sample = torch.cat([z, z]) if cond.cfg else z
    eps = nets.unet(sample, t, cond.hidden_states, cond.pooled, time_ids, dilation)
    if not cond.cfg:
        return eps
    eps_u, eps_c = eps.chunk(2)
    return eps_u + w * (eps_c - eps_u)


def ddim_x0(z: torch.Tensor, eps: torch.Tensor, c: StageCoefficients, i: int) -> torch.Tensor:
    """x0 = (z - sqrt(1 - abar'_t) eps) / sqrt(abar'_t)  (paper Eq. 2 when used for truncation)."""
    return (z - c.sqrt_one_minus_abar_t[i] * eps) / c.sqrt_abar_t[i]


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, c: StageCoefficients, i: int) -> torch.Tensor:
    """z = sqrt(abar'_s) x0 + sqrt(1 - abar'_s) eps  (DDIM, eta = 0)."""
    return c.sqrt_abar_s[i] * x0 + c.sqrt_one_minus_abar_s[i] * eps


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] image (1, 3, H, W) -> (H, W, 3) uint8, rounded as diffusers' image processor rounds."""
    return ((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


class MegaFusionPipeline:
    """Runs a stage plan on a model's networks (the torch modules unless another backend is given)."""

    def __init__(self, bundle: ModelBundle, networks: Networks | None = None, device=None,
                 graphs: GraphedDenoiser | None = None):
        self.bundle = bundle
        self.family = bundle.family
        self.nets = networks if networks is not None else TorchNetworks(bundle)
        self.device = torch.device(device) if device is not None else bundle.unet.device
        # diffusers draws latents in the UNet's dtype; so do we, in the dtype of the UNet that runs (an fp16 engine's
        # for engines, whatever the bundle holds). It matters: with random SDXL weights on a GPU, noise drawn
        # in fp16 instead of fp32 (values within 1e-3) gave a different image (mean 47 levels apart).
        self.noise_dtype = self.nets.unet_dtype
        self.graphs = graphs
        """Runs each stage's steps as replays of one captured step; None runs the eager loop."""
        self.one_shot = False
        """The process generates once (mf-generate, every mode): networks whose part is done are released, the
        text encoders after the prompt (`Networks` that can: `EngineNetworks.release_text_encoders` drops their
        engines, `TorchNetworks.release_text_encoders` sends the bundle's modules to the meta device, so give it a
        bundle nothing else uses), each stage's CUDA graph after the stage (`GraphedDenoiser.release`); a second
        `generate` then stops at its prompt, naming what was released."""

    @classmethod
    def fast(cls, bundle: ModelBundle, networks: Networks | None = None, device=None) -> MegaFusionPipeline:
        """The low-latency path: CUDA-graphed stages on CUDA, the same buffered step eagerly elsewhere.

        Networks that cannot be captured (`Networks.capturable`) are refused on CUDA (GraphedDenoiser says why);
        callers that want a fallback check `capturable` first."""
        nets = networks if networks is not None else TorchNetworks(bundle)
        dev = torch.device(device) if device is not None else bundle.unet.device
        return cls(bundle, nets, dev, GraphedDenoiser(nets, dev, capture=dev.type == "cuda"))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _eager_stage(self, z, c: StageCoefficients, cond: Conditioning, time_ids, delta: int, w: float,
                     steps: int, truncate: bool, on_step: Callable[[int], None]):
        """The stage's steps one by one; returns (z, x0 of the last step)."""
        for i in range(steps):
            eps = guided_eps(self.nets, z, c.timesteps[i], cond, time_ids, delta, w)
            x0 = ddim_x0(z, eps, c, i)
            on_step(i)
            if truncate and i == steps - 1:
                break  # truncate: x0 from the pre-update latent; this step's update is not needed
            z = ddim_update(x0, eps, c, i)
        return z, x0

    def generate(self, plan: StagePlan, opts: GenerationOptions,
                 on_step: Callable[[int, int], None] | None = None,
                 on_segment: Callable[[str, float], None] | None = None,
                 image: ImageStart | None = None) -> GenerationResult:
        """One image. `on_step(k, i)` after each denoise step; `on_segment(name, seconds)` after each segment
        (text encoders, each stage, each relay, the decode), so a caller can show progress through the parts
        without steps. `image`: start from a photo (image to image, docs/ALGORITHM.md §14)."""
        dev, fam = self.device, self.family
        scaling = float(self.bundle.vae.config.scaling_factor)
        vs = fam.vae_scale
        clock = SegmentClock(dev, on_segment)
        mark, timings = clock.mark, clock.timings

        cond = encode(self.nets, self.bundle, opts.prompt, opts.negative_prompt, opts.guidance, dev)
        release = getattr(self.nets, "release_text_encoders", None) if self.one_shot else None
        if release is not None:  # the only prompt is encoded: its encoders' memory goes to the stages and decode
            release()
        schedules = plan_schedule(plan, fam.scheduler, opts.reschedule)
        prepare = getattr(self.nets, "prepare_plan", None)
        if prepare is not None:  # networks with per-plan state: ControlNet scales and images (runtime/controlnet.py)
            prepare(plan, cond.batch, np.concatenate([s.timesteps for s in schedules]))
        generator = torch.Generator("cpu").manual_seed(opts.seed)
        entry = image.entry(plan) if image is not None else None
        mark("text encoders")

        z = x0 = None
        last_k = len(plan.stages) - 1
        for k, stage in enumerate(plan.stages):
            if entry is not None and k < entry.stage:
                continue  # image to image: the photo enters at a later stage
            if entry is not None and k == entry.stage:
                schedules[k] = skip_steps(schedules[k], entry.step)
            c = schedules[k].coefficients(dev)
            steps = len(schedules[k].timesteps)
            h, w = stage.height // vs, stage.width // vs
            if entry is not None and k == entry.stage:
                # The photo as this stage's x0, noised to its first step that runs (docs/ALGORITHM.md §14).
                x0_photo = encode_image(self.nets, image.image, stage.height, stage.width, scaling, dev)
                noise = draw_noise((1, 4, h, w), generator, self.noise_dtype, dev)
                z = c.sqrt_abar_t[0] * x0_photo + c.sqrt_one_minus_abar_t[0] * noise
                mark("encode image")
            elif k == 0:
                z = draw_noise((1, 4, h, w), generator, self.noise_dtype, dev)
            else:
                # Relay the truncated x0 to this stage's size, then re-noise it to this stage's first
                # timestep t' with this stage's (re-scheduled) schedule.
                x0_up = relay(self.nets, x0, stage.height, stage.width, scaling, vs, opts.relay)
                noise = draw_noise((1, 4, h, w), generator, self.noise_dtype, dev)
                z = c.sqrt_abar_t[0] * x0_up + c.sqrt_one_minus_abar_t[0] * noise
                mark(f"relay {k}->{k + 1}")
            delta = 1 if k == 0 else opts.dilation  # no dilation at the native size
            time_ids = cond.time_ids(stage.height, stage.width)
            if self.graphs is not None:
                # Same step, replayed; on a non-final stage the x0 of the last step is the truncation x0.
                z, x0 = self.graphs.run_stage(z, c, cond, time_ids, delta, opts.guidance, steps)
                for i in range(steps if on_step is not None else 0):
                    on_step(k, i)
                if self.one_shot:  # this stage's graph is not replayed again: its pool goes to the relay, decode
                    self.graphs.release()
            else:
                z, x0 = self._eager_stage(z, c, cond, time_ids, delta, opts.guidance, steps,
                                          k < last_k, lambda i, k=k: on_step and on_step(k, i))
            mark(f"stage {k + 1} ({stage.width}x{stage.height}, {steps} steps)")

        out = self.decode_image(z, plan)
        mark("decode")
        peak = clock.peak_memory()
        return GenerationResult(out, plan, timings, peak, z, clock.peak_detail())

    def decode_image(self, z: torch.Tensor, plan: StagePlan) -> np.ndarray:
        """The final latent z as the plan's (H, W, 3) uint8 image: decoded, rounded, cropped to the output size."""
        pixels = to_uint8(self.nets.vae_decode(z / float(self.bundle.vae.config.scaling_factor)))
        top = (pixels.shape[0] - plan.output_height) // 2
        left = (pixels.shape[1] - plan.output_width) // 2
        return np.ascontiguousarray(pixels[top:top + plan.output_height, left:left + plan.output_width].cpu().numpy())

    def generate_batch(self, plan: StagePlan, options: list[GenerationOptions],
                       on_step: Callable[[int, int], None] | None = None,
                       on_segment: Callable[[str, float], None] | None = None) -> list[GenerationResult]:
        """Several images with one plan, denoised as one UNet batch; each as `generate` gives it alone (within
        the batched networks' last bits). See runtime/batch.py for what the requests must share."""
        from .batch import generate_batch  # batch.py builds on this module

        return generate_batch(self, plan, options, on_step, on_segment)
