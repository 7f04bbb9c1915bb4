"""The TPU paged decode kernel (`pallas_kernels.tpu.paged_decode_attention`), in the Pallas TPU interpret mode.

Against the float64 oracle on each row's gathered pages (ragged lengths, 0
and mid-page included; shuffled page tables with spare pages; GQA and MQA;
T=1 and T>1 with default and explicit offsets; window and soft-cap; bfloat16,
float16 and float32), against the dense TPU decode kernel on the gathered
cache (same tiling: the same values), its gradients, bad inputs, its lowering
for TPUs (checked on this CPU by ``jax.export``), and `PagedKVCache.attend`
picking it when the backend is a TPU. On a TPU the oracle cases also run
compiled. Quantized pools (int8 and float8 pages with float32 scale pages):
against the oracle on the dequantized values, the dense TPU kernel on the
gathered cache and scales, XLA's gradients of the query and the scale pages,
and the lowering for TPUs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import gqa_jax
import gqa_jax.paged_kv_cache as paged_kv_cache
from gqa_jax.paged_kv_cache import PagedKVCache
from gqa_jax.quantization import quantize
from pallas_kernels import tpu
from pallas_kernels.paging import gather_pages
from tests.kernel_cases import GRAD_TOLERANCE, TOLERANCE, assert_close
from tests.paged_cases import (
    PagedCase,
    paged_bad_calls,
    paged_call,
    paged_case_inputs,
    quantized_paged_case_inputs,
    reference_page_grads,
)
from tests.reference import reference_attention
from tests.test_tpu_kernels import NEEDS_TPU, jitted
from tests.test_tpu_lowering import KERNEL_CALL, export_for_tpu


Blocks = tpu.PagedDecodeBlockSizes
CASES = [
    # Two programs per row (K=2 heads of 128 lanes); rows of 40 (2.5 pages), 0 and 17 (1 page + 1 key) keys.
    PagedCase("G4_T1_two_kv_programs_zero_and_mid_page", 1, 8, 2, 128, 16, (40, 0, 17), block_sizes=Blocks(2)),
    PagedCase("MQA_T4_explicit_offsets_bf16", 4, 4, 1, 64, 16, (70, 33), dtype="bfloat16", block_sizes=Blocks(2),
              rules=(("query_offset", np.array([50, 29], np.int32)),)),
    # H=64: two K/V heads share a program (block-diagonal queries); the window skips leading pages.
    PagedCase("G2_T2_window_softcap_block_diagonal", 2, 4, 2, 64, 8, (90, 31), block_sizes=Blocks(4),
              rules=(("local_window_size", (20, 0)), ("logits_soft_cap", 5.0))),
    # bfloat16 pages of 8 tokens (merged through float32), default block size.
    PagedCase("G4_T1_bf16_page8_default_blocks", 1, 8, 2, 64, 8, (100, 7), dtype="bfloat16"),
    # Head dim 8: every K/V head in one program (16 lanes); pages of 4 tokens, blocks of 12 keys.
    PagedCase("G2_T3_tiny_heads_page4", 3, 4, 2, 8, 4, (23, 5, 0), block_sizes=Blocks(3)),
    # Head dim 80 with K=2 fills no lane block: padded to 128; float16 runs in float32.
    PagedCase("G2_T1_f16_padded_head", 1, 4, 2, 80, 16, (33, 16), dtype="float16", block_sizes=Blocks(8)),
]


def _oracle_rules(case: PagedCase, lengths):
    rules = dict(case.rules)
    offset = rules.pop("query_offset", lengths - case.T)
    return dict(rules, is_causal=True, query_offset=offset, key_value_seq_lengths=lengths)


def _paged(q, key_pages, value_pages, table, lengths, rules, **static):
    return jitted(tpu.paged_decode_attention, q, key_pages, value_pages, table, lengths, rules=rules, **static)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=NEEDS_TPU)], ids=["interpret", "compiled"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_oracle(case, compiled):
    q, key_pages, value_pages, table, lengths, (k, v) = paged_case_inputs(case)
    out = _paged(q, key_pages, value_pages, table, jnp.asarray(lengths), dict(case.rules),
                 block_sizes=case.block_sizes, interpret=not compiled)
    assert out.dtype == q.dtype
    rules = _oracle_rules(case, lengths)
    ref, _ = reference_attention(q, k, v, scale=None, logits_soft_cap=rules.pop("logits_soft_cap", None), **rules)
    tol = 1e-4 if compiled and case.dtype == "float32" else TOLERANCE[case.dtype]
    assert_close(out, ref, case.dtype, tol)


@pytest.fixture
def copied_pages(monkeypatch):
    """The page ids the kernel copies (keys and values both), recorded as its DMAs start."""
    pages = []
    make_async_copy = pltpu.make_async_copy

    class Recorded:
        def __init__(self, copy, page):
            self.copy, self.page = copy, page

        def start(self):
            jax.debug.callback(lambda page: pages.append(int(page)), self.page)
            self.copy.start()

        def wait(self):
            self.copy.wait()

    def recording(src, dst, sem):
        indexer = src.transforms[0] if getattr(src, "transforms", None) else None
        if not hasattr(indexer, "indices"):
            pytest.skip(f"jax {jax.__version__} refs carry no NDIndexer to read the copied page from")
        return Recorded(make_async_copy(src, dst, sem), indexer.indices[0])

    monkeypatch.setattr(pltpu, "make_async_copy", recording)
    jax.clear_caches()  # the kernel must be traced again, with the recorder
    yield pages
    jax.clear_caches()


def test_only_pages_with_visible_keys_are_copied(copied_pages):
    """Row 0: 45 keys, window of 9 before the last of T=2 queries: pages 4 and 5 of 8 tokens (keys 34..44). Row 1:
    length 0, nothing. Row 2: 17 keys, 6..16 visible: pages 0, 1, 2 (one key in the last). The rest of the pool is NaN
    and the table holds junk past each row's length: the output is finite, right, and zero for row 1."""
    window = 9
    case = PagedCase("visible", 2, 4, 2, 64, 8, (45, 0, 17), block_sizes=Blocks(2),
                     rules=(("local_window_size", (window, 0)),))
    q, key_pages, value_pages, table, lengths, (k, v) = paged_case_inputs(case, seed=3)
    L, table_np = case.page_size, np.asarray(table)
    first = np.maximum(lengths - case.T - window, 0) // L
    visible = [int(table_np[b, j]) for b, n in enumerate(lengths) for j in range(first[b], -(-n // L))]
    assert len(visible) == 5
    spare = ~np.isin(np.arange(key_pages.shape[0]), visible)
    key_pages, value_pages = (jnp.where(spare[:, None, None, None], jnp.nan, x) for x in (key_pages, value_pages))
    table = table.at[0, -1].set(10**6).at[1, :].set(-7)
    out = _paged(q, key_pages, value_pages, table, jnp.asarray(lengths), dict(case.rules),
                 block_sizes=case.block_sizes, interpret=True)
    assert sorted(copied_pages) == sorted(visible * 2)  # each visible page once, keys and values
    ref, _ = reference_attention(q, k, v, **_oracle_rules(case, lengths))
    assert_close(out, ref, "float32")
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)


@pytest.mark.parametrize("rules", [{}, {"local_window_size": (100, 0), "logits_soft_cap": 8.0}],
                         ids=["plain", "window_from_the_second_tile"])
def test_equals_dense_tpu_kernel_on_gathered_cache(rules):
    """Blocks of 128 keys in both kernels: the same tiles in the same order give the same values."""
    case = PagedCase("dense", 2, 4, 2, 128, 16, (230, 97), block_sizes=Blocks(8))
    q, key_pages, value_pages, table, lengths, _ = paged_case_inputs(case, seed=4)
    table = jnp.pad(table, ((0, 0), (0, 16 - table.shape[1])), constant_values=-1)  # capacity 256 keys: 2 tiles
    lengths = jnp.asarray(lengths)
    paged = _paged(q, key_pages, value_pages, table, lengths, rules, block_sizes=case.block_sizes, interpret=True)
    k, v = gather_pages(key_pages, table), gather_pages(value_pages, table)
    dense = jitted(tpu.decode_attention, q, k, v, lengths, rules=rules, block_sizes=tpu.DecodeBlockSizes(block_k=128),
                   interpret=True)
    np.testing.assert_array_equal(np.asarray(paged), np.asarray(dense))


def test_gradients_match_oracle():
    case = PagedCase("grads", 1, 4, 2, 64, 16, (20, 9))
    q, key_pages, value_pages, table, lengths, (k, v) = paged_case_inputs(case, seed=1)
    d_out = np.random.default_rng(2).standard_normal(q.shape)

    def loss(q, key_pages, value_pages):
        out = tpu.paged_decode_attention(q, key_pages, value_pages, table, jnp.asarray(lengths), interpret=True)
        return jnp.sum(out * d_out)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, key_pages, value_pages)
    refs = reference_page_grads(case, q, key_pages, value_pages, table, lengths, (k, v), d_out)
    for got, ref, what in zip(grads, refs, ("d_query", "d_key_pages", "d_value_pages")):
        assert_close(got, ref, "float32", GRAD_TOLERANCE["float32"], what)


# ---------------------------------------------------------------------------
# Lowering for TPUs.


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=str)
def test_forward_and_backward_lower_for_tpu(case):
    q, key_pages, value_pages, table, lengths, _ = paged_case_inputs(case)
    rules = dict(case.rules)

    def value_and_grads(q, key_pages, value_pages, table, lengths, **kw):
        def loss(q, key_pages, value_pages):
            out = tpu.paged_decode_attention(q, key_pages, value_pages, table, lengths, block_sizes=case.block_sizes,
                                             **kw)
            return jnp.sum(out.astype(jnp.float32)), out
        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, key_pages, value_pages)

    text = export_for_tpu(value_and_grads, (q, key_pages, value_pages, table, jnp.asarray(lengths)), rules)
    assert text.count(KERNEL_CALL) == 4  # the paged kernel; its backward: flash forward, dQ, dK/dV
    forward = export_for_tpu(tpu.paged_decode_attention, (q, key_pages, value_pages, table, jnp.asarray(lengths)),
                             rules, block_sizes=case.block_sizes)
    assert forward.count(KERNEL_CALL) == 1 and "gqa_paged_decode_attention" in forward


