"""A bounded load generator for `mf-serve`: latency percentiles and throughput at several concurrencies.

    python3 -m megafusion.benchmarks.load --url http://127.0.0.1:8000 --requests 32 --concurrency 1,4,16 \\
        --body '{"prompt": "a lighthouse", "size": "2048x2048"}' --output load-results/

Each level sends `--requests` POST /v1/generate requests from that many client threads (seed = request index,
unless the body fixes one), stops issuing new ones after `--max-seconds`, and gives each at most
`--request-timeout` seconds. Latency is client-side wall time per answered request; percentiles are over the
requests answered 200 (nearest rank); throughput is those over the level's wall time. Other statuses (429,
503, 504) are counted, not timed. Stdlib HTTP only; writes load.json and load.md with the provenance of
every saved result (date, commit, command).
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Level:
    """One concurrency's outcome."""

    concurrency: int
    sent: int = 0
    ok: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    """Count per HTTP status ('error' for a request with no answer: refused connection, client timeout)."""
    wall_s: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    mean_s: float | None = None
    max_s: float | None = None
    throughput_rps: float = 0.0
    """Requests answered 200 per second of the level's wall time."""
    stopped_early: bool = False
    """--max-seconds ran out before every request was sent."""


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending, non-empty list."""
    k = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[k - 1]


def _post(url: str, body: bytes, timeout: float) -> tuple[int | None, float]:
    status, seconds, _ = _post_headers(url, body, timeout)
    return status, seconds


def _post_headers(url: str, body: bytes, timeout: float) -> tuple[int | None, float, dict[str, str]]:
    """(status or None without an answer, seconds, response headers with lower-case names)."""
    u = urlsplit(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("POST", u.path or "/", body, {"Content-Type": "application/json", "Accept": "image/png"})
        r = conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0, {k.lower(): v for k, v in r.getheaders()}
    except (OSError, http.client.HTTPException):
        return None, time.perf_counter() - t0, {}
    finally:
        conn.close()


def run_level(url: str, body: dict, concurrency: int, requests: int, max_seconds: float,
              request_timeout: float) -> Level:
    """`requests` requests from `concurrency` threads; none is issued after `max_seconds`."""
    level = Level(concurrency)
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    next_index = [0]
    t0 = time.perf_counter()

    def worker():
        while True:
            with lock:
                i = next_index[0]
                if i >= requests:
                    return
                if time.perf_counter() - t0 > max_seconds:
                    level.stopped_early = True
                    return
                next_index[0] += 1
            payload = json.dumps(body if "seed" in body else {**body, "seed": i}).encode()
            status, seconds = _post(url, payload, request_timeout)
            with lock:
                statuses[str(status) if status is not None else "error"] += 1
                if status == 200:
                    latencies.append(seconds)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:  # bounded: no request starts after max_seconds and each ends by request_timeout
        t.join(max_seconds + request_timeout + 30)
    level.wall_s = time.perf_counter() - t0
    level.sent = next_index[0]
    level.statuses = dict(sorted(statuses.items()))
    level.ok = len(latencies)
    if latencies:
        lat = sorted(latencies)
        level.p50_s, level.p95_s, level.p99_s = (percentile(lat, q) for q in (50, 95, 99))
        level.mean_s, level.max_s = sum(lat) / len(lat), lat[-1]
        level.throughput_rps = len(lat) / level.wall_s
    return level


def server_info(base: str, timeout: float = 10) -> dict | None:
    """GET /v1/models, or None where the server does not answer it."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        return json.loads(r.read()) if r.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def markdown(result: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f}"

    p = result["provenance"]
    info = result.get("server") or {}
    lines = [f"# mf-serve load: {result['url']}", "",
             f"- date (UTC): {p['date_utc']}; commit {p['commit']}{' (dirty)' if p['dirty'] else ''}",
             f"- command: `{p['command']}`",
             f"- server: {json.dumps(info) if info else 'did not answer /v1/models'}",
             f"- body: `{json.dumps(result['body'])}`; {result['requests']} requests per level, at most "
             f"{result['max_seconds']:g} s per level, {result['request_timeout']:g} s per request", "",
             "| concurrency | sent | 200 | other statuses | p50 ms | p95 ms | p99 ms | mean ms | throughput req/s |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for lv in result["levels"]:
        other = ", ".join(f"{k}: {v}" for k, v in lv["statuses"].items() if k != "200") or "-"
        if lv["stopped_early"]:
            other += " (time budget ran out)"
        lines.append(f"| {lv['concurrency']} | {lv['sent']} | {lv['ok']} | {other} | {ms(lv['p50_s'])} | "
                     f"{ms(lv['p95_s'])} | {ms(lv['p99_s'])} | {ms(lv['mean_s'])} | {lv['throughput_rps']:.3f} |")
    return "\n".join(lines) + "\n"


def run(url: str, body: dict, concurrencies: list[int], requests: int, max_seconds: float,
        request_timeout: float) -> dict:
    from .timing import provenance

    base = url.rstrip("/")
    target = base if base.endswith("/v1/generate") else base + "/v1/generate"
    levels = [asdict(run_level(target, body, c, requests, max_seconds, request_timeout)) for c in concurrencies]
    return {"provenance": provenance(), "url": target, "server": server_info(target), "body": body,
            "requests": requests, "max_seconds": max_seconds, "request_timeout": request_timeout, "levels": levels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m megafusion.benchmarks.load",
                                description="Latency percentiles and throughput of an mf-serve server.")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--body", default='{"prompt": "a lighthouse"}', help="request JSON (seed = index if absent)")
    p.add_argument("--concurrency", default="1,4,16", help="client threads per level (default 1,4,16)")
    p.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    p.add_argument("--max-seconds", type=float, default=600, help="stop issuing requests in a level after this")
    p.add_argument("--request-timeout", type=float, default=600, help="seconds a client waits for one answer")
    p.add_argument("--output", help="folder for load.json and load.md (default: print the table only)")
    args = p.parse_args(argv)
    try:
        body = json.loads(args.body)
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError as e:
        print(f"load: error: {e}", file=sys.stderr)
        return 2
    if not isinstance(body, dict) or any(c < 1 for c in levels) or args.requests < 1 or args.max_seconds <= 0 \
            or args.request_timeout <= 0:
        print("load: error: --body must be a JSON object; --concurrency, --requests, --max-seconds and "
              "--request-timeout positive", file=sys.stderr)
        return 2
    result = run(args.url, body, levels, args.requests, args.max_seconds, args.request_timeout)
    table = markdown(result)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "load.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
