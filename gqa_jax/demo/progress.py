"""Progress of a long loop (the demo's training, the benchmarks) with its rate and ETA, drawn with `rich`.

On a terminal, one bar redrawn in place. Anywhere else (a pipe, a file, a CI
log, a notebook) plain lines with no control characters: one per tenth of the
run, so a log shows the trend without thousands of redraws.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_LINES = 10  # plain lines per run when the stream is not a terminal


class _RateColumn(ProgressColumn):
    """``12.3 steps/s``, or ``4.5 s/step`` below one a second; ``? steps/s`` before there are two updates."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.speed
        if not speed:
            return Text(f"? {self.unit}s/s")
        if speed >= 1:
            return Text(f"{speed:,.1f} {self.unit}s/s")
        return Text(f"{1 / speed:,.1f} s/{self.unit}")


class ProgressBar:
    """``label ━━━━━╺━━━━ 5/10 2.1 steps/s 0:00:02 ETA 0:00:03 message``, on stderr by default.

    Example::

        bar = ProgressBar(total=100, label="train", unit="step")
        for step in range(100):
            loss = 1.0 / (step + 1)  # one training step
            bar.update(step + 1, f"loss {loss:.3f}")
        bar.close()

    Args:
      total: number of units of work, at least 1.
      label: text in front of the bar.
      unit: singular name of one unit, for the rate (``steps/s``).
      stream: where to draw; default ``sys.stderr`` at construction.
    """

    def __init__(self, total: int, label: str = "", unit: str = "it", stream: TextIO | None = None):
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total=}")
        self.total = total
        self.console = Console(file=sys.stderr if stream is None else stream)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        text = [TextColumn("{task.description}", markup=False), MofNCompleteColumn(), _RateColumn(unit), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[message]}", markup=False)]
        self._columns = text  # the plain line: the live bar's columns without the bar
        self._progress = Progress(text[0], BarColumn(), *text[1:], console=self.console, disable=not self.live,
                                  speed_estimate_period=60.0)
        self._task = self._progress.add_task(label, total=total, message="")
        self._lines_written = 0
        self._progress.start()

    def update(self, done: int, message: str = "") -> None:
        """Sets the progress to ``done`` of ``total`` (clipped) with a trailing message."""
        done = min(max(done, 0), self.total)
        self._progress.update(self._task, completed=done, message=message)
        line = done * _LINES // self.total
        if not self.live and line > self._lines_written:
            self._lines_written = line
            task = self._progress.tasks[0]
            self.console.print(Text(" ").join(column.render(task) for column in self._columns), soft_wrap=True)

    def close(self) -> None:
        """Stops redrawing; the bar's last state stays on screen."""
        self._progress.stop()
