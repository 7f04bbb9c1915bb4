"""Attention sinks: learned sink logits per query head (gpt-oss) and sink tokens kept outside the window (StreamingLLM).

Every implementation that serves them (XLA, the Triton flash and decode
kernels in interpret mode, and through the ``pallas_triton`` adapter; compiled
on a GPU) is checked against the float64 oracle of `tests/reference.py`,
forward and gradients (q, k, v, sinks). Also: the tile ranges of `Rules`
(what every kernel, the Mosaic-GPU tiles included, visits) against the
oracle's visibility, the refusals of the implementations that do not serve
sinks, and bad inputs.
"""

from __future__ import annotations

import dataclasses
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import dispatch
from gqa_jax.implementations import cudnn, pallas_mosaic_gpu, pallas_tpu, pallas_triton
from pallas_kernels import gpu
from pallas_kernels.gpu import flash_attention_mgpu, mgpu_tiles
from pallas_kernels.rules import Rules
from tests.devices import has_gpu, on_hopper
from tests.kernel_cases import GRAD_TOLERANCE, TOLERANCE, TOLERANCE_TF32, assert_close
from tests.multidevice import run_on_cpu_devices
from tests.reference import reference_attention, reference_attention_grads, visibility

H = 16
# Tiles of 16 so that the small cases span several tiles (and skip the gap between sink tokens and the window).
SMALL_TILES = gpu.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16)
# Decode: 16-key tiles, three splits per row (some of them empty).
SPLIT = gpu.DecodeBlockSizes(block_k=16, num_splits=3)


@dataclasses.dataclass(frozen=True)
class SinkCase:
    """One call: shapes, dtype, rules, and whether it has sink logits."""

    name: str
    B: int
    T: int
    S: int
    N: int
    K: int
    rules: tuple = ()
    dtype: str = "float32"
    sinks: bool = True
    bias: bool = False

    def __str__(self) -> str:
        return self.name


def _kw(**kwargs):
    return tuple(kwargs.items())


FLASH_CASES = [
    SinkCase("gqa_causal", 2, 20, 20, 4, 2, _kw(is_causal=True)),
    SinkCase("mqa_bottom_right_lengths", 2, 9, 40, 4, 1,
             _kw(is_causal=True, query_seq_lengths=np.array([9, 5], np.int32),
                 key_value_seq_lengths=np.array([40, 17], np.int32))),
    SinkCase("full_kv_len_zero", 2, 12, 24, 4, 2, _kw(key_value_seq_lengths=np.array([0, 24], np.int32))),
    SinkCase("causal_window_sink_tokens", 1, 64, 64, 4, 2, _kw(is_causal=True, local_window_size=(6, 0),
                                                               num_sink_tokens=4)),
    SinkCase("sink_tokens_without_sinks", 2, 64, 64, 2, 1,
             _kw(is_causal=True, local_window_size=(10, 0), num_sink_tokens=3,
                 key_value_seq_lengths=np.array([64, 2], np.int32)), sinks=False),
    SinkCase("two_sided_window_sink_tokens_bias", 1, 40, 40, 2, 2, _kw(local_window_size=(3, 2), num_sink_tokens=5),
             bias=True),
    SinkCase("soft_cap_causal", 1, 24, 24, 4, 2, _kw(is_causal=True, logits_soft_cap=2.0)),
    SinkCase("bf16_causal", 2, 20, 20, 4, 2, _kw(is_causal=True), dtype="bfloat16"),
]
GRAD_CASES = [FLASH_CASES[1], FLASH_CASES[2], FLASH_CASES[3], FLASH_CASES[5]]
# Decode: a few queries against a cache, bottom-right causal, a row of length 0.
LENGTHS = np.array([70, 33, 0], np.int32)
DECODE_CASES = [
    SinkCase("decode_T1", 3, 1, 70, 4, 2, _kw(key_value_seq_lengths=LENGTHS)),
    SinkCase("decode_T3", 3, 3, 70, 4, 2, _kw(key_value_seq_lengths=LENGTHS)),
    SinkCase("decode_T1_window_sink_tokens", 3, 1, 70, 4, 2,
             _kw(key_value_seq_lengths=LENGTHS, local_window_size=(20, 0), num_sink_tokens=4)),
    SinkCase("decode_T3_window_sink_tokens_mqa", 3, 3, 70, 4, 1,
             _kw(key_value_seq_lengths=LENGTHS, local_window_size=(9, 0), num_sink_tokens=17)),
]


