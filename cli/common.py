"""What the command-line tools (`mf-generate`, `mf-build-engines`, `mf-bench`, `mf-tokens`) share: model, device
and plan arguments, the checks of values (seeds, guidance, dilation, output paths) that run before any load, the
VAE precision rule, and one-line errors and warnings. Each entry point builds its own parser (`ArgumentParser`)."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from ..core.loading import WeightsError
from ..core.startup import share_distribution_scan
from ..core.families import ModelFamily, UnknownModelError
from ..core.specs import default_dtype, default_vae_dtype
from ..core.plan import PlanError, StagePlan, default_plan, parse_size, parse_stages, validate_plan
from ..runtime.pipeline import MAX_DILATION, SEED_LIMIT


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors (an unknown flag, `--steps abc`, a missing value) follow the tools' rule:
    one line `prog: error: ...`, exit status 2 (argparse prints its usage block first; --help shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Precision names the tools take."""

INPUT_ERRORS = (UsageError, PlanError, WeightsError, UnknownModelError)
"""Errors that mean the user's input was wrong (exit status 2, one line, no traceback)."""


def add_model_arguments(p: argparse.ArgumentParser, default_model: str | None) -> None:
    """--model (required when `default_model` is None), --model-path, --random-weights, --weights-seed,
    --allow-pickle (read back by `weights_seed_from_args`)."""
    if default_model is None:
        p.add_argument("--model", required=True, help="sd15, sdxl, sd3, flux, or tiny-sd15, tiny-sdxl, tiny-sd3, tiny-flux (required)")
    else:
        p.add_argument("--model", default=default_model,
                       help="sd15, sdxl, sd3, flux, or tiny-sd15, tiny-sdxl, tiny-sd3, tiny-flux (default: %(default)s)")
    p.add_argument("--model-path", help="a local diffusers folder (or a hub id where the network allows)")
    p.add_argument("--random-weights", action="store_true",
                   help="the real architecture with random weights (tiny models always have random weights)")
    p.add_argument("--weights-seed", default="0", metavar="N",
                   help="seed of the random weights (default: %(default)s); engines built with one weights seed "
                        "serve only that seed")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle checkpoints without safetensors")


def weights_seed_from_args(prog: str, family: ModelFamily, args: argparse.Namespace, takes_dit: bool = False) -> int:
    """The checked `--weights-seed` (0 <= N < 2^64), after the model-source flags are checked against each other;
    warns (one line) that `--random-weights` changes nothing on a tiny model. The SD3/FLUX families are refused
    unless `prog` takes them (mf-generate, or `takes_dit`)."""
    if not (takes_dit or prog == "mf-generate"):
        from ..core.dit_families import refuse_dit

        refuse_dit(family, prog)
    seed = parse_seed(args.weights_seed, "--weights-seed")
    if args.model_path is not None and args.random_weights:
        raise UsageError("--model-path and --random-weights exclude each other")
    random = family.tiny or args.random_weights
    if seed != 0 and not random:
        raise UsageError(f"--weights-seed {args.weights_seed}: only random weights have a seed "
                         f"({'--model-path loads ' + repr(args.model_path) if args.model_path else 'add --random-weights'})")
    if family.tiny and args.random_weights:
        warn(prog, f"--random-weights changes nothing: {family.name} always has random weights")
    return seed


def weights_source_from_args(args: argparse.Namespace, family: ModelFamily, weights_seed: int) -> str:
    """The weights' origin as the loader will record it (a bundle's `source`), known before the load: what engine
    folders are chosen by and their build commands name."""
    if args.model_path is not None:
        return str(Path(args.model_path).expanduser())
    return f"random:{weights_seed}" if family.tiny or args.random_weights else family.hub_id


def warn(prog: str, message: str) -> None:
    """One line on standard error; the run goes on."""
    print(f"{prog}: warning: {message}", file=sys.stderr)


_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_FLT_MAX = 3.4028234663852886e38
"""Guidance becomes a float32 in the networks (and in the C++ tools): larger is infinite there."""


