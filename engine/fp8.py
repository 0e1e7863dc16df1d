"""FP8 (e4m3) GEMMs for the UNet's transformer blocks, on `torch._scaled_mm` directly.

Why not torchao: its float8 dynamic quantization plus torch.compile had not finished compiling the SDXL UNet at
1024 after 8.5 minutes on the H200 (issue #20); one aten op per layer is all Inductor has to see here.

Scheme (what `_scaled_mm`'s row-wise scaling takes on sm89/sm90): weights quantized once to float8_e4m3fn with
one float32 scale per output channel; activations quantized on every call with one scale per token (row);
the product, scales and bias applied in the GEMM's epilogue, bf16 out (row-wise scaling writes bf16 only on
CUDA). K and N must be multiples of 16, A row-major, B column-major (a row-major (N, K) weight transposed).
Attention itself (softmax(QK^T)V) stays in bf16: only the projections around it are FP8.

Which layers (`Fp8Policy`, by role, see `layer_role`): the transformer blocks' projections that see every image
token. Left in bf16:
- each transformer's proj_in and proj_out: their FP8 error reaches eps out of proportion to their FLOPs (about
  2% of SDXL's FP8 FLOPs, 10% of SD1.5's). SD1.5's 16 + 16 made 3.7% and 4.2% of eps error alone, more than the
  other 128 layers together (2.5%); SDXL's 11 proj_in and 11 proj_out 1.7% and 2.0%, as much as its 140
  attention outputs (1.7%) (`benchmarks/lab/fp8_roles.py`, random weights, CPU, 2026-12-03);
- cross-attention keys and values (they read the 77 text tokens: 154 rows, too few for FP8 to pay);
- the time and added-condition embeddings and the resnets' `time_emb_proj` (one row per image);
- every 3x3 convolution (no FP8 convolution in torch) and the resnets' 1x1 shortcuts (few, and outside the blocks
  the issue targets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.specs import FP8 as FP8_PRECISION, UNET

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
"""448: the largest finite e4m3fn value; a row's largest magnitude is scaled onto it."""
_MIN_AMAX = 1e-12
"""An all-zero row gets this amax instead of 0, so its scale is finite and its quantized values are 0."""
MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer."""

ROLES = ("self_attn_qkv", "cross_attn_q", "cross_attn_kv", "attn_out", "ff_in", "ff_out", "proj_in", "proj_out",
         "time_embedding", "resnet_time_proj", "resnet_shortcut", "other")
"""What a UNet GEMM does, as `layer_role` names it."""


@dataclass(frozen=True)
class Fp8Policy:
    """Which UNet layers become FP8 GEMMs, and how they compute."""

    roles: tuple[str, ...] = ("self_attn_qkv", "cross_attn_q", "attn_out", "ff_in", "ff_out")
    """Roles (see ROLES) quantized; a layer of another role keeps its dtype. A tuple, not a set: the compile
    cache keys on the repr, which must not change with the process's string hash seed."""
    fast_accum: bool = True
    """`_scaled_mm`'s `use_fast_accum` (Hopper's faster, less often promoted accumulator; what torchao's
    float8 inference uses for the forward pass)."""
    activations: str = "token"
    """How inputs are scaled (ACTIVATION_SCALES): `token`, one scale per token computed on every call; `static`,
    one fixed scale per layer from calibration runs (`calibrate_input_scales`; runtime/fp8_calibration.py runs a
    plan's), so quantizing is a multiply and a cast with no amax reduction."""

    def __post_init__(self):
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown FP8 layer role(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}")
        if self.activations not in ACTIVATION_SCALES:
            raise ValueError(f"FP8 activation scales {self.activations!r}: choose from {', '.join(ACTIVATION_SCALES)}")


ACTIVATION_SCALES = ("token", "static")
"""`Fp8Policy.activations`: per-token scales computed on every call, or static per-layer scales from calibration."""
STATIC_INPUTS = "; static inputs"
"""What `fp8_scheme` adds for static scales, and how a key's quantization says it (`is_static_scheme`)."""


def is_static_scheme(quantization: str) -> bool:
    """Whether an EngineKey.quantization (or `fp8_scheme`) is that of static input scales."""
    return STATIC_INPUTS in quantization


