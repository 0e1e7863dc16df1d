"""The Ray Serve application: a FastAPI ingress and the model deployment, as two Serve applications.

`megafusion` (route `/`) is the ingress: it checks requests (400), answers readiness and lists what is served,
and calls the model through a deployment handle, turning what comes back into HTTP: 429 when the model's
queue is full (`max_queued_requests`), 504 at `--timeout` (the call is cancelled and the replica stops the
request's work at its next step), 503 while no model replica is warm or when the replica running a request
dies (Serve restarts it). `megafusion-model` (no route) holds the model replicas: each loads the networks and
runs every served size once in its constructor, so Serve counts it running only when it is warm; requests
are collected with @serve.batch, and those with the same plan and options are denoised together as one UNet
batch (`ModelServer.generate_group`).

The ingress goes up first, so `/v1/health` answers 503 while the model warms.
"""

import asyncio
import base64
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import metrics
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.config import BackpressureConfig, HTTPOptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from ..core.loading import resolve_family

from .conditions import Offered
from .config import ServeConfig
from .request import RequestError, parse_body, parse_request, size_text, wants_json

APP = "megafusion"
"""The ingress application (route `/`)."""
MODEL_APP = "megafusion-model"
"""The model application (no route; called by the ingress)."""
MODEL = "Generator"
"""The model deployment's name."""

PROXY_TIMEOUT_MARGIN_S = 30.0
"""Serve's own end-to-end HTTP timeout (408) is --timeout plus this: a backstop behind the ingress's 504."""
READY_CACHE_S = 1.0
"""How long the ingress trusts a 'ready' answer from the controller before asking again."""
HEALTH_PERIOD_S = 2.0
"""Serve's health check period for model replicas: how soon the controller notices one that died."""
DEATH_WINDOW_S = HEALTH_PERIOD_S + 3.0
"""For this long after the ingress saw a replica die, it counts that replica out itself (the controller's
status still lists it as running until its next health check)."""
RETRY_AFTER_S = 5
"""Retry-After on 429 and 503 answers."""

log = logging.getLogger("ray.serve")
api = FastAPI(title="megafusion", description="MegaFusion image generation (truncate and relay)")


def _json(status: int, obj: dict, headers: dict | None = None) -> Response:
    """One JSON line."""
    return Response(json.dumps(obj, separators=(", ", ": ")) + "\n", status, headers, "application/json")


def _error(status: int, message: str, retry: bool = False) -> Response:
    return _json(status, {"error": message}, {"Retry-After": str(RETRY_AFTER_S)} if retry else None)


