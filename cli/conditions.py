"""mf-generate's extra conditions: image to image, LoRA, ControlNet and IP-Adapter flags (docs/ALGORITHM.md
§14-17), and their checks, which run before any model load and end in one line naming the bad value."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import UsageError


def add_condition_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of this module."""
    add_image_arguments(p)
    add_control_arguments(p)
    add_ip_adapter_arguments(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse this LoRA (.safetensors, diffusers or kohya format) into the weights, times SCALE "
                        "(default 1); repeatable")


def add_ip_adapter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip-adapter", metavar="FILE", help="an IP-Adapter (.safetensors, image_proj.* and ip_adapter.*)")
    p.add_argument("--ip-adapter-image", metavar="FILE", help="with --ip-adapter: the reference image")
    p.add_argument("--ip-adapter-encoder", metavar="DIR",
                   help="with --ip-adapter: the CLIP vision model folder (CLIPVisionModelWithProjection)")
    p.add_argument("--ip-adapter-scale", type=float, default=1.0, metavar="S",
                   help="with --ip-adapter: weight of the image attention (default: %(default)s)")


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """--image, --strength, --start-stage (image to image, docs/ALGORITHM.md §14; read back by
    `image_start_from_args`)."""
    p.add_argument("--image", metavar="FILE", help="start from this photo (image to image: upscale a real photo)")
    p.add_argument("--strength", type=float, metavar="S",
                   help="with --image: fraction of the plan's steps that run, in (0, 1] (default 0.8, or with "
                        "--start-stage the whole of that stage and the ones after it)")
    p.add_argument("--start-stage", type=int, metavar="K",
                   help="with --image: the photo enters at stage K (1-based) at that stage's size; earlier stages "
                        "are skipped")


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    """--controlnet, --control-image, --control-scale, --control-start, --control-end (docs/ALGORITHM.md §16)."""
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="a diffusers ControlNetModel folder; repeatable (one --control-image each)")
    p.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="the control image of each --controlnet, in order; resized to every stage's size")
    for flag, default, what in (("--control-scale", "1", "conditioning scale"),
                                ("--control-start", "0", "fraction of the schedule where the control starts"),
                                ("--control-end", "1", "fraction of the schedule where it ends")):
        p.add_argument(flag, action="append", type=float, default=[], metavar="F",
                       help=f"{what} (default {default}); once for all ControlNets or once per ControlNet")


def controls_from_args(args: argparse.Namespace) -> list[tuple]:
    """(folder, image, scale, start, end) per --controlnet, checked before any load."""
    from ..runtime.controlnet import ControlInputError, read_control_image

    n = len(args.controlnet)
    if len(args.control_image) != n:
        raise UsageError(f"{n} --controlnet and {len(args.control_image)} --control-image: give one image per "
                         "ControlNet")

    def per_net(flag: str, values: list[float], default: float) -> list[float]:
        if values and not n:
            raise UsageError(f"{flag} needs --controlnet")
        if len(values) not in (0, 1, n):
            raise UsageError(f"{flag} given {len(values)} times for {n} --controlnet: give it once or once each")
        return values * n if len(values) == 1 else values or [default] * n

    scales = per_net("--control-scale", args.control_scale, 1.0)
    starts = per_net("--control-start", args.control_start, 0.0)
    ends = per_net("--control-end", args.control_end, 1.0)
    out = []
    for path, image, scale, start, end in zip(args.controlnet, args.control_image, scales, starts, ends):
        if not Path(path, "config.json").is_file():
            raise UsageError(f"--controlnet {path!r}: not a diffusers ControlNetModel folder (no config.json)")
        if not (0.0 <= start < end <= 1.0):
            raise UsageError(f"--control-start {start:g} / --control-end {end:g}: need 0 <= start < end <= 1")
        if not math.isfinite(scale):
            raise UsageError(f"--control-scale {scale}: must be a finite number")
        try:
            out.append((path, read_control_image(image), scale, start, end))
        except ControlInputError as e:
            raise UsageError(str(e)) from None
    return out



