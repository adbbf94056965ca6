"""Atomic writes: results and caches are never half-written.

Each writer writes to a temporary sibling, flushes it to disk, and renames it into place; a reader
sees the old file or the new one, never a mix. ``atomic_dir`` does the same for a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s, from /proc/cpuinfo), named beside every figure reported."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "d")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
    """``$SSTMERGE_CACHE`` or ``~/.cache/sstmerge``."""
    return Path(os.environ.get("SSTMERGE_CACHE") or Path.home() / ".cache" / "sstmerge").expanduser()


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` (``~`` expanded), or :func:`default_cache_dir` when it is None."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _update_with_file(h, path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update_with_file(h, path)
    return h.hexdigest()


def path_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (its name, then its bytes) or of a directory tree (each file's relative path,
    then its bytes, in sorted order): a renamed or edited file anywhere changes it."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        _update_with_file(h, f)
    return h.hexdigest()


def manifest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but ``manifest.json`` itself, by relative path."""
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def valid(root: Path) -> bool:
    """True when ``root`` holds a ``manifest.json`` that matches its files."""
    try:
        recorded = json.loads((Path(root) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == manifest(root)


def cached_dir(cache_dir: str | os.PathLike | None, dirname: str, build: Callable[[Path], dict], *, card: str,
               progress: bool = True, what: str = "entry", expect: str = "") -> Path:
    """``<cache_dir>/<dirname>`` (default :func:`default_cache_dir`), built first by ``build(tmp)`` unless a
    valid copy exists.

    ``build`` fills ``tmp`` and returns a JSON-able card written to ``tmp/<card>``; ``manifest.json`` (the
    sha256 of every file) is written last and checked on reuse, so a corrupt or partial entry is rebuilt.
    The directory is renamed into place when complete (an interrupted build leaves nothing), under a
    file lock (concurrent callers build once).
    """
    cache = cache_root(cache_dir)
    root = cache / dirname
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if root.exists() and valid(root):
            return root
        if root.exists():
            print(f"sstmerge: the cached {what} {root} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        if progress:
            print(f"sstmerge: building the {what} in {root}{f' ({expect})' if expect else ''}", file=sys.stderr)
        with atomic_dir(root) as tmp:
            write_json(tmp / card, build(tmp))
            write_json(tmp / "manifest.json", manifest(tmp))
        return root
