"""The Triton decode-attention kernel.

The shared decode cases run in interpret mode (CPU, CI) and compiled on an
NVIDIA GPU (skipped elsewhere); every case also lowers to Triton for CUDA on
any machine. Further tests: the split-count heuristic, cache memory past a
row's length never influencing the output (NaN poison), rows of length 0
(zeros, also in gradients), explicit offsets and non-causal rules, padded head
dims and several row blocks, gradients (the flash-attention backward) against
the XLA path, and input validation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu.decode_attention import (
    DecodeBlockSizes,
    choose_num_splits,
    decode_attention,
    default_block_sizes,
)
from tests.devices import has_gpu
from tests.kernel_cases import (
    DECODE_CASES,
    GRAD_TOLERANCE,
    TOLERANCE,
    TOLERANCE_TF32,
    DecodeKernelCases,
    assert_close,
    make_inputs,
)
from tests.reference import reference_attention


needs_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")
# Small tiles and an odd split count: several splits per row, some of them empty.
SPLIT = dict(block_sizes=DecodeBlockSizes(block_k=32, num_splits=3))


class TestDecodeInterpret(DecodeKernelCases):
    def decode(self, q, k_cache, v_cache, lengths, **rules):
        return decode_attention(q, k_cache, v_cache, lengths, interpret=True, **SPLIT, **rules)


@needs_gpu
class TestDecodeCompiled(DecodeKernelCases):
    f32_tolerance = TOLERANCE_TF32

    def decode(self, q, k_cache, v_cache, lengths, **rules):
        return decode_attention(q, k_cache, v_cache, lengths, **rules)


@needs_gpu
class TestDecodeCompiledSplit(DecodeKernelCases):
    f32_tolerance = TOLERANCE_TF32

    def decode(self, q, k_cache, v_cache, lengths, **rules):
        return decode_attention(q, k_cache, v_cache, lengths, **SPLIT, **rules)


def _random(rng, shape, dtype="float32"):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _decode_reference(q, k, v, lengths, *, query_offset=None, is_causal=True, **rules):
    T = q.shape[1]
    offset = np.asarray(lengths) - T if query_offset is None else query_offset
    rules = dict(rules)
    ref, _ = reference_attention(
        q, k, v, scale=rules.pop("scale", None), logits_soft_cap=rules.pop("logits_soft_cap", None),
        is_causal=is_causal, query_offset=offset, key_value_seq_lengths=lengths, **rules,
    )
    return ref


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("blocks", [{}, SPLIT], ids=["default", "split"])
def test_lowers_to_triton(case, blocks):
    q, k, v, _, rules = make_inputs(case, seed=case.seed)
    lengths = jnp.asarray(rules.pop("lengths"))
    fn = jax.jit(lambda q, k, v, lengths: decode_attention(q, k, v, lengths, **blocks, **rules))
    text = fn.trace(q, k, v, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "gqa_decode_attention" in text, "the Triton kernel is missing from the lowered module"


def test_split_heuristic_fills_the_gpu():
    one_row = choose_num_splits(1, 8, 32768, block_k=128, sm_count=132)
    assert one_row >= 16, f"B=1 S=32768 K=8 got only {one_row} splits"
    assert 8 * one_row >= 132, "B=1 leaves SMs idle"
    assert choose_num_splits(32, 8, 4096, block_k=128, sm_count=132) <= 2
    assert choose_num_splits(1, 8, 256, block_k=128, sm_count=132) == 1, "a two-tile cache needs no split"
    splits = [choose_num_splits(b, 8, 8192, block_k=64, sm_count=132) for b in (1, 2, 4, 8, 16, 32)]
    assert splits == sorted(splits, reverse=True), f"more rows must not mean more splits: {splits}"
    blocks = default_block_sizes(1, 32768, 8, 4, 128, jnp.bfloat16, sm_count=132)
    assert blocks.num_splits == choose_num_splits(1, 8, 32768, block_k=blocks.block_k, sm_count=132)
    assert default_block_sizes(1, 32768, 8, 4, 128, jnp.bfloat16, num_splits=5).num_splits == 5


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=needs_gpu)], ids=["interpret", "compiled"])
def test_cache_past_lengths_is_never_read(interpret):
    rng = np.random.default_rng(11)
    B, T, N, K, S, H = 5, 4, 8, 2, 160, 64
    lengths = np.array([0, 1, 37, 100, S], np.int32)
    q, k, v = _random(rng, (B, T, N, H)), _random(rng, (B, S, K, H)), _random(rng, (B, S, K, H))
    past = np.arange(S)[None, :, None, None] >= lengths[:, None, None, None]
    k_poisoned, v_poisoned = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v)
    fn = jax.jit(lambda q, k, v, lengths: decode_attention(
        q, k, v, lengths, block_sizes=DecodeBlockSizes(block_k=16, num_splits=4), interpret=interpret))
    out = fn(q, k_poisoned, v_poisoned, jnp.asarray(lengths))
    tol = TOLERANCE["float32"] if interpret else TOLERANCE_TF32
    assert_close(out, _decode_reference(q, k, v, lengths), "float32", tol)


def test_zero_lengths_give_zeros():
    rng = np.random.default_rng(3)
    q, k, v = (_random(rng, shape, "bfloat16") for shape in [(2, 2, 4, 32), (2, 48, 2, 32), (2, 48, 2, 32)])
    out = decode_attention(q, k, v, jnp.zeros((2,), jnp.int32), interpret=True, **SPLIT)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)


@pytest.mark.parametrize(
    "rules",
    [
        dict(is_causal=True, query_offset=np.array([3, 90], np.int32)),
        dict(is_causal=False),
        dict(is_causal=False, local_window_size=(5, 2), query_offset=40),
        dict(is_causal=True, scale=0.2, logits_soft_cap=2.0, local_window_size=17),
    ],
    ids=["explicit_offsets", "non_causal", "two_sided_window", "scale_softcap_window"],
)
def test_rules_match_reference(rules):
    rng = np.random.default_rng(5)
    B, T, N, K, S, H = 2, 3, 6, 2, 128, 32
    lengths = np.array([60, 128], np.int32)
    q, k, v = _random(rng, (B, T, N, H)), _random(rng, (B, S, K, H)), _random(rng, (B, S, K, H))
    out = decode_attention(q, k, v, jnp.asarray(lengths), interpret=True, **SPLIT, **rules)
    assert_close(out, _decode_reference(q, k, v, lengths, **rules), "float32")


def test_padded_head_dims_and_several_row_blocks():
    # H=80, Hv=40 are padded to 128 and 64; G*T = 16*8 = 128 query rows per KV head make two row blocks.
    rng = np.random.default_rng(8)
    B, T, N, K, S = 1, 8, 16, 1, 96
    lengths = np.array([90], np.int32)
    q, k, v = _random(rng, (B, T, N, 80), "bfloat16"), _random(rng, (B, S, K, 80), "bfloat16"), _random(
        rng, (B, S, K, 40), "bfloat16")
    out = decode_attention(q, k, v, jnp.asarray(lengths), interpret=True, local_window_size=(50, 0), **SPLIT)
    assert out.shape == (B, T, N, 40) and out.dtype == jnp.bfloat16
    ref = _decode_reference(q, k, v, lengths, local_window_size=(50, 0))
    assert_close(out, ref, "bfloat16")


def test_single_split_normalizes_in_the_kernel():
    case = DECODE_CASES[4]  # T=4, G=4, window, lengths 511 and 90
    q, k, v, _, rules = make_inputs(case, seed=case.seed)
    lengths = rules.pop("lengths")
    out = decode_attention(q, k, v, jnp.asarray(lengths), block_sizes=DecodeBlockSizes(block_k=64, num_splits=1),
                           interpret=True, **rules)
    assert_close(out, _decode_reference(q, k, v, lengths, **rules), case.dtype)


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=needs_gpu)], ids=["interpret", "compiled"])
def test_gradients_match_xla(interpret):
    import gqa_jax

    rng = np.random.default_rng(21)
    B, T, N, K, S, H = 3, 4, 8, 2, 96, 32
    lengths = np.array([0, 70, 96], np.int32)
    rules = dict(local_window_size=(40, 0), logits_soft_cap=3.0)
    q, k, v = _random(rng, (B, T, N, H)), _random(rng, (B, S, K, H)), _random(rng, (B, S, K, H))
    cotangent = _random(rng, (B, T, N, H))

    def loss_kernel(q, k, v):
        out = decode_attention(q, k, v, jnp.asarray(lengths), interpret=interpret, **SPLIT, **rules)
        return jnp.sum(out * cotangent)

    def loss_xla(q, k, v):
        out = gqa_jax.dot_product_attention(
            q, k, v, is_causal=True, query_offset=lengths - T, key_value_seq_lengths=lengths,
            implementation="xla", **rules,
        )
        return jnp.sum(out * cotangent)

    grads = jax.jit(jax.grad(loss_kernel, (0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss_xla, (0, 1, 2)))(q, k, v)
    tol = GRAD_TOLERANCE["float32"] if interpret else TOLERANCE_TF32
    for name, g, e in zip("qkv", grads, expected):
        assert_close(g, np.asarray(e), "float32", tol, what=f"d{name}")
        np.testing.assert_array_equal(np.asarray(g[0]), 0.0, err_msg=f"d{name} of the length-0 row")


def test_invalid_inputs_name_the_values():
    q, k = jnp.ones((2, 1, 6, 16)), jnp.ones((2, 32, 4, 16))
    lengths = jnp.array([3, 4], jnp.int32)
    with pytest.raises(ValueError, match="N=6 must be a multiple of num_kv_heads K=4"):
        decode_attention(q, k, k, lengths, interpret=True)
    k2 = jnp.ones((2, 32, 2, 16))
    with pytest.raises(ValueError, match=r"lengths must be a scalar or have shape \[B\]=\(2,\), got lengths.shape=\(3,\)"):
        decode_attention(q, k2, k2, jnp.array([1, 2, 3]), interpret=True)
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        decode_attention(q, k2, k2, jnp.array([1.0, 2.0]), interpret=True)
    with pytest.raises(TypeError, match="key_cache.dtype=float16"):
        decode_attention(q, k2.astype(jnp.float16), k2, lengths, interpret=True)
    with pytest.raises(ValueError, match="block_k=48 must be a power of two"):
        decode_attention(q, k2, k2, lengths, block_sizes=DecodeBlockSizes(block_k=48), interpret=True)
    with pytest.raises(ValueError, match="num_splits=0 must be >= 1"):
        DecodeBlockSizes(block_k=64, num_splits=0, block_rows=16, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="local_window_size must be non-negative"):
        decode_attention(q, k2, k2, lengths, local_window_size=(-1, 0), interpret=True)
    # 64 splits * B*T*N * H = 2**6 * 2**7 * 2**4 * 2**6 * 2**8 flat offsets overflow int32.
    big_q = jax.ShapeDtypeStruct((128, 16, 64, 256), jnp.bfloat16)
    big_k = jax.ShapeDtypeStruct((128, 64, 8, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="must be < 2\\*\\*31"):
        jax.eval_shape(lambda q, k: decode_attention(q, k, k, jnp.ones(128, jnp.int32),
                                                     block_sizes=DecodeBlockSizes(num_splits=64)), big_q, big_k)
