"""The quantized (int8 / float8_e4m3fn) KV cache: quantization, attention on it, the cache, dispatch.

Every attention result is compared with the float64 oracle (`tests.reference`)
on the dequantized values, computed here in float64 from the stored values
and scales; quantization is checked against its stated error bounds. The
Triton decode kernel runs in interpret mode on CPUs and compiled on an NVIDIA
GPU (skipped elsewhere). The end-to-end effect on the reference decoder is in
`tests/test_quantized_decoder.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import KVCache
from gqa_jax.implementations import cudnn, pallas_mosaic_gpu, pallas_tpu, pallas_triton
from gqa_jax.quantization import dequantize, quantize
from pallas_kernels.gpu.decode_attention import DecodeBlockSizes, decode_attention
from tests.devices import has_gpu, on_hopper
from tests.kernel_cases import DECODE_CASES, GRAD_TOLERANCE, TOLERANCE, TOLERANCE_TF32, assert_close, make_inputs
from tests.reference import reference_attention

DTYPES = [jnp.int8, jnp.float8_e4m3fn]
DTYPE_IDS = ["int8", "fp8"]
SPLIT = DecodeBlockSizes(block_k=32, num_splits=3)


needs_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")
# Float32 tolerance of the Triton kernel: compiled products may run as TF32.
TRITON_F32_TOLERANCE = TOLERANCE_TF32 if has_gpu() else TOLERANCE["float32"]


@pytest.fixture
def triton(monkeypatch):
    """``implementation="pallas_triton"`` works here: compiled on a GPU, in interpret mode (platform faked) elsewhere."""
    from gqa_jax import dispatch

    if not has_gpu():
        monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
        monkeypatch.setattr(pallas_triton, "interpret", True)


def _dequantized64(values, scale) -> np.ndarray:
    """The oracle's dequantization, in float64 from the stored values."""
    return np.asarray(values.astype(jnp.float32), np.float64) * np.asarray(scale, np.float64)[..., None]


def _quantized_inputs(case, dtype):
    q, k, v, _, rules = make_inputs(case, seed=case.seed)
    (kq, ks), (vq, vs) = quantize(k, dtype), quantize(v, dtype)
    return q, kq, vq, ks, vs, rules


def _decode_reference(q, kq, vq, ks, vs, lengths, T, **rules):
    rules = dict(rules)
    out, _ = reference_attention(
        q, _dequantized64(kq, ks), _dequantized64(vq, vs), scale=rules.pop("scale", None),
        logits_soft_cap=rules.pop("logits_soft_cap", None), is_causal=True, query_offset=lengths - T,
        key_value_seq_lengths=lengths, **rules)
    return out


# ---------------------------------------------------------------------------
# Quantization.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantization_error_is_within_its_bounds(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 2, 64)) * rng.uniform(1e-3, 1e3, (3, 7, 2, 1))  # per-vector magnitudes
    x[0, 0, 0] = 0.0  # an all-zero head vector
    values, scale = quantize(jnp.asarray(x, jnp.float32), dtype)
    assert values.dtype == dtype and values.shape == x.shape
    assert scale.dtype == jnp.float32 and scale.shape == x.shape[:3]
    x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(scale, np.float64), np.abs(x32).max(-1) / (127 if dtype == jnp.int8 else 448),
                               rtol=1e-6)
    error = np.abs(_dequantized64(values, scale) - x32)
    s = np.asarray(scale, np.float64)[..., None]
    bound = 0.5 * s if dtype == jnp.int8 else 2.0**-4 * np.abs(x32) + 2.0**-10 * s
    assert (error <= bound * (1 + 1e-5) + 1e-30).all(), f"max error / bound {np.max(error / (bound + 1e-30)):.3f}"
    assert np.abs(np.asarray(values[0, 0, 0].astype(jnp.float32))).max() == 0.0 and scale[0, 0, 0] == 0.0
    np.testing.assert_allclose(np.asarray(dequantize(values, scale)), _dequantized64(values, scale), rtol=1e-6)


def test_quantization_refuses_bad_arguments():
    with pytest.raises(TypeError, match="dtype must be one of"):
        quantize(jnp.ones((2, 4)), jnp.int16)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        quantize(jnp.ones((2, 4), jnp.int32), jnp.int8)
    with pytest.raises(ValueError, match=r"scale must have shape values.shape\[:-1\]=\(2,\)"):
        dequantize(jnp.ones((2, 4), jnp.int8), jnp.ones((4,)))


