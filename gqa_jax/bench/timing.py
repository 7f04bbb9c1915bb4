"""Timing and environment helpers shared by the benchmarks.

`time_fn` follows DESIGN.md: warm up (compile), then the median over several
repetitions of many back-to-back dispatches with a single sync at the end, so
host dispatch latency does not understate fast kernels.
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time
from typing import Any, Callable, Sequence

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
    _block(fn(*arg_sets[0]))  # compile
    start = time.perf_counter()
    _block(fn(*arg_sets[0]))
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(len(arg_sets), int(min_rep_seconds / once) + 1)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        out = None
        for i in range(calls):
            out = fn(*arg_sets[i % len(arg_sets)])
        _block(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


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
