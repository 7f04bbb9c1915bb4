"""``return_residuals=True``: every flash kernel's ``(out, lse)`` in one convention (natural log, ``-inf`` dead rows).

The lse is checked against an independent float64 log-sum-exp of the logits
(scale, soft-cap, bias) over the keys `tests.reference.visibility` says each
query sees; rows that see no key must give ``-inf`` and a zero output. The
residual form is forward only: differentiating through it raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gpu, tpu
from pallas_kernels.gpu import flash_attention_mgpu
from tests.reference import reference_attention, visibility

def _device_kind() -> str:
    device = jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    return "hopper" if str(getattr(device, "compute_capability", "")).startswith("9") else "gpu"


def _mosaic(q, k, v, bias=None, **kw):
    assert bias is None, "the Mosaic kernel takes no bias"
    out, lse = flash_attention_mgpu.flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                                                    return_residuals=True, **kw)
    return out.astype(jnp.float32), lse


KERNELS = {
    "gpu": lambda q, k, v, **kw: gpu.flash_attention(q, k, v, interpret=True, return_residuals=True, **kw),
    "tpu": lambda q, k, v, **kw: tpu.flash_attention(q, k, v, interpret=True, return_residuals=True, **kw),
}
# Compiled on the GPU machine: (kernel, the device kind it needs, output and lse tolerance).
COMPILED = {
    "gpu_compiled": (lambda q, k, v, **kw: gpu.flash_attention(q, k, v, return_residuals=True, **kw), ("gpu", "hopper"),
                     3e-3),
    "mosaic_compiled": (_mosaic, ("hopper",), 3e-2),
}
CASES = {
    "causal_kv_lengths_with_empty_row": dict(is_causal=True, key_value_seq_lengths=np.array([0, 29], np.int32)),
    "q_lengths_window_softcap": dict(query_seq_lengths=np.array([20, 7], np.int32), local_window_size=(5, 2),
                                     logits_soft_cap=3.0, scale=0.4),
    "bias_bottom_right": dict(is_causal=True, bias=True),
}


def _reference_lse(q, k, bias, scale=None, logits_soft_cap=None, **rules):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    vis = visibility(B, T, S, **rules)
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    lse = np.full((B, N, T), -np.inf)
    for n in range(N):
        logits = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // (N // K)]) * scale
        if logits_soft_cap is not None:
            logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
        if bias is not None:
            logits = logits + np.asarray(bias, np.float64)[:, n]
        masked = np.where(vis, logits, -np.inf)
        top = masked.max(axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        total = np.exp(masked - top).sum(-1)
        lse[:, n] = np.where(total > 0, top[..., 0] + np.log(np.where(total > 0, total, 1.0)), -np.inf)
    return lse


def _inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, 24, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 29, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 29, 2, 64)), jnp.float32)
    rules = dict(CASES[case])
    bias = jnp.asarray(rng.standard_normal((2, 4, 24, 29)), jnp.float32) if rules.pop("bias", False) else None
    return q, k, v, bias, rules


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_lse_is_the_natural_log_sum_exp_with_minus_inf_for_empty_rows(kernel, case):
    q, k, v, bias, rules = _inputs(case)
    out, lse = KERNELS[kernel](q, k, v, bias=bias, **rules)
    assert lse.shape == (2, 4, 24) and lse.dtype == jnp.float32
    ref_out, _ = reference_attention(q, k, v, bias=bias, **rules)
    expected = _reference_lse(q, k, bias, **rules)
    lse = np.asarray(lse)
    dead = np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(lse), dead)
    np.testing.assert_allclose(lse[~dead], expected[~dead], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5)
    if case == "causal_kv_lengths_with_empty_row":
        assert dead[0].all() and not np.any(np.asarray(out)[0])


@pytest.mark.parametrize("kernel", sorted(COMPILED))
@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "bias_bottom_right"))
def test_compiled_residuals(kernel, case):
    fn, kinds, tol = COMPILED[kernel]
    if _device_kind() not in kinds:
        pytest.skip(f"{kernel} needs a GPU of kind {kinds} to run compiled; this is {_device_kind()}")
    q, k, v, bias, rules = _inputs(case)
    out, lse = fn(q, k, v, **rules)
    expected = _reference_lse(q, k, bias, **rules)
    lse, dead = np.asarray(lse), np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(lse), dead)
    np.testing.assert_allclose(lse[~dead], expected[~dead], rtol=tol, atol=tol)
    ref_out, _ = reference_attention(q, k, v, **rules)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref_out) / np.linalg.norm(ref_out)
    assert err < 5 * tol, err


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_residual_outputs_are_forward_only(kernel):
    q, k, v, _, rules = _inputs("causal_kv_lengths_with_empty_row")
    with pytest.raises(NotImplementedError, match="forward only"):
        jax.grad(lambda q: jnp.sum(KERNELS[kernel](q, k, v, **rules)[0]))(q)


def test_mosaic_gpu_residuals_lower_in_the_same_convention():
    q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    out, lse = jax.eval_shape(lambda q, k: flash_attention_mgpu.flash_attention(
        q, k, k, is_causal=True, return_residuals=True), q, k)
    assert (out.shape, lse.shape, lse.dtype) == ((1, 128, 4, 64), (1, 4, 128), jnp.float32)
    exported = jax.export.export(jax.jit(lambda q, k: flash_attention_mgpu.flash_attention(
        q, k, k, is_causal=True, return_residuals=True)), platforms=["cuda"])(q, k)
    assert "mosaic_gpu_v2" in exported.mlir_module()