# ---------------------------------------------------------------------------
# The XLA path: exact on the dequantized values, any query length.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rules", [
    dict(is_causal=True),  # T == S: a prefill
    dict(is_causal=True, query_offset=np.array([3, 30], np.int32), key_value_seq_lengths=np.array([20, 40], np.int32)),
    dict(is_causal=False, local_window_size=(5, 2), logits_soft_cap=3.0, scale=0.3),
], ids=["prefill", "chunk_offsets_lengths", "window_softcap"])
def test_xla_matches_the_oracle_on_dequantized_values(dtype, rules):
    rng = np.random.default_rng(1)
    B, N, K, S, H = 2, 6, 2, 40, 16
    T = S if rules.get("query_offset") is None and rules["is_causal"] else 7
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((B, S, K, H)), dtype) for _ in range(2))
    out, weights = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, implementation="xla",
                                                 return_weights=True, **rules)
    rules = dict(rules)
    ref, ref_weights = reference_attention(q, _dequantized64(kq, ks), _dequantized64(vq, vs),
                                           scale=rules.pop("scale", None),
                                           logits_soft_cap=rules.pop("logits_soft_cap", None), **rules)
    assert out.dtype == jnp.float32
    assert_close(out, ref, "float32")
    assert_close(weights, ref_weights, "float32", what="weights")


def test_xla_bfloat16_queries():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 32)), jnp.bfloat16)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((2, 50, 2, 32)), jnp.int8) for _ in range(2))
    out = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, is_causal=True, implementation="xla")
    ref, _ = reference_attention(q, _dequantized64(kq, ks), _dequantized64(vq, vs), is_causal=True,
                                 query_offset=np.array([47, 47]))
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, "bfloat16")


# ---------------------------------------------------------------------------
# The Triton decode kernel: int8 / fp8 tiles dequantized in registers.

QUANTIZED_DECODE_CASES = [DECODE_CASES[i] for i in (1, 4, 5, 6)]  # zero length, window, soft-cap bf16, f16 H128


class QuantizedDecodeCases:
    """The decode cases on a quantized cache; subclasses define ``decode``."""

    f32_tolerance = TOLERANCE["float32"]

    def decode(self, q, kq, vq, ks, vs, lengths, **rules):
        raise NotImplementedError

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("case", QUANTIZED_DECODE_CASES, ids=str)
    def test_decode(self, case, dtype):
        q, kq, vq, ks, vs, rules = _quantized_inputs(case, dtype)
        lengths = rules.pop("lengths")
        out = self.decode(q, kq, vq, ks, vs, jnp.asarray(lengths), **rules)
        assert out.dtype == q.dtype
        # float16 queries meet a quantized cache in bfloat16 products (scaled values may pass float16's range).
        tol = self.f32_tolerance if case.dtype == "float32" else TOLERANCE["bfloat16"]
        assert_close(out, _decode_reference(q, kq, vq, ks, vs, lengths, case.T, **rules), case.dtype, tol)

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_values_past_the_float16_range(self, dtype):
        """bfloat16 queries and dequantized values far beyond float16's 65504 stay exact to bfloat16 rounding."""
        rng = np.random.default_rng(6)
        B, T, N, K, S, H = 2, 1, 4, 2, 80, 32
        magnitude = rng.choice([1e-3, 1.0, 3e5, 1e30], (B, T, N, 1))  # per query head, some past float16's max
        q = jnp.asarray(rng.standard_normal((B, T, N, H)) * magnitude / np.sqrt(magnitude * 30.0), jnp.bfloat16)
        k = rng.standard_normal((B, S, K, H))
        v = rng.standard_normal((B, S, K, H)) * rng.choice([1e-2, 1e6, 1e36], (B, S, K, 1))  # per key and head
        (kq, ks), (vq, vs) = quantize(k, dtype), quantize(v, dtype)
        lengths = np.array([80, 37], np.int32)
        out = self.decode(q, kq, vq, ks, vs, jnp.asarray(lengths))
        ref = _decode_reference(q, kq, vq, ks, vs, lengths, T)
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert_close(out, ref, "bfloat16")


class TestQuantizedDecodeInterpret(QuantizedDecodeCases):
    def decode(self, q, kq, vq, ks, vs, lengths, **rules):
        return decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs, block_sizes=SPLIT, interpret=True,
                                **rules)


