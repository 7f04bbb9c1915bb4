"""The TPU decode kernels on a quantized (int8 / float8_e4m3fn) cache, in the Pallas TPU interpret mode.

The dense kernel (`pallas_kernels.tpu.decode_attention`) runs the quantized
decode cases of `tests/test_quantized_cache.py` against the float64 oracle on
the dequantized values (zero lengths, GQA packing of two K/V heads per
program, window, soft-cap, bfloat16, float16 and float32 queries); both TPU
kernels stay finite for dequantized values near the bfloat16 maximum; the
query and scale gradients match XLA's; bad scales are refused by name; and on
a faked TPU, dispatch sends quantized decode-shaped calls to the kernel
(query lengths included) and prefill to XLA. The paged kernel's quantized
cases are in `tests/test_tpu_paged_decode.py`, the lowering for TPUs in
`tests/test_tpu_lowering.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax.quantization import quantize
from pallas_kernels import tpu
from tests import test_tpu_dispatch
from tests.kernel_cases import DECODE_CASES, GRAD_TOLERANCE, assert_close
from tests.reference import reference_attention
from tests.test_quantized_cache import (
    DTYPE_IDS,
    DTYPES,
    QuantizedDecodeCases,
    _decode_reference,
    _dequantized64,
    _quantized_inputs,
)
from tests.test_tpu_kernels import NEEDS_TPU, jitted

BLOCKS = tpu.DecodeBlockSizes(block_k=128)
# The fixture faking a TPU for dispatch: the TPU kernels run in interpret mode and record their calls.
on_tpu = test_tpu_dispatch.on_tpu


def _decode(q, kq, vq, ks, vs, lengths, rules, **static):
    return jitted(lambda q, kq, vq, ks, vs, lengths, **kw: tpu.decode_attention(
        q, kq, vq, lengths, key_scale=ks, value_scale=vs, **kw), q, kq, vq, ks, vs, lengths, rules=rules, **static)


class TestTPUQuantizedDecodeInterpret(QuantizedDecodeCases):
    def decode(self, q, kq, vq, ks, vs, lengths, **rules):
        return _decode(q, kq, vq, ks, vs, lengths, rules, block_sizes=BLOCKS, interpret=True)


@NEEDS_TPU
class TestTPUQuantizedDecodeCompiled(QuantizedDecodeCases):
    f32_tolerance = 1e-4

    def decode(self, q, kq, vq, ks, vs, lengths, **rules):
        return _decode(q, kq, vq, ks, vs, lengths, rules)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel", ["dense", "paged"])
def test_values_near_the_bfloat16_max_stay_finite(kernel, dtype):
    """Dequantized values near 3.4e38: the weights' shift keeps the float32 sum of ``(p * scale) . v`` finite."""
    rng = np.random.default_rng(12)
    B, T, N, K, S, H, L = 2, 1, 4, 2, 256, 64, 16
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16)
    k = rng.standard_normal((B, S, K, H))
    v = 3e38 * rng.uniform(0.5, 1.0, (B, S, K, H))
    (kq, ks), (vq, vs) = quantize(k, dtype), quantize(jnp.asarray(v, jnp.float32), dtype)
    lengths = np.array([256, 130], np.int32)
    if kernel == "dense":
        out = tpu.decode_attention(q, kq, vq, jnp.asarray(lengths), key_scale=ks, value_scale=vs, block_sizes=BLOCKS,
                                   interpret=True)
    else:  # row b's pages are b * S / L, ... in order: the same cache
        pages = [x.reshape(B * S // L, L, *x.shape[2:]) for x in (kq, vq, ks, vs)]
        table = jnp.arange(B * S // L, dtype=jnp.int32).reshape(B, S // L)
        out = tpu.paged_decode_attention(q, pages[0], pages[1], table, jnp.asarray(lengths), key_scale_pages=pages[2],
                                         value_scale_pages=pages[3], interpret=True)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, _decode_reference(q, kq, vq, ks, vs, lengths, T), "bfloat16")


def test_gradients_of_query_and_scales_match_xla():
    """The flash backward on the dequantized cache (two K/V heads per program, a row of length 0): the query and the
    scales get XLA's gradients."""
    case = DECODE_CASES[1]
    q, kq, vq, ks, vs, rules = _quantized_inputs(case, jnp.int8)
    lengths = rules.pop("lengths")
    cotangent = jnp.asarray(np.random.default_rng(13).standard_normal(q.shape), jnp.float32)

    def kernel(q, ks, vs):
        return tpu.decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs, interpret=True)

    def xla(q, ks, vs):
        return gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, is_causal=True,
                                            query_offset=lengths - case.T, key_value_seq_lengths=lengths,
                                            implementation="xla")

    def grads(fn):
        return jax.grad(lambda *args: jnp.sum(fn(*args) * cotangent), (0, 1, 2))

    got = jitted(grads(kernel), q, ks, vs, rules={})
    expected = jax.jit(grads(xla))(q, ks, vs)
    for name, g, e in zip(("query", "key_scale", "value_scale"), got, expected):
        assert_close(g, np.asarray(e), "float32", GRAD_TOLERANCE["float32"], what=f"d{name}")


