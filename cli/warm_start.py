"""mf-generate --mode compiled and its compile cache (engine/compile_cache.py), for the UNet families and for SD3 /
FLUX alike: the flags checked before the model load, Inductor's cache placed before anything imports Inductor, the
compiled functions attached after the networks are built, and what the process compiled saved after its image."""
from __future__ import annotations

import argparse

from .common import UsageError


def check_compile_cache_flags(args: argparse.Namespace) -> None:
    """--compile-cache / --no-compile-cache only with --mode compiled, and the folder one that can be written (it is
    written after minutes of compiling: checked first)."""
    if (args.compile_cache or args.no_compile_cache) and args.mode != "compiled":
        raise UsageError("--compile-cache and --no-compile-cache apply to --mode compiled only")
    if args.compile_cache is not None:
        from .common import output_folder_from_args

        output_folder_from_args("--compile-cache", args.compile_cache)


def keep_compiled_kernels(args: argparse.Namespace, mode: str) -> dict[str, str]:
    """--mode compiled with its compile cache: Inductor's disk cache inside it (engine/compile_cache.py
    `keep_inductor_caches`), set before the model load, whose imports make Inductor fix its folder for the process
    (from TORCHINDUCTOR_CACHE_DIR, else the system's temporary folder). Returns what it set."""
    from ..engine.compile_cache import default_root, keep_inductor_caches

    if mode != "compiled" or args.no_compile_cache:
        return {}
    return keep_inductor_caches(args.compile_cache or default_root())


def warm_start(args: argparse.Namespace, nets, device, plan, relay: str, cfg: bool):
    """--mode compiled: load the compiled code an earlier process saved for this model, plan and device, and keep
    what this one compiles (engine/compile_cache.py); `cfg`: the denoiser runs the CFG batch of 2. Returns (cache,
    key, loaded), or None when the cache is off."""
    from ..engine.compile_cache import CompileCache, cacheable, compile_key, default_root

    if args.no_compile_cache:
        return None
    why = cacheable(nets)
    if why:
        print(f"compile cache: off ({why})")
        return None
    cache = CompileCache(args.compile_cache or default_root())
    key = compile_key(nets, device, plan, relay, cfg)
    loaded = cache.attach(nets, key)
    print(f"compile cache: {'warm start from' if loaded else 'nothing yet for this model and plan in'} {cache.root}")
    return cache, key, loaded


def precompile_line(nets) -> str:
    """What the compiled functions did in this process: traced (and saved) or loaded without tracing."""
    missing = next((site.missing for site in nets.precompiled if site.missing), "")
    if missing:
        return f"compiled functions: not kept ({missing}); Dynamo traces in every process"
    c = nets.precompile_counters()
    return (f"compiled functions: {c['loaded']} loaded, {c['traced']} traced, {c['saved']} saved, "
            f"{c['rejected']} rejected")


def finish_compiled(nets, compile_cache) -> None:
    """After the first image of --mode compiled: where torch.compile's time went, what the kept functions did, and
    this process's compiled artifacts saved under the key unless they were loaded from it."""
    from ..benchmarks.cold_start import compile_line
    from ..engine.compile_cache import compile_profile

    print(compile_line(*compile_profile()))
    print(precompile_line(nets))
    if compile_cache is not None and not compile_cache[2]:
        saved = compile_cache[0].save(compile_cache[1])
        print(f"compile cache: saved {saved}" if saved else "compile cache: torch had nothing to save")