# ---------------------------------------------------------------------------
# Quantized pools.

QUANTIZED = [jnp.int8, jnp.float8_e4m3fn]
QUANTIZED_IDS = ["int8", "fp8"]


def _quantized_paged(q, kq, vq, ks, vs, table, lengths, rules, **static):
    return jitted(lambda q, kq, vq, ks, vs, table, lengths, **kw: tpu.paged_decode_attention(
        q, kq, vq, table, lengths, key_scale_pages=ks, value_scale_pages=vs, **kw),
        q, kq, vq, ks, vs, table, lengths, rules=rules, **static)


@pytest.mark.parametrize("dtype", QUANTIZED, ids=QUANTIZED_IDS)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=str)
def test_quantized_pools_match_float64_oracle(case, dtype):
    q, kq, vq, ks, vs, table, lengths, (k64, v64) = quantized_paged_case_inputs(case, dtype)
    out = _quantized_paged(q, kq, vq, ks, vs, table, jnp.asarray(lengths), dict(case.rules),
                           block_sizes=case.block_sizes, interpret=True)
    assert out.dtype == q.dtype
    rules = _oracle_rules(case, lengths)
    ref, _ = reference_attention(q, k64, v64, logits_soft_cap=rules.pop("logits_soft_cap", None), **rules)
    assert_close(out, ref, case.dtype)


