"""SD3 / FLUX ControlNets from engines (engine/dit_controlnet_engines.py): `ControlledFlowNetworks`' step with the
ControlNet packages in place of the ControlNet modules and the controlled-transformer package in place of the
transformer. The scale table and control-image buffers are the torch path's, so the step stays one capturable
step: in graphs mode the ControlNets and the transformer run inside the same CUDA graph.
"""
from __future__ import annotations

import torch

from ..engine.flow_networks import pack, unpack
from ..engine.runners import run_spec
from .flow_controlnet import ControlledFlowNetworks


class EngineControlledFlowNetworks(ControlledFlowNetworks):
    """Flow networks whose velocity runs the ControlNet packages, sums their block samples (over the shorter list,
    as the torch path and diffusers' Multi models do) and runs the controlled transformer's package on them."""

    def __init__(self, base, controls, device, controlnets: list, transformer):
        """`base`: flow networks for the text encoders, VAE and FLUX's position ids (its transformer is not run);
        `controlnets`: one runner per control, in order; `transformer`: the controlled transformer's runner."""
        super().__init__(base, controls, device)
        self.controlnet_runners, self.transformer_runner = controlnets, transformer

    @property
    def capturable(self) -> bool:
        return all(r.capturable for r in (*self.controlnet_runners, self.transformer_runner))

    @torch.inference_mode()
    def velocity(self, z, timestep, states, pooled, guidance, step=None):
        if step is None:
            raise ValueError("EngineControlledFlowNetworks.velocity needs the global step index (step=)")
        images = self.images[tuple(z.shape[-2:])]
        scales = self.scales.index_select(1, step.view(1).to(self.device))  # (n, 1)
        (b, _, h, w), dt = z.shape, self.transformer_dtype
        common = {"encoder_hidden_states": states, "pooled_projections": pooled}
        if self.bundle.family.kind == "sd3":
            common.update(hidden_states=z, timestep=timestep)
        else:
            txt_ids, img_ids = self.base.flux_ids(states.shape[1], h, w, z.device)
            cos, sin = self.bundle.transformer.pos_embed(torch.cat([txt_ids, img_ids]))
            common.update(hidden_states=pack(z), timestep=timestep.to(dt) / 1000, rotary_cos=cos, rotary_sin=sin,
                          guidance=self.base.flux_guidance(guidance, b, z.device))
        total: dict[str, torch.Tensor] = {}
        for j, (c, runner) in enumerate(zip(self.controls, self.controlnet_runners)):
            own = dict(common)
            if getattr(c.model.config, "force_zeros_for_pooled_projection", False):
                own["pooled_projections"] = torch.zeros_like(pooled)
            if "rotary_cos" in own:  # each net's own position embedding, as it computes it in torch
                own["rotary_cos"], own["rotary_sin"] = c.model.pos_embed(torch.cat([txt_ids, img_ids]))
            out = run_spec(runner, {**own, "controlnet_cond": images[j].expand(b, *images[j].shape[1:]),
                                     "conditioning_scale": scales[j]})
            total = out if j == 0 else {**total, **{k: total[k] + out[k] for k in total.keys() & out.keys()}}
        want = {t.name for t in self.transformer_runner.spec.inputs}
        v = run_spec(self.transformer_runner, {**common, **{k: x for k, x in total.items() if k in want}})
        v = v[self.transformer_runner.spec.outputs[0].name].float()
        return v if self.bundle.family.kind == "sd3" else unpack(v, h, w)
