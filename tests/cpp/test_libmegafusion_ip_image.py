"""libmegafusion's IP-Adapter from the image (issue #18 item 2; mf_inputs_set_ip_adapter_image,
mf_ip_adapter_image_embeds, mf-generate-cpp --ip-adapter-image): the folder's image encoder package
(`mf-build-engines --ip-adapter FILE --ip-adapter-encoder DIR`) on pixel values made in C++ as CLIPImageProcessor
makes them.

Reference: runtime/ipadapter.py encode_ip_image (the torch encoder on transformers' pixels). Tolerances: the
embeddings within EMBED_ATOL (the C++ pixels are within 2 levels of 255 of transformers', tests/cpp/
test_clip_pixels.py; measured on the tiny encoder: see EMBED_ATOL); a whole generation with the image within
IMAGE_TOL of the same generation with the torch encoder's embeddings and of Python's mf-generate --engines image.
Every refusal is one line, before any network runs. Reuses the session's `sd15_ip_aoti` folder and `ip_case`
(tests/cpp/conftest.py): no build of its own.
"""
from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.runtime.conditioning import token_ids
from megafusion.runtime.ipadapter import encode_ip_image, load_image_encoder
from megafusion.runtime.tokens import load_tokenizers

from ..conftest import AOTI_STAGES
from .conftest import NEGATIVE, PROMPT, SEED
from .test_libmegafusion import IMAGE_TOL, _run

pytestmark = pytest.mark.slow

EMBED_ATOL = 5e-3
"""Largest allowed difference per embedding value (tiny random encoder, values of magnitude about 2.6); measured on
the images below: 0.0016 (the pixels' 1-2 level differences; the package itself is within 5e-7 of torch)."""


def _ids():
    tok = load_tokenizers("tiny-sd15")[0]
    ids = [(ctypes.c_int32 * 77)(*(int(t) for t in token_ids(tok, text, "cpu")[0])) for text in (PROMPT, NEGATIVE)]
    ptr = lambda a: (ctypes.POINTER(ctypes.c_int32) * 2)(ctypes.cast(a, ctypes.POINTER(ctypes.c_int32)), None)
    return {"prompt_ids": ptr(ids[0]), "negative_ids": ptr(ids[1]), "keep": ids}


@pytest.fixture(scope="module")
def ctx(lib, ip_case):
    status, ctx = lib.open(ip_case["engines"], "tiny-sd15")
    assert status == 0, lib.error()
    yield ctx
    lib.lib.mf_context_destroy(ctx)


def _rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_image_embeds_equal_the_torch_encoder(lib, ctx, ip_case):
    """Downscales, an upscale, odd sizes, both orientations."""
    enc, proc = load_image_encoder(ip_case["encoder"], "cpu", torch.float32)
    n = ip_case["embeds"].size
    worst = 0.0
    for rgb in (ip_case["ref"], _rgb(4, 300, 200), _rgb(5, 17, 33), _rgb(6, 517, 1023), _rgb(7, 32, 32)):
        rc, got = lib.image_embeds(ctx, rgb, n)
        assert rc == 0, got
        ref = encode_ip_image(enc, proc, Image.fromarray(rgb), "cpu").reshape(-1).numpy()
        assert np.abs(ref).max() > 0.5
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= EMBED_ATOL, worst
    print(f"largest embedding difference: {worst:.3g}")


def test_generation_with_the_image_equals_with_embeds(lib, ctx, ip_case, cpp_build):
    """The image path, the torch encoder's embeddings and Python's mf-generate --engines agree; mf-generate-cpp
    --ip-adapter-image (a PPM) gives the image path's pixels exactly."""
    ids = _ids()
    rc, by_image = lib.generate(ctx, AOTI_STAGES, SEED, 7.0, {}, ip_image=ip_case["ref"], prompt_ids=ids["prompt_ids"],
                                negative_ids=ids["negative_ids"])
    assert rc == 0, by_image
    rc, by_embeds = lib.generate(ctx, AOTI_STAGES, SEED, 7.0, {}, ip_embeds=ip_case["embeds"],
                                 prompt_ids=ids["prompt_ids"], negative_ids=ids["negative_ids"])
    assert rc == 0, by_embeds
    a, b, py = by_image.astype(int), by_embeds.astype(int), ip_case["py"].astype(int)
    assert py.std() > 5
    assert np.abs(a - b).max() <= IMAGE_TOL and np.abs(a - py).max() <= IMAGE_TOL, (np.abs(a - b).max(),
                                                                                     np.abs(a - py).max())
    tmp = ip_case["tmp"]
    Image.fromarray(ip_case["ref"]).save(tmp / "ref.ppm")
    r = _run([cpp_build / "cpp" / "mf-generate-cpp", "--engines", ip_case["engines"], "--model", "tiny-sd15", "--ids",
              tmp / "ids.txt", "--stages", AOTI_STAGES, "--seed", SEED, "--ip-adapter-image", tmp / "ref.ppm",
              "--output", tmp / "cpp-image.png"])
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp / "cpp-image.png").convert("RGB")), by_image)


def _refused(lib, ctx, code: int, needle: str, **inputs) -> None:
    ids = _ids()
    rc, msg = lib.generate(ctx, AOTI_STAGES, SEED, 7.0, {}, prompt_ids=ids["prompt_ids"],
                           negative_ids=ids["negative_ids"], **inputs)
    assert rc == code and isinstance(msg, str) and "\n" not in msg and needle in msg, (rc, msg)


def test_refusals(lib, ctx, ip_case, tmp_path):
    ref, n = ip_case["ref"], ip_case["embeds"].size
    _refused(lib, ctx, 1, "IP-Adapter image: size 0x40", ip_image=ref[:, :0])
    _refused(lib, ctx, 1, "IP-Adapter image: these inputs hold IP-Adapter embeds already; give the image or the "
                          "embeds, not both", ip_image=ref, ip_embeds=ip_case["embeds"])  # embeds set first
    _refused(lib, ctx, 1, "IP-Adapter image with ControlNets: the unet_ip engines take no ControlNet residuals",
             ip_image=ref, controls=(("edges", ref, 1.0, 0.0, 1.0),))
    rc, msg = lib.image_embeds(ctx, ref, n - 1)
    assert rc == 1 and msg == (f"IP-Adapter embeds: room for {n - 1} floats given, the unet_ip engines in "
                               f"{ip_case['engines']} take {n} (the image encoder's projection dim)"), msg
    # A folder whose unet_ip packages have no image encoder beside them (its entry dropped from the manifest).
    out = tmp_path / "engines"
    shutil.copytree(ip_case["engines"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["entries"] = [e for e in manifest["entries"] if e["key"]["network"] != "image_encoder"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    status, bare = lib.open(out, "tiny-sd15")
    assert status == 0, lib.error()
    try:
        _refused(lib, bare, 3, f"no image_encoder (IP-Adapter image encoder) aoti engine of {n} features for "
                               f"tiny-sd15 in {out}; build it with: mf-build-engines --model tiny-sd15",
                 ip_image=ref)
        _refused(lib, bare, 3, "--ip-adapter-encoder <its CLIP vision model folder>", ip_image=ref)
        rc, _ = lib.generate(bare, AOTI_STAGES, SEED, 7.0, {}, ip_embeds=ip_case["embeds"], **{
            k: v for k, v in _ids().items() if k != "keep"})
        assert rc == 0  # the embeds need no encoder
    finally:
        lib.lib.mf_context_destroy(bare)
