"""The IP-Adapter's CLIP image encoder and its image processor, loaded from a folder (the torch path,
runtime/ipadapter.py, and the encoder engine's build, engine/image_encoder_engines.py, both use them: so they live
below both)."""
from __future__ import annotations

from pathlib import Path


class IPAdapterError(ValueError):
    """An IP-Adapter, its image or image encoder that cannot be used; the message names it."""


def read_encoder_config(folder: str | Path):
    """The folder's CLIPVisionConfig (no weights read)."""
    from transformers import CLIPVisionConfig

    if not Path(folder, "config.json").is_file():
        raise IPAdapterError(f"--ip-adapter-encoder {str(folder)!r}: not a CLIP vision model folder (no config.json)")
    try:
        return CLIPVisionConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise IPAdapterError(f"--ip-adapter-encoder {str(folder)!r}: cannot be read "
                             f"({str(e).splitlines()[0]})") from None


def load_image_processor(folder: str | Path):
    """The folder's CLIPImageProcessor: its own config when it has one (preprocessor_config.json), CLIP's defaults
    otherwise."""
    from transformers import CLIPImageProcessor

    p = Path(folder)
    return (CLIPImageProcessor.from_pretrained(str(p)) if (p / "preprocessor_config.json").is_file()
            else CLIPImageProcessor())


def load_image_encoder(folder: str | Path, device, dtype):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) from a folder (`load_image_processor`'s processor)."""
    from transformers import CLIPVisionModelWithProjection

    p = Path(folder)
    if not (p / "config.json").is_file():
        raise IPAdapterError(f"--ip-adapter-encoder {str(folder)!r}: not a CLIP vision model folder (no config.json)")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise IPAdapterError(f"--ip-adapter-encoder {str(folder)!r}: cannot be loaded "
                             f"({str(e).splitlines()[0]})") from None
    return encoder.to(device=device, dtype=dtype).eval(), load_image_processor(p)