@pytest.mark.parametrize("dtype", QUANTIZED, ids=QUANTIZED_IDS)
def test_quantized_pools_equal_dense_tpu_kernel_on_gathered_cache(dtype):
    """Two K/V heads per program, blocks of 128 keys in both kernels: the same tiles give the same values."""
    case = PagedCase("dense", 2, 4, 2, 64, 16, (230, 97), dtype="bfloat16", block_sizes=Blocks(8))
    q, kq, vq, ks, vs, table, lengths, _ = quantized_paged_case_inputs(case, dtype, seed=5)
    table = jnp.pad(table, ((0, 0), (0, 16 - table.shape[1])), constant_values=-1)  # capacity 256 keys: 2 tiles
    lengths = jnp.asarray(lengths)
    rules = {"logits_soft_cap": 8.0}
    paged = _quantized_paged(q, kq, vq, ks, vs, table, lengths, rules, block_sizes=case.block_sizes, interpret=True)
    dense = jitted(lambda q, kq, vq, ks, vs, lengths, **kw: tpu.decode_attention(
        q, kq, vq, lengths, key_scale=ks, value_scale=vs, **kw), q, *(gather_pages(x, table) for x in (kq, vq, ks, vs)),
        lengths, rules=rules, block_sizes=tpu.DecodeBlockSizes(block_k=128), interpret=True)
    np.testing.assert_array_equal(np.asarray(paged, np.float32), np.asarray(dense, np.float32))


