"""The SD3 transformer from its ONNX export on ONNX Runtime, called as the flow networks call the module."""
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
