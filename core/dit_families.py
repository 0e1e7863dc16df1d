"""Diffusion-transformer families: SD3 / SD3.5 and FLUX.1 (docs/ALGORITHM.md §18).

They register themselves into `families.FAMILIES` (families.py imports this module at its end), so `--model sd3`
works wherever a family name is taken. What differs from the UNet families: a transformer in place of the UNet
(`transformer`, a diffusers config), a T5 encoder after the CLIP ones (`t5`, a `T5Config`), a 16-channel VAE
with a shift factor, and flow matching (`scheduler` is a `FlowMatchEulerDiscreteScheduler` config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .families import FAMILIES, ModelFamily, TextEncoderConfig, _vae_config
from .tiny_t5 import tiny_t5_config

DIT_KINDS = ("sd3", "flux")
"""`ModelFamily.kind` of the transformer families."""

SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
"""SD3 / SD3.5: a fixed shift of 3 at 1024x1024 (SD3 paper §5.3.2)."""

FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
"""FLUX.1: the shift mu grows linearly with the image's token count (`calculate_shift` in diffusers)."""


@dataclass(frozen=True)
class DiTFamily(ModelFamily):
    """A transformer family; `unet` is empty and `scheduler` is a flow-matching config."""

    transformer: dict[str, Any] = field(default_factory=dict)
    """`SD3Transformer2DModel` or `FluxTransformer2DModel` config."""
    t5: dict[str, Any] = field(default_factory=dict)
    """`T5EncoderModel` config (keyword arguments of `T5Config`)."""
    t5_max_length: int = 256
    """T5 tokens per prompt, as the diffusers pipeline's `max_sequence_length` default (SD3 256, FLUX 512)."""
    default_guidance: float = 7.0
    """SD3: the CFG weight w (the paper's 7.0). FLUX: the distilled guidance embedding (3.5); no CFG batch."""

    @property
    def patch(self) -> int:
        """Latent cells per token along one side (SD3's patch size; FLUX packs 2x2 cells per token)."""
        return int(self.transformer.get("patch_size", 2)) if self.kind == "sd3" else 2

    @property
    def unet_downsamples(self) -> int:  # no UNet: the patch takes its place in the size rule
        return self.patch.bit_length() - 1

    @property
    def pixel_multiple(self) -> int:
        """Stage sides must be multiples of VAE scale x patch (what the diffusers pipelines require)."""
        return self.vae_scale * self.patch

    @property
    def max_side(self) -> int | None:
        """SD3 has a learned position table of pos_embed_max_size^2 patches: no side beyond it. FLUX (RoPE): None."""
        n = self.transformer.get("pos_embed_max_size") if self.kind == "sd3" else None
        return None if n is None else int(n) * self.pixel_multiple

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def cfg(self) -> bool:
        """Whether guidance is classifier-free (a batch of 2); FLUX is guidance-distilled (one pass)."""
        return self.kind == "sd3"


def _dit_vae(block_out: tuple[int, ...], groups: int, scaling: float, shift: float, sample: int,
             layers: int) -> dict[str, Any]:
    return {**_vae_config(block_out, groups, scaling, sample, layers), "latent_channels": 16,
            "shift_factor": shift, "use_quant_conv": False, "use_post_quant_conv": False}