def make_inputs(case: SinkCase):
    """Seeded q, k, v, bias and sinks; the sinks mix no sink (-inf), small, and dominant (12) logits."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    dtype = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((case.B, case.T, case.N, H)), dtype)
    k = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, H)), dtype)
    bias = jnp.asarray(rng.standard_normal((case.B, case.N, case.T, case.S)), jnp.float32) if case.bias else None
    sinks = None
    if case.sinks:
        sinks = rng.standard_normal(case.N)
        sinks[0], sinks[-1] = -np.inf, 12.0
        sinks = jnp.asarray(sinks, jnp.float32)
    return q, k, v, bias, sinks


def _reference(case, q, k, v, bias, sinks):
    out, _ = reference_attention(q, k, v, bias, sinks=None if sinks is None else np.asarray(sinks), **dict(case.rules))
    return out


def _xla(q, k, v, bias, sinks, **rules):
    return gqa_jax.dot_product_attention(q, k, v, bias, sinks=sinks, implementation="xla", **rules)


def _triton_flash(q, k, v, bias, sinks, **rules):
    return gpu.flash_attention(q, k, v, bias=bias, sinks=sinks, block_sizes=SMALL_TILES, interpret=True, **rules)


def _triton_decode(q, k, v, bias, sinks, *, key_value_seq_lengths, **rules):
    return gpu.decode_attention(q, k, v, key_value_seq_lengths, sinks=sinks, block_sizes=SPLIT, interpret=True,
                                **{"is_causal": False, **rules})


def _flash_compiled(q, k, v, bias, sinks, **rules):
    return gpu.flash_attention(q, k, v, bias=bias, sinks=sinks, **rules)


def _decode_compiled(q, k, v, bias, sinks, *, key_value_seq_lengths, **rules):
    return gpu.decode_attention(q, k, v, key_value_seq_lengths, sinks=sinks, **{"is_causal": False, **rules})


needs_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU to run the compiled Triton kernels")
FLASH_IMPLS = [pytest.param(_xla, id="xla"), pytest.param(_triton_flash, id="triton_flash"),
               pytest.param(_flash_compiled, id="triton_flash_compiled", marks=needs_gpu)]
DECODE_IMPLS = [pytest.param(_xla, id="xla"), pytest.param(_triton_decode, id="triton_decode"),
                pytest.param(_decode_compiled, id="triton_decode_compiled", marks=needs_gpu)]


def _tolerance(fn, dtype, grads=False):
    if fn in (_flash_compiled, _decode_compiled) and dtype == "float32":
        return TOLERANCE_TF32 if not grads else 1e-2
    return (GRAD_TOLERANCE if grads else TOLERANCE)[dtype]


def _jit(fn, rules):
    """``fn`` with the case's rules, jitted (one compilation instead of many eager ops)."""
    return jax.jit(lambda q, k, v, bias, sinks: fn(q, k, v, bias, sinks, **rules))


def _decode_rules(case):
    """Decode cases are causal: the newest T queries of each row, bottom-right."""
    return {"is_causal": True, **dict(case.rules)}


@pytest.mark.parametrize("fn", FLASH_IMPLS)
@pytest.mark.parametrize("case", FLASH_CASES, ids=str)
def test_flash_forward(case, fn):
    q, k, v, bias, sinks = make_inputs(case)
    out = _jit(fn, dict(case.rules))(q, k, v, bias, sinks)
    assert out.dtype == q.dtype
    assert_close(out, _reference(case, q, k, v, bias, sinks), case.dtype, _tolerance(fn, case.dtype))


