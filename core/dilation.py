"""The dilated-middle UNet variant (docs/ALGORITHM.md §5, MegaFusion++ "D").

Only the mid block's resnet `conv1`/`conv2` change: dilation and padding become delta; weights are the
same tensors. `torch.nn.Conv2d` reads `dilation`/`padding` at every forward, so switching is a matter of
setting two attributes, with no copy of the model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Variant:
    """UNet variant names, as the engine cache and CUDA-graph keys spell them."""

    STANDARD = "standard"
    DILATED = "dilated"


def mid_block_convs(unet: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The 3x3 convolutions that the dilated variant changes."""
    convs = []
    for resnet in unet.mid_block.resnets:
        for conv in (resnet.conv1, resnet.conv2):
            if tuple(conv.kernel_size) != (3, 3):
                raise ValueError(f"mid-block conv has kernel {conv.kernel_size}, expected 3x3")
            convs.append(conv)
    return convs


def set_mid_dilation(unet: torch.nn.Module, delta: int) -> None:
    """Sets dilation = padding = delta on the mid-block resnet convs (delta 1 is the standard UNet)."""
    if delta < 1:
        raise ValueError(f"dilation must be >= 1, got {delta}")
    for conv in mid_block_convs(unet):
        conv.dilation = (delta, delta)
        conv.padding = (delta, delta)


def mid_dilation_of(unet: torch.nn.Module) -> int:
    d = {conv.dilation for conv in mid_block_convs(unet)}
    if len(d) != 1:
        raise ValueError(f"mid-block convs disagree on dilation: {sorted(d)}")
    return d.pop()[0]


@contextlib.contextmanager
def mid_dilation(unet: torch.nn.Module, delta: int) -> Iterator[torch.nn.Module]:
    """Runs the block with the mid-block dilation set to delta, then restores the previous one."""
    before = mid_dilation_of(unet)
    set_mid_dilation(unet, delta)
    try:
        yield unet
    finally:
        set_mid_dilation(unet, before)


def variant_of(delta: int) -> str:
    return Variant.STANDARD if delta == 1 else Variant.DILATED
