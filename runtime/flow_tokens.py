"""A prompt's token ids per encoder for SD3 / FLUX in libmegafusion (`mf_inputs_set_tokens`), tokenized as the flow
pipeline tokenizes them (runtime/flow_conditioning.py): CLIP padded and truncated to 77, T5 to the model's length.
Encoder names are the C API's: "clip_l", "clip_g" (SD3), "t5"."""
from __future__ import annotations

from ..core.dit_loading import DiTBundle
from .conditioning import token_ids
from .flow_conditioning import t5_ids


def flow_token_ids(bundle: DiTBundle, text: str) -> dict[str, list[int]]:
    """{"clip_l": 77 ids, ["clip_g": 77 ids,] "t5": t5_max_length ids} of `text` with the bundle's tokenizers."""
    fam = bundle.family
    clips = ("clip_l", "clip_g")[:len(fam.text_encoders)]
    out = {name: token_ids(bundle.tokenizers[i], text, "cpu")[0].tolist() for i, name in enumerate(clips)}
    out["t5"] = t5_ids(bundle.tokenizers[-1], text, fam.t5_max_length, "cpu")[0].tolist()
    return out
