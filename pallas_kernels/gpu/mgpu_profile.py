"""In-kernel profiles of the Mosaic-GPU flash kernels, through Mosaic GPU's own profiler.

The kernels mark their phases with `jax.named_scope` (``"qk"``, ``"softmax"``,
...), which costs nothing unless a profile is recorded. Inside `recording`,
kernels traced anew build with `compiler_params` that ask Mosaic GPU to
record, per warpgroup, the entry and exit of each phase (the SM's cycle
counter, kept in shared memory and copied out at the end), and every call
writes a Chrome trace (JSON) into the directory. `summarize` reads one: the
share of each warpgroup's time each phase takes, and how evenly the CTAs' work
spreads. For tools (``tools/mgpu_profile.py``), not for production calls: the
records cost shared memory (16 bytes per phase per warpgroup, so
``space * 16 * 3`` bytes per CTA) and a few cycles each.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import json
import statistics

from jax.experimental.pallas import mosaic_gpu as plgpu

WARPGROUPS = 3  # per CTA in the flash kernels: two consumers, then the producer


@dataclasses.dataclass(frozen=True)
class _Recording:
    directory: str
    space: int


_ACTIVE: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("mgpu_profile", default=None)


@contextlib.contextmanager
def recording(directory: str, space: int = 512):
    """Within it, kernels traced anew record up to ``space`` phases per warpgroup into ``directory``.

    Calls already compiled (jit caches) keep their kernels: clear the caches
    (``jax.clear_caches()``) or trace new functions inside the block.

    Raises:
      ValueError: for a ``space`` below 1 or an empty ``directory``.
    """
    if not isinstance(space, int) or space < 1:
        raise ValueError(f"space={space!r} must be a positive int")
    if not directory:
        raise ValueError(f"directory={directory!r} must name a folder")
    token = _ACTIVE.set(_Recording(directory, space))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def compiler_params(**kwargs) -> plgpu.CompilerParams:
    """``plgpu.CompilerParams(**kwargs)``, recording phases inside `recording`."""
    active = _ACTIVE.get()
    if active is not None:
        kwargs.update(profile_space=active.space, profile_dir=active.directory)
    return plgpu.CompilerParams(**kwargs)


def summarize(trace: dict) -> dict:
    """Phase shares and CTA balance of one trace `recording` wrote.

    Durations are in SM cycles (the trace's timestamps are cycles / 1000
    within one warpgroup's records).

    Args:
      trace: the parsed JSON (``{"traceEvents": [...]}``).

    Returns:
      ``{"phases": {warpgroup: {phase: share}}, "cta_kcycles": (mean, max),
      "ctas": n}``: each warpgroup's phases as fractions of its span from
      first entry to last exit (``"other"`` is the unmarked rest), summed over
      CTAs; the CTAs' spans (longest warpgroup) in thousands of cycles.
    """
    spans = {}
    phase_cycles = collections.defaultdict(lambda: collections.defaultdict(float))
    open_at = {}
    for event in trace["traceEvents"]:
        key = (event["tid"], event["name"])
        if event["ph"] == "B":
            open_at[key] = event["ts"]
        else:
            phase_cycles[event["tid"]][event["name"]] += (event["ts"] - open_at.pop(key)) * 1e3
        first, last = spans.get(event["tid"], (event["ts"], event["ts"]))
        spans[event["tid"]] = (min(first, event["ts"]), max(last, event["ts"]))
    by_warpgroup = collections.defaultdict(lambda: collections.defaultdict(float))
    span_of_warpgroup = collections.defaultdict(float)
    cta_spans = collections.defaultdict(float)
    for tid, (first, last) in spans.items():
        warpgroup, cta = (tid - 1) % WARPGROUPS, (tid - 1) // WARPGROUPS
        span = (last - first) * 1e3
        span_of_warpgroup[warpgroup] += span
        cta_spans[cta] = max(cta_spans[cta], span)
        marked = 0.0
        for name, cycles in phase_cycles[tid].items():
            by_warpgroup[warpgroup][name] += cycles
            marked += cycles
        by_warpgroup[warpgroup]["other"] += span - marked
    phases = {
        wg: {name: cycles / span_of_warpgroup[wg] for name, cycles in sorted(names.items())}
        for wg, names in sorted(by_warpgroup.items()) if span_of_warpgroup[wg] > 0
    }
    cta_k = [s / 1e3 for s in cta_spans.values()]
    return {"phases": phases, "cta_kcycles": (statistics.fmean(cta_k), max(cta_k)) if cta_k else (0.0, 0.0),
            "ctas": len(cta_k)}


def load(path: str) -> dict:
    """`summarize` of the trace file at ``path``."""
    with open(path) as f:
        return summarize(json.load(f))
