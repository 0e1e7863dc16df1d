"""A soak of `mf-serve`: does a replica's resident memory stay flat over many requests?

    python3 -m megafusion.benchmarks.soak --requests 300 --output benchmarks/results/cpu-2026-12-01/soak

Starts Ray on this machine and the server on localhost (tiny-sd15 on the CPU unless told otherwise), sends
`--warmup` requests, reads the model replica's resident set size (VmRSS of its Ray worker process, found through
Ray: the replica actor reports its pid), sends `--requests` more from `--concurrency` client threads (prompts and
seeds vary, the plan alternates between two so requests are batched in groups and alone), sampling the RSS every
`--sample-s` seconds, and reads it again at the end. Writes soak.json and soak.md (commit, command, machine) and
exits 1 when the RSS grew by more than `--max-growth` (default 5%) from after warm-up to the end, or when a request
was not answered 200; 2 on bad arguments. Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

BODIES = ({"stages": "128x128:2,256x256:2"}, {"stages": "128x128:2,256x256:2", "relay": "latent", "guidance": 5.0})
"""The two request shapes the soak alternates between (tiny-sd15 plans at the served 256x256)."""


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 300
    warmup: int = 20
    concurrency: int = 4
    max_growth: float = 0.05
    model: str = "tiny-sd15"
    size: str = "256x256"
    max_batch: int = 4
    sample_s: float = 1.0
    request_timeout: float = 120.0


@dataclass
class SoakResult:
    config: dict
    provenance: dict
    machine: dict
    replica_pid: int = 0
    rss_start_mib: float = 0.0
    """After the model replica was warm, before any request."""
    rss_warm_mib: float = 0.0
    """After the warm-up requests: the baseline."""
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    growth: float = 0.0
    """(end - warm) / warm."""
    statuses: dict[str, int] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    """X-MegaFusion-Batch-Size of the answers: how many requests were denoised together."""
    wall_s: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the soak's first request, RSS MiB)."""
    passed: bool = False


def rss_mib(pid: int) -> float:
    """Resident set size of a process on this machine, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS (ended?)")


def replica_pids() -> list[int]:
    """The pids of the model replicas' Ray worker processes (each replica actor answers with its own)."""
    import ray

    from ..serve.app import MODEL, MODEL_APP

    prefix = f"SERVE_REPLICA::{MODEL_APP}#{MODEL}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return [ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(lambda self: os.getpid()), timeout=30)
            for n in names]


