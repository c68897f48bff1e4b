"""Where captured calibration activations live: in memory up to a limit, then in files on disk.

Quantizing a block reads its inputs and keeps its outputs (the next block's inputs), so a
calibration set costs about three copies of ``tokens × hidden size`` activations. On a model
whose weights are offloaded that can be the largest thing in memory. An :class:`ActivationStore`
with a limit keeps activations in host memory until they reach it, then writes each further
tensor to a file and maps it back (private, copy-on-write): the operating system's page cache
holds what fits and drops the rest, so the process does not own those pages unless it writes
to them (the block loop only reads its inputs).

Each file is unlinked as soon as it is mapped (POSIX keeps a mapped file until it is
unmapped), so no file outlives its tensor, even when the process is killed; a temporary
folder made for them may remain empty after a kill.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import weakref
from pathlib import Path

import torch

from qe.errors import ConfigError


def parse_size(text: str, option: str) -> int:
    """``4GiB``, ``500MB`` or a byte count, as bytes; one line naming ``option`` when it is not a size."""
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give a size such as 4GiB, 500MB or a number of bytes") from None
    if size < 0:
        raise ConfigError(f"{option} {text!r}: a size cannot be negative")
    return size


class ActivationStore:
    """Keeps tensors where they should live (see the module docstring).

    By default :meth:`keep` returns its argument: activations stay on the device the blocks
    run on. With ``host`` (what an offloaded model uses) they move to host memory; with
    ``limit_bytes`` too, and once the live tensors kept there reach the limit, new ones go to
    memory-mapped files in ``folder`` (a temporary folder by default)."""

    def __init__(self, *, host: bool = False, limit_bytes: int | None = None, folder: str | Path | None = None):
        self.host = host or limit_bytes is not None
        self.limit_bytes = limit_bytes
        self.folder = Path(folder) if folder is not None else None
        self.in_memory_bytes = 0  # live tensors kept in host memory
        self.on_disk_bytes = 0  # live tensors kept in mapped files
        self.spilled_bytes = 0  # everything ever written to files
        self._names = itertools.count()
        self._kept: set[int] = set()  # ids of the live tensors this store returned

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as it should be stored: unchanged by default, else in host memory while the
        limit allows and in a mapped file after. A tensor this store returned comes back as it is."""
        if not self.host or id(t) in self._kept:
            return t
        nbytes = t.numel() * t.element_size()
        if self.limit_bytes is None or self.in_memory_bytes + nbytes <= self.limit_bytes:
            kept = t.detach().to("cpu")
            self.in_memory_bytes += nbytes
            on_disk = False
        else:
            kept = self._to_file(t.detach())
            self.on_disk_bytes += nbytes
            self.spilled_bytes += nbytes
            on_disk = True
        self._kept.add(id(kept))
        weakref.finalize(kept, self._release, nbytes, on_disk, id(kept))
        return kept

    def _release(self, nbytes: int, on_disk: bool, ident: int) -> None:
        if on_disk:
            self.on_disk_bytes -= nbytes
        else:
            self.in_memory_bytes -= nbytes
        self._kept.discard(ident)

    def _to_file(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.to("cpu").contiguous().reshape(-1)
        path: Path | None = None
        mapped: torch.Tensor | None = None
        try:
            folder = self._folder()
            path = folder / f"activations-{os.getpid()}-{id(self):x}-{next(self._names)}.bin"
            with open(path, "wb") as f:
                # Written through the page cache, not a writable shared mapping: the kernel
                # writes the pages out as it likes and can drop them once written.
                flat.view(torch.uint8).numpy().tofile(f)
            mapped = torch.from_file(str(path), shared=False, size=flat.numel(), dtype=flat.dtype)
        except (OSError, RuntimeError) as e:  # from_file reports a failed mmap as RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise ConfigError(f"cannot keep captured activations in {self.folder} ({reason}): free disk space there, "
                              "choose another --offload-folder, or raise --max-activation-memory") from None
        finally:
            if path is not None:
                try:
                    path.unlink(missing_ok=True)  # a mapped file lives on, unnamed, until it is unmapped
                except OSError:  # a platform that keeps mapped files open: remove it with the tensor
                    if mapped is not None:
                        weakref.finalize(mapped, path.unlink, True)
        assert mapped is not None
        return mapped.view(t.shape)

    def _folder(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="qe-activations-"))
            weakref.finalize(self, _remove_if_empty, self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
