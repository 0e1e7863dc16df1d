"""Server configuration (serve/config.py) and `mf-serve`'s flag errors: one line, status 2, before Ray starts."""
from __future__ import annotations

import sys

import pytest

from megafusion.serve.config import ConfigError, ServeConfig, check_config, parse_sizes


def test_sizes_and_defaults():
    assert parse_sizes("1024x1024,2048x2048,1024x1024") == ((1024, 1024), (2048, 2048))
    assert ServeConfig("tiny-sd15").served_sizes == ((256, 256),)  # the model's default output, as mf-generate
    assert ServeConfig("sdxl", sizes=((1920, 1080),)).served_sizes == ((1920, 1080),)
    cfg = ServeConfig("tiny-sd15", sizes=((256, 256),), replicas=2)
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kw,needle", [
    ({"model": "sd9"}, "unknown model 'sd9'"),
    ({"model_path": "/no/such/dir"}, "--model-path '/no/such/dir': no such folder"),
    ({"engines": "/no/such/dir"}, "--engines '/no/such/dir': no such folder"),
    ({"mode": "graphs"}, "--mode graphs needs --device cuda"),
    ({"device": "tpu"}, "--device 'tpu'"),
    ({"sizes": ((64, 64),)}, "--sizes 64x64: size 64x64 is smaller than"),
    ({"replicas": 0}, "--replicas 0"),
    ({"max_batch": 0}, "--max-batch 0"),
    ({"max_queue": -1}, "--max-queue -1"),
    ({"timeout_s": 0.0}, "--timeout 0.0"),
    ({"timeout_s": float("nan")}, "--timeout nan"),
    ({"port": 70000}, "--port 70000"),
    ({"fp8_scales": "static"}, "--fp8-scales static needs --precision fp8"),
    ({"fp8_scales": "rows"}, "--fp8-scales 'rows': choose token or static"),
])
def test_config_refusals_name_the_flag(kw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        check_config(ServeConfig(**{"model": "tiny-sd15", **kw}))
    assert needle in str(e.value)


@pytest.mark.parametrize("args,needle", [
    ([], "the following arguments are required: --model"),
    (["--model", "sd9"], "unknown model 'sd9'"),
    (["--model", "tiny-sd15", "--sizes", "19x20x"], "malformed size '19x20x'"),
    (["--model", "tiny-sd15", "--sizes", "64x64"], "--sizes 64x64"),
    (["--model", "tiny-sd15", "--replicas", "0"], "--replicas 0"),
    (["--model", "tiny-sd15", "--max-batch", "x"], "argument --max-batch: invalid int value: 'x'"),
    (["--model", "tiny-sd15", "--timeout", "-3"], "--timeout -3.0"),
    (["--model", "tiny-sd15", "--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--model", "tiny-sd15", "--mode", "graphs", "--device", "cpu"], "--mode graphs needs --device cuda"),
    (["--model", "tiny-sd15", "--engines", "/tmp", "--mode", "eager"], "not allowed with argument --engines"),
    (["--model", "tiny-sd15", "--random-weights", "--model-path", "/tmp"], "not allowed with argument"),
    (["--model", "tiny-sd15", "--engines", "/no/such/dir"], "--engines '/no/such/dir': no such folder"),
    (["--model", "tiny-sd15", "--port", "0"], "--port 0"),
    (["--model", "tiny-sd15", "--fp8-scales", "static"], "--fp8-scales static needs --precision fp8"),
])
def test_bad_flags_one_line_status_2_no_ray(args, needle, capsys):
    from megafusion.cli.serve import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mf-serve: error: ") and needle in err[0], err
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_cuda_asked_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from megafusion.cli.serve import main

    assert main(["--model", "tiny-sd15", "--device", "cuda"]) == 2
    assert "this machine has no CUDA device" in capsys.readouterr().err
