"""Where qe keeps caches and writes outputs, and how it writes them atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qe.errors import QEError


def cache_dir() -> Path:
    """Root of qe's caches: ``$QE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qe``, else ``~/.cache/qe``."""
    env = os.environ.get("QE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qe"


@contextlib.contextmanager
def atomic_directory(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it to ``final`` only on success.

    A crash leaves no half-written ``final``. With ``force`` an existing ``final`` is
    replaced (after the new one is complete); without it, an existing ``final`` is an error.
    """
    final = Path(final)
    if final.exists() and not force:
        raise QEError(f"output directory {final} exists: choose another --out or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file under a temporary name and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as null, keys as strings and tensors as lists: what
    strict JSON readers accept."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)  # torch and numpy arrays (data, not a plugin)
    return json_safe(tolist()) if callable(tolist) else value


def atomic_write_json(path: Path, data: Any, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``data`` as indented JSON under a temporary name and rename it into place
    (``default`` converts what JSON cannot hold, as in :func:`json.dumps`)."""
    atomic_write_text(Path(path), json.dumps(data, indent=1, default=default))


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_output(path: str | Path, *, kind: str = "dir", force: bool = False, expected_bytes: int = 0,
                 what: str = "--out", allow_existing: bool = False) -> Path:
    """Check an output path before any work: it exists only with ``force`` (or ``allow_existing``),
    it is of the right kind, its folder is writable and has room for ``expected_bytes``.

    ``kind`` is ``"dir"`` or ``"file"``. Returns the path. Raises :class:`QEError` with one line.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if kind == "dir" and not path.is_dir():
            raise QEError(f"{what} {path} is a file, not a directory: give a directory path")
        if kind == "file" and path.is_dir():
            raise QEError(f"{what} {path} is a directory, not a file: give a file path")
        if not (force or allow_existing):
            noun = "directory" if kind == "dir" else "file"
            raise QEError(f"output {noun} {path} exists: choose another {what} or pass --force")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise QEError(f"{what} {path}: {base} is a file, so nothing can be written below it: give another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise QEError(f"{what} {path}: {base} is not writable: choose a writable location")
    if path.exists() and not os.access(path, os.W_OK):
        raise QEError(f"{what} {path} is not writable: choose a writable location")
    if expected_bytes > 0:
        free = shutil.disk_usage(base).free
        if free < expected_bytes:
            raise QEError(f"{what} {path}: {_human(free)} free on its disk, about {_human(expected_bytes)} needed: "
                          "free space or choose another location")
    return path


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (a hidden ``.<name>.lock`` beside it) for a run.

    A second run into the same ``out`` fails at once with one line. The lock is an OS file
    lock, so a killed run releases it; the lock file itself is left behind, empty.
    """
    out = Path(out)
    lock = lock_path(out)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise QEError(f"cannot create the lock file {lock} ({e.strerror}): choose a writable --out") from None
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                except OSError:
                    holder = "?"
                raise QEError(f"another qe run (pid {holder}) is writing {out}: wait for it to finish "
                              "or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        os.close(fd)


def apply_umask(path: str | Path) -> None:
    """Give a written file the permissions of a file created under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
