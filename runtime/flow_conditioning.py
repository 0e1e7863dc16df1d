"""Prompt conditioning of SD3 and FLUX, laid out as diffusers' pipelines lay it out (docs/ALGORITHM.md §18).

SD3: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens after
them; pooled = both CLIP projections side by side; CFG batch [negative, prompt], the empty negative prompt encoded
(not zeros). FLUX: T5's tokens; pooled = CLIP-L's pooler output; one pass, no negative prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.dit_loading import DiTBundle
from ..engine.flow_networks import FlowTorchNetworks
from .conditioning import token_ids


@dataclass(frozen=True)
class FlowConditioning:
    """Text conditioning of one generation, batched [negative, prompt] when CFG is on."""

    states: torch.Tensor
    """(B, L, D) the transformer's encoder hidden states, float32."""
    pooled: torch.Tensor
    """(B, P) pooled text embedding."""
    cfg: bool
    """Whether the batch is [negative, prompt]."""


def t5_ids(tokenizer, prompt: str, max_length: int, device) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids.to(device)


def encode_flow(nets: FlowTorchNetworks, bundle: DiTBundle, prompt: str, negative_prompt: str, guidance: float,
                device) -> FlowConditioning:
    """Encodes the prompt (and for SD3 with guidance > 1 the negative prompt)."""
    fam = bundle.family
    n_clip = len(fam.text_encoders)

    def run(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        clip = [nets.clip(i, token_ids(bundle.tokenizers[i], text, device)) for i in range(n_clip)]
        t5 = nets.t5(t5_ids(bundle.tokenizers[-1], text, fam.t5_max_length, device))
        if fam.kind == "flux":
            return t5, clip[0][1]
        hidden = torch.cat([h for h, _ in clip], dim=-1)
        hidden = F.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1]))
        return torch.cat([hidden, t5], dim=-2), torch.cat([p for _, p in clip], dim=-1)

    states, pooled = run(prompt)
    if not (fam.cfg and guidance > 1.0):
        return FlowConditioning(states, pooled, False)
    neg_states, neg_pooled = run(negative_prompt)
    return FlowConditioning(torch.cat([neg_states, states]), torch.cat([neg_pooled, pooled]), True)