def parse_seed(text: str, flag: str = "--seed") -> int:
    """`--seed`, `--weights-seed`: decimal digits only, 0 <= seed < 2^64 (the C++ tools' rule). Python's int()
    would take '-1' (which the generator wraps to 2^64-1), ' 7', '1_0' and non-ASCII digits."""
    if text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < SEED_LIMIT:
        return int(text)
    raise UsageError(f"{flag} {text!r}: must be an integer 0 <= {flag.lstrip('-')} < 2^64")


def parse_guidance(text: str, flag: str = "--guidance") -> float:
    """`--guidance`: a finite decimal number >= 0 (the C++ tools' rule). nan would silently turn CFG off (nan > 1
    is false), inf gives an all-black image, and a negative weight steers the image away from its prompt."""
    value = float(text) if _FLOAT_RE.fullmatch(text) else math.nan
    if not (math.isfinite(value) and 0 <= value <= _FLT_MAX):
        raise UsageError(f"{flag} {text!r}: must be a finite number >= 0")
    return value + 0.0  # -0 -> 0


def dilation_from_args(dilation: int | None, no_dilation: bool = False) -> int:
    """`--dilation` (default 2) and `--no-dilation` (1) as the tools take them; argparse gives None when
    `--dilation` was not given, so that `--no-dilation --dilation 5` is refused rather than half obeyed."""
    if no_dilation:
        if dilation is not None:
            raise UsageError(f"--no-dilation and --dilation {dilation} contradict each other; give one of them")
        return 1
    if dilation is None:
        return 2
    if dilation < 1:
        raise UsageError(f"--dilation {dilation}: must be at least 1")
    if dilation > MAX_DILATION:
        raise UsageError(f"--dilation {dilation}: must be at most {MAX_DILATION} (the paper uses 2; past "
                         f"{MAX_DILATION} a 3x3 kernel's taps lie farther apart than SD1.5's 8x8 native mid-block map)")
    return dilation


