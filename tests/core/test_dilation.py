"""The dilated-middle variant (docs/ALGORITHM.md §5): only the mid-block resnet convs change, weights stay."""
from __future__ import annotations

import torch

from megafusion.core.dilation import mid_block_convs, mid_dilation, mid_dilation_of, set_mid_dilation


def _conv_geometry(unet):
    return {n: (m.dilation, m.padding) for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_only_mid_block_resnet_convs_change(tiny_sdxl):
    unet = tiny_sdxl.unet
    before_geo = _conv_geometry(unet)
    before_w = {k: v.clone() for k, v in unet.state_dict().items()}
    with mid_dilation(unet, 2):
        after_geo = _conv_geometry(unet)
        changed = {n for n in before_geo if before_geo[n] != after_geo[n]}
        assert changed == {f"mid_block.resnets.{i}.conv{j}" for i in (0, 1) for j in (1, 2)}
        for n in changed:
            assert after_geo[n] == ((2, 2), (2, 2))
        for k, v in unet.state_dict().items():
            assert torch.equal(v, before_w[k]), k  # bitwise the same weights
            assert v.data_ptr() == unet.state_dict()[k].data_ptr()
    assert _conv_geometry(unet) == before_geo and mid_dilation_of(unet) == 1


def test_dilation_changes_the_output_and_is_reversible(tiny_sd15):
    unet = tiny_sd15.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    t = torch.tensor(500)
    with torch.inference_mode():
        ref = unet(x, t, ctx).sample
        with mid_dilation(unet, 2):
            dil = unet(x, t, ctx).sample
        again = unet(x, t, ctx).sample
    assert torch.equal(ref, again)
    assert (dil - ref).abs().max() > 1e-4
    assert len(mid_block_convs(unet)) == 4


def test_rejects_bad_delta(tiny_sd15):
    import pytest

    with pytest.raises(ValueError, match="0"):
        set_mid_dilation(tiny_sd15.unet, 0)
