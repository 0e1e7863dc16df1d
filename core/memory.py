"""A plan's peak device memory, estimated before anything is loaded: the networks are built on the `meta`
device (no weights, no arithmetic) and run at every shape the plan uses, while a dispatch mode counts the
bytes of the tensors alive at each moment. Peak = the weights + the largest transient of any segment
(a stage's UNet call, a relay's decode and encode, the final decode). A tiled VAE pass whose waiting tiles are
parked in host memory runs the same way, parking by forgetting the tensor (runtime/vae_parking.ShapeParking):
the count is then one tile's working set, halo included, plus the output, and the parked bytes are counted
apart as host memory.

What it leaves out: the caching allocator's rounding and fragmentation, cuDNN workspaces, CUDA-graph pools
and compile-time autotuning (which can be far larger, see benchmarks/RESULTS.md). It reads eager execution;
the compiled path frees earlier and usually peaks lower.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .families import ModelFamily
from .plan import StagePlan

GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """Counts the storage bytes of every tensor an op creates until it is freed; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        sid = id(storage)
        if sid in self._seen:  # a view of a tensor already counted
            return
        n = storage.nbytes()
        self._seen.add(sid)
        self.live += n
        self.peak = max(self.peak, self.live)

        def freed(sid=sid, n=n):
            self.live -= n
            self._seen.discard(sid)

        weakref.finalize(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate, by part."""

    weights_bytes: int
    """UNet, VAE and text encoders at the precisions that run."""
    segments: tuple[tuple[str, int], ...]
    """(segment, peak bytes of its transient tensors)."""
    held: tuple[int, ...] = ()
    """Bytes held under each segment besides the weights (the CUDA-graph pool of the stages captured so far);
    empty when nothing is held."""
    host_bytes: int = 0
    """Host memory the VAE passes park waiting tiles in, at most (0: nothing parked)."""

    def _held(self, i: int) -> int:
        return self.held[i] if self.held else 0

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + max(b + self._held(i) for i, (_, b) in enumerate(self.segments))

    def stage_peaks(self) -> list[tuple[str, int]]:
        """(segment, weights + held + its transient): the device memory each segment is estimated to peak at."""
        return [(name, self.weights_bytes + self._held(i) + b) for i, (name, b) in enumerate(self.segments)]

    def describe(self) -> list[str]:
        i = max(range(len(self.segments)), key=lambda i: self.segments[i][1] + self._held(i))
        worst = self.segments[i]
        pool = f" + CUDA-graph pool {self._held(i) / GiB:.2f} GiB" if self._held(i) else ""
        lines = [f"estimated peak device memory {self.peak_bytes / GiB:.2f} GiB: weights "
                 f"{self.weights_bytes / GiB:.2f} GiB{pool} + {worst[0]} {worst[1] / GiB:.2f} GiB"]
        w = max(44, *(len(name) for name, _ in self.segments))  # (tiled 2048, parked) names run longer
        if self.held:
            lines += [f"  {name:<{w}} {b / GiB:8.2f} GiB  (+ pool {self._held(i) / GiB:.2f}, peak {p / GiB:.2f} GiB)"
                      for i, ((name, b), (_, p)) in enumerate(zip(self.segments, self.stage_peaks()))]
        else:
            lines += [f"  {name:<{w}} {b / GiB:8.2f} GiB" for name, b in self.segments]
        if self.host_bytes:
            lines.append(f"  host memory for parked VAE tiles, at most {self.host_bytes / GiB:.2f} GiB")
        return lines


VaePass = Callable[[torch.nn.Module, torch.Tensor], object]
"""(VAE, input) -> the pass's result: how a VAE decode or encode is run (untiled unless a tiled one is given)."""


@dataclass(frozen=True)
class VaePasses:
    """The VAE passes to estimate: untiled (the default) or another way, with the label it adds."""

    decode: VaePass = lambda vae, lat: vae.decode(lat, return_dict=False)
    encode: VaePass = lambda vae, img: vae.encode(img).latent_dist.mean
    label: Callable[[int, int], str] = lambda height, width: ""
    """Suffix for a pass of this pixel size, e.g. " (tiled 2048)"."""
    host_peak: Callable[[], int] = lambda: 0
    """Host bytes the passes run so far parked at most (tiles parked in host memory; 0 when none are)."""


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): a CUDA device's memory, else this machine's RAM: the budget a plan's memory estimate
    is held against when no --max-memory is given."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{device}'s memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes of a module's parameters and buffers at their dtypes (on any device, meta included)."""
    return sum(p.numel() * p.element_size() for p in (*module.parameters(), *module.buffers()))


