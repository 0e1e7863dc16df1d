"""Content-addressed engine cache: a folder of engine entries plus `manifest.json`.

An entry's key is a sha256 over everything that makes an engine valid for a run: model id and weights
fingerprint, network, variant (and its dilation), precision, shape profiles, backend and its version, and
the device ('cpu' or the GPU's name), and, where asked for, the execution provider ONNX Runtime's graph
optimizer fused the model for. Every write is atomic: files are staged in a temp folder inside the
cache, fsynced, moved into place with os.replace, and only then listed in the manifest (itself replaced
atomically). A build killed at any point leaves at most an unlisted folder, which nothing accepts.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.specs import ShapeProfile
from . import file_hashes
from .file_hashes import FileHashes

MANIFEST = "manifest.json"
FORMAT = 1
"""Manifest format version; another version is refused rather than guessed at."""
_STAGING_PREFIX = ".staging-"


class EngineError(RuntimeError):
    """Engines cannot be used as asked; the message names the file or value and what to do."""


class CorruptManifestError(EngineError):
    """The manifest is not valid JSON of the expected form (truncated, edited, another version)."""


class CorruptEngineError(EngineError):
    """An engine file is missing, or its size or sha256 differs from the manifest's record."""


class StaleEngineError(EngineError):
    """An entry exists but was built for other weights, another backend version or another device."""


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on; its sha256 is the entry's address."""

    model: str
    """Model family name (`sdxl`, `tiny-sd15`, ...)."""
    weights: str
    """Fingerprint of the network's weights (engine/fingerprint.py: `mf2:<kind>:<sha256>`; a bare sha256 of the
    tensors, `weights_fingerprint`, in entries of scheme 1)."""
    network: str
    """`unet`, `vae_encoder`, `vae_decoder`, `text_encoder`, `text_encoder_2`."""
    variant: str
    """`standard` or `dilated`."""
    dilation: int
    """Mid-block dilation baked in (1 unless dilated)."""
    precision: str
    """`fp32` or `fp16`."""
    profiles: tuple[ShapeProfile, ...]
    """Shape profiles the engine serves, one per plan stage that runs it."""
    backend: str
    """`onnxruntime`, `tensorrt` or `torch`."""
    backend_version: str
    """Version of the backend library that built it."""
    device: str
    """'cpu' or the GPU's name: TensorRT engines only run on the GPU they were built for."""
    ort_optimize: str = "none"
    """Execution provider ONNX Runtime's transformer optimizer fused the model for (`cpu`, `cuda`), or `none`.
    Left out of the JSON (and so of the digest) when `none`: keys written before this field existed load as
    `none` and keep their digests, and an optimized entry never has a plain entry's address."""
    constants: str = "inside"
    """aoti: `inside` (the package holds its weights) or `apart` (`mf-build-engines --weights-apart`: the package
    holds none, the entry keeps them in `weights.safetensors`, and packages of the same weights share one copy
    when opened). Left out of the JSON when `inside`, as `ort_optimize` when `none`: older digests stand."""
    quantization: str = "none"
    """Which layers an fp8 UNet holds in FP8, and how (engine/fp8.py's `fp8_scheme`), so a package of another policy
    has another address and is rebuilt, not opened. Left out of the JSON when `none` (every other entry): older
    digests stand; FP8 entries from before the field have none and are stale."""

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["profiles"] = [p.to_json() for p in self.profiles]
        if self.ort_optimize == "none":
            del d["ort_optimize"]
        if self.constants == "inside":
            del d["constants"]
        if self.quantization == "none":
            del d["quantization"]
        return d

    @staticmethod
    def from_json(d: dict) -> "EngineKey":
        fields = dict(d)
        fields["profiles"] = tuple(ShapeProfile.from_json(p) for p in d["profiles"])
        fields["dilation"] = int(d["dilation"])
        fields["ort_optimize"] = str(d.get("ort_optimize", "none"))  # absent in manifests before the field
        fields["constants"] = str(d.get("constants", "inside"))  # absent unless built with --weights-apart
        fields["quantization"] = str(d.get("quantization", "none"))  # absent unless an FP8 UNet
        return EngineKey(**fields)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        mid = f" ({self.variant})" if self.network == "unet" else ""
        fused = f" (ORT-fused for {self.ort_optimize})" if self.ort_optimize != "none" else ""
        apart = " (weights apart)" if self.constants != "inside" else ""
        return f"{self.network}{mid} {self.precision} {self.backend}{fused}{apart}"


@dataclass(frozen=True)
class FileRecord:
    """One file of an entry, as verified on load."""

    path: str
    """Relative to the cache folder."""
    sha256: str
    """Hex digest of the whole file."""
    size: int
    """Bytes."""


