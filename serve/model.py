"""One replica's model: networks loaded once, every served size warmed up; requests run alone or, when they share
a plan and options, denoised together as one UNet batch (runtime/batch.py; `group_requests` forms the groups).

The path from flags to a pipeline is `mf-generate`'s (cli/generate.py), so an image served here is the image
`mf-generate` writes for the same arguments, seed and device; the PNG is encoded as it saves it. On the CPU the
bytes also depend on torch's intra-op thread count (a replica runs with the threads Ray gives it, one per CPU
it reserves), so compare against `mf-generate` run with as many threads. No Ray here.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.families import ModelFamily
from ..core.loading import component_modules, load_model, resolve_family
from ..core.lora import check_loras, fuse_loras, parse_lora
from ..core.plan import Stage, StagePlan, default_plan, validate_plan
from ..core.specs import UNET, default_dtype, default_vae_dtype
from ..core.startup import share_distribution_scan
from ..engine.networks import TorchNetworks
from ..runtime.batch import BatchError, max_batch
from ..runtime.controlnet import Control
from ..runtime.pipeline import GenerationOptions, GenerationResult, MegaFusionPipeline

from .conditioned import ServerConditions
from .conditions import Conditions, Offered
from .config import ServeConfig
from .request import GenerateRequest, size_text, stages_text

log = logging.getLogger("ray.serve")

ENGINE_CACHE = 8
"""Opened engine sets kept per replica (one per distinct stage shapes, dilation and relay)."""


class Cancelled(Exception):
    """A request's work stopped between steps: its deadline passed or its caller went away."""


class ServeModelError(Exception):
    """The model cannot serve this request (engines that do not cover it); answered 400, naming why."""


def warmup_plan(family: ModelFamily, width: int, height: int) -> StagePlan:
    """The default plan's stages at `width` x `height`, one step each: CUDA graphs and compiled code depend on
    the shapes (and dilation and CFG batch), not on the step count, so this captures what the size needs."""
    plan = default_plan(family, width, height)
    return validate_plan(family, [Stage(s.height, s.width, 1) for s in plan.stages], width, height)


def group_requests(reqs: list[GenerateRequest], limit: Callable[[GenerateRequest], int]) -> list[list[int]]:
    """Indices of `reqs` in groups that run as one batch: equal `batch_key` (plan and every option but prompts
    and seed), at most `limit(req)` each, in order of each key's first arrival, arrival order within a key."""
    by_key: dict[tuple, list[list[int]]] = {}
    for i, req in enumerate(reqs):
        groups = by_key.setdefault(req.batch_key(), [[]])
        if len(groups[-1]) >= max(1, limit(req)):
            groups.append([])
        groups[-1].append(i)
    return [g for groups in by_key.values() for g in groups]


@dataclass
class Generated:
    """One served image and what it took."""

    png: bytes
    plan: StagePlan
    timings_ms: dict[str, float]
    seed: int
    peak_memory_bytes: int | None = None

    @property
    def plan_info(self) -> dict:
        return {"stages": stages_text(self.plan), "size": size_text(self.plan.output_width, self.plan.output_height)}


def keep_served_kernels(cfg: ServeConfig) -> None:
    """--mode compiled: Inductor's disk cache inside the compile cache, in this replica's process, before the model's
    imports make Inductor fix its cache folder (engine/compile_cache.py `keep_inductor_caches`)."""
    if cfg.mode == "compiled" and not cfg.no_compile_cache:
        from ..engine.compile_cache import default_root, keep_inductor_caches

        keep_inductor_caches(cfg.compile_cache or default_root())


