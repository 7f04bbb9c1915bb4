"""Flash attention, forward and backward, for TPUs (Pallas, Mosaic TPU), with grouped K/V heads.

Semantics are those of `gqa_jax.dot_product_attention`: positions, default
query offsets, causal/window/length/segment rules (`pallas_kernels.rules.Rules`),
the soft cap on the scaled logits before the bias, and zeros (never NaN) for
rows that see no key, in outputs and gradients.

Three kernels, each a ``pl.pallas_call`` with a ``PrefetchScalarGridSpec``:

* forward, grid ``(B, N, q_blocks, kv_steps)``: online softmax over key tiles;
  query head ``n`` reads K/V head ``n // G`` straight from its block index
  map, so K/V are never repeated to N heads.
* dQ, grid ``(B, N, q_blocks, kv_steps)``: the same walk, accumulating dQ.
* dK/dV, grid ``(B, K, kv_blocks, G, q_steps)``: the G query heads of a K/V
  head and the query tiles are the two innermost ("arbitrary") axes, so dK
  and dV of a K/V tile accumulate over every query head of its group in VMEM
  and are written once.

Fully masked tiles are skipped, and not even copied in: per (row, tile) the
wrapper computes the contiguous range of tiles on the other axis that hold a
visible pair (causal, window, lengths, segment id ranges) and prefetches its
start and count to SMEM. Step ``j`` of the inner axis visits tile
``start + j``; steps past the count re-map to the last visited tile (the
pipeline sees an unchanged block index and copies nothing) and do no work.
Tiles wholly inside the visible region skip the element mask too.

TPU tiling: query and key tiles are multiples of 128 rows; head dims that are
64 or a multiple of 128 are used as they are, other head dims are zero-padded
to a multiple of 128. With head dims that are multiples of 128 the kernels
read ``[B, T, N*H]`` views of the BTNH arrays (no transposes); with 64 they
read ``[B, N, T, H]`` transposes. Sequences of any length are zero-padded to
whole tiles and the padding is masked as invalid positions. float16 inputs run
in float32; bfloat16 and float32 run natively with float32 softmax statistics.

Numerics (`pallas_kernels.numerics`): masked logits are ``-inf`` and running
maxima start at the lowest finite float32, so a finite bias of any size acts
as a bias; the running max carries the shift ``PROB_SHIFT * ln 2``, so the
float32 accumulator of ``p @ v`` cannot overflow. The forward keeps the row
statistics ``(m, log(l))`` apart; the backward takes their sum (the
log-sum-exp) without a bias and the pair with one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.arguments import check_bias, check_qkv, out_struct, pad_axis, round_up
from pallas_kernels.numerics import LN2, PROB_SHIFT
from pallas_kernels.residuals import forward_only, from_tpu
from pallas_kernels.rules import Rules
from pallas_kernels.tpu.common import (
    NUM_LANES,
    NUM_SUBLANES,
    NT_DIMS,
    compute_dtype,
    dot,
    interpret_params,
    lanes,
    scaled_logits,
    softmax_finish,
    softmax_init,
    softmax_update,
)

# Head dims served without padding (besides multiples of 128).
NATIVE_SMALL_HEAD_DIMS = (64,)
_INT32_MAX = jnp.iinfo(jnp.int32).max
_INT32_MIN = jnp.iinfo(jnp.int32).min
# The weight shift in natural units: the kernels compute in bfloat16 or float32, never float16.
_SHIFT = PROB_SHIFT * LN2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes, in queries and keys, of the forward and the two backward kernels.

    Every size is a positive multiple of 128 (TPU lanes). Sizes larger than a
    sequence are cut to it (rounded up to 128) by `fit`. Defaults are untuned.

    Attributes:
      block_q: query rows per forward tile.
      block_k: keys per forward tile.
      block_q_bwd: query rows per dQ and dK/dV tile.
      block_k_bwd: keys per dQ and dK/dV tile.
    """

    block_q: int = 512
    block_k: int = 512
    block_q_bwd: int = 256
    block_k_bwd: int = 512

    def __post_init__(self):
        for field in dataclasses.fields(self):
            size = getattr(self, field.name)
            if not isinstance(size, int) or size <= 0 or size % NUM_LANES:
                raise ValueError(f"{field.name}={size!r} must be a positive multiple of {NUM_LANES=}")

    def fit(self, q_len: int, kv_len: int) -> BlockSizes:
        """These sizes cut down to sequences of ``q_len`` queries and ``kv_len`` keys."""
        q_cap, k_cap = round_up(max(q_len, 1), NUM_LANES), round_up(max(kv_len, 1), NUM_LANES)
        return BlockSizes(
            block_q=min(self.block_q, q_cap),
            block_k=min(self.block_k, k_cap),
            block_q_bwd=min(self.block_q_bwd, q_cap),
            block_k_bwd=min(self.block_k_bwd, k_cap),
        )


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is fixed at trace time."""

    rules: Rules  # statics only: the per-row values are the prefetched `rows`
    num_groups: int
    heads_minor: bool  # kernel arrays are [B, T, N*H] (else [B, N, T, H])
    head_dim: int  # H and Hv of the kernel arrays (after padding)
    value_head_dim: int
    compute_dtype: Any  # what float16 inputs run in (float32); others as they are
    segments: bool
    maybe_masked: bool  # some tile may need the element mask (else none does)
    blocks: BlockSizes
    interpret: Any


# ---------------------------------------------------------------------------
# Public wrappers.


def _kernel_head_dim(h: int) -> int:
    return h if h in NATIVE_SMALL_HEAD_DIMS or h % NUM_LANES == 0 else round_up(h, NUM_LANES)


def flash_attention(
    query,
    key,
    value,
    *,
    bias=None,
    scale: float | None = None,
    is_causal: bool = False,
    query_offset=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
    return_residuals: bool = False,
):
    """Flash attention with grouped key/value heads on TPUs (Pallas, Mosaic TPU).

    Semantics are those of `gqa_jax.dot_product_attention`: query ``t`` of row
    ``b`` sits at ``query_offset[b] + t`` (default 0 when ``T == S``, else
    bottom-right), key ``s`` at ``s``; ``logits = cap*tanh(scale*q.k/cap) + bias``;
    rows that see no key give zeros. Differentiable (``jax.custom_vjp`` with
    Pallas backward kernels); the bias gets a gradient only when it is being
    differentiated.

    Args:
      query: ``[B, T, N, H]`` (bfloat16, float32; float16 runs in float32).
      key: ``[B, S, K, H]`` with ``N % K == 0``.
      value: ``[B, S, K, Hv]``.
      bias: optional float bias ``[B|1, N|1, T|1, S|1]`` added to the logits.
      scale: logit scale, default ``1/sqrt(H)``.
      is_causal: keys at positions up to the query's own.
      query_offset: int or int ``[B]``: position of query 0 of each row (used
        with ``is_causal`` or ``local_window_size``).
      query_seq_lengths: int ``[B]`` valid queries; the others output zeros.
      key_value_seq_lengths: int ``[B]`` valid keys.
      q_segment_ids: int ``[B, T]`` packed-sequence ids of the queries.
      kv_segment_ids: int ``[B, S]`` ids of the keys.
      local_window_size: int or ``(left, right)``: a query at position ``p``
        sees keys in ``[p - left, p + right]``.
      logits_soft_cap: positive cap, or None.
      block_sizes: `BlockSizes`; default ``BlockSizes()``.
      interpret: False (compiled for TPU), True (TPU interpret mode on any
        backend, ``pltpu.InterpretParams()``) or a ``pltpu.InterpretParams``.
      return_residuals: also return the log-sum-exp (`pallas_kernels.residuals`:
        natural log, float32 ``[B, N, T]``, ``-inf`` for rows that see no key);
        forward only.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, or ``(out, lse)``.

    Raises:
      ValueError, TypeError: for inconsistent shapes, dtypes or arguments.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    check_qkv(query, key, value)
    rules = Rules.create(
        query, key, scale=scale, is_causal=is_causal, query_offset=query_offset,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
    )
    B, T, N, _ = query.shape
    if bias is not None:
        bias = check_bias("bias", bias, B, N, T, key.shape[1])
    return flash_attention_core(query, key, value, rules, bias=bias, block_sizes=block_sizes, interpret=interpret,
                                return_residuals=return_residuals)