@pytest.mark.parametrize("fn", DECODE_IMPLS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_forward(case, fn):
    q, k, v, bias, sinks = make_inputs(case)
    rules = _decode_rules(case)
    out = _jit(fn, rules)(q, k, v, bias, sinks)
    ref, _ = reference_attention(q, k, v, sinks=np.asarray(sinks), **rules)
    assert_close(out, ref, case.dtype, _tolerance(fn, case.dtype))
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)  # the row of length 0


def _check_grads(fn, case, rules):
    q, k, v, bias, sinks = make_inputs(case)
    d_out = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), q.dtype)

    def loss(q, k, v, sinks):
        return jnp.sum(fn(q, k, v, bias, sinks, **rules).astype(jnp.float32) * d_out.astype(jnp.float32))

    argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
    grads = jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, sinks)
    ref = reference_attention_grads(q, k, v, d_out, bias, sinks=None if sinks is None else np.asarray(sinks),
                                    **rules)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref):
        assert_close(got, want, case.dtype, _tolerance(fn, case.dtype, grads=True), what=name)


@pytest.mark.slow  # the interpret-mode backward kernels take several seconds per case on a CPU
@pytest.mark.parametrize("fn", FLASH_IMPLS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_flash_gradients(case, fn):
    _check_grads(fn, case, dict(case.rules))


@pytest.mark.parametrize("fn", DECODE_IMPLS)
@pytest.mark.parametrize("case", [DECODE_CASES[1], DECODE_CASES[2]], ids=str)
def test_decode_gradients(case, fn):
    _check_grads(fn, case, _decode_rules(case))


@pytest.fixture
def fake_gpu(monkeypatch):
    """Dispatch as if on a GPU, with the Triton kernels in interpret mode."""
    monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
    monkeypatch.setattr(pallas_triton, "interpret", True)


@pytest.mark.parametrize("case", [FLASH_CASES[3], DECODE_CASES[3]], ids=str)
def test_dispatch_picks_triton_and_agrees(fake_gpu, case):
    """With sinks the Mosaic-GPU and cuDNN adapters refuse; implementation=None lands on the Triton kernels."""
    q, k, v, bias, sinks = make_inputs(case)
    rules = _decode_rules(case) if case in DECODE_CASES else dict(case.rules)
    request = gqa_jax.make_request(q, k, v, bias, sinks=sinks, **rules)
    assert dispatch.choose(request).name == "pallas_triton"
    out = gqa_jax.dot_product_attention(q, k, v, bias, sinks=sinks, **rules)
    ref, _ = reference_attention(q, k, v, bias, sinks=np.asarray(sinks), **rules)
    assert_close(out, ref, case.dtype)


def test_quantized_cache_decode_with_sinks(fake_gpu):
    """An int8 cache in the Triton decode kernel with sinks, against the oracle on the dequantized values."""
    rng = np.random.default_rng(11)
    B, T, S, N, K = 2, 2, 40, 4, 2
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    key, value = (jnp.asarray(rng.integers(-127, 128, (B, S, K, H)), jnp.int8) for _ in range(2))
    key_scale, value_scale = (jnp.asarray(rng.uniform(0.005, 0.02, (B, S, K)), jnp.float32) for _ in range(2))
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    rules = dict(is_causal=True, key_value_seq_lengths=np.array([40, 13], np.int32))
    request = gqa_jax.make_request(q, key, value, key_scale=key_scale, value_scale=value_scale, sinks=sinks, **rules)
    assert dispatch.choose(request).name == "pallas_triton"
    out = gqa_jax.dot_product_attention(q, key, value, key_scale=key_scale, value_scale=value_scale, sinks=sinks,
                                        **rules)
    dequantized = [np.asarray(x, np.float64) * np.asarray(s, np.float64)[..., None]
                   for x, s in ((key, key_scale), (value, value_scale))]
    ref, _ = reference_attention(q, *dequantized, sinks=np.asarray(sinks), **rules)
    assert_close(out, ref, "float32")


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import gqa_jax
    from gqa_jax import dispatch
    from gqa_jax.implementations import pallas_triton

    dispatch.current_platform = lambda: "gpu"
    pallas_triton.interpret = True
    rng = np.random.default_rng(0)
    B, T, N, K, H = 4, 16, 8, 4, 16
    q0 = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k0 = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    v0 = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    ref = gqa_jax.dot_product_attention(q0, k0, v0, is_causal=True, sinks=sinks, implementation="xla")
    for axis_types in ((AxisType.Explicit,) * 2, (AxisType.Auto,) * 2):
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=axis_types)
        sharding = NamedSharding(mesh, P("data", None, "model"))
        q, k, v = (jax.device_put(x, sharding) for x in (q0, k0, v0))
        kw = {} if axis_types[0] == AxisType.Explicit else dict(q_sharding=sharding)
        out = jax.jit(lambda q, k, v, s: gqa_jax.dot_product_attention(
            q, k, v, is_causal=True, sinks=s, implementation="pallas_triton", **kw))(q, k, v, sinks)
        assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
        print("ok", axis_types[0])
