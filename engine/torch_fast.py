"""The torch backend made fast: channels_last, fused QKV, attention kernels per module, optional torch.compile.

Compilation is explicit (never at import) and per call site; static shapes, so each stage shape and each
UNet variant compiles once (the dilated variant differs in conv attributes that dynamo guards on). Each call
site is a `Precompiled` (engine/precompiled.py): given a folder (`keep_compiled`), it saves what it compiles and
a later process loads it without tracing; Inductor's own disk cache (TORCHINDUCTOR_CACHE_DIR) holds the kernels.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.loading import ModelBundle

from .attention import set_attention
from ..core.dilation import mid_dilation_of
from .fp8 import Fp8Policy, quantize_unet
from .networks import TorchNetworks
from .precompiled import Precompiled, call_module, portable_guards, site_counters

InductorOptions = tuple[tuple[str, object], ...]

_FREEZING: InductorOptions = (("freezing", True),)
_GEMM: InductorOptions = (
    ("max_autotune_gemm", True), ("max_autotune_gemm_backends", "TRITON,ATEN"),
    ("max_autotune_conv_backends", "ATEN"), ("max_autotune_gemm_search_space", "DEFAULT"),
    ("epilogue_fusion", True),
)
INDUCTOR_SETS: dict[str, InductorOptions] = {
    "default": (),  # () means `compile_mode` ("default"), not an empty options dict
    "freezing": _FREEZING,
    "gemm": _GEMM,
    "gemm+freezing": _GEMM + _FREEZING,
    "coord": (("coordinate_descent_tuning", True),),
    "tuned": _FREEZING + (("coordinate_descent_tuning", True), ("conv_1x1_as_mm", True)),
    "coord+1x1": (("conv_1x1_as_mm", True), ("coordinate_descent_tuning", True), ("epilogue_fusion", False)),
}
"""Named values for `FastOptions.inductor_options`, compared by benchmarks/lab/unet_inductor.py. The `gemm` sets
autotune matmuls only: convolutions stay on ATen (cuDNN), so only the GEMM choice differs from `default`.
Measured with torch 2.11, `gemm` had not finished compiling the SDXL UNet at 1024 after 470 s (each GEMM shape
took 20 to 40 s to autotune), against 114 s for `default`."""


def inductor_set(name: str, where: str = "") -> InductorOptions:
    """The options of the set `name`; an unknown name is a ValueError naming it (and `where` it came from)."""
    if name not in INDUCTOR_SETS:
        raise ValueError(f"unknown Inductor set {name!r}{where}; choose one of {', '.join(INDUCTOR_SETS)}")
    return INDUCTOR_SETS[name]


@dataclass(frozen=True)
class FastOptions:
    """Which speed-ups to apply to the torch modules."""

    channels_last: bool = True
    """NHWC memory format for UNet and VAE convolutions (pays only together with compile)."""
    fuse_qkv: bool = True
    """One matmul for self-attention Q, K and V (diffusers' `fuse_qkv_projections`)."""
    compile_unet: bool = True
    """torch.compile the UNet (default mode, fullgraph, static shapes)."""
    compile_vae: bool = True
    """torch.compile the VAE decode and encode."""
    compile_mode: str = "default"
    """Inductor mode; `max-autotune` ran past 9 minutes on the real SDXL UNet, so it is not the default."""
    inductor_options: InductorOptions = ()
    """Per-compile Inductor settings (e.g. ("conv_1x1_as_mm", True)); replaces `compile_mode` when given;
    `INDUCTOR_SETS` names the measured ones."""
    unet_attention: str = "sdpa"
    """UNet attention kernel (engine/attention.py): `sdpa` (torch's choice: cuDNN under compile on Hopper),
    `cudnn` (cuDNN forced, also in eager, where it has kernels: CUDA fp16/bf16), `fa4` (FlashAttention 4,
    optional package; measured no faster than cuDNN at SDXL's shapes), `chunked`."""
    vae_attention: str = "chunked"
    """VAE attention kernel: `chunked` by default, since no fused kernel takes its 512-dim head and torch's
    memory-efficient fallback ran at 107 TFLOP/s against 340-360 for chunked (65536 tokens)."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its convolution algorithms per shape (process-wide flag, set when the backend is built)."""
    unet_fp8: Fp8Policy | None = None
    """FP8 (e4m3) GEMMs for the UNet's transformer projections (engine/fp8.py), on a bf16 UNet; None: none."""


def fast_graphs_options(device, unet_fp8: Fp8Policy | None = None) -> FastOptions:
    """`--mode fast-graphs`: the compiled path's module changes (fused QKV, channels_last, cuDNN attention in the
    UNet, chunked VAE attention) without compiling, so a process starts in seconds. SDXL 4096 under
    `--max-memory 32` on the H200: 11.12 s against 12.13 s in graphs mode, mostly the tiled decode (1.03 s
    against 2.45 s); the UNet stages ran 4% slower (benchmarks/RESULTS.md, ninth session)."""
    cuda = torch.device(device).type == "cuda"
    return FastOptions(compile_unet=False, compile_vae=False, unet_attention="cudnn" if cuda else "sdpa",
                       unet_fp8=unet_fp8)


def fuse_qkv(module: torch.nn.Module) -> None:
    """Every diffusers `Attention` of `module` with its projections fused, as the UNet's and VAE's
    `fuse_qkv_projections` do (the processor they also set is replaced by `set_attention`). ControlNetModel's
    method (diffusers 0.42) looks only for the newer attention classes and fuses none of its blocks, silently."""
    from diffusers.models.attention_processor import Attention

    for m in module.modules():
        if isinstance(m, Attention):
            m.fuse_projections(fuse=True)


def prepare_module(module: torch.nn.Module, attention: str, options: FastOptions) -> None:
    """Fused QKV, the attention kernel `attention` and channels_last on one UNet, VAE or ControlNet, as `options`
    ask."""
    if options.fuse_qkv:
        fuse_qkv(module)
    set_attention(module, attention)
    if options.channels_last:
        module.to(memory_format=torch.channels_last)


def compile_with(fn, options: FastOptions, guard_filter=None):
    """torch.compile as the fast backend does: static shapes, one graph; `inductor_options` replace the mode.
    `guard_filter` (a Dynamo guard_filter_fn) goes with the options, so not with a mode other than default."""
    opts = dict(options.inductor_options)
    if guard_filter is not None and (opts or options.compile_mode == "default"):
        opts["guard_filter_fn"] = guard_filter
    if opts:
        return torch.compile(fn, options=opts, fullgraph=True, dynamic=False)
    return torch.compile(fn, mode=options.compile_mode, fullgraph=True, dynamic=False)


def vae_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents, return_dict=False)[0]


