"""The in-kernel profile helpers of the Mosaic-GPU flash kernels (`pallas_kernels.gpu.mgpu_profile`), on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gpu import flash_attention_mgpu as mgpu
from pallas_kernels.gpu import mgpu_profile


def _events(tid, phases, start):
    """Begin/end events of back-to-back ``(name, cycles)`` phases from ``start`` (the trace's ts is cycles / 1000)."""
    events, t = [], start
    for name, cycles in phases:
        if name is not None:
            events.append(dict(name=name, ph="B", ts=t / 1e3, pid=1, tid=tid))
            events.append(dict(name=name, ph="E", ts=(t + cycles) / 1e3, pid=1, tid=tid))
        t += cycles
    return events


def test_summarize_shares_and_cta_spans():
    # Two CTAs of three warpgroups (tids 1..6); only the consumers (warpgroups 0 and 1) record, as in the kernel.
    # CTA 0, warpgroup 0: 100 cycles of qk, 50 unmarked, 250 of pv (span 400); warpgroup 1: 200 qk, 200 softmax.
    # CTA 1, warpgroup 0: 400 qk (span 400); warpgroup 1: 100 pv, 700 unmarked, 200 pv (span 1000).
    trace = {"traceEvents": (
        _events(1, [("qk", 100), (None, 50), ("pv", 250)], 5000)
        + _events(2, [("qk", 200), ("softmax", 200)], 7000)
        + _events(4, [("qk", 400)], 0)
        + _events(5, [("pv", 100), (None, 700), ("pv", 200)], 10)
    )}
    summary = mgpu_profile.summarize(trace)
    wg0, wg1 = summary["phases"][0], summary["phases"][1]
    assert wg0 == pytest.approx({"qk": 500 / 800, "pv": 250 / 800, "other": 50 / 800})
    assert wg1 == pytest.approx({"qk": 200 / 1400, "softmax": 200 / 1400, "pv": 300 / 1400, "other": 700 / 1400})
    assert summary["ctas"] == 2
    assert summary["cta_kcycles"] == pytest.approx((0.7, 1.0))


def test_compiler_params_record_only_inside_recording(tmp_path):
    plain = mgpu_profile.compiler_params(approx_math=True)
    assert plain.profile_space == 0 and plain.approx_math
    with mgpu_profile.recording(str(tmp_path), 300):
        params = mgpu_profile.compiler_params(approx_math=True)
        assert (params.profile_space, params.profile_dir, params.approx_math) == (300, str(tmp_path), True)
    assert mgpu_profile.compiler_params().profile_space == 0


@pytest.mark.parametrize("space, directory", [(0, "d"), (2.5, "d"), (10, "")])
def test_recording_refuses_bad_arguments(space, directory):
    with pytest.raises(ValueError, match="space|directory"):
        with mgpu_profile.recording(directory, space):
            pass


def test_profiled_forward_lowers_with_phase_records(tmp_path, monkeypatch):
    """Inside `recording`, the forward's Mosaic module stores a record per phase boundary; outside it, none."""
    from jax._src.pallas.mosaic_gpu import pallas_call_registration as registration

    modules = []
    lower = registration.lowering.lower_pipelined_jaxpr_to_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(registration.lowering, "lower_pipelined_jaxpr_to_module", capture)
    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)

    def lower_forward():
        jax.clear_caches()  # `forward` is jitted: a cached trace would keep the other compiler parameters
        fn = jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, is_causal=True))
        try:
            jax.export.export(fn, platforms=["cuda"])(q, kv, kv)
        except ValueError as e:  # the profiled call's host callback has no CUDA backend here; the module is built
            assert "lowering platform cuda" in str(e)

    lower_forward()
    with mgpu_profile.recording(str(tmp_path), 64):
        lower_forward()
    plain, profiled = modules
    # Six phases (prologue, wait_turn, qk, softmax, pv, epilogue): an entry and an exit record each, in the
    # unmasked and the two masked tile loops where they sit.
    record = "st.shared.v2.u32"  # Mosaic GPU's profiler: (phase tag, cycle counter) into shared memory
    assert record not in plain
    assert profiled.count(record) >= 12