""")


@pytest.mark.slow  # a subprocess with 4 simulated devices
def test_sinks_split_over_head_shards():
    """On a (2, 2) mesh the Triton kernels run per device with their heads' sinks (4 simulated CPU devices)."""
    result = run_on_cpu_devices(SHARDED_SCRIPT, 4)
    assert result.stdout.count("ok ") == 2, result.stdout


def test_huge_sink_gives_zeros_not_nan():
    """A sink far above every logit takes all the weight: outputs ~0, finite, in every implementation."""
    case = FLASH_CASES[0]
    q, k, v, _, _ = make_inputs(case)
    sinks = jnp.full((case.N,), 1e4, jnp.float32)
    rules = dict(case.rules)
    for out in (_xla(q, k, v, None, sinks, **rules), _triton_flash(q, k, v, None, sinks, **rules),
                _triton_decode(q[:, :1], k, v, None, sinks, key_value_seq_lengths=np.array([20, 7], np.int32),
                               is_causal=True)):
        assert np.all(np.isfinite(np.asarray(out)))
        np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-30)


@pytest.mark.parametrize("case,rules", [(FLASH_CASES[4], dict(FLASH_CASES[4].rules)),
                                        (DECODE_CASES[3], _decode_rules(DECODE_CASES[3]))], ids=["flash", "decode"])
def test_sink_tokens_on_tpu_kernels(monkeypatch, case, rules):
    """The TPU flash and decode kernels (interpret mode) serve sink tokens through Rules.kv_range's hull."""
    q, k, v, _, _ = make_inputs(case)
    monkeypatch.setattr(pallas_tpu, "interpret", True)
    monkeypatch.setattr(dispatch, "current_platform", lambda: "tpu")
    request = gqa_jax.make_request(q, k, v, **rules)
    assert dispatch.choose(request).name == "pallas_tpu"
    out = gqa_jax.dot_product_attention(q, k, v, **rules)
    assert_close(out, reference_attention(q, k, v, **rules)[0], case.dtype)


# ---------------------------------------------------------------------------
# Refusals.


def _request(**kw):
    q, k, v, _, sinks = make_inputs(FLASH_CASES[0])
    return gqa_jax.make_request(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), **kw)


@pytest.mark.parametrize("impl", [cudnn, pallas_mosaic_gpu, pallas_tpu], ids=lambda m: m.IMPLEMENTATION.name)
def test_refuse_sinks(impl):
    reason = impl.IMPLEMENTATION.supports(_request(sinks=jnp.zeros(4), is_causal=True))
    assert reason is not None and "sinks" in reason