def served_compile_cache(cfg: ServeConfig, nets, device: torch.device, family, cfg_batch: bool = True):
    """--mode compiled: a replica's compile cache, loaded before the warm-up compiles, so that a restart reuses the
    compiled functions of `nets` (FastTorchNetworks or FlowTorchNetworks) instead of tracing again, as mf-generate
    --mode compiled does; one key for the served sizes together (`cfg_batch`: the denoiser's CFG batch of 2).
    (cache, key, loaded), or None when off."""
    from dataclasses import replace

    from ..engine.compile_cache import CompileCache, cacheable, compile_key, default_root

    why = "--no-compile-cache" if cfg.no_compile_cache else cacheable(nets)
    if why:
        log.info("compile cache: off (%s)", why)
        return None
    cache = CompileCache(cfg.compile_cache or default_root())
    keys = [compile_key(nets, device, warmup_plan(family, w, h), cfg=cfg_batch) for w, h in cfg.served_sizes]
    key = replace(keys[0], shapes="served " + "; ".join(k.shapes for k in keys))
    loaded = cache.attach(nets, key)
    log.info("compile cache: %s %s", "warm start from" if loaded else "nothing yet for these sizes in", cache.root)
    return cache, key, loaded


def save_served_compiled(compile_cache, nets) -> None:
    """After the warm-up: what the replica compiled saved under its key, unless it was loaded from it."""
    if compile_cache is None:
        return
    cache, key, loaded = compile_cache
    if not loaded:
        cache.save(key)
    log.info("compiled functions: %s", nets.precompile_counters())


