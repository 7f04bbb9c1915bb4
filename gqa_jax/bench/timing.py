"""Timing and environment helpers shared by the benchmarks.

`time_fn` follows DESIGN.md: warm up (compile), then the median over several
repetitions of many back-to-back dispatches with a single sync at the end, so
host dispatch latency does not understate fast kernels; `time_interleaved`
does the same for several functions with their repetitions interleaved.
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax


def _block(x):
    return jax.block_until_ready(x)


def time_fn(fn: Callable, arg_sets: Sequence[Sequence[Any]], *, reps: int = 10, min_rep_seconds: float = 0.05) -> float:
    """Median seconds per call of ``fn``.

    Args:
      fn: a jitted function.
      arg_sets: one or more argument tuples; calls rotate through them so that
        inputs that would fit in L2 are not re-read from cache.
      reps: repetitions; the median is returned.
      min_rep_seconds: each repetition issues enough back-to-back calls to last
        at least this long, then syncs once.

    Returns:
      Median seconds per call.
    """
    return time_interleaved({"fn": fn}, arg_sets, reps=reps, min_rep_seconds=min_rep_seconds)["fn"]


def time_interleaved(fns: Mapping[str, Callable], arg_sets: Sequence[Sequence[Any]], *, reps: int = 10,
                     min_rep_seconds: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, their repetitions interleaved.

    `time_fn` for several functions at once: repetition ``r`` of every
    function runs before repetition ``r + 1`` of any, and the order turns by
    one each repetition, so a drift of the device's clocks over the run, and
    whatever one function leaves behind for the next, fall on all of them
    alike (an A/B of two variants of one kernel).

    Args:
      fns: name -> jitted (or ahead-of-time compiled) function.
      arg_sets: argument tuples every function takes; calls rotate through them.
      reps: repetitions per function; the median is returned.
      min_rep_seconds: each repetition of a function issues enough
        back-to-back calls to last at least this long, then syncs once.

    Returns:
      ``{name: median seconds per call}``.

    Raises:
      ValueError: for no functions, no argument sets or ``reps < 1``.
    """
    if not fns or not arg_sets:
        raise ValueError(f"need functions and argument sets, got {len(fns)} functions, {len(arg_sets)} argument sets")
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got reps={reps}")
    calls = {}
    for name, fn in fns.items():
        _block(fn(*arg_sets[0]))  # compile
        start = time.perf_counter()
        _block(fn(*arg_sets[0]))
        once = max(time.perf_counter() - start, 1e-6)
        calls[name] = max(len(arg_sets), int(min_rep_seconds / once) + 1)
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(reps):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            fn = fns[name]
            start = time.perf_counter()
            out = None
            for i in range(calls[name]):
                out = fn(*arg_sets[i % len(arg_sets)])
            _block(out)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Device and versions, printed beside every figure."""
    device = jax.devices()[0]
    info = {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
    }
    if device.platform == "gpu":
        info["triton"] = _version("triton")
        info["cudnn"] = _cudnn_version()
    return info


def _cudnn_version() -> str:
    try:
        from jax._src.lib import cuda_versions  # private: there is no public accessor

        return str(cuda_versions.cudnn_get_version())
    except (ImportError, AttributeError):
        return "unknown"
