"""ControlNets for SD3 and FLUX through the relay (docs/ALGORITHM.md §18, "ControlNet"): diffusers'
StableDiffusion3ControlNetPipeline / FluxControlNetPipeline step at every stage, with the control image resized to
each stage's size and encoded there as those pipelines encode it.

`ControlledFlowNetworks` wraps the flow networks: its `velocity` runs every ControlNet on the step's sample,
timestep and text conditioning, sums their block samples (as SD3MultiControlNetModel / FluxMultiControlNetModel
do) and hands them to the transformer. What it reads lives in device buffers that keep their identity across
generations (a scale table indexed by the global step, one encoded control image per stage size), so the step
stays capturable: a stage's CUDA graph holds the ControlNets and the transformer in one step.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.dit_families import DiTFamily
from ..core.loading import WeightsOrigin, mark_origin
from ..core.plan import StagePlan
from ..engine.flow_networks import FlowTorchNetworks, pack
from ..engine.networks import WrappedNetworks
from .controlnet import Control, ControlInputError, keep, resize_control

CONTROLNET_CLASS = {"sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}
"""The diffusers ControlNet class each transformer family takes (a folder's config.json `_class_name`)."""

MAX_PLAN_STEPS = 4096
"""Columns of the scale table (global steps of a plan); fixed, so a captured graph's table never moves."""


def check_flow_controlnet_folder(path: str | Path, family: DiTFamily) -> str:
    """The folder's ControlNet class, checked against the family before anything is loaded (one line naming it)."""
    want = CONTROLNET_CLASS[family.kind]
    config = Path(path, "config.json")
    if not config.is_file():
        raise ControlInputError(f"--controlnet {str(path)!r}: not a diffusers {want} folder (no config.json)")
    try:
        cls = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ControlInputError(f"--controlnet {str(path)!r}: unreadable config.json ({e})") from None
    if cls != want:
        raise ControlInputError(f"--controlnet {str(path)!r}: a {cls} folder; {family.name} takes a {want} "
                                "(a ControlNet for another architecture)")
    return cls


def load_flow_controlnet(path: str | Path, transformer: torch.nn.Module, family: DiTFamily, device,
                         dtype) -> torch.nn.Module:
    """A diffusers SD3ControlNetModel / FluxControlNetModel folder, checked against the transformer it feeds."""
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    check_flow_controlnet_folder(path, family)
    cls = SD3ControlNetModel if family.kind == "sd3" else FluxControlNetModel
    try:
        model = cls.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise ControlInputError(f"--controlnet {str(path)!r}: cannot be loaded ({str(e).splitlines()[0]})") from None
    mine, theirs = transformer.config, model.config
    width = theirs.num_attention_heads * theirs.attention_head_dim
    fields = [("in_channels", theirs.in_channels, mine.in_channels),
              ("width (heads x head dim)", width, mine.num_attention_heads * mine.attention_head_dim),
              ("pooled_projection_dim", theirs.pooled_projection_dim, mine.pooled_projection_dim)]
    if family.kind == "sd3":
        fields.append(("patch_size", theirs.patch_size, mine.patch_size))
    if theirs.joint_attention_dim is not None:  # SD3.5's 8B ControlNets take no text states
        fields.append(("joint_attention_dim", theirs.joint_attention_dim, mine.joint_attention_dim))
    for name, a, b in fields:
        if a != b:
            raise ControlInputError(f"--controlnet {str(path)!r}: {name} {a} does not match the transformer's {b} "
                                    "(a ControlNet for another architecture)")
    if family.kind == "flux" and theirs.num_mode is not None:
        raise ControlInputError(f"--controlnet {str(path)!r}: a union ControlNet ({theirs.num_mode} modes) needs a "
                                "control mode per image, which mf-generate does not take yet")
    shared = family.kind == "sd3" and not theirs.use_pos_embed
    if shared:  # SD3.5's 8B ControlNets share the transformer's patch embedding, as the diffusers pipeline sets it up
        model.pos_embed = model._get_pos_embed_from_transformer(transformer)
    model = model.to(device=device, dtype=dtype).eval()
    if not shared:  # its packages' key: the folder's files (a shared embedding leaves only its tensors to say)
        mark_origin(model, WeightsOrigin("files", folder=str(Path(path).resolve())))
    return model


class ControlledFlowNetworks(WrappedNetworks):
    """Flow networks whose velocity adds the ControlNets' block samples (the transformer's `extra` inputs)."""

    takes_step = True
    """The stage loop passes each velocity call its global step index (a device int64), read from `scales`."""

    def __init__(self, base: FlowTorchNetworks, controls: list[Control], device):
        super().__init__(base)
        if not controls:
            raise ValueError("ControlledFlowNetworks needs at least one Control")
        self.controls, self.device = controls, torch.device(device)
        prepare = getattr(base, "controlnet_call", None)  # compiled with the transformer under --mode compiled
        self.calls = [prepare(c.model) if prepare is not None else c.model for c in controls]
        """What runs ControlNet j: its module, or the compiled module."""
        hints = {getattr(c.model, "input_hint_block", None) is not None for c in controls}
        if len(hints) > 1:
            raise ControlInputError("--controlnet: FLUX ControlNets with and without a pixel-space hint block "
                                    "(XLabs and InstantX kinds) cannot run together: the transformer reads their "
                                    "block samples in different orders")
        self.blocks_repeat = hints == {True}
        """FLUX: an XLabs-kind net (pixel input, hint block) repeats its few block samples over all blocks."""
        self.scales = torch.zeros(len(controls), MAX_PLAN_STEPS, device=self.device)
        """scale * keep of ControlNet j at global step i."""
        self.images: dict[tuple[int, int], list[torch.Tensor]] = {}
        """(latent h, latent w) -> each ControlNet's encoded control image at that stage size (batch 1), filled in
        place for each plan: the tensors a captured graph reads."""

    def prepare_plan(self, plan: StagePlan) -> None:
        """Fills the scale table for the plan's global steps and encodes the control images at every stage size."""
        total = plan.total_steps
        if total > MAX_PLAN_STEPS:
            raise ValueError(f"a plan of {total} steps exceeds {MAX_PLAN_STEPS} with a ControlNet")
        table = torch.zeros_like(self.scales, device="cpu")
        for j, c in enumerate(self.controls):
            for i in range(total):
                table[j, i] = c.scale * keep(i, total, c.start, c.end)
        self.scales.copy_(table)
        vs = self.bundle.family.vae_scale
        for stage in plan.stages:
            key = (stage.height // vs, stage.width // vs)
            encoded = [self._encode(c, stage.height, stage.width) for c in self.controls]
            bufs = self.images.get(key)
            if bufs is None or any(a.shape != b.shape for a, b in zip(bufs, encoded)):
                self.images[key] = encoded
            else:
                for buf, e in zip(bufs, encoded):
                    buf.copy_(e)

    def _encode(self, c: Control, height: int, width: int) -> torch.Tensor:
        """The control image at a stage's size as the diffusers pipeline hands it to the ControlNet: normalized to
        [-1, 1]; then VAE-encoded, (z - shift) * scaling (SD3; FLUX packed into tokens), except for a FLUX net
        with a hint block, which takes the pixels. The posterior mean, where the pipelines sample it: a control
        image is a condition, and its encoding should not change with the noise drawn."""
        image = resize_control(c.image.to(self.device, torch.float32), height, width) * 2 - 1
        dt = self.transformer_dtype
        if getattr(c.model, "input_hint_block", None) is not None:
            return image.to(dt)
        cfg = self.bundle.vae.config
        # InstantX's SD3 ControlNets (zero pooled projection) were trained without the VAE's shift.
        zero_shift = self.bundle.family.kind == "sd3" and c.model.config.force_zeros_for_pooled_projection
        shift = 0.0 if zero_shift else float(cfg.shift_factor or 0.0)
        latent = (self.base.vae_encode(image) - shift) * float(cfg.scaling_factor)
        return (pack(latent) if self.bundle.family.kind == "flux" else latent).to(dt)

    @torch.inference_mode()
    def velocity(self, z: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        if step is None:
            raise ValueError("ControlledFlowNetworks.velocity needs the global step index (step=)")
        images = self.images[tuple(z.shape[-2:])]
        scales = self.scales.index_select(1, step.view(1).to(self.device)).to(self.transformer_dtype)  # (n, 1)
        run = self._sd3 if self.bundle.family.kind == "sd3" else self._flux
        return self.base.velocity(z, timestep, states, pooled, guidance,
                                  run(z, timestep, states, pooled, guidance, images, scales))

    def _sd3(self, z, timestep, states, pooled, guidance, images, scales) -> dict:
        dt, b = self.transformer_dtype, z.shape[0]
        total = None
        for j, c in enumerate(self.controls):
            cfg = c.model.config
            (samples,) = self.calls[j](
                hidden_states=z.to(dt), timestep=timestep,
                encoder_hidden_states=states.to(dt) if cfg.joint_attention_dim is not None else None,
                pooled_projections=(torch.zeros_like(pooled) if cfg.force_zeros_for_pooled_projection
                                    else pooled).to(dt),
                controlnet_cond=images[j].expand(b, -1, -1, -1), conditioning_scale=scales[j], return_dict=False)
            total = list(samples) if total is None else [a + s for a, s in zip(total, samples)]
        return {"block_controlnet_hidden_states": total}

    def _flux(self, z, timestep, states, pooled, guidance, images, scales) -> dict:
        dt, (b, _, h, w) = self.transformer_dtype, z.shape
        txt_ids, img_ids = self.base.flux_ids(states.shape[1], h, w, z.device)
        common = dict(hidden_states=pack(z).to(dt), timestep=timestep.to(dt) / 1000, txt_ids=txt_ids,
                      img_ids=img_ids, pooled_projections=pooled.to(dt), encoder_hidden_states=states.to(dt))
        blocks = singles = None
        for j, c in enumerate(self.controls):
            g = self.base.flux_guidance(guidance, b, z.device) if c.model.config.guidance_embeds else None
            image = images[j].expand(b, *images[j].shape[1:])
            d, s = self.calls[j](**common, controlnet_cond=image, conditioning_scale=scales[j], guidance=g,
                                 return_dict=False)
            # FluxMultiControlNetModel's merge: where either side has no such blocks, the running sum stays.
            blocks = d if j == 0 else blocks if d is None or blocks is None else [x + y for x, y in zip(blocks, d)]
            singles = s if j == 0 else singles if s is None or singles is None else [
                x + y for x, y in zip(singles, s)]
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
                "controlnet_blocks_repeat": self.blocks_repeat}
