"""What the extra conditions of SD3 / FLUX cost (issue #18), in dit_flops.py's conventions, on the `meta` device.

- ControlNets (runtime/flow_controlnet.py): every ControlNet runs beside the transformer at every step of every
  stage, with the transformer's batch (its scale is zero outside [start, end], not skipped), and its control image
  is VAE-encoded at every stage size before the first step (segment "control images"; a FLUX net with a pixel hint
  block takes the pixels, no encode);
- the IP-Adapter: the transformer's forward with the adapter's processors and projection, counted as a whole
  (SD3 projects the image features at every step's timestep; FLUX's image embedding is projected in every call);
  the image encoder runs once, before the generation, and is not counted;
- image to image (runtime/flow_img2img.py): the stages before the entry skipped, the photo's encode at the entry
  stage's size, only the steps that run;
- a LoRA fused into the weights costs nothing per step.
"""
from __future__ import annotations

import torch

from ..core.plan import Stage, StagePlan
from .dit_flops import DiTCostCounter
from .flops import ZERO, ForwardCost, PlanCost, SegmentCost, _tera, count_forward, entered_segments, plan_segments


class DiTControlNetCostCounter:
    """One SD3ControlNetModel / FluxControlNetModel, built on the meta device from its folder's config.json."""

    def __init__(self, counter: DiTCostCounter, folder: str):
        from diffusers import FluxControlNetModel, SD3ControlNetModel

        self.counter = counter
        cls = SD3ControlNetModel if counter.family.kind == "sd3" else FluxControlNetModel
        with torch.device("meta"):
            self.module = cls.from_config(cls.load_config(folder))
            if counter.family.kind == "sd3" and not self.module.config.use_pos_embed:
                # SD3.5's 8B ControlNets share the transformer's patch embedding (as load_flow_controlnet sets it).
                self.module.pos_embed = self.module._get_pos_embed_from_transformer(counter.transformer_module)
        self.hint = getattr(self.module, "input_hint_block", None) is not None
        """A FLUX net of the XLabs kind: it takes the control image's pixels, not its latent."""
        self._memo: dict[tuple, ForwardCost] = {}

    def step(self, height: int, width: int, batch: int) -> ForwardCost:
        """One ControlNet forward at pixel size (height, width) with the transformer's batch."""
        key = (height, width, batch)
        if key not in self._memo:
            self._memo[key] = self._count(height, width, batch)
        return self._memo[key]

    def control_image_encode(self, height: int, width: int) -> ForwardCost:
        """Encoding the control image at one stage size (none for a pixel-input net)."""
        return ZERO if self.hint else self.counter.vae_encode(height, width)

    def _count(self, height: int, width: int, batch: int) -> ForwardCost:
        m, cfg, fam = self.module, self.module.config, self.counter.family
        h, w = height // fam.vae_scale, width // fam.vae_scale
        tokens = self.counter.text_tokens
        with torch.device("meta"):
            pooled = torch.empty(batch, cfg.pooled_projection_dim)
            t = torch.full((batch,), 500.0)
            if fam.kind == "sd3":
                z = torch.empty(batch, cfg.in_channels, h, w)
                cond = torch.empty(batch, cfg.in_channels + cfg.extra_conditioning_channels, h, w)
                states = torch.empty(batch, tokens, cfg.joint_attention_dim) \
                    if cfg.joint_attention_dim is not None else None
                return count_forward(m, lambda: m(hidden_states=z, timestep=t, encoder_hidden_states=states,
                                                  pooled_projections=pooled, controlnet_cond=cond,
                                                  conditioning_scale=1.0, return_dict=False))
            z = torch.empty(batch, (h // 2) * (w // 2), cfg.in_channels)
            cond = torch.empty(batch, 3, height, width) if self.hint else torch.empty_like(z)
            states = torch.empty(batch, tokens, cfg.joint_attention_dim)
            g = torch.full((batch,), 3.5) if cfg.guidance_embeds else None
        img_ids, txt_ids = torch.zeros((h // 2) * (w // 2), 3), torch.zeros(tokens, 3)  # real: rotary on the host
        return count_forward(m, lambda: m(hidden_states=z, controlnet_cond=cond, conditioning_scale=1.0,
                                          encoder_hidden_states=states, pooled_projections=pooled, timestep=t / 1000,
                                          img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False))


def controlnet_config_error(folder: str, e: Exception) -> str:
    return (f"--controlnet {folder!r}: its config.json does not build the family's ControlNet "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def dit_controlnet_counters(counter: DiTCostCounter, folders) -> tuple[DiTControlNetCostCounter, ...]:
    """A counter per ControlNet folder; ControlInputError names a folder whose config.json does not build one."""
    from ..runtime.controlnet import ControlInputError

    out = []
    for folder in folders:
        try:
            out.append(DiTControlNetCostCounter(counter, folder))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ControlInputError(controlnet_config_error(folder, e)) from None
    return tuple(out)


def dit_conditioned_plan_cost(counter: DiTCostCounter, plan: StagePlan, cfg: bool = True, relay: str = "pixel",
                              controlnets: tuple[DiTControlNetCostCounter, ...] = (), entry=None,
                              transformer_step=None) -> PlanCost:
    """`dit_plan_cost` with the conditions, in the segments the flow pipeline times: "control images" after the
    text encoders (with ControlNets), each step's ControlNet forwards added to the transformer's (paper G-MACs
    too), and with image to image (`entry`, runtime/img2img.EntryPoint) the stages before the entry left out, the
    photo's encode in place of the relay into the entry stage, the entry stage's skipped steps left out.
    `transformer_step(height, width, batch)`: one transformer forward (default `counter.transformer`; the
    IP-Adapter's counter passes the adapted one)."""
    fam = counter.family
    batch = 2 if cfg and fam.cfg else 1
    forward = transformer_step or counter.transformer

    def step(k: int, st: Stage) -> ForwardCost:
        total = forward(st.height, st.width, batch)
        for cn in controlnets:
            total = total + cn.step(st.height, st.width, batch)
        return total

    segs = list(plan_segments(counter, plan, ZERO, step, relay))
    head = [segs[0]]
    if controlnets:  # ControlledFlowNetworks.prepare_plan: every ControlNet's image at every stage's size
        enc = ZERO
        for st in plan.stages:
            for cn in controlnets:
                enc = enc + cn.control_image_encode(st.height, st.width)
        head.append(SegmentCost("control images", "encode", 0.0, *_tera(enc)))
    if entry is None:
        return PlanCost(fam.name, plan.describe(), batch == 2, tuple(head + segs[1:]))
    return PlanCost(fam.name, plan.describe(), batch == 2, entered_segments(counter, plan, segs, entry, step, head))


def ip_image_embeds_shape(family, encoder_folder: str) -> tuple[int, int]:
    """(tokens, features) of the image embeddings the IP-Adapter's transformer takes, from the encoder's config:
    SD3, SigLIP's penultimate hidden states ((image size / patch)^2 tokens); FLUX, CLIP's one projected
    embedding."""
    import json
    from pathlib import Path

    cfg = json.loads(Path(encoder_folder, "config.json").read_text())
    cfg = cfg.get("vision_config", cfg)
    if family.kind == "sd3":
        return (cfg["image_size"] // cfg["patch_size"]) ** 2, cfg["hidden_size"]
    return 1, cfg["projection_dim"]


class _WithImage(torch.nn.Module):
    """The adapted transformer called with the reference image's embeddings, as the IP-Adapter networks call it
    (SD3's CFG batch: zeros for the negative half)."""

    def __init__(self, transformer: torch.nn.Module, kind: str, tokens: int, features: int):
        super().__init__()
        self.transformer, self.kind, self.shape = transformer, kind, (tokens, features)

    def forward(self, **kw):
        batch = kw["hidden_states"].shape[0]
        with torch.device("meta"):
            e = torch.empty(batch if self.kind == "sd3" else 1, *self.shape)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        # The meta kernel's output is laid out (B, heads, L, d); the CPU and CUDA kernels' (B, L, heads, d), which
        # diffusers' IP-Adapter processors rely on (`.transpose(1, 2).view`): laid out so here (a copy, no FLOPs).
        torch.nn.functional.scaled_dot_product_attention = \
            lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2)
        try:
            return self.transformer(**kw, joint_attention_kwargs={"ip_adapter_image_embeds": e if self.kind == "sd3"
                                                                  else [e]})
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa


class DiTIPAdapterCostCounter(DiTCostCounter):
    """The transformer with an IP-Adapter's processors and projection, built on the meta device (weights read from
    the file only to learn its shapes); `transformer(h, w, batch)` is one adapted forward."""

    def __init__(self, family, adapter_file: str, encoder_folder: str):
        super().__init__(family)
        m = self.transformer_module
        if family.kind == "sd3":
            from ..runtime.flow_ipadapter_sd3 import load_sd3_ip_adapter, read_sd3_ip_adapter

            load_sd3_ip_adapter(m, read_sd3_ip_adapter(adapter_file, m))
        else:
            from ..runtime.flow_ipadapter import load_flux_ip_adapter, read_flux_ip_adapter

            import warnings

            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "copying into a meta parameter is a no-op": meant
                load_flux_ip_adapter(m, read_flux_ip_adapter(adapter_file, m))
        self.transformer_module = _WithImage(m, family.kind, *ip_image_embeds_shape(family, encoder_folder))
