"""`mf-serve --engines` loads only what runs in torch (issue #15): the networks engines serve at every served
size are built on the meta device without weights, as mf-generate --engines builds them, and the PNG bytes stay
mf-generate --engines' (tests/serve/test_model.py checks them on the same kind of server)."""
from __future__ import annotations

import pytest

from megafusion.core.loading import component_modules
from megafusion.serve.config import ServeConfig

pytestmark = pytest.mark.slow
STAGES = "128x128:2,192x192:1,256x256:1"
"""The shapes of tiny-sd15's default plan at 256x256, which the server warms up (fewer steps)."""


@pytest.fixture(scope="module")
def default_engines(tiny_sd15, tmp_path_factory):
    """Engines for the default plan's three stage shapes (the session's sd15_engines cover 128 and 256 only)."""
    from tests.engines import build

    out = tmp_path_factory.mktemp("engines-sd15-default")
    build(tiny_sd15, out, stages=STAGES)
    return out


def test_engine_served_networks_load_without_weights(default_engines, tmp_path, capsys):
    sd15_engines = default_engines
    from megafusion.cli.generate import main
    from megafusion.serve.app import _loaded_line
    from megafusion.serve.model import ModelServer, engine_modules
    from megafusion.serve.request import parse_request

    cfg = ServeConfig("tiny-sd15", engines=str(sd15_engines), sizes=((256, 256),))
    server = ModelServer(cfg)
    skipped = server.bundle.skipped
    assert skipped and skipped == engine_modules(cfg, server.family)
    modules = component_modules(server.bundle)
    for name in skipped:
        assert all(t.device.type == "meta" for t in modules[name].parameters()), name
    for name in set(modules) - skipped:
        assert all(t.device.type == "cpu" for t in modules[name].parameters()), name
    info = server.describe()
    assert info["weights_in_torch"] == [n for n in modules if n not in skipped]
    assert _loaded_line(info).startswith(f"weights in torch: {', '.join(info['weights_in_torch']) or 'none'}; "
                                         "engines run the rest")
    # what mf-generate --engines leaves in torch for the same plan is what the server leaves
    out = tmp_path / "ref.png"
    assert main(["--model", "tiny-sd15", "--engines", str(sd15_engines), "--prompt", "a cube", "--stages",
                 STAGES, "--seed", "5", "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"(weights in torch: {', '.join(info['weights_in_torch']) or 'none'}; engines run the rest)" in said
    got = server.generate(parse_request({"prompt": "a cube", "stages": STAGES, "seed": 5},
                                        server.family))
    assert got.png == out.read_bytes()


def test_an_empty_engine_folder_skips_nothing(tmp_path):
    from megafusion.core.families import get_family
    from megafusion.serve.model import engine_modules

    cfg = ServeConfig("tiny-sd15", engines=str(tmp_path), sizes=((256, 256),))
    assert engine_modules(cfg, get_family("tiny-sd15")) == frozenset()  # the warm-up then refuses it by name


def test_lora_is_swapped_into_the_engines_as_mf_generate_does(sd15_engines, tmp_path, capsys):
    """--engines --lora: the model loads whole (the swap reads its base weights) and the LoRA is swapped into each
    engine set when it is opened; the PNG is mf-generate --engines --lora's."""
    from tests.core.test_lora import _random_lora, save_diffusers

    from megafusion.cli.generate import main
    from megafusion.core.loading import load_model
    from megafusion.serve.model import ModelServer
    from megafusion.serve.request import parse_request

    lora = save_diffusers(_random_lora(load_model("tiny-sd15"), seed=3), tmp_path / "l.safetensors")
    server = ModelServer(ServeConfig("tiny-sd15", engines=str(sd15_engines), sizes=((256, 256),),
                                     loras=(f"{lora}:0.7",)))
    assert not server.bundle.skipped
    body = {"prompt": "a cube", "stages": "128x128:2,256x256:2", "seed": 5}
    got = server.generate(parse_request(body, server.family)).png
    out = tmp_path / "ref.png"
    args = ["--model", "tiny-sd15", "--engines", str(sd15_engines), "--prompt", "a cube", "--stages",
            "128x128:2,256x256:2", "--seed", "5", "--device", "cpu", "--no-progress"]
    assert main([*args, "--lora", f"{lora}:0.7", "--output", str(out)]) == 0
    assert "lora swapped into" in capsys.readouterr().out
    assert got == out.read_bytes()
    assert main([*args, "--output", str(tmp_path / "base.png")]) == 0
    assert got != (tmp_path / "base.png").read_bytes()  # the swap changed the image