def _machine() -> dict:
    from .timing import cpu_name

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def _send(url: str, cfg: SoakConfig, first: int, count: int, stats: dict) -> None:
    """`count` requests numbered from `first`, from `cfg.concurrency` threads; fills stats in place."""
    from .load import _post_headers

    lock, next_i = threading.Lock(), [first]

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= first + count:
                    return
                next_i[0] += 1
            body = {**BODIES[i % len(BODIES)], "prompt": f"soak request {i}", "seed": i}
            status, seconds, headers = _post_headers(url, json.dumps(body).encode(), cfg.request_timeout)
            with lock:
                stats["statuses"][str(status) if status is not None else "error"] += 1
                if status == 200:
                    stats["latencies"].append(seconds)
                    stats["batch_sizes"][headers.get("x-megafusion-batch-size", "?")] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def soak(cfg: SoakConfig, say=print) -> SoakResult:
    """Starts Ray and the server here, soaks it, stops both; the result says whether it passed."""
    import ray
    from ray import serve

    from ..serve.app import deploy, undeploy
    from ..serve.config import ServeConfig, parse_sizes
    from .load import percentile
    from .timing import provenance

    port = _free_port()
    serve_cfg = ServeConfig(cfg.model, device="cpu", sizes=parse_sizes(cfg.size), replicas=1,
                            max_batch=cfg.max_batch, max_queue=max(16, cfg.concurrency), timeout_s=cfg.request_timeout,
                            port=port)
    res = SoakResult(asdict(cfg), provenance(), _machine())
    url = f"http://127.0.0.1:{port}/v1/generate"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        deploy(serve_cfg, say)
        (res.replica_pid,) = replica_pids()
        res.rss_start_mib = rss_mib(res.replica_pid)
        warm = {"statuses": Counter(), "latencies": [], "batch_sizes": Counter()}
        _send(url, cfg, 0, cfg.warmup, warm)
        res.rss_warm_mib = rss_mib(res.replica_pid)
        say(f"replica pid {res.replica_pid}: RSS {res.rss_start_mib:.1f} MiB warm, {res.rss_warm_mib:.1f} MiB "
            f"after {cfg.warmup} warm-up requests; sending {cfg.requests}")
        stats = {"statuses": Counter(), "latencies": [], "batch_sizes": Counter()}
        stop = threading.Event()
        t0 = time.perf_counter()

        def sample():
            while not stop.wait(cfg.sample_s):
                res.samples.append((round(time.perf_counter() - t0, 2), round(rss_mib(res.replica_pid), 2)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _send(url, cfg, cfg.warmup, cfg.requests, stats)
        res.wall_s = time.perf_counter() - t0
        stop.set()
        sampler.join(10)
        res.rss_end_mib = rss_mib(res.replica_pid)
    finally:
        undeploy()
        serve.shutdown()
        ray.shutdown()
    res.rss_peak_mib = max([res.rss_end_mib, *(m for _, m in res.samples)])
    res.growth = (res.rss_end_mib - res.rss_warm_mib) / res.rss_warm_mib
    res.statuses = dict(sorted(stats["statuses"].items()))
    res.batch_sizes = dict(sorted(stats["batch_sizes"].items()))
    lat = sorted(stats["latencies"])
    if lat:
        res.p50_s, res.p95_s = percentile(lat, 50), percentile(lat, 95)
    res.passed = res.growth <= cfg.max_growth and res.statuses == {"200": cfg.requests}
    return res


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def markdown(r: SoakResult) -> str:
    p, c, m = r.provenance, r.config, r.machine
    ms = lambda x: "-" if x is None else f"{x * 1000:.0f}"  # noqa: E731
    return "\n".join([
        f"# mf-serve soak: {c['requests']} requests, {c['model']} on the CPU",
        "",
        f"- date (UTC): {p['date_utc']}; commit {p['commit']}{' (dirty)' if p['dirty'] else ''}",
        f"- command: `{p['command']}`",
        f"- machine: {m['cpu']}, {m['cpus']} logical CPUs, {m['platform']}, Python {m['python']}; Ray on "
        f"localhost with 2 CPUs, one model replica (one CPU thread), --max-batch {c['max_batch']}",
        f"- load: {c['warmup']} warm-up requests, then {c['requests']} from {c['concurrency']} client threads, "
        f"alternating two plans (pixel relay at guidance 7, latent relay at guidance 5), prompt and seed per request",
        "",
        "| replica RSS | MiB |",
        "|---|---:|",
        f"| warm (before any request) | {r.rss_start_mib:.1f} |",
        f"| after warm-up (baseline) | {r.rss_warm_mib:.1f} |",
        f"| peak while soaking | {r.rss_peak_mib:.1f} |",
        f"| end | {r.rss_end_mib:.1f} |",
        f"| **growth, end against baseline** | **{100 * r.growth:+.2f}%** (limit {100 * c['max_growth']:.0f}%) |",
        "",
        f"- answers: {json.dumps(r.statuses)}; denoised together (batch size: answers): {json.dumps(r.batch_sizes)}",
        f"- wall {r.wall_s:.1f} s; latency p50 {ms(r.p50_s)} ms, p95 {ms(r.p95_s)} ms",
        f"- result: **{'pass' if r.passed else 'FAIL'}**",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m megafusion.benchmarks.soak",
                                description="Resident memory of an mf-serve replica over many requests.")
    p.add_argument("--requests", type=int, default=300, help="requests after warm-up (default 300)")
    p.add_argument("--warmup", type=int, default=20, help="requests before the baseline is read (default 20)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (default 4)")
    p.add_argument("--max-growth", type=float, default=0.05, help="RSS growth that fails the soak (default 0.05)")
    p.add_argument("--model", default="tiny-sd15", choices=("tiny-sd15", "tiny-sdxl"))
    p.add_argument("--output", help="folder for soak.json and soak.md (default: print the table only)")
    args = p.parse_args(argv)
    bad = [f"--{n.replace('_', '-')} {getattr(args, n)}: needs an integer >= 1"
           for n in ("requests", "concurrency", "max_batch") if getattr(args, n) < 1]
    bad += [f"--warmup {args.warmup}: needs an integer >= 0"] if args.warmup < 0 else []
    bad += [] if 0 <= args.max_growth < 10 else [f"--max-growth {args.max_growth}: needs a fraction, 0 <= g < 10"]
    if bad:
        print(f"soak: error: {bad[0]}", file=sys.stderr)  # one line, before Ray starts
        return 2
    cfg = SoakConfig(args.requests, args.warmup, args.concurrency, args.max_growth, args.model,
                     max_batch=args.max_batch)
    res = soak(cfg, say=lambda s: print(s, file=sys.stderr))
    table = markdown(res)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(asdict(res), indent=2) + "\n")
        (out / "soak.md").write_text(table)
    print(table, end="")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