def flash_attention_core(query, key, value, rules: Rules, *, bias=None, block_sizes: BlockSizes | None = None,
                         interpret: bool | pltpu.InterpretParams = False, return_residuals: bool = False):
    """`flash_attention` on checked inputs: ``rules`` from `Rules.create`, bias of rank 4 or None.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      rules: the validated rules of the call.
      bias: None or float ``[B|1, N|1, T|1, S|1]``.
      block_sizes: `BlockSizes`; default ``BlockSizes()``.
      interpret: as in `flash_attention`.
      return_residuals: also return the natural log-sum-exp ``[B, N, T]`` (forward only).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, or ``(out, lse)``.
    """
    B, T, N, _ = query.shape
    Hv = value.shape[3]
    st, rows, T_pad, S_pad = _setup(query, key, value, rules, block_sizes, interpret)
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (T, key.shape[1]))
        bias = pad_axis(pad_axis(bias, 2, T_pad), 3, S_pad)
    q, k, v = (_prepare(st, query, T_pad, st.head_dim), _prepare(st, key, S_pad, st.head_dim),
               _prepare(st, value, S_pad, st.value_head_dim))
    if return_residuals:
        out, (m, log_l) = _forward(st, *forward_only((q, k, v, bias)), rows)
        out = _from_kernel_layout(out, st.heads_minor, N)[:, :T, :, :Hv].astype(query.dtype)
        return out, from_tpu(m + log_l)[:, :, :T]
    out = _flash(st, q, k, v, bias, rows)
    return _from_kernel_layout(out, st.heads_minor, N)[:, :T, :, :Hv].astype(query.dtype)


