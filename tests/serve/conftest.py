"""HTTP helpers for the server tests (stdlib only; every call bounded in time) and a check that no process a
test started is left behind."""
from __future__ import annotations

import http.client
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(method: str, url: str, body: dict | bytes | None = None, accept: str | None = None,
            timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body); never waits longer than `timeout`."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if accept:
            headers["Accept"] = accept
        conn.request(method, u.path, data, headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(url: str, body, **kw):
    return request("POST", url, body, **kw)


def get(url: str, **kw):
    return request("GET", url, **kw)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def started_here() -> set[int]:
    """Every live process below this one but the session's background builds (tests/background.py) and theirs,
    which run beside the tests and are not a test's to leave behind."""
    from tests.background import BUILDS

    builds = set()
    for pid in BUILDS.pids():
        builds |= {pid} | descendants(pid)
    return descendants(os.getpid()) - builds


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie, dead but not yet reaped, does not count)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def wait_gone(pids: set[int], seconds: float = 90.0) -> set[int]:
    """Waits (bounded) for `pids` to end; returns those still running. Returns as soon as they are gone; the bound
    is long because a Ray worker took over 30 s to exit on a CI machine loaded by background compiles."""
    end = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < end:
        time.sleep(0.5)
    return alive(pids)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from tests (the network is local only)