class ModelServer:
    """The networks of one replica and the pipelines over them, built as mf-generate builds them."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.family = resolve_family(cfg.model, cfg.model_path)
        self.device = torch.device(cfg.device)
        dtype = torch.bfloat16 if cfg.precision == "fp8" else default_dtype(self.device)  # mf-generate's rule
        loras = [parse_lora(v) for v in cfg.loras]
        share_distribution_scan()  # this replica's process, before the model's imports
        keep_served_kernels(cfg)
        t0 = time.perf_counter()
        if cfg.engines:  # engine weights are checked against fp32 CPU weights, as mf-build-engines hashed them
            # What engines run at every served size needs no weights in torch (built on the meta device), as
            # mf-generate --engines does it. With --lora the model loads whole: the swap reads its base weights.
            served = frozenset() if loras else engine_modules(cfg, self.family)
            self.bundle = load_model(cfg.model, cfg.model_path, cfg.random_weights, skip=served)
        else:
            self.bundle = load_model(cfg.model, cfg.model_path, cfg.random_weights, False, self.device, dtype)
        if loras:  # with engines the bundle keeps the base weights the engines were built from; they are swapped
            (check_loras if cfg.engines else fuse_loras)(self.bundle, loras)
        self.loras = loras
        vae = default_vae_dtype(self.family, self.bundle.vae.config, dtype, self.device)
        self.load_s = time.perf_counter() - t0
        self._lock = threading.Lock()  # one generation at a time on this replica's device
        self._engines: OrderedDict[tuple, MegaFusionPipeline] = OrderedDict()
        self.engines_desc: str | None = None
        self.conditions: ServerConditions | None = None
        self.control_pipe: MegaFusionPipeline | None = None
        self.control_modules: list = []
        self.compile_cache = None  # --mode compiled: (cache, key, loaded) of engine/compile_cache.py
        self.fp8_static = None  # torch path, --fp8-scales static: runtime/fp8_calibration.py's `StaticScales`
        if cfg.engines:
            self.mode = "eager" if self.device.type != "cuda" else "graphs"
            self.nets = None
            self.pipe = None
            if cfg.controlnets:  # loaded as mf-build-engines hashed them, fp32 on the CPU; engines run them
                from ..runtime.controlnet import load_controlnet

                self.control_modules = [load_controlnet(p, self.bundle.unet, torch.device("cpu"), torch.float32)
                                        for p in cfg.controlnets]
            if cfg.ip_adapter:  # the unet_ip engines hold its weights: only their input width is read here
                from ..engine.ipadapter_engines import embed_dim
                from ..runtime.ipadapter import read_ip_adapter

                self.ip_dim = embed_dim(read_ip_adapter(cfg.ip_adapter, self.bundle.unet))
                self._ip_encode = None  # image -> embeddings, made with the first unet_ip engines (`_ip_encoder`)
        else:
            # the IP-Adapter's image and scale change per request, outside anything a captured graph would see
            eager = self.device.type != "cuda" or cfg.ip_adapter is not None
            self.mode = cfg.mode or ("eager" if eager else "graphs")
            policy = None
            if cfg.precision == "fp8":
                from ..engine.fp8 import Fp8Policy

                policy = Fp8Policy(activations=cfg.fp8_scales)
            scales = self._static_scales(policy)
            if self.mode == "compiled":
                from ..engine.torch_fast import FastOptions, FastTorchNetworks, inductor_set

                self.nets = FastTorchNetworks(self.bundle, FastOptions(inductor_options=inductor_set("default"),
                                                                       unet_fp8=policy), vae_dtype=vae,
                                              fp8_scales=scales)
                self.fp8_static = self.nets.fp8_static
                self.compile_cache = served_compile_cache(cfg, self.nets, self.device, self.family)
            else:
                if policy is not None:
                    from ..engine.fp8 import quantize_unet

                    quantize_unet(self.bundle.unet, policy)
                    self.fp8_static = scales(self.bundle) if scales is not None else None
                self.nets = TorchNetworks(self.bundle, vae)
            nets = self.nets
            if cfg.controlnets or cfg.ip_adapter:
                self.conditions = ServerConditions(cfg, self.bundle, self.nets, self.device)
                nets = self.conditions.plain
                if self.conditions.controlled is not None:
                    self.control_pipe = self._pipeline(self.conditions.controlled)
            self.pipe = self._pipeline(nets)

    def _pipeline(self, nets) -> MegaFusionPipeline:
        mode = self.mode
        if mode != "eager" and not nets.capturable:  # declared by the backend, never assumed
            log.warning("%s engines cannot run inside the runtime's CUDA graphs; running the stages eagerly",
                        nets.backend)
            mode = "eager"
        if mode == "eager":
            return MegaFusionPipeline(self.bundle, nets, self.device)
        return MegaFusionPipeline.fast(self.bundle, nets, self.device)

    def pipeline_for(self, plan: StagePlan, dilation: int, relay: str) -> MegaFusionPipeline:
        """The pipeline that runs `plan`: the one over the torch modules, or one over engines opened for the
        plan's shapes (kept for the next request with the same shapes, dilation and relay)."""
        if self.pipe is not None:
            return self.pipe
        from ..engine.cache import EngineError
        from ..engine.load import open_engines

        def make() -> MegaFusionPipeline:
            try:
                nets, desc = open_engines(self.cfg.engines, self.bundle, plan, dilation, relay, self.device,
                                          precision=self.cfg.engines_precision, fp8_scales=self.cfg.fp8_scales)
            except EngineError as e:
                raise ServeModelError(str(e)) from None
            self.engines_desc = desc
            if self.loras:
                self._swap_loras(nets, plan, dilation)
            return self._pipeline(nets)

        return self._kept(plan, dilation, relay, "", make)

    def _kept(self, plan: StagePlan, dilation: int, relay: str, kind: str,
              make: Callable[[], MegaFusionPipeline]) -> MegaFusionPipeline:
        """The pipeline kept for the plan's shapes, dilation, relay and `kind` ("" plain, "controlnet",
        "ip-adapter"), else `make()`'s, kept: the ENGINE_CACHE most recently used."""
        key = (tuple((s.height, s.width) for s in plan.stages), plan.output_height, plan.output_width,
               dilation, relay, kind)
        pipe = self._engines.get(key)
        if pipe is None:
            pipe = self._engines[key] = make()
            while len(self._engines) > ENGINE_CACHE:
                self._engines.popitem(last=False)
        self._engines.move_to_end(key)
        return pipe

    def controlled_engines_for(self, plan: StagePlan, dilation: int, relay: str) -> MegaFusionPipeline:
        """With --engines and --controlnet: the plan's engines with the ControlNet engines and the controlled-UNet
        engine on their UNet step (engine/controlnet_engines.py), as mf-generate --engines --controlnet opens them;
        kept beside the plain ones. Engines missing for a ControlNet are a ServeModelError with the build command."""
        from ..engine.cache import EngineError
        from ..engine.controlnet_engines import open_controlnet_runners
        from ..runtime.controlnet import EngineControlledNetworks

        def make() -> MegaFusionPipeline:
            nets = self.pipeline_for(plan, dilation, relay).nets
            precision = "fp16" if nets.unet_dtype == torch.float16 else "fp32"
            try:
                cns, unets = open_controlnet_runners(self.cfg.engines, self.bundle, plan, self.control_modules,
                                                     list(self.cfg.controlnets), nets.backend, precision, dilation,
                                                     self.device, nets.weights.get("unet"))
            except EngineError as e:
                raise ServeModelError(str(e)) from None
            blank = torch.zeros(1, 3, 8, 8)  # each request's images are copied in by prepare_plan
            controlled = EngineControlledNetworks(nets, self.bundle, [Control(m, blank) for m in self.control_modules],
                                                  self.device, cns, unets)
            return self._pipeline(controlled)

        return self._kept(plan, dilation, relay, "controlnet", make)

    def ip_engines_for(self, plan: StagePlan, dilation: int, relay: str) -> MegaFusionPipeline:
        """With --engines and --ip-adapter: the plan's engines with the unet_ip engines on their UNet step
        (engine/ipadapter_engines.py), as mf-generate --engines --ip-adapter opens them; kept beside the plain ones,
        a pipeline of its own (under CUDA graphs its own captured steps, reading the embeddings' buffers). Missing
        entries, or entries of another scale, are a ServeModelError with the build command."""
        from ..engine.cache import EngineError
        from ..engine.ipadapter_engines import open_ip_runners
        from ..runtime.ipadapter import EngineIPAdapterNetworks, IPAdapterError

        def make() -> MegaFusionPipeline:
            nets = self.pipeline_for(plan, dilation, relay).nets
            precision = "fp16" if nets.unet_dtype == torch.float16 else "fp32"
            try:
                runners = open_ip_runners(self.cfg.engines, self.bundle, plan, self.ip_dim, self.cfg.ip_adapter,
                                          self.cfg.engines_ip_scale, nets.backend, precision, dilation, self.device,
                                          nets.weights.get("unet"))
                if self._ip_encode is None:
                    self._ip_encode = self._ip_encoder(nets.backend, precision, nets.unet_dtype)
            except (EngineError, IPAdapterError) as e:
                raise ServeModelError(str(e)) from None
            blank = torch.zeros(1, 1, self.ip_dim)  # each request's embeddings are copied in (set_image_embeds)
            return self._pipeline(EngineIPAdapterNetworks(nets, blank, runners, self.device))

        return self._kept(plan, dilation, relay, "ip-adapter", make)

    def _ip_encoder(self, backend: str, precision: str, dtype: torch.dtype):
        """image -> embeddings, as mf-generate --engines makes them: the folder's image encoder engine when it holds
        one for --ip-adapter-encoder, else the torch encoder on the device in the UNet engines' dtype."""
        from ..core.image_encoder import read_encoder_config
        from ..engine.image_encoder_engines import encode_with_engine, open_image_encoder
        from ..runtime.ipadapter import encode_ip_image, load_image_encoder, load_image_processor

        folder = self.cfg.ip_adapter_encoder
        got = int(read_encoder_config(folder).projection_dim)
        if got != self.ip_dim:
            raise ServeModelError(f"--ip-adapter-encoder {folder!r}: projects to {got} features; the IP-Adapter "
                                  f"{self.cfg.ip_adapter!r} takes {self.ip_dim}")
        engine = open_image_encoder(self.cfg.engines, self.family.name, folder, backend, precision, self.device)
        if engine is not None:
            processor = load_image_processor(folder)
            return lambda image: encode_with_engine(engine, processor, image, self.device)
        encoder, processor = load_image_encoder(folder, self.device, dtype)
        return lambda image: encode_ip_image(encoder, processor, image, self.device)

    def _static_scales(self, policy):
        """With --fp8-scales static on the torch modules: the callable that sets the quantized UNet's input scales,
        calibrated over the served sizes' default plans (what the warm-up runs; a request's other stages reuse
        them) and, under --mode compiled, kept with the compile cache; else None. The weights fingerprint is taken
        now, before the UNet is changed for speed."""
        from ..engine.compile_cache import default_root
        from ..engine.fp8_scales import ScaleStore
        from ..runtime.fp8_calibration import static_scales_provider

        plans = [default_plan(self.family, w, h) for w, h in self.cfg.served_sizes]
        keep = self.mode == "compiled" and not self.cfg.no_compile_cache
        store = ScaleStore(self.cfg.compile_cache or default_root()) if keep else None
        return static_scales_provider(self.bundle, policy, plans, 2, True, self.device, store, log.info)

    def warm_up(self) -> list[tuple[str, float]]:
        """Runs every served size once (captures its CUDA graphs, compiles on `compiled`); (size, seconds). With
        ControlNets, once more with a blank control image each: the controlled step has graphs and compiled code of
        its own (--mode compiled: the first SDXL 2048 generation with a ControlNet took 182 s on an H200,
        benchmarks/RESULTS.md, 2026-12-04), which a first request would otherwise wait for; with --engines, the
        ControlNet engines are opened and verified at start (mf-serve checked before Ray started that the folder
        covers every size: serve/preflight.py)."""
        from .conditions import ControlInput

        controlled = Conditions(controls=tuple(ControlInput(torch.zeros(1, 3, 64, 64)) for _ in self.cfg.controlnets))
        out = []
        for w, h in self.cfg.served_sizes:
            plan = warmup_plan(self.family, w, h)
            t0 = time.perf_counter()
            self.generate(GenerateRequest(plan, GenerationOptions("warm-up")))
            if controlled.controls:
                self.generate(GenerateRequest(plan, GenerationOptions("warm-up"), conditions=controlled))
            if self.cfg.engines and self.cfg.ip_adapter:  # opens the unet_ip engines and captures their steps too
                from PIL import Image

                ip = Conditions(ip_image=Image.new("RGB", (224, 224)), ip_scale=self.cfg.engines_ip_scale)
                self.generate(GenerateRequest(plan, GenerationOptions("warm-up"), conditions=ip))
            out.append((size_text(w, h), time.perf_counter() - t0))
        save_served_compiled(self.compile_cache, self.nets)
        return out

    def generate(self, req: GenerateRequest, should_stop: Callable[[], bool] | None = None) -> Generated:
        """Runs one request; `should_stop` is asked before the request and after every step (after every stage
        under CUDA graphs): when it says so, the work stops there and `Cancelled` is raised."""
        on_step = stop_checks(should_stop)
        with self._lock:
            if should_stop is not None and should_stop():
                raise Cancelled("stopped before it started")
            pipe = self.pipeline_for(req.plan, req.options.dilation, req.options.relay)
            if self.conditions is not None:  # the server's ControlNets and IP-Adapter, set for this request
                if self.conditions.networks_for(req.conditions) is self.conditions.controlled:
                    pipe = self.control_pipe
            elif req.conditions.ip_image is not None:  # engines: the unet_ip engines, the embeddings made once
                pipe = self.ip_engines_for(req.plan, req.options.dilation, req.options.relay)
                pipe.nets.set_image_embeds(self._ip_encode(req.conditions.ip_image))
            elif req.conditions.controls:  # engines: the ControlNet engines opened for the plan's shapes
                pipe = self.controlled_engines_for(req.plan, req.options.dilation, req.options.relay)
                pipe.nets.controls = [Control(m, c.image, c.scale, c.start, c.end)
                                      for m, c in zip(self.control_modules, req.conditions.controls)]
            result = pipe.generate(req.plan, req.options, on_step=on_step, image=req.conditions.image)
        return _generated(result, req.options.seed)

    def batch_limit(self, req: GenerateRequest) -> int:
        """How many requests like `req` may run as one batch: --max-batch, and no more than the engines' UNet
        batch covers (engines built for the CFG batch of 2 take one request at a time)."""
        if self.conditions is not None and self.conditions.ip is not None:
            return 1  # the IP-Adapter's networks take one request's embeddings at a time
        pipe = self.pipeline_for(req.plan, req.options.dilation, req.options.relay)
        cover = max_batch(pipe.nets, UNET)
        if cover is None:
            return self.cfg.max_batch
        return max(1, min(self.cfg.max_batch, cover // (2 if req.options.guidance > 1.0 else 1)))

    def generate_group(self, reqs: list[GenerateRequest],
                       should_stop: list[Callable[[], bool]] | None = None) -> list[Generated]:
        """Requests with one `batch_key`, denoised together (a single request runs as `generate` runs it). The work
        stops, raising `Cancelled`, only when every request of the group should stop: the others still want it."""
        if len(reqs) == 1:
            return [self.generate(reqs[0], should_stop[0] if should_stop else None)]

        def all_stop() -> bool:
            return should_stop is not None and all(stop() for stop in should_stop)

        on_step = stop_checks(all_stop if should_stop is not None else None)
        req = reqs[0]
        with self._lock:
            if all_stop():
                raise Cancelled("stopped before it started")
            pipe = self.pipeline_for(req.plan, req.options.dilation, req.options.relay)
            try:
                results = pipe.generate_batch(req.plan, [r.options for r in reqs], on_step=on_step)
            except BatchError as e:
                raise ServeModelError(str(e)) from None
        return [_generated(res, r.options.seed) for res, r in zip(results, reqs)]

    @property
    def offered(self) -> Offered:
        """The ControlNets and IP-Adapter requests may use here."""
        return Offered.of(self.cfg)

    @property
    def torch_side(self) -> list[str]:
        """The components loaded with weights in torch (the others, built on the meta device, run as engines)."""
        return [n for n in component_modules(self.bundle) if n not in self.bundle.skipped]

    def _swap_loras(self, nets, plan: StagePlan, dilation: int) -> None:
        """--lora with --engines: the LoRAs' weights put into the opened engines (engine/lora_swap.py), as
        mf-generate --engines --lora does; a refusal is a ServeModelError naming why."""
        from pathlib import Path

        from ..engine.cache import EngineError
        from ..engine.lora_swap import LoraSwap, swap_rebuild_command

        precision = next(r.spec.precision for (network, _), r in nets.runners.items() if network == "unet")
        rebuild = swap_rebuild_command(self.bundle, plan, nets.backend, precision, dilation, Path(self.cfg.engines),
                                       self.device)
        try:
            report = LoraSwap(nets, self.bundle, rebuild).swap(self.loras)
        except EngineError as e:
            raise ServeModelError(str(e)) from None
        log.info("lora swapped into %d %s engines (%d tensors) in %.2f s", report.engines, nets.backend,
                 report.tensors, report.seconds)

    def describe(self) -> dict:
        return {"model": self.family.name, "source": self.bundle.source, "device": str(self.device),
                "mode": self.mode, "engines": self.engines_desc or self.cfg.engines,
                "sizes": [size_text(w, h) for w, h in self.cfg.served_sizes],
                "weights_in_torch": self.torch_side, "loras": [f"{s.path} x{s.scale:g}" for s in self.loras],
                "precision": self.cfg.precision or str(self.nets.unet_dtype if self.nets else "engines"),
                "fp8_scales": self.cfg.fp8_scales if self.cfg.precision == "fp8" else None,
                "controlnets": len(self.cfg.controlnets), "ip_adapter": self.cfg.ip_adapter is not None,
                "ip_adapter_scale": self.cfg.engines_ip_scale}


def engine_modules(cfg: ServeConfig, family: ModelFamily) -> frozenset[str]:
    """The components engines run at every served size (the default plan's shapes, dilation 2, pixel relay): those
    load without weights. A request needing a skipped component on engines that do not cover it is refused by
    `open_engines` (a 400 naming the build command), as it would be with the weights loaded."""
    from ..engine.cache import EngineError

    served = None
    for w, h in cfg.served_sizes:
        try:
            sel = cfg.served_selection(family, w, h)
        except EngineError:
            return frozenset()  # the warm-up refuses it by name, with the weights loaded as before
        served = sel.modules_served() if served is None else served & sel.modules_served()
    return served or frozenset()


def stop_checks(should_stop: Callable[[], bool] | None) -> Callable[[int, int], None] | None:
    """The pipelines' `on_step` that raises `Cancelled` when `should_stop` says so; None when nothing asks."""
    if should_stop is None:
        return None

    def on_step(k: int, i: int):
        if should_stop():
            raise Cancelled(f"stopped at stage {k + 1}, step {i + 1}")

    return on_step


def _generated(result: GenerationResult, seed: int) -> Generated:
    timings = {name: round(seconds * 1000, 3) for name, seconds in result.timings}
    return Generated(result.png_bytes(), result.plan, timings, seed, result.peak_memory_bytes)