def flash_backward(query, key, value, out, lse, d_out, rules: Rules, *, block_sizes: BlockSizes | None = None,
                   interpret: bool | pltpu.InterpretParams = False):
    """Gradients of flash attention (no bias) from an output and its log-sum-exp, as ring attention needs them.

    ``out`` and ``lse`` may come from attention over more keys than ``key``
    holds (partial results merged by their lse): the gradients are then this
    block's share, ``dq`` summing over blocks and ``dk``/``dv`` exact for it.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      out: ``[B, T, N, Hv]`` forward output.
      lse: float32 ``[B, N, T]``, the residual API's (`pallas_kernels.residuals`:
        natural log, ``-inf`` for rows that see no key).
      d_out: ``[B, T, N, Hv]`` cotangent of ``out``.
      rules: the validated rules of the forward (`Rules.create`).
      block_sizes: `BlockSizes`; default ``BlockSizes()``.
      interpret: as in `flash_attention`.

    Returns:
      ``(dq, dk, dv)`` in the dtypes of ``query``, ``key`` and ``value``.
    """
    B, T, N, H = query.shape
    _, S, K, Hv = value.shape
    st, rows, T_pad, S_pad = _setup(query, key, value, rules, block_sizes, interpret)
    q, k, v = (_prepare(st, query, T_pad, st.head_dim), _prepare(st, key, S_pad, st.head_dim),
               _prepare(st, value, S_pad, st.value_head_dim))
    o, do = (_prepare(st, x.astype(query.dtype), T_pad, st.value_head_dim) for x in (out, d_out))
    # The kernels' convention: ``+inf`` for rows that see no key (padding rows too).
    m = jnp.pad(jnp.where(jnp.isneginf(lse), jnp.inf, lse).astype(jnp.float32), ((0, 0), (0, 0), (0, T_pad - T)),
                constant_values=jnp.inf)
    dq, dk, dv, _ = _backward(st, q, k, v, None, rows, o, (m, jnp.zeros_like(m)), do, False)
    crop = lambda x, heads, length, head_dim, like: (
        _from_kernel_layout(x, st.heads_minor, heads)[:, :length, :, :head_dim].astype(like.dtype))
    return crop(dq, N, T, H, query), crop(dk, K, S, H, key), crop(dv, K, S, Hv, value)


def _setup(query, key, value, rules: Rules, block_sizes: BlockSizes | None, interpret):
    """The statics, padded per-row rules and padded lengths ``(st, rows, T_pad, S_pad)`` of a call."""
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    Hv = value.shape[3]
    blocks = (block_sizes or BlockSizes()).fit(T, S)
    T_pad = round_up(T, math.lcm(blocks.block_q, blocks.block_q_bwd))
    S_pad = round_up(S, math.lcm(blocks.block_k, blocks.block_k_bwd))
    rows = rules.padded(T, S, T_pad, S_pad)
    rows = dataclasses.replace(rows, q_len=jnp.clip(rows.q_len, 0, T), kv_len=jnp.clip(rows.kv_len, 0, S))
    H_pad, Hv_pad = _kernel_head_dim(H), _kernel_head_dim(Hv)
    st = _Static(
        rules=rules.statics(),
        num_groups=N // K,
        heads_minor=H_pad % NUM_LANES == 0 and Hv_pad % NUM_LANES == 0,
        head_dim=H_pad,
        value_head_dim=Hv_pad,
        compute_dtype=compute_dtype(query.dtype),
        segments=rules.has_segments,
        maybe_masked=(rules.positional or rules.q_len is not None or rules.kv_len is not None
                      or T_pad != T or S_pad != S),
        blocks=blocks,
        interpret=interpret_params(interpret),
    )
    return st, rows, T_pad, S_pad


