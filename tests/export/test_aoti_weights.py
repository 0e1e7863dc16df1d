"""Weight files of --weights-apart packages (export/aoti_weights.py): each tensor comes back with the values,
dtype and strides it was written with (channels_last convolution weights included), and the same tensors give
the same bytes (the open shares one read between files of equal sha256)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from megafusion.export.aoti_weights import read_weights, write_weights


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)
    return {"unet.conv.weight": conv, "unet.conv.bias": torch.randn(8, generator=g).half(),
            "unet.proj.weight": torch.randn(6, 5, generator=g), "unet.scalar": torch.tensor(2.5),
            "unet.one_by_one.weight": torch.randn(8, 4, 1, 1, generator=g).to(memory_format=torch.channels_last)}


def test_tensors_come_back_with_their_values_dtypes_and_strides(tmp_path):
    src = _tensors()
    written = write_weights(src, tmp_path / "w.safetensors")
    assert written == sum(t.numel() * t.element_size() for t in src.values())
    got = read_weights(tmp_path / "w.safetensors", "cpu")
    assert set(got) == set(src)
    for name, t in src.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert got[name].stride() == t.stride(), name  # what the package was compiled for
        assert torch.equal(got[name], t), name
    assert not got["unet.conv.weight"].is_contiguous()  # channels_last kept, not made contiguous


def test_same_tensors_same_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_weights(_tensors(), a)
    write_weights(dict(reversed(list(_tensors().items()))), b)  # another insertion order
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    # Another process (safetensors orders several metadata entries differently from one process to the next).
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); from test_aoti_weights import _tensors; "
            "from megafusion.export.aoti_weights import write_weights; write_weights(_tensors(), sys.argv[1])")
    for n in range(3):
        c = tmp_path / f"c{n}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(c), str(Path(__file__).parent)], check=True)
        assert c.read_bytes() == a.read_bytes()
    other = _tensors()
    other["unet.proj.weight"][0, 0] += 1
    write_weights(other, b)
    assert a.read_bytes() != b.read_bytes()


def test_a_file_of_another_format_is_refused(tmp_path):
    import pytest
    from safetensors.torch import save_file

    save_file({"unet.conv.weight": torch.zeros(2, 2)}, str(tmp_path / "old.safetensors"))  # no format record
    with pytest.raises(ValueError, match=r"old\.safetensors: not a megafusion weight file of format 1 \(found None\)"):
        read_weights(tmp_path / "old.safetensors", "cpu")
