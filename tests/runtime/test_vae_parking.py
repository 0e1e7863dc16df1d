"""Parking for the tiled VAE (runtime/vae_parking.py): a parked pass equals the unparked one bit for bit (parking
copies), and while the tiles wait at a GroupNorm nothing of theirs stays on the device: on the meta device, with
core/memory.py's byte count, what is live at each meeting is the output and the statistics, whatever the tiles
hold; a tile function that kept a tensor in a local across the yield would show."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL

import megafusion.runtime.vae_tiling as vt
from megafusion.core.memory import LiveBytes
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.vae_parking import HostParking, ShapeParking
from megafusion.runtime.vae_tiling import TiledVaeNetworks, VaeTiling, tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def vae64(tiny_sdxl):
    return copy.deepcopy(tiny_sdxl.vae).double()


def _latent(h, w, dtype):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _image(h, w, dtype):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2), dtype=dtype) * 2 - 1


class Counting(HostParking):
    """HostParking that counts its parks and keeps the bytes of its buffers at the end of the pass."""

    def __init__(self, device):
        super().__init__(device)
        self.parks, self.buffer_bytes = 0, 0

    def park(self, held, slot):
        super().park(held, slot)
        self.parks += 1
        assert all(t is None or t.data_ptr() in range(self._buffers[slot].data_ptr(),
                                                      self._buffers[slot].data_ptr() + self._buffers[slot].numel())
                   for t in (held.x, held.h))  # what the tile holds now lives in its host buffer

    def close(self):
        self.buffer_bytes = sum(b.numel() for b in self._buffers.values())
        super().close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parked_equals_unparked_bit_for_bit(tiny_sdxl, vae64, dtype):
    vae = tiny_sdxl.vae if dtype == torch.float32 else vae64
    lat, img = _latent(24, 24, dtype), _image(192, 192, dtype)  # 2 x 2 tiles of 128 pixels
    parking = Counting(torch.device("cpu"))
    parked = tiled_decode(vae, lat, 128, parking)
    assert torch.equal(parked, tiled_decode(vae, lat, 128))
    assert parking.parks > 4 * 10 and parking.buffer_bytes > 0  # every tile parked at every GroupNorm
    assert torch.equal(tiled_encode(vae, img, 128, Counting(torch.device("cpu"))), tiled_encode(vae, img, 128))
    if dtype == torch.float64:  # and still the untiled pass, to float64 rounding
        with torch.inference_mode():
            ref = vae.decode(lat).sample
        assert (parked - ref).abs().max().item() < 1e-10


def test_networks_wrapper_parks_when_asked(tiny_sdxl, monkeypatch):
    nets = TiledVaeNetworks(TorchNetworks(tiny_sdxl), tiny_sdxl.vae, VaeTiling(128, park=True))
    made = []
    monkeypatch.setattr(vt, "HostParking", lambda device: made.append(Counting(device)) or made[-1])
    lat = _latent(16, 24, torch.float32)
    assert torch.equal(nets.vae_decode(lat), tiled_decode(tiny_sdxl.vae, lat, 128).float())
    assert len(made) == 1 and made[0].parks > 0


class Probe(ShapeParking):
    """At each unpark of a tile that had been parked (all other tiles are parked too then), records the bytes
    live on the (meta) device; and the smallest tensor a tile parks."""

    def __init__(self, counter: LiveBytes):
        super().__init__()
        self.counter, self.live_at_meetings, self.smallest = counter, [], None

    def park(self, held, slot):
        sizes = [t.numel() * t.element_size() for t in (held.x, held.h) if t is not None]
        self.smallest = min(sizes + ([self.smallest] if self.smallest else []))
        super().park(held, slot)

    def unpark(self, held, slot):
        if isinstance(held.x, tuple):
            self.live_at_meetings.append(self.counter.live)
        super().unpark(held, slot)


def _meta_vae(tiny_sdxl):
    with torch.device("meta"):
        return AutoencoderKL(**tiny_sdxl.family.vae)


def _live_at_meetings(vae, run, x):
    counter = LiveBytes()
    probe = Probe(counter)
    with torch.inference_mode(), counter:
        out = run(vae, x, 128, probe)
        out_bytes = out.numel() * out.element_size()
    return probe, out_bytes


def test_nothing_stays_on_the_device_while_tiles_wait(tiny_sdxl, monkeypatch):
    vae = _meta_vae(tiny_sdxl)
    stats = 4096  # the tiles' float64 sums and the reply: (1, 32 channels) x 8 bytes, a few per tile, 6 tiles
    lat = torch.zeros(1, 4, 32, 48, device="meta")  # 256x384 pixels: 2 x 3 tiles
    probe, out_bytes = _live_at_meetings(vae, tiled_decode, lat)
    # Live at a meeting: the output the finished cores go to, the post-quant latent, the statistics; no tile.
    assert probe.live_at_meetings and probe.host_peak > 6 * probe.smallest
    assert max(probe.live_at_meetings) <= out_bytes + lat.numel() * 4 + stats
    assert stats < probe.smallest  # so one tile tensor left on the device would break the bound
    img = torch.zeros(1, 3, 256, 384, device="meta")
    probe, _ = _live_at_meetings(vae, tiled_encode, img)
    # Live: the image (the caller's, counted once its tiles are cut from it), the down path's output, statistics.
    down_out = vae.encoder.down_blocks[-1].resnets[-1].conv2.out_channels * 32 * 48 * 4
    assert probe.live_at_meetings and max(probe.live_at_meetings) <= img.numel() * 4 + down_out + stats

    # A tile function that keeps the normalised tensor in a local across the yield leaks it: the probe sees it.
    def leaky(norm, held, tile, src):
        x = getattr(held, src)
        stats = yield vt._core_sums(norm, x, tile)
        held.h = vt._normalised(norm, x, stats)

    monkeypatch.setattr(vt, "_group_norm", leaky)
    probe, out_bytes = _live_at_meetings(vae, tiled_decode, lat)
    assert max(probe.live_at_meetings) > out_bytes + lat.numel() * 4 + 6 * probe.smallest


def test_estimated_host_bytes_are_the_buffers_a_real_pass_allocates(tiny_sdxl):
    lat = _latent(24, 40, torch.float32)
    real = Counting(torch.device("cpu"))
    tiled_decode(tiny_sdxl.vae, lat, 128, real)
    meta = ShapeParking()
    tiled_decode(_meta_vae(tiny_sdxl), lat.to("meta"), 128, meta)
    assert meta.host_peak == real.buffer_bytes > 0


@pytest.mark.gpu
def test_parked_equals_unparked_on_gpu_and_holds_a_fraction_of_the_memory():
    """SDXL's VAE at random weights in bf16, 2048x2048 in 512-pixel tiles (4 x 4): parked equals unparked bit for
    bit (deterministic cuDNN, so that only parking could differ), the buffers are page-locked, and the parked
    pass's peak above its input is under half the unparked one's."""
    from megafusion.core.families import SDXL

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL.vae).to("cuda", torch.bfloat16).eval()
    lat = torch.randn(1, 4, 256, 256, device="cuda", dtype=torch.bfloat16)

    def peak(run):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    class Pinned(HostParking):
        registered = 0

        def close(self):
            Pinned.registered = max(Pinned.registered, len(self._registered))
            super().close()

    unparked, unparked_peak = peak(lambda: tiled_decode(vae, lat, 512))
    parked, parked_peak = peak(lambda: tiled_decode(vae, lat, 512, Pinned(torch.device("cuda"))))
    assert torch.equal(parked, unparked) and Pinned.registered == 16
    assert parked_peak < unparked_peak / 2, (parked_peak, unparked_peak)
    img = unparked.clamp(-1, 1)
    assert torch.equal(tiled_encode(vae, img, 512, Pinned(torch.device("cuda"))), tiled_encode(vae, img, 512))
