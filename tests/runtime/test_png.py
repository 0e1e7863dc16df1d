"""The PNG every path writes and serves (runtime/pipeline.py encode_png): lossless, and compressed (zlib level 1,
chosen for latency: PNG_COMPRESS_LEVEL's note has the measured times)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from megafusion.runtime.pipeline import PNG_COMPRESS_LEVEL, encode_png


def test_png_is_lossless_and_compressed():
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((256, 192), Image.BICUBIC))  # smooth, as images are
    data = encode_png(image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), image)
    stored = io.BytesIO()
    Image.fromarray(image).save(stored, format="PNG", compress_level=0)
    assert PNG_COMPRESS_LEVEL >= 1 and len(data) < 0.8 * len(stored.getvalue())
