"""Property tests: random calls, every rule at once, against the float64 oracle, forward and gradients.

`hypothesis` draws tiny shapes (B, T, S, N, K, H) and any mix of causal,
lengths (zero included: fully masked rows), offsets, window, soft-cap, segment
ids and a broadcast bias (``-inf`` entries included); `dot_product_attention`
on the XLA path and the two flash kernels in Pallas interpret mode must match
`tests.reference` in float32, outputs and gradients of query, key and value.
Examples are derandomized (CI reruns the same ones) and few: each new shape
compiles the interpret-mode kernels again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gqa_jax
from pallas_kernels import gpu, tpu
from tests.reference import reference_attention, reference_attention_grads

ATOL = RTOL = 5e-5  # float32 against float64
GRAD_ATOL = GRAD_RTOL = 2e-4


def _settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def attention_calls(draw, min_groups: int = 1):
    """``(arrays, rules)``: float32 query/key/value/d_out (and bias) and the keyword rules of one call.

    ``G = N // K`` query heads per KV head is drawn from ``[min_groups, 2]``.
    """
    B, T, S = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    K, G, H = draw(st.integers(1, 2)), draw(st.integers(min_groups, 2)), draw(st.sampled_from([4, 8]))
    N = K * G
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rules = {}
    if draw(st.booleans()):
        rules["is_causal"] = True
    if draw(st.booleans()):
        rules["local_window_size"] = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    if rules and draw(st.booleans()):
        rules["query_offset"] = rng.integers(-2, S + 1, B).astype(np.int32)
    if draw(st.booleans()):
        rules["query_seq_lengths"] = rng.integers(0, T + 1, B).astype(np.int32)
    if draw(st.booleans()):
        rules["key_value_seq_lengths"] = rng.integers(0, S + 1, B).astype(np.int32)
    if draw(st.booleans()):
        rules["q_segment_ids"] = rng.integers(0, 2, (B, T)).astype(np.int32)
        rules["kv_segment_ids"] = rng.integers(0, 2, (B, S)).astype(np.int32)
    if draw(st.booleans()):
        rules["logits_soft_cap"] = draw(st.sampled_from([1.0, 5.0]))
    if draw(st.booleans()):
        rules["scale"] = draw(st.sampled_from([0.1, 0.7]))
    arrays = {
        "query": rng.standard_normal((B, T, N, H)).astype(np.float32),
        "key": rng.standard_normal((B, S, K, H)).astype(np.float32),
        "value": rng.standard_normal((B, S, K, H)).astype(np.float32),
        "d_out": rng.standard_normal((B, T, N, H)).astype(np.float32),
    }
    bias_shape = draw(st.sampled_from([None, (T, S), (B, T, S), (B, N, T, S), (1, N, 1, S)]))
    if bias_shape is not None:
        bias = rng.standard_normal(bias_shape).astype(np.float32)
        if draw(st.booleans()):
            bias[rng.random(bias_shape) < 0.25] = -np.inf  # -inf: not visible
        arrays["bias"] = bias
    return arrays, rules


def _reference_bias(bias, B, N, T, S):
    """The bias broadcast to ``[B, N, T, S]`` as the oracle takes it (rank 2 ``[T,S]``, rank 3 ``[B,T,S]``)."""
    if bias is None:
        return None
    bias = np.asarray(bias)
    bias = bias[None, None] if bias.ndim == 2 else bias[:, None] if bias.ndim == 3 else bias
    return np.broadcast_to(bias, (B, N, T, S))


IMPLEMENTATIONS = {
    "xla": lambda q, k, v, bias, **rules: gqa_jax.dot_product_attention(q, k, v, bias, implementation="xla", **rules),
    "gpu.flash_attention": lambda q, k, v, bias, **rules: gpu.flash_attention(q, k, v, bias=bias, interpret=True,
                                                                              **rules),
    "tpu.flash_attention": lambda q, k, v, bias, **rules: tpu.flash_attention(q, k, v, bias=bias, interpret=True,
                                                                              **rules),
}


def _check(name: str, arrays: dict, rules: dict) -> None:
    q, k, v, d_out = arrays["query"], arrays["key"], arrays["value"], arrays["d_out"]
    B, T, N, _ = q.shape
    S = k.shape[1]
    bias = arrays.get("bias")
    ref_bias = _reference_bias(bias, B, N, T, S)
    expected = reference_attention(q, k, v, ref_bias, **rules)[0]
    expected_grads = reference_attention_grads(q, k, v, d_out, ref_bias, **rules)

    call = IMPLEMENTATIONS[name]

    @jax.jit  # one compilation per example instead of one per operation
    def out_and_grads(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: call(q, k, v, None if bias is None else jnp.asarray(bias), **rules),
                           q, k, v)
        return out, vjp(d_out)

    out, grads = out_and_grads(q, k, v, d_out)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=ATOL, rtol=RTOL, err_msg=f"{name} output")
    for arg, grad, ref in zip(("query", "key", "value"), grads, expected_grads):
        np.testing.assert_allclose(np.asarray(grad, np.float64), ref, atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                   err_msg=f"{name} gradient of {arg}")


@_settings(max_examples=12)
@given(attention_calls())
def test_xla_matches_the_oracle(case):
    _check("xla", *case)


@pytest.mark.parametrize("name", ["gpu.flash_attention", "tpu.flash_attention"])
def test_interpreted_kernels_match_the_oracle(name):
    @_settings(max_examples=4)
    @given(attention_calls(min_groups=2))  # few examples: every one groups queries (G = 2)
    def check(case):
        _check(name, *case)

    check()
