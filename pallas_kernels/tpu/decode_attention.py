"""Decode attention for TPUs (Pallas, Mosaic TPU): a few new queries against a KV cache.

``T`` new queries per row (1 to 16: single-token, speculative or chunked
decoding) attend to a cache ``[B, S, K, H]`` read in place, with per-row valid
lengths. Decoding is bound by memory bandwidth, so every needed cache byte is
read once and no other:

* GQA packing: one program reads each K/V tile once for all ``G = N // K``
  query heads and ``T`` tokens of its K/V head; those ``G*T`` query rows are
  the rows of the tile products.
* In place: the cache is read through its free ``[B, S, K*H]`` view, a K/V
  head being a 128-lane-aligned column block. When ``H`` is not a multiple of
  128 (e.g. 64), a program takes ``hb`` heads whose columns fill whole lanes,
  and the queries are laid out block-diagonally (zeros against the other
  heads' columns), so no lane shuffles are needed and no cache copy is made.
* Lengths bound the walk: tiles outside the range a row's queries can see
  (`Rules.kv_range`: length, causal, window) are neither
  computed nor copied in (the index map holds the last visited tile). Keys and
  values past the length inside the last tile are masked, values to zero, so
  stale or uninitialised cache slots never leak in (not even NaN).
* Quantized caches: int8 or float8_e4m3fn K/V tiles (half the bytes of
  bfloat16) are copied in as they are and converted in VMEM (through
  float32) to the products' dtype, the query's (float32 for float16
  queries); the logits are scaled per key after ``q . k`` and the
  probabilities per key before ``p . v``, as the GPU kernel does
  (`pallas_kernels.quantized`: float32 scales ``[B, S, K]``). The scales
  reach the kernel as tiles ``[hb, block_k]`` with the keys along lanes
  (`pallas_kernels.tpu.common.scale_tiles`: a transposed copy made before the
  call, 16 bytes per key and head against the ``H + Hv`` the kernel reads).

Grid ``(B, K // hb, kv_steps)``; float32 softmax statistics, outputs in the
input dtype, zeros for rows that see no key (``lengths == 0``). The backward
pass (decoding rarely differentiates) is the flash-attention backward with the
same rules, so gradients are correct; a quantized cache is dequantized
(float32) for it, and its scales get gradients, its values none.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.arguments import KERNEL_DTYPES, out_struct, pad_axis, round_up, row_vector
from pallas_kernels.numerics import LN2, prob_shift
from pallas_kernels.quantized import attend_dequantized, cache_vjp, check_tensors, is_quantized_dtype
from pallas_kernels.rules import Rules
from pallas_kernels.tpu.common import (
    NUM_LANES,
    NUM_SUBLANES,
    compute_dtype,
    head_rows,
    interpret_params,
    lanes,
    scale_tiles,
    scaled_logits,
    softmax_finish,
    softmax_init,
    softmax_update,
)
from pallas_kernels.tpu.flash_attention import flash_attention_core

DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiling of the TPU decode kernel.

    Attributes:
      block_k: keys per tile, a positive multiple of 128 (TPU lanes); cut to
        the cache length (rounded up to 128).
    """

    block_k: int = DEFAULT_BLOCK_K

    def __post_init__(self):
        if not isinstance(self.block_k, int) or self.block_k <= 0 or self.block_k % NUM_LANES:
            raise ValueError(f"block_k={self.block_k!r} must be a positive multiple of {NUM_LANES=}")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is fixed at trace time."""

    rules: Rules  # statics only: offsets and lengths are prefetched
    q_len: int
    block_k: int
    interpret: Any


# ---------------------------------------------------------------------------
# Public wrappers.


def decode_attention(
    query,
    key_cache,
    value_cache,
    lengths,
    *,
    scale: float | None = None,
    is_causal: bool = True,
    query_offset=None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    key_scale=None,
    value_scale=None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
):
    """Attention of a few new queries per row to a KV cache on TPUs (Pallas, Mosaic TPU).

    Query ``t`` of row ``b`` sits at ``lengths[b] - T + t`` (the newest ``T``
    tokens, already written to the cache) unless ``query_offset`` says
    otherwise; keys ``s < lengths[b]`` are valid. The rules are validated by
    `pallas_kernels.rules.Rules.create`. Differentiable (the backward is
    `flash_attention`'s).

    Args:
      query: ``[B, T, N, H]``, ``T`` small (1 to 16).
      key_cache: ``[B, S, K, H]`` with ``N % K == 0``, the query's dtype
        (bfloat16, float16 or float32), or int8 / float8_e4m3fn with
        ``key_scale`` (a quantized cache); read in place.
      value_cache: ``[B, S, K, Hv]``, the key cache's dtype.
      lengths: int scalar or ``[B]`` valid keys per row, in ``[0, S]``; 0
        gives zeros.
      scale: logit scale, default ``1/sqrt(H)``.
      is_causal: queries see keys at positions up to their own.
      query_offset: int or int ``[B]`` position of query 0 of each row.
      local_window_size: int or ``(left, right)`` window around each query.
      logits_soft_cap: positive cap, or None.
      key_scale: float ``[B, S, K]`` scales of a quantized key cache: key
        ``s`` is ``key_cache[b, s, k] * key_scale[b, s, k]``.
      value_scale: float ``[B, S, K]`` scales of a quantized value cache.
      block_sizes: `DecodeBlockSizes`; default ``block_k=512``.
      interpret: False (compiled for TPU), True (``pltpu.InterpretParams()``)
        or a ``pltpu.InterpretParams``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype. A quantized cache gets gradients
      for its scales only.

    Raises:
      ValueError, TypeError: for inconsistent shapes, dtypes or arguments, or
        a quantized cache without both scales.
    """
    query, key_cache, value_cache = jnp.asarray(query), jnp.asarray(key_cache), jnp.asarray(value_cache)
    key_scale, value_scale = check_tensors(query, key_cache, value_cache, key_scale, value_scale,
                                           names=("query", "key_cache", "value_cache"), dtypes=KERNEL_DTYPES)
    B = query.shape[0]
    if lengths is None:
        raise ValueError(f"lengths must be an int [B]=({B},) array of valid keys per row, got {lengths=}")
    rules = Rules.create(
        query, key_cache, scale=scale, is_causal=is_causal, query_offset=query_offset,
        key_value_seq_lengths=row_vector("lengths", lengths, B), local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
    )
    return decode_attention_core(query, key_cache, value_cache, rules, key_scale=key_scale, value_scale=value_scale,
                                 block_sizes=block_sizes, interpret=interpret)


def decode_attention_core(query, key_cache, value_cache, rules: Rules, *, key_scale=None, value_scale=None,
                          block_sizes: DecodeBlockSizes | None = None,
                          interpret: bool | pltpu.InterpretParams = False):
    """`decode_attention` on checked inputs: ``rules`` from `Rules.create` (no query lengths or segments).

    Args:
      query: ``[B, T, N, H]``.
      key_cache: ``[B, S, K, H]``.
      value_cache: ``[B, S, K, Hv]``.
      rules: the validated rules; ``kv_len`` None means every row holds ``S`` keys.
      key_scale, value_scale: float32 ``[B, S, K]`` for a quantized cache, else None.
      block_sizes: `DecodeBlockSizes`; default ``block_k=512``.
      interpret: as in `decode_attention`.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype.
    """
    if rules.q_len is not None or rules.has_segments:
        raise ValueError("decode_attention serves neither query_seq_lengths nor segment ids; use flash_attention")
    T, H = query.shape[1], query.shape[3]
    S = key_cache.shape[1]
    rules = dataclasses.replace(rules, kv_len=jnp.clip(rules.lengths(T, S)[1], 0, S))
    st = _Static(
        rules=rules.statics(),
        q_len=T,
        block_k=min((block_sizes or DecodeBlockSizes()).block_k, round_up(S, NUM_LANES)),
        interpret=interpret_params(interpret),
    )
    dtype = compute_dtype(query.dtype)
    q, k, v = query.astype(dtype), key_cache, value_cache
    if key_scale is None:  # a quantized cache stays as it is: its tiles are converted in VMEM
        k, v = k.astype(dtype), v.astype(dtype)
    Hv = v.shape[3]
    if _heads_per_tile(k.shape[2], H, Hv) is None:
        # Head dims such as 80 fill no whole lane block: pad them (a copy of the cache).
        q, k = pad_axis(q, 3, round_up(H, NUM_LANES)), pad_axis(k, 3, round_up(H, NUM_LANES))
        v = pad_axis(v, 3, round_up(Hv, NUM_LANES))
    return _decode(st, q, k, v, key_scale, value_scale, rules)[..., :Hv].astype(query.dtype)


# ---------------------------------------------------------------------------
# Differentiable core.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(st: _Static, q, k, v, key_scale, value_scale, rules: Rules):
    return _forward(st, q, k, v, key_scale, value_scale, rules.kv_len, rules.q_offset)


def _decode_fwd(st: _Static, q, k, v, key_scale, value_scale, rules):
    return _decode(st, q, k, v, key_scale, value_scale, rules), (q, k, v, key_scale, value_scale, rules)


def _decode_bwd(st: _Static, residuals, d_out):
    q, k, v, key_scale, value_scale, rules = residuals
    return (*cache_vjp(flash_on_cache(rules, st.interpret), q, k, v, key_scale, value_scale, d_out), None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def flash_on_cache(rules: Rules, interpret):
    """``attend(q, k, v, key_scale, value_scale)``: the TPU flash kernel over a decode call's cache.

    What the TPU decode kernels' backward passes differentiate
    (`pallas_kernels.quantized.attend_dequantized`: a quantized cache is
    dequantized in float32 for it).
    """

    def flash(q, k, v):
        return flash_attention_core(q, k, v, rules, interpret=interpret)

    return functools.partial(attend_dequantized, flash)


# ---------------------------------------------------------------------------
# pallas_call builder.


def _forward(st: _Static, q, k, v, key_scale, value_scale, lengths, q_off):
    B, T, N, H = q.shape
    _, S, K, Hv = v.shape
    G, hb = N // K, _heads_per_tile(K, H, Hv)
    C, R = K // hb, hb * G * T
    R_pad = round_up(R, NUM_SUBLANES * 4 // q.dtype.itemsize)  # whole (8, 128) 32-bit or (16, 128) 16-bit tiles
    # Query rows (head in tile i, group g, token t); columns (head in tile i', h), zero unless i == i'.
    q6 = q.reshape(B, T, C, hb, G, H).transpose(0, 2, 3, 4, 1, 5)  # [B, C, hb, G, T, H]
    q_rows = jnp.einsum("bcigth,ij->bcigtjh", q6, jnp.eye(hb, dtype=q.dtype)).reshape(B, C, R, hb * H)
    q_rows = pad_axis(q_rows, 2, R_pad)
    row_t = jnp.broadcast_to(pad_axis(jnp.tile(jnp.arange(T, dtype=jnp.int32), hb * G), 0, R_pad)[:, None],
                             (R_pad, NUM_LANES))
    num_tiles = pl.cdiv(S, st.block_k)

    def kv_index(b, c, j, len_ref, off_ref):
        return b, _visit(st, off_ref[b], len_ref[b], j, num_tiles)[0], c

    def scale_index(b, c, j, len_ref, off_ref):
        return b, c, _visit(st, off_ref[b], len_ref[b], j, num_tiles)[0], 0, 0

    scales = () if key_scale is None else tuple(scale_tiles(x, hb, st.block_k) for x in (key_scale, value_scale))
    out = pl.pallas_call(
        functools.partial(_decode_kernel, st=st, rows_per_head=G * T),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, C, num_tiles),
            in_specs=[
                pl.BlockSpec((R_pad, NUM_LANES), lambda b, c, j, *_: (0, 0)),
                pl.BlockSpec((None, None, R_pad, hb * H), lambda b, c, j, *_: (b, c, 0, 0)),
                pl.BlockSpec((None, st.block_k, hb * H), kv_index),
                pl.BlockSpec((None, st.block_k, hb * Hv), kv_index),
                # A quantized cache's key and value scales: the tile's keys along lanes, one row per head.
                *[pl.BlockSpec((None, None, None, hb, st.block_k), scale_index)] * len(scales),
            ],
            out_specs=pl.BlockSpec((None, None, R_pad, hb * Hv), lambda b, c, j, *_: (b, c, 0, 0)),
            scratch_shapes=[pltpu.VMEM((R_pad, NUM_LANES), jnp.float32), pltpu.VMEM((R_pad, NUM_LANES), jnp.float32),
                            pltpu.VMEM((R_pad, hb * Hv), jnp.float32)],
        ),
        out_shape=out_struct((B, C, R_pad, hb * Hv), q.dtype, q, k, v, scales, lengths, q_off),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="gqa_decode_attention",
    )(lengths, q_off, row_t, q_rows, k.reshape(B, S, K * H), v.reshape(B, S, K * Hv), *scales)
    # Keep each row's own head columns: [B, C, hb, G, T, hb, Hv] -> diagonal over the two hb axes.
    out = jnp.diagonal(out[:, :, :R].reshape(B, C, hb, G, T, hb, Hv), axis1=2, axis2=5)  # [B, C, G, T, Hv, hb]
    return out.transpose(0, 3, 1, 5, 2, 4).reshape(B, T, N, Hv)


# ---------------------------------------------------------------------------
# Kernel body.


def _decode_kernel(len_ref, off_ref, row_t_ref, q_ref, k_ref, v_ref, *refs, st: _Static, rows_per_head: int):
    # A quantized cache brings its key and value scale tiles [hb, block_k] before the output and scratch refs.
    scale_refs, (o_ref, m_ref, l_ref, acc_ref) = (refs[:2], refs[2:]) if is_quantized_dtype(k_ref.dtype) else (
        (), refs)
    b, j = pl.program_id(0), pl.program_id(2)
    length, q_off = len_ref[b], off_ref[b]
    tile, run, lo, hi = _visit(st, q_off, length, j, pl.num_programs(2))

    @pl.when(j == 0)
    def _init():
        softmax_init(m_ref, l_ref, acc_ref)

    @pl.when(run)
    def _compute():
        scales = tuple(ref[...] for ref in scale_refs) or (None, None)
        attend_keys(st.rules, q_ref[...], k_ref[...], v_ref[...], *scales, row_t_ref[...], m_ref, l_ref, acc_ref,
                    rows_per_head=rows_per_head, k_start=tile * st.block_k, q_off=q_off, lo=lo, hi=hi)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        out, _ = softmax_finish(m_ref, l_ref, acc_ref)
        o_ref[...] = out.astype(o_ref.dtype)


def attend_keys(rules: Rules, q, k, v, key_scale, value_scale, row_t, m_ref, l_ref, acc_ref, *, rows_per_head: int,
                k_start, q_off, lo, hi) -> None:
    """One online-softmax step of the TPU decode kernels over the keys ``[k_start, k_start + block_k)``.

    Keys outside ``[lo, hi)`` or hidden from a row by the rules are masked:
    logits ``-inf``, values (and value scales) zero, so stale cache slots or
    buffer slots never leak in (not even NaN).

    Args:
      rules: the call's static rules.
      q: ``[R_pad, W]`` query rows, in the products' dtype; rows head-major,
        ``rows_per_head`` per K/V head.
      k: ``[block_k, W]`` keys, the query's dtype or int8 / float8 (a
        quantized tile, converted here through float32: the conversion Mosaic
        has for those).
      v: ``[block_k, Wv]`` values, likewise.
      key_scale, value_scale: float32 ``[hb, block_k]`` per-key scales of a
        quantized tile's ``hb`` heads, else None.
      row_t: ``[R_pad, 128]`` token index of each query row, lane-replicated.
      m_ref, l_ref, acc_ref: the running softmax statistics and output.
      rows_per_head: query rows per K/V head, ``G * T``.
      k_start: position of the tile's first key.
      q_off: position of the row's first query.
      lo, hi: the keys ``[lo, hi)`` any query of the row sees.
    """
    if k.dtype != q.dtype:
        k = k.astype(jnp.float32).astype(q.dtype)
    if key_scale is not None:
        key_scale = head_rows(key_scale, rows_per_head, q.shape[0])
    s, _ = scaled_logits(q, k, rules.scale, rules.soft_cap, key_scale=key_scale)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    mask = (k_pos >= lo) & (k_pos < hi)
    positional = rules.visible(q_off + lanes(row_t, s.shape[1]), k_pos)
    if positional is not None:
        mask &= positional
    s = jnp.where(mask, s, -jnp.inf)
    v_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
    # Selected in float32: 32-bit masks and values share one layout on every TPU generation.
    v = jnp.where((v_pos >= lo) & (v_pos < hi), v.astype(jnp.float32), 0.0).astype(q.dtype)
    if value_scale is not None:
        value_scale = jnp.where(mask, head_rows(value_scale, rows_per_head, q.shape[0]), 0.0)
    # Weights <= 2**-PROB_SHIFT: the float32 sum of p * v cannot overflow, nor that of (p * scale) . v for
    # dequantized values up to the float32 maximum.
    softmax_update(s, v, m_ref, l_ref, acc_ref, shift=prob_shift(v.dtype) * LN2, value_scale=value_scale)


# ---------------------------------------------------------------------------
# Tile helpers.


def _heads_per_tile(num_kv_heads: int, head_dim: int, value_head_dim: int) -> int | None:
    """K/V heads per program: the fewest whose columns are whole 128-lane blocks, else all K if they
    fit in one lane block (a full-width block is always a legal tile), else None."""
    for hb in range(1, num_kv_heads + 1):
        if num_kv_heads % hb == 0 and (hb * head_dim) % NUM_LANES == 0 and (hb * value_head_dim) % NUM_LANES == 0:
            return hb
    if num_kv_heads * max(head_dim, value_head_dim) <= NUM_LANES:
        return num_kv_heads
    return None


def _visit(st: _Static, q_off, length, step, num_tiles: int):
    """Key tile visited at ``step``, whether it is computed, and the keys ``[lo, hi)`` any query sees."""
    lo, hi = st.rules.kv_range(q_off, q_off + st.q_len - 1, length)
    hi = jnp.maximum(hi, lo)
    # lax.div truncates; both are >= 0 here (jnp's // lowers through `sign`, which Mosaic
    # lowers per TPU generation and so cannot be exported without a TPU).
    first, end = jax.lax.div(lo, st.block_k), jax.lax.div(hi + st.block_k - 1, st.block_k)
    tile = first + jnp.minimum(step, jnp.maximum(end - first - 1, 0))
    return jnp.clip(tile, 0, num_tiles - 1), first + step < end, lo, hi