def _prepare(st: _Static, x_BTNH, length: int, head_dim: int):
    """A ``[B, T, N, H]`` array in the compute dtype, zero-padded to ``length`` and ``head_dim``, in kernel layout."""
    x = pad_axis(pad_axis(x_BTNH.astype(st.compute_dtype), 1, length), 3, head_dim)
    return _to_kernel_layout(x, st.heads_minor)


# ---------------------------------------------------------------------------
# Differentiable core on kernel-layout arrays.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, bias, rows: Rules):
    return _forward(st, q, k, v, bias, rows)[0]


def _primal_values(tree):
    return jax.tree.map(lambda x: x.value, tree, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))


def _flash_fwd(st: _Static, q, k, v, bias, rows):
    # With symbolic zeros every argument arrives as CustomVJPPrimal(value, perturbed):
    # the bias gradient (a [B, N, T, S] array) is only computed when the bias is differentiated.
    dbias_wanted = bias is not None and bias.perturbed
    q, k, v, bias, rows = _primal_values((q, k, v, bias, rows))
    out, stats = _forward(st, q, k, v, bias, rows)
    # The bias appears twice when its gradient is wanted: the pytree structure carries the flag.
    return out, (q, k, v, bias, rows, out, stats, bias if dbias_wanted else None)


def _flash_bwd(st: _Static, residuals, do):
    q, k, v, bias, rows, out, stats, dbias_wanted = residuals
    if isinstance(do, SymbolicZero):
        do = jnp.zeros(do.shape, do.dtype)
    dq, dk, dv, dbias = _backward(st, q, k, v, bias, rows, out, stats, do, dbias_wanted is not None)
    return dq, dk, dv, dbias, None


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------
# pallas_call builders: visit tables, layouts and the three calls.


def _q_major_call(st: _Static, kernel, name: str, rows: Rules, q, k, v, bias, *, block_q: int, block_k: int,
                  dense: bool, extra_specs, extra_args, out_specs, out_shape, scratch):
    """A pallas_call on grid ``(B, N, q_tiles, kv_steps)``: the forward and dQ kernels.

    Inputs: prefetched rows and visit tables, then q, k, v, bias, segment ids
    and ``extra_args``. ``dense`` visits every key tile (no skipping).
    """
    B, N, _, T_pad, S_pad = _dims(st, q, k)
    G, H, Hv = st.num_groups, st.head_dim, st.value_head_dim
    nq, nk = T_pad // block_q, S_pad // block_k
    if dense:
        start, count = jnp.zeros((B * nq,), jnp.int32), jnp.full((B * nq,), nk, jnp.int32)
    else:
        start, count = _visit_ranges(_tile_visibility(st, rows, block_q, block_k, T_pad, S_pad))

    def q_index(b, n, i, j, *_):
        return b, n, i

    def kv_index(b, n, i, j, q_off, q_len, kv_len, start_ref, count_ref):
        return b, jax.lax.div(n, G), _visit(start_ref, count_ref, b * nq + i, j)

    in_specs = [_head_spec(st, block_q, H, q_index), _head_spec(st, block_k, H, kv_index),
                _head_spec(st, block_k, Hv, kv_index)]
    in_specs.append(None if bias is None else _bias_spec(
        bias, block_q, block_k, lambda *a: q_index(*a) + kv_index(*a)[2:]))
    q_seg = kv_seg = None
    if st.segments:
        q_seg, kv_seg = _segment_layouts(rows.q_segment_ids, False), _segment_layouts(rows.kv_segment_ids, True)
        in_specs += [
            pl.BlockSpec((None, block_q, NUM_LANES), lambda *a: (a[0], a[2], 0)),
            pl.BlockSpec((None, NUM_SUBLANES, block_k), lambda *a: (a[0], 0, kv_index(*a)[2])),
        ]
    else:
        in_specs += [None, None]
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(B, N, nq, nk),
            in_specs=in_specs + list(extra_specs),
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name=name,
    )(rows.q_offset, rows.q_len, rows.kv_len, start, count, q, k, v, bias, q_seg, kv_seg, *extra_args)


def _forward(st: _Static, q, k, v, bias, rows: Rules):
    """Output (kernel layout) and the row statistics ``(m, log_l)`` of `softmax_finish`, ``[B, N, T_pad]`` each.

    ``m + log_l`` is the log-sum-exp (``inf`` on rows with no key).
    """
    B, N, _, T_pad, _ = _dims(st, q, k)
    bq, bk, Hv = st.blocks.block_q, st.blocks.block_k, st.value_head_dim
    out, lse = _q_major_call(
        st, _forward_kernel, "gqa_flash_forward", rows, q, k, v, bias, block_q=bq, block_k=bk, dense=False,
        extra_specs=(), extra_args=(),
        out_specs=[_head_spec(st, bq, Hv, lambda b, n, i, j, *_: (b, n, i)),
                   pl.BlockSpec((None, None, bq, NUM_LANES), lambda b, n, i, j, *_: (b, n, i, 0))],
        out_shape=[out_struct(_seq_shape(st, q, k, T_pad, Hv), q.dtype, q, k, v, bias, rows),
                   out_struct((B, N, T_pad, NUM_LANES), jnp.float32, q, k, v, bias, rows)],
        scratch=[pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                 pltpu.VMEM((bq, Hv), jnp.float32)],
    )
    return out, (lse[..., 0], lse[..., 1])