def test_quantized_pool_gradients_match_xla():
    """The query and the scale pages get the gradients of XLA's attention on the gathered, dequantized pages."""
    case = PagedCase("grads", 2, 4, 2, 64, 16, (30, 9))
    q, kq, vq, ks, vs, table, lengths, _ = quantized_paged_case_inputs(case, jnp.float8_e4m3fn, seed=1)
    d_out = np.random.default_rng(2).standard_normal(q.shape)

    def paged(q, ks, vs):
        return tpu.paged_decode_attention(q, kq, vq, table, jnp.asarray(lengths), key_scale_pages=ks,
                                          value_scale_pages=vs, interpret=True)

    def xla(q, ks, vs):
        return gqa_jax.dot_product_attention(
            q, *(gather_pages(x, table) for x in (kq, vq)), key_scale=gather_pages(ks, table),
            value_scale=gather_pages(vs, table), is_causal=True, query_offset=lengths - case.T,
            key_value_seq_lengths=lengths, implementation="xla")

    def grads(fn):
        return jax.grad(lambda *args: jnp.sum(fn(*args) * d_out), (0, 1, 2))

    got = jitted(grads(paged), q, ks, vs, rules={})
    expected = jax.jit(grads(xla))(q, ks, vs)
    for g, e, what in zip(got, expected, ("d_query", "d_key_scale_pages", "d_value_scale_pages")):
        assert_close(g, np.asarray(e), "float32", GRAD_TOLERANCE["float32"], what)


@pytest.mark.parametrize("dtype", QUANTIZED, ids=QUANTIZED_IDS)
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=str)
def test_quantized_forward_and_backward_lower_for_tpu(case, dtype):
    q, kq, vq, ks, vs, table, lengths, _ = quantized_paged_case_inputs(case, dtype)

    def value_and_grads(q, ks, vs, kq, vq, table, lengths, **kw):
        def loss(q, ks, vs):
            out = tpu.paged_decode_attention(q, kq, vq, table, lengths, key_scale_pages=ks, value_scale_pages=vs,
                                             block_sizes=case.block_sizes, **kw)
            return jnp.sum(out.astype(jnp.float32)), out
        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, ks, vs)

    text = export_for_tpu(value_and_grads, (q, ks, vs, kq, vq, table, jnp.asarray(lengths)), dict(case.rules))
    assert text.count(KERNEL_CALL) == 4  # the paged kernel; its backward: flash forward, dQ, dK/dV


# ---------------------------------------------------------------------------
# Bad inputs: the GPU kernel's checks and messages, and the TPU block sizes.


