"""The SD3 and FLUX transformers from their ONNX exports on ONNX Runtime, called as the flow networks call
the modules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class OrtSD3Transformer:
    """Stands in for `SD3Transformer2DModel` in `FlowTorchNetworks.transformer_fn` (CPU tensors in and out)."""

    def __init__(self, path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        feeds = dict(zip(self.input_names, (hidden_states, timestep.float().expand(hidden_states.shape[0]),
                                            encoder_hidden_states, pooled_projections)))
        out = self.session.run(None, {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()})
        return (torch.from_numpy(out[0]).to(hidden_states.device),)


class OrtFluxTransformer:
    """Stands in for `FluxTransformer2DModel` in `FlowTorchNetworks.transformer_fn`, over the export of
    export/dit_flux_export.py: the rotary tables it takes as inputs come from the model's own `pos_embed`
    (a weightless module) on the position ids the networks pass."""

    def __init__(self, path: str | Path, pos_embed: torch.nn.Module,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.pos_embed = pos_embed

    def __call__(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                 return_dict=False):
        cos, sin = self.pos_embed(torch.cat([txt_ids, img_ids]))
        given = {"hidden_states": hidden_states, "timestep": timestep, "guidance": guidance,
                 "encoder_hidden_states": encoder_hidden_states, "pooled_projections": pooled_projections,
                 "rotary_cos": cos, "rotary_sin": sin}
        feeds = {n: np.ascontiguousarray(given[n].detach().cpu().numpy()) for n in self.input_names}
        out = self.session.run(None, feeds)
        return (torch.from_numpy(out[0]).to(hidden_states.device),)
