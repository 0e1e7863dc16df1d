"""SD3 / FLUX families: registration, size rules, the built-in T5 tokenizer, and loading a saved folder back."""
from __future__ import annotations

import json

import pytest
import torch

from megafusion.core.dit_families import FLUX, SD3, TINY_FLUX, TINY_SD3
from megafusion.core.families import FAMILIES, get_family
from megafusion.core.loading import WeightsError, load_model, resolve_family
from megafusion.core.plan import PlanError, Stage, default_plan, validate_plan
from megafusion.core.tiny_t5 import EOS_ID, PAD_ID, TINY_T5_VOCAB_SIZE, UNK_ID, tiny_t5_config, tiny_t5_tokenizer


def test_registered_with_their_kinds():
    for name, kind in (("sd3", "sd3"), ("flux", "flux"), ("tiny-sd3", "sd3"), ("tiny-flux", "flux")):
        assert FAMILIES[name] is get_family(name) and get_family(name).kind == kind
    assert SD3.cfg and not FLUX.cfg


def test_size_rules():
    # VAE scale 8 x patch 2 (SD3's patch; FLUX's 2x2 packing).
    assert SD3.pixel_multiple == FLUX.pixel_multiple == 16 == TINY_SD3.pixel_multiple
    assert SD3.max_side == 192 * 16 and FLUX.max_side is None
    assert default_plan(SD3).stages == (Stage(1024, 1024, 20), Stage(2048, 2048, 8))
    assert default_plan(FLUX).stages == (Stage(1024, 1024, 20), Stage(2048, 2048, 8))
    plan = default_plan(TINY_FLUX, 300, 170)  # any aspect ratio, exact output size
    assert (plan.output_width, plan.output_height) == (300, 170)
    assert all(s.width % 16 == 0 and s.height % 16 == 0 for s in plan.stages)
    with pytest.raises(PlanError, match="3072"):
        validate_plan(SD3, [Stage(1024, 1024, 20), Stage(3088, 3088, 8)])
    validate_plan(FLUX, [Stage(1024, 1024, 20), Stage(3088, 3088, 8)])  # RoPE: no position table
    with pytest.raises(PlanError, match="multiple of 16"):
        validate_plan(TINY_SD3, [Stage(136, 136, 4)])


def test_tiny_t5_tokenizer():
    tok = tiny_t5_tokenizer(12)
    ids = tok("A red fox!", padding="max_length", max_length=12, truncation=True).input_ids
    assert len(ids) == 12 and ids[-1] == PAD_ID
    n = ids.index(EOS_ID)
    assert n > 0 and all(i == PAD_ID for i in ids[n + 1:]) and max(ids) < TINY_T5_VOCAB_SIZE
    assert tok.decode(ids[:n]) == "a red fox!"
    assert UNK_ID in tok("\u00e9\u00e9").input_ids  # outside the vocabulary
    long = tok("x" * 50, padding="max_length", max_length=12, truncation=True).input_ids
    assert len(long) == 12 and long[-1] == EOS_ID  # truncation keeps the end token, as T5's does
    assert tiny_t5_config(d_model=64)["d_model"] == 64 and tiny_t5_config()["vocab_size"] == TINY_T5_VOCAB_SIZE


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_tiny_model_classes(name):
    b = load_model(name)
    assert type(b.transformer).__name__ == ("SD3Transformer2DModel" if name == "tiny-sd3" else "FluxTransformer2DModel")
    assert [type(e).__name__ for e in b.text_encoders][-1] == "T5EncoderModel"
    assert b.vae.config.latent_channels == 16 and b.vae.config.shift_factor != 0
    assert len(b.text_encoders) == len(b.tokenizers) == (3 if name == "tiny-sd3" else 2)
    assert b.source == "random:0" and not any(p.requires_grad for m in b.modules() for p in m.parameters())


def test_saved_folder_loads_back(tmp_path):
    """save_pretrained, then the same path `load_model(--model-path)` takes: the same weights and tokens."""
    from tests.runtime.test_flow_reference import save_tiny

    save_tiny("tiny-flux", tmp_path)
    a, b = load_model("tiny-flux"), load_model("tiny-flux", str(tmp_path))
    assert b.source == str(tmp_path) and resolve_family("tiny-flux", str(tmp_path)).native_height == 128
    for ma, mb in zip(a.modules(), b.modules()):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for ta, tb in zip(a.tokenizers, b.tokenizers):
        assert ta("a red fox").input_ids == tb("a red fox").input_ids
    # Refusals, one clear line each: another pipeline's folder, a missing component, the wrong family.
    with pytest.raises(WeightsError, match="not a sd3 model"):
        load_model("tiny-sd3", str(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(WeightsError, match="StableDiffusionXLPipeline"):
        resolve_family("tiny-flux", str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "tokenizer_2").rename(tmp_path / "elsewhere")
    with pytest.raises(WeightsError, match="tokenizer_2"):
        load_model("tiny-flux", str(tmp_path))


def test_builtin_families_agree_with_their_own_configs():
    from megafusion.core.dit_loading import dit_family_for_config

    for fam in (SD3, TINY_SD3):
        assert fam.transformer["sample_size"] * fam.vae_scale == fam.native_height == fam.native_width
    for fam in (SD3, FLUX, TINY_SD3, TINY_FLUX):
        assert dit_family_for_config(fam, fam.transformer, fam.vae, fam.name) is fam


def test_tools_that_take_unet_families_only_refuse_in_one_line(tmp_path, capsys):
    from megafusion.cli.build_engines import main as build
    from megafusion.cli.tokens import main as tokens
    from megafusion.serve.config import ConfigError, ServeConfig, check_config

    # mf-bench takes the transformer families (cli/bench_dit.py, tests/benchmarks/test_bench_dit.py)
    for main, argv in ((tokens, ["--prompt", "x"]),):
        assert main(["--model", "tiny-sd3", *argv]) == 2
        err = capsys.readouterr().err
        assert "does not take tiny-sd3 yet" in err and len(err.strip().splitlines()) == 1
    # mf-build-engines takes the transformer families, with aoti and onnxruntime only (engine/dit_engines.py)
    assert build(["--model", "tiny-sd3", "--backend", "tensorrt", "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "tiny-sd3 engines are built by aoti or onnxruntime" in err and len(err.strip().splitlines()) == 1
    cfg = ServeConfig(model="tiny-flux")  # mf-serve takes them (serve/flow_model.py), but not fp8
    assert check_config(cfg) is cfg
    with pytest.raises(ConfigError, match="--precision fp8: mf-serve does not run it for tiny-flux yet"):
        check_config(ServeConfig(model="tiny-flux", precision="fp8"))


def test_t5_never_runs_in_fp16():
    b = load_model("tiny-flux", dtype=torch.float16)
    assert b.transformer.dtype == torch.float16 and b.text_encoders[0].dtype == torch.float16
    assert b.text_encoders[-1].dtype == torch.bfloat16