def _bad_calls():
    call = paged_call(tpu.paged_decode_attention, interpret=True)
    # A quantized pool of the calls' shape (6 pages of 16 slots, K=2 heads of 16).
    (kq, ks), (vq, _) = (quantize(np.random.default_rng(i).standard_normal((6, 16, 2, 16)), jnp.int8) for i in (5, 6))
    return paged_bad_calls(tpu.paged_decode_attention, interpret=True) + [
        ("quantized_missing_scale", call(key_pages=kq, value_pages=vq, key_scale_pages=ks), ValueError,
         r"key_pages.dtype=int8 is quantized: .* got value_scale=None"),
        ("block_of_keys", call(block_sizes=Blocks(9)), ValueError,
         r"pages_per_block \* page_size = 9 \* 16 = 144 keys per block must be a multiple of NUM_LANES=128"),
        ("interpret", call(interpret="yes"), TypeError, "interpret='yes'"),
        ("pages_per_block", lambda: tpu.PagedDecodeBlockSizes(0), ValueError, "pages_per_block=0"),
        ("pages_per_block_bool", lambda: tpu.PagedDecodeBlockSizes(True), ValueError, "pages_per_block=True"),
    ]


@pytest.mark.parametrize("name, call, error, match", _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------
# PagedKVCache.attend on a TPU backend.


@pytest.fixture
def tpu_backend(monkeypatch):
    """``jax.default_backend()`` says "tpu"; the TPU paged kernel, in interpret mode, records its calls."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return tpu.paged_decode_attention(*args, **dict(kwargs, interpret=True))  # no TPU here: interpret

    monkeypatch.setattr(paged_kv_cache, "tpu_paged_decode_attention", recording)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    jax.clear_caches()  # no trace made while faking the platform is reused elsewhere
    yield calls
    jax.clear_caches()


def test_attend_picks_the_tpu_kernel_on_tpu(tpu_backend):
    rng = np.random.default_rng(10)
    B, N, K, H = 3, 4, 2, 8
    cache = PagedKVCache.init(batch_size=B, num_pages=20, page_size=4, num_kv_heads=K, head_dim=H, max_pages_per_row=6)
    k, v = (jnp.asarray(rng.standard_normal((B, 9, K, H)), jnp.float32) for _ in range(2))
    cache = cache.update(k, v, num_new=jnp.array([9, 0, 6]))
    q = jnp.asarray(rng.standard_normal((B, 2, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, 2, K, H)), jnp.float32) for _ in range(2))
    n = jnp.array([2, 1, 0])
    cache = cache.update(k, v, num_new=n)
    out = cache.attend(q, num_new=n, logits_soft_cap=4.0, implementation=None)
    assert len(tpu_backend) == 1 and tpu_backend[0]["logits_soft_cap"] == 4.0
    assert tpu_backend[0]["interpret"] is False  # compiled on a TPU
    lengths = np.asarray(cache.stored_lengths)
    dense = [np.asarray(gather_pages(x, cache.page_table), np.float64) for x in (cache.key_pages, cache.value_pages)]
    ref, _ = reference_attention(q, *dense, is_causal=True, query_offset=lengths - np.asarray(n),
                                 query_seq_lengths=n, key_value_seq_lengths=lengths, logits_soft_cap=4.0)
    assert_close(out, ref, "float32")
    # Prefill-shaped calls (T > 16) and keywords the kernel lacks take the gathered dense path.
    q_long = jnp.zeros((B, 17, N, H), jnp.float32)
    cache.attend(q_long, num_new=jnp.array([1, 1, 1]), implementation="xla")
    cache.attend(q, num_new=n, implementation="xla")
    assert len(tpu_backend) == 1


def test_attend_off_tpu_does_not_pick_the_tpu_kernel(monkeypatch):
    """On this CPU: the dense path by default, the GPU kernel in its interpreter with ``paged_kernel=True``."""
    def fail(*args, **kwargs):
        raise AssertionError("the TPU kernel was called off a TPU")

    monkeypatch.setattr(paged_kv_cache, "tpu_paged_decode_attention", fail)
    rng = np.random.default_rng(11)
    cache = PagedKVCache.init(batch_size=1, num_pages=4, page_size=4, num_kv_heads=1, head_dim=8, max_pages_per_row=2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 3, 1, 8)), jnp.float32) for _ in range(3))
    cache = cache.update(k, v)
    np.testing.assert_allclose(cache.attend(q, paged_kernel=True), cache.attend(q), rtol=2e-5, atol=2e-5)