def test_bad_scales_are_refused_by_name():
    rng = np.random.default_rng(14)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((2, 32, 2, 16)), jnp.int8) for _ in range(2))
    lengths = jnp.array([3, 4])
    with pytest.raises(ValueError, match=r"key_cache.dtype=int8 is quantized: .* got value_scale=None"):
        tpu.decode_attention(q, kq, vq, lengths, key_scale=ks, interpret=True)
    with pytest.raises(TypeError, match="got key_cache.dtype=float32, value_cache.dtype=float32"):
        tpu.decode_attention(q, *(x.astype(jnp.float32) for x in (kq, vq)), lengths, key_scale=ks, value_scale=vs,
                             interpret=True)


# ---------------------------------------------------------------------------
# Dispatch on a faked TPU (`on_tpu`).


def test_dispatch_serves_quantized_decode_with_the_tpu_kernel(on_tpu):
    case = DECODE_CASES[5]  # bfloat16, soft-cap, T = 1
    q, kq, vq, ks, vs, rules = _quantized_inputs(case, jnp.int8)
    lengths = rules.pop("lengths")
    out = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, is_causal=True,
                                        key_value_seq_lengths=lengths, **rules)
    assert on_tpu == ["decode_attention"]
    assert_close(out, _decode_reference(q, kq, vq, ks, vs, lengths, case.T, **rules), "bfloat16")


def test_dispatch_zeroes_padded_queries_and_sends_prefill_to_flash(on_tpu):
    """Query lengths: the decode kernel computes every query, padded ones are zeroed. T == S: the flash kernel on
    the dequantized cache (float32 queries: dequantized exactly)."""
    rng = np.random.default_rng(15)
    B, T, N, K, S, H = 2, 3, 4, 2, 40, 64
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((B, S, K, H)), jnp.float8_e4m3fn) for _ in range(2))
    rules = dict(is_causal=True, query_seq_lengths=np.array([3, 1], np.int32),
                 key_value_seq_lengths=np.array([40, 9], np.int32))
    out = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, **rules)
    assert on_tpu == ["decode_attention"]
    ref, _ = reference_attention(q, _dequantized64(kq, ks), _dequantized64(vq, vs), **rules)
    assert_close(out, ref, "float32")
    np.testing.assert_array_equal(np.asarray(out[1, 1:]), 0.0)
    prefill = jnp.asarray(rng.standard_normal((B, S, N, H)), jnp.float32)
    out = gqa_jax.dot_product_attention(prefill, kq, vq, key_scale=ks, value_scale=vs, is_causal=True)
    assert on_tpu == ["decode_attention", "flash_attention"]
    ref, _ = reference_attention(prefill, _dequantized64(kq, ks), _dequantized64(vq, vs), is_causal=True)
    assert_close(out, ref, "float32")
