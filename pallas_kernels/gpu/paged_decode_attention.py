"""Decode attention over a paged KV cache for NVIDIA GPUs: Pallas with the Triton lowering.

A paged cache keeps every row's keys and values in one pool of pages,
``key_pages [P, page_size, K, H]`` and ``value_pages [P, page_size, K, Hv]``,
shared by all rows: key ``s`` of row ``b`` sits in page ``page_table[b, s //
page_size]`` at slot ``s % page_size``. Rows grow a page at a time, so no row
reserves memory for a capacity it never reaches (`gqa_jax.PagedKVCache` does
the bookkeeping).

The kernel is the split-K decode kernel of
`pallas_kernels.gpu.decode_attention` (GQA packing of the ``G*T`` query rows
of a KV head into one program, loops bounded by each row's visible key range,
float32 base-2 softmax statistics merged across splits, its block-size table
and split heuristic) with one change: where a tile of ``block_k`` keys comes
from. Each program holds its row of the page table and reads the pool seen as
rows ``[P * page_size, K, H]``, by one of two paths chosen statically:

* Page-aligned tiles (``page_size % block_k == 0``): a tile lies inside one
  page, so the program reads one page id per tile and loads the tile's keys,
  values (and scales) as ``block_k`` contiguous pool rows, as the dense kernel
  loads its tiles (with its helper). Tiles are visited only when they hold
  valid keys, so the page id read is one the row owns.
* Any other page size: a tile is a gather. For the keys of a tile the program
  reads their page ids (``block_k`` int32, a few bytes per key of ``H``
  values), turns them into pool rows and loads those rows; a tile may span
  several pages or part of one, so any page size works with the tile size the
  dense kernel measured fastest.

Both paths mask the loads at the row's bound like the dense tiles. The
default ``block_k`` is the dense kernel's, made page-aligned where a tile of
at least 64 keys divides the page (`page_aligned_block_k`, measured: on an
H100 at pages of 64, int8 pools ran 1.36x the dense kernel's time with
aligned tiles of 64 against 1.87x gathered at 128); a ``block_k`` override
dividing ``page_size`` takes the page-aligned path too.
Page ids are clamped into ``[0, P)``: a wrong page table gives wrong values,
never a read outside the pool.

A quantized pool (int8 or float8_e4m3fn pages with float32 scale pages
``[P, page_size, K]``, as `gqa_jax.PagedKVCache` keeps it) is read as the
dense kernel reads a quantized cache (tiles converted in registers,
per-key scales applied after ``q . k`` and before ``p . v``, with that
kernel's helpers); a tile's scales are read through the same pool rows as
its keys (a contiguous slice, or a gather).

Grid ``(B, K, row_blocks, num_splits)``. Outputs are in the input dtype; rows
that see no key give zeros. The backward pass is the dense decode kernel's
(the flash-attention backward, a quantized pool dequantized for it) on the
row's pages gathered to a dense cache (decoding rarely differentiates;
gradients are correct, not tuned).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.arguments import next_power_of_two
from pallas_kernels.gpu.decode_attention import (
    DecodeBlockSizes,
    _decode_bwd,
    decode_program,
    default_block_sizes,
    program_statics,
    row_spec,
    split_k_call,
    whole_spec,
)
from pallas_kernels.paging import gather_pages, paged_request
from pallas_kernels.rules import Rules


# ---------------------------------------------------------------------------
# Public wrapper.


def paged_decode_attention(
    query,
    key_pages,
    value_pages,
    page_table,
    lengths,
    *,
    scale: float | None = None,
    is_causal: bool = True,
    query_offset=None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    key_scale_pages=None,
    value_scale_pages=None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool = False,
):
    """Attention of a few new queries to a paged KV cache with per-row lengths.

    Semantics are those of `pallas_kernels.gpu.decode_attention.decode_attention`
    on the dense cache ``gather_pages(key_pages, page_table)`` (capacity ``S = M
    * page_size``): query head ``n`` reads KV head ``n // G``; query ``t`` of
    row ``b`` sits at ``lengths[b] - T + t`` unless ``query_offset`` says
    otherwise; keys ``s < lengths[b]`` are valid; a row of length 0 gives
    zeros. Pages holding no key below a row's length are never read. A
    quantized pool gives what the dense kernel gives on the gathered cache
    and scales (``key_scale=gather_pages(key_scale_pages, page_table)``).

    Args:
      query: ``[B, T, N, H]``; T is small (1 to 16).
      key_pages: ``[P, page_size, K, H]`` with ``N % K == 0``, the query's
        dtype (bfloat16, float16 or float32), or int8 / float8_e4m3fn with
        ``key_scale_pages`` (a quantized pool).
      value_pages: ``[P, page_size, K, Hv]``, the key pages' dtype.
      page_table: int ``[B, M]``: row ``b``'s ``j``-th page. Entries for the
        pages of keys ``>= lengths[b]`` are not read (-1 is fine); when known
        here (not traced) the others must be in ``[0, P)``.
      lengths: int scalar or ``[B]`` valid keys per row, in ``[0, M * page_size]``.
      scale: logit scale; default ``1 / sqrt(H)``.
      is_causal: queries see keys at positions ``<=`` their own.
      query_offset: optional int scalar or ``[B]`` position of each row's
        first query; default ``lengths - T``.
      local_window_size: int or ``(left, right)``: a query at position ``p``
        sees keys in ``[p - left, p + right]``.
      logits_soft_cap: ``cap * tanh(logits / cap)`` on the scaled logits.
      key_scale_pages: float ``[P, page_size, K]`` scales of a quantized
        pool: the key in slot ``i`` of page ``p`` is ``key_pages[p, i, k] *
        key_scale_pages[p, i, k]``.
      value_scale_pages: float ``[P, page_size, K]`` scales of a quantized
        value pool.
      block_sizes: tuning overrides (`DecodeBlockSizes`; ``block_k`` keys per
        tile, any power of two >= 16: one dividing ``page_size`` loads each
        tile from one page, contiguously, others gather it); fields left None
        are picked by `pallas_kernels.gpu.decode_attention.default_block_sizes`,
        its ``block_k`` made page-aligned by `page_aligned_block_k`.
      interpret: run the kernel in the Pallas interpreter (CPU).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype. Differentiable (flash backward on
      the gathered pages; a quantized pool gets gradients for its scale
      pages only).

    Raises:
      ValueError: for inconsistent shapes or rules, a pool of ``P *
        page_size >= 2**31`` slots, a known page id outside ``[0, P)`` for a
        page that holds valid keys, or a quantized pool without both scales.
      TypeError: for dtypes that differ or are not served, or scales with
        float pages.

    Example::

        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((2, 1, 8, 64)), jnp.float32)  # [B,T,N,H]
        key_pages, value_pages = (jnp.asarray(rng.standard_normal((6, 16, 2, 64)), jnp.float32)
                                  for _ in range(2))                      # [P,page_size,K,H]
        page_table = jnp.array([[4, 1, 5], [0, -1, -1]])  # row 0: 40 keys in pages 4, 1, 5; row 1: 9 in page 0
        lengths = jnp.array([40, 9])
        # interpret=True runs on a CPU; leave it out on a GPU.
        out = paged_decode_attention(q, key_pages, value_pages, page_table, lengths, interpret=True)  # [2,1,8,64]
    """
    query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages = paged_request(
        query, key_pages, value_pages, page_table, lengths, scale=scale, is_causal=is_causal,
        query_offset=query_offset, local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
        key_scale_pages=key_scale_pages, value_scale_pages=value_scale_pages,
    )
    B, S = query.shape[0], page_table.shape[1] * key_pages.shape[1]
    K, H = key_pages.shape[2:]
    T, N = query.shape[1:3]
    overrides = block_sizes or DecodeBlockSizes()
    table = functools.partial(
        default_block_sizes, B, S, K, T * (N // K), max(H, value_pages.shape[3]), key_pages.dtype,
        num_splits=overrides.num_splits, num_warps=overrides.num_warps, num_stages=overrides.num_stages,
    )
    blocks = table(block_k=overrides.block_k)
    if overrides.block_k is None:
        aligned = page_aligned_block_k(blocks.block_k, key_pages.shape[1])
        if aligned != blocks.block_k:
            blocks = table(block_k=aligned)
    if overrides.block_rows is not None:
        blocks = dataclasses.replace(blocks, block_rows=overrides.block_rows)
    return _paged_decode(query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages,
                         rules.statics(), blocks, bool(interpret))


def page_aligned_block_k(block_k: int, page_size: int) -> int:
    """The default tile for a page size: ``block_k`` or, where it does not divide the page, a page-aligned one.

    Measured rule (H100, `tools/gpu_decode_check.py --paged`, B8 S8192 N32 K8
    H128, paged / dense time): at pages of 64 the page-aligned tiles of 64 keys
    against gathered tiles of 128: int8 1.36 against 1.87 (ragged 1.01 against
    1.05), bf16 1.01 against 1.02 (ragged 1.20 both). So a power-of-two
    ``block_k`` that does not divide ``page_size`` becomes their largest common
    power of two when that is at least 64; smaller aligned tiles are not
    measured, and those pages keep the gather at ``block_k``.
    """
    aligned = math.gcd(block_k, page_size)  # block_k is a power of two: so is the gcd
    return aligned if aligned >= 64 else block_k


# ---------------------------------------------------------------------------
# Differentiable core.


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _paged_decode(query, key_pages, value_pages, page_table, rules: Rules, key_scale_pages, value_scale_pages,
                  statics: Rules, blocks: DecodeBlockSizes, interpret: bool):
    return _paged_forward(query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages,
                          statics, blocks, interpret)


def _paged_decode_fwd(query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages, statics,
                      blocks, interpret):
    out = _paged_forward(query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages,
                         statics, blocks, interpret)
    return out, (query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages)


def _paged_decode_bwd(statics, blocks, interpret, residuals, d_out):
    """The dense decode kernel's backward on the gathered pages; the gather's transpose sums into the pools.

    Float pages get gradients; a quantized pool's scale pages get them and
    its values none (`pallas_kernels.gpu.decode_attention._decode_bwd`).
    """
    query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages = residuals

    def gather_pair(x, y):
        return gather_pages(x, page_table), gather_pages(y, page_table)

    # Gather the pools that get gradients under jax.vjp: its pullback is the gather's transpose.
    if key_scale_pages is None:
        (key, value), transpose = jax.vjp(gather_pair, key_pages, value_pages)
        scales = (None, None)
    else:
        key, value = gather_pair(key_pages, value_pages)
        scales, transpose = jax.vjp(gather_pair, key_scale_pages, value_scale_pages)
    d_query, d_key, d_value, _, d_key_scale, d_value_scale, _ = _decode_bwd(
        statics, blocks, interpret, (query, key, value, rules, *scales, None), d_out)
    if key_scale_pages is None:
        return d_query, *transpose((d_key, d_value)), None, None, None, None
    return d_query, None, None, None, None, *transpose((d_key_scale, d_value_scale))


_paged_decode.defvjp(_paged_decode_fwd, _paged_decode_bwd)


# ---------------------------------------------------------------------------
# pallas_call builder.


@functools.partial(jax.jit, static_argnames=("statics", "blocks", "interpret"))
def _paged_forward(query, key_pages, value_pages, page_table, rules: Rules, key_scale_pages, value_scale_pages,
                   statics: Rules, blocks: DecodeBlockSizes, interpret: bool):
    B, T, N, H = query.shape
    P, page_size, K, Hv = value_pages.shape
    M = page_table.shape[1]
    kv_len = jnp.clip(rules.lengths(T, M * page_size)[1], 0, M * page_size)
    in_specs = [
        row_spec(),
        row_spec(),
        pl.BlockSpec((None, M), lambda b, k, r, s: (b, 0)),
        whole_spec(B * T * N * H),
        # The whole pool of one KV head, as rows [P * page_size, H]: tiles find their rows in it.
        pl.BlockSpec((P * page_size, None, next_power_of_two(max(H, 16))), lambda b, k, r, s: (0, k, 0)),
        pl.BlockSpec((P * page_size, None, next_power_of_two(max(Hv, 16))), lambda b, k, r, s: (0, k, 0)),
    ]
    quantized = key_scale_pages is not None
    if quantized:  # the scale pools of one KV head, as rows [P * page_size]: read through the keys' rows
        in_specs += [pl.BlockSpec((P * page_size, None), lambda b, k, r, s: (0, k))] * 2
    kernel = functools.partial(_paged_decode_kernel, page_size=page_size, num_pages=P, quantized=quantized,
                               **program_statics(query, value_pages, statics, blocks))
    return split_k_call(
        kernel, in_specs,
        (kv_len, rules.q_offset, page_table, query.reshape(-1), key_pages.reshape(P * page_size, K, H),
         value_pages.reshape(P * page_size, K, Hv),
         *((key_scale_pages.reshape(P * page_size, K), value_scale_pages.reshape(P * page_size, K)) if quantized
           else ())),
        query=query, value=value_pages, blocks=blocks, interpret=interpret, name="gqa_paged_decode_attention",
        varying=(rules, query, key_pages, value_pages, page_table, key_scale_pages, value_scale_pages))


# ---------------------------------------------------------------------------
# Kernel body.


def _paged_decode_kernel(
    lengths_ref,  # [] keys of this row (clamped to M * page_size)
    offsets_ref,  # [] position of this row's first query
    page_table_ref,  # [M] this row's page ids
    q_ref,  # [B*T*N*H] the whole query, flat
    k_ref,  # [P * page_size, Hp] the key pool of one KV head, as rows
    v_ref,  # [P * page_size, Hvp]
    *refs,  # quantized: the key and value scale pools [P * page_size]; then the outputs:
    # (out [B*T*N*Hv],) or (acc [splits*B*T*N*Hv], m [splits*B*T*N], l [splits*B*T*N]), flat
    page_size: int,
    num_pages: int,
    quantized: bool,
    **statics,
):
    """`pallas_kernels.gpu.decode_attention.decode_program` with key tiles found through the page table."""
    (k_scale_ref, v_scale_ref), out_refs = (refs[:2], refs[2:]) if quantized else ((None, None), refs)
    block_k = statics["blocks"].block_k
    last_page = page_table_ref.shape[0] - 1
    tiles_per_page = page_size // block_k if page_size % block_k == 0 else None  # static: the path

    def tile_rows(tile, k_start, k_pos, in_range):
        """The pool rows of a tile's keys: a slice of one page when tiles are page-aligned, else per-key rows."""
        if tiles_per_page is not None:  # one page id per tile; the loop visits only tiles holding valid keys
            page = jnp.clip(page_table_ref[jnp.minimum(lax.div(tile, tiles_per_page), last_page)], 0, num_pages - 1)
            # Row page * page_size + tile's slot, written as (the pool's tile index) * block_k: aligned, visibly.
            return pl.ds((page * tiles_per_page + lax.rem(tile, tiles_per_page)) * block_k, block_k)
        page = plgpu.load(page_table_ref.at[jnp.minimum(lax.div(k_pos, page_size), last_page)], mask=in_range,
                          other=0)
        return jnp.clip(page, 0, num_pages - 1) * page_size + lax.rem(k_pos, page_size)

    decode_program(q_ref, k_ref, v_ref, k_scale_ref, v_scale_ref, None, out_refs, lengths_ref[()], offsets_ref[()],
                   tile_rows, **statics)
