"""Model families: their architectures (built-in configs), native sizes and how their weights are found.

`sd15` and `sdxl` are the real architectures; `tiny-sd15` and `tiny-sdxl` are the same diffusers /
transformers classes at small widths, with random weights and a built-in tokenizer, for tests and CPU demos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The scheduler every supported family was trained with (docs/ALGORITHM.md §1).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


@dataclass(frozen=True)
class TextEncoderConfig:
    """One CLIP text encoder of a family."""

    hidden_size: int
    """Width of the transformer."""
    intermediate_size: int
    """Width of the MLP."""
    num_hidden_layers: int
    """Transformer depth."""
    num_attention_heads: int
    """Heads per attention layer."""
    hidden_act: str
    """Activation, as transformers spells it (`quick_gelu` for CLIP-L, `gelu` for OpenCLIP-bigG)."""
    projection_dim: int
    """Width of the pooled projection (used by SDXL's second encoder)."""
    with_projection: bool = False
    """True for `CLIPTextModelWithProjection` (SDXL's second encoder gives the pooled embedding)."""

    def transformers_config(self, vocab_size: int) -> dict[str, Any]:
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "hidden_act": self.hidden_act,
            "projection_dim": self.projection_dim,
            "max_position_embeddings": 77,
            # The end token is the highest id, so CLIP's legacy argmax pooling finds it.
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        }


@dataclass(frozen=True)
class ModelFamily:
    """Everything megafusion needs to know about one supported model family."""

    name: str
    """The `--model` value."""
    kind: str
    """`sd15` or `sdxl`: which pipeline layout (one or two text encoders, time ids) applies."""
    native_height: int
    """Pixel height the model was trained at (UNet `sample_size` times the VAE scale); stage 1 runs at about
    this many pixels. A loaded model's family takes it from the model's config (`loading.family_for_config`)."""
    native_width: int
    """Pixel width the model was trained at."""
    unet: dict[str, Any]
    """`UNet2DConditionModel` config."""
    vae: dict[str, Any]
    """`AutoencoderKL` config."""
    text_encoders: tuple[TextEncoderConfig, ...]
    """One (SD1.5) or two (SDXL) text encoders."""
    default_stages: tuple[tuple[int, int, int], ...]
    """The paper's default plan as (height, width, steps) per stage."""
    hub_id: str | None = None
    """Where the real weights live on the hub (None for the tiny models, which have no weights)."""
    vocab_size: int = 49408
    """Token vocabulary of the text encoders."""
    tiny: bool = False
    """Built-in toy model: random weights, built-in tokenizer, no download ever."""
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER_CONFIG))
    """DDIM scheduler config (docs/ALGORITHM.md §1)."""

    @property
    def native_pixels(self) -> int:
        return self.native_height * self.native_width

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def unet_downsamples(self) -> int:
        return len(self.unet["block_out_channels"]) - 1

    @property
    def pixel_multiple(self) -> int:
        """Stage sides must be multiples of this: latent divisible by 2^(UNet downsamples) (docs/ALGORITHM.md §2)."""
        return self.vae_scale * 2 ** self.unet_downsamples

    @property
    def is_xl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def max_side(self) -> int | None:
        """Largest stage side the denoiser takes, where it has one (SD3's position table); None: no limit."""
        return None


def _vae_config(block_out: tuple[int, ...], groups: int, scaling: float, sample: int, layers: int) -> dict[str, Any]:
    n = len(block_out)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": sample,
        "scaling_factor": scaling,
    }


_CLIP_L = TextEncoderConfig(768, 3072, 12, 12, "quick_gelu", 768)
_CLIP_BIGG = TextEncoderConfig(1280, 5120, 32, 20, "gelu", 1280, with_projection=True)

SD15 = ModelFamily(
    name="sd15",
    kind="sd15",
    native_height=512,
    native_width=512,
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    vae=_vae_config((128, 256, 512, 512), 32, 0.18215, 512, 2),
    text_encoders=(_CLIP_L,),
    default_stages=((512, 512, 40), (768, 768, 5), (1024, 1024, 5)),
    hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
)

SDXL = ModelFamily(
    name="sdxl",
    kind="sdxl",
    native_height=1024,
    native_width=1024,
    unet={
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    },
    vae={**_vae_config((128, 256, 512, 512), 32, 0.13025, 1024, 2), "force_upcast": True},
    text_encoders=(_CLIP_L, _CLIP_BIGG),
    default_stages=((1024, 1024, 40), (2048, 2048, 10)),
    hub_id="stabilityai/stable-diffusion-xl-base-1.0",
)

# Tiny models: same classes and the same down-sampling structure (so the same size rules), small widths.
_TINY_CLIP = TextEncoderConfig(32, 37, 2, 4, "quick_gelu", 32)
_TINY_CLIP_G = TextEncoderConfig(32, 37, 2, 4, "gelu", 32, with_projection=True)
_TINY_VAE = _vae_config((8, 8, 16, 16), 4, 0.18215, 128, 1)

TINY_SD15 = ModelFamily(
    name="tiny-sd15",
    kind="sd15",
    native_height=128,
    native_width=128,
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        # Attention only at 1/4 resolution, so large CPU demos stay in seconds (tokens grow with area^2).
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 16, 32, 32],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    vae=_TINY_VAE,
    text_encoders=(_TINY_CLIP,),
    default_stages=((128, 128, 40), (192, 192, 5), (256, 256, 5)),
    vocab_size=0,  # filled from the built-in tokenizer at load time
    tiny=True,
)

TINY_SDXL = ModelFamily(
    name="tiny-sdxl",
    kind="sdxl",
    native_height=128,
    native_width=128,
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 4],
        "cross_attention_dim": 64,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
        "norm_num_groups": 8,
    },
    vae={**_TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoders=(_TINY_CLIP, _TINY_CLIP_G),
    default_stages=((128, 128, 40), (256, 256, 10)),
    vocab_size=0,
    tiny=True,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15, SDXL, TINY_SD15, TINY_SDXL)}


class UnknownModelError(ValueError):
    pass


def get_family(name: str) -> ModelFamily:
    """The family called `name`, or an error that lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(FAMILIES))}"
        ) from None


# The diffusion-transformer families (SD3, FLUX) live in their own module, which adds them to FAMILIES.
from . import dit_families  # noqa: E402,F401

def pixel_family_names() -> list[str]:
    """The pixel-space cascades (DeepFloyd IF, core/if_family.py). They are a family type of their own, kept out
    of FAMILIES: the latent tools (engines, serving, test vectors) iterate FAMILIES and would not know them."""
    from .if_family import IF_FAMILIES

    return sorted(IF_FAMILIES)
