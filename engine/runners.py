"""One interface over built engines: a `Runner` takes and returns named tensors; `EngineNetworks` turns a
set of runners into the `Networks` the stage loop calls.

Runners receive tensors already in their spec's dtypes, on their device; they allocate outputs from the
spec (the same spec export read), so buffer shapes never drift from the exported graph.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..core.specs import UNET, VAE_DECODER, VAE_ENCODER, NetworkSpec, ShapeProfile, text_encoder_name


class Runner(Protocol):
    """A built network: named inputs in, named outputs out."""

    spec: NetworkSpec
    capturable: bool
    """Whether `run` may be called inside a CUDA graph capture (declared by the backend, never assumed)."""

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs by name, in the spec's dtypes, on the runner's device."""


class ShapeDispatch:
    """Several engines of one network, each serving its own shapes (static AOTInductor packages, one per stage
    shape): each call runs on the first whose profiles hold every input shape."""

    def __init__(self, engines: tuple[tuple[tuple[ShapeProfile, ...], Runner], ...]):
        self.engines = engines
        self.spec = engines[0][1].spec
        self.capturable = all(r.capturable for _, r in engines)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for profiles, runner in self.engines:
            if any(all(p.covers(n, tuple(inputs[n].shape)) for n, *_ in p.shapes) for p in profiles):
                return runner.run(inputs)
        shapes = {n: tuple(x.shape) for n, x in inputs.items()}
        raise ValueError(f"{self.spec.name}: no engine takes the shapes {shapes}; "
                         f"{len(self.engines)} engines serve other shapes")


def run_spec(runner: Runner, given: dict[str, torch.Tensor],
             device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """`runner` on the tensors of `given` that its spec names, each in the spec's dtype, contiguous, and on `device`
    (None: where it is)."""
    return runner.run({t.name: given[t.name].to(device=device, dtype=t.torch_dtype).contiguous()
                       for t in runner.spec.inputs})


def infer_axes(spec: NetworkSpec, inputs: dict[str, torch.Tensor], vae_scale: int) -> dict[str, int]:
    """Values of the dynamic axes, read off the inputs (pixel axes derived from latent ones and back)."""
    axes: dict[str, int] = {}
    for t in spec.inputs:
        shape = tuple(inputs[t.name].shape)
        if len(shape) != len(t.shape):
            raise ValueError(f"{spec.name}: input {t.name} has shape {shape}, expected rank {len(t.shape)}")
        for d, n in zip(t.shape, shape):
            if isinstance(d, str):
                if axes.setdefault(d, n) != n:
                    raise ValueError(f"{spec.name}: axis {d} is {axes[d]} and {n} in one call")
            elif d != n:
                raise ValueError(f"{spec.name}: input {t.name} has shape {shape}, expected {t.shape}")
    for lat, img in (("height", "image_height"), ("width", "image_width")):
        if lat in axes:
            axes.setdefault(img, axes[lat] * vae_scale)
        elif img in axes:
            axes[lat] = axes[img] // vae_scale
    if {"batch", "height", "width"} <= axes.keys():  # axes the spec derives from the latent sides (a ControlNet's
        for k, v in spec.axes(axes["batch"], axes["height"], axes["width"], vae_scale).items():  # residual sides)
            axes.setdefault(k, v)
    return axes


class EngineNetworks:
    """`Networks` over runners keyed by (network name, dilation); float32 in and out, as the protocol says."""

    def __init__(self, runners: dict[tuple[str, int], Runner], device: torch.device, backend: str = ""):
        self.runners = runners
        self.device = torch.device(device)
        self.backend = backend
        """Name of the backend the runners come from (for messages)."""
        self.weights: dict[str, str] = {}
        """Fingerprint of the weights each network's engines hold, by network name: their entries' (set by
        `open_engines`), or after a LoRA swap the swap's (engine/lora_swap.py)."""
        self.released: set[str] = set()
        """Networks whose runners `release_text_encoders` dropped (a one-shot run past its prompt)."""

    def _input_dtype(self, network: str, name: str) -> torch.dtype:
        runner = next(r for (n, _), r in sorted(self.runners.items()) if n == network)
        return next(t for t in runner.spec.inputs if t.name == name).torch_dtype

    @property
    def unet_dtype(self) -> torch.dtype:
        """The dtype the UNet engines take their sample in (what the pipeline draws noise in)."""
        return self._input_dtype(UNET, "sample")

    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype the VAE decoder takes its latent in (encoder and decoder share one precision)."""
        return self._input_dtype(VAE_DECODER, "latent")

    @property
    def capturable(self) -> bool:
        """Every runner may be captured in a CUDA graph."""
        return all(r.capturable for r in self.runners.values())

    def release_text_encoders(self) -> int:
        """Drops the text encoders' runners, and with them their device weights (a `--weights-apart` file's
        tensors go once no runner holds them), then returns the freed blocks to the device: a process that
        generates once (mf-generate) needs no text encoder after its prompt, and SDXL's are 1.5 GiB of fp16
        weights held through every stage and the decode. Returns how many runners were dropped."""
        names = {n for n, _ in self.runners if n.startswith("text_encoder")}
        for key in [k for k in self.runners if k[0] in names]:
            del self.runners[key]
        self.released |= names
        if names and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return len(names)

    def _call(self, network: str, dilation: int, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        runner = self.runners.get((network, dilation))
        if runner is None and network in self.released:
            raise RuntimeError(f"{network}'s engine was released after this one-shot run's prompt; a pipeline that "
                               "generates more than once keeps its text encoders (one_shot=False)")
        if runner is None:
            built = sorted(f"{n} (dilation {d})" for n, d in self.runners)
            raise KeyError(f"no engine for {network} at dilation {dilation}; built: {', '.join(built)}")
        return run_spec(runner, inputs, self.device)

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation):
        extra = {} if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        out = self._call(UNET, dilation, sample=sample, timestep=timestep.reshape(1).float(),
                         encoder_hidden_states=encoder_hidden_states, **extra)
        return out["eps"].float()

    def vae_decode(self, latents):
        return self._call(VAE_DECODER, 1, latent=latents)["image"].float()

    def vae_encode(self, images):
        return self._call(VAE_ENCODER, 1, image=images)["latent"].float()

    def encode_text(self, index, input_ids):
        out = self._call(text_encoder_name(index), 1, input_ids=input_ids)
        pooled = out.get("pooled")
        return out["hidden_states"].float(), None if pooled is None else pooled.float()

    def max_batch(self, network: str) -> int:
        """The largest batch every `network` engine takes: its spec's batch range, which its profiles were
        built from (runtime/batch.py refuses a UNet batch beyond it and runs the VAE in pieces of it)."""
        sizes = [r.spec.batch_range[2] for (n, _), r in self.runners.items() if n == network]
        if not sizes:
            raise KeyError(f"no engine for {network}; built: {', '.join(sorted({n for n, _ in self.runners}))}")
        return min(sizes)
