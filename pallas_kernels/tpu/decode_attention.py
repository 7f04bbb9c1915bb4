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
  (`pallas_kernels.masking.kv_range`: length, causal, window) are neither
  computed nor copied in (the index map holds the last visited tile). Keys and
  values past the length inside the last tile are masked, values to zero, so
  stale or uninitialised cache slots never leak in (not even NaN).

Grid ``(B, K // hb, kv_steps)``; float32 softmax statistics, outputs in the
input dtype, zeros for rows that see no key (``lengths == 0``). The backward
pass (decoding rarely differentiates) is the flash-attention backward with the
same rules, so gradients are correct.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.masking import kv_range, visible
from pallas_kernels.arguments import (
    check_qkv,
    check_scale,
    check_soft_cap,
    pad_axis,
    round_up,
    row_vector,
    window_pair,
)
from pallas_kernels.tpu.common import (
    NUM_LANES,
    NUM_SUBLANES,
    compute_dtype,
    interpret_params,
    lanes,
    scaled_logits,
    softmax_finish,
    softmax_init,
    softmax_update,
)
from pallas_kernels.tpu.flash_attention import flash_attention

DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    causal: bool
    window: tuple[int, int] | None
    soft_cap: float | None
    q_len: int
    block_k: int
    interpret: Any


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
    lo, hi = kv_range(q_off, q_off + st.q_len - 1, causal=st.causal, window=st.window, kv_len=length)
    hi = jnp.maximum(hi, lo)
    # lax.div truncates; both are >= 0 here (jnp's // lowers through `sign`, which Mosaic
    # lowers per TPU generation and so cannot be exported without a TPU).
    first, end = jax.lax.div(lo, st.block_k), jax.lax.div(hi + st.block_k - 1, st.block_k)
    tile = first + jnp.minimum(step, jnp.maximum(end - first - 1, 0))
    return jnp.clip(tile, 0, num_tiles - 1), first + step < end, lo, hi


def _decode_kernel(len_ref, off_ref, row_t_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, st: _Static):
    b, j = pl.program_id(0), pl.program_id(2)
    length, q_off = len_ref[b], off_ref[b]
    tile, run, lo, hi = _visit(st, q_off, length, j, pl.num_programs(2))
    k_start = tile * st.block_k

    @pl.when(j == 0)
    def _init():
        softmax_init(m_ref, l_ref, acc_ref)

    @pl.when(run)
    def _compute():
        s, _ = scaled_logits(q_ref[...], k_ref[...], st.scale, st.soft_cap)
        k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = k_pos < length
        rules = visible(q_off + lanes(row_t_ref[...], s.shape[1]), k_pos, causal=st.causal, window=st.window)
        if rules is not None:
            mask &= rules
        s = jnp.where(mask, s, -jnp.inf)
        v = v_ref[...]
        # Values no query sees become zeros: stale cache slots (even NaN) never leak in.
        v_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
        v_valid = (v_pos >= lo) & (v_pos < hi)
        # Selected in float32: 32-bit masks and values share one layout on every TPU generation.
        v = jnp.where(v_valid, v.astype(jnp.float32), 0.0).astype(v.dtype)
        softmax_update(s, v, m_ref, l_ref, acc_ref)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        out, _ = softmax_finish(m_ref, l_ref, acc_ref)
        o_ref[...] = out.astype(o_ref.dtype)


def _forward(st: _Static, q, k, v, lengths, q_off):
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

    out = pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, C, num_tiles),
            in_specs=[
                pl.BlockSpec((R_pad, NUM_LANES), lambda b, c, j, *_: (0, 0)),
                pl.BlockSpec((None, None, R_pad, hb * H), lambda b, c, j, *_: (b, c, 0, 0)),
                pl.BlockSpec((None, st.block_k, hb * H), kv_index),
                pl.BlockSpec((None, st.block_k, hb * Hv), kv_index),
            ],
            out_specs=pl.BlockSpec((None, None, R_pad, hb * Hv), lambda b, c, j, *_: (b, c, 0, 0)),
            scratch_shapes=[pltpu.VMEM((R_pad, NUM_LANES), jnp.float32), pltpu.VMEM((R_pad, NUM_LANES), jnp.float32),
                            pltpu.VMEM((R_pad, hb * Hv), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((B, C, R_pad, hb * Hv), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="gqa_decode",
    )(lengths, q_off, row_t, q_rows, k.reshape(B, S, K * H), v.reshape(B, S, K * Hv))
    # Keep each row's own head columns: [B, C, hb, G, T, hb, Hv] -> diagonal over the two hb axes.
    out = jnp.diagonal(out[:, :, :R].reshape(B, C, hb, G, T, hb, Hv), axis1=2, axis2=5)  # [B, C, G, T, Hv, hb]
    return out.transpose(0, 3, 1, 5, 2, 4).reshape(B, T, N, Hv)


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
    block_k: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
):
    """Attention of a few new queries per row to a KV cache on TPUs (Pallas, Mosaic TPU).

    Query ``t`` of row ``b`` sits at ``lengths[b] - T + t`` (the newest ``T``
    tokens, already written to the cache) unless ``query_offset`` says
    otherwise; keys ``s < lengths[b]`` are valid. Differentiable (the backward
    is `flash_attention`'s).

    Args:
      query: ``[B, T, N, H]``, ``T`` small (1 to 16).
      key_cache: ``[B, S, K, H]`` with ``N % K == 0``; read in place.
      value_cache: ``[B, S, K, Hv]``.
      lengths: int ``[B]`` valid keys per row; clamped to ``[0, S]``; 0 gives
        zeros.
      scale: logit scale, default ``1/sqrt(H)``.
      is_causal: queries see keys at positions up to their own.
      query_offset: int or int ``[B]`` position of query 0 of each row.
      local_window_size: int or ``(left, right)`` window around each query.
      logits_soft_cap: positive cap, or None.
      block_k: keys per tile (a multiple of 128), default 512 (TPU only; the
        GPU twin chooses its own).
      interpret: False (compiled for TPU), True (``pltpu.InterpretParams()``)
        or a ``pltpu.InterpretParams``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype.

    Raises:
      ValueError, TypeError: for inconsistent shapes, dtypes or arguments.
    """
    query, key_cache, value_cache = jnp.asarray(query), jnp.asarray(key_cache), jnp.asarray(value_cache)
    check_qkv(query, key_cache, value_cache, names=("query", "key_cache", "value_cache"))
    B, T, _, H = query.shape
    S = key_cache.shape[1]
    if lengths is None:
        raise ValueError(f"lengths must be an int [B]=({B},) array of valid keys per row, got {lengths=}")
    lengths = jnp.clip(row_vector("lengths", lengths, B, S), 0, S)
    q_off = lengths - T if query_offset is None else row_vector("query_offset", query_offset, B, 0)
    block_k = DEFAULT_BLOCK_K if block_k is None else block_k
    if not isinstance(block_k, int) or block_k <= 0 or block_k % NUM_LANES:
        raise ValueError(f"{block_k=} must be a positive multiple of {NUM_LANES=}")
    st = _Static(
        scale=check_scale(scale, H),
        causal=bool(is_causal),
        window=window_pair(local_window_size),
        soft_cap=check_soft_cap(logits_soft_cap),
        q_len=T,
        block_k=min(block_k, round_up(S, NUM_LANES)),
        interpret=interpret_params(interpret),
    )
    dtype = compute_dtype(query.dtype)
    q, k, v = query.astype(dtype), key_cache.astype(dtype), value_cache.astype(dtype)
    Hv = v.shape[3]
    if _heads_per_tile(k.shape[2], H, Hv) is None:
        # Head dims such as 80 fill no whole lane block: pad them (a copy of the cache).
        q, k = pad_axis(q, 3, round_up(H, NUM_LANES)), pad_axis(k, 3, round_up(H, NUM_LANES))
        v = pad_axis(v, 3, round_up(Hv, NUM_LANES))
    return _decode(st, q, k, v, lengths, q_off)[..., :Hv].astype(query.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(st: _Static, q, k, v, lengths, q_off):
    return _forward(st, q, k, v, lengths, q_off)


def _decode_fwd(st: _Static, q, k, v, lengths, q_off):
    return _forward(st, q, k, v, lengths, q_off), (q, k, v, lengths, q_off)


def _decode_bwd(st: _Static, residuals, do):
    q, k, v, lengths, q_off = residuals
    _, vjp = jax.vjp(
        lambda q, k, v: flash_attention(
            q, k, v, scale=st.scale, is_causal=st.causal, query_offset=q_off, key_value_seq_lengths=lengths,
            local_window_size=st.window, logits_soft_cap=st.soft_cap, interpret=st.interpret),
        q, k, v)
    return (*vjp(do), None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)