def check_writable(flag: str, value: str, folder: Path) -> None:
    """Creates and removes a temp file in `folder`: the real test (os.access misses read-only mounts and ACLs,
    and says yes to root whatever the permission bits)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".mf-write-test-")
    except OSError as e:
        raise UsageError(f"{flag} {value!r}: cannot write in {str(folder)!r} ({e.strerror})") from None
    os.close(fd)
    os.unlink(name)


def output_file_from_args(flag: str, value: str, suffix: str = ".png") -> Path:
    """An output file that can be written, checked before any work: a name ending in `suffix`, not a folder,
    in an existing folder this process can write in."""
    out = Path(value)
    if not value.strip():
        raise UsageError(f"{flag} {value!r}: give a file name, e.g. out{suffix}")
    if out.is_dir():
        raise UsageError(f"{flag} {value!r} is a folder; give a file name in it, e.g. {str(out / ('out' + suffix))!r}")
    if out.suffix.lower() != suffix:
        raise UsageError(f"{flag} {value!r}: the file is written as {suffix[1:].upper()}; give a name ending in "
                         f"{suffix}, not {out.suffix or 'no suffix'!r}")
    if not out.parent.exists():
        raise UsageError(f"{flag} {value!r}: output folder {str(out.parent)!r} does not exist")
    if not out.parent.is_dir():
        raise UsageError(f"{flag} {value!r}: {str(out.parent)!r} is a file, not a folder")
    check_writable(flag, value, out.parent)
    return out


def output_folder_from_args(flag: str, value: str) -> Path:
    """An output folder that exists or can be created, and written in, checked before any work."""
    out = Path(value)
    if not value.strip():
        raise UsageError(f"{flag} {value!r}: give a folder name")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {value!r} exists and is not a folder")
    nearest = out
    while not nearest.exists():  # the folder mkdir(parents=True) will create the rest in ('.' always exists)
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UsageError(f"{flag} {value!r}: {str(nearest)!r} is a file, not a folder")
    check_writable(flag, value, nearest)
    return out


def warn_truncated_prompts(prog: str, tokenizers: list, prompts: dict[str, str]) -> None:
    """One warning line per prompt longer than the text encoders take (CLIP: 77 tokens with the start and end
    tokens); `runtime.conditioning.token_ids` cuts the rest without a word."""
    for flag, text in prompts.items():
        dropped = max(len(tok(text, verbose=False).input_ids) - tok.model_max_length for tok in tokenizers)
        if dropped > 0:
            limit = tokenizers[0].model_max_length
            warn(prog, f"{flag} is {limit + dropped} tokens, the text encoder takes {limit}: the last {dropped} "
                       "are dropped")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """--size, --stages, --steps (read back by `plan_from_args`)."""
    p.add_argument("--size", help="output WIDTHxHEIGHT (default: the paper's plan, 2x native per side)")
    p.add_argument("--stages", help="explicit plan, e.g. 1024x1024:40,2048x2048:10 (WIDTHxHEIGHT:STEPS)")
    p.add_argument("--steps", type=int, help="total steps of the default plan (default 50)")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --vae-dtype."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--vae-dtype", choices=sorted(DTYPES),
                   help="VAE precision (default: --dtype, except the SDXL VAE under fp16: bf16 on CUDA, fp32 on CPU)")


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    """--precision fp8 (read back by `fp8_dtype_from_args`)."""
    p.add_argument("--precision", choices=("fp8",),
                   help="fp8: the UNet's transformer projections (SD3, FLUX: the transformer blocks' image-stream "
                        "projections) as FP8 (e4m3) GEMMs, the rest in bf16; CUDA GPUs of compute capability 8.9 or "
                        "newer (Ada, Hopper); with --engines (SD1.5, SDXL): the folder's FP8 packages "
                        "(mf-build-engines --backend aoti --precision fp8), which the CPU runs too")
    p.add_argument("--fp8-scales", choices=("token", "static"),
                   help="with --precision fp8 on the torch modules (SD1.5, SDXL): the FP8 layers' input scales, one per "
                        "token computed on every call (token, the default) or one per layer fixed by calibration runs "
                        "at the plan's stage shapes (static: no amax reduction per call; calibrated once and kept "
                        "with the compile cache under --mode compiled; with --engines, the packages of "
                        "mf-build-engines --precision fp8 --fp8-scales static, calibrated per stage shape)")


def fp8_policy_from_args(args: argparse.Namespace):
    """The `Fp8Policy` --precision fp8 and --fp8-scales ask for (None without --precision fp8), checked before any
    load: --fp8-scales needs --precision fp8. With --engines its `activations` say which FP8 packages to open
    (those of `mf-build-engines --fp8-scales static` hold their scales)."""
    scales = getattr(args, "fp8_scales", None)
    if args.precision != "fp8":
        if scales is not None:
            raise UsageError(f"--fp8-scales {scales} needs --precision fp8")
        return None
    from ..engine.fp8 import Fp8Policy

    return Fp8Policy(activations=scales or "token")


def fp8_dtype_from_args(device: torch.device, dtype_name: str | None, engines: str | None,
                        fp8_engines: bool = False) -> torch.dtype:
    """--precision fp8 checked before any load (device, --dtype, --engines); the dtype the networks load in.
    `fp8_engines`: the model family has FP8 engines (SD1.5, SDXL), which run on the CPU too (torch's `_scaled_mm`
    without tensor cores: slow, but what the tiny models' tests run); the torch modules' FP8 needs a GPU."""
    from ..engine.fp8 import fp8_unavailable

    if engines is not None and not fp8_engines:
        raise UsageError(f"--precision fp8 with --engines {engines!r}: this model's FP8 runs from the torch modules "
                         "(--mode eager, graphs or compiled); FP8 engines are SD1.5 and SDXL UNets")
    why = fp8_unavailable(device, "--precision fp8") if engines is None or device.type == "cuda" else ""
    if why:
        raise UsageError(why)
    if dtype_name not in (None, "bf16"):
        raise UsageError(f"--precision fp8 with --dtype {dtype_name}: the FP8 network computes in bf16 (row-wise "
                         "FP8 GEMMs write bf16); leave --dtype out or give bf16")
    return torch.bfloat16


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA if present), `cpu`, `cuda` or `cuda:N`; an error names anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but this machine has no CUDA device")
    return dev


def mode_from_args(mode: str | None, device: torch.device) -> str:
    """--mode, or its default: one CUDA graph per stage shape on CUDA, the eager loop elsewhere; every mode but
    eager needs CUDA."""
    mode = mode or ("graphs" if device.type == "cuda" else "eager")
    if mode != "eager" and device.type != "cuda":
        raise UsageError(f"--mode {mode} needs a CUDA device (got {device})")
    return mode


def generate_with_progress(pipe, plan: StagePlan, opts, steps: int, image, show: bool):
    """`pipe.generate`'s result, with a bar over its `steps` denoising steps on stderr when `show`; each segment is
    printed as it ends (the relays and the decode take seconds without a step to count)."""
    if not show:
        return pipe.generate(plan, opts, image=image)
    from tqdm import tqdm

    with tqdm(total=steps, desc="denoise", unit="step", file=sys.stderr) as bar:
        return pipe.generate(plan, opts, on_step=lambda k, i: bar.update(1),
                             on_segment=lambda name, s: bar.write(f"  {name:<40} {s * 1000:10.1f} ms"), image=image)


def plan_from_args(family: ModelFamily, size: str | None, stages: str | None, steps: int | None = None) -> StagePlan:
    """`--size`, `--stages` and `--steps` as the tools take them."""
    if steps is not None and steps <= 0:
        raise UsageError(f"--steps {steps}: needs at least 1 step")
    w, h = parse_size(size) if size is not None else (None, None)  # `--size ""` is an error, not the default
    if stages is not None and not stages.strip():
        raise UsageError(f"--stages {stages!r}: give at least one stage, e.g. 1024x1024:40,2048x2048:10")
    if stages is not None:
        if steps is not None:
            raise UsageError("--steps and --stages exclude each other (give steps per stage in --stages)")
        return validate_plan(family, parse_stages(stages), w, h)
    return default_plan(family, w, h, steps)


def model_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """--dtype, by default core/specs' `default_dtype` (fp16 on CUDA, fp32 on CPU)."""
    return DTYPES[name] if name else default_dtype(device)


def vae_dtype(family: ModelFamily, vae_config, dtype: torch.dtype, name: str | None,
              device: torch.device) -> torch.dtype:
    """--vae-dtype, by default core/specs' `default_vae_dtype` rule on the loaded VAE's config."""
    return DTYPES[name] if name else default_vae_dtype(family, vae_config, dtype, device)


def exit_now(rc: int) -> NoReturn:
    """Ends a one-shot CLI process without the interpreter's teardown (unloading modules, the CUDA context, the
    allocator's blocks): 2.4-3.4 s after the image was on disk on the H200 (SDXL 2048, benchmarks/RESULTS.md). The
    output is on disk and the streams and logging are flushed first; torch's compile workers leave on their own when
    their parent goes. Console scripts only: never from code a caller imports."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # what native libraries printed through C stdio (buffered on a pipe)
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(rc)


def run_main(prog: str, run: Callable[[], int], fatal: tuple[type[BaseException], ...] = ()) -> int:
    """Runs a tool: bad input is one line and status 2, `fatal` errors one line and status 1."""
    share_distribution_scan()
    try:
        return run()
    except INPUT_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except fatal as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


CUDNN_WORKSPACE_ENV = "CUDNN_CONV_WSCAP_DBG"
"""PyTorch's cap on one cuDNN convolution workspace allocation, in MiB (read at the first cuDNN convolution)."""


def cap_cudnn_workspace(max_memory_gib: float) -> int | None:
    """--max-memory on CUDA: each cuDNN convolution workspace is capped at a tenth of the budget (256 MiB to 4 GiB),
    so cuDNN's algorithm search cannot take the headroom the estimate left; an explicit CUDNN_CONV_WSCAP_DBG wins.
    Returns the cap set, in MiB, or None when the environment already had one. Process-wide: CLI entry points only."""
    import os

    if os.environ.get(CUDNN_WORKSPACE_ENV):
        return None
    cap = int(min(4096, max(256, max_memory_gib * 1024 / 10)))
    os.environ[CUDNN_WORKSPACE_ENV] = str(cap)
    return cap


def cap_device_memory(max_memory_gib: float, device) -> float:
    """--max-memory on CUDA: PyTorch's caching allocator may reserve at most this much of the device (past it, it
    frees its cached blocks and retries before it raises out of memory), so the budget bounds what the process
    holds, not only what the plan allocates. Returns the fraction of the device's memory set. Process-wide: CLI
    entry points only."""
    import torch

    device = torch.device(device)
    # set_per_process_memory_fraction wants an index; a bare "cuda" means the current device
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, max_memory_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    expandable_segments()
    return fraction


def memory_budget(max_memory: float | None, device) -> tuple[float, str]:
    """The budget a plan's estimate is held against: --max-memory in bytes (refused unless a number of GiB > 0), else
    the device's memory; and what it is, in words."""
    import math

    from ..core.memory import GiB, device_memory

    if max_memory is None:
        return device_memory(device)
    if not (math.isfinite(max_memory) and max_memory > 0):
        raise UsageError(f"--max-memory {max_memory}: must be a number of GiB > 0")
    return max_memory * GiB, "--max-memory"


def apply_memory_cap(max_memory: float | None, device) -> None:
    """--max-memory on CUDA, once the plan fits: cuDNN's workspaces and PyTorch's allocator capped, each said in a
    line. Process-wide: CLI entry points only."""
    if max_memory is None or device.type != "cuda":
        return
    cap = cap_cudnn_workspace(max_memory)
    if cap is not None:
        print(f"--max-memory {max_memory:g}: cuDNN convolution workspaces capped at {cap} MiB each")
    fraction = cap_device_memory(max_memory, device)
    print(f"--max-memory {max_memory:g}: PyTorch reserves at most {fraction:.0%} of the device's memory"
          + ("" if os.environ.get(ALLOCATOR_ENV) else ", in expandable segments"))


ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def expandable_segments() -> bool:
    """Under a cap, PyTorch's allocator set to grow its segments in place (expandable segments) rather than keep
    fixed blocks that fragment: at the cap it otherwise frees its cache and retries, pass after pass. H200, SDXL
    4096 under --max-memory 32 (benchmarks/RESULTS.md, seventh session): 12.88 -> 12.13 s, the tiled decode
    3.20 -> 2.45 s, reserved 31.7 -> 30.6 GiB. Left alone when the user set PYTORCH_CUDA_ALLOC_CONF. Returns
    whether it was set. Process-wide: CLI entry points only."""
    import torch

    if os.environ.get(ALLOCATOR_ENV) is not None:
        return False
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


def check_backend(backend: str, device: str) -> None:
    """`--backend` available on this device (its package installed, the device one it runs on), else one line."""
    from ..engine.backend import BackendUnavailable, get_backend

    try:
        get_backend(backend).check_available(device)
    except BackendUnavailable as e:
        raise UsageError(f"--backend {backend}: {e}") from None


def finish_generation(result, out, segments_printed: bool) -> float:
    """What mf-generate prints after a generation (segment times unless the progress bar printed them, the total,
    the peak) and the PNG, written under a temporary name and renamed: never a half-written file at `out`. Returns
    the seconds the PNG took (encode, write, rename)."""
    import os
    import time

    for name, seconds in result.timings if not segments_printed else ():
        print(f"  {name:<40} {seconds * 1000:10.1f} ms")
    print(f"  {'total':<40} {sum(s for _, s in result.timings) * 1000:10.1f} ms")
    if result.peak_memory_bytes is not None:
        detail = f" ({result.peak_detail})" if result.peak_detail else ""
        print(f"  peak GPU memory {result.peak_memory_bytes / 2**30:.2f} GiB{detail}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    try:
        tmp.write_bytes(result.png_bytes())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    png_s = time.perf_counter() - t0
    print(f"wrote {out} ({result.plan.output_width}x{result.plan.output_height})")
    return png_s
