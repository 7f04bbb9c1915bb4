"""A dependency-free progress bar for the terminal (the demo and the benchmarks)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Prints ``label [#####.....] 5/10 3.2s message`` on one line, redrawn in place.

    Example::

        bar = ProgressBar(total=100, label="train")
        for step in range(100):
            ...
            bar.update(step + 1, f"loss {loss:.3f}")
        bar.close()
    """

    def __init__(self, total: int, label: str = "", width: int = 30, stream: TextIO | None = None):
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total=}")
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()

    def update(self, done: int, message: str = "") -> None:
        """Redraws the bar at ``done`` of ``total`` with a trailing message."""
        done = min(max(done, 0), self.total)
        filled = round(self.width * done / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {elapsed:5.1f}s {message}\033[K")
        self.stream.flush()

    def close(self) -> None:
        """Ends the line."""
        self.stream.write("\n")
        self.stream.flush()
