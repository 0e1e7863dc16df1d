"""`mf-serve`: MegaFusion over HTTP on Ray Serve (needs the `serve` extra: pip install -e ".[serve]")."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from ..serve.config import ConfigError, ServeConfig, check_config, parse_sizes

PROG = "mf-serve"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and status 2, as every mf- tool answers bad input
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class _Stop(Exception):
    """SIGTERM (or Ctrl-C) arrived: stop serving."""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve MegaFusion over HTTP (POST /v1/generate, GET /v1/health, "
                                       "GET /v1/models) on Ray Serve.")
    p.add_argument("--model", required=True, help="sd15, sdxl, sd3, flux, or tiny-sd15, tiny-sdxl, tiny-sd3, tiny-flux")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--model-path", help="a local diffusers folder (at this path on every node)")
    weights.add_argument("--random-weights", action="store_true", help="the real architecture with random weights")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--engines", help="run from the engines mf-build-engines built in this folder")
    run.add_argument("--mode", choices=("eager", "graphs", "compiled"),
                     help="eager; one CUDA graph per stage shape (default on CUDA); or graphs around torch.compile'd "
                          "modules (compiles at warm-up, minutes on real-size models)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="--mode compiled: keep what the replicas compile here for the next start (default: "
                        "~/.cache/megafusion/compiled on each node)")
    p.add_argument("--no-compile-cache", action="store_true", help="--mode compiled: keep nothing")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if this machine has it, else cpu")
    p.add_argument("--sizes", help="output sizes served and warmed up at start, e.g. 1024x1024,2048x2048 "
                                   "(default: the model's default output size)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas, one GPU each on CUDA (default 1)")
    p.add_argument("--max-batch", type=int, default=4, help="requests one replica batches together (default 4)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting for a replica before new ones are answered 429 (default 16)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a request is answered 504 and its work cancelled (default 300)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="deploy onto this running Ray cluster (e.g. auto or HEAD:6379) instead of "
                                     "starting a local Ray")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse this LoRA into the weights at start, times SCALE (default 1); with --engines swapped "
                        "into them; repeatable")
    p.add_argument("--precision", choices=("fp8",),
                   help="fp8: the UNet's projections as FP8 GEMMs (a GPU with FP8 tensor cores); with --engines, the "
                        "folder's FP8 packages (mf-build-engines --backend aoti --precision fp8)")
    p.add_argument("--fp8-scales", choices=("token", "static"), default="token",
                   help="with --precision fp8: the FP8 layers' input scales, per token (default) or static: with "
                        "--engines the folder's packages of mf-build-engines --fp8-scales static, on the torch "
                        "modules calibrated at start over the served sizes")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="a diffusers ControlNetModel folder, loaded at start; repeatable. Requests give one "
                        "control image per ControlNet (control_images)")
    p.add_argument("--ip-adapter", metavar="FILE",
                   help="an IP-Adapter (.safetensors), loaded at start (with --engines: its unet_ip engines, "
                        "mf-build-engines --ip-adapter); requests may give ip_adapter_image")
    p.add_argument("--ip-adapter-encoder", metavar="DIR", help="with --ip-adapter: the CLIP vision model folder")
    p.add_argument("--ip-adapter-scale", type=float, metavar="S",
                   help="with --engines --ip-adapter: the scale the unet_ip engines were built with (default 1.0); "
                        "requests take that scale only")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The checked configuration; raises ConfigError before anything starts."""
    device = args.device
    if device is None or (device == "cuda" and not args.address):
        import torch

        has_cuda = torch.cuda.is_available()
        if device is None:
            device = "cuda" if has_cuda else "cpu"
        elif not has_cuda:
            raise ConfigError("--device cuda: this machine has no CUDA device (use --address to deploy onto a "
                              "cluster that has)")
        if device == "cuda" and torch.cuda.device_count() < args.replicas:
            raise ConfigError(f"--replicas {args.replicas}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"one per replica")
    def absolute(path):  # replicas do not run in this directory
        return os.path.abspath(os.path.expanduser(path)) if path is not None else None

    cfg = ServeConfig(model=args.model, model_path=absolute(args.model_path), random_weights=args.random_weights,
                      engines=absolute(args.engines), mode=args.mode, device=device,
                      sizes=parse_sizes(args.sizes) if args.sizes is not None else (),
                      replicas=args.replicas, max_batch=args.max_batch, max_queue=args.max_queue,
                      timeout_s=args.timeout, host=args.host, port=args.port,
                      loras=tuple(_absolute_lora(v) for v in args.lora), precision=args.precision,
                      fp8_scales=args.fp8_scales,
                      controlnets=tuple(absolute(p) for p in args.controlnet), ip_adapter=absolute(args.ip_adapter),
                      ip_adapter_encoder=absolute(args.ip_adapter_encoder), ip_adapter_scale=args.ip_adapter_scale,
                      compile_cache=absolute(args.compile_cache), no_compile_cache=args.no_compile_cache)
    from ..serve.preflight import preflight

    return preflight(check_config(cfg))


def _absolute_lora(value: str) -> str:
    """PATH[:SCALE] with PATH made absolute (replicas do not run in this directory)."""
    from ..core.lora import parse_lora

    spec = parse_lora(value)
    path = os.path.abspath(os.path.expanduser(str(spec.path)))
    return path if spec.path == Path(value) else f"{path}:{value.rpartition(':')[2]}"


def _raise_stop(signum, frame):
    raise _Stop()


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve

        from ..serve.app import deploy, undeploy
    except ImportError as e:
        print(f"{PROG}: error: {e.name or e} is missing; install the serve extra: pip install -e \".[serve]\"",
              file=sys.stderr)
        return 2

    def say(text: str):
        print(f"{PROG}: {text}", flush=True)

    local = args.address is None
    status = 0
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if local:
            ray.init(num_cpus=max(os.cpu_count() or 1, cfg.replicas), include_dashboard=False)
            say(f"started a local Ray instance ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
                f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
        else:
            ray.init(address=args.address)
            gpus = ray.cluster_resources().get("GPU", 0)
            say(f"joined the Ray cluster at {args.address} ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
                f"{gpus:g} GPUs, {len(ray.nodes())} node(s))")
            if cfg.device == "cuda" and gpus < cfg.replicas:
                print(f"{PROG}: error: --replicas {cfg.replicas} on CUDA needs {cfg.replicas} GPUs; the cluster "
                      f"has {gpus:g}", file=sys.stderr)
                return 2
        signal.signal(signal.SIGTERM, _raise_stop)  # ray.init installs its own (sys.exit) in the driver
        try:
            deploy(cfg, say)
        except RuntimeError as e:
            print(f"{PROG}: error: the model did not start: {e}", file=sys.stderr)
            status = 1
            return status
        say("serving; SIGTERM or Ctrl-C stops")
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt):
        say("stopping")
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # the shutdown below runs to its end
        try:
            if ray.is_initialized():
                if local:
                    serve.shutdown()
                else:
                    undeploy()
                ray.shutdown()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        say("stopped" + ("" if local else " (the cluster keeps running)"))
    return status


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad flag (status 2, one line printed) or --help (0)
        return int(e.code or 0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
