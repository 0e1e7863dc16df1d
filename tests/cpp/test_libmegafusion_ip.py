"""libmegafusion's IP-Adapter (issue #18 item 5; mf_inputs_set_ip_adapter_embeds): with the reference image's CLIP
image embeddings, the C API gives Python's `mf-generate --engines --ip-adapter` image within 1 level of 255 on the
same tiny-sd15 packages, ids and seed, and an image clearly unlike the plain one; a folder, plan or embedding length
the unet_ip packages do not serve is one line naming it and the command that builds them, before any network runs.

The caller computes the embeddings (here with the tiny image encoder, as mf-generate does) and mf-generate-cpp reads
them (--ip-adapter-embeds, .npy or raw float32). The unet_ip packages (standard and dilated: two compiles, about a
minute on two cores) are built into a copy of the session's tiny-sd15 folder (tests/conftest.py `sd15_ip_aoti`),
and the case (`ip_case`) is tests/cpp/conftest.py's. The image path (mf_inputs_set_ip_adapter_image) is
tests/cpp/test_libmegafusion_ip_image.py's.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.runtime.conditioning import token_ids
from megafusion.runtime.tokens import load_tokenizers

from ..conftest import AOTI_STAGES
from .conftest import NEGATIVE, PROMPT, SEED  # ip_case's generation (tests/cpp/conftest.py)
from .test_libmegafusion import IMAGE_TOL, _run

pytestmark = pytest.mark.slow


def _cpp(build: Path, case: dict, *flags, engines: Path | None = None):
    png = case["tmp"] / "cpp.png"
    png.unlink(missing_ok=True)
    r = _run([build / "cpp" / "mf-generate-cpp", "--engines", engines or case["engines"], "--model", "tiny-sd15",
              "--ids", case["tmp"] / "ids.txt", "--stages", AOTI_STAGES, "--seed", SEED, "--output", png, *flags])
    return (np.asarray(Image.open(png).convert("RGB")).astype(int) if r.returncode == 0 else None), r


@pytest.mark.parametrize("flags", [["--ip-adapter-embeds", "e.npy"], ["--ip-adapter-embeds", "e.f32", "--no-graphs"]])
def test_ip_embeds_equal_python_and_act(cpp_build, ip_case, flags):
    flags = [str(ip_case["tmp"] / f) if f.startswith("e.") else f for f in flags]
    cpp, r = _cpp(cpp_build, ip_case, *flags)
    assert r.returncode == 0, r.stderr
    py = ip_case["py"].astype(int)
    assert py.std() > 5  # a real image, not two blank ones agreeing
    assert np.abs(cpp - py).max() <= IMAGE_TOL, np.abs(cpp - py).max()
    plain, r = _cpp(cpp_build, ip_case, *[f for f in flags if f == "--no-graphs"])
    assert r.returncode == 0, r.stderr
    assert np.abs(cpp - plain).max() > 10  # the IP-Adapter acts


def _one_line(r, code: int, *needles: str) -> None:
    assert r.returncode == code and r.stderr.count("\n") == 1, (r.returncode, r.stderr)
    for n in needles:
        assert n in r.stderr, r.stderr


def test_ip_refusals_name_the_value_before_any_work(cpp_build, ip_case, sd15_aoti):
    tmp = ip_case["tmp"]
    np.save(tmp / "short.npy", ip_case["embeds"][:16].astype("<f4"))
    img, r = _cpp(cpp_build, ip_case, "--ip-adapter-embeds", tmp / "short.npy")
    _one_line(r, 1, f"IP-Adapter embeds: 16 floats given, the unet_ip engines in {ip_case['engines']} take "
                    f"{ip_case['embeds'].size} (the image encoder's projection dim)")
    img, r = _cpp(cpp_build, ip_case, "--ip-adapter-embeds", tmp / "e.npy", engines=sd15_aoti)
    _one_line(r, 3, f"no unet_ip (IP-Adapter) aoti engines for tiny-sd15's UNet in {sd15_aoti}; build them with: "
                    "mf-build-engines --model tiny-sd15", "--ip-adapter <IP-Adapter file> --ip-adapter-scale <S>")
    img, r = _cpp(cpp_build, ip_case, "--ip-adapter-embeds", tmp / "e.npy", "--stages", "128x128:2,192x192:2")
    _one_line(r, 2, "do not cover unet_ip (dilated) fp32 aoti of the IP-Adapter at scale 0.7 at 192x192; they "
                    "cover 256x256. Build them with: mf-build-engines", "--stages 128x128:2,192x192:2",
              "--ip-adapter-scale 0.7")
    np.save(tmp / "nan.npy", np.full(ip_case["embeds"].size, np.nan, dtype="<f4"))
    img, r = _cpp(cpp_build, ip_case, "--ip-adapter-embeds", tmp / "nan.npy")
    _one_line(r, 2, "IP-Adapter embeds: value nan at position 0 is not a finite number")
    (tmp / "odd.f32").write_bytes(b"\0" * 6)
    img, r = _cpp(cpp_build, ip_case, "--ip-adapter-embeds", tmp / "odd.f32")
    _one_line(r, 2, "6 bytes of values, not a positive multiple of 4")


def test_ip_with_a_controlnet_refused_through_the_c_api(lib, ip_case):
    status, ctx = lib.open(ip_case["engines"], "tiny-sd15")
    assert status == 0, lib.error()
    try:
        lines = {ln.split()[0]: [int(x) for x in ln.split()[2:]]  # "prompt 0 ids..." / "negative 0 ids..."
                 for ln in (ip_case["tmp"] / "ids.txt").read_text().splitlines() if ln and not ln.startswith("#")}
        ids = [(ctypes.c_int32 * 77)(*lines[k]) for k in ("prompt", "negative")]
        p_ids = (ctypes.POINTER(ctypes.c_int32) * 2)(ctypes.cast(ids[0], ctypes.POINTER(ctypes.c_int32)), None)
        n_ids = (ctypes.POINTER(ctypes.c_int32) * 2)(ctypes.cast(ids[1], ctypes.POINTER(ctypes.c_int32)), None)
        edges = np.zeros((32, 32, 3), dtype=np.uint8)
        status, msg = lib.generate(ctx, AOTI_STAGES, SEED, 7.0, {}, ip_embeds=ip_case["embeds"], prompt_ids=p_ids,
                                   negative_ids=n_ids, controls=(("edges", edges, 1.0, 0.0, 1.0),))
        assert status == 1 and msg == ("IP-Adapter embeds with ControlNets: the unet_ip engines take no ControlNet "
                                       "residuals; give one or the other"), msg
    finally:
        lib.lib.mf_context_destroy(ctx)


def plain_then_ip(lib, engines: Path, device: str, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                tuple[int, int]]:
    """One context, graphs on, PROMPT / NEGATIVE / SEED at guidance 7: (the plain image, then the IP image, then
    the IP image with graphs off; the graph counters before graphs went off)."""
    tok = load_tokenizers("tiny-sd15")[0]
    ids = [(ctypes.c_int32 * 77)(*(int(t) for t in token_ids(tok, text, "cpu")[0])) for text in (PROMPT, NEGATIVE)]
    ptr = lambda a: (ctypes.POINTER(ctypes.c_int32) * 2)(ctypes.cast(a, ctypes.POINTER(ctypes.c_int32)), None)
    status, ctx = lib.open(engines, "tiny-sd15", device)
    assert status == 0, lib.error()
    try:
        def run(e=None) -> np.ndarray:
            rc, img = lib.generate(ctx, AOTI_STAGES, SEED, 7.0, {}, ip_embeds=e, prompt_ids=ptr(ids[0]),
                                   negative_ids=ptr(ids[1]))
            assert rc == 0, img
            return img.astype(int)

        plain, ip = run(), run(embeds)
        counters = lib.counters(ctx)
        lib.set_graphs(ctx, False)
        return plain, ip, run(embeds), counters
    finally:
        lib.lib.mf_context_destroy(ctx)


def test_plain_then_ip_in_one_context(lib, ip_case):
    """The IP generation after a plain one in the same context is Python's IP image (its own step buffers, not the
    plain UNet's); on the CPU nothing is captured (tests/cpp/test_libmegafusion_graphs_ip.py counts captures)."""
    plain, ip, ip_off, counters = plain_then_ip(lib, ip_case["engines"], "cpu", ip_case["embeds"])
    assert counters == (0, 0)
    py = ip_case["py"].astype(int)
    assert np.abs(ip - py).max() <= IMAGE_TOL and np.abs(ip_off - py).max() <= IMAGE_TOL
    assert np.abs(ip - plain).max() > 10  # the IP-Adapter acts