def model_replicas(status) -> tuple[int, int, str]:
    """(running model replicas, all model replicas, application status) from `serve.status()`."""
    app = status.applications.get(MODEL_APP)
    if app is None:
        return 0, 0, "NOT_STARTED"
    dep = app.deployments.get(MODEL)
    if dep is None:
        return 0, 0, str(getattr(app.status, "value", app.status))
    states = {str(getattr(k, "value", k)): n for k, n in dep.replica_states.items()}
    return states.get("RUNNING", 0), sum(states.values()), str(getattr(app.status, "value", app.status))


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """HTTP in front of the model: checks, readiness, timeouts, and the status codes of back-pressure."""

    def __init__(self, cfg: dict):
        self.cfg = ServeConfig.from_dict(cfg)
        self.family = resolve_family(self.cfg.model, self.cfg.model_path)
        self.sizes = self.cfg.served_sizes
        self.offered = Offered.of(self.cfg)
        self._handle = None
        self._ready_at = 0.0
        self._deaths: dict[object, float] = {}  # replica actor -> when this ingress saw it die (monotonic)

    def _model(self):
        if self._handle is None:
            self._handle = serve.get_deployment_handle(MODEL, MODEL_APP)
        return self._handle

    async def _readiness(self) -> tuple[bool, dict]:
        running, total, app_status = await asyncio.to_thread(lambda: model_replicas(serve.status()))
        now = time.monotonic()
        self._deaths = {a: t for a, t in self._deaths.items() if now - t < DEATH_WINDOW_S}
        running = max(0, running - len(self._deaths))
        info = {"replicas_warm": running, "replicas": total, "replicas_wanted": self.cfg.replicas,
                "model_app": app_status}
        if running > 0:
            self._ready_at = time.monotonic()
        return running > 0, info

    async def _ready(self) -> bool:
        if time.monotonic() - self._ready_at < READY_CACHE_S:
            return True
        return (await self._readiness())[0]

    @api.get("/v1/health")
    async def health(self) -> Response:
        ready, info = await self._readiness()
        if ready:
            return _json(200, {"status": "ready", **info})
        failed = info["model_app"] in ("DEPLOY_FAILED", "UNHEALTHY")
        return _json(503, {"status": "failed" if failed else "warming", **info}, {"Retry-After": str(RETRY_AFTER_S)})

    @api.get("/v1/models")
    async def models(self) -> Response:
        c = self.cfg
        mode = c.mode or ("graphs" if c.device == "cuda" and not c.ip_adapter else "eager")
        return _json(200, {"model": c.model, "family": self.family.kind,
                           "sizes": [size_text(w, h) for w, h in self.sizes],
                           "engines": c.engines, "mode": "engines" if c.engines else mode, "device": c.device,
                           "replicas": c.replicas, "max_batch": c.max_batch, "max_queue": c.max_queue,
                           "timeout_s": c.timeout_s, "loras": list(c.loras), "precision": c.precision,
                           "fp8_scales": c.fp8_scales if c.precision == "fp8" else None,
                           "controlnets": len(c.controlnets), "ip_adapter": c.ip_adapter is not None,
                           "ip_adapter_scale": c.engines_ip_scale})

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        t0 = time.monotonic()
        try:
            body = parse_body(await request.body())
            await asyncio.to_thread(parse_request, body, self.family, self.sizes, self.offered)  # decodes images
        except RequestError as e:
            return _error(400, str(e))
        if not await self._ready():
            return _error(503, "the model is warming up; retry", retry=True)
        deadline = time.time() + self.cfg.timeout_s
        response = self._model().generate.remote({"body": body, "deadline": deadline})

        async def answer():
            return await response

        try:
            out = await asyncio.wait_for(answer(), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()  # best effort: drops it from the queue, or the replica stops at its next step
            return _error(504, f"no answer within --timeout {self.cfg.timeout_s:g} s; the request was cancelled")
        except asyncio.CancelledError:  # the client went away (Serve cancels the ingress call): stop the work too
            response.cancel()
            raise
        except BackPressureError:
            return _error(429, f"the queue is full ({self.cfg.max_queue} waiting); retry later", retry=True)
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, TaskCancelledError) as e:
            log.warning("a model replica failed during a request: %s", type(e).__name__)
            if isinstance(e, RayActorError):
                self._deaths.setdefault(getattr(e, "actor_id", None) or id(e), time.monotonic())
                self._ready_at = 0.0
            return _error(503, "the model replica serving this request stopped; it is being restarted, retry",
                          retry=True)
        if out["status"] != 200:
            return _error(out["status"], out["error"], retry=out["status"] == 503)
        queue_ms = round((time.monotonic() - t0) * 1000 - sum(out["timings_ms"].values()), 1)
        headers = {"X-MegaFusion-Plan": json.dumps(out["plan"]),
                   "X-MegaFusion-Timings-Ms": json.dumps(out["timings_ms"]),
                   "X-MegaFusion-Seed": str(out["seed"]), "X-MegaFusion-Batch-Size": str(out["batch_size"]),
                   "X-MegaFusion-Replica": out["replica"], "X-MegaFusion-Wait-Ms": str(queue_ms)}
        if wants_json(request.headers.get("accept")):
            return _json(200, {"image_base64": base64.b64encode(out["png"]).decode("ascii"), "plan": out["plan"],
                               "timings_ms": out["timings_ms"], "seed": out["seed"],
                               "batch_size": out["batch_size"], "replica": out["replica"]}, headers)
        return Response(out["png"], 200, headers, "image/png")


@dataclass
class _Job:
    """One request inside a model replica."""

    body: dict
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.time() >= self.deadline


