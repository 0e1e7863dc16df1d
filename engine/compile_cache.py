"""Warm start for the compiled path: what `torch.compile` produced in one process (Inductor's FX graph,
AOTAutograd and autotuning caches, serialized by `torch.compiler.save_cache_artifacts`) is kept in a
content-addressed folder and loaded by the next process before it compiles, so that its first generation
reuses the compiled kernels instead of compiling them again. Dynamo would still trace the modules in each new
process (28-30 s for SDXL 2048 on the H200, benchmarks/RESULTS.md, thirteenth session); the compiled functions
themselves are kept beside the artifacts (`functions`, engine/precompiled.py) so that it does not.

The key holds everything the compiled code depends on: the model's architecture (the configs, not the
weights: parameters are graph inputs, except under Inductor's `freezing`, which this cache refuses), the
dtypes, the fast-path options, the torch version, the device, and the versions of the code traced (diffusers,
transformers, peft, triton, megafusion's own sources). Files are written atomically and verified
by sha256 before they are loaded; a foreign or damaged file is ignored and replaced after the next compile.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cache import atomic_write, device_name


@dataclass(frozen=True)
class CompileKey:
    """What compiled artifacts are valid for."""

    model: str
    """Model family name."""
    architecture: str
    """sha256 of the UNet's (or transformer's) and VAE's configs (the same family with another config compiles other
    code)."""
    unet_dtype: str
    """The denoiser's dtype: the UNet's, or the transformer's (the field keeps its name, so kept entries stay valid)."""
    vae_dtype: str
    options: str
    """The fast path's options (`FastOptions`), as repr; for a transformer also the kinds of its layers and attention
    processors (FP8 layers, an IP-Adapter's processors trace other code under the same configs)."""
    shapes: str
    """The plan's stage sizes, relay and CFG batch: compiled with static shapes, a plan's code is its own."""
    torch: str
    """torch version: artifacts of another release are not loadable."""
    device: str
    """'cpu' or the GPU's name: kernels are tuned for one GPU."""
    code: str = ""
    """The code traced into the compiled functions (`traced_code`): a loaded function runs the code it was traced
    from, and its guards do not check that code."""

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


TRACED_PACKAGES = ("diffusers", "transformers", "peft", "triton")
"""Packages whose code runs inside the compiled call sites (peft through diffusers' LoRA hooks: a cache filled
with peft installed was rejected without it on the H200, fourteenth session)."""


@functools.cache
def traced_code() -> str:
    """The versions of TRACED_PACKAGES ('-' where absent) and a sha256 of megafusion's engine and core sources (the
    module changes of the fast path are traced too, and an edited checkout keeps its version string)."""
    from importlib import metadata

    versions = []
    for name in TRACED_PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} -")
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for sub in ("core", "engine"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f"{sub}/{f.name}\0".encode() + f.read_bytes())
    return ", ".join(versions) + f", megafusion {h.hexdigest()[:16]}"


def compile_key(nets, device: torch.device | str, plan, relay: str = "pixel", cfg: bool = True) -> CompileKey:
    """The key of compiled networks' code for one plan on `device`: `FastTorchNetworks` (the UNet families) or
    `FlowTorchNetworks` (SD3, FLUX), each naming what its code depends on (`compile_identity`). `cfg`: the
    denoiser runs the CFG batch of 2."""
    modules, dtype, vae_dtype, options = nets.compile_identity()
    # Config metadata (`_use_default_values`, `_name_or_path`, ...) is left out: set-ordered, not architecture.
    arch = {name: {k: v for k, v in dict(m.config).items() if not k.startswith("_")} for name, m in modules.items()}
    configs = json.dumps(arch, sort_keys=True, default=str)
    shapes = f"{','.join(str(s) for s in plan.stages)} relay {relay} batch {2 if cfg else 1}"
    return CompileKey(nets.bundle.family.name, hashlib.sha256(configs.encode()).hexdigest(), dtype, vae_dtype,
                      options, shapes, torch.__version__, device_name(device), traced_code())


def cacheable(nets) -> str:
    """'' if the compiled code can be cached, else why not."""
    if any(k == "freezing" and v for k, v in nets.options.inductor_options):
        return "Inductor's freezing folds the weights into the compiled code"
    return ""