@dataclass(frozen=True)
class Entry:
    """One built engine as the manifest lists it."""

    digest: str
    """sha256 of the key: the entry's address."""
    key: EngineKey
    """What it was built for."""
    files: tuple[FileRecord, ...]
    """Its files, model first (empty for the torch backend, which runs the modules themselves)."""
    created: float
    """Unix time the entry was committed."""

    def to_json(self) -> dict:
        return {"digest": self.digest, "key": self.key.to_json(), "created": self.created,
                "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files]}

    @staticmethod
    def from_json(d: dict) -> "Entry":
        files = tuple(FileRecord(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in d["files"])
        return Entry(str(d["digest"]), EngineKey.from_json(d["key"]), files, float(d["created"]))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), independent of the device."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def device_name(device: torch.device | str) -> str:
    """What the key records: 'cpu' or the GPU's marketing name."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def path_problem(rel: str) -> str:
    """Why a file path the manifest records does not name a file inside the engine folder ("" when it does):
    it must be relative, normalized and free of '..' (the rule of the C++ reader, cpp/src/lib/manifest.cpp)."""
    if not rel:
        return "is empty"
    if "\0" in rel:
        return "holds a NUL byte"
    if rel.startswith("/"):
        return "is absolute"
    for part in rel.split("/"):
        if part == "..":
            return "has a '..' component"
        if part in ("", "."):
            return "is not a normalized relative path"
    return ""


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def atomic_write(path: Path, data: bytes) -> None:
    """Writes `path` so that a reader sees the old file or the whole new one, never a part: a temp file beside
    it, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


class EngineCache:
    """The engine folder: read the manifest, verify entries, stage and commit new ones."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST

    def entries(self) -> dict[str, Entry]:
        """The manifest's entries by digest ({} when there is no manifest yet)."""
        if not self.manifest_path.exists():
            return {}
        p = self.manifest_path
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptManifestError(
                f"engine manifest {p} is corrupt or truncated ({e}); delete it and rebuild with "
                "mf-build-engines") from None
        except RecursionError:  # json recurses once per nesting level: `[[[[...` exhausts the stack
            raise CorruptManifestError(
                f"engine manifest {p} is corrupt (nested too deeply to read); delete it and rebuild with "
                "mf-build-engines") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptManifestError(f"engine manifest {p} is not a format-{FORMAT} megafusion manifest")
        try:
            out = {d["digest"]: Entry.from_json(d) for d in data["entries"]}
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptManifestError(f"engine manifest {p} has a malformed entry ({e!r})") from None
        for digest, e in out.items():
            if e.key.digest() != digest:  # an edited key would otherwise pass for another build
                raise CorruptManifestError(f"engine manifest {p}: entry {digest[:16]} does not match its key")
        return out

    def verify(self, entry: Entry, hashes: FileHashes | None = None) -> None:
        """Raises CorruptEngineError naming the first file that lies outside the folder, is a symbolic link or
        not a regular file, is missing, or differs from its record. A manifest is data anyone who can write the
        folder may edit: without these checks an entry could point a runtime at any file on the machine.
        With `hashes`, a file whose stat matches a remembered hash is not read again (file_hashes.py)."""
        who = f"{entry.key.describe()}, entry {entry.digest[:16]}"
        for rec in entry.files:
            if why := path_problem(rec.path):
                raise CorruptEngineError(
                    f"engine {entry.key.describe()} (entry {entry.digest[:16]}) lists file {rec.path!r}, which "
                    f"{why}; engine files must lie inside the engine folder")
            p = self.root / rec.path
            st = self._lstat_inside(p, rec.path, who)
            if st.st_size != rec.size:
                raise CorruptEngineError(
                    f"engine file {p} is {st.st_size} bytes, the manifest says {rec.size} (truncated or replaced) "
                    f"({who})")
            known = hashes.lookup(p, st) if hashes is not None else None
            if known is None:
                started = time.time_ns()
                known = self._sha256_nofollow(p, st, who)
                if hashes is not None:
                    hashes.remember(p, st, known, started)
            if known != rec.sha256:
                raise CorruptEngineError(f"engine file {p} does not match its sha256 in {self.manifest_path} "
                                         f"({who}): replaced or corrupt; rebuild with mf-build-engines")

    def _lstat_inside(self, p: Path, rel: str, who: str) -> os.stat_result:
        """lstat of the regular file `p` (= root / rel), each component below the root checked without following
        links, and its canonical path checked to lie inside the root."""
        q, parts = self.root, rel.split("/")
        for n, part in enumerate(parts, 1):
            q = q / part
            try:
                st = os.lstat(q)
            except (FileNotFoundError, NotADirectoryError):
                raise CorruptEngineError(f"engine file {p} is missing ({who})") from None
            except OSError as e:
                raise CorruptEngineError(f"engine file {p} cannot be read ({e.strerror}) ({who})") from None
            last = n == len(parts)
            if stat.S_ISLNK(st.st_mode):
                raise CorruptEngineError(
                    f"engine file {p}{'' if last else f': {q}'} is a symbolic link ({who}); engine folders hold "
                    "regular files only, rebuild with mf-build-engines")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise CorruptEngineError(f"engine file {p} is missing ({q} is {_file_kind(st.st_mode)}) ({who})")
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEngineError(f"engine file {p} is {_file_kind(st.st_mode)}, not a regular file ({who})")
        root_real, real = os.path.realpath(self.root), os.path.realpath(p)
        if not real.startswith(root_real + os.sep):  # cannot happen after the checks above; kept as the rule itself
            raise CorruptEngineError(
                f"engine file {p} resolves to {real!r}, outside the engine folder {root_real} ({who})")
        return st

    @staticmethod
    def _sha256_nofollow(p: Path, st: os.stat_result, who: str) -> str:
        """sha256 of the file lstat saw: opened without following a link (one swapped in since fails) and
        checked to be the same inode."""
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise CorruptEngineError(f"engine file {p} cannot be opened ({e.strerror}) ({who})") from None
        with open(fd, "rb") as f:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise CorruptEngineError(f"engine file {p} changed while it was being verified ({who})")
            return file_hashes.read_sha256(f)

    def lookup(self, key: EngineKey, hashes: FileHashes | None = None) -> Entry | None:
        """The verified entry for exactly this key; None if absent or invalid (build then rebuilds it)."""
        entry = self.entries().get(key.digest())
        if entry is None:
            return None
        try:
            self.verify(entry, hashes)
        except CorruptEngineError:
            return None
        return entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Several builders may share one folder: serialise manifest read-modify-write.
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_manifest(self, entries: dict[str, Entry]) -> None:
        self.write_json(MANIFEST, {"format": FORMAT, "entries": [entries[d].to_json() for d in sorted(entries)]})

    def write_json(self, name: str, data: dict) -> None:
        """Writes `name` in the cache folder atomically (temp file, fsync, rename, fsync of the folder); callers
        hold the lock."""
        atomic_write(self.root / name, json.dumps(data, indent=1).encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The cache's lock, for read-modify-write of its files by other modules (models.json)."""
        with self._locked():
            yield

    @contextlib.contextmanager
    def staging(self, key: EngineKey) -> Iterator[Path]:
        """A fresh temp folder inside the cache to build into; removed if the block raises."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{_STAGING_PREFIX}{key.digest()[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after commit it has been moved away already

    def entry_dir(self, key: EngineKey) -> Path:
        return self.root / f"{key.network}-{key.variant}-{key.precision}-{key.backend}-{key.digest()[:16]}"

    def commit(self, key: EngineKey, staged: Path) -> Entry:
        """Moves a fully written staging folder into place and lists it; returns the new entry."""
        digest, final = key.digest(), self.entry_dir(key)
        _fsync_tree(staged)
        records = tuple(
            FileRecord(f"{final.name}/{p.relative_to(staged).as_posix()}", sha256_file(p), p.stat().st_size)
            for p in sorted(staged.rglob("*")) if p.is_file())
        with self._locked():
            entries = self.entries()
            if entries.pop(digest, None) is not None:
                self._write_manifest(entries)  # unlist the invalid entry before its folder changes
            if final.is_symlink() or (final.exists() and not final.is_dir()):
                final.unlink()  # the link itself, never what it points to: a build writes inside the folder only
            elif final.exists():
                trash = self.root / f"{_STAGING_PREFIX}trash-{uuid.uuid4().hex[:8]}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staged, final)
            _fsync_dir(self.root)
            entry = Entry(digest, key, records, time.time())
            entries[digest] = entry
            self._write_manifest(entries)
        return entry

    def remove_stale_staging(self, older_than_s: float = 3600.0) -> int:
        """Deletes staging folders left by killed builds: those whose building process is gone (its pid is in
        the name, `.staging-<digest16>-<pid>-<id>`), at once, since a killed SDXL export leaves gigabytes; those
        without a pid (trash of a replaced entry) once older than `older_than_s`. A live process's folder is
        kept, whatever its age: it may be another build of this folder still writing."""
        n = 0
        for p in self.root.glob(f"{_STAGING_PREFIX}*"):
            if not p.is_dir() or p.is_symlink():
                continue
            pid = _staging_pid(p.name)
            gone = _process_gone(pid) if pid is not None else time.time() - p.stat().st_mtime > older_than_s
            if gone:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


def _staging_pid(name: str) -> int | None:
    """The builder's pid in a staging folder's name, or None (trash folders, other names)."""
    parts = name[len(_STAGING_PREFIX):].split("-")
    if len(parts) == 3 and len(parts[0]) == 16 and parts[1].isascii() and parts[1].isdigit():
        return int(parts[1])
    return None


def _process_gone(pid: int) -> bool:
    """Whether no process has this pid (signal 0 checks without sending anything)."""
    if pid <= 0:
        return True  # never a builder's pid; os.kill(0 or -n) would address process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OverflowError:
        return True  # beyond the kernel's pid range: no such process
    except PermissionError:
        return False  # another user's live process
    return False