def vae_encode(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).latent_dist.mean


def share_fused_parts(module: torch.nn.Module) -> int:
    """After `fuse_qkv_projections`, each attention keeps its separate projections beside the fused one (Q, K, V
    beside `to_qkv`; a cross-attention's K, V beside `to_kv`), unused unless a processor set later reads them
    (IP-Adapter's). Their weights become views of the fused weight, which holds the same rows in that order: same
    values, no copies (1.21 GiB of SDXL's fp16 UNet, 0.11 GiB of SD1.5's). Returns the bytes released."""
    released = 0
    for attn in module.modules():
        if not getattr(attn, "fused_projections", False):
            continue
        if attn.is_cross_attention:
            fused, parts = attn.to_kv, (attn.to_k, attn.to_v)
        else:
            fused, parts = attn.to_qkv, (attn.to_q, attn.to_k, attn.to_v)
        for name in ("weight", "bias"):
            whole, row = getattr(fused, name), 0
            if whole is None:
                continue
            for part in parts:
                old = getattr(part, name)
                released += old.numel() * old.element_size()
                setattr(part, name, torch.nn.Parameter(whole.detach()[row:row + old.shape[0]], requires_grad=False))
                row += old.shape[0]
            if row != whole.shape[0]:  # diffusers changed how it fuses: refuse rather than alias wrong rows
                raise RuntimeError(f"fused {name} of {tuple(whole.shape)} is not its parts' {row} rows")
    return released


