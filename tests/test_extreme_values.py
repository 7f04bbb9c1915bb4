"""Extreme values: huge logits, huge values, finite "mask" biases, fully masked rows.

Every implementation must pass every case: the XLA path and the two flash
kernels (`pallas_kernels.numerics` says how the kernels stay exact):

* bfloat16 and float32 values near the dtype's maximum: the float32
  accumulator of the unnormalized ``p @ v`` must not overflow (the float64
  reference is finite);
* a finite bias of ``finfo(float32).min`` is a bias, not a mask: a row with
  that bias on every key is the uniform average (as in
  ``jax.nn.dot_product_attention`` and Hugging Face), forward and gradients.
  Only ``-inf`` (or a boolean mask) means "not visible".

The Triton kernel runs compiled where the default backend is a GPU and in
interpret mode elsewhere; the TPU kernel compiled on a TPU, interpreted
elsewhere. So on the GPU machine
``PYTHONPATH=. python -m pytest -q tests/test_extreme_values.py`` checks the
compiled Triton kernel. Matrix products run at full float32 precision
(GPUs default to TF32, which cannot keep ``1e4`` logits exact).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from pallas_kernels import gpu, tpu
from pallas_kernels.gpu import flash_attention_mgpu
from tests.devices import on_hopper
from tests.reference import reference_attention, reference_attention_grads

B, T, S, N, K, H = 2, 6, 8, 2, 1, 8
MIN32 = float(np.finfo(np.float32).min)
BACKEND = jax.default_backend()

IMPLEMENTATIONS = {
    "xla": lambda q, k, v, **kw: gqa_jax.dot_product_attention(q, k, v, implementation="xla", **kw),
    "gpu.flash_attention": lambda q, k, v, **kw: gpu.flash_attention(q, k, v, interpret=BACKEND != "gpu", **kw),
    "tpu.flash_attention": lambda q, k, v, **kw: tpu.flash_attention(q, k, v, interpret=BACKEND != "tpu", **kw),
}


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _qkv(seed: int, dtype=np.float32, q_scale=1.0, v_scale=1.0):
    rng = np.random.default_rng(seed)
    q = (q_scale * rng.standard_normal((B, T, N, H))).astype(np.float32)
    k = (q_scale * rng.standard_normal((B, S, K, H))).astype(np.float32)
    v = (v_scale * rng.uniform(0.5, 1.0, (B, S, K, H))).astype(np.float32)
    return [jnp.asarray(x, dtype) for x in (q, k, v)]


def _out_and_grads(name, q, k, v, d_out, **kw):
    @jax.jit  # one compilation instead of one per operation
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: IMPLEMENTATIONS[name](q, k, v, **kw), q, k, v)
        return out, vjp(d_out)

    out, grads = run(q, k, v, d_out)
    return np.asarray(out, np.float64), [np.asarray(g, np.float64) for g in grads]


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_logits_of_1e4_in_float32_stay_exact(name):
    q, k, v = _qkv(1, q_scale=np.sqrt(1e4 / np.sqrt(H)))  # |logits| ~ 1e4
    out = np.asarray(IMPLEMENTATIONS[name](q, k, v, is_causal=True), np.float64)
    np.testing.assert_allclose(out, reference_attention(q, k, v, is_causal=True)[0], atol=1e-5, rtol=1e-5)


def test_logits_of_1e4_give_finite_gradients_on_the_xla_path():
    q, k, v = _qkv(1, q_scale=np.sqrt(1e4 / np.sqrt(H)))
    d_out = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, N, H)), jnp.float32)
    _, grads = _out_and_grads("xla", q, k, v, d_out, is_causal=True)
    for grad, ref in zip(grads, reference_attention_grads(q, k, v, d_out, is_causal=True)):
        assert np.isfinite(grad).all()
        np.testing.assert_allclose(grad, ref, atol=1e-2, rtol=1e-3)  # near one-hot rows: d(logits) ~ 1e4 * eps


# bfloat16 and float32 values near their maximum (~3.4e38) would overflow the float32 accumulator of the
# unnormalized p @ v; float16 cannot (its kernels use no shift). "bias": the Triton kernel's biased path.
NEAR_MAX_CASES = [("bfloat16", False), ("bfloat16", True), ("float32", False), ("float16", False)]


@pytest.mark.parametrize("dtype, with_bias", NEAR_MAX_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_values_near_the_dtype_max_stay_finite(name, dtype, with_bias):
    q, k, v = _qkv(3, dtype, v_scale=float(jnp.finfo(dtype).max) / 3.4)  # |v| <= max / 3.4
    bias = jnp.asarray(np.random.default_rng(11).standard_normal((B, N, T, S)), jnp.float32) if with_bias else None
    expected = reference_attention(q, k, v, bias)[0]
    assert np.isfinite(expected.astype(dtype)).all()
    out = np.asarray(IMPLEMENTATIONS[name](q, k, v, bias=bias), np.float64)
    assert np.isfinite(out).all(), f"{(~np.isfinite(out)).sum()} non-finite outputs"
    np.testing.assert_allclose(out, expected, rtol=2e-2 if dtype != "float32" else 1e-5)


DECODERS = {
    "gpu.decode_attention": lambda *a, **kw: gpu.decode_attention(*a, interpret=BACKEND != "gpu", **kw),
    "tpu.decode_attention": lambda *a, **kw: tpu.decode_attention(*a, interpret=BACKEND != "tpu", **kw),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_decode_kernels_stay_finite_for_values_near_the_dtype_max(name, dtype):
    # One query token per row over a cache of 64 keys, 4 query heads on 2 KV heads.
    rng = np.random.default_rng(21)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 128)), dtype)
    k = jnp.asarray(rng.standard_normal((2, 64, 2, 128)), dtype)
    v = jnp.asarray(rng.uniform(0.5, 1.0, (2, 64, 2, 128)) * float(jnp.finfo(dtype).max) / 3.4, dtype)
    lengths = jnp.array([64, 37], jnp.int32)
    expected = reference_attention(q, k, v, key_value_seq_lengths=np.asarray(lengths), is_causal=True,
                                   query_offset=np.asarray(lengths) - 1)[0]
    assert np.isfinite(expected.astype(dtype)).all()
    out = np.asarray(DECODERS[name](q, k, v, lengths), np.float64)
    assert np.isfinite(out).all(), f"{(~np.isfinite(out)).sum()} non-finite outputs"
    np.testing.assert_allclose(out, expected, rtol=2e-2 if dtype != "float32" else 1e-5)


@pytest.mark.skipif(not on_hopper(), reason="the Mosaic-GPU kernel compiles only on an NVIDIA Hopper GPU (9.x)")
@pytest.mark.parametrize("is_causal", [False, True])
def test_mosaic_gpu_values_near_the_bfloat16_max_stay_finite(is_causal):
    rng = np.random.default_rng(12)
    q = jnp.asarray(rng.standard_normal((1, 256, 2, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, 256, 1, 64)), jnp.bfloat16)
    v = jnp.asarray(rng.uniform(0.5, 1.0, (1, 256, 1, 64)) * 1e38, jnp.bfloat16)
    expected = reference_attention(q, k, v, is_causal=is_causal)[0]
    out = np.asarray(flash_attention_mgpu.flash_attention(q, k, v, is_causal=is_causal), np.float64)
    assert np.isfinite(out).all(), f"{(~np.isfinite(out)).sum()} non-finite outputs"
    np.testing.assert_allclose(out, expected, rtol=2e-2)

def _min_bias():
    """float32 ``[B, N, T, S]``: rows 0 and 5 of every head have ``finfo.min`` on every key, row 2 on half the keys."""
    bias = np.random.default_rng(4).standard_normal((B, N, T, S)).astype(np.float32)
    bias[:, :, [0, 5], :] = MIN32
    bias[:, :, 2, : S // 2] = MIN32
    return bias


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_a_finfo_min_bias_is_a_bias_not_a_mask(name):
    q, k, v = _qkv(5)
    bias = _min_bias()
    out = np.asarray(IMPLEMENTATIONS[name](q, k, v, bias=jnp.asarray(bias)), np.float64)
    G = N // K
    expected_jax_nn = jax.nn.dot_product_attention(q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2),
                                                   bias=jnp.asarray(bias))
    np.testing.assert_allclose(out, np.asarray(expected_jax_nn, np.float64), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, reference_attention(q, k, v, bias)[0], atol=1e-5, rtol=1e-5)
    uniform = np.asarray(jnp.repeat(v, G, axis=2), np.float64).mean(axis=1)  # [B, N, H]: every key weighs 1/S
    np.testing.assert_allclose(out[:, 0], uniform, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_a_finfo_min_bias_has_the_gradients_of_a_bias(name):
    # Uniform rows have weights 1/S in the backward too, although m + log(S) rounds to m near finfo.min.
    q, k, v = _qkv(5)
    bias = jnp.asarray(_min_bias())
    d_out = jnp.asarray(np.random.default_rng(10).standard_normal((B, T, N, H)), jnp.float32)
    G = N // K

    @jax.jit
    def grads(q, k, v, bias, d_out):
        def jax_nn(q, k, v, bias):
            return jax.nn.dot_product_attention(q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2), bias=bias)

        _, vjp = jax.vjp(lambda q, k, v, bias: IMPLEMENTATIONS[name](q, k, v, bias=bias), q, k, v, bias)
        return vjp(d_out), jax.vjp(jax_nn, q, k, v, bias)[1](d_out)[3]

    (d_q, d_k, d_v, d_bias), d_bias_jax_nn = [jax.tree.map(lambda x: np.asarray(x, np.float64), g)
                                              for g in grads(q, k, v, bias, d_out)]
    for grad, ref in zip((d_q, d_k, d_v), reference_attention_grads(q, k, v, d_out, bias)):
        np.testing.assert_allclose(grad, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(d_bias, d_bias_jax_nn, atol=1e-5, rtol=1e-4)
    assert np.abs(d_bias[:, :, 0]).max() > 1e-3  # the uniform rows do have a bias gradient


def _masked_rows(seed: int):
    """Rules under which row 1 of batch 0 and all of batch 1 see no key, in each way a row can lose its keys."""
    rng = np.random.default_rng(seed)
    bias = rng.standard_normal((B, N, T, S)).astype(np.float32)
    bias[0, :, 1] = -np.inf
    q_seg, kv_seg = np.zeros((B, T), np.int32), np.zeros((B, S), np.int32)
    q_seg[0, 3] = 7  # no key has segment 7
    ways = {
        "kv_lengths_zero": dict(key_value_seq_lengths=np.array([S, 0], np.int32)),
        "minus_inf_bias": dict(bias=jnp.asarray(bias)),
        "segments": dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg),
        "window_after_the_keys": dict(is_causal=True, local_window_size=(0, 0),
                                      query_offset=np.array([0, S], np.int32)),
    }
    return {**ways, "all_at_once": {key: value for rules in ways.values() for key, value in rules.items()}}


# Every way on the XLA path; the interpret-mode kernels (seconds per call) take them all in one call.
MASKED_CASES = [("xla", how) for how in sorted(_masked_rows(0))] + [
    (name, "all_at_once") for name in IMPLEMENTATIONS if name != "xla"]


@pytest.mark.parametrize("name, how", MASKED_CASES)
def test_fully_masked_rows_give_zeros_in_outputs_and_gradients(name, how):
    q, k, v = _qkv(6)
    rules = _masked_rows(7)[how]
    d_out = jnp.asarray(np.random.default_rng(8).standard_normal((B, T, N, H)), jnp.float32)
    out, (d_q, d_k, d_v) = _out_and_grads(name, q, k, v, d_out, **rules)
    oracle_rules = {key: value for key, value in rules.items() if key != "bias"}
    bias = rules.get("bias")
    expected = reference_attention(q, k, v, bias, **oracle_rules)[0]
    expected_grads = reference_attention_grads(q, k, v, d_out, bias, **oracle_rules)
    dead = ~np.asarray(expected != 0).any(axis=(2, 3))  # [B, T]: rows that see no key
    assert dead.any()
    for x in (out, d_q, d_k, d_v):
        assert np.isfinite(x).all()
    assert (out[dead] == 0).all() and (d_q[dead] == 0).all()
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    for grad, ref in zip((d_q, d_k, d_v), expected_grads):
        np.testing.assert_allclose(grad, ref, atol=1e-4, rtol=1e-4)


def test_a_boolean_mask_that_hides_every_key_gives_zeros_on_the_xla_path():
    q, k, v = _qkv(9)
    mask = np.ones((B, T, S), bool)
    mask[1, 4] = False
    out, vjp = jax.vjp(lambda q, k, v: gqa_jax.dot_product_attention(q, k, v, mask=mask, implementation="xla"),
                       q, k, v)
    d_q, d_k, d_v = vjp(jnp.ones_like(out))
    assert (np.asarray(out)[1, 4] == 0).all() and (np.asarray(d_q)[1, 4] == 0).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in (out, d_q, d_k, d_v))
