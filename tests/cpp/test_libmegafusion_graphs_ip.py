"""libmegafusion's IP-Adapter inside the whole-step CUDA graph (GPU): one capture per stage descriptor over two
generations (the embeddings are a buffer the graph reads), and the graphed image within 2 levels of the same library
with graphs off and of Python's `mf-generate --engines --ip-adapter` on the same packages and embeddings.

Builds libmegafusion with CUDA, tiny-sd15 AOTInductor packages on the GPU, a tiny IP-Adapter's unet_ip ones and the
tiny image encoder's (the image path, mf_inputs_set_ip_adapter_image); skipped without CUDA (tests/conftest.py) or
nvcc. Passed on the H200 (benchmarks/results/h200-2026-12-04b).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.runtime.tokens import format_ids, load_tokenizers

from ..conftest import AOTI_STAGES, IP_SCALE
from .test_libmegafusion_graphs import COUNTERS, GRAPH_TOL, _max_diff, _run
from .test_libmegafusion_ip import plain_then_ip

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def ip_cuda(sd15_aoti_cuda, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(engine folder, IP-Adapter file, image encoder folder, reference image)."""
    from megafusion.cli.build_engines import main as build_main
    from megafusion.core.loading import load_model
    from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter

    root = tmp_path_factory.mktemp("cuda-ip")
    out = root / "engines"
    shutil.copytree(sd15_aoti_cuda, out)
    ip = save_ip_adapter(tiny_ip_adapter(load_model("tiny-sd15").unet, seed=3), root / "ip.safetensors")
    enc = save_tiny_image_encoder(root / "encoder")
    ref = root / "ref.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(ref)
    assert build_main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--device", "cuda",
                       "--ip-adapter", str(ip), "--ip-adapter-scale", str(IP_SCALE), "--ip-adapter-encoder",
                       str(enc), "--networks", "unet_ip,image_encoder", "--output", str(out)]) == 0
    return out, ip, enc, ref


def _cpp(build: Path, engines: Path, embeds: Path, tmp: Path, *flags) -> tuple[np.ndarray, tuple]:
    ids = tmp / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), "a red cube", "blurry"))
    png = tmp / "cpp.png"
    r = _run([build / "cpp" / "mf-generate-cpp", "--engines", engines, "--model", "tiny-sd15", "--ids", ids,
              "--stages", AOTI_STAGES, "--seed", 3, "--device", "cuda", "--repeats", 2, "--output", png,
              "--ip-adapter-embeds", embeds, *flags])
    assert r.returncode == 0, r.stderr
    m = COUNTERS.search(r.stdout)
    return np.asarray(Image.open(png).convert("RGB")), (m.group(1), int(m.group(2)), int(m.group(3)))


def _embeds(enc: Path, ref: Path) -> np.ndarray:
    """The reference image's image embeddings from the tiny encoder on the GPU, flat float32."""
    import torch

    from megafusion.runtime.ipadapter import encode_ip_image, load_image_encoder

    encoder, proc = load_image_encoder(enc, "cuda", torch.float32)
    return encode_ip_image(encoder, proc, Image.open(ref).convert("RGB"), "cuda").reshape(-1).cpu().numpy()


def test_ip_graphs_count_and_match(cuda_build, ip_cuda, tmp_path):
    from megafusion.cli import generate as gen_cli

    out, ip, enc, ref = ip_cuda
    embeds = _embeds(enc, ref)
    np.save(tmp_path / "e.npy", embeds.astype("<f4"))
    graphed, (on, captures, replays) = _cpp(cuda_build, out, tmp_path / "e.npy", tmp_path)
    plain, (off, _, _) = _cpp(cuda_build, out, tmp_path / "e.npy", tmp_path, "--no-graphs")
    assert (on, captures, replays) == ("on", 2, 2 * 4)  # two stage descriptors, captured once for two generations
    assert off == "off" and graphed.std() > 5
    assert _max_diff(graphed, plain) <= GRAPH_TOL
    py = tmp_path / "py.png"
    assert gen_cli.main(["--model", "tiny-sd15", "--engines", str(out), "--stages", AOTI_STAGES, "--prompt",
                         "a red cube", "--negative-prompt", "blurry", "--seed", "3", "--device", "cuda",
                         "--no-progress", "--ip-adapter", str(ip), "--ip-adapter-scale", str(IP_SCALE),
                         "--ip-adapter-image", str(ref), "--ip-adapter-encoder", str(enc), "--output", str(py)]) == 0
    assert _max_diff(graphed, np.asarray(Image.open(py).convert("RGB"))) <= GRAPH_TOL


def test_plain_then_ip_in_one_context_capture_apart(cuda_build, ip_cuda):
    """One context runs the plain UNet, then the IP-Adapter: the adapter's fingerprint is part of the stage
    descriptor's text (StepGraphs::run_stage), so the IP generation captures graphs of its own instead of replaying
    the plain ones, and gives the same context's graphs-off IP image."""
    from .flow_capi import Library

    out, _, enc, ref = ip_cuda
    lib = Library(next(cuda_build.rglob("libmegafusion.so")))
    plain, graphed, off, counters = plain_then_ip(lib, out, "cuda", _embeds(enc, ref))
    assert counters == (4, 2 * 4)  # two stage descriptors each for plain and IP, one generation each
    assert _max_diff(graphed, off) <= GRAPH_TOL
    assert _max_diff(graphed, plain) > 10  # a replayed plain graph would have given the plain image


def test_ip_image_in_graphs_equals_embeds(cuda_build, ip_cuda, tmp_path):
    """mf-generate-cpp --ip-adapter-image on CUDA: the image encoder package runs before the graphs (the same two
    captures), and the image is the embeddings' within GRAPH_TOL (the C++ pixels within 2 levels of transformers')."""
    out, _, enc, ref = ip_cuda
    np.save(tmp_path / "e.npy", _embeds(enc, ref).astype("<f4"))
    by_embeds, _ = _cpp(cuda_build, out, tmp_path / "e.npy", tmp_path)
    Image.open(ref).convert("RGB").save(tmp_path / "ref.ppm")
    png = tmp_path / "image.png"
    r = _run([cuda_build / "cpp" / "mf-generate-cpp", "--engines", out, "--model", "tiny-sd15", "--ids",
              tmp_path / "ids.txt", "--stages", AOTI_STAGES, "--seed", 3, "--device", "cuda", "--repeats", 2,
              "--output", png, "--ip-adapter-image", tmp_path / "ref.ppm"])
    assert r.returncode == 0, r.stderr
    m = COUNTERS.search(r.stdout)
    assert (m.group(1), int(m.group(2)), int(m.group(3))) == ("on", 2, 2 * 4)
    assert _max_diff(np.asarray(Image.open(png).convert("RGB")), by_embeds) <= GRAPH_TOL