@serve.deployment(max_constructor_retry_count=1, health_check_period_s=HEALTH_PERIOD_S, graceful_shutdown_timeout_s=5)
class Generator:
    """One model replica: warm before it is counted running; requests alike are denoised as one batch."""

    def __init__(self, cfg: dict):
        from . import __file__ as package_file
        from .flow_model import open_model_server

        self.cfg = ServeConfig.from_dict(cfg)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        here = os.path.dirname(os.path.realpath(package_file))
        log.info("replica %s: megafusion.serve from %s, pid %d", self.replica, here, os.getpid())
        self.server = open_model_server(self.cfg)  # SD3 / FLUX: the flow runtime (serve/flow_model.py)
        log.info("replica %s: %s loaded (%s) on %s in %.1f s, mode %s; %s", self.replica, self.cfg.model,
                 self.server.bundle.source, self.server.device, self.server.load_s, self.server.mode,
                 _loaded_line(self.server.describe()))
        for size, seconds in self.server.warm_up():
            log.info("replica %s: warm-up %s done in %.2f s (%s)", self.replica, size, seconds,
                     {"eager": "eager", "graphs": "CUDA graphs captured",
                      "compiled": "compiled and captured"}[self.server.mode])
        self._batched.set_max_batch_size(self.cfg.max_batch)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_s)
        self.broken: str | None = None
        # Serve's own serve_actual_batch_size counts what @serve.batch collected; this counts what ran as one batch.
        self._unet_batch = metrics.Histogram(
            "megafusion_denoise_batch_size", description="Requests denoised together as one UNet batch.",
            boundaries=[1.5, 2.5, 4.5, 8.5, 16.5])
        self._segment_ms = metrics.Histogram(
            "megafusion_segment_ms", description="Each request's share of a plan segment (stage, relay, decode), ms.",
            boundaries=[10, 30, 100, 300, 1000, 3000, 10000, 30000], tag_keys=("segment",))

    async def generate(self, payload: dict) -> dict:
        job = _Job(payload["body"], payload["deadline"])
        try:
            return await self._batched(job)
        except asyncio.CancelledError:
            job.cancelled.set()  # the caller gave up: the running batch stops this job at its next step
            raise

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, jobs: list[_Job]) -> list[dict]:
        return await asyncio.to_thread(self._run_batch, jobs)

    def _run_batch(self, jobs: list[_Job]) -> list[dict]:
        """Requests with the same plan and options (everything but prompts and seed) are denoised together, up to
        --max-batch and what the engines cover (`group_requests`); each keeps its own prompt, seed and noise."""
        from .model import group_requests

        checked: list[tuple[int, object]] = []
        out: list[dict | None] = [None] * len(jobs)
        for i, job in enumerate(jobs):
            try:
                checked.append((i, parse_request(job.body, self.server.family, self.cfg.served_sizes,
                                                 self.server.offered)))
            except RequestError as e:
                out[i] = {"status": 400, "error": str(e)}
        reqs = [req for _, req in checked]
        for group in group_requests(reqs, self._limit):
            idx = [checked[g][0] for g in group]
            live = [i for i in idx if not jobs[i].should_stop()]
            for i in set(idx) - set(live):
                out[i] = self._stopped(jobs[i], "before it started")
            if live:
                self._run_group(jobs, live, [reqs[g] for g, i in zip(group, idx) if i in live], out)
        return out

    def _limit(self, req) -> int:
        from .model import ServeModelError

        try:
            return self.server.batch_limit(req)
        except ServeModelError:
            return 1  # the request runs alone and is answered 400 with the same message

    def _stopped(self, job: _Job, where: str) -> dict:
        why = "cancelled" if job.cancelled.is_set() else f"past --timeout {self.cfg.timeout_s:g} s"
        log.info("replica %s: request %s (stopped %s)", self.replica, why, where)
        return {"status": 504, "error": f"the request was {why}; work stopped {where}"}

    def _run_group(self, jobs: list[_Job], idx: list[int], reqs: list, out: list) -> None:
        from .model import Cancelled, ServeModelError

        try:
            gens = self.server.generate_group(reqs, [jobs[i].should_stop for i in idx])
        except Cancelled as e:
            for i in idx:
                out[i] = self._stopped(jobs[i], str(e).removeprefix("stopped "))
            return
        except ServeModelError as e:
            for i in idx:
                out[i] = {"status": 400, "error": str(e)}
            return
        except Exception as e:  # noqa: BLE001 - a failed generation answers 500 and is logged
            log.exception("replica %s: generation failed", self.replica)
            if self.server.device.type == "cuda" and "CUDA" in str(e):
                self.broken = f"CUDA error: {e}"  # the context may be lost: let Serve replace this replica
            for i in idx:
                out[i] = {"status": 500, "error": f"generation failed: {type(e).__name__}: {e}"}
            return
        self._unet_batch.observe(len(idx))
        for i, g in zip(idx, gens):
            for name, ms in g.timings_ms.items():  # "stage 2 (2048x2048, 10 steps)" -> tag "stage 2"
                self._segment_ms.observe(ms, tags={"segment": name.split(" (")[0]})
            out[i] = {"status": 200, "png": g.png, "plan": g.plan_info, "timings_ms": g.timings_ms, "seed": g.seed,
                      "batch_size": len(idx), "replica": self.replica}

    def check_health(self):
        if self.broken:
            raise RuntimeError(self.broken)


