"""runtime/flow_tokens.py: the ids libmegafusion takes per encoder are the ones the flow pipeline encodes."""
from __future__ import annotations

import pytest

from megafusion.core.loading import load_model
from megafusion.runtime.conditioning import token_ids
from megafusion.runtime.flow_conditioning import t5_ids
from megafusion.runtime.flow_tokens import flow_token_ids


@pytest.mark.parametrize("model,names", [("tiny-sd3", ["clip_l", "clip_g", "t5"]), ("tiny-flux", ["clip_l", "t5"])])
def test_ids_per_encoder(model, names):
    b = load_model(model)
    got = flow_token_ids(b, "a red fox")
    assert list(got) == names and len(got["t5"]) == b.family.t5_max_length and len(got["clip_l"]) == 77
    assert got["t5"] == t5_ids(b.tokenizers[-1], "a red fox", b.family.t5_max_length, "cpu")[0].tolist()
    assert got[names[-2]] == token_ids(b.tokenizers[len(names) - 2], "a red fox", "cpu")[0].tolist()
    assert flow_token_ids(b, "")["clip_l"] != got["clip_l"]