@needs_gpu
class TestQuantizedDecodeCompiled(QuantizedDecodeCases):
    f32_tolerance = TOLERANCE_TF32

    def decode(self, q, kq, vq, ks, vs, lengths, **rules):
        return decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs, **rules)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_lowers_to_triton(dtype):
    case = DECODE_CASES[5]
    q, kq, vq, ks, vs, rules = _quantized_inputs(case, dtype)
    lengths = jnp.asarray(rules.pop("lengths"))
    fn = jax.jit(lambda *args: decode_attention(*args[:3], args[5], key_scale=args[3], value_scale=args[4], **rules))
    text = fn.trace(q, kq, vq, ks, vs, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "gqa_decode_attention" in text, "the Triton kernel is missing from the lowered module"


def test_gradients_match_xla(triton):
    """Query and scales get the gradients of attention on the dequantized cache; the int8 values get none."""
    rng = np.random.default_rng(21)
    B, T, N, K, S, H = 2, 2, 4, 2, 64, 16
    lengths = np.array([40, 64], np.int32)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((B, S, K, H)), jnp.int8) for _ in range(2))
    cotangent = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)

    def loss(implementation):
        def f(q, ks, vs):
            out = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, is_causal=True,
                                                key_value_seq_lengths=lengths, implementation=implementation)
            return jnp.sum(out * cotangent)
        return f

    grads = jax.jit(jax.grad(loss("pallas_triton"), (0, 1, 2)))(q, ks, vs)
    expected = jax.jit(jax.grad(loss("xla"), (0, 1, 2)))(q, ks, vs)
    tol = TOLERANCE_TF32 if has_gpu() else GRAD_TOLERANCE["float32"]
    for name, g, e in zip(("query", "key_scale", "value_scale"), grads, expected):
        assert_close(g, np.asarray(e), "float32", tol, what=f"d{name}")


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=needs_gpu)], ids=["interpret", "compiled"])
def test_bfloat16_values_near_the_max_stay_finite(interpret):
    """Issue 17: the float32 accumulator of p . v must not overflow for bf16 values near 3.4e38."""
    rng = np.random.default_rng(3)
    B, T, N, K, S, H = 2, 1, 4, 2, 96, 32
    q, k = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in [(B, T, N, H), (B, S, K, H)])
    v = jnp.asarray(1e38 * rng.uniform(0.5, 1.0, (B, S, K, H)), jnp.bfloat16)
    lengths = np.array([96, 70], np.int32)
    ref, _ = reference_attention(q, k, v, is_causal=True, query_offset=lengths - T, key_value_seq_lengths=lengths)
    for blocks in (SPLIT, DecodeBlockSizes(block_k=32, num_splits=1)):
        out = np.asarray(decode_attention(q, k, v, jnp.asarray(lengths), block_sizes=blocks, interpret=interpret),
                         np.float64)
        assert np.isfinite(out).all(), f"{(~np.isfinite(out)).sum()} non-finite outputs with {blocks}"
        np.testing.assert_allclose(out, ref, rtol=2e-2)


# ---------------------------------------------------------------------------
# Dispatch and validation.


def _request(T=1, S=32, **kwargs):
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((2, T, 4, 16)), jnp.bfloat16)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((2, S, 2, 16)), jnp.int8) for _ in range(2))
    return gqa_jax.make_request(q, kq, vq, key_scale=ks, value_scale=vs, is_causal=True, **kwargs)