@pytest.mark.parametrize("impl", [cudnn, pallas_mosaic_gpu], ids=lambda m: m.IMPLEMENTATION.name)
def test_refuse_sink_tokens(impl):
    reason = impl.IMPLEMENTATION.supports(_request(is_causal=True, local_window_size=(4, 0), num_sink_tokens=2))
    assert reason is not None and "num_sink_tokens" in reason


def test_explicit_implementation_that_refuses_raises(fake_gpu):
    q, k, v, _, sinks = make_inputs(FLASH_CASES[0])
    with pytest.raises(ValueError, match="cudnn: does not support sinks"):
        gqa_jax.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                      sinks=sinks, implementation="cudnn")


def test_residuals_refuse_sinks():
    q, k, v, _, sinks = make_inputs(FLASH_CASES[0])
    with pytest.raises(ValueError, match="return_residuals=True does not take sinks"):
        gpu.flash_attention(q, k, v, sinks=sinks, interpret=True, return_residuals=True)


# ---------------------------------------------------------------------------
# Tile ranges: every kernel visits the tiles of Rules' ranges.


def _tile_rules(causal, window, sink_tokens, S):
    shape = jax.ShapeDtypeStruct((1, S, 1, H), jnp.float32)
    return Rules.create(shape, shape, is_causal=causal, local_window_size=window, num_sink_tokens=sink_tokens,
                        query_offset=0)


TILE_SETTINGS = [(True, (5, 0), 3), (False, (4, 2), 6), (True, (0, 0), 1), (True, (7, 3), 20)]


@pytest.mark.parametrize("causal,window,sink_tokens", TILE_SETTINGS)
def test_rules_ranges_cover_the_visible_keys(causal, window, sink_tokens):
    """kv_ranges' two runs and kv_range's hull hold every visible key; kv_full_range only keys all rows see;
    q_range holds every query that sees a key of the tile (the oracle's visibility decides)."""
    S = 48
    rules = _tile_rules(causal, window, sink_tokens, S)
    vis = visibility(1, S, S, is_causal=causal, local_window_size=window, num_sink_tokens=sink_tokens,
                     query_offset=0)[0]
    keys = np.arange(S)
    for first in range(0, S, 5):
        last = min(first + 7, S - 1)
        seen = vis[first:last + 1].any(axis=0)
        sink_end, lo, hi = (int(x) for x in rules.kv_ranges(first, last, S))
        in_runs = (keys < sink_end) | ((keys >= lo) & (keys < hi))
        assert not (seen & ~in_runs).any(), (first, sink_end, lo, hi)
        hull_lo, hull_hi = (int(x) for x in rules.kv_range(first, last, S))
        assert not (seen & ~((keys >= hull_lo) & (keys < hull_hi))).any()
        full_lo, full_hi = (int(x) for x in rules.kv_full_range(first, last, S))
        assert vis[first:last + 1, max(full_lo, 0):max(full_hi, 0)].all()
        seeing = vis[:, first:last + 1].any(axis=1)
        q_lo, q_hi = (int(x) for x in rules.q_range(first, last, 0, S))
        assert not (seeing & ~((keys >= q_lo) & (keys < q_hi))).any(), (first, q_lo, q_hi)