def _loaded_line(info: dict) -> str:
    """What a replica loaded, for its start log: the weights in torch (engines run the rest) and the extras."""
    parts = [f"weights in torch: {', '.join(info['weights_in_torch']) or 'none'}"
             + ("; engines run the rest" if info["engines"] else "")]
    if info["loras"]:
        parts.append("lora " + ", ".join(info["loras"]))
    if info["controlnets"]:
        parts.append(f"{info['controlnets']} ControlNet(s)")
    if info["ip_adapter"]:
        scale = info.get("ip_adapter_scale")
        parts.append("IP-Adapter" + (f" (unet_ip engines at scale {scale!r})" if scale is not None else ""))
    if info["precision"] == "fp8":
        parts.append("UNet projections in FP8")
    return "; ".join(parts)


def ingress_app(cfg: ServeConfig):
    ongoing = max(100, cfg.replicas * cfg.max_batch + cfg.max_queue + 16)
    return Ingress.options(max_ongoing_requests=ongoing, max_queued_requests=ongoing,
                           backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S)
                           ).bind(cfg.to_dict())


def model_app(cfg: ServeConfig):
    actor = {"num_cpus": 1, "num_gpus": 1} if cfg.device == "cuda" else {"num_cpus": 1}
    return Generator.options(num_replicas=cfg.replicas, ray_actor_options=actor,
                             max_ongoing_requests=cfg.max_batch, max_queued_requests=cfg.max_queue,
                             backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S)
                             ).bind(cfg.to_dict())


def http_options(cfg: ServeConfig) -> HTTPOptions:
    return HTTPOptions(host=cfg.host, port=cfg.port, request_timeout_s=cfg.timeout_s + PROXY_TIMEOUT_MARGIN_S)


def deploy(cfg: ServeConfig, say=print) -> None:
    """Starts Serve on the connected Ray cluster (HTTP options apply where Serve is not running yet), the
    ingress, then the model; returns once every model replica is warm. Raises RuntimeError if the model
    application fails to deploy (its replicas' constructor error is in the message)."""
    serve.start(http_options=http_options(cfg))
    serve.run(ingress_app(cfg), name=APP, route_prefix="/")
    sizes = ", ".join(size_text(w, h) for w, h in cfg.served_sizes)
    say(f"ingress up at http://{cfg.host}:{cfg.port}/ (503 until warm); warming {cfg.replicas} replica(s) "
        f"of {cfg.model} on {cfg.device}: {sizes}")
    t0 = time.monotonic()
    try:
        serve.run(model_app(cfg), name=MODEL_APP, route_prefix=None)
    except RuntimeError as e:
        raise RuntimeError(_failure(e)) from None
    say(f"ready: every replica warm in {time.monotonic() - t0:.1f} s; POST http://{cfg.host}:{cfg.port}/v1/generate")


def _failure(e: RuntimeError) -> str:
    """Why the model application failed, in one line: the last exception line of its replicas' traceback
    (Serve's own error only says the deployment failed)."""
    text = str(e)
    try:
        dep = serve.status().applications[MODEL_APP].deployments[MODEL]
        text = f"{dep.message}\n{text}"
    except Exception:  # noqa: BLE001 - keep Serve's own message
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)(\(.*\))?: ", ln)
              and not ln.endswith("Traceback (most recent call last):")]
    return causes[-1] if causes else (lines[-1] if lines else type(e).__name__)


def undeploy() -> None:
    """Deletes the two applications (the cluster's Serve instance and its other applications stay)."""
    for name in (APP, MODEL_APP):
        try:
            serve.delete(name)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log.warning("could not delete %s: %s", name, e)