def test_which_implementations_serve_a_quantized_cache():
    """The decode kernels read it (decode-shaped calls), the flash kernels take it dequantized; cuDNN refuses it."""
    decode, prefill = _request(T=2), _request(T=32)
    for kernels in (pallas_triton, pallas_tpu):
        assert kernels.supports(decode) is None
        assert kernels.supports(prefill) is None
    for request in (decode, prefill):
        assert "quantized cache" in cudnn.supports(request)
    assert "decode-shaped" in pallas_mosaic_gpu.supports(decode)
    # Prefill: whatever the Mosaic kernel says (no Hopper here, or head dim 16), it is not about the quantized cache.
    assert "quantiz" not in pallas_mosaic_gpu.supports(prefill)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prefill_on_a_quantized_cache_runs_flash_on_the_dequantized_cache(triton, dtype, monkeypatch):
    """A chunk of 24 queries over a quantized cache: Triton's flash kernel on the cache dequantized to bfloat16.

    Oracle: float64 attention over ``dequantize(values, scale, bfloat16)`` (the values the kernel reads), and the
    exactly dequantized cache within the bf16 tolerance too.
    """
    from pallas_kernels import gpu

    calls = []
    flash = gpu.flash_attention_core
    monkeypatch.setattr(gpu, "flash_attention_core", lambda *a, **k: calls.append("flash") or flash(*a, **k))
    rng = np.random.default_rng(6)
    B, T, N, K, S, H = 2, 24, 4, 2, 64, 32
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((B, S, K, H)), dtype) for _ in range(2))
    lengths = np.array([64, 40], np.int32)
    rules = dict(is_causal=True, query_offset=lengths - T, key_value_seq_lengths=lengths)
    out = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, implementation="pallas_triton",
                                        **rules)
    assert calls == ["flash"]
    rounded = [np.asarray(dequantize(x, scale, jnp.bfloat16), np.float64) for x, scale in ((kq, ks), (vq, vs))]
    assert_close(out, reference_attention(q, *rounded, **rules)[0], "bfloat16")
    assert_close(out, reference_attention(q, _dequantized64(kq, ks), _dequantized64(vq, vs), **rules)[0],
                 "bfloat16")


@pytest.mark.skipif(not on_hopper(), reason="needs an NVIDIA Hopper GPU (compute capability 9.x) to run Mosaic GPU")
def test_mosaic_prefill_on_a_quantized_cache():
    """The Mosaic-GPU flash kernel on an int8 cache (head dim 128, T != S, lengths) against the float64 oracle."""
    rng = np.random.default_rng(7)
    B, T, N, K, S, H = 2, 200, 8, 2, 333, 128
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((B, S, K, H)), jnp.int8) for _ in range(2))
    lengths = np.array([333, 250], np.int32)
    rules = dict(is_causal=True, query_offset=lengths - T, key_value_seq_lengths=lengths)
    out = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs,
                                        implementation="pallas_mosaic_gpu", **rules)
    assert_close(out, reference_attention(q, _dequantized64(kq, ks), _dequantized64(vq, vs), **rules)[0],
                 "bfloat16")


def test_dispatch_serves_decode_with_the_kernel(triton):
    case = DECODE_CASES[5]
    q, kq, vq, ks, vs, rules = _quantized_inputs(case, jnp.int8)
    lengths = rules.pop("lengths")
    out = gqa_jax.dot_product_attention(q, kq, vq, key_scale=ks, value_scale=vs, is_causal=True,
                                        key_value_seq_lengths=lengths, implementation="pallas_triton", **rules)
    assert_close(out, _decode_reference(q, kq, vq, ks, vs, lengths, case.T, **rules), "bfloat16")


def test_bad_quantized_arguments_are_refused_by_name():
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    (kq, ks), (vq, vs) = (quantize(rng.standard_normal((2, 32, 2, 16)), jnp.int8) for _ in range(2))
    attend = gqa_jax.dot_product_attention
    with pytest.raises(ValueError, match="key_scale and value_scale .* are required, got value_scale=None"):
        attend(q, kq, vq, key_scale=ks)
    with pytest.raises(ValueError, match=r"key_scale must have shape \[B,S,K\]=\(2, 32, 2\), got key_scale.shape=\(2, 32\)"):
        attend(q, kq, vq, key_scale=ks[..., 0], value_scale=vs)
    with pytest.raises(TypeError, match="value_scale must be a floating-point array"):
        attend(q, kq, vq, key_scale=ks, value_scale=vs.astype(jnp.int32))
    with pytest.raises(TypeError, match="got key.dtype=float32, value.dtype=float32"):
        attend(q, q[:, :1].repeat(32, 1)[:, :, :2], q[:, :1].repeat(32, 1)[:, :, :2], key_scale=ks, value_scale=vs)
    with pytest.raises(TypeError, match="got key.dtype=int8, value.dtype=float8_e4m3fn"):
        attend(q, kq, vq.astype(jnp.float8_e4m3fn), key_scale=ks, value_scale=vs)
    with pytest.raises(ValueError, match="num_heads N=4 must be a multiple of num_kv_heads K=3"):
        attend(q, kq[:, :, [0, 1, 1]], vq[:, :, [0, 1, 1]], key_scale=ks[:, :, [0, 1, 1]], value_scale=vs)
    with pytest.raises(ValueError, match="key_scale and value_scale"):
        decode_attention(q, kq, vq, jnp.array([3, 4]), interpret=True)