def _backward(st: _Static, q, k, v, bias, rows: Rules, out, stats, do, dbias_wanted: bool):
    B, N, K, T_pad, S_pad = _dims(st, q, k)
    G, H, Hv = st.num_groups, st.head_dim, st.value_head_dim
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    nq, nk = T_pad // bq, S_pad // bk
    di = jnp.sum(_from_kernel_layout(out, st.heads_minor, N).astype(jnp.float32)
                 * _from_kernel_layout(do, st.heads_minor, N).astype(jnp.float32), axis=-1)  # [B, T, N]
    # Row statistics [B, N, 1, T_pad]: query ids along lanes. Without a bias |m| is moderate and
    # one statistic, the log-sum-exp, does; with one the kernels take m and log(l) apart.
    m, log_l = stats
    lse, r = (m + log_l, None) if bias is None else (m, log_l)
    lse_rows, di_rows = lse[:, :, None, :], di.transpose(0, 2, 1)[:, :, None, :]
    r_rows = None if r is None else r[:, :, None, :]

    # dQ (and the bias gradient): grid (B, N, q_tiles, kv_steps).
    stat_spec = pl.BlockSpec((None, None, 1, bq), lambda b, n, i, j, *_: (b, n, 0, i))
    q_tile_spec = functools.partial(_head_spec, st, bq, index=lambda b, n, i, j, *_: (b, n, i))
    inputs = (q, k, v, bias, rows, lse_rows, r_rows, di_rows, do)
    dbias_spec = dbias_shape = None
    if dbias_wanted:
        dbias_spec = pl.BlockSpec((None, None, bq, bk), lambda b, n, i, j, *_: (b, n, i, j))
        dbias_shape = out_struct((B, N, T_pad, S_pad), bias.dtype, inputs)
    dq, dbias = _q_major_call(
        st, _dq_kernel, "gqa_flash_dq", rows, q, k, v, bias, block_q=bq, block_k=bk, dense=dbias_wanted,
        extra_specs=(stat_spec, None if r is None else stat_spec, stat_spec, q_tile_spec(width=Hv)),
        extra_args=(lse_rows, r_rows, di_rows, do),
        out_specs=[q_tile_spec(width=H), dbias_spec],
        out_shape=[out_struct(q.shape, q.dtype, inputs), dbias_shape],
        scratch=[pltpu.VMEM((bq, H), jnp.float32)],
    )

    # dK, dV: grid (B, K, kv_tiles, G, q_steps).
    start, count = _visit_ranges(_tile_visibility(st, rows, bq, bk, T_pad, S_pad).transpose(0, 2, 1))

    def q_index(b, h, jk, g, i, q_off, q_len, kv_len, start_ref, count_ref):
        return b, h * G + g, _visit(start_ref, count_ref, b * nk + jk, i)

    def kv_index(b, h, jk, g, i, *_):
        return b, h, jk

    in_specs = [_head_spec(st, bq, H, q_index), _head_spec(st, bk, H, kv_index), _head_spec(st, bk, Hv, kv_index)]
    in_specs.append(None if bias is None else _bias_spec(bias, bq, bk, lambda *a: q_index(*a) + (a[2],)))
    q_seg = kv_seg = None
    if st.segments:
        q_seg, kv_seg = _segment_layouts(rows.q_segment_ids, True), _segment_layouts(rows.kv_segment_ids, False)
        in_specs += [
            pl.BlockSpec((None, NUM_SUBLANES, bq), lambda *a: (a[0], 0, q_index(*a)[2])),
            pl.BlockSpec((None, bk, NUM_LANES), lambda *a: (a[0], a[2], 0)),
        ]
    else:
        in_specs += [None, None]
    stat_spec = pl.BlockSpec((None, None, 1, bq), lambda *a: q_index(*a)[:2] + (0, q_index(*a)[2]))
    in_specs += [stat_spec, None if r is None else stat_spec, stat_spec, _head_spec(st, bq, Hv, q_index)]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(B, K, nk, G, nq),
            in_specs=in_specs,
            out_specs=[_head_spec(st, bk, H, kv_index), _head_spec(st, bk, Hv, kv_index)],
            scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, Hv), jnp.float32)],
        ),
        out_shape=[out_struct(k.shape, k.dtype, inputs), out_struct(v.shape, v.dtype, inputs)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=st.interpret,
        name="gqa_flash_dkdv",
    )(rows.q_offset, rows.q_len, rows.kv_len, start, count, q, k, v, bias, q_seg, kv_seg, lse_rows, r_rows, di_rows,
      do)

    if dbias is not None:
        shared = tuple(axis for axis in (0, 1) if bias.shape[axis] == 1)
        dbias = jnp.sum(dbias, axis=shared, keepdims=True, dtype=jnp.float32).astype(bias.dtype)
    return dq, dk, dv, dbias


