"""The fused relay kernel (runtime/kernels/relay_bicubic.cu, runtime/fused_relay.py).

CPU: the formula the kernel implements equals torch's bicubic; the fallback is the torch relay; NVRTC (and
nvcc, where present) compile the source. GPU (@gpu, on the lent GPU): the kernel equals torch within rounding.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megafusion.runtime import fused_relay
from megafusion.runtime.fused_relay import relay_resize, torch_relay_resize
from megafusion.runtime.relay import relay, resize_clamped

# (in_h, in_w) -> (out_h, out_w): odd 2x, 1.5x, non-square mixed up/down, pure downscale.
SIZES = [((77, 131), (154, 262)), ((50, 70), (75, 105)), ((131, 77), (50, 90)), ((96, 80), (40, 33))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL_DIR = Path(fused_relay.__file__).parent / "kernels"


# --------------------------------------------------------------------------------------- float64 reference
def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of Keys cubic (a = -0.75) weights, half-pixel centres, border-clamped taps."""
    a = -0.75

    def keys(d: np.ndarray) -> np.ndarray:
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(np.int64)
    m = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        np.add.at(m, (np.arange(n_out), np.clip(base + k, 0, n_in - 1)), keys(src - (base + k)))
    return m


def bicubic_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float64 bicubic of (N, C, H, W), separable: rows then columns."""
    mh, mw = _cubic_matrix(x.shape[2], out_h), _cubic_matrix(x.shape[3], out_w)
    return np.einsum("oh,nchw,pw->ncop", mh, x, mw)


@pytest.mark.parametrize(("src", "dst"), SIZES)
def test_reference_formula_equals_torch_bicubic(src, dst):
    x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(src[0] * dst[1]), dtype=torch.float64) * 2
    expected = F.interpolate(x, size=dst, mode="bicubic", align_corners=False)
    np.testing.assert_allclose(bicubic_reference(x.numpy(), *dst), expected.numpy(), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ CPU fallback
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(("src", "dst"), SIZES[:2])
def test_fallback_is_the_torch_relay(src, dst, out_dtype):
    x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(7)) * 2
    expected = resize_clamped(x, *dst).to(out_dtype)
    got = relay_resize(x, *dst, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, expected)
    buffer = torch.empty(2, 3, *dst, dtype=out_dtype)
    assert relay_resize(x, *dst, out_dtype, out=buffer) is buffer and torch.equal(buffer, expected)
    assert torch.equal(torch_relay_resize(x, *dst, out_dtype), expected)


class _FakeVae:
    """Networks stand-in: decode doubles (so values leave [-1, 1]), encode records its input."""

    vae_dtype = torch.bfloat16

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * 2.0

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images
        return images.float()


def test_pixel_relay_hands_the_encoder_its_dtype():
    nets, x0 = _FakeVae(), torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(3))
    out = relay(nets, x0, 18, 22, scaling=0.5, vae_scale=8)
    expected = resize_clamped(x0 / 0.5 * 2.0, 18, 22).to(torch.bfloat16)
    assert nets.seen.dtype == torch.bfloat16 and torch.equal(nets.seen, expected)
    assert torch.equal(out, expected.float() * 0.5)


# ----------------------------------------------------------------------------------- compile (no GPU)
def _need_nvrtc() -> None:
    if not fused_relay.nvrtc_available():
        pytest.skip("NVRTC not importable: pip install 'cuda-python>=13,<14' 'nvidia-cuda-nvrtc>=13,<14'")


@pytest.mark.parametrize("arch", [90, 75])  # 75: the pre-Ampere bf16 rounding path
def test_nvrtc_compiles_every_entry_point(arch):
    _need_nvrtc()
    cubin = fused_relay.compile_source(fused_relay.kernel_source(), arch)
    assert cubin[:4] == b"\x7fELF"
    for name in fused_relay.entry_names():
        assert name.encode() in cubin, name


def test_unknown_arch_gets_ptx_the_driver_can_jit():
    _need_nvrtc()
    ptx = fused_relay.compile_source(fused_relay.kernel_source(), 999).decode()
    assert ".entry mf_relay_bicubic_f32_f16" in ptx and ".target sm_" in ptx


def test_binary_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    _need_nvrtc()
    monkeypatch.setenv("MEGAFUSION_CACHE", str(tmp_path))
    first = fused_relay.cached_binary(90)
    (path,) = (tmp_path / "kernels").glob("relay_bicubic-sm90-*.bin")
    assert path.read_bytes() == first and not list(path.parent.glob("*.tmp"))

    def no_compile(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(fused_relay, "compile_source", no_compile)
    assert fused_relay.cached_binary(90) == first  # read back, not recompiled
    with pytest.raises(AssertionError, match="cache miss"):  # another source is another key
        fused_relay.cached_binary(90, source=fused_relay.kernel_source() + "\n// changed\n")


def test_compile_error_raises_with_the_log():
    _need_nvrtc()
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC failed.*undefined_thing"):
        fused_relay.compile_source('extern "C" __global__ void k() { undefined_thing(); }', 90)


def test_nvcc_builds_the_host_launcher(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: the C++ launcher (CMake build) is only compiled where CUDA is installed")
    cmd = [nvcc, "-arch=sm_90", "-c", str(KERNEL_DIR / "relay_bicubic.cu"), "-o", str(tmp_path / "relay.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# The .cu compiled for the host (g++): its indexing and arithmetic, run on the CPU against torch. The PTX
# half conversions are stubbed out, so only the fp32/bf16 entry points are exercised here.
HOST_HARNESS = r"""
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
struct MfDim3 { unsigned x, y, z; };
static MfDim3 blockIdx, threadIdx, blockDim;
template <typename T> T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
using std::max; using std::min;
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
#define __CUDACC_RTC__
#define asm(...) (void)0
#include "relay_bicubic.cu"
typedef void (*Fn)(const void*, void*, int, int, int, int);
int main(int argc, char** argv) {
  const int pair = atoi(argv[1]), planes = atoi(argv[2]), ih = atoi(argv[3]), iw = atoi(argv[4]);
  const int oh = atoi(argv[5]), ow = atoi(argv[6]);
  const Fn fns[4] = {(Fn)mf_relay_bicubic_f32_f32, (Fn)mf_relay_bicubic_f32_bf16, (Fn)mf_relay_bicubic_bf16_f32,
                     (Fn)mf_relay_bicubic_bf16_bf16};
  const size_t in_size = (pair < 2 ? 4 : 2), out_size = (pair % 2 ? 2 : 4);
  std::vector<char> in(in_size * planes * ih * iw), out(out_size * planes * oh * ow);
  FILE* f = fopen(argv[7], "rb"); if (fread(in.data(), 1, in.size(), f) != in.size()) return 1; fclose(f);
  blockDim = {128, 1, 1};
  for (unsigned z = 0; z < (unsigned)planes; ++z)
    for (unsigned y = 0; y < (unsigned)oh; ++y)
      for (unsigned bx = 0; bx < (unsigned)(ow + 127) / 128; ++bx)
        for (unsigned tx = 0; tx < 128; ++tx) {
          blockIdx = {bx, y, z}; threadIdx = {tx, 0, 0};
          fns[pair](in.data(), out.data(), ih, iw, oh, ow);
        }
  f = fopen(argv[8], "wb"); fwrite(out.data(), 1, out.size(), f); fclose(f);
  return 0;
}
"""
HOST_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
              (torch.bfloat16, torch.bfloat16)]


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernel source for the host")
    folder = tmp_path_factory.mktemp("host_kernel")
    (folder / "harness.cpp").write_text(HOST_HARNESS)
    cmd = [cxx, "-O1", "-w", "-std=c++17", "-I", str(KERNEL_DIR), str(folder / "harness.cpp"), "-o", str(folder / "k")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder / "k"


@pytest.mark.parametrize(("in_dtype", "out_dtype"), HOST_PAIRS, ids=["f32-f32", "f32-bf16", "bf16-f32", "bf16-bf16"])
@pytest.mark.parametrize(("src", "dst"), SIZES)
def test_kernel_source_on_host_matches_torch(host_kernel, tmp_path, src, dst, in_dtype, out_dtype):
    x = (torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(sum(src) + sum(dst))) * 1.5).to(in_dtype)
    bits = torch.int32 if in_dtype == torch.float32 else torch.int16
    (tmp_path / "in.bin").write_bytes(x.contiguous().view(bits).numpy().tobytes())
    args = [HOST_PAIRS.index((in_dtype, out_dtype)), 6, *src, *dst, tmp_path / "in.bin", tmp_path / "out.bin"]
    subprocess.run([str(host_kernel), *map(str, args)], check=True)
    raw = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.int32 if out_dtype == torch.float32 else np.int16)
    got = torch.from_numpy(raw.copy()).view(out_dtype).reshape(2, 3, *dst)
    exact = torch_relay_resize(x.float(), *dst, torch.float32)
    # fp32: a 1-ulp difference in the source coordinate (FMA contraction or not) moves values by ~1e-5 here.
    torch.testing.assert_close(got.float(), exact, rtol=0, atol=3e-5 if out_dtype == torch.float32 else 8e-3)
    if out_dtype == torch.bfloat16:  # software round-to-nearest-even: all but boundary cases equal torch's cast
        assert (got == exact.to(out_dtype)).float().mean() > 0.99


# ------------------------------------------------------------------------------------------- GPU
# ~ one output ulp near |1|; fp32 allows for a 1-ulp different source coordinate (FMA contraction) instead.
ULP_AT_ONE = {torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
PAIRS = [(i, o) for i in DTYPES for o in DTYPES]


def _gpu_input(src: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    _need_nvrtc()
    x = torch.randn(2, 3, *src, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda") * 1.5
    assert (x.abs() > 1).float().mean() > 0.3  # clamping matters
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(("in_dtype", "out_dtype"), PAIRS, ids=[f"{i}-{o}".replace("torch.", "") for i, o in PAIRS])
@pytest.mark.parametrize(("src", "dst"), SIZES)
def test_kernel_matches_torch(src, dst, in_dtype, out_dtype):
    x = _gpu_input(src, in_dtype, seed=100 * SIZES.index((src, dst)) + PAIRS.index((in_dtype, out_dtype)))
    assert fused_relay.kernel_supported(x, out_dtype)
    out = torch.full((2, 3, *dst), float("nan"), dtype=out_dtype, device="cuda")  # poisoned
    assert relay_resize(x, *dst, out_dtype, out=out) is out
    torch.cuda.synchronize()
    assert not out.isnan().any(), "kernel left output elements unwritten"
    assert out.abs().max() <= 1
    # Same input values, resized in float32 by torch: only the final cast to out_dtype may differ.
    exact = torch_relay_resize(x.float(), *dst, torch.float32)
    torch.testing.assert_close(out.float(), exact, rtol=0, atol=ULP_AT_ONE[out_dtype])
    # The torch relay at these dtypes (it rounds to in_dtype before the cast): within both roundings.
    tol = 2 * max(ULP_AT_ONE[in_dtype], ULP_AT_ONE[out_dtype])
    torch.testing.assert_close(out.float(), torch_relay_resize(x, *dst, out_dtype).float(), rtol=0, atol=tol)


@pytest.mark.gpu
def test_kernel_same_size_is_clamp_and_cast():
    x = _gpu_input((33, 47), torch.float32, seed=11)
    torch.testing.assert_close(relay_resize(x, 33, 47, torch.float16), x.clamp(-1, 1).half(), rtol=0, atol=0)


@pytest.mark.gpu
def test_kernel_runs_on_the_current_stream_and_takes_strided_input():
    x = _gpu_input((77, 131), torch.float16, seed=5).to(memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = relay_resize(x, 154, 262, torch.float16)
    stream.synchronize()
    expected = torch_relay_resize(x.float(), 154, 262, torch.float16)
    torch.testing.assert_close(got, expected, rtol=0, atol=ULP_AT_ONE[torch.float16])


@pytest.mark.gpu
def test_kernel_is_captured_by_cuda_graphs():
    fused_relay.load(torch.cuda.current_device())  # compile + load outside capture
    static_in = _gpu_input((64, 64), torch.float32, seed=1)
    static_out = torch.empty(2, 3, 96, 96, dtype=torch.float16, device="cuda")
    relay_resize(static_in, 96, 96, torch.float16, out=static_out)  # warm-up on the capture stream's side
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        relay_resize(static_in, 96, 96, torch.float16, out=static_out)
    static_in.copy_(_gpu_input((64, 64), torch.float32, seed=2))
    graph.replay()
    torch.cuda.synchronize()
    expected = torch_relay_resize(static_in, 96, 96, torch.float16)
    torch.testing.assert_close(static_out, expected, rtol=0, atol=ULP_AT_ONE[torch.float16])


@pytest.mark.gpu
def test_out_buffer_is_checked():
    x = _gpu_input((16, 16), torch.float32, seed=3)
    with pytest.raises(ValueError, match="out must be"):
        relay_resize(x, 32, 32, torch.float16, out=torch.empty(2, 3, 32, 32, device="cuda"))
