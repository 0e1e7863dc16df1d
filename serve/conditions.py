"""A request's extra conditions (image to image, ControlNet images, an IP-Adapter image), checked by the rules
`mf-generate` applies to --image, --strength, --start-stage, --control-image, --control-scale/start/end and
--ip-adapter-image, --ip-adapter-scale (cli/conditions.py). Images come base64 in the JSON body and are decoded
as mf-generate reads its files (runtime/image_files.py), so the same picture gives the same tensor.

No Ray. Every refusal is a `RequestError` naming the field and the value; the ingress answers it 400 before
anything is queued. The ControlNets and the IP-Adapter are the server's (`mf-serve --controlnet`, `--ip-adapter`):
`Offered` says what it has, so a request asking for more is refused here too.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.plan import StagePlan
from ..runtime.img2img import ImageInputError, ImageStart, entry_point

IMAGE_FIELDS = ("image", "strength", "start_stage")
CONTROL_FIELDS = ("control_images", "control_scale", "control_start", "control_end")
IP_FIELDS = ("ip_adapter_image", "ip_adapter_scale")
FIELDS = IMAGE_FIELDS + CONTROL_FIELDS + IP_FIELDS

MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest decoded image accepted (width * height); a larger one is refused before it is decoded."""
IMAGE_FORMATS = ("PNG", "JPEG")


class ConditionError(ValueError):
    """A condition field the server refuses; `field` names it (request.py turns it into a RequestError)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Offered:
    """What the server was started with that requests may use."""

    controlnets: int = 0
    """ControlNets (`--controlnet`, in order): a request gives one control image each, or none."""
    ip_adapter: bool = False
    """An IP-Adapter (`--ip-adapter`): a request may give `ip_adapter_image`."""
    ip_scale: float | None = None
    """With --engines, the scale baked into the unet_ip engines: the only `ip_adapter_scale` taken, and the
    default (None: any scale, default 1.0)."""

    @classmethod
    def of(cls, cfg) -> Offered:
        """What a ServeConfig's server offers."""
        return cls(len(cfg.controlnets), cfg.ip_adapter is not None, cfg.engines_ip_scale)


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet's image and schedule for one request (the ControlNet itself is the server's)."""

    image: torch.Tensor
    """(1, 3, H, W) float32 in [0, 1], as runtime/controlnet.py `read_control_image` gives a file."""
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class Conditions:
    """A request's checked conditions; the empty one is a plain text-to-image request."""

    image: ImageStart | None = None
    controls: tuple[ControlInput, ...] = ()
    ip_image: object | None = None
    """The IP-Adapter's reference image (PIL, RGB), as mf-generate reads --ip-adapter-image."""
    ip_scale: float = 1.0

    @property
    def empty(self) -> bool:
        return self.image is None and not self.controls and self.ip_image is None


