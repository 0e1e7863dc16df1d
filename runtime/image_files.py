"""Images users give as files (a photo to start from, a control image): read once, checked, as RGB tensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def read_rgb(path: str | Path, flag: str, error: type[Exception]) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 in [0, 1] (RGB, alpha dropped); `error` names `flag` and the file when
    it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise error(f"{flag} {str(path)!r}: no such file")
    try:
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise error(f"{flag} {str(path)!r}: not a readable image ({e})") from None
    return torch.from_numpy(rgb / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()
