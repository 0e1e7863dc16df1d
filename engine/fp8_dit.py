"""FP8 (e4m3) GEMMs for the transformer families' blocks (SD3, FLUX): engine/fp8.py's `Fp8Linear` (per-output-channel
weight scales, per-token activation scales, `torch._scaled_mm`, bf16 out) on the projections that see every image
token. Attention itself stays in bf16.

Why these layers (`DiTFp8Policy`'s default): at 2048 the image stream is 16,384 tokens against 333 (SD3) or 512
(FLUX) text tokens, so the image-stream projections hold nearly all GEMM FLOPs. Left in bf16: the text stream's
own projections (`add_*_proj`, `to_add_out`, `ff_context`: few rows, where quantizing costs about what it saves),
the adaLN modulation (`norm*.linear`: one row per image), and the embedders and output layers outside the blocks.
FLUX's single blocks run text and image tokens as one stream: their projections are quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .fp8 import swap_in_fp8

DIT_ROLES = ("attn_qkv", "attn_out", "ff_in", "ff_out", "single_mlp_in", "single_out", "context_qkv", "context_out",
             "context_ff_in", "context_ff_out", "modulation", "other")
"""What a transformer GEMM does, as `dit_layer_role` names it."""


@dataclass(frozen=True)
class DiTFp8Policy:
    """Which transformer layers become FP8 GEMMs, and how they compute."""

    roles: tuple[str, ...] = ("attn_qkv", "attn_out", "ff_in", "ff_out", "single_mlp_in", "single_out")
    """Roles (see DIT_ROLES) quantized; a layer of another role keeps its dtype."""
    fast_accum: bool = True
    """`_scaled_mm`'s `use_fast_accum`, as `Fp8Policy`."""

    def __post_init__(self):
        unknown = sorted(set(self.roles) - set(DIT_ROLES))
        if unknown:
            raise ValueError(f"unknown FP8 layer role(s) {', '.join(unknown)}; choose from {', '.join(DIT_ROLES)}")


def dit_layer_role(name: str) -> str:
    """The role (see DIT_ROLES) of the linear layer named `name` in diffusers' SD3 or FLUX transformer."""
    parts = name.split(".")
    if parts[0] not in ("transformer_blocks", "single_transformer_blocks") or len(parts) < 3:
        return "other"
    last, prev = parts[-1], parts[-2]
    if last == "linear" and prev.startswith("norm"):
        return "modulation"
    if prev in ("attn", "attn2") and last in ("to_q", "to_k", "to_v"):
        return "attn_qkv"
    if prev in ("attn", "attn2") and last in ("add_q_proj", "add_k_proj", "add_v_proj"):
        return "context_qkv"
    if prev == "to_out" and last == "0":
        return "attn_out"
    if prev in ("attn", "attn2") and last == "to_add_out":
        return "context_out"
    if parts[-4:] == ["ff", "net", "0", "proj"]:
        return "ff_in"
    if parts[-3:] == ["ff", "net", "2"]:
        return "ff_out"
    if parts[-4:] == ["ff_context", "net", "0", "proj"]:
        return "context_ff_in"
    if parts[-3:] == ["ff_context", "net", "2"]:
        return "context_ff_out"
    if parts[0] == "single_transformer_blocks" and last == "proj_mlp":
        return "single_mlp_in"
    if parts[0] == "single_transformer_blocks" and last == "proj_out":
        return "single_out"
    return "other"


def dit_fp8_candidates(transformer: nn.Module, policy: DiTFp8Policy = DiTFp8Policy()) -> list[str]:
    """Names of the linear layers `quantize_transformer` replaces: role in the policy, sides divisible by 16."""
    return [name for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and dit_layer_role(name) in policy.roles
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def quantize_transformer(transformer: nn.Module, policy: DiTFp8Policy = DiTFp8Policy()) -> list[str]:
    """Replaces, in place, the policy's layers by FP8 ones (weights quantized once); returns their names. On CUDA
    the transformer must be bf16 (row-wise `_scaled_mm` writes bf16 only). Run before torch.compile or capture."""
    return swap_in_fp8(transformer, dit_fp8_candidates(transformer, policy), policy.fast_accum, "transformer")