def controlled_networks(nets, bundle, plan, controls: list[tuple], engines: str | None, dilation: int, device):
    """`nets` with the ControlNets of `controls_from_args` on their UNet step: the torch modules, or with --engines
    the ControlNet engines built beside the plan's (`mf-build-engines --controlnet`); a ControlNet that does not fit
    the UNet, or engines missing for it, end in one line (with the command that builds them)."""
    from ..runtime.controlnet import Control, ControlInputError, ControlledNetworks, load_controlnet

    import torch

    # With --engines the ControlNets load as mf-build-engines hashed them, fp32 on the CPU (the bundle's UNet may
    # have been built without weights: engines run it).
    where, dtype = (torch.device("cpu"), torch.float32) if engines else (device, nets.unet_dtype)
    try:
        modules = [load_controlnet(c[0], bundle.unet, where, dtype) for c in controls]
    except ControlInputError as e:
        raise UsageError(str(e)) from None
    made = [Control(m, image, scale, start, end) for m, (_, image, scale, start, end) in zip(modules, controls)]
    if not engines:
        return ControlledNetworks(nets, made, device)
    from ..engine.cache import EngineError
    from ..engine.controlnet_engines import open_controlnet_runners
    from ..runtime.controlnet import EngineControlledNetworks

    precision = "fp16" if nets.unet_dtype == torch.float16 else "fp32"
    try:
        cns, unets = open_controlnet_runners(engines, bundle, plan, modules, [c[0] for c in controls], nets.backend,
                                             precision, dilation, device, nets.weights.get("unet"))
    except EngineError as e:
        raise UsageError(str(e)) from None
    for m in modules:  # hashed; the engines hold the weights now
        m.to(device="meta")
    return EngineControlledNetworks(nets, bundle, made, device, cns, unets)


def _check_static_engines(flag: str, kind: str, backend: str, dynamic: bool) -> None:
    """The options the engines of `flag` (ControlNet, IP-Adapter: static per stage shape) are not built with."""
    from ..engine.controlnet_engines import CONTROL_BACKENDS

    if backend not in CONTROL_BACKENDS:
        raise UsageError(f"{flag}: {kind} engines are built for {' and '.join(CONTROL_BACKENDS)}, "
                         f"not --backend {backend}")
    if dynamic:
        raise UsageError(f"{flag}: {kind} engines are static per stage shape; leave out --dynamic")


