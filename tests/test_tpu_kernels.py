"""The shared kernel cases on the Pallas TPU kernels.

On CPUs (CI) they run in the Pallas TPU interpret mode; on a TPU (the Colab
notebook, ``examples/colab_tpu.ipynb``) the same cases run compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tpu
from tests.kernel_cases import GRAD_CASES, GRAD_TOLERANCE, DecodeKernelCases, FlashKernelCases, assert_close
from tests.reference import reference_attention

# Small tiles, so that the short sequences of the cases span several of them; the
# interpreter's cost grows with the number of grid steps, so long sequences get larger ones.
SMALL_BLOCKS = tpu.BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
LONG_BLOCKS = tpu.BlockSizes(block_q=512, block_k=256, block_q_bwd=256, block_k_bwd=256)
LONG = 512
# Interpret-mode programs are large and run briefly: a cheap XLA:CPU compile is the faster trade.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ON_TPU = jax.default_backend() == "tpu"
NEEDS_TPU = pytest.mark.skipif(
    not ON_TPU, reason=f"compiled TPU kernels need a TPU; jax.default_backend() is {jax.default_backend()!r}"
)


def with_traced_rules(fn, rules, **static):
    """``(g, traced)``: ``g(arrays, traced) = fn(*arrays, **rules, **static)`` with the array-valued rules traced."""
    traced = {name: x for name, x in rules.items() if isinstance(x, (np.ndarray, jax.Array))}
    fixed = {name: x for name, x in rules.items() if name not in traced}
    return (lambda arrays, traced: fn(*arrays, **traced, **fixed, **static)), traced


def jitted(fn, *arrays, rules, **static):
    """``fn(*arrays, **rules, **static)`` under one ``jax.jit``.

    Interpret mode runs far faster jitted than op by op. On CPUs, outside other
    transformations (which allow no compiler options), it compiles with `FAST_COMPILE`.
    """
    g, traced = with_traced_rules(fn, rules, **static)
    nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(arrays))
    fast = not nested and jax.default_backend() == "cpu"
    return jax.jit(g, compiler_options=FAST_COMPILE if fast else None)(arrays, traced)


def _flash(q, k, v, bias, rules, **static):
    return jitted(lambda q, k, v, bias, **kw: tpu.flash_attention(q, k, v, bias=bias, **kw),
                  q, k, v, bias, rules=rules, **static)


class TestFlashInterpret(FlashKernelCases):
    def flash(self, q, k, v, bias=None, **rules):
        blocks = LONG_BLOCKS if min(q.shape[1], k.shape[1]) > LONG else SMALL_BLOCKS
        return _flash(q, k, v, bias, rules, block_sizes=blocks, interpret=True)

    @pytest.mark.slow  # backward kernels in interpret mode: each case compiles and runs several seconds on a CPU
    @pytest.mark.parametrize("case", GRAD_CASES, ids=str)
    def test_gradients(self, case):
        super().test_gradients(case)


@NEEDS_TPU
class TestFlashCompiled(FlashKernelCases):
    f32_tolerance = 1e-4

    @pytest.fixture(autouse=True)
    def _exact_xla_matmuls(self):
        # The expected gradients come from the XLA path, whose float32 matmuls on TPUs
        # default to one bfloat16 pass; our kernels multiply float32 at full precision.
        with jax.default_matmul_precision("highest"):
            yield

    def flash(self, q, k, v, bias=None, **rules):
        return _flash(q, k, v, bias, rules)


def _decode(q, k, v, lengths, rules, **static):
    return jitted(tpu.decode_attention, q, k, v, lengths, rules=rules, **static)


class TestDecodeInterpret(DecodeKernelCases):
    def decode(self, q, k_cache, v_cache, lengths, **rules):
        return _decode(q, k_cache, v_cache, lengths, rules, block_sizes=tpu.DecodeBlockSizes(block_k=128),
                       interpret=True)


@NEEDS_TPU
class TestDecodeCompiled(DecodeKernelCases):
    f32_tolerance = 1e-4

    def decode(self, q, k_cache, v_cache, lengths, **rules):
        return _decode(q, k_cache, v_cache, lengths, rules)


# ---------------------------------------------------------------------------
# Tile skipping, bias and decode gradients, argument errors (interpret mode).


def _xla(q, k, v, bias=None, **rules):
    import gqa_jax

    return gqa_jax.dot_product_attention(q, k, v, bias=bias, implementation="xla", **rules)


def _poison(x, keep):
    """NaN everywhere along S except where ``keep [B, S]`` is True."""
    return jnp.where(jnp.asarray(keep)[:, :, None, None], x, jnp.nan)


def _value_and_grads(fn, args, cotangent, argnums=(0, 1, 2)):
    """``fn(*args)`` and the gradients of ``sum(fn(*args) * cotangent)``, in one jitted program."""
    def loss(*args):
        out = fn(*args)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jitted(jax.value_and_grad(loss, argnums, has_aux=True), *args, rules={})
    return out, grads


def _random(rng, *shapes):
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]


@pytest.mark.slow  # a forward and backward pass in interpret mode
def test_flash_never_reads_invisible_tiles():
    # Every visible key of both rows lies in the key tile [128, 256); the other tiles hold NaN.
    # Were any of them computed, NaN would reach the output or the gradients.
    B, T, S, N, K, H = 2, 64, 512, 4, 2, 64
    q, k, v, cotangent = _random(np.random.default_rng(7), (B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H))
    rules = dict(is_causal=True, local_window_size=(40, 0), query_offset=np.array([192, 170], np.int32),
                 key_value_seq_lengths=np.array([512, 200], np.int32))
    tile = np.broadcast_to((np.arange(S) >= 128) & (np.arange(S) < 256), (B, S))
    out, grads = _value_and_grads(
        lambda q, k, v: tpu.flash_attention(q, k, v, **rules, block_sizes=SMALL_BLOCKS, interpret=True),
        (q, _poison(k, tile), _poison(v, tile)), cotangent)
    assert_close(out, reference_attention(q, k, v, **rules)[0], "float32")
    _, expected = _value_and_grads(lambda q, k, v: _xla(q, k, v, **rules), (q, k, v), cotangent)
    for name, g, e in zip("qkv", grads, expected):
        assert_close(g, np.asarray(e), "float32", GRAD_TOLERANCE["float32"], what=f"d{name}")


def test_decode_never_reads_past_lengths_or_before_window():
    B, T, S, N, K, H = 2, 4, 384, 8, 2, 128
    q, k, v = _random(np.random.default_rng(8), (B, T, N, H), (B, S, K, H), (B, S, K, H))
    lengths, window = np.array([300, 77], np.int32), (63, 0)
    first = lengths - T - window[0]
    keep = (np.arange(S)[None, :] >= first[:, None]) & (np.arange(S)[None, :] < lengths[:, None])
    out = _decode(q, _poison(k, keep), _poison(v, keep), lengths, dict(local_window_size=window),
                  block_sizes=tpu.DecodeBlockSizes(block_k=128), interpret=True)
    ref, _ = reference_attention(q, k, v, is_causal=True, query_offset=lengths - T, key_value_seq_lengths=lengths,
                                 local_window_size=window)
    assert_close(out, ref, "float32")


@pytest.mark.slow  # a backward pass in interpret mode
def test_flash_bias_gradient_with_shared_batch():
    B, T, S, N, K, H = 2, 40, 150, 4, 2, 64
    q, k, v, cotangent = _random(np.random.default_rng(9), (B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H))
    bias = _random(np.random.default_rng(10), (1, N, T, S))[0]
    _, grads = _value_and_grads(
        lambda q, bias: tpu.flash_attention(q, k, v, bias=bias, is_causal=True, block_sizes=SMALL_BLOCKS,
                                            interpret=True),
        (q, bias), cotangent, argnums=(0, 1))
    _, expected = _value_and_grads(lambda q, bias: _xla(q, k, v, bias, is_causal=True), (q, bias), cotangent,
                                   argnums=(0, 1))
    assert grads[1].shape == bias.shape
    for name, g, e in zip(("dq", "dbias"), grads, expected):
        assert_close(g, np.asarray(e), "float32", GRAD_TOLERANCE["float32"], what=name)


@pytest.mark.slow  # a backward pass in interpret mode
def test_decode_gradients_match_xla():
    B, T, S, N, K, H = 2, 3, 200, 4, 2, 64
    q, k, v, cotangent = _random(np.random.default_rng(11), (B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H))
    lengths = np.array([200, 31], np.int32)
    out, grads = _value_and_grads(
        lambda q, k, v: tpu.decode_attention(q, k, v, lengths, logits_soft_cap=20.0, interpret=True),
        (q, k, v), cotangent)
    rules = dict(is_causal=True, query_offset=lengths - T, key_value_seq_lengths=lengths, logits_soft_cap=20.0)
    assert_close(out, reference_attention(q, k, v, **rules)[0], "float32")
    _, expected = _value_and_grads(lambda q, k, v: _xla(q, k, v, **rules), (q, k, v), cotangent)
    for name, g, e in zip("qkv", grads, expected):
        assert_close(g, np.asarray(e), "float32", GRAD_TOLERANCE["float32"], what=f"d{name}")


def _qkv(B=1, T=8, S=8, N=2, K=1, H=64, dtype=jnp.float32):
    return (jnp.ones((B, T, N, H), dtype), jnp.ones((B, S, K, H), dtype), jnp.ones((B, S, K, H), dtype))


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: tpu.BlockSizes(block_q=100), ValueError, ["block_q=100", "NUM_LANES=128"]),
        (lambda: tpu.flash_attention(*_qkv(N=3, K=2)), ValueError, ["num_heads N=3", "num_kv_heads K=2"]),
        (lambda: tpu.flash_attention(*_qkv(dtype=jnp.int32)), TypeError, ["int32"]),
        (lambda: tpu.flash_attention(*_qkv(), q_segment_ids=np.zeros((1, 8), np.int32)), ValueError,
         ["q_segment_ids", "kv_segment_ids"]),
        (lambda: tpu.flash_attention(*_qkv(), bias=jnp.zeros((2, 2, 8, 8))), ValueError, ["bias", "B=1", "(2, 2, 8, 8)"]),
        (lambda: tpu.flash_attention(*_qkv(), interpret="yes"), TypeError, ["interpret='yes'"]),
        (lambda: tpu.flash_attention(*_qkv(), logits_soft_cap=-1.0), ValueError, ["logits_soft_cap=-1.0"]),
        (lambda: tpu.decode_attention(*_qkv(T=1), np.array([8]), block_sizes=tpu.DecodeBlockSizes(block_k=100)),
         ValueError,
         ["block_k=100", "NUM_LANES=128"]),
        (lambda: tpu.decode_attention(*_qkv(T=1), np.array([8, 8])), ValueError, ["lengths", "(1,)"]),
    ],
)
def test_invalid_arguments_name_their_values(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
