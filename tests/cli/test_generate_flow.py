"""`mf-generate --model tiny-sd3 / tiny-flux`: the flow stage loop from the command line, and its refusals."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megafusion.cli.generate import main


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_generates_png_of_exact_size(model, tmp_path, capsys):
    out = tmp_path / "fox.png"
    rc = main(["--model", model, "--prompt", "a red fox", "--size", "250x140", "--steps", "4", "--relay", "latent",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "stage 2" in text and "wrote" in text
    image = np.asarray(Image.open(out))
    assert image.shape == (140, 250, 3) and image.std() > 0
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny-sd3", "--dilation", "2"], "--dilation 2: tiny-sd3 is a transformer"),
    (["--model", "tiny-flux", "--negative-prompt", "blur"], "guidance-distilled"),
    (["--model", "tiny-flux", "--mode", "compiled", "--device", "cpu"], "--mode compiled needs a CUDA device"),
    (["--model", "tiny-sd3", "--mode", "graphs", "--device", "cpu"], "--mode graphs needs a CUDA device"),
    (["--model", "tiny-sd3", "--size", "64x64"], "smaller than tiny-sd3's native"),
    (["--model", "tiny-sd3", "--stages", "128x128:2,136x136:1"], "not a positive multiple of 16"),
    (["--model", "tiny-flux", "--guidance", "nan"], "--guidance 'nan'"),
    (["--model", "tiny-sd3", "--max-memory", "0.001"], "needs an estimated"),
    (["--model", "tiny-flux", "--max-memory", "0"], "--max-memory 0.0: must be a number of GiB > 0"),
    (["--model", "tiny-flux", "--max-memory", "4", "--engines", "."], "--max-memory with --engines"),
    (["--model", "tiny-sd3", "--compile-cache", "cc"], "apply to --mode compiled only"),
    (["--model", "tiny-flux", "--mode", "compiled", "--device", "cpu", "--compile-cache", "/dev/null/cc"],
     "--compile-cache '/dev/null/cc'"),
    (["--model", "tiny-flux", "--inductor", "default"], "--inductor default: not available for tiny-flux"),
])
def test_bad_input_is_one_line_before_any_load(argv, message, tmp_path, capsys):
    rc = main([*argv, "--prompt", "x", "--output", str(tmp_path / "x.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_dry_run_prints_plan_and_cost(capsys):
    assert main(["--model", "sd3", "--prompt", "x", "--dry-run", "--dtype", "bf16", "--max-memory", "24"]) == 0
    text = capsys.readouterr().out
    assert "1024x1024 x20 -> 2048x2048 x8" in text and "TFLOP" in text
    # the memory estimate of runtime/flow_memory.py, held against the limit
    assert "estimated peak device memory" in text and "stage 2 transformer 2048x2048, batch 2" in text
    assert "limit: --max-memory, 24.00 GiB" in text


def test_a_plan_over_max_memory_is_refused_before_the_load(tmp_path, capsys, no_model_load):
    rc = main(["--model", "flux", "--random-weights", "--dtype", "bf16", "--max-memory", "30", "--prompt", "x",
               "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    # FLUX.1's layout in bf16 holds about 31 GiB of weights: refused in one line, nothing loaded or written
    assert rc == 2 and "needs an estimated" in err and "more than --max-memory (30.00 GiB)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_a_plan_within_max_memory_runs(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["--model", "tiny-sd3", "--max-memory", "2", "--prompt", "x", "--output", str(out),
                 "--no-progress"]) == 0
    assert out.is_file()


def test_build_engines_refusals_are_one_line(tmp_path, capsys):
    from megafusion.cli.build_engines import main as build

    for argv, message in ((["--model", "tiny-sd3", "--backend", "tensorrt"], "built by aoti or onnxruntime"),
                          (["--model", "tiny-sd3", "--backend", "onnxruntime", "--precision", "bf16"],
                           "--precision bf16: onnxruntime builds tiny-sd3 engines in fp32, fp16"),
                          (["--model", "tiny-flux", "--backend", "aoti", "--precision", "fp8"], "--precision fp8"),
                          (["--model", "tiny-sd15", "--precision", "bf16"], "--precision bf16 applies to the "
                                                                            "transformer families")):
        assert build([*argv, "--output", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_engines_built_then_used_by_mf_generate(flux_aoti, tmp_path, capsys):
    """mf-build-engines --backend aoti, then mf-generate --engines: the image of the torch run (fp32 CPU). The build
    and its printout are the session's (tests/conftest.py `flux_aoti`, shared with tests/engine/test_dit_engines.py);
    mf-generate only reads the folder."""
    from tests.conftest import FLUX_AOTI_STAGES as stages

    engines, said = flux_aoti
    assert "2 built" in said and stages == "128x128:2,160x160:1"
    common = ["--model", "tiny-flux", "--prompt", "a red fox", "--stages", stages, "--no-progress", "--device", "cpu"]
    assert main([*common, "--engines", str(engines), "--output", str(tmp_path / "e.png")]) == 0
    assert "aoti packages" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "t.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "e.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "t.png"), dtype=np.int16)
    assert a.shape == (160, 160, 3) and np.abs(a - b).max() <= 1  # uint8 rounding of a 1e-5 latent difference
    rc = main([*common[:5], "128x128:2,192x192:1", *common[6:], "--engines", str(engines),
               "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "no tiny-flux transformer package for the 192x192 stage" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("flags,said", [([], "--precision fp8 needs a CUDA GPU"),
                                        (["--engines", "."], "--precision fp8 with --engines")])
def test_fp8_for_transformers_refused_where_it_cannot_run(model, flags, said, capsys):
    """--precision fp8 (engine/fp8_dit.py) runs on a GPU with FP8 tensor cores, from the torch modules: on the CPU
    or with --engines it is refused in one line before the model load."""
    from megafusion.cli.generate import main

    assert main(["--model", model, "--prompt", "x", "--device", "cpu", "--precision", "fp8", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mf-generate: error: " + said), err


def test_onnxruntime_engine_built_then_used_by_mf_generate(tmp_path, capsys):
    """mf-build-engines --backend onnxruntime, then mf-generate --engines: the torch run's image (fp32 CPU, within one
    level), and a plan outside the engine's range refused before the model load, naming the range and the command."""
    from megafusion.cli.build_engines import main as build

    stages = "128x128:2,160x192:1"
    assert build(["--model", "tiny-sd3", "--backend", "onnxruntime", "--stages", stages, "--device", "cpu",
                  "--output", str(tmp_path / "e")]) == 0
    text = capsys.readouterr().out
    assert "1 built" in text and "(128x128 to 192x192 at batch 1 to 2): done in" in text
    common = ["--model", "tiny-sd3", "--prompt", "a red fox", "--stages", stages, "--no-progress", "--device", "cpu"]
    assert main([*common, "--engines", str(tmp_path / "e"), "--output", str(tmp_path / "e.png")]) == 0
    assert "transformer from the onnxruntime engine" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "t.png")]) == 0
    lora = _dit_lora("tiny-sd3", tmp_path / "style.safetensors")
    capsys.readouterr()
    assert main([*common, "--engines", str(tmp_path / "e"), "--lora", str(lora), "--output",
                 str(tmp_path / "l.png")]) == 2
    err = capsys.readouterr().err
    assert "--lora with --engines: onnxruntime transformer engines take no LoRA" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "l.png").exists()
    a = np.asarray(Image.open(tmp_path / "e.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "t.png"), dtype=np.int16)
    assert a.shape == (192, 160, 3) and np.abs(a - b).max() <= 1  # uint8 rounding of a 1e-5 latent difference
    for plan, message in (("128x128:2,256x256:1", "serves 128x128 to 192x192 at batch 1 to 2, not this plan"),
                          (stages, "holds no tiny-flux transformer engines")):
        model = "tiny-flux" if "tiny-flux" in message else "tiny-sd3"
        rc = main(["--model", model, *common[2:5], plan, *common[6:], "--engines", str(tmp_path / "e"),
                   "--output", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "mf-build-engines --model " + model in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.gpu
def test_onnxruntime_engine_runs_eagerly_in_graphs_mode_on_cuda(tmp_path, capsys):
    """ORT sessions cannot be captured (the backend's capture_note): the default graphs mode falls back to eager
    saying why, and an explicit --mode graphs is refused in one line."""
    import onnxruntime

    from megafusion.cli.build_engines import main as build

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu's CUDA EP is not installed")
    stages = "128x128:2,160x192:1"
    assert build(["--model", "tiny-sd3", "--backend", "onnxruntime", "--stages", stages, "--device", "cuda",
                  "--output", str(tmp_path / "e")]) == 0
    common = ["--model", "tiny-sd3", "--prompt", "a red fox", "--stages", stages, "--no-progress", "--device", "cuda",
              "--dtype", "fp32", "--engines", str(tmp_path / "e")]
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "e.png")]) == 0
    assert "onnxruntime engines cannot run inside the runtime's CUDA graphs" in capsys.readouterr().out
    assert main([*common, "--mode", "graphs", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--mode graphs: onnxruntime engines cannot" in err and len(err.strip().splitlines()) == 1


def _flow_controlnet(family_name, path):
    from megafusion.core.families import FAMILIES
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet

    return str(save_tiny_flow_controlnet(FAMILIES[family_name], path, seed=1))


@pytest.mark.slow
def test_controlnet_runs_from_the_command_line(tmp_path, capsys):
    """--controlnet / --control-image on tiny-flux over 2 stages: a PNG, and not the plain one."""
    cn = _flow_controlnet("tiny-flux", tmp_path / "cn")
    Image.fromarray((np.indices((96, 96)).sum(0) % 32 * 8).astype(np.uint8)).convert("RGB").save(tmp_path / "c.png")
    common = ["--model", "tiny-flux", "--prompt", "a red fox", "--stages", "128x128:2,160x160:1", "--relay",
              "latent", "--no-progress"]
    assert main([*common, "--controlnet", cn, "--control-image", str(tmp_path / "c.png"), "--control-scale", "2",
                 "--output", str(tmp_path / "c_out.png")]) == 0
    assert "controlnet: 1 in torch" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "plain.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "c_out.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int16)
    assert a.shape == b.shape == (160, 160, 3) and np.abs(a - b).max() > 0


def test_controlnet_refusals_are_one_line_before_the_load(tmp_path, capsys):
    import json

    Image.new("RGB", (64, 64)).save(tmp_path / "c.png")
    sd3_cn = _flow_controlnet("tiny-sd3", tmp_path / "sd3cn")
    (tmp_path / "unetcn").mkdir()  # a UNet ControlNetModel's config: refused by its class, nothing loaded
    (tmp_path / "unetcn" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (tmp_path / "e").mkdir()
    image = ["--control-image", str(tmp_path / "c.png")]
    for argv, message in (
            (["--model", "tiny-flux", "--controlnet", sd3_cn, *image],
             f"--controlnet {sd3_cn!r}: a SD3ControlNetModel folder; tiny-flux takes a FluxControlNetModel"),
            (["--model", "tiny-sd3", "--controlnet", str(tmp_path / "unetcn"), *image],
             "a ControlNetModel folder; tiny-sd3 takes a SD3ControlNetModel"),
            (["--model", "tiny-sd3", "--controlnet", sd3_cn, *image, "--engines", str(tmp_path / "e")],
             "holds no tiny-sd3 controlled-transformer package for the 128x128 stage"),
            (["--model", "tiny-sd3", "--controlnet", sd3_cn], "1 --controlnet and 0 --control-image"),
            (["--model", "tiny-sd3", "--control-scale", "0.5"], "--control-scale needs --controlnet")):
        rc = main([*argv, "--prompt", "x", "--output", str(tmp_path / "x.png"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_flux_ip_adapter_runs_from_the_command_line(tmp_path, capsys):
    """--ip-adapter on tiny-flux: read and checked, the image encoded, a PNG that is not the plain one."""
    from megafusion.core.families import FAMILIES
    from tests.runtime.test_flow_ipadapter import save_tiny_flux_ip_adapter
    from tests.runtime.test_ipadapter import save_tiny_image_encoder

    ip = save_tiny_flux_ip_adapter(FAMILIES["tiny-flux"].transformer, tmp_path / "ip.safetensors")
    enc = save_tiny_image_encoder(tmp_path / "enc")
    Image.fromarray((np.indices((48, 48)).sum(0) % 16 * 16).astype(np.uint8)).convert("RGB").save(tmp_path / "r.png")
    common = ["--model", "tiny-flux", "--prompt", "a red fox", "--stages", "128x128:2,160x160:1", "--relay",
              "latent", "--no-progress"]
    assert main([*common, "--ip-adapter", str(ip), "--ip-adapter-image", str(tmp_path / "r.png"),
                 "--ip-adapter-encoder", str(enc), "--ip-adapter-scale", "0.7",
                 "--output", str(tmp_path / "ip.png")]) == 0
    assert f"ip-adapter: {ip} (scale 0.7) in torch" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "plain.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "ip.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int16)
    assert a.shape == b.shape == (160, 160, 3) and np.abs(a - b).max() > 0


def test_flux_ip_adapter_refusals_are_one_line(tmp_path, capsys):
    from megafusion.core.families import FAMILIES
    from tests.runtime.test_flow_ipadapter import save_tiny_flux_ip_adapter
    from tests.runtime.test_ipadapter import save_tiny_image_encoder

    ip = save_tiny_flux_ip_adapter(FAMILIES["tiny-flux"].transformer, tmp_path / "ip.safetensors")
    wide = save_tiny_flux_ip_adapter(FAMILIES["tiny-flux"].transformer, tmp_path / "wide.safetensors", width=48)
    enc = save_tiny_image_encoder(tmp_path / "enc")
    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")
    (tmp_path / "e").mkdir()
    adapter = ["--ip-adapter-image", str(tmp_path / "r.png"), "--ip-adapter-encoder", str(enc)]
    capsys.readouterr()  # the encoder's save progress
    for argv, message in (
            (["--ip-adapter", str(ip), *adapter, "--engines", str(tmp_path / "e")],
             "--ip-adapter with --engines: for tiny-flux the IP-Adapter runs in torch only"),
            (["--ip-adapter", str(ip)], "--ip-adapter needs --ip-adapter-image FILE and --ip-adapter-encoder DIR"),
            (["--ip-adapter", str(wide), *adapter, "--steps", "2"],  # checked after the load, before any step
             "double block 0's to_k_ip is (48, 32), the transformer needs (32, 32)")):
        rc = main(["--model", "tiny-flux", *argv, "--prompt", "x", "--output", str(tmp_path / "x.png"),
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.png").exists()


FLOW_PLAN = ["--prompt", "a harbour", "--stages", "128x128:2,160x160:1", "--no-progress", "--device", "cpu",
             "--relay", "latent"]


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((128, 128), Image.BILINEAR).save(path)
    return path


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_image_to_image_enters_at_the_start_stage(model, photo, tmp_path, capsys):
    out = tmp_path / "up.png"
    assert main(["--model", model, *FLOW_PLAN, "--image", str(photo), "--start-stage", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encode image" in text and "stage 2 (160x160, 1 steps)" in text and "stage 1 " not in text
    assert Image.open(out).size == (160, 160)


def _dit_lora(model, path):
    from tests.core.test_dit_lora import _random_lora, save_diffusers
    from megafusion.core.loading import load_model

    return save_diffusers(_random_lora(load_model(model)), path)


def test_lora_changes_the_flux_image(tmp_path, capsys):
    lora = _dit_lora("tiny-flux", tmp_path / "style.safetensors")
    common = ["--model", "tiny-flux", *FLOW_PLAN]
    assert main([*common, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--lora", f"{lora}:0.8", "--output", str(tmp_path / "styled.png")]) == 0
    assert f"lora: {lora} x0.8" in capsys.readouterr().out
    assert (np.asarray(Image.open(tmp_path / "plain.png")) != np.asarray(Image.open(tmp_path / "styled.png"))).any()


@pytest.mark.parametrize("args,needle", [
    (["--image", "{missing}"], "--image"),
    (["--image", "{garbage}"], "not a readable image"),
    (["--image", "{photo}", "--strength", "0"], "--strength 0.0: must be a number in (0, 1]"),
    (["--image", "{photo}", "--strength", "1.5"], "--strength 1.5: must be a number in (0, 1]"),
    (["--image", "{photo}", "--start-stage", "3"], "--start-stage 3: the plan has stages 1 to 2"),
    (["--image", "{photo}", "--start-stage", "2", "--strength", "0.9"],
     "--strength 0.9 starts at step 1 of 3, in stage 1, not --start-stage 2"),
    (["--strength", "0.5"], "--strength and --start-stage need --image"),
    (["--lora", "{missing}"], "--lora"),
    (["--lora", "{unet_lora}"], "unknown key 'unet.down_blocks.0"),
    (["--lora", "{kohya_sd}"], "a kohya-format file"),
])
def test_bad_image_or_lora_is_one_line_before_the_load(args, needle, photo, tmp_path, capsys, no_model_load):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really")
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "unet.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
              str(tmp_path / "kohya.safetensors"))
    names = {"photo": photo, "missing": tmp_path / "nope.png", "garbage": tmp_path / "garbage.png",
             "unet_lora": tmp_path / "unet.safetensors", "kohya_sd": tmp_path / "kohya.safetensors"}
    out = tmp_path / "out.png"
    rc = main(["--model", "tiny-sd3", *FLOW_PLAN, *(a.format(**names) for a in args), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("mf-generate: error: ") and needle in err, err
    assert not out.exists()


def test_transformer_lora_given_to_a_unet_family_is_one_line(tmp_path, capsys):
    lora = _dit_lora("tiny-sd3", tmp_path / "sd3.safetensors")
    out = tmp_path / "x.png"
    assert main(["--model", "tiny-sd15", "--prompt", "x", "--stages", "128x128:1", "--no-progress", "--device", "cpu",
                 "--lora", str(lora), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mf-generate: error: --lora ") and "unknown key" in err, err
    assert not out.exists()


def test_onnxruntime_transformer_engines_refuse_a_lora(tmp_path, capsys):
    """ONNX Runtime transformer engines declare no LoRA (`takes_lora`): the build and the run refuse --lora in one
    line, before any model load or engine work, naming the aoti way."""
    from megafusion.cli.build_engines import main as build

    lora = _dit_lora("tiny-sd3", tmp_path / "style.safetensors")
    rc = build(["--model", "tiny-sd3", "--backend", "onnxruntime", "--lora", str(lora), "--device", "cpu",
                "--output", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "--lora: onnxruntime tiny-sd3 engines take no LoRA" in err and "--backend aoti" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