class CompileCache:
    """A folder of `compiled-<digest>.bin` artifacts, each with a `.json` record (key, size, sha256)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _paths(self, key: CompileKey) -> tuple[Path, Path]:
        stem = self.root / f"compiled-{key.digest()[:32]}"
        return stem.with_suffix(".bin"), stem.with_suffix(".json")

    def functions(self, key: CompileKey) -> Path:
        """The folder of `key`'s compiled functions (engine/precompiled.py): with them a process skips tracing."""
        return self.root / f"compiled-{key.digest()[:32]}-functions"

    def load(self, key: CompileKey) -> bool:
        """Hot-loads the artifacts of `key` into this process's compile caches; False if there are none valid."""
        data_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            data = data_path.read_bytes()
        except (OSError, ValueError):
            return False
        if meta.get("key") != asdict(key) or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return False  # another key under a colliding name, or a damaged file: compile, then replace it
        return torch.compiler.load_cache_artifacts(data) is not None

    def attach(self, nets, key: CompileKey) -> bool:
        """Loads `key`'s artifacts (`load`) and puts the compiled call sites of `nets` (FastTorchNetworks or
        FlowTorchNetworks) on its functions folder, as every warm start must; whether the artifacts loaded."""
        loaded = self.load(key)
        nets.keep_compiled(self.functions(key))
        return loaded

    def save(self, key: CompileKey) -> Path | None:
        """Writes what this process compiled so far under `key`; None if torch had nothing to save."""
        got = torch.compiler.save_cache_artifacts()
        if got is None:
            return None
        data = got[0]
        data_path, meta_path = self._paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"key": asdict(key), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(data_path, data)  # the .bin first: a reader never sees a record without its data
        atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        return data_path


def keep_inductor_caches(root: str | os.PathLike) -> dict[str, str]:
    """Inductor's own disk cache inside the compile cache (`<root>/inductor`; Triton's goes under it unless
    TRITON_CACHE_DIR is set) unless the user set TORCHINDUCTOR_CACHE_DIR: a loaded compiled function still builds
    its kernels (C++ on the CPU, Triton on CUDA) unless that cache holds them, and the system's temporary folder
    may not outlive the machine. Sets this process's environment (call it from a CLI, before compiling); returns
    what it set."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return {}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(root).resolve() / "inductor")
    return {"TORCHINDUCTOR_CACHE_DIR": os.environ["TORCHINDUCTOR_CACHE_DIR"]}


def default_root() -> Path:
    """$MEGAFUSION_CACHE/compiled, else ~/.cache/megafusion/compiled."""
    base = os.environ.get("MEGAFUSION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megafusion")
    return Path(base) / "compiled"


def inductor_counts() -> dict[str, int]:
    """Inductor's FX graph cache hits and misses in this process (a warm start shows misses 0)."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return {"fxgraph_cache_hit": int(c["fxgraph_cache_hit"]), "fxgraph_cache_miss": int(c["fxgraph_cache_miss"])}


# torch._dynamo.utils.compile_times' function names -> the parts a cold start report names (missing ones count 0)
_COMPILE_PARTS = {"dynamo": "_compile.compile_inner", "backend": "OutputGraph.call_user_compiler",
                  "guards": "build_guards", "kernel waits": "async_compile.wait", "c++ builds": "compile_file",
                  "module loads": "PyCodeCache.load_by_key_path"}


def compile_profile() -> tuple[dict[str, float], dict[str, int]]:
    """Where this process's torch.compile time went, from Dynamo's own timers and Inductor's counters: seconds of
    tracing (Dynamo, less its backend and guards), the backend (AOTAutograd and Inductor, cache lookups and loads
    included), guards, waits on kernel compiles (Triton; C++ builds on the CPU) and compiled-module loads; and the
    FX graph and AOTAutograd cache hits and misses. Calls served by kept compiled functions (engine/precompiled.py)
    show none of these: they are neither traced nor compiled in this process."""
    from torch._dynamo.utils import compile_times, counters

    try:
        names, values = compile_times(repr="csv", aggregate=True)
        times = {n: float(v) for n, v in zip(names, values)}
    except (TypeError, ValueError):  # another release's format: report counts only
        times = {}
    got = {part: times.get(name, 0.0) for part, name in _COMPILE_PARTS.items()}
    seconds = {"tracing": max(got["dynamo"] - got["backend"] - got["guards"], 0.0), "backend": got["backend"],
               "guards": got["guards"], "kernel waits": got["kernel waits"] + got["c++ builds"],
               "module loads": got["module loads"]}
    fx, aot = inductor_counts(), counters["aot_autograd"]
    counts = {"fx graph hit": fx["fxgraph_cache_hit"], "fx graph miss": fx["fxgraph_cache_miss"],
              "aot autograd hit": int(aot["autograd_cache_hit"]), "aot autograd miss": int(aot["autograd_cache_miss"])}
    return seconds, counts
