"""Cost accounting for the transformer families, SD3 and FLUX (docs/ALGORITHM.md §18), on the `meta` device.

The same two conventions as benchmarks/flops.py: the paper's "GFLOPs" (multiply-accumulates of `nn.Linear` and
`nn.Conv2d` in the denoiser, CFG as batch 2) and true FLOPs (FlopCounterMode: 2 per MAC, attention included)
for the transformer, every relay's VAE decode and encode, and the final decode; text encoders apart.
"""
from __future__ import annotations

import torch

from ..core.dit_families import DiTFamily
from ..core.plan import StagePlan
from .flops import ZERO, ForwardCost, PlanCost, VaeCostCounter, count_forward, plan_segments


class DiTCostCounter(VaeCostCounter):
    """A transformer family's networks built on the meta device once; forwards counted on meta tensors."""

    def __init__(self, family: DiTFamily):
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        super().__init__(family)
        cls = SD3Transformer2DModel if family.kind == "sd3" else FluxTransformer2DModel
        with torch.device("meta"):
            self.transformer_module = cls(**family.transformer)

    @property
    def text_tokens(self) -> int:
        """Tokens of the transformer's text stream: SD3 77 CLIP + T5's; FLUX T5's."""
        return self.family.t5_max_length + (77 if self.family.kind == "sd3" else 0)

    def transformer(self, height: int, width: int, batch: int = 2) -> ForwardCost:
        """One transformer forward at pixel size (height, width); SD3's CFG step is batch 2, FLUX's batch 1."""
        return self._cached(("dit", height, width, batch), lambda: self._count(height, width, batch))

    def _count(self, height: int, width: int, batch: int) -> ForwardCost:
        cfg, fam = self.family.transformer, self.family
        h, w = height // fam.vae_scale, width // fam.vae_scale
        m = self.transformer_module
        with torch.device("meta"):
            states = torch.empty(batch, self.text_tokens, cfg["joint_attention_dim"])
            pooled = torch.empty(batch, cfg["pooled_projection_dim"])
            t = torch.full((batch,), 500.0)
            if fam.kind == "sd3":
                z = torch.empty(batch, cfg["in_channels"], h, w)
                return count_forward(m, lambda: m(hidden_states=z, timestep=t, encoder_hidden_states=states,
                                                  pooled_projections=pooled, return_dict=False))
            z = torch.empty(batch, (h // 2) * (w // 2), cfg["in_channels"])
        # FLUX's rotary table is computed from position ids on the host; build real (tiny) id tensors.
        img_ids = torch.zeros((h // 2) * (w // 2), 3)
        txt_ids = torch.zeros(self.text_tokens, 3)
        g = torch.full((batch,), 3.5, device="meta") if cfg.get("guidance_embeds") else None
        return count_forward(m, lambda: m(hidden_states=z, timestep=t / 1000, guidance=g, pooled_projections=pooled,
                                          encoder_hidden_states=states, txt_ids=txt_ids, img_ids=img_ids,
                                          return_dict=False))


def dit_plan_cost(counter: DiTCostCounter, plan: StagePlan, cfg: bool = True, relay: str = "pixel") -> PlanCost:
    """Per-segment costs of `plan` as the flow pipeline runs it (CFG batch 2 for SD3 when `cfg`; FLUX never).
    Text encoders are not counted (a row of zeros keeps the segment order of `GenerationResult.timings`)."""
    batch = 2 if cfg and counter.family.cfg else 1
    segs = plan_segments(counter, plan, ZERO, lambda k, st: counter.transformer(st.height, st.width, batch), relay)
    return PlanCost(counter.family.name, plan.describe(), batch == 2, segs)


PAPER_SD3_GMACS = {"sd3 2048 direct": 433.9e3, "sd3 2048 megafusion": 201.4e3}
"""Table 1's SD3 "GFlops" column, as printed (28 steps at 2048 against 20 at 1024 + 8 at 2048)."""


def pixel_step_ratio(plan: StagePlan, direct: StagePlan) -> float:
    """Sum of steps x pixels of `plan` over that of `direct`: what a cost proportional to pixel count gives."""
    return sum(s.steps * s.pixels for s in plan.stages) / sum(s.steps * s.pixels for s in direct.stages)


SD3_NOTE = (
    "The paper's SD3 GFLOPs (433.9K direct, 201.4K MegaFusion) stand in the ratio 0.4642, which is the pixel-step "
    "ratio (20 x 1 + 8 x 4) / (28 x 4) = 0.4643: a per-step figure scaled by pixel count, as its SDXL rows. "
    "A transformer's cost is not proportional to pixels (the 333 text tokens do not grow; attention grows with "
    "the square of the tokens), and the per-step figure they imply, 3.87K G-MACs at 1024 (CFG batch 2), is no "
    "count of SD3 Medium's transformer: its Linear/Conv MACs are 6.01K (batch 2) or 3.01K (batch 1), 8.90K "
    "(batch 2) with the attention matmuls; the true figures are given here."
)