def _segment_bounds(seg, length, block: int):
    """Per tile min and max segment id over valid positions, ``[B, tiles]`` each (empty: max < min)."""
    B, P = seg.shape
    valid = jnp.arange(P)[None, :] < length[:, None]
    lo = jnp.where(valid, seg, _INT32_MAX).reshape(B, P // block, block).min(axis=-1)
    hi = jnp.where(valid, seg, _INT32_MIN).reshape(B, P // block, block).max(axis=-1)
    return lo, hi


def _tile_visibility(st: _Static, rows: Rules, block_q: int, block_k: int, T_pad: int, S_pad: int):
    """bool ``[B, q_tiles, kv_tiles]``: tiles holding at least one possibly visible pair."""
    t0 = jnp.arange(T_pad // block_q, dtype=jnp.int32)[None, :] * block_q
    t_last = jnp.minimum(t0 + block_q, rows.q_len[:, None]) - 1
    lo, hi = st.rules.kv_range(rows.q_offset[:, None] + t0, rows.q_offset[:, None] + t_last, rows.kv_len[:, None])
    k0 = jnp.arange(S_pad // block_k, dtype=jnp.int32)[None, None, :] * block_k
    vis = (t_last >= t0)[..., None] & (k0 < hi[..., None]) & (k0 + block_k > lo[..., None])
    if st.segments:
        q_lo, q_hi = _segment_bounds(rows.q_segment_ids, rows.q_len, block_q)
        k_lo, k_hi = _segment_bounds(rows.kv_segment_ids, rows.kv_len, block_k)
        vis &= (k_lo[:, None, :] <= q_hi[:, :, None]) & (k_hi[:, None, :] >= q_lo[:, :, None])
    return vis


def _visit_ranges(vis):
    """Per leading index, the first visible tile along the last axis and how many to visit, flattened."""
    n = vis.shape[-1]
    first = jnp.argmax(vis, axis=-1)
    last = n - 1 - jnp.argmax(vis[..., ::-1], axis=-1)
    seen = jnp.any(vis, axis=-1)
    start = jnp.where(seen, first, 0).astype(jnp.int32).reshape(-1)
    count = jnp.where(seen, last - first + 1, 0).astype(jnp.int32).reshape(-1)
    return start, count


def _head_spec(st: _Static, rows: int, width: int, index):
    """BlockSpec of one head's ``[rows, width]`` tile; ``index(*grid, *prefetch) -> (b, head, row_tile)``."""
    if st.heads_minor:
        def heads_minor_map(*args):
            b, h, r = index(*args)
            return b, r, h
        return pl.BlockSpec((None, rows, width), heads_minor_map)

    def heads_major_map(*args):
        b, h, r = index(*args)
        return b, h, r, 0
    return pl.BlockSpec((None, None, rows, width), heads_major_map)


def _to_kernel_layout(x_BTNH, heads_minor: bool):
    B, T, N, H = x_BTNH.shape
    return x_BTNH.reshape(B, T, N * H) if heads_minor else x_BTNH.transpose(0, 2, 1, 3)


def _from_kernel_layout(x, heads_minor: bool, num_heads: int):
    if heads_minor:
        B, T, NH = x.shape
        return x.reshape(B, T, num_heads, NH // num_heads)
    return x.transpose(0, 2, 1, 3)


def _dims(st: _Static, q, k):
    """``(B, N, K, T_pad, S_pad)`` of kernel-layout arrays."""
    if st.heads_minor:
        (B, T_pad, NH), (_, S_pad, KH) = q.shape, k.shape
        return B, NH // st.head_dim, KH // st.head_dim, T_pad, S_pad
    (B, N, T_pad, _), (_, K, S_pad, _) = q.shape, k.shape
    return B, N, K, T_pad, S_pad


def _segment_layouts(seg, rows_form: bool):
    """Segment ids ``[B, P]`` as ``[B, 8, P]`` rows (ids along lanes) or ``[B, P, 128]`` lanes (along sublanes)."""
    B, P = seg.shape
    if rows_form:
        return jax.lax.broadcast_in_dim(seg, (B, NUM_SUBLANES, P), (0, 2))
    return jax.lax.broadcast_in_dim(seg, (B, P, NUM_LANES), (0, 1))


def _bias_spec(bias, block_q: int, block_k: int, index):
    """Tile spec of a ``[B|1, N|1, T_pad, S_pad]`` bias; ``index(*args) -> (b, n, q_tile, k_tile)``."""
    shared_b, shared_n = bias.shape[0] == 1, bias.shape[1] == 1

    def index_map(*args):
        b, n, qi, kj = index(*args)
        return (0 if shared_b else b), (0 if shared_n else n), qi, kj
    return pl.BlockSpec((None, None, block_q, block_k), index_map)


def _seq_shape(st: _Static, q, k, rows: int, head_dim: int) -> tuple[int, ...]:
    """Kernel-layout shape of a ``[B, rows, N, head_dim]`` array."""
    B, N, _, _, _ = _dims(st, q, k)
    return (B, rows, N * head_dim) if st.heads_minor else (B, N, rows, head_dim)


# ---------------------------------------------------------------------------
# Kernel bodies. Prefetched: row offsets, query lengths, key lengths, visit starts and counts.


def _forward_kernel(*refs, st: _Static):
    row_refs, (start_ref, count_ref) = refs[:3], refs[3:5]
    q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[5:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    tile, run = _step(row_refs, start_ref, count_ref, b, b * pl.num_programs(2) + i, j, i, None, block_q, block_k)

    @pl.when(j == 0)
    def _init():
        softmax_init(m_ref, l_ref, acc_ref)

    def compute(masked: bool):
        bias = None if bias_ref is None else bias_ref[...].astype(jnp.float32)
        s, _ = _tile_logits(st, tile, q_ref[...], k_ref[...], bias,
                            lambda: (lanes(q_seg_ref[...], block_k), kv_seg_ref[:1, :]), masked)
        softmax_update(s, v_ref[...], m_ref, l_ref, acc_ref, shift=_SHIFT)

    _when_visible(st, run, tile, block_q, block_k, compute)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out, (m, log_l) = softmax_finish(m_ref, l_ref, acc_ref)
        o_ref[...] = out.astype(o_ref.dtype)
        # Lane 0 holds m, lane 1 log(l).
        lse_ref[...] = jnp.where(jax.lax.broadcasted_iota(jnp.int32, m.shape, 1) == 0, m, log_l)


def _dq_kernel(*refs, st: _Static):
    row_refs, (start_ref, count_ref) = refs[:3], refs[3:5]
    (q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, lse_ref, r_ref, di_ref, do_ref,
     dq_ref, dbias_ref, acc_ref) = refs[5:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    tile, run = _step(row_refs, start_ref, count_ref, b, b * pl.num_programs(2) + i, j, i, None, block_q, block_k)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def compute(masked: bool):
        k = k_ref[...]
        bias = None if bias_ref is None else bias_ref[...].astype(jnp.float32)
        s, t = _tile_logits(st, tile, q_ref[...], k, bias,
                            lambda: (lanes(q_seg_ref[...], block_k), kv_seg_ref[:1, :]), masked)
        p = _probs(s, lse_ref[0][:, None], None if r_ref is None else r_ref[0][:, None])
        ds = p * (dot(do_ref[...], v_ref[...], NT_DIMS) - di_ref[0][:, None])
        if dbias_ref is not None:
            dbias_ref[...] = ds.astype(dbias_ref.dtype)
        if t is not None:
            ds *= 1.0 - t * t
        acc_ref[...] += dot(ds.astype(k.dtype), k)

    _when_visible(st, run, tile, block_q, block_k, compute)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * st.rules.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static):
    # Tiles are transposed: keys along sublanes (rows), queries along lanes.
    row_refs, (start_ref, count_ref) = refs[:3], refs[3:5]
    (q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, lse_ref, r_ref, di_ref, do_ref,
     dk_ref, dv_ref, dk_acc_ref, dv_acc_ref) = refs[5:]
    b, jk, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    tile, run = _step(row_refs, start_ref, count_ref, b, b * pl.num_programs(2) + jk, i, None, jk, block_q, block_k)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def compute(masked: bool):
        q, do = q_ref[...], do_ref[...]
        bias = None if bias_ref is None else bias_ref[...].astype(jnp.float32).T
        s, t = _tile_logits(st, tile, k_ref[...], q, bias,
                            lambda: (q_seg_ref[:1, :], lanes(kv_seg_ref[...], block_q)), masked, q_axis=1)
        p = _probs(s, lse_ref[...], None if r_ref is None else r_ref[...])
        dv_acc_ref[...] += dot(p.astype(do.dtype), do)
        ds = p * (dot(v_ref[...], do, NT_DIMS) - di_ref[...])
        if t is not None:
            ds *= 1.0 - t * t
        dk_acc_ref[...] += dot(ds.astype(q.dtype), q)

    _when_visible(st, run, tile, block_q, block_k, compute)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * st.rules.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------
# Tile rules, used inside the kernels.


def _probs(s, lse, r):
    """The forward's normalized weights: ``exp(s - lse)``, or ``exp((s - m) - log_l)`` from the pair (bias)."""
    x = s - lse
    return jnp.exp(x if r is None else x - r)


class _Tile(NamedTuple):
    """Where a kernel step's tile sits: first query and key index, and its row's scalars."""

    q_start: jax.Array
    k_start: jax.Array
    q_off: jax.Array
    q_len: jax.Array
    kv_len: jax.Array


def _visit(start_ref, count_ref, slot, step):
    """Tile visited at ``step``: ``start + step``, held at the last visited tile past the count."""
    count = count_ref[slot]
    return start_ref[slot] + jnp.minimum(step, jnp.maximum(count - 1, 0))


def _step(row_refs, start_ref, count_ref, b, slot, step, q_tile, k_tile, block_q: int, block_k: int):
    """``(tile, run)`` of a grid step: its `_Tile`, and whether the visit table says to compute it.

    ``q_tile``/``k_tile`` are the tile indices, or None for the one that the table visits.
    """
    visited = _visit(start_ref, count_ref, slot, step)
    q_tile = visited if q_tile is None else q_tile
    k_tile = visited if k_tile is None else k_tile
    q_off_ref, q_len_ref, kv_len_ref = row_refs
    tile = _Tile(q_tile * block_q, k_tile * block_k, q_off_ref[b], q_len_ref[b], kv_len_ref[b])
    return tile, step < count_ref[slot]


def _tile_mask(st: _Static, shape, q_axis: int, tile: _Tile, q_ids, kv_ids):
    """bool ``shape``: visible (query, key) pairs of a tile; queries run along ``q_axis``."""
    t = tile.q_start + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
    s = tile.k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    mask = (t < tile.q_len) & (s < tile.kv_len)
    positional = st.rules.visible(tile.q_off + t, s)
    if positional is not None:
        mask &= positional
    if q_ids is not None:
        mask &= q_ids == kv_ids
    return mask


def _tile_logits(st: _Static, tile: _Tile, a, b, bias, segment_ids, masked: bool, q_axis: int = 0):
    """Logits ``cap(scale * a.b) + bias`` of a tile, ``-inf`` where masked, and the cap's tanh (or None).

    ``a``/``b`` are the query/key tiles (``q_axis=0``) or key/query tiles
    (``q_axis=1``); ``segment_ids()`` gives the tile's query and key ids.
    """
    s, t = scaled_logits(a, b, st.rules.scale, st.rules.soft_cap)
    if bias is not None:
        s += bias
    if masked:
        q_ids, kv_ids = segment_ids() if st.segments else (None, None)
        s = jnp.where(_tile_mask(st, s.shape, q_axis, tile, q_ids, kv_ids), s, -jnp.inf)
    return s, t


def _needs_mask(st: _Static, tile: _Tile, block_q: int, block_k: int):
    """False when every (query, key) pair of the tile is visible; a static bool when known."""
    if st.segments:
        return True
    if not st.maybe_masked:
        return False
    q_last = tile.q_start + block_q - 1
    lo, hi = st.rules.kv_full_range(tile.q_off + tile.q_start, tile.q_off + q_last, tile.kv_len)
    inside = (q_last < tile.q_len) & (lo <= tile.k_start) & (tile.k_start + block_k <= hi)
    return jnp.logical_not(inside)


def _when_visible(st: _Static, run, tile: _Tile, block_q: int, block_k: int, compute) -> None:
    """Runs ``compute(masked)`` on visited tiles, with the element mask only where it is needed."""
    needs_mask = _needs_mask(st, tile, block_q, block_k)
    if isinstance(needs_mask, bool):
        pl.when(run)(lambda: compute(needs_mask))
        return
    pl.when(run & needs_mask)(lambda: compute(True))
    pl.when(run & jnp.logical_not(needs_mask))(lambda: compute(False))
