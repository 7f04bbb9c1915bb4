"""The progress bar of the demo and the benchmarks: rate and ETA; redraws on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import re

import pytest
import rich.console

from gqa_jax.demo.progress import ProgressBar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)


def _run(stream, total, monkeypatch, seconds_per_step=0.5):
    """Drives a bar over ``total`` steps on a fake clock (rich's console clock, which its progress reads)."""
    now = [100.0]
    monkeypatch.setattr(rich.console, "monotonic", lambda: now[0])
    bar = ProgressBar(total, label="train", unit="step", stream=stream)
    for i in range(total):
        now[0] += seconds_per_step
        bar.update(i + 1, f"loss [{i}]")  # brackets: no rich markup in messages
    bar.close()
    return stream.getvalue()


def test_not_a_terminal_gets_ten_plain_lines_with_rate_and_eta(monkeypatch):
    out = _run(io.StringIO(), 40, monkeypatch)
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 10
    # 2 steps a second on the fake clock; ETA = remaining steps / rate.
    assert lines[1] == "train  8/40 2.0 steps/s 0:00:04 ETA 0:00:16 loss [7]"
    assert lines[-1] == "train 40/40 2.0 steps/s 0:00:20 ETA 0:00:00 loss [39]"


def test_slow_steps_read_as_seconds_per_step(monkeypatch):
    out = _run(io.StringIO(), 10, monkeypatch, seconds_per_step=4.0)
    assert out.splitlines()[-1] == "train 10/10 4.0 s/step 0:00:40 ETA 0:00:00 loss [9]"


def test_a_terminal_gets_one_bar_redrawn_in_place(monkeypatch):
    out = _run(_Terminal(), 40, monkeypatch)
    assert "\x1b[" in out  # cursor and colour control: the live bar
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).replace("\r", "\n").splitlines()
    last = [line for line in final if line.strip()][-1]
    assert re.fullmatch(r"train [━╸╺ ]+ 40/40 2\.0 steps/s 0:00:20 ETA 0:00:00 loss \[39\]\s*", last), final[-3:]


def test_bad_total():
    with pytest.raises(ValueError, match="total must be >= 1, got total=0"):
        ProgressBar(0)