def controlnet_build_args(paths: list[str], backend: str, dynamic: bool, jobs: int,
                          networks: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """mf-build-engines --controlnet: folders and options checked before the model load. Returns --networks split
    into (the plan's networks, the ControlNet networks)."""
    from ..engine.controlnet_engines import CONTROL_SELECTORS

    control = tuple(n for n in networks if n in CONTROL_SELECTORS)
    if control and not paths:
        raise UsageError(f"--networks {','.join(control)}: ControlNet networks need --controlnet DIR")
    for path in paths:
        if not (Path(path) / "config.json").is_file():
            raise UsageError(f"--controlnet {path!r}: not a diffusers ControlNetModel folder (no config.json)")
    if paths:
        _check_static_engines("--controlnet", "ControlNet", backend, dynamic)
    if paths and jobs > 1:
        raise UsageError(f"--controlnet with --jobs {jobs}: build the ControlNets with --jobs 1 (or in parallel "
                         f"processes, each with its own --networks among {', '.join(sorted(CONTROL_SELECTORS))})")
    return tuple(n for n in networks if n not in CONTROL_SELECTORS), control


def build_controlnets(bundle, paths: list[str], req, networks: tuple[str, ...] = (), only: bool = False) -> None:
    """mf-build-engines --controlnet: each ControlNet loaded (checked against the UNet), its engines and the
    controlled UNet's built into the request's folder (`networks`: only those; `only`: nothing else is built after
    them, so the VAE and text encoders are freed first)."""
    from ..engine.controlnet_engines import build_controlnet_engines
    from ..runtime.controlnet import ControlInputError, load_controlnet

    if only:
        for m in (bundle.vae, *bundle.text_encoders):
            m.to(device="meta")
    try:
        modules = [load_controlnet(p, bundle.unet, bundle.unet.device, bundle.unet.dtype) for p in paths]
    except ControlInputError as e:
        raise UsageError(str(e)) from None
    report = build_controlnet_engines(bundle, modules, req, networks, log=lambda msg: print(msg, flush=True))
    print(f"controlnet: {len(report.built)} built, {len(report.skipped)} up to date")

def ip_adapter_from_args(args: argparse.Namespace):
    """The IP-Adapter's reference image (PIL), or None without --ip-adapter; files checked before any load."""
    if args.ip_adapter is None:
        if args.ip_adapter_image or args.ip_adapter_encoder:
            raise UsageError("--ip-adapter-image and --ip-adapter-encoder need --ip-adapter")
        return None
    if not Path(args.ip_adapter).is_file():
        raise UsageError(f"--ip-adapter {args.ip_adapter!r}: no such file")
    if not args.ip_adapter_image or not args.ip_adapter_encoder:
        raise UsageError("--ip-adapter needs --ip-adapter-image FILE and --ip-adapter-encoder DIR")
    if not Path(args.ip_adapter_encoder, "config.json").is_file():
        raise UsageError(f"--ip-adapter-encoder {args.ip_adapter_encoder!r}: not a CLIP vision model folder "
                         "(no config.json)")
    if not math.isfinite(args.ip_adapter_scale):
        raise UsageError(f"--ip-adapter-scale {args.ip_adapter_scale}: must be a finite number")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.ip_adapter_image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"--ip-adapter-image {args.ip_adapter_image!r}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"--ip-adapter-image {args.ip_adapter_image!r}: not a readable image ({e})") from None


def loras_from_args(values: list[str]):
    """--lora PATH[:SCALE] values, each file checked to exist before the load (its keys are checked against the
    loaded model, before anything runs)."""
    import math

    from ..core.lora import parse_lora

    specs = [parse_lora(v) for v in values]
    for v, spec in zip(values, specs):
        if not spec.path.is_file():
            raise UsageError(f"--lora {v!r}: no such file {str(spec.path)!r}")
        if not math.isfinite(spec.scale):
            raise UsageError(f"--lora {v!r}: the scale must be a finite number")
    return specs


def image_start_from_args(args: argparse.Namespace, plan, entry_rule=None):
    """The checked photo, strength and start stage as an ImageStart, or None without --image; one line naming
    the bad value (a missing or unreadable file, a strength outside (0, 1], a stage outside the plan).
    `entry_rule(plan, strength, start_stage)`: where the photo enters (default the UNet families' `entry_point`;
    the flow families pass runtime/flow_img2img.flow_entry_point)."""
    from ..runtime.img2img import ImageInputError, ImageStart, entry_point, read_image
    from .common import warn

    if args.image is None:
        if args.strength is not None or args.start_stage is not None:
            raise UsageError("--strength and --start-stage need --image (the photo to start from)")
        return None
    try:
        entry = (entry_rule or entry_point)(plan, args.strength, args.start_stage)
        photo = read_image(args.image)
    except ImageInputError as e:
        raise UsageError(str(e)) from None
    stage = plan.stages[entry.stage]
    ph, pw = photo.shape[-2:]
    if abs((pw / ph) / (stage.width / stage.height) - 1) > 0.01:
        warn("mf-generate", f"--image {args.image!r} is {pw}x{ph}; it is resized to stage {entry.stage + 1}'s "
                            f"{stage.width}x{stage.height}, which changes its aspect ratio")
    return ImageStart(photo, args.strength, args.start_stage)


def add_ip_build_arguments(p: argparse.ArgumentParser) -> None:
    """mf-build-engines' --ip-adapter, --ip-adapter-scale and --ip-adapter-encoder (engine/ipadapter_engines.py,
    engine/image_encoder_engines.py)."""
    p.add_argument("--ip-adapter", metavar="FILE",
                   help="also build the UNet with this IP-Adapter (.safetensors) loaded, its image projection and "
                        "IP attention inside (network unet_ip; aoti or onnxruntime)")
    p.add_argument("--ip-adapter-scale", type=float, metavar="S",
                   help="with --ip-adapter: the scale baked into those engines (default: 1.0); mf-generate --engines "
                        "runs them at this scale only")
    p.add_argument("--ip-adapter-encoder", metavar="DIR",
                   help="with --ip-adapter: also build this CLIP vision model folder's image encoder (network "
                        "image_encoder), which mf-generate --engines then runs instead of torch and the C API needs "
                        "for mf_inputs_set_ip_adapter_image; its image processor's steps go to models.json")


def ip_build_args(args: argparse.Namespace, backend: str, dynamic: bool, jobs: int,
                  networks: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """mf-build-engines --ip-adapter: file and options checked before the model load. Returns --networks split into
    (the others, the IP-Adapter networks: unet_ip selectors and image_encoder)."""
    from ..core.image_encoder_specs import IMAGE_ENCODER
    from ..engine.ipadapter_engines import IP_SELECTORS

    ip = tuple(n for n in networks if n in IP_SELECTORS or n == IMAGE_ENCODER)
    if args.ip_adapter is None:
        if ip:
            raise UsageError(f"--networks {','.join(ip)}: IP-Adapter networks need --ip-adapter FILE")
        if args.ip_adapter_scale is not None or args.ip_adapter_encoder is not None:
            raise UsageError(f"{'--ip-adapter-scale' if args.ip_adapter_scale is not None else '--ip-adapter-encoder'}"
                             " needs --ip-adapter")
        return networks, ()
    if not Path(args.ip_adapter).is_file():
        raise UsageError(f"--ip-adapter {args.ip_adapter!r}: no such file")
    if args.ip_adapter_scale is not None and not math.isfinite(args.ip_adapter_scale):
        raise UsageError(f"--ip-adapter-scale {args.ip_adapter_scale}: must be a finite number")
    if args.ip_adapter_encoder is not None and not Path(args.ip_adapter_encoder, "config.json").is_file():
        raise UsageError(f"--ip-adapter-encoder {args.ip_adapter_encoder!r}: not a CLIP vision model folder "
                         "(no config.json)")
    if IMAGE_ENCODER in ip and args.ip_adapter_encoder is None:
        raise UsageError(f"--networks {IMAGE_ENCODER}: the image encoder engine needs --ip-adapter-encoder DIR")
    _check_static_engines("--ip-adapter", "IP-Adapter", backend, dynamic)
    if jobs > 1:
        raise UsageError(f"--ip-adapter with --jobs {jobs}: build the IP-Adapter engines with --jobs 1")
    return tuple(n for n in networks if n not in ip), ip


def build_ip_adapter(bundle, args: argparse.Namespace, req, networks: tuple[str, ...] = ()) -> None:
    """mf-build-engines --ip-adapter: the file read and checked against the UNet, its unet_ip engines built into
    the request's folder, and with --ip-adapter-encoder the image encoder's engine (`networks`: only those)."""
    from ..core.image_encoder import read_encoder_config
    from ..core.image_encoder_specs import IMAGE_ENCODER
    from ..engine.image_encoder_engines import build_image_encoder_engine
    from ..engine.ipadapter_engines import build_ip_engines, embed_dim
    from ..runtime.ipadapter import IPAdapterError, read_ip_adapter

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        state = read_ip_adapter(args.ip_adapter, bundle.unet)
        config = None if args.ip_adapter_encoder is None else read_encoder_config(args.ip_adapter_encoder)
    except IPAdapterError as e:
        raise UsageError(str(e)) from None
    if config is not None and int(config.projection_dim) != embed_dim(state):
        raise UsageError(f"--ip-adapter-encoder {args.ip_adapter_encoder!r}: projects to {config.projection_dim} "
                         f"features; the IP-Adapter {args.ip_adapter!r} takes {embed_dim(state)}")
    scale = 1.0 if args.ip_adapter_scale is None else args.ip_adapter_scale
    unet_ip = tuple(n for n in networks if n != IMAGE_ENCODER)
    built = skipped = 0
    if unet_ip or not networks:
        report = build_ip_engines(bundle, state, args.ip_adapter, scale, req, unet_ip, log=log)
        built, skipped = len(report.built), len(report.skipped)
    if config is not None and (IMAGE_ENCODER in networks or not networks):
        try:
            report = build_image_encoder_engine(bundle.family, args.ip_adapter_encoder, req, log=log)
        except IPAdapterError as e:
            raise UsageError(str(e)) from None
        built, skipped = built + len(report.built), skipped + len(report.skipped)
    print(f"ip-adapter: {built} built, {skipped} up to date")


def ip_adapter_engines(nets, bundle, plan, args: argparse.Namespace, image, dilation: int, device):
    """mf-generate --engines --ip-adapter: `nets` whose UNet step runs the unet_ip engines built beside the plan's
    (`mf-build-engines --ip-adapter`), with the image embeddings computed once: by the folder's image encoder engine
    when it holds one for --ip-adapter-encoder (`mf-build-engines ... --ip-adapter-encoder DIR`), else by the torch
    CLIP vision encoder; also returns which of the two ran, for the run's line. Missing entries, another scale, or an
    encoder whose projection does not fit the IP-Adapter end in one line."""
    import torch

    from ..core.image_encoder import read_encoder_config
    from ..engine.cache import EngineError
    from ..engine.image_encoder_engines import encode_with_engine, open_image_encoder
    from ..engine.ipadapter_engines import embed_dim, open_ip_runners
    from ..runtime.ipadapter import (EngineIPAdapterNetworks, IPAdapterError, encode_ip_image, load_image_encoder,
                                     load_image_processor, read_ip_adapter)

    try:
        state = read_ip_adapter(args.ip_adapter, bundle.unet)  # checked against the UNet's layout (no weights needed)
    except IPAdapterError as e:
        raise UsageError(str(e)) from None
    dim = embed_dim(state)
    del state  # the engines hold the IP-Adapter's weights
    precision = "fp16" if nets.unet_dtype == torch.float16 else "fp32"
    try:
        runners = open_ip_runners(args.engines, bundle, plan, dim, args.ip_adapter, args.ip_adapter_scale,
                                  nets.backend, precision, dilation, device, nets.weights.get("unet"))
        got = int(read_encoder_config(args.ip_adapter_encoder).projection_dim)
        if got != dim:
            raise UsageError(f"--ip-adapter-encoder {args.ip_adapter_encoder!r}: projects to {got} features; the "
                             f"IP-Adapter {args.ip_adapter!r} takes {dim}")
        engine = open_image_encoder(args.engines, bundle.family.name, args.ip_adapter_encoder, nets.backend,
                                    precision, device)
        where = f"image encoder {nets.backend} engine" if engine is not None else "image encoder in torch"
        if engine is not None:
            embeds = encode_with_engine(engine, load_image_processor(args.ip_adapter_encoder), image, device)
        else:  # as the torch path
            encoder, processor = load_image_encoder(args.ip_adapter_encoder, device, nets.unet_dtype)
            embeds = encode_ip_image(encoder, processor, image, device)
    except (EngineError, IPAdapterError) as e:
        raise UsageError(str(e)) from None
    return EngineIPAdapterNetworks(nets, embeds, runners, device), where
