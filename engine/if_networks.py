"""The DeepFloyd IF UNets behind one small interface, as `Networks` is for the latent families: the torch modules
(eager, or torch.compile'd for the compiled path) and built engines (runners over `if_unet_spec`).

A call takes the whole UNet batch (the CFG pair already concatenated) and returns the UNet's 6 output channels
[eps, v] in float32; which cascade stage's UNet runs is an argument, since IF has two.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..core.dilation import mid_dilation
from ..core.if_loading import IFBundle
from .runners import Runner, run_spec
from .torch_fast import FastOptions, compile_with

IF_FAST = FastOptions(fuse_qkv=False, compile_vae=False)
"""What the compiled path applies to IF's UNets: channels_last and torch.compile. No QKV fusion: diffusers refuses
it for attention with added K/V projections (IF's SimpleCrossAttn blocks), and no attention kernel swap: their
processor (AttnAddedKVProcessor2_0) already calls SDPA on the text and image tokens together."""


class IFNetworks(Protocol):
    """What the pixel stage loop needs from a backend."""

    capturable: bool
    """Whether every call may run inside a CUDA graph capture."""

    def unet_dtype(self, cascade: int) -> torch.dtype:
        """The dtype cascade stage `cascade`'s UNet takes its sample in (the pipeline draws noise in it)."""

    def unet(self, cascade: int, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
             class_labels: torch.Tensor | None, dilation: int) -> torch.Tensor:
        """[eps, v] (B, 6, H, W) float32 for `sample` (B, 3 or 6, H, W) at integer `timestep` (0-dim int64)."""


class IFTorchNetworks:
    """The bundle's modules; `compiled=True` runs them through torch.compile (IF_FAST), one compile per shape and
    dilation (dynamo guards on the dilated convolutions' attributes, as for the latent UNets)."""

    def __init__(self, bundle: IFBundle, compiled: bool = False, options: FastOptions = IF_FAST):
        self.bundle = bundle
        self.capturable = True  # plain torch ops on the current stream
        self.compiled = compiled
        self._fns = {1: bundle.unet_1, 2: bundle.unet_2}
        if compiled:
            # Both UNets share UNet2DConditionModel.forward, whose compiled entries (one per UNet, shape, dilation
            # and dtype: 12 in the benchmark's two dtypes) count against one per-code limit (8), past which a
            # fullgraph compile raises; process-wide, as cudnn.benchmark.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for c, m in ((1, bundle.unet_1), (2, bundle.unet_2)):
                if m is None:
                    continue
                if options.channels_last:
                    m.to(memory_format=torch.channels_last)
                if options.cudnn_benchmark:
                    torch.backends.cudnn.benchmark = True
                self._fns[c] = compile_with(m, options)

    def module(self, cascade: int) -> torch.nn.Module:
        m = self.bundle.unet_1 if cascade == 1 else self.bundle.unet_2
        if m is None:
            raise ValueError("a stage II plan needs the stage II UNet (load its folder too)")
        return m

    def unet_dtype(self, cascade: int) -> torch.dtype:
        return self.module(cascade).dtype

    @torch.inference_mode()
    def unet(self, cascade, sample, timestep, states, class_labels, dilation):
        m = self.module(cascade)
        with mid_dilation(m, dilation):  # weights untouched; restored after the call
            out = self._fns[cascade](sample.to(m.dtype), timestep, encoder_hidden_states=states.to(m.dtype),
                                     class_labels=class_labels, return_dict=False)[0]
        return out.float()


class IFEngineNetworks:
    """Runners keyed by (network name, dilation): `unet_I` / `unet_II` as `export.if_onnx.if_unet_spec` names them."""

    def __init__(self, runners: dict[tuple[str, int], Runner], device: torch.device, backend: str = ""):
        self.runners = runners
        self.device = torch.device(device)
        self.backend = backend

    @property
    def capturable(self) -> bool:
        return all(r.capturable for r in self.runners.values())

    @staticmethod
    def network(cascade: int) -> str:
        return f"unet_{'I' * cascade}"

    def _runner(self, cascade: int, dilation: int) -> Runner:
        r = self.runners.get((self.network(cascade), dilation))
        if r is None:
            built = ", ".join(sorted(f"{n} (dilation {d})" for n, d in self.runners))
            raise KeyError(f"no engine for {self.network(cascade)} at dilation {dilation}; built: {built}")
        return r

    def unet_dtype(self, cascade: int) -> torch.dtype:
        runner = next((r for (n, _), r in sorted(self.runners.items()) if n == self.network(cascade)), None)
        if runner is None:
            raise KeyError(f"no engine for {self.network(cascade)}")
        return runner.spec.inputs[0].torch_dtype

    def unet(self, cascade, sample, timestep, states, class_labels, dilation):
        runner = self._runner(cascade, dilation)
        given = {"sample": sample, "timestep": timestep.reshape(1), "encoder_hidden_states": states,
                 "class_labels": class_labels}
        return run_spec(runner, given, self.device)[runner.spec.outputs[0].name].float()
