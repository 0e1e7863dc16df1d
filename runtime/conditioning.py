"""Prompt conditioning for classifier-free guidance, laid out as diffusers' pipelines lay it out.

The CFG batch is [uncond, cond]. SDXL: hidden states of both encoders concatenated, pooled embedding from
the second, an empty negative prompt gives zeros (`force_zeros_for_empty_prompt`), and every stage passes
its own size as time ids (H, W, 0, 0, H, W) (docs/ALGORITHM.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.networks import Networks
from ..core.loading import ModelBundle


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of one generation, already batched for CFG when guidance is on."""

    hidden_states: torch.Tensor
    """(B, 77, D) encoder hidden states, float32."""
    pooled: torch.Tensor | None
    """(B, P) pooled text embedding (SDXL) or None."""
    cfg: bool
    """Whether the batch is [uncond, cond]."""

    @property
    def batch(self) -> int:
        return self.hidden_states.shape[0]

    def time_ids(self, height: int, width: int) -> torch.Tensor | None:
        """SDXL micro-conditioning for a stage of this pixel size: (B, 6) on the conditioning's device."""
        if self.pooled is None:
            return None
        row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        return row.to(self.hidden_states.device).expand(self.batch, 6)


def token_ids(tokenizer, prompt: str, device) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def encode(nets: Networks, bundle: ModelBundle, prompt: str, negative_prompt: str, guidance: float,
           device) -> Conditioning:
    """Encodes prompt and negative prompt; the CFG batch only when guidance > 1 (as diffusers does)."""
    cfg = guidance > 1.0

    def run(text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, pooled = [], None
        for i, tok in enumerate(bundle.tokenizers):
            h, p = nets.encode_text(i, token_ids(tok, text, device))
            states.append(h)
            pooled = p if p is not None else pooled
        return torch.cat(states, dim=-1), pooled

    cond_h, cond_p = run(prompt)
    if not cfg:
        return Conditioning(cond_h, cond_p, False)
    if bundle.family.is_xl and negative_prompt == "":
        neg_h, neg_p = torch.zeros_like(cond_h), torch.zeros_like(cond_p)
    else:
        neg_h, neg_p = run(negative_prompt)
    pooled = None if cond_p is None else torch.cat([neg_p, cond_p])
    return Conditioning(torch.cat([neg_h, cond_h]), pooled, True)