@pytest.mark.parametrize("causal,window,sink_tokens", TILE_SETTINGS)
def test_mgpu_tiles_visit_the_sink_tokens(causal, window, sink_tokens):
    """The Mosaic-GPU tile ranges (mgpu_tiles) hold every visible key tile and every query tile that sees a key."""
    S, rows, block = 64, 16, 8
    rules = _tile_rules(causal, window, sink_tokens, S)
    vis = visibility(1, S, S, is_causal=causal, local_window_size=window, num_sink_tokens=sink_tokens,
                     query_offset=0)[0]
    zero, length = jnp.int32(0), jnp.int32(S)
    for start in range(0, S, rows):
        blk_lo, blk_hi = (int(x) for x in mgpu_tiles.cta_kv_blocks(rules, jnp.int32(start), rows, block, zero,
                                                                    length, length))
        tiles = np.flatnonzero(vis[start:start + rows].any(axis=0)) // block
        assert tiles.size == 0 or (blk_lo <= tiles.min() and tiles.max() < blk_hi), (start, blk_lo, blk_hi)
        blk_lo, blk_hi = (int(x) for x in mgpu_tiles.cta_q_blocks(rules, jnp.int32(start), rows, block, zero,
                                                                   length, length))
        tiles = np.flatnonzero(vis[:, start:start + rows].any(axis=1)) // block
        assert tiles.size == 0 or (blk_lo <= tiles.min() and tiles.max() < blk_hi), (start, blk_lo, blk_hi)


@pytest.mark.skipif(not on_hopper(), reason="needs a Hopper GPU to run the Mosaic-GPU kernels")
def test_mosaic_gpu_kernels_serve_sink_tokens():
    """The Mosaic-GPU forward and backward (which ask only Rules.kv_range's hull) under sink tokens, vs the oracle."""
    case = SinkCase("mosaic_window_sink_tokens", 1, 512, 512, 2, 1,
                    _kw(is_causal=True, local_window_size=(64, 0), num_sink_tokens=4), dtype="bfloat16", sinks=False)
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in ((1, 512, 2, 64), (1, 512, 1, 64),
                                                                                   (1, 512, 1, 64)))
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    rules = Rules.create(q, k, **dict(case.rules))
    out, pullback = jax.vjp(lambda q, k, v: flash_attention_mgpu.flash_attention_core(q, k, v, rules), q, k, v)
    ref = reference_attention(q, k, v, **dict(case.rules))[0]
    assert_close(out, ref, "bfloat16")
    for name, got, want in zip(("dq", "dk", "dv"), pullback(d_out),
                               reference_attention_grads(q, k, v, d_out, **dict(case.rules))):
        assert_close(got, want, "bfloat16", GRAD_TOLERANCE["bfloat16"], what=name)


# ---------------------------------------------------------------------------
# Bad inputs.

Q, KV = make_inputs(FLASH_CASES[0])[:2]
ENTRY_POINTS = {
    "dot_product_attention": lambda **kw: gqa_jax.dot_product_attention(Q, KV, KV, implementation="xla", **kw),
    "gpu.flash_attention": lambda **kw: gpu.flash_attention(Q, KV, KV, interpret=True, **kw),
    "gpu.decode_attention": lambda **kw: gpu.decode_attention(Q[:, :1], KV, KV, np.array([20, 3], np.int32),
                                                              interpret=True, **kw),
}
BAD = [
    ("sinks_shape", dict(sinks=jnp.zeros(5)), ValueError,
     r"sinks must have shape \[N\]=\(4,\), got sinks.shape=\(5,\)"),
    ("sinks_rank", dict(sinks=jnp.zeros((1, 4))), ValueError, r"sinks.shape=\(1, 4\)"),
    ("sinks_int", dict(sinks=jnp.zeros(4, jnp.int32)), TypeError, "sinks must be a floating-point array"),
    ("sink_tokens_negative", dict(local_window_size=4, num_sink_tokens=-1), ValueError, "num_sink_tokens=-1"),
    ("sink_tokens_float", dict(local_window_size=4, num_sink_tokens=2.0), TypeError, "num_sink_tokens=2.0"),
    ("sink_tokens_bool", dict(local_window_size=4, num_sink_tokens=True), TypeError, "num_sink_tokens=True"),
    ("sink_tokens_without_window", dict(is_causal=True, num_sink_tokens=2), ValueError,
     "num_sink_tokens only matters with local_window_size"),
]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=str)
@pytest.mark.parametrize("name,kwargs,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(entry, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        ENTRY_POINTS[entry](**kwargs)