# ---------------------------------------------------------------------------
# The cache.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_update_stores_quantized_tokens_at_each_rows_length(dtype):
    rng = np.random.default_rng(6)
    cache = KVCache.init(2, 16, 2, 8, dtype=dtype)
    assert cache.is_quantized and cache.key.dtype == dtype and cache.key_scale.shape == (2, 16, 2)
    first, second = (jnp.asarray(rng.standard_normal((2, 3, 2, 8)), jnp.bfloat16) for _ in range(2))
    cache = cache.update(first, first * 2, num_new=jnp.array([3, 1]))
    cache = cache.update(second, second * 2, num_new=jnp.array([2, 3]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 4])
    for row, pieces in ((0, [first[0, :3], second[0, :2]]), (1, [first[1, :1], second[1, :3]])):
        tokens = jnp.concatenate(pieces)
        for stored, scale, x in ((cache.key, cache.key_scale, tokens), (cache.value, cache.value_scale, 2 * tokens)):
            values, expected_scale = quantize(x, dtype)
            n = tokens.shape[0]
            np.testing.assert_array_equal(np.asarray(stored[row, :n].astype(jnp.float32)),
                                          np.asarray(values.astype(jnp.float32)))
            np.testing.assert_array_equal(np.asarray(scale[row, :n]), np.asarray(expected_scale))
            np.testing.assert_array_equal(np.asarray(scale[row, n:]), 0.0)


def test_init_and_update_refuse_what_they_cannot_store():
    with pytest.raises(TypeError, match="dtype must be a floating dtype or int8"):
        KVCache.init(1, 8, 1, 4, dtype=jnp.int32)
    cache = KVCache.init(1, 8, 1, 4, dtype=jnp.int8)
    with pytest.raises(TypeError, match="a quantized cache takes floating key_new and value_new"):
        cache.update(jnp.ones((1, 1, 1, 4), jnp.int8), jnp.ones((1, 1, 1, 4), jnp.int8))


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
def test_ragged_decode_steps_equal_chunked_prefill(implementation, triton):
    """Ragged prompts, then 1 and 3 tokens per step, through an int8 cache: the oracle's causal pass over it."""
    rng = np.random.default_rng(7)
    B, N, K, H, L = 3, 4, 2, 16, 14
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, heads, H)), jnp.float32) for heads in (N, K, K))
    prompt = np.array([5, 1, 8], np.int32)
    steps = [1, 3, 1]

    @jax.jit
    def step(cache, q_new, k_new, v_new, num_new):
        cache = cache.update(k_new, v_new, num_new=num_new)
        return cache, cache.attend(q_new, num_new=num_new, implementation=implementation)

    def take(x, pos, chunk):  # each row's next `chunk` tokens, zero-padded past the sequence
        x = jnp.pad(x, ((0, 0), (0, chunk), (0, 0), (0, 0)))
        return jnp.stack([x[b, pos[b]:pos[b] + chunk] for b in range(B)])

    cache = KVCache.init(B, 24, K, H, dtype=jnp.int8)
    pos, outputs = np.zeros(B, np.int32), np.zeros((B, L, N, H), np.float32)
    for i, chunk in enumerate([int(prompt.max()), *steps]):
        n = prompt if i == 0 else np.full(B, chunk, np.int32)
        cache, out = step(cache, take(q, pos, chunk), take(k, pos, chunk), take(v, pos, chunk), jnp.asarray(n))
        for b in range(B):
            outputs[b, pos[b]:pos[b] + n[b]] = np.asarray(out[b, :n[b]])
        pos += n
    total = prompt + sum(steps)
    np.testing.assert_array_equal(np.asarray(cache.lengths), total)
    k64, v64 = _dequantized64(cache.key, cache.key_scale), _dequantized64(cache.value, cache.value_scale)
    expected, _ = reference_attention(q, k64[:, :L], v64[:, :L], is_causal=True, query_seq_lengths=total,
                                      key_value_seq_lengths=total)
    tol = TRITON_F32_TOLERANCE if implementation == "pallas_triton" else TOLERANCE["float32"]
    for b in range(B):
        assert_close(outputs[b, :total[b]], expected[b, :total[b]], "float32", tol, what=f"row {b}")
