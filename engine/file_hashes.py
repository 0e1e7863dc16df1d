"""sha256 of files, remembered across processes by what `stat` says of them, so that a second start reads no
file it has hashed before: weight files (the weights fingerprint) and engine files (their manifest check).

A record is (absolute path) -> (size, mtime_ns, ctime_ns, inode, device, sha256), kept in one small JSON file
(`file-hashes.json` in the engine folder). Any write to a file changes its mtime and ctime, a replaced file has
another inode, and ctime cannot be set back by a user (`touch -d` moves it forward), so a record that still
matches is the file it was made from. What a record cannot see is a change of the bytes below the file system
(a failing disk); `EngineCache.verify` without records still hashes every byte.

File times are coarse (a tick of a few ms, a second or two on some file systems): a file changed twice within
one tick keeps its times. As git does with its index ("racily clean" entries), a hash is only remembered when
the file's last change is older than `RACY_NS` before the hash began, so no later change can share its times.
The file is a cache: unreadable or malformed, it counts as empty; not writable (a read-only engine folder), the
hashes are simply not kept.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

HASHES = "file-hashes.json"
"""The records' file name in an engine folder."""
FORMAT = 1
RACY_NS = 2_000_000_000
"""A file changed less than this long before its hash began is hashed again next time (coarse file times)."""


def read_sha256(f) -> str:
    """sha256 of an open binary file, read to its end (the one place file bytes are hashed: tests count it)."""
    h = hashlib.sha256()
    while block := f.read(1 << 22):
        h.update(block)
    return h.hexdigest()


def signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileHashes:
    """Remembered hashes in `path` (None: remember nothing, hash every time)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self._known: dict[str, dict] | None = None
        self._new: dict[str, dict] = {}
        self.hashed = 0
        """Files hashed by this object (a start that found every record hashes none)."""

    def _records(self) -> dict[str, dict]:
        if self._known is None:
            self._known = _read(self.path) if self.path is not None else {}
        return self._known

    def lookup(self, path: str | os.PathLike, st: os.stat_result) -> str | None:
        """The remembered sha256 of `path` if `st` (its stat now) is what it was when hashed, else None."""
        key = os.path.abspath(path)
        rec = self._new.get(key) or self._records().get(key)
        if rec is not None and rec.get("stat") == signature(st) and isinstance(rec.get("sha256"), str):
            return rec["sha256"]
        return None

    def remember(self, path: str | os.PathLike, st: os.stat_result, sha256: str, started_ns: int) -> None:
        """Keeps `sha256` for `path` as `st` saw it, if the file was last changed long enough before the hash
        began (`started_ns`, time.time_ns()) and is unchanged since (checked here)."""
        self.hashed += 1
        if started_ns - max(st.st_mtime_ns, st.st_ctime_ns) <= RACY_NS:
            return
        try:
            if signature(os.stat(path)) != signature(st):
                return  # changed while it was read
        except OSError:
            return
        self._new[os.path.abspath(path)] = {"stat": signature(st), "sha256": sha256}

    def sha256(self, path: str | os.PathLike) -> str:
        """sha256 of the file at `path` (links followed, as a loader follows them), from a record if one matches."""
        path = os.path.abspath(path)
        st = os.stat(path)
        if (known := self.lookup(path, st)) is not None:
            return known
        started = time.time_ns()
        with open(path, "rb") as f:
            digest = read_sha256(f)
        self.remember(path, st, digest, started)
        return digest

    def save(self) -> None:
        """Merges the new records into the file (under a lock; records of files gone are dropped); a folder
        that cannot be written keeps nothing."""
        if self.path is None or not self._new:
            return
        from .cache import atomic_write  # the cache's atomic write: temp file, fsync, rename

        with contextlib.suppress(OSError), _locked(self.path):
            merged = {p: r for p, r in {**_read(self.path), **self._new}.items() if os.path.exists(p)}
            atomic_write(self.path, json.dumps({"format": FORMAT, "files": merged}, indent=0).encode())
            self._known, self._new = merged, {}


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == FORMAT else None
    return {p: r for p, r in files.items() if isinstance(r, dict)} if isinstance(files, dict) else {}


@contextlib.contextmanager
def _locked(path: Path):
    with open(path.with_name(f".{path.name}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