def fp8_scheme(policy: Fp8Policy = Fp8Policy()) -> str:
    """The policy as an engine key records it (EngineKey.quantization): the roles in FP8, the accumulation and,
    when static, the input scaling (a per-token key keeps its old spelling, so its cached entries stay valid)."""
    return (f"e4m3 rows: {','.join(policy.roles)}" + ("; fast accum" if policy.fast_accum else "")
            + (STATIC_INPUTS if policy.activations == "static" else ""))


def key_quantization(network: str, precision: str, fp8_scales: str = "token") -> str:
    """EngineKey.quantization of a `network` engine at `precision`: for an fp8 UNet the default policy's scheme with
    `fp8_scales` input scaling (what `mf-build-engines --precision fp8 [--fp8-scales static]` builds; static ones
    name the calibration recipe too, whose inputs fix the scales inside the package), else `none`."""
    if (network, precision) != (UNET, FP8_PRECISION):
        return "none"
    scheme = fp8_scheme(Fp8Policy(activations=fp8_scales))
    if fp8_scales == "static":
        from .fp8_scales import Fp8Calibration, recipe_digest

        scheme += f" (calibration {recipe_digest(Fp8Calibration())[:12]})"
    return scheme


def fp8_unavailable(device: torch.device | str, subject: str = "precision fp8") -> str:
    """'' if `device` has FP8 tensor cores, else one line, starting with `subject`, saying why not (checked before
    any load)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"{subject} needs a CUDA GPU with FP8 tensor cores (compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer: Ada, Hopper), got {device}")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        return (f"{subject} needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, "
                f"Hopper); {torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return ""


def fp8_dtype_unfit(dtype: torch.dtype, device: torch.device | str, network: str = "UNet") -> str:
    """'' if a network with FP8 layers may compute in `dtype` on `device`, else why not: on CUDA, row-wise
    `_scaled_mm` writes bf16 only, so the network around the FP8 layers runs in bf16."""
    if torch.device(device).type == "cuda" and dtype != torch.bfloat16:
        return f"precision fp8 runs the {network} in bfloat16 (row-wise FP8 GEMMs write bf16 on CUDA), not {dtype}"
    return ""


def fp8_engines_conflict(lora: bool, controlnet: bool, ip_adapter: bool) -> str:
    """'' if FP8 engines (`--engines` with `--precision fp8`) can run with these conditions, else the one line
    mf-generate and mf-serve refuse them with: the FP8 packages hold the plain UNet's projections quantized, so
    they take no weight swap and have no ControlNet or IP-Adapter variants."""
    given = "--lora" if lora else "--controlnet" if controlnet else "--ip-adapter" if ip_adapter else ""
    if not given:
        return ""
    return (f"{given} with --engines and --precision fp8: FP8 packages are built for the plain UNet and take no "
            "weight swap; leave out --engines (the torch path runs both)"
            + (" or build them from the LoRA's weights (mf-build-engines --precision fp8 --lora ...)" if lora else ""))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q = x / scale in float8_e4m3fn, one float32 scale per row (shape (rows, 1)) mapping the row's
    largest magnitude onto 448, so q * scale == x up to e4m3 rounding. x is 2-D (rows, columns)."""
    # One reduction kernel for the amax (in float32), then divide-clamp-cast: few kernels where nothing fuses
    # them (the eager and graphed paths); under torch.compile Inductor fuses them with the layer before.
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp(min=_MIN_AMAX) / FP8_MAX
    # The clamp keeps a row's largest value, which division may round just past 448, off e4m3fn's NaN.
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of `quantize_rows`' output."""
    return q.float() * scale


