"""The built-in progress reporter: an event-hook plugin that says how long a run will take.

It watches ``qe_run_start``, ``qe_block_start``, ``qe_block_end`` and ``qe_run_end`` and never
touches the pipeline. A command turns it on by putting ``progress: True`` in the ``info`` of
``qe_run_start`` (``--quiet`` leaves it off); runs that do not (library calls of the
pipeline) see nothing from it.

* ``qe quantize`` / ``qe analyze``: after the first block, one line with the blocks done, the
  time per block and the time left; again every few minutes on long runs (useful in logs,
  where a progress bar is one long line).
* ``qe compare``: a second bar under the grid's bar that counts the blocks of the cell being
  quantized, so a cell that takes half an hour does not look frozen; after each cell's first
  block, one line with the time left in that cell (when it is more than a few seconds).

Each :class:`qe.plugins.QEPluginManager` registers its own instance under the name
``qe.progress``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from qe.hookspecs import hookimpl

PLUGIN_NAME = "qe.progress"


def format_duration(seconds: float) -> str:
    """``41 s``, ``3 min 12 s``, ``2 h 05 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressReporter:
    """Estimates of the time left (quantize, analyze) and per-cell block bars (compare)."""

    #: no estimate line when less than this is left (a data-free run takes seconds)
    min_seconds_left: float = 10.0
    #: on long runs, repeat the estimate when this much time passed since the last one
    repeat_seconds: float = 300.0

    def __init__(self, clock: Callable[[], float] = time.perf_counter, write: Callable[[str], None] | None = None):
        self.clock = clock
        self._write = write
        self.active = False
        self.command = ""
        self._reset()

    def _reset(self) -> None:
        self.blocks_total: int | None = None
        self.blocks_run = 0
        self.block_seconds = 0.0
        self._block_t0: float | None = None
        self._last_message: float | None = None
        self._cell_bar = None
        self._cell_blocks = 0
        self._cell_seconds = 0.0

    def write(self, line: str) -> None:
        if self._write is not None:
            self._write(line)
            return
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)  # above any progress bar, not through it

    # ------------------------------------------------------------------ hooks
    # Each takes only the arguments it reads (pluggy allows a subset), so hooks that gain
    # arguments later keep working with it.
    @hookimpl
    def qe_run_start(self, command: str, info: dict[str, Any]) -> None:
        self._close_bar()
        self._reset()
        self.command = command
        self.active = bool(info.get("progress", False))
        self.blocks_total = info.get("blocks")

    @hookimpl
    def qe_block_start(self, block_index: int, num_blocks: int) -> None:
        if not self.active:
            return
        self._block_t0 = self.clock()
        if self.command == "compare" and (self._cell_bar is None or block_index == 0):
            self._start_cell_bar(block_index, num_blocks)

    @hookimpl
    def qe_block_end(self, block_index: int, num_blocks: int) -> None:
        if not self.active or self._block_t0 is None:
            return
        now, start = self.clock(), self._block_t0
        self.blocks_run += 1
        self.block_seconds += now - start
        self._block_t0 = None
        per_block = self.block_seconds / self.blocks_run
        if self.command == "compare":
            # Cells differ widely in cost (RTN alone takes seconds, QE hours): estimate each
            # cell from its own first block.
            self._cell_blocks += 1
            self._cell_seconds += now - start
            if self._cell_bar is not None:
                self._cell_bar.update(1)
                if block_index + 1 >= num_blocks:
                    self._close_bar()
            left = num_blocks - block_index - 1
            cell_left = self._cell_seconds / self._cell_blocks * left
            if self._cell_blocks == 1 and left and cell_left >= self.min_seconds_left:
                self.write(f"qe compare: the cell's first block took {format_duration(now - start)}; about "
                           f"{format_duration(cell_left)} left in this cell (estimate)")
            return
        total = min(self.blocks_total or num_blocks, num_blocks)
        left = max(total - block_index - 1, 0)
        seconds_left = per_block * left
        if left == 0 or seconds_left < self.min_seconds_left:
            return
        due = self._last_message is None or now - self._last_message >= self.repeat_seconds
        if due:
            self._last_message = now
            self.write(f"qe {self.command}: {block_index + 1}/{total} blocks done, {format_duration(per_block)} per "
                       f"block; about {format_duration(seconds_left)} left (estimate)")

    @hookimpl
    def qe_run_end(self) -> None:
        self._close_bar()
        self.active = False

    # ------------------------------------------------------------------ compare's cell bar
    def _start_cell_bar(self, block_index: int, num_blocks: int) -> None:
        from tqdm.auto import tqdm

        self._close_bar()
        self._cell_blocks, self._cell_seconds = 0, 0.0
        self._cell_bar = tqdm(total=num_blocks, initial=block_index, desc="  this cell", unit="block", leave=False)
    def _close_bar(self) -> None:
        if self._cell_bar is not None:
            self._cell_bar.close()
            self._cell_bar = None