def peak_live_bytes(fn) -> int:
    """The peak bytes of the tensors `fn` creates and holds at once (`LiveBytes`), run under inference mode."""
    counter = LiveBytes()
    with torch.inference_mode(), counter:
        fn()
    return counter.peak


def estimate_memory(family: ModelFamily, plan: StagePlan, unet_dtype: torch.dtype, vae_dtype: torch.dtype,
                    cfg: bool = True, relay: str = "pixel", vae_passes: VaePasses | None = None,
                    graph_pool: bool = False) -> MemoryEstimate:
    """The estimate for running `plan` with the family's architecture (seconds, no weights needed).

    `vae_passes`: how the VAE runs (runtime/vae_tiling.py gives tiled ones). `graph_pool`: the stages run as CUDA
    graphs, whose shared pool keeps the largest UNet transient captured so far for the rest of the run."""
    passes = vae_passes or VaePasses()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**family.unet)
        vae = AutoencoderKL(**family.vae)
        encoders = [(CLIPTextModelWithProjection if te.with_projection else CLIPTextModel)(
            CLIPTextConfig(**te.transformers_config(family.vocab_size or 514))) for te in family.text_encoders]
    torch.nn.Module.to(unet, dtype=unet_dtype)  # (diffusers' own .to warns about fp32 modules)
    torch.nn.Module.to(vae, dtype=vae_dtype)
    text = sum(module_bytes(e) // 4 * unet_dtype.itemsize for e in encoders)  # built in fp32, run in the UNet's dtype
    weights = module_bytes(unet) + module_bytes(vae) + text

    vs, batch = family.vae_scale, 2 if cfg else 1
    width = int(family.unet["cross_attention_dim"])
    segments: list[tuple[str, int]] = []
    held: list[int] = []
    pool = 0  # the graph pool: the largest UNet transient so far, when graphed
    for k, s in enumerate(plan.stages):
        h, w = s.height // vs, s.width // vs
        if k > 0 and relay == "pixel":
            p = plan.stages[k - 1]
            lat = torch.zeros(1, 4, p.height // vs, p.width // vs, device=meta, dtype=vae_dtype)
            segments.append((f"relay {k}->{k + 1} decode {p.width}x{p.height}{passes.label(p.height, p.width)}",
                             peak_live_bytes(lambda lat=lat: passes.decode(vae, lat))))
            held.append(pool)
            img = torch.zeros(1, 3, s.height, s.width, device=meta, dtype=vae_dtype)
            segments.append((f"relay {k}->{k + 1} encode {s.width}x{s.height}{passes.label(s.height, s.width)}",
                             peak_live_bytes(lambda img=img: passes.encode(vae, img))))
            held.append(pool)
        x = torch.zeros(batch, 4, h, w, device=meta, dtype=unet_dtype)
        ehs = torch.zeros(batch, 77, width, device=meta, dtype=unet_dtype)
        added = None
        if family.is_xl:
            pooled = family.text_encoders[-1].projection_dim
            added = {"text_embeds": torch.zeros(batch, pooled, device=meta, dtype=unet_dtype),
                     "time_ids": torch.zeros(batch, 6, device=meta, dtype=unet_dtype)}
        t = torch.tensor(999, device=meta)
        segments.append((f"stage {k + 1} UNet {s.width}x{s.height}, batch {batch}",
                         peak_live_bytes(lambda x=x, ehs=ehs, added=added, t=t: unet(
                             x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False))))
        held.append(0)  # a replay runs inside the pool
        pool = max(pool, segments[-1][1]) if graph_pool else 0
    last = plan.stages[-1]
    lat = torch.zeros(1, 4, last.height // vs, last.width // vs, device=meta, dtype=vae_dtype)
    segments.append((f"final decode {last.width}x{last.height}{passes.label(last.height, last.width)}",
                     peak_live_bytes(lambda: passes.decode(vae, lat))))
    held.append(pool)
    return MemoryEstimate(weights, tuple(segments), tuple(held) if graph_pool else (), passes.host_peak())