_CLIP_L_PROJ = TextEncoderConfig(768, 3072, 12, 12, "quick_gelu", 768, with_projection=True)
_CLIP_L = TextEncoderConfig(768, 3072, 12, 12, "quick_gelu", 768)
_CLIP_BIGG = TextEncoderConfig(1280, 5120, 32, 20, "gelu", 1280, with_projection=True)
_T5_XXL = {**tiny_t5_config(), "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
           "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}

SD3 = DiTFamily(
    name="sd3", kind="sd3", native_height=1024, native_width=1024, unet={},
    transformer={  # SD3 Medium (the paper's SD3)
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    },
    vae=_dit_vae((128, 256, 512, 512), 32, 1.5305, 0.0609, 1024, 2),
    text_encoders=(_CLIP_L_PROJ, _CLIP_BIGG),
    default_stages=((1024, 1024, 20), (2048, 2048, 8)),  # the paper's SD3 plan (§4.1)
    hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
    scheduler=dict(SD3_SCHEDULER_CONFIG), t5=_T5_XXL, t5_max_length=256, default_guidance=7.0,
)

FLUX = DiTFamily(
    name="flux", kind="flux", native_height=1024, native_width=1024, unet={},
    transformer={  # FLUX.1-dev
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
    },
    vae=_dit_vae((128, 256, 512, 512), 32, 0.3611, 0.1159, 1024, 2),
    text_encoders=(_CLIP_L,),
    # FLUX.1-dev's default 28 steps, split as the paper splits SD3's 28: 20 at native size, 8 at 2x.
    default_stages=((1024, 1024, 20), (2048, 2048, 8)),
    hub_id="black-forest-labs/FLUX.1-dev",
    scheduler=dict(FLUX_SCHEDULER_CONFIG), t5=_T5_XXL, t5_max_length=512, default_guidance=3.5,
)

_TINY_CLIP_L = TextEncoderConfig(32, 37, 2, 4, "quick_gelu", 32, with_projection=True)
_TINY_CLIP_G = TextEncoderConfig(32, 37, 2, 4, "gelu", 32, with_projection=True)
_TINY_DIT_VAE = _dit_vae((8, 8, 16, 16), 4, 1.5305, 0.0609, 128, 1)

TINY_SD3 = DiTFamily(
    name="tiny-sd3", kind="sd3", native_height=128, native_width=128, unet={},
    transformer={
        "sample_size": 16, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 64,
        "caption_projection_dim": 16, "pooled_projection_dim": 64, "pos_embed_max_size": 64,
    },
    vae=_TINY_DIT_VAE,
    text_encoders=(_TINY_CLIP_L, _TINY_CLIP_G),
    default_stages=((128, 128, 20), (256, 256, 8)),
    vocab_size=0, tiny=True,
    # CLIP-L + CLIP-G hidden states (32 + 32) are zero-padded to T5's width, as SD3's 768 + 1280 to 4096.
    scheduler=dict(SD3_SCHEDULER_CONFIG), t5=tiny_t5_config(d_model=64), t5_max_length=256, default_guidance=7.0,
)

TINY_FLUX = DiTFamily(
    name="tiny-flux", kind="flux", native_height=128, native_width=128, unet={},
    transformer={
        "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
        "guidance_embeds": True, "axes_dims_rope": [4, 6, 6],
    },
    vae={**_TINY_DIT_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    text_encoders=(TextEncoderConfig(32, 37, 2, 4, "quick_gelu", 32),),
    default_stages=((128, 128, 20), (256, 256, 8)),
    vocab_size=0, tiny=True,
    scheduler=dict(FLUX_SCHEDULER_CONFIG), t5=tiny_t5_config(), t5_max_length=512, default_guidance=3.5,
)

DIT_FAMILIES: dict[str, DiTFamily] = {f.name: f for f in (SD3, FLUX, TINY_SD3, TINY_FLUX)}
FAMILIES.update(DIT_FAMILIES)


def is_dit(family: ModelFamily) -> bool:
    return family.kind in DIT_KINDS


def no_dilation_why(family: ModelFamily) -> str:
    """Why `dilation` is refused for a transformer family (mf-generate, mf-bench and mf-serve say it alike)."""
    return (f"{family.name} is a transformer; it has no convolution whose receptive field a dilated mid block "
            "would widen")


def no_negative_prompt_why(family: ModelFamily) -> str:
    """Why FLUX refuses a negative prompt (mf-generate, mf-bench and mf-serve say it alike)."""
    return f"{family.name} is guidance-distilled (one pass, no CFG batch), so it takes no negative prompt"


def refuse_dit(family: ModelFamily, tool: str) -> None:
    """One clear line for the tools that take the UNet families only (engines, benchmarks, serving, tokens)."""
    if is_dit(family):
        from .families import UnknownModelError

        raise UnknownModelError(f"{tool} does not take {family.name} yet: the transformer families (sd3, flux) run "
                                "in mf-generate only")
