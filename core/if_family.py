"""DeepFloyd IF: a pixel-space cascade (T5 text encoder, stage I UNet 64 px, stage II super-resolution UNet 256 px).

A family type of its own rather than a `ModelFamily` with `kind="if"`: ModelFamily's fields (one UNet, a VAE
with its scale, CLIP encoders, one DDIM scheduler) describe a latent model, and IF has two UNets, no VAE,
one T5 encoder, two DDPM schedulers with learned variance and a noise-augmentation scheduler for stage II's
conditioning image. Filling ModelFamily with placeholders would make every latent-family property
(`vae_scale`, `pixel_multiple`, `is_xl`) silently wrong for IF; a separate type fails loudly instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The schedulers of DeepFloyd/IF-I-XL-v1.0 and IF-II-L-v1.0 as diffusers' IFPipeline and
# IFSuperResolutionPipeline use them: DDPM ("leading" timesteps), cosine betas, the UNet's second three
# output channels interpolating the log variance ("learned_range"), dynamic thresholding of x0 at the
# 95th percentile capped at 1.5 (stage I) or 1.0 (stage II), as deepfloyd_if's own samplers do.
IF_SCHEDULER_1: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "variance_type": "learned_range",
    "prediction_type": "epsilon",
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.95,
    "sample_max_value": 1.5,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
IF_SCHEDULER_2: dict[str, Any] = {**IF_SCHEDULER_1, "sample_max_value": 1.0}
IF_NOISING_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
}
"""Adds the noise augmentation to stage II's upscaled conditioning image (only its abar is used)."""


@dataclass(frozen=True)
class IFFamily:
    """A DeepFloyd IF cascade: what megafusion needs to build, load and plan it."""

    name: str
    """The `--model` value."""
    unet_1: dict[str, Any]
    """Stage I `UNet2DConditionModel` config (3 channels in, 6 out: eps and the variance interpolation)."""
    unet_2: dict[str, Any]
    """Stage II config (6 channels in: the sample and the noised, upscaled stage I image)."""
    text_encoder: dict[str, Any]
    """`T5Config` keyword arguments of the `T5EncoderModel`."""
    stages_1: tuple[tuple[int, int, int], ...]
    """Stage I's MegaFusion plan as (height, width, steps): the paper's 64/80 -> 128/20."""
    stages_2: tuple[tuple[int, int, int], ...]
    """Stage II's plan: the paper's 256/40 -> 512/10."""
    hub_ids: tuple[str, str] | None = None
    """Stage I and stage II repositories (None for the tiny model)."""
    guidance_1: float = 7.0
    """The paper's (and IFPipeline's) CFG weight for stage I."""
    guidance_2: float = 4.0
    """The paper's (and IFSuperResolutionPipeline's) CFG weight for stage II."""
    noise_level: int = 250
    """Noise-augmentation timestep of stage II's conditioning image (IFSuperResolutionPipeline's default)."""
    max_length: int = 77
    """T5 tokens per prompt, as IFPipeline pads and truncates."""
    tiny: bool = False
    """Built-in toy model: random weights, built-in tokenizer, no download ever."""
    scheduler_1: dict[str, Any] = field(default_factory=lambda: dict(IF_SCHEDULER_1))
    scheduler_2: dict[str, Any] = field(default_factory=lambda: dict(IF_SCHEDULER_2))
    noising_scheduler: dict[str, Any] = field(default_factory=lambda: dict(IF_NOISING_SCHEDULER))
    kind: str = "if"

    @property
    def native_1(self) -> int:
        """Stage I's trained side in pixels."""
        return int(self.unet_1["sample_size"])

    @property
    def native_2(self) -> int:
        """Stage II's trained side in pixels."""
        return int(self.unet_2["sample_size"])

    def pixel_multiple(self, stage: int) -> int:
        """Sides of cascade stage 1 or 2 must be multiples of 2^(downsamples)."""
        cfg = self.unet_1 if stage == 1 else self.unet_2
        return 2 ** (len(cfg["block_out_channels"]) - 1)


def _if_unet(block_out, layers, down, up, **extra) -> dict[str, Any]:
    cfg = {
        "in_channels": 3,
        "out_channels": 6,
        "block_out_channels": list(block_out),
        "layers_per_block": layers,
        "down_block_types": list(down),
        "up_block_types": list(up),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "act_fn": "gelu",
        "addition_embed_type": "text",
        "encoder_hid_dim_type": "text_proj",
        "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift",
        "attention_head_dim": 64,
        "addition_embed_type_num_heads": 64,
        "norm_num_groups": 32,
    }
    cfg.update(extra)
    return cfg


_SR_EXTRA = {  # what makes the super-resolution UNet: noise level as class label, IF's residual scaling
    "in_channels": 6,
    "class_embed_type": "timestep",
    "mid_block_scale_factor": 1.4142271248762552,
    "resnet_out_scale_factor": 1.4142271248762552,
    "resnet_skip_time_act": True,
    "time_embedding_act_fn": "gelu",
}

# T5 v1.1 XXL, the encoder of every IF stage.
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}

# IF-I-XL (4.3B) and IF-II-L (1.2B), the models diffusers' IF examples use. The fields that set the cost
# (widths, depths, block types, text widths) are those of the published unet/config.json files.
IF = IFFamily(
    name="if",
    unet_1=_if_unet((704, 1408, 2112, 2816), 3,
                    ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                    ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                    sample_size=64, cross_attention_dim=2816, encoder_hid_dim=4096),
    unet_2=_if_unet((160, 320, 640, 960, 1280), [2, 2, 3, 5, 5],
                    ("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
                    ("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3,
                    sample_size=256, cross_attention_dim=1280, encoder_hid_dim=4096, **_SR_EXTRA),
    text_encoder=T5_XXL,
    stages_1=((64, 64, 80), (128, 128, 20)),
    stages_2=((256, 256, 40), (512, 512, 10)),
    hub_ids=("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-II-L-v1.0"),
)


def _tiny_t5() -> dict[str, Any]:
    from .tiny_t5 import tiny_t5_config

    return tiny_t5_config()


# Same classes and block types at small widths; 2x per side between MegaFusion stages as in the paper.
TINY_IF = IFFamily(
    name="tiny-if",
    unet_1=_if_unet((16, 32, 32), 1,
                    ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
                    ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                    sample_size=16, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
                    addition_embed_type_num_heads=2, norm_num_groups=8),
    unet_2=_if_unet((16, 16, 32), 1,
                    ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                    ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
                    sample_size=64, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
                    addition_embed_type_num_heads=2, norm_num_groups=8, **{**_SR_EXTRA, "time_embedding_dim": 32}),
    text_encoder=_tiny_t5(),
    stages_1=((16, 16, 80), (32, 32, 20)),
    stages_2=((64, 64, 40), (128, 128, 10)),
    tiny=True,
)

IF_FAMILIES: dict[str, IFFamily] = {f.name: f for f in (IF, TINY_IF)}


def get_if_family(name: str) -> IFFamily:
    try:
        return IF_FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown IF model {name!r}; known: {', '.join(sorted(IF_FAMILIES))}") from None
