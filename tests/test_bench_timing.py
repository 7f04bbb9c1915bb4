"""`gqa_jax.bench.timing.time_interleaved`: call order, argument rotation and what it measures."""

import time

import jax.numpy as jnp
import pytest

from gqa_jax.bench.timing import time_interleaved


def _recorder(name, log, sleep=0.0):
    def fn(x):
        log.append((name, x))
        if sleep:
            time.sleep(sleep)
        return jnp.zeros(())

    return fn


def test_repetitions_interleave_and_arguments_rotate():
    log = []
    fns = {"a": _recorder("a", log), "b": _recorder("b", log)}
    medians = time_interleaved(fns, [(1,), (2,)], reps=3, min_rep_seconds=0.0)
    assert set(medians) == {"a", "b"} and all(m > 0 for m in medians.values())
    warm_up = [("a", 1), ("a", 1), ("b", 1), ("b", 1)]  # compile, then one call to size the repetitions
    a, b = [("a", 1), ("a", 2)], [("b", 1), ("b", 2)]  # at least one call per argument set
    assert log == warm_up + a + b + b + a + a + b  # the order turns by one each repetition


def test_medians_measure_each_function():
    log = []
    medians = time_interleaved({"slow": _recorder("slow", log, sleep=0.004), "fast": _recorder("fast", log)},
                               [(0,)], reps=3, min_rep_seconds=0.0)
    assert medians["slow"] >= 0.004
    assert medians["fast"] < medians["slow"]


@pytest.mark.parametrize("fns, arg_sets, reps, message", [
    ({}, [(0,)], 1, "need functions and argument sets"),
    ({"a": lambda x: x}, [], 1, "need functions and argument sets"),
    ({"a": lambda x: x}, [(0,)], 0, "reps must be at least 1"),
])
def test_refuses_nothing_to_time(fns, arg_sets, reps, message):
    with pytest.raises(ValueError, match=message):
        time_interleaved(fns, arg_sets, reps=reps)
