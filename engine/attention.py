"""Attention kernels chosen per module, for the fast torch backend.

Why not one global SDPA backend: measured on Hopper (benchmarks/lab/kernel_breakdown.py), cuDNN's attention
is 1.6x faster than flash at the SDXL UNet's shapes (head dim 64), but it has no kernel for the VAE's single
head of dim 512, where torch falls back to the memory-efficient kernel (107 TFLOP/s at 65536 tokens). So:
- `cudnn`: the UNet's attention through cuDNN, wrapped in a custom op so that torch.compile keeps the kernel
  (Inductor sees an opaque call, not an SDPA it may re-dispatch);
- `fa4`: FlashAttention 4 (optional package) the same way; measured no faster than cuDNN;
- `chunked`: plain matmul-softmax-matmul over blocks of queries, for head dims no fused kernel takes; the
  score block of `chunk` queries is the only N-sized buffer.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(q, k, v) as (B, H, N, D) -> output as (B, N, H * D)."""

def _opaque(qualname: str, kernel: Attend) -> Attend:
    """`kernel` as a custom op, so that torch.compile keeps it whole (Inductor sees an opaque call, not an SDPA
    it may re-dispatch). Registered on first use, not at import; torch.library keeps one per process."""
    ns, name = qualname.split("::")
    if not hasattr(getattr(torch.ops, ns), name):
        op = torch.library.custom_op(qualname, kernel, mutates_args=())

        @op.register_fake
        def _(q, k, v):
            b, h, n, d = q.shape
            return q.new_empty(b, n, h * d)

    op = getattr(getattr(torch.ops, ns), name)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return op(q, k, v)

    return attend


def _cudnn_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, n, d = q.shape
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        # cuDNN's attention has kernels for CUDA fp16/bf16 only; forcing it elsewhere (an fp32 model in
        # --mode fast-graphs) found no kernel at all. The kernel is a speed choice: torch's own one here.
        return sdpa(q, k, v).contiguous()
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(b, n, h * d).contiguous()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's own choice of SDPA kernel (what diffusers calls)."""
    b, h, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


def cudnn() -> Attend:
    """cuDNN's fused attention (CUDA fp16/bf16; torch's SDPA choice for other inputs), opaque to the compiler."""
    return _opaque("megafusion::cudnn_sdpa", _cudnn_sdpa)


def fa4() -> Attend:
    """FlashAttention 4's forward (package `flash-attn-4`, CuTe DSL, compiled on first use per shape class; its
    sm90 path on Hopper), opaque to the compiler like `cudnn`. Missing package: an error saying so."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as e:
        raise RuntimeError("attention kernel 'fa4' needs the flash-attn-4 package (flash_attn.cute) and a "
                           f"Hopper or Blackwell GPU: {e}") from e

    def fa4_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        # FA4 takes (B, N, H, D): these transposes undo the caller's and are views of the projections.
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        o = o[0] if isinstance(o, tuple) else o
        return o.reshape(b, n, h * d)

    return _opaque("megafusion::fa4_sdpa", fa4_sdpa)


def chunked(chunk: int = 4096) -> Attend:
    """softmax(q k^T / sqrt(d)) v over blocks of `chunk` queries, scores in the input dtype."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        q = q * d ** -0.5
        kt = k.transpose(-1, -2)
        out = [torch.softmax(q[:, :, i:i + chunk] @ kt, dim=-1) @ v for i in range(0, n, chunk)]
        return torch.cat(out, dim=2).transpose(1, 2).reshape(b, n, h * d)

    return attend


ATTENTION = {"sdpa": lambda: sdpa, "cudnn": cudnn, "fa4": fa4, "chunked": chunked}
"""Names accepted by `FastOptions.unet_attention` / `vae_attention`."""


def attend_fn(name: str) -> Attend:
    if name not in ATTENTION:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {', '.join(ATTENTION)}")
    return ATTENTION[name]()


class AttnProcessor:
    """diffusers' SDPA attention processor (fused projections or not) with the kernel as a parameter.

    Same arithmetic as `FusedAttnProcessor2_0` for what SD1.5 and SDXL use (no mask, no spatial norm, no q/k
    norm); anything else is refused, not silently computed differently.
    """

    def __init__(self, attend: Attend | None = None):
        # diffusers' IP-Adapter loader makes each self-attention's processor anew with no arguments
        self.attend = attend or sdpa

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise NotImplementedError("megafusion AttnProcessor: masks, spatial and q/k norms are not supported")
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        fused = getattr(attn, "fused_projections", False)
        if encoder_hidden_states is None and fused:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if encoder_hidden_states is not None and attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            q = attn.to_q(hidden_states)
            k, v = attn.to_kv(context).chunk(2, dim=-1) if fused else (attn.to_k(context), attn.to_v(context))
        d = k.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, d).transpose(1, 2) for x in (q, k, v))
        hidden_states = attn.to_out[1](attn.to_out[0](self.attend(q, k, v)))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attention(module: torch.nn.Module, name: str) -> None:
    """Every attention layer of `module` (after `fuse_qkv_projections`) through the kernel `name`."""
    module.set_attn_processor(AttnProcessor(attend_fn(name)))
