"""The quantized (int8 / float8_e4m3fn) PagedKVCache.

Ragged writes (prefills of different lengths, then 1-2 tokens per step) into
a pool whose free stack is shuffled, so the rows' pages interleave in no
order: the pages hold exactly what `gqa_jax.quantization.quantize` gives for
each row's tokens (read back page by page through the page table, in NumPy)
and what a quantized dense `gqa_jax.KVCache` fed the same tokens holds;
``attend`` equals the dense cache's and the float64 oracle's on the values
dequantized in float64. Eager and under jit, freeing and page reuse, the
default paths (the paged kernel of the backend with the scale pages on a GPU
and on a TPU), bad inputs, and greedy
`generate` with the reference decoder on an int8 paged cache against an int8
dense cache.

The GPU paged decode kernel on quantized pools (int8 and float8 pages, float32
scale pages), in interpret mode (compiled too on a GPU): against the float64
oracle on the dequantized values and the dense quantized decode kernel on the
gathered cache (page-aligned and gathered tiles, ragged lengths with 0 and
mid-page, shuffled page tables, GQA, splits, window and soft-cap), bfloat16
queries and values past float16's range, through `PagedKVCache.attend`; its
gradients against XLA, its bad inputs and its lowering to Triton (both tile
paths).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
import gqa_jax.paged_kv_cache
from gqa_jax import KVCache, PagedKVCache
from gqa_jax.decoding import generate
from gqa_jax.implementations import pallas_tpu, pallas_triton
from gqa_jax.models import Decoder, DecoderConfig, params_from_hf
from gqa_jax.quantization import quantize
from pallas_kernels.gpu.decode_attention import DecodeBlockSizes, decode_attention
from pallas_kernels.gpu.paged_decode_attention import paged_decode_attention
from pallas_kernels.paging import gather_pages
from tests import test_tpu_paged_decode
from tests.devices import has_gpu
from tests.kernel_cases import GRAD_TOLERANCE, TOLERANCE, TOLERANCE_TF32, assert_close
from tests.paged_cases import PagedCase, paged_call, paged_case_inputs, quantized_paged_case_inputs, rows64
from tests.reference import reference_attention
from tests.test_models import random_hf_weights

DTYPES = [jnp.int8, jnp.float8_e4m3fn]
DTYPE_IDS = ["int8", "fp8"]
B, N, K, H = 3, 4, 2, 8
NUM_PAGES, PAGE_SIZE, MAX_PAGES = 16, 4, 6
CAPACITY = MAX_PAGES * PAGE_SIZE  # the dense cache has the paged rows' capacity: the same attention shapes
# Prefills of different lengths, then 1-2 tokens per step (0: the row waits); rows grow in turn.
STEPS = [[5, 3, 9], [1, 2, 0], [2, 1, 1], [0, 2, 1], [1, 1, 2], [2, 0, 1]]
needs_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")
# The fixture faking a TPU for `PagedKVCache.attend`: the TPU paged kernel runs in interpret mode, its calls recorded.
tpu_backend = test_tpu_paged_decode.tpu_backend


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _step_inputs(rng, num_new):
    T = max(num_new)
    return _normal(rng, (B, T, N, H)), _normal(rng, (B, T, K, H)), _normal(rng, (B, T, K, H)), jnp.asarray(
        num_new, jnp.int32)


def _caches(dtype, rng):
    """An empty quantized paged cache whose free stack is a random permutation of the pages, and its dense twin."""
    paged = PagedKVCache.init(batch_size=B, num_pages=NUM_PAGES, page_size=PAGE_SIZE, num_kv_heads=K, head_dim=H,
                              max_pages_per_row=MAX_PAGES, dtype=dtype)
    paged = dataclasses.replace(paged, free_pages=jnp.asarray(rng.permutation(NUM_PAGES), jnp.int32))
    return paged, KVCache.init(B, CAPACITY, K, H, dtype=dtype)


def _row_tokens(pages, cache: PagedKVCache, row: int) -> np.ndarray:
    """Row ``row``'s stored tokens ``[n, ...]``, read page by page through its page table (NumPy)."""
    pages, table = np.asarray(pages.astype(jnp.float32)), np.asarray(cache.page_table)[row]
    n = int(cache.stored_lengths[row])
    return np.concatenate([pages[table[j]] for j in range(-(-n // cache.page_size))])[:n]


def _dequantized64(cache: PagedKVCache) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``[B, CAPACITY, K, H]`` keys and values: each row's stored tokens times their scales, zeros after."""
    out = []
    for values, scales in ((cache.key_pages, cache.key_scale_pages), (cache.value_pages, cache.value_scale_pages)):
        dense = np.zeros((B, CAPACITY, K, H))
        for b in range(B):
            x = _row_tokens(values, cache, b).astype(np.float64) * _row_tokens(scales, cache, b)[..., None]
            dense[b, :len(x)] = x
        out.append(dense)
    return out[0], out[1]


def _assert_stores(paged: PagedKVCache, dense: KVCache, history) -> None:
    """Each row holds ``quantize`` of its tokens (``history[b] = (keys, values)`` ``[n, K, H]``), as the dense cache."""
    stored = ((paged.key_pages, paged.key_scale_pages, dense.key, dense.key_scale),
              (paged.value_pages, paged.value_scale_pages, dense.value, dense.value_scale))
    for b in range(B):
        n = int(paged.lengths[b])
        for (pages, scale_pages, dense_values, dense_scales), tokens in zip(stored, history[b]):
            values, scales = quantize(tokens, paged.key_pages.dtype)
            got_values, got_scales = _row_tokens(pages, paged, b), _row_tokens(scale_pages, paged, b)
            np.testing.assert_array_equal(got_values, np.asarray(values.astype(jnp.float32)), err_msg=f"row {b}")
            np.testing.assert_array_equal(got_scales, np.asarray(scales), err_msg=f"row {b} scales")
            np.testing.assert_array_equal(got_values, np.asarray(dense_values[b, :n].astype(jnp.float32)))
            np.testing.assert_array_equal(got_scales, np.asarray(dense_scales[b, :n]))


def _assert_attends(out, dense_out, paged: PagedKVCache, q, n) -> None:
    """``out`` equals the dense cache's ``attend`` and the float64 oracle on the dequantized pages."""
    np.testing.assert_allclose(out, dense_out, rtol=1e-6, atol=1e-6)
    _assert_matches_oracle(out, paged, q, n)


def _assert_matches_oracle(out, paged: PagedKVCache, q, n, tol: float | None = None) -> None:
    """``out`` (``attend`` of the newest ``n`` queries) equals the float64 oracle on the dequantized pages."""
    k64, v64 = _dequantized64(paged)
    lengths = np.asarray(paged.lengths)
    ref, _ = reference_attention(q, k64, v64, is_causal=True, query_offset=lengths - np.asarray(n),
                                 query_seq_lengths=n, key_value_seq_lengths=lengths)
    assert_close(out, ref, "float32", tol)


def _step(paged, dense, q, k, v, n):
    paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
    return paged, dense, paged.attend(q, num_new=n), dense.attend(q, num_new=n)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_writes_store_quantized_tokens_and_attend_like_the_dense_cache(dtype, jit):
    rng = np.random.default_rng(0)
    paged, dense = _caches(dtype, rng)
    assert paged.is_quantized and paged.key_pages.dtype == dtype
    assert paged.key_scale_pages.shape == (NUM_PAGES, PAGE_SIZE, K) and paged.key_scale_pages.dtype == jnp.float32
    step = jax.jit(lambda *args: _step(*args)) if jit else _step  # a new function: its own compilation cache
    history = [(np.zeros((0, K, H), np.float32),) * 2 for _ in range(B)]
    for num_new in STEPS:
        q, k, v, n = _step_inputs(rng, num_new)
        paged, dense, out, dense_out = step(paged, dense, q, k, v, n)
        history = [(np.concatenate([hk, k[b, :c]]), np.concatenate([hv, v[b, :c]]))
                   for b, ((hk, hv), c) in enumerate(zip(history, num_new))]
        _assert_attends(out, dense_out, paged, q, n)
    _assert_stores(paged, dense, history)
    np.testing.assert_array_equal(paged.lengths, [sum(c) for c in zip(*STEPS)])
    table = np.asarray(paged.page_table)
    pages = [row[row >= 0] for row in table]
    assert any(np.any(np.diff(row) != 1) for row in pages), f"no row's pages are out of order: {table}"
    assert any(pages[0].min() < page < pages[0].max() for page in np.concatenate(pages[1:])), table
    if jit:
        assert step._cache_size() == 2  # T = 9, then T = 2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_free_then_reuse_pages(dtype):
    rng = np.random.default_rng(1)
    paged, dense = _caches(dtype, rng)
    q, k, v, n = _step_inputs(rng, [7, 9, 4])
    paged, dense, *_ = _step(paged, dense, q, k, v, n)
    freed = set(np.asarray(paged.page_table)[1].tolist()) - {-1}
    paged = jax.jit(lambda c: c.free(1))(paged)
    dense = dataclasses.replace(dense, lengths=dense.lengths.at[1].set(0))  # the dense cache's row 1, emptied
    assert int(paged.lengths[1]) == 0 and int(paged.num_free) == NUM_PAGES - 2 - 1
    # Row 1 takes pages again, the freed ones first (they are on top of the stack): stale values and scales are
    # overwritten where the new tokens go and masked after them.
    q, k2, v2, n = _step_inputs(rng, [1, 6, 2])
    paged, dense, out, dense_out = _step(paged, dense, q, k2, v2, n)
    assert set(np.asarray(paged.page_table)[1].tolist()) - {-1} <= freed
    _assert_attends(out, dense_out, paged, q, n)
    history = [(np.concatenate([k[b, :c0], k2[b, :c1]]), np.concatenate([v[b, :c0], v2[b, :c1]]))
               for b, c0, c1 in zip(range(B), [7, 0, 4], [1, 6, 2])]
    _assert_stores(paged, dense, history)


def _grown(dtype, seed, steps):
    """A quantized paged cache and its dense twin after ragged writes of ``steps``, and the last step's inputs."""
    rng = np.random.default_rng(seed)
    paged, dense = _caches(dtype, rng)
    for num_new in steps:
        q, k, v, n = _step_inputs(rng, num_new)
        paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
    return paged, dense, q, n


def test_default_path_on_a_gpu_is_the_paged_kernel(monkeypatch):
    """On a GPU, ``paged_kernel=None`` sends a quantized cache's decode step to the paged kernel with its scale pages
    (in interpret mode here), which gives what the dense quantized kernel gives on the dense twin: the same tiles."""
    calls = []

    def interpreted(*args, **kwargs):
        calls.append(kwargs["key_scale_pages"])
        return paged_decode_attention(*args, **dict(kwargs, interpret=True))

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_triton, "interpret", True)
    monkeypatch.setattr(gqa_jax.paged_kv_cache, "paged_decode_attention", interpreted)
    paged, dense, q, _ = _grown(jnp.int8, 2, ([6, 2, 9], [1, 1, 1]))
    out = paged.attend(q)
    assert len(calls) == 1 and calls[0] is paged.key_scale_pages
    np.testing.assert_array_equal(out, dense.attend(q, implementation="pallas_triton"))
    _assert_matches_oracle(out, paged, q, np.ones(B, np.int32))
    # The keywords a layer passes on every call ask nothing of the kernel; a pinned XLA takes the dense path.
    for implementation in ("pallas_triton", ("pallas_triton", "xla")):
        neutral = paged.attend(q, implementation=implementation, dropout_rate=0.0, return_weights=False)
        np.testing.assert_array_equal(neutral, out)
    assert len(calls) == 3
    paged.attend(q, implementation="xla")
    assert len(calls) == 3


def test_default_path_on_a_tpu_is_the_tpu_paged_kernel(tpu_backend, monkeypatch):
    """On a TPU, ``paged_kernel=None`` sends a quantized cache's decode step to the TPU paged kernel with its scale
    pages (in interpret mode here); the dense twin's step goes to the TPU decode kernel (``"pallas_tpu"``)."""
    monkeypatch.setattr(pallas_tpu, "interpret", True)
    paged, dense, q, n = _grown(jnp.int8, 3, ([5, 2, 7], [1, 0, 1]))
    out = paged.attend(q, num_new=n)
    assert len(tpu_backend) == 1 and tpu_backend[0]["key_scale_pages"] is paged.key_scale_pages
    _assert_attends(out, dense.attend(q, num_new=n, implementation="pallas_tpu"), paged, q, n)


def _bad_calls():
    rng = np.random.default_rng(3)
    paged, _ = _caches(jnp.int8, rng)
    _, k, v, _ = _step_inputs(rng, [2, 2, 2])
    return [
        ("int8_keys", lambda: paged.update(k.astype(jnp.int8), v.astype(jnp.int8)), TypeError,
         r"a quantized cache takes floating key_new and value_new, got key_new.dtype=int8, value_new.dtype=int8 "
         r"for cache.key_pages.dtype=int8"),
        ("mixed_kinds", lambda: paged.update(k, v.astype(jnp.int32)), TypeError,
         "key_new.dtype=float32, value_new.dtype=int32"),
        ("value_heads", lambda: paged.update(k, v[:, :, :1]), ValueError,
         r"value_new must have shape \[B,T,K,Hv\]=\(3, T, 2, 8\)"),
        ("int16_cache", lambda: PagedKVCache.init(batch_size=1, num_pages=2, page_size=4, num_kv_heads=1, head_dim=4,
                                                  max_pages_per_row=2, dtype=jnp.int16), TypeError,
         "or int8 / float8_e4m3fn .*got dtype=int16"),
        *_bad_kernel_calls(),
    ]


def _bad_kernel_calls():
    """The paged kernel's refusals of bad quantized pools (in `tests.paged_cases`' small call: 6 pages of 16 slots,
    K=2 heads of 16)."""
    rng = np.random.default_rng(5)
    (kq, ks), (vq, vs) = (quantize(_normal(rng, (6, 16, 2, 16)), jnp.int8) for _ in range(2))
    call = paged_call(paged_decode_attention, interpret=True, key_pages=kq, value_pages=vq)
    return [
        ("kernel_missing_scale", call(key_scale_pages=ks), ValueError,
         r"key_pages.dtype=int8 is quantized: key_scale and value_scale \[B,S,K\] are required, got value_scale=None"),
        ("kernel_scale_shape", call(key_scale_pages=ks[..., 0], value_scale_pages=vs), ValueError,
         r"key_scale must have shape \[B,S,K\]=\(6, 16, 2\), got key_scale.shape=\(6, 16\)"),
        ("kernel_int_scale", call(key_scale_pages=ks, value_scale_pages=vs.astype(jnp.int32)), TypeError,
         "value_scale must be a floating-point array, got value_scale.dtype=int32"),
        ("kernel_float_pages_with_scales", call(key_pages=kq.astype(jnp.float32), value_pages=vq.astype(jnp.float32),
                                                key_scale_pages=ks, value_scale_pages=vs), TypeError,
         "got key_pages.dtype=float32, value_pages.dtype=float32"),
        ("kernel_mixed_dtypes", call(value_pages=vq.astype(jnp.float8_e4m3fn), key_scale_pages=ks,
                                     value_scale_pages=vs), TypeError,
         "got key_pages.dtype=int8, value_pages.dtype=float8_e4m3fn"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("name, call, error, match", BAD_CALLS, ids=[call[0] for call in BAD_CALLS])
def test_bad_inputs(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_generate_on_an_int8_paged_cache_equals_an_int8_dense_cache():
    """Greedy decoding with the reference decoder, ragged prompts: the same tokens, the same stored cache."""
    cfg = DecoderConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        dtype=jnp.bfloat16)
    rng = np.random.default_rng(4)
    params = params_from_hf(random_hf_weights(cfg, rng), cfg)
    batch, prompt_length, new_tokens, page_size = 4, 7, 9, 4
    prompt = rng.integers(0, cfg.vocab_size, (batch, prompt_length)).astype(np.int32)
    lengths = np.array([7, 2, 5, 4], np.int32)
    max_pages = -(-(prompt_length + new_tokens) // page_size)
    paged = tuple(PagedKVCache.init(batch_size=batch, num_pages=batch * max_pages, page_size=page_size,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_pages_per_row=max_pages,
                                    dtype=jnp.int8) for _ in range(cfg.num_layers))
    dense = tuple(KVCache.init(batch, max_pages * page_size, cfg.num_kv_heads, cfg.head_dim, dtype=jnp.int8)
                  for _ in range(cfg.num_layers))
    model = Decoder(cfg)
    on_pages = generate(model, params, prompt, lengths, max_new_tokens=new_tokens, cache=paged)
    on_dense = generate(model, params, prompt, lengths, max_new_tokens=new_tokens, cache=dense)
    np.testing.assert_array_equal(on_pages.tokens, on_dense.tokens)
    for layer_paged, layer_dense in zip(on_pages.cache, on_dense.cache):
        np.testing.assert_array_equal(layer_paged.lengths, layer_dense.lengths)
        for b in range(batch):
            n = int(layer_paged.lengths[b])
            np.testing.assert_array_equal(_row_tokens(layer_paged.key_pages, layer_paged, b),
                                          np.asarray(layer_dense.key[b, :n].astype(jnp.float32)))
            np.testing.assert_array_equal(_row_tokens(layer_paged.value_scale_pages, layer_paged, b),
                                          np.asarray(layer_dense.value_scale[b, :n]))


# ---------------------------------------------------------------------------
# The GPU paged decode kernel on quantized pools.

KERNEL_CASES = [
    # Rows of 40 (2.5 pages), 0 and 17 keys (a page and a key); tiles of two pages in two splits; G = 4.
    PagedCase("G4_T1_page16_zero_and_mid_page_split2", 1, 8, 2, 32, 16, (40, 0, 17),
              block_sizes=DecodeBlockSizes(block_k=32, num_splits=2)),
    # bfloat16 queries, tiles of half a page, a window that skips leading tiles, a soft-cap.
    PagedCase("G2_T2_page32_bf16_window_softcap", 2, 4, 2, 16, 32, (70, 33), dtype="bfloat16",
              block_sizes=DecodeBlockSizes(block_k=16),
              rules=(("local_window_size", (20, 0)), ("logits_soft_cap", 5.0))),
    # Page-aligned tiles (one page id per tile; keys, values and scales as contiguous rows): the first case's rows
    # and pages, tiles of a page in two splits, a padded head dim (24 of 32 columns).
    PagedCase("G4_T1_page16_aligned_tile16_zero_and_mid_page_padded_head", 1, 8, 2, 24, 16, (40, 0, 17),
              block_sizes=DecodeBlockSizes(block_k=16, num_splits=2)),
    # Tiles gathered across pages of 24 slots (not a power of two); all 4 query heads on one KV head.
    PagedCase("GN_T2_page24_gathered_tile16_zero_and_mid_page", 2, 4, 1, 16, 24, (0, 50, 24),
              block_sizes=DecodeBlockSizes(block_k=16)),
]


def _oracle(q, k64, v64, lengths, T, **rules):
    rules = dict(rules)
    out, _ = reference_attention(q, k64, v64, is_causal=True, query_offset=lengths - T, key_value_seq_lengths=lengths,
                                 logits_soft_cap=rules.pop("logits_soft_cap", None), **rules)
    return out


class QuantizedPagedKernelCases:
    """The paged kernel on quantized pools; subclasses set ``interpret`` and how near the dense kernel it must be."""

    interpret = True
    f32_tolerance = TOLERANCE["float32"]
    dense_tolerance = 0.0  # relative error against the dense kernel on the gathered cache: same tiles, same values

    def assert_near_dense(self, out, dense, dtype: str):
        if self.dense_tolerance == 0.0:
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(dense, np.float32))
        else:
            assert_close(out, np.asarray(dense, np.float32), dtype, self.dense_tolerance, "against the dense kernel")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
    def test_matches_the_oracle_and_the_dense_kernel(self, case, dtype):
        q, kq, vq, ks, vs, table, lengths, (k64, v64) = quantized_paged_case_inputs(case, dtype)
        rules, n = dict(case.rules), jnp.asarray(lengths)
        out = paged_decode_attention(q, kq, vq, table, n, key_scale_pages=ks, value_scale_pages=vs,
                                     block_sizes=case.block_sizes, interpret=self.interpret, **rules)
        assert out.dtype == q.dtype
        tol = self.f32_tolerance if case.dtype == "float32" else TOLERANCE[case.dtype]
        assert_close(out, _oracle(q, k64, v64, lengths, case.T, **rules), case.dtype, tol)
        dense = decode_attention(q, *(gather_pages(x, table) for x in (kq, vq)), n, key_scale=gather_pages(ks, table),
                                 value_scale=gather_pages(vs, table), block_sizes=case.block_sizes,
                                 interpret=self.interpret, **rules)
        self.assert_near_dense(out, dense, case.dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_values_past_the_float16_range(self, dtype):
        """bfloat16 queries and dequantized values far beyond float16's 65504 stay exact to bfloat16 rounding."""
        case = PagedCase("f16_range", 1, 4, 2, 32, 16, (80, 37), dtype="bfloat16")
        q, key_pages, value_pages, table, lengths, _ = paged_case_inputs(case, seed=6)
        rng = np.random.default_rng(6)
        magnitude = rng.choice([1e-3, 1.0, 3e5, 1e30], (*q.shape[:3], 1))  # per query head, some past float16's max
        q = jnp.asarray(np.asarray(q, np.float64) * magnitude / np.sqrt(magnitude * 30.0), jnp.bfloat16)
        value_pages = np.asarray(value_pages, np.float64) * rng.choice([1e-2, 1e6, 1e36], (*value_pages.shape[:3], 1))
        (kq, ks), (vq, vs) = quantize(key_pages, dtype), quantize(jnp.asarray(value_pages, jnp.float32), dtype)
        out = paged_decode_attention(q, kq, vq, table, jnp.asarray(lengths), key_scale_pages=ks, value_scale_pages=vs,
                                     interpret=self.interpret)
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert_close(out, _oracle(q, rows64(kq, table, ks), rows64(vq, table, vs), lengths, case.T), "bfloat16")

    def test_attend_with_the_kernel_equals_the_dense_cache(self):
        """`PagedKVCache.attend(paged_kernel=True)` on an int8 cache (the kernel in interpret mode on a CPU) equals
        the int8 `KVCache.attend` fed the same tokens, and the oracle."""
        paged, dense, q, n = _grown(jnp.int8, 7, ([6, 2, 9], [1, 0, 2]))
        out = paged.attend(q, num_new=n, paged_kernel=True)
        np.testing.assert_allclose(out, dense.attend(q, num_new=n), rtol=self.f32_tolerance, atol=self.f32_tolerance)
        _assert_matches_oracle(out, paged, q, n, self.f32_tolerance)


class TestQuantizedPagedKernelInterpret(QuantizedPagedKernelCases):
    pass


@needs_gpu
class TestQuantizedPagedKernelCompiled(QuantizedPagedKernelCases):
    interpret = False
    f32_tolerance = TOLERANCE_TF32
    dense_tolerance = 1e-3  # compiled separately: the same products, maybe in another order


def test_kernel_gradients_match_xla():
    """The query and the scale pages get the gradients of attention on the dequantized pages (XLA on the gathered
    cache, through the gather)."""
    case = PagedCase("grads", 2, 4, 2, 16, 16, (30, 9))
    q, kq, vq, ks, vs, table, lengths, _ = quantized_paged_case_inputs(case, jnp.int8, seed=1)
    d_out = np.random.default_rng(2).standard_normal(q.shape)

    def paged(q, ks, vs):
        out = paged_decode_attention(q, kq, vq, table, jnp.asarray(lengths), key_scale_pages=ks, value_scale_pages=vs,
                                     interpret=True)
        return jnp.sum(out * d_out)

    def xla(q, ks, vs):
        key_scale, value_scale = gather_pages(ks, table), gather_pages(vs, table)
        out = gqa_jax.dot_product_attention(q, gather_pages(kq, table), gather_pages(vq, table), key_scale=key_scale,
                                            value_scale=value_scale, is_causal=True, query_offset=lengths - case.T,
                                            key_value_seq_lengths=lengths, implementation="xla")
        return jnp.sum(out * d_out)

    grads = jax.grad(paged, argnums=(0, 1, 2))(q, ks, vs)
    expected = jax.grad(xla, argnums=(0, 1, 2))(q, ks, vs)
    for got, ref, what in zip(grads, expected, ("d_query", "d_key_scale_pages", "d_value_scale_pages")):
        assert_close(got, np.asarray(ref), "float32", GRAD_TOLERANCE["float32"], what)


@pytest.mark.parametrize("case", KERNEL_CASES[:2], ids=["gathered", "aligned"])
def test_kernel_lowers_to_triton(case):
    q, kq, vq, ks, vs, table, lengths, _ = quantized_paged_case_inputs(case, jnp.int8)
    fn = jax.jit(lambda q, kq, vq, ks, vs, table, n: paged_decode_attention(
        q, kq, vq, table, n, key_scale_pages=ks, value_scale_pages=vs, block_sizes=case.block_sizes))
    text = fn.trace(q, kq, vq, ks, vs, table, jnp.asarray(lengths)).lower(lowering_platforms=("cuda",)).as_text()
    assert "gqa_paged_decode_attention" in text, "the Triton kernel is missing from the lowered module"
