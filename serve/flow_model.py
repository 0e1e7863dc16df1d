"""One replica's SD3 / FLUX model: the flow-matching runtime (runtime/flow_pipeline.py) behind the interface of
serve/model.py's `ModelServer`, built as `mf-generate --model sd3|flux` builds it (cli/generate_flow.py), so a
served image is the image mf-generate writes for the same arguments, seed, device and thread count.

Every request runs alone: the flow runtime has no batched loop (runtime/batch.py is the UNet's), so `batch_limit`
is 1 and `@serve.batch` only queues. Warm-up runs each served size's default stage shapes once, at the family's
default guidance (SD3's CFG batch of 2, FLUX's one pass), as the UNet server does. No Ray here.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from ..core.dit_loading import components
from ..core.loading import load_model, resolve_family
from ..core.lora import check_loras, fuse_loras, parse_lora
from ..core.plan import StagePlan
from ..runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

from .conditions import Offered
from .config import ConfigError, ServeConfig
from .flow_config import cfg_batch, check_served_memory, choose_served_engines, dit_mode, dit_precision
from .model import (Cancelled, Generated, ServeModelError, _generated, keep_served_kernels, log, save_served_compiled,
                    served_compile_cache, stop_checks, warmup_plan)
from .request import GenerateRequest, size_text


class FlowModelServer:
    """The networks of one SD3 / FLUX replica and the flow pipelines over them (plain, and with ControlNets)."""

    def __init__(self, cfg: ServeConfig):
        from ..engine.flow_networks import FlowTorchNetworks

        self.cfg = cfg
        self.family = resolve_family(cfg.model, cfg.model_path)
        self.device = torch.device(cfg.device)
        self.precision = dit_precision(cfg.device)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32  # mf-generate's rule
        self.loras = [parse_lora(v) for v in cfg.loras]
        self.mode = dit_mode(cfg)
        t0 = time.perf_counter()
        kind = choose_served_engines(cfg, self.family) if cfg.engines else None  # before the load, as mf-generate
        keep_served_kernels(cfg)  # before the memory estimate's and the load's imports fix Inductor's cache folder
        check_served_memory(cfg, self.family, self.device, dtype)
        self.bundle = load_model(cfg.model, cfg.model_path, cfg.random_weights, False, self.device, dtype)
        if self.loras:  # engines take them themselves (swapped, or packages built with them): checked only here
            (check_loras if kind is not None else fuse_loras)(self.bundle, self.loras)
        self.kind = kind
        self._checked: set[tuple] = set()
        if kind is not None:
            from ..engine.backend import get_backend

            nets = kind.networks(self.bundle, cfg.engines, self.device, self.precision, None, self.loras)
            if self.mode == "graphs" and get_backend(kind.backend).capture_note:  # declared, never assumed
                log.warning("%s engines cannot run inside the runtime's CUDA graphs; running the stages eagerly",
                            kind.backend)
                self.mode = "eager"
        else:
            nets = FlowTorchNetworks(self.bundle, None, compiled=self.mode == "compiled")
        self.compile_cache = None  # --mode compiled: (cache, key, loaded) of engine/compile_cache.py
        if self.mode == "compiled":  # the plain networks, before conditions wrap them
            self.compile_cache = served_compile_cache(cfg, nets, self.device, self.family,
                                                      cfg_batch(self.family) == 2)
        self.nets = nets
        self.conditions = None
        self.control_pipe = None
        self.control_modules: list = []
        self._control_engines: dict[tuple, FlowMegaFusionPipeline] = {}
        if kind is not None and cfg.controlnets:  # their packages open per plan (controlled_engines_for)
            from ..runtime.flow_controlnet import load_flow_controlnet

            self.control_modules = [load_flow_controlnet(p, self.bundle.transformer, self.family, self.device, dtype)
                                    for p in cfg.controlnets]
        elif cfg.controlnets or cfg.ip_adapter:
            from .flow_conditioned import FlowServerConditions

            self.conditions = FlowServerConditions(cfg, self.bundle, nets, self.device)
            nets = self.conditions.plain
            if self.conditions.controlled is not None:
                self.control_pipe = FlowMegaFusionPipeline(self.bundle, self.conditions.controlled, self.device,
                                                           self.mode)
        self.pipe = FlowMegaFusionPipeline(self.bundle, nets, self.device, self.mode)
        self.load_s = time.perf_counter() - t0
        self._lock = threading.Lock()  # one generation at a time on this replica's device

    def _check_engines(self, plan: StagePlan, guidance: float) -> None:
        """With --engines: the folder serves the plan's stage shapes at this request's transformer batch, else a
        ServeModelError naming what is missing and the build command (as mf-generate refuses it)."""
        if self.kind is None:
            return
        from ..engine.cache import EngineError

        batch = 2 if self.family.cfg and guidance > 1.0 else 1
        key = (tuple((s.height, s.width) for s in plan.stages), batch)
        if key in self._checked:
            return
        try:
            self.kind.check(self.cfg.engines, self.family, plan, self.device, self.precision, batch)
        except EngineError as e:
            raise ServeModelError(str(e)) from None
        self._checked.add(key)

    def controlled_engines_for(self, plan: StagePlan, guidance: float) -> FlowMegaFusionPipeline:
        """With --engines and --controlnet: the ControlNet and controlled-transformer packages for the plan's stage
        shapes (engine/dit_controlnet_engines.py), as mf-generate --engines --controlnet opens them; kept per shapes
        and transformer batch. Missing or stale packages are a ServeModelError with the build command."""
        from ..engine.cache import EngineError
        from ..engine.dit_controlnet_engines import open_dit_controlnet_engines
        from ..runtime.controlnet import Control
        from ..runtime.flow_controlnet_engines import EngineControlledFlowNetworks

        from .flow_config import check_served_control_engines

        batch = 2 if self.family.cfg and guidance > 1.0 else 1
        key = (tuple((s.height, s.width) for s in plan.stages), batch)
        pipe = self._control_engines.get(key)
        if pipe is None:
            try:
                check_served_control_engines(self.cfg, self.family, plan, batch)
                runners, transformer = open_dit_controlnet_engines(self.cfg.engines, self.bundle, plan,
                                                                   self.control_modules, list(self.cfg.controlnets),
                                                                   self.device, self.precision, batch)
            except (ConfigError, EngineError) as e:
                raise ServeModelError(str(e)) from None
            blank = torch.zeros(1, 3, 8, 8)  # each request's images are set by generate, encoded by prepare_plan
            nets = EngineControlledFlowNetworks(self.nets, [Control(m, blank) for m in self.control_modules],
                                                self.device, runners, transformer)
            mode = self.mode if nets.capturable else "eager"
            pipe = self._control_engines[key] = FlowMegaFusionPipeline(self.bundle, nets, self.device, mode)
        return pipe

    def warm_up(self) -> list[tuple[str, float]]:
        """Runs every served size once with the default plan's stage shapes, one step each: graphs and compiled
        code depend on the shapes and the transformer batch, not on the step count; (size, seconds). With
        ControlNets, once more with a blank control image each (their own graphs; with --engines their packages
        opened and verified at start)."""
        from .conditions import Conditions, ControlInput

        controlled = Conditions(controls=tuple(ControlInput(torch.zeros(1, 3, 64, 64)) for _ in self.cfg.controlnets))
        out = []
        for w, h in self.cfg.served_sizes:
            plan = warmup_plan(self.family, w, h)
            t0 = time.perf_counter()
            opts = FlowGenerationOptions("warm-up", guidance=self.family.default_guidance)
            self.generate(GenerateRequest(plan, opts))
            if controlled.controls:
                self.generate(GenerateRequest(plan, opts, controlled))
            out.append((size_text(w, h), time.perf_counter() - t0))
        save_served_compiled(self.compile_cache, self.nets)
        return out

    def generate(self, req: GenerateRequest, should_stop: Callable[[], bool] | None = None) -> Generated:
        """Runs one request; `should_stop` is asked before it and after every step (every stage under graphs)."""
        on_step = stop_checks(should_stop)
        with self._lock:
            if should_stop is not None and should_stop():
                raise Cancelled("stopped before it started")
            self._check_engines(req.plan, req.options.guidance)
            pipe, c = self.pipe, self.conditions
            if c is not None and c.networks_for(req.conditions) is not c.plain:  # sets the IP-Adapter's image too
                pipe = self.control_pipe
            elif req.conditions.controls:  # engines: the ControlNet packages opened for the plan's shapes
                from ..runtime.controlnet import Control

                pipe = self.controlled_engines_for(req.plan, req.options.guidance)
                pipe.nets.controls = [Control(m, c.image, c.scale, c.start, c.end)
                                      for m, c in zip(self.control_modules, req.conditions.controls)]
            result = pipe.generate(req.plan, req.options, on_step=on_step, image=req.conditions.image)
        return _generated(result, req.options.seed)

    def batch_limit(self, req: GenerateRequest) -> int:
        return 1  # the flow runtime denoises one request at a time

    def generate_group(self, reqs: list[GenerateRequest],
                       should_stop: list[Callable[[], bool]] | None = None) -> list[Generated]:
        """Groups hold one request here (`batch_limit`); any longer one runs its requests one after another."""
        return [self.generate(r, should_stop[i] if should_stop else None) for i, r in enumerate(reqs)]

    @property
    def offered(self) -> Offered:
        return Offered.of(self.cfg)

    def describe(self) -> dict:
        # with engines too: mf-generate's flow path loads the whole bundle (engines stand in for the transformer call)
        held = [c for c in components(self.family) if not c.startswith("tokenizer")]
        return {"model": self.family.name, "source": self.bundle.source, "device": str(self.device),
                "mode": self.mode, "engines": self.cfg.engines and f"{self.kind.backend} {self.kind.what} in "
                                                                  f"{self.cfg.engines}",
                "sizes": [size_text(w, h) for w, h in self.cfg.served_sizes], "weights_in_torch": held,
                "loras": [f"{s.path} x{s.scale:g}" for s in self.loras], "precision": self.precision,
                "controlnets": len(self.cfg.controlnets), "ip_adapter": self.cfg.ip_adapter is not None,
                "batching": "none (the flow runtime runs one request at a time)"}


def open_model_server(cfg: ServeConfig):
    """The replica's model: `FlowModelServer` for SD3 / FLUX, serve/model.py's `ModelServer` for the UNet families."""
    from ..core.dit_families import is_dit
    from .model import ModelServer

    return FlowModelServer(cfg) if is_dit(resolve_family(cfg.model, cfg.model_path)) else ModelServer(cfg)