def _show(value) -> str:
    """A value as the client wrote it (JSON), shortened: an image's base64 is long."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value) -> float | None:
    """A JSON number as a float; None for anything else (true/false included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def decode_image(field: str, value):
    """A base64 PNG or JPEG (optionally a `data:` URL) as an RGB PIL image; ConditionError names the field."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise ConditionError(field, f"{field} {_show(value)}: expected a base64 PNG or JPEG string")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConditionError(field, f"{field} {_show(value)}: not base64 ({e})") from None
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ConditionError(field, f"{field}: {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} in all")
            return im.convert("RGB")
    except ConditionError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConditionError(field, f"{field}: not a readable PNG or JPEG image ({len(raw)} bytes; {e})") from None


def rgb_tensor(im) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1]: runtime/image_files.py `read_rgb` on the decoded image."""
    rgb = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(rgb / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def _image_start(body: dict, plan: StagePlan, entry_rule=None) -> ImageStart | None:
    strength, start = body.get("strength"), body.get("start_stage")
    if body.get("image") is None:
        if strength is not None or start is not None:
            field = "strength" if strength is not None else "start_stage"
            raise ConditionError(field, f"{field} needs image (the photo to start from)")
        return None
    if strength is not None:
        s = _number(strength)
        if s is None or not (0 < s <= 1):  # nan fails the comparison
            raise ConditionError("strength", f"strength {_show(strength)}: must be a number in (0, 1]")
        strength = s
    if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
        raise ConditionError("start_stage", f"start_stage {_show(start)}: expected a stage number (1-based)")
    try:  # the plan's own rules: a strength that runs no step, a stage outside the plan, or the two disagreeing
        (entry_rule or entry_point)(plan, strength, start)
    except ImageInputError as e:
        text = str(e).replace("--start-stage", "start_stage").replace("--strength", "strength")
        raise ConditionError("start_stage" if text.startswith("start_stage") else "strength", text) from None
    photo = rgb_tensor(decode_image("image", body["image"])) * 2.0 - 1.0  # as runtime/img2img.py `read_image`
    return ImageStart(photo, strength, start)


def _per_net(body: dict, field: str, n: int, default: float) -> list[float]:
    value = body.get(field)
    if value is None:
        return [default] * n
    values = value if isinstance(value, list) else [value]
    if len(values) not in (1, n):
        raise ConditionError(field, f"{field} {_show(value)}: give one number, or a list of one per ControlNet "
                                    f"({n})")
    nums = [_number(v) for v in values]
    if any(x is None or not math.isfinite(x) for x in nums):
        raise ConditionError(field, f"{field} {_show(value)}: expected finite numbers")
    return nums * n if len(nums) == 1 else nums


def _controls(body: dict, offered: Offered) -> tuple[ControlInput, ...]:
    images = body.get("control_images")
    if images is None:
        given = [f for f in CONTROL_FIELDS[1:] if body.get(f) is not None]
        if given:
            raise ConditionError(given[0], f"{given[0]} needs control_images")
        return ()
    n = offered.controlnets
    if not n:
        raise ConditionError("control_images", "control_images: this server has no ControlNet (start mf-serve "
                                               "with --controlnet DIR)")
    if not isinstance(images, list) or len(images) != n:
        got = f"{len(images)} images" if isinstance(images, list) else _show(images)
        raise ConditionError("control_images", f"control_images: {got} for this server's {n} ControlNet(s); "
                                               "give a list of one base64 image per ControlNet, in order")
    scales = _per_net(body, "control_scale", n, 1.0)
    starts = _per_net(body, "control_start", n, 0.0)
    ends = _per_net(body, "control_end", n, 1.0)
    for start, end in zip(starts, ends):
        if not 0.0 <= start < end <= 1.0:
            raise ConditionError("control_start", f"control_start {start:g} / control_end {end:g}: need "
                                                  "0 <= start < end <= 1")
    return tuple(ControlInput(rgb_tensor(decode_image(f"control_images[{j}]", img)), s, a, b)
                 for j, (img, s, a, b) in enumerate(zip(images, scales, starts, ends)))


def _ip(body: dict, offered: Offered) -> tuple[object | None, float]:
    image, scale = body.get("ip_adapter_image"), body.get("ip_adapter_scale")
    if image is None:
        if scale is not None:
            raise ConditionError("ip_adapter_scale", "ip_adapter_scale needs ip_adapter_image")
        return None, 1.0
    if not offered.ip_adapter:
        raise ConditionError("ip_adapter_image", "ip_adapter_image: this server has no IP-Adapter (start mf-serve "
                                                 "with --ip-adapter FILE --ip-adapter-encoder DIR)")
    default = 1.0 if offered.ip_scale is None else offered.ip_scale
    s = default if scale is None else _number(scale)
    if s is None or not math.isfinite(s):
        raise ConditionError("ip_adapter_scale", f"ip_adapter_scale {_show(scale)}: expected a finite number")
    if offered.ip_scale is not None and s != offered.ip_scale:  # baked into the engines: refused before any work
        raise ConditionError("ip_adapter_scale", f"ip_adapter_scale {_show(scale)}: this server's IP-Adapter engines "
                                                 f"were built with scale {offered.ip_scale!r}; give that or leave "
                                                 "the field out (mf-build-engines --ip-adapter-scale builds another)")
    return decode_image("ip_adapter_image", image), s


def parse_conditions(body: dict, plan: StagePlan, offered: Offered, entry_rule=None) -> Conditions:
    """The condition fields of a request body (the plan is already checked); the cheap checks come before any
    image is decoded. `entry_rule(plan, strength, start_stage)`: where a photo enters (default the UNet families'
    `entry_point`; SD3 / FLUX take runtime/flow_img2img.flow_entry_point, as mf-generate does)."""
    image = _image_start(body, plan, entry_rule)
    controls = _controls(body, offered)
    ip_image, ip_scale = _ip(body, offered)
    return Conditions(image, controls, ip_image, ip_scale)