def give_back(released: int, module: torch.nn.Module) -> None:
    """After `released` bytes of `module`'s copies were dropped on CUDA, the allocator's cache is emptied: the device
    peak counts reserved memory, so the released blocks go back."""
    if released and next(module.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()


class FastTorchNetworks(TorchNetworks):
    """`TorchNetworks` over optimised modules; same function, same interface."""

    def __init__(self, bundle: ModelBundle, options: FastOptions = FastOptions(), vae_dtype=None,
                 fp8_scales: Callable[[ModelBundle], Any] | None = None):
        """`fp8_scales`: with a static FP8 policy, sets the quantized UNet's input scales (runtime/fp8_calibration.py
        `static_scales`), called before anything is compiled; its result is kept as `fp8_static`."""
        if options.unet_fp8 is not None and options.unet_fp8.activations == "static" and fp8_scales is None:
            raise ValueError("a static FP8 policy needs fp8_scales (the calibration that fixes the input scales)")
        super().__init__(bundle, vae_dtype)
        self.options = options
        prepare_module(bundle.unet, options.unet_attention, options)
        prepare_module(bundle.vae, options.vae_attention, options)
        self.released_bytes = share_fused_parts(bundle.unet) + share_fused_parts(bundle.vae)
        """What the fused projections' separate copies held (the allocator's cache is emptied of it on CUDA)."""
        if options.unet_fp8 is not None:  # after QKV fusion (which reads float weights), before compile
            quantize_unet(bundle.unet, options.unet_fp8)
        self.fp8_static = fp8_scales(bundle) if fp8_scales is not None and options.unet_fp8 is not None else None
        give_back(self.released_bytes, bundle.unet)
        if options.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        compile = lambda fn: compile_with(fn, options, portable_guards)  # noqa: E731
        self._compile, self.folder = compile, None
        self.precompiled: list[Precompiled] = []
        if options.compile_unet:  # the mid-block dilation changes the traced code (conv attributes)
            self.unet_fn = Precompiled("unet", call_module, bundle.unet, compile, lambda: mid_dilation_of(bundle.unet))
            self.precompiled.append(self.unet_fn)
        if options.compile_vae:
            self.decode_fn = Precompiled("vae-decode", vae_decode, bundle.vae, compile)
            self.encode_fn = Precompiled("vae-encode", vae_encode, bundle.vae, compile)
            self.precompiled += [self.decode_fn, self.encode_fn]

    def keep_compiled(self, folder) -> None:
        """Save each compiled function in `folder` and reuse the ones there (engine/precompiled.py)."""
        self.folder = folder
        for site in self.precompiled:
            site.attach(folder)

    def controlnet_call(self, model: torch.nn.Module) -> Callable:
        """What runs a ControlNet of this UNet in its step (runtime/controlnet.py): the module prepared as the UNet
        is (fused QKV, the UNet's attention kernel, channels_last) and, when the UNet is compiled, compiled at a
        call site of its own. Left eager inside the compiled UNet's graph, a ControlNet's FLOPs ran at 315 TFLOP/s
        against the plain compiled plan's 425 (SDXL 2048, H200, benchmarks/RESULTS.md, twenty-second session).
        Its functions are kept beside the UNet's under a name from its configuration, so ControlNets of two
        architectures never replace each other's files."""
        prepare_module(model, self.options.unet_attention, self.options)
        released = share_fused_parts(model)
        self.released_bytes += released
        give_back(released, model)
        if not self.options.compile_unet:
            return model
        config = json.dumps(dict(model.config), sort_keys=True, default=str)
        name = f"controlnet-{hashlib.sha256(config.encode()).hexdigest()[:12]}"
        site = Precompiled(name, call_module, model, self._compile, lambda: mid_dilation_of(model))
        site.attach(self.folder)
        self.precompiled.append(site)
        return site

    def precompile_counters(self) -> dict[str, int]:
        """traced / loaded / saved / rejected, summed over the call sites."""
        return site_counters(self.precompiled)

    def compile_identity(self) -> tuple[dict[str, torch.nn.Module], str, str, str]:
        """What the compiled code depends on besides the plan (engine/compile_cache.py `compile_key`): the modules
        whose configs are its architecture, the UNet's and the VAE's dtypes, the options."""
        return {"unet": self.bundle.unet, "vae": self.bundle.vae}, str(self.unet_dtype), str(self.vae_dtype), \
            repr(self.options)