def emulated_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What `Fp8Linear` computes, in float32 from the dequantized operands: the reference its tests use.
    x_scale: (M, 1); w_scale: (1, N) with wq (N, K)."""
    out = dequantize_rows(xq, x_scale) @ dequantize_rows(wq, w_scale.reshape(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (per-output-channel scales) and x quantized per token on every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fast_accum: bool = True):
        super().__init__()
        n, k = weight.shape
        if n % 16 or k % 16:
            raise ValueError(f"FP8 GEMM needs features divisible by 16, got a {k} -> {n} layer")
        self.in_features, self.out_features = k, n
        self.out_dtype = weight.dtype
        self.fast_accum = fast_accum
        wq, ws = quantize_rows(weight.detach())
        # Buffers, not parameters: inference only; (N, K) row-major, so `.t()` is the column-major B it needs.
        self.register_buffer("weight_fp8", wq.contiguous())
        self.register_buffer("weight_scale", ws.reshape(1, n).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype))
        # Static activation scale (None: one scale per token, computed on every call). A float32 scalar fixed by
        # `calibrate_input_scales`: the quantization is then a multiply and a cast, no amax reduction.
        self.register_buffer("input_scale", None)
        self.calibrating = False
        self.seen_amax = 0.0

    def _apply(self, fn, recurse=True):
        # A whole-model `.to(dtype)` (diffusers' adapter loaders cast the model they load into) would turn the e4m3
        # weights into another float type, which `_scaled_mm` refuses: this layer follows devices, keeps its dtypes.
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device)
        return self

    @classmethod
    def from_linear(cls, layer: nn.Linear, fast_accum: bool = True) -> "Fp8Linear":
        return cls(layer.weight, layer.bias, fast_accum)

    def gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N)."""
        if self.calibrating:  # eager only: the largest input magnitude seen, over the calibration runs
            self.seen_amax = max(self.seen_amax, float(x2.abs().max()))
        if self.input_scale is None:
            xq, xs = quantize_rows(x2)
        else:
            xq = (x2 * (1.0 / self.input_scale)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
            # `_scaled_mm`'s row-wise form (kept for the weights' per-channel scales) takes one scale per row of x
            xs = self.input_scale.expand(x2.shape[0], 1).contiguous()
        return torch._scaled_mm(xq.contiguous(), self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.gemm(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        x = "per token" if self.input_scale is None else "static"
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row scales, input {x}"


class Fp8Conv1x1(Fp8Linear):
    """A 1x1 convolution (stride 1, no padding, one group) as the FP8 GEMM over pixels: (B, C, H, W) ->
    (B, N, H, W). Channels-last input makes the (B*H*W, C) operand a view, and the output is channels-last."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, fast_accum: bool = True) -> "Fp8Conv1x1":
        return cls(conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias, fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.gemm(x.permute(0, 2, 3, 1).reshape(b * h * w, c))
        return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)


def is_pointwise_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def layer_role(name: str) -> str:
    """The role (see ROLES) of the GEMM named `name` in a diffusers UNet (after `fuse_qkv_projections` or not)."""
    parts = name.split(".")
    last, prev = parts[-1], parts[-2] if len(parts) > 1 else ""
    if parts[0] in ("time_embedding", "add_embedding"):
        return "time_embedding"
    if last == "time_emb_proj":
        return "resnet_time_proj"
    if last == "conv_shortcut":
        return "resnet_shortcut"
    if last in ("proj_in", "proj_out") and "attentions" in parts:
        return last
    if prev == "attn1" and last in ("to_qkv", "to_q", "to_k", "to_v"):
        return "self_attn_qkv"
    if prev == "attn2" and last == "to_q":
        return "cross_attn_q"
    if prev == "attn2" and last in ("to_kv", "to_k", "to_v"):
        return "cross_attn_kv"
    if prev == "to_out" and last == "0":
        return "attn_out"
    if parts[-4:] == ["ff", "net", "0", "proj"]:
        return "ff_in"
    if parts[-3:] == ["ff", "net", "2"]:
        return "ff_out"
    return "other"


def fp8_candidates(unet: nn.Module, policy: Fp8Policy = Fp8Policy()) -> list[str]:
    """Names of the layers `quantize_unet` replaces: linear or 1x1 conv, role in the policy, sides divisible
    by 16."""
    out = []
    for name, m in unet.named_modules():
        if isinstance(m, nn.Linear):
            n, k = m.out_features, m.in_features
        elif is_pointwise_conv(m):
            n, k = m.out_channels, m.in_channels
        else:
            continue
        if layer_role(name) in policy.roles and n % 16 == 0 and k % 16 == 0 and not _fused_away(unet, name):
            out.append(name)
    return out


def _fused_away(unet: nn.Module, name: str) -> bool:
    """The separate projections `fuse_qkv_projections` replaced (self-attention's Q, K, V by `to_qkv`,
    cross-attention's K, V by `to_kv`): kept by diffusers but not called, so quantizing them would only spend
    memory."""
    parent_name, _, child = name.rpartition(".")
    parent = unet.get_submodule(parent_name) if parent_name else unet
    if not getattr(parent, "fused_projections", False):
        return False
    return child in (("to_q", "to_k", "to_v") if parent_name.endswith("attn1") else ("to_k", "to_v"))


def quantize_unet(unet: nn.Module, policy: Fp8Policy = Fp8Policy()) -> list[str]:
    """Replaces, in place, the policy's layers by FP8 ones (weights quantized now, once); returns their names.
    On CUDA the UNet must be bf16 (row-wise `_scaled_mm` writes bf16 only). Run after `fuse_qkv_projections`
    (which reads the projections' float weights) and before torch.compile or CUDA-graph capture."""
    return swap_in_fp8(unet, fp8_candidates(unet, policy), policy.fast_accum, "UNet")


def swap_in_fp8(module: nn.Module, names: list[str], fast_accum: bool, network: str) -> list[str]:
    """Replaces, in place, the linear and 1x1 convolution layers `names` of `module` (the `network`) by FP8 ones;
    returns `names`. ValueError (`fp8_dtype_unfit`) if the module's dtype cannot hold them on its device."""
    p = next(module.parameters())
    why = fp8_dtype_unfit(p.dtype, p.device, network)
    if why:
        raise ValueError(why)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = getattr(parent, child)
        new = (Fp8Linear.from_linear(layer, fast_accum) if isinstance(layer, nn.Linear)
               else Fp8Conv1x1.from_conv(layer, fast_accum))
        setattr(parent, child, new)
    return names


def calibrate_input_scales(module: nn.Module, run, margin: float = 1.0) -> dict[str, float]:
    """Static activation scales: calls `run()` (eager forward passes of `module` on calibration inputs), then fixes
    each FP8 layer's input scale at the largest input magnitude it saw, times `margin`, over 448 (inputs beyond
    it saturate at 448). Returns {layer name: scale}. ValueError if a layer saw no input."""
    layers = {n: m for n, m in module.named_modules() if isinstance(m, Fp8Linear)}
    for m in layers.values():
        m.calibrating, m.seen_amax, m.input_scale = True, 0.0, None
    try:
        with torch.inference_mode():
            run()
    finally:
        for m in layers.values():
            m.calibrating = False
    unseen = [n for n, m in layers.items() if m.seen_amax <= 0.0]
    if unseen:
        raise ValueError(f"calibration gave no input to {len(unseen)} FP8 layer(s), e.g. {unseen[0]}")
    scales = {n: m.seen_amax * margin / FP8_MAX for n, m in layers.items()}
    set_input_scales(module, scales)
    return scales


def set_input_scales(module: nn.Module, scales: dict[str, float]) -> None:
    """Gives each FP8 layer of `module` its static input scale (as `calibrate_input_scales` returns them);
    ValueError naming a layer without one, or a name that is no FP8 layer."""
    layers = {n: m for n, m in module.named_modules() if isinstance(m, Fp8Linear)}
    missing, foreign = sorted(set(layers) - set(scales)), sorted(set(scales) - set(layers))
    if missing or foreign:
        raise ValueError(f"static FP8 scales do not match the module's FP8 layers: "
                         f"{len(missing)} without a scale (e.g. {(missing or ['-'])[0]}), "
                         f"{len(foreign)} unknown (e.g. {(foreign or ['-'])[0]})")
    bad = next((n for n in layers if not 0.0 < scales[n] < math.inf), None)  # all checked before any is set
    if bad is not None:
        raise ValueError(f"static FP8 scale of {bad}: {scales[bad]!r}, must be a finite number > 0")
    for n, m in layers.items():
        m.input_scale = torch.tensor(float(scales[n]), dtype=torch.float32, device=m.weight_fp8.device)
