"""benchmarks/lab/vae_bf16_spread.py on tiny-sdxl's VAE on the CPU: the comparisons and the files it writes."""
from __future__ import annotations

import json

import pytest
import torch

import vae_bf16_spread as spread


def test_pairs_measure_what_the_precision_changes(tmp_path):
    assert spread.main(["--model", "tiny-sdxl", "--latent", "8,16", "--variants", "fp32,bf16,bf16-cl",
                        "--output", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "vae_bf16_spread.json").read_text())
    assert [s["latent"] for s in res["sizes"]] == [8, 16] and res["reference"] == "fp64"
    for size in res["sizes"]:
        assert size["image"] == 8 * size["latent"]
        pairs = {(p["a"], p["b"]): p for p in size["pairs"]}
        assert len(pairs) == 6  # every pair of fp64, fp32, bf16, bf16-cl
        # float32 sits within rounding of float64; bf16 (8 mantissa bits) far outside it
        assert pairs["fp64", "fp32"]["max_abs_over_ref_max"] < 1e-5
        assert pairs["fp64", "bf16"]["rel_l2"] > 100 * pairs["fp64", "fp32"]["rel_l2"]
        assert pairs["fp64", "bf16"]["rel_l2"] < 0.05
    table = (tmp_path / "vae_bf16_spread.md").read_text()
    assert "| fp64 | bf16 |" in table and res["provenance"]["command"] in table


def test_a_16_bit_variant_leaves_the_weights_of_the_next_one_unrounded():
    vae = spread.build_vae("tiny-sdxl", 0, torch.device("cpu"))
    z = spread.seeded_latent(vae, 8, 1, torch.device("cpu"))
    before = spread.decode(vae, z, "fp32")
    spread.decode(vae, z, "bf16-cl")
    p = next(vae.parameters())
    assert p.dtype == torch.float32 and p.is_contiguous() and torch.equal(spread.decode(vae, z, "fp32"), before)


def test_compare_counts_levels_as_the_runtime_writes_pixels():
    a = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    b = a.clone()
    b[0, 0, 0, 0] = 4 / 127.5  # 4 levels up at one pixel: (x / 2 + 0.5) * 255
    c = spread.compare(b, a, a + 1)
    assert c["levels_max"] == 4 and c["levels_mean"] == pytest.approx(4 / 48)
    assert c["max_abs_over_ref_max"] == pytest.approx(4 / 127.5)


def test_unknown_variant_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        spread.main(["--model", "tiny-sdxl", "--variants", "fp32,int8", "--output", str(tmp_path)])
    assert e.value.code == 2 and "--variants int8" in capsys.readouterr().err
