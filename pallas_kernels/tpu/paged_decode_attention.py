"""Decode attention over a paged KV cache for TPUs (Pallas, Mosaic TPU).

A paged cache keeps every row's keys and values in one pool of pages,
``key_pages [P, page_size, K, H]`` and ``value_pages [P, page_size, K, Hv]``,
shared by all rows: key ``s`` of row ``b`` sits in page ``page_table[b, s //
page_size]`` at slot ``s % page_size`` (`gqa_jax.PagedKVCache` does the
bookkeeping). Semantics and checks are those of the GPU kernel,
`pallas_kernels.gpu.paged_decode_attention`; numerics and GQA packing those of
the dense TPU decode kernel, `pallas_kernels.tpu.decode_attention`:

* GQA packing: one program serves the ``G*T`` query rows of ``hb`` K/V heads
  (the fewest whose columns fill whole 128-lane blocks, block-diagonal queries
  when ``hb > 1``, as in the dense kernel), so each K/V byte is read once and
  K/V are never repeated to ``N`` heads. Head dims that fill no lane block
  with any count of heads (e.g. 80 with ``K = 2``) are zero-padded to 128: a
  copy of the pools per call, a slow path (the dense kernel copies its cache
  there too).
* Pages by DMA, through the page table: the pools stay in HBM (``pl.ANY``),
  seen as ``[P, page_size, K*H]`` (the columns of the program's heads are one
  slice). The page table, lengths and query offsets are scalar-prefetched to
  SMEM; the kernel reads a page's id there and copies that page's slice into
  a VMEM block of ``pages_per_block`` pages with ``pltpu.make_async_copy``.
  Blocks are double-buffered: block ``j + 1``'s pages are in flight while
  block ``j`` is computed (the first block of each program is not hidden).
* Only visible pages are visited: a row's queries see the keys ``[lo, hi)``
  of `Rules.kv_range` (length, causal, window); the blocks that cover it are
  walked and only pages holding keys of it are copied, so a row of length 0
  copies nothing and gives zeros, and page-table entries past a row's length
  (-1 in `gqa_jax.PagedKVCache`) are never read. Page ids read are clamped
  into ``[0, P)``: a wrong page table gives wrong values, never a DMA outside
  the pool. Buffer slots of pages not copied hold stale data; logits there are
  masked to ``-inf`` and values to zero by selects, so nothing (not even NaN)
  leaks in.
* Numerics of the dense TPU kernel (its per-tile step,
  `pallas_kernels.tpu.decode_attention.attend_keys`): float32 online softmax
  with natural ``exp``, masked logits ``-inf``, running max from the lowest
  finite float32, unnormalized weights shifted to at most ``2**-32``, zeros
  for rows that see no key; outputs in the query dtype. float16 runs in
  float32 (a float32 copy of the pools, as the dense kernel copies the cache;
  TPUs have no float16 units).
* Quantized pools (int8 or float8_e4m3fn pages with float32 scale pages
  ``[P, page_size, K]``, as `gqa_jax.PagedKVCache` keeps them): pages are
  copied as they are (half the bytes of bfloat16) and converted in VMEM,
  per-key scales applied after ``q . k`` and before ``p . v``, as in the
  dense kernel. Each row's scale pages are gathered through its page table
  before the call into tiles ``[hb, block_k]`` with the keys along lanes
  (`pallas_kernels.tpu.common.scale_tiles`: 16 bytes per slot and head of
  the row's capacity, against the ``H + Hv`` bytes per key and head of the
  pages), and each block's scale tile is copied beside its pages.

Grid ``(B, K // hb)``, both "parallel" (each program waits for every copy it
starts); the walk over a row's blocks is a loop inside the program, bounded by
the row's visible range. A block of ``pages_per_block * page_size`` keys must
be a multiple of 128 (TPU lanes) or below 128. The page table lives in SMEM,
as in jax's TPU paged-attention kernels, which bounds ``B * M``. Pages of a
multiple of 8 tokens (16 for bfloat16) are the layout-friendly sizes: a
block's pages are merged into ``[block_k, lanes]`` tiles (bfloat16 blocks of
8-token pages go through float32 for that). The backward pass (decoding rarely
differentiates) is the TPU flash-attention backward on the gathered pages (a
quantized pool dequantized for it: its scale pages get gradients, its pages
none), so gradients are correct, not tuned.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.arguments import out_struct, pad_axis, round_up
from pallas_kernels.paging import gather_pages, paged_request
from pallas_kernels.quantized import cache_vjp, is_quantized_dtype
from pallas_kernels.rules import Rules
from pallas_kernels.tpu.common import (
    NUM_LANES,
    NUM_SUBLANES,
    compute_dtype,
    interpret_params,
    scale_tiles,
    softmax_finish,
    softmax_init,
)
from pallas_kernels.tpu.decode_attention import _heads_per_tile, attend_keys, flash_on_cache

# Keys per block the default block size aims at: the dense TPU decode kernel's tile.
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class PagedDecodeBlockSizes:
    """Tiling of the TPU paged decode kernel.

    Attributes:
      pages_per_block: pages copied and computed together (a block of
        ``pages_per_block * page_size`` keys, which must be a multiple of 128
        or below 128); None picks about 512 keys, at most what a row holds.
    """

    pages_per_block: int | None = None

    def __post_init__(self):
        ppb = self.pages_per_block
        if ppb is not None and (isinstance(ppb, bool) or not isinstance(ppb, int) or ppb <= 0):
            raise ValueError(f"pages_per_block={ppb!r} must be a positive int or None")

    def fit(self, page_size: int, max_pages: int) -> int:
        """Pages per block for pages of ``page_size`` tokens and rows of at most ``max_pages`` pages.

        Raises:
          ValueError: for a given ``pages_per_block`` whose block is neither a
            multiple of 128 keys nor below 128.
        """
        if self.pages_per_block is None:
            return _default_pages_per_block(page_size, max_pages)
        block_k = self.pages_per_block * page_size
        if block_k % NUM_LANES and block_k > NUM_LANES:
            raise ValueError(f"pages_per_block * page_size = {self.pages_per_block} * {page_size} = {block_k} keys "
                             f"per block must be a multiple of {NUM_LANES=} or below it")
        return self.pages_per_block


def _default_pages_per_block(page_size: int, max_pages: int) -> int:
    """About `DEFAULT_BLOCK_K` keys in whole lane blocks, no more than one row's pages need."""
    if max_pages * page_size < NUM_LANES:
        return max_pages  # a whole row in one block below a lane block
    unit = NUM_LANES // math.gcd(page_size, NUM_LANES)  # the fewest pages whose keys fill whole lane blocks
    pages = unit * max(1, DEFAULT_BLOCK_K // (unit * page_size))
    return min(pages, unit * -(-max_pages // unit))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is fixed at trace time."""

    rules: Rules  # statics only: lengths, offsets and the page table are prefetched
    q_len: int
    page_size: int
    pages_per_block: int
    heads_per_program: int
    interpret: Any


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
    block_sizes: PagedDecodeBlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
):
    """Attention of a few new queries to a paged KV cache with per-row lengths, on TPUs (Pallas, Mosaic TPU).

    Semantics are those of `pallas_kernels.tpu.decode_attention.decode_attention`
    on the dense cache ``gather_pages(key_pages, page_table)`` (capacity ``S = M
    * page_size``), and of the GPU twin
    `pallas_kernels.gpu.paged_decode_attention.paged_decode_attention`: query
    head ``n`` reads KV head ``n // G``; query ``t`` of row ``b`` sits at
    ``lengths[b] - T + t`` unless ``query_offset`` says otherwise; keys ``s <
    lengths[b]`` are valid; a row of length 0 gives zeros. Pages holding no key
    that a row's queries can see are never read. A quantized pool gives what
    the dense kernel gives on the gathered cache and scales
    (``key_scale=gather_pages(key_scale_pages, page_table)``).

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
      block_sizes: `PagedDecodeBlockSizes` (pages per block); default about
        512 keys per block.
      interpret: False (compiled for TPU), True (``pltpu.InterpretParams()``,
        the Pallas TPU interpret mode on any backend) or a
        ``pltpu.InterpretParams``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype. Differentiable (TPU flash backward
      on the gathered pages; a quantized pool gets gradients for its scale
      pages only).

    Raises:
      ValueError: for inconsistent shapes, rules or block sizes, a pool of
        ``P * page_size >= 2**31`` slots, a known page id outside ``[0, P)``
        for a page that holds valid keys, or a quantized pool without both
        scales.
      TypeError: for dtypes that differ or are not served, scales with float
        pages, or an ``interpret`` that is neither a bool nor a
        ``pltpu.InterpretParams``.

    Example::

        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((2, 1, 8, 128)), jnp.float32)  # [B,T,N,H]
        key_pages, value_pages = (jnp.asarray(rng.standard_normal((6, 16, 2, 128)), jnp.float32)
                                  for _ in range(2))                       # [P,page_size,K,H]
        page_table = jnp.array([[4, 1, 5], [0, -1, -1]])  # row 0: 40 keys in pages 4, 1, 5; row 1: 9 in page 0
        lengths = jnp.array([40, 9])
        # interpret=True runs on a CPU; leave it out on a TPU.
        out = paged_decode_attention(q, key_pages, value_pages, page_table, lengths, interpret=True)  # [2,1,8,128]
    """
    query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages = paged_request(
        query, key_pages, value_pages, page_table, lengths, scale=scale, is_causal=is_causal,
        query_offset=query_offset, local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
        key_scale_pages=key_scale_pages, value_scale_pages=value_scale_pages,
    )
    S = page_table.shape[1] * key_pages.shape[1]
    P, page_size, K, H = key_pages.shape
    T, Hv = query.shape[1], value_pages.shape[3]
    pages_per_block = (block_sizes or PagedDecodeBlockSizes()).fit(page_size, page_table.shape[1])
    rules = dataclasses.replace(rules, kv_len=jnp.clip(rules.lengths(T, S)[1], 0, S))
    dtype = compute_dtype(query.dtype)
    q, k, v = query.astype(dtype), key_pages, value_pages
    if key_scale_pages is None:  # quantized pages stay as they are: they are converted in VMEM
        k, v = k.astype(dtype), v.astype(dtype)
    hb = _heads_per_tile(K, H, Hv)
    if hb is None:
        # Head dims such as 80 with too few K/V heads fill no whole lane block: pad them (a copy of the pools).
        q, k = pad_axis(q, 3, round_up(H, NUM_LANES)), pad_axis(k, 3, round_up(H, NUM_LANES))
        v, hb = pad_axis(v, 3, round_up(Hv, NUM_LANES)), 1
    st = _Static(rules=rules.statics(), q_len=T, page_size=page_size, pages_per_block=pages_per_block,
                 heads_per_program=hb, interpret=interpret_params(interpret))
    return _paged_decode(st, q, k, v, key_scale_pages, value_scale_pages, page_table, rules)[..., :Hv].astype(
        query.dtype)


# ---------------------------------------------------------------------------
# Differentiable core.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _paged_decode(st: _Static, q, key_pages, value_pages, key_scale_pages, value_scale_pages, page_table,
                  rules: Rules):
    return _forward(st, q, key_pages, value_pages, key_scale_pages, value_scale_pages, page_table, rules.kv_len,
                    rules.q_offset)


def _paged_decode_fwd(st: _Static, q, key_pages, value_pages, key_scale_pages, value_scale_pages, page_table, rules):
    out = _paged_decode(st, q, key_pages, value_pages, key_scale_pages, value_scale_pages, page_table, rules)
    return out, (q, key_pages, value_pages, key_scale_pages, value_scale_pages, page_table, rules)


def _paged_decode_bwd(st: _Static, residuals, d_out):
    """The dense decode kernel's backward on the gathered pages; the gather's transpose sums into the pools.

    Float pages get gradients; a quantized pool's scale pages get them and
    its pages none (`pallas_kernels.quantized.cache_vjp`).
    """
    q, key_pages, value_pages, key_scale_pages, value_scale_pages, page_table, rules = residuals

    def dense(q, *pools):  # the pools gathered to a dense cache (None, for no scales, stays None)
        k, v, k_scale, v_scale = (None if x is None else gather_pages(x, page_table) for x in pools)
        return flash_on_cache(rules, st.interpret)(q, k, v, k_scale, v_scale)

    return (*cache_vjp(dense, q, key_pages, value_pages, key_scale_pages, value_scale_pages, d_out), None, None)


_paged_decode.defvjp(_paged_decode_fwd, _paged_decode_bwd)


# ---------------------------------------------------------------------------
# pallas_call builder.


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(st: _Static, q, key_pages, value_pages, key_scale_pages, value_scale_pages, page_table, lengths, q_off):
    B, T, N, H = q.shape
    P, L, K, Hv = value_pages.shape
    M = page_table.shape[1]
    G, hb = N // K, st.heads_per_program
    C, R = K // hb, hb * G * T
    W, Wv = hb * H, hb * Hv
    R_pad = round_up(R, NUM_SUBLANES * 4 // q.dtype.itemsize)  # whole (8, 128) 32-bit or (16, 128) 16-bit tiles
    # Query rows (head in program i, group g, token t); columns (head in program i', h), zero unless i == i'.
    q6 = q.reshape(B, T, C, hb, G, H).transpose(0, 2, 3, 4, 1, 5)  # [B, C, hb, G, T, H]
    q_rows = jnp.einsum("bcigth,ij->bcigtjh", q6, jnp.eye(hb, dtype=q.dtype)).reshape(B, C, R, W)
    q_rows = pad_axis(q_rows, 2, R_pad)
    row_t = jnp.broadcast_to(pad_axis(jnp.tile(jnp.arange(T, dtype=jnp.int32), hb * G), 0, R_pad)[:, None],
                             (R_pad, NUM_LANES))
    ppb = st.pages_per_block
    quantized = key_scale_pages is not None
    # A quantized pool's scales, each row's gathered through its page table: [B, C, blocks, hb, ppb * page_size].
    scales = tuple(scale_tiles(gather_pages(x, page_table), hb, ppb * L) for x in (key_scale_pages, value_scale_pages)
                   ) if quantized else ()
    out = pl.pallas_call(
        functools.partial(_paged_decode_kernel, st=st, num_pages=P, max_pages=M, rows_per_head=G * T),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, C),
            in_specs=[
                pl.BlockSpec((R_pad, NUM_LANES), lambda b, c, *_: (0, 0)),
                pl.BlockSpec((None, None, R_pad, W), lambda b, c, *_: (b, c, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),  # the key pool, [P, page_size, K*H], stays in HBM
                pl.BlockSpec(memory_space=pl.ANY),  # the value pool, [P, page_size, K*Hv]
                *[pl.BlockSpec(memory_space=pl.ANY)] * len(scales),  # the scale tiles, copied a block at a time
            ],
            out_specs=pl.BlockSpec((None, None, R_pad, Wv), lambda b, c, *_: (b, c, 0, 0)),
            scratch_shapes=[
                pltpu.VMEM((2, ppb, L, W), key_pages.dtype),  # two blocks of key pages: double buffering
                pltpu.VMEM((2, ppb, L, Wv), value_pages.dtype),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((R_pad, NUM_LANES), jnp.float32),
                pltpu.VMEM((R_pad, NUM_LANES), jnp.float32),
                pltpu.VMEM((R_pad, Wv), jnp.float32),
                # Quantized: two blocks of key and of value scales, and their DMA semaphores.
                *([pltpu.VMEM((2, hb, ppb * L), jnp.float32)] * 2 + [pltpu.SemaphoreType.DMA((2,))] if quantized
                  else []),
            ],
        ),
        out_shape=out_struct((B, C, R_pad, Wv), q.dtype, q, key_pages, value_pages, scales, page_table, lengths,
                             q_off),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=st.interpret,
        name="gqa_paged_decode_attention",
    )(lengths, q_off, page_table.reshape(-1), row_t, q_rows, key_pages.reshape(P, L, K * H),
      value_pages.reshape(P, L, K * Hv), *scales)
    # Keep each row's own head columns: [B, C, hb, G, T, hb, Hv] -> diagonal over the two hb axes.
    out = jnp.diagonal(out[:, :, :R].reshape(B, C, hb, G, T, hb, Hv), axis1=2, axis2=5)  # [B, C, G, T, Hv, hb]
    return out.transpose(0, 3, 1, 5, 2, 4).reshape(B, T, N, Hv)


# ---------------------------------------------------------------------------
# Kernel body.


def _paged_decode_kernel(
    len_ref,  # SMEM [B] keys per row (clamped to M * page_size)
    off_ref,  # SMEM [B] position of each row's first query
    table_ref,  # SMEM [B * M] the page table, flat
    row_t_ref,  # [R_pad, 128] token index t of each query row, lane-replicated
    q_ref,  # [R_pad, W] this program's query rows
    k_hbm,  # [P, page_size, K*H] the key pool (HBM)
    v_hbm,  # [P, page_size, K*Hv] the value pool (HBM)
    *refs,  # quantized pools: the key and value scale tiles; then the output and scratch (unpacked below)
    st: _Static,
    num_pages: int,
    max_pages: int,
    rows_per_head: int,
):
    quantized = is_quantized_dtype(k_hbm.dtype)
    scale_hbm, refs = (refs[:2], refs[2:]) if quantized else ((), refs)  # HBM [B, C, blocks, hb, block_k] each
    (o_ref,  # [R_pad, Wv]
     k_buf,  # VMEM [2, ppb, page_size, W]: two blocks of key pages
     v_buf,  # VMEM [2, ppb, page_size, Wv]
     k_sems,  # DMA semaphores [2], one per buffer
     v_sems,
     m_ref,  # [R_pad, 128] running max
     l_ref,  # [R_pad, 128] running sum
     acc_ref,  # [R_pad, Wv] running p @ v
     *scale_scratch,  # quantized: key and value scale buffers VMEM [2, hb, block_k], their DMA semaphores [2]
     ) = refs
    b, c = pl.program_id(0), pl.program_id(1)
    length, q_off = len_ref[b], off_ref[b]
    L, ppb = st.page_size, st.pages_per_block
    block_k = ppb * L
    W, Wv = k_buf.shape[-1], v_buf.shape[-1]
    # The keys [lo, hi) any query of the row sees, the pages holding them, and the blocks covering them.
    # (lax.div: both operands are >= 0; jnp's // lowers through `sign`, which cannot be exported without a TPU.)
    lo, hi = st.rules.kv_range(q_off, q_off + st.q_len - 1, length)
    hi = jnp.maximum(hi, lo)
    first_page, end_page = lax.div(lo, L), lax.div(hi + L - 1, L)
    first_block = lax.div(lo, block_k)
    num_blocks = jnp.where(hi > lo, lax.div(hi + block_k - 1, block_k) - first_block, 0)

    def columns(ref, width):
        """The slice of a pool page that holds this program's heads."""
        if ref.shape[-1] == width:
            return lambda page: ref.at[page]
        start = pl.multiple_of(c * width, NUM_LANES)
        return lambda page: ref.at[page, :, pl.ds(start, width)]

    k_page, v_page = columns(k_hbm, W), columns(v_hbm, Wv)

    def each_copy(block, slot, action):
        """``action`` on the key and value copies of the pages of ``block`` that hold visible keys."""
        start = block * ppb

        def copy(i, carry):
            entry = b * max_pages + jnp.minimum(start + i, max_pages - 1)
            page = jnp.clip(table_ref[entry], 0, num_pages - 1)  # a wrong table never reads outside the pool
            action(pltpu.make_async_copy(k_page(page), k_buf.at[slot, i], k_sems.at[slot]))
            action(pltpu.make_async_copy(v_page(page), v_buf.at[slot, i], v_sems.at[slot]))
            return carry

        lax.fori_loop(jnp.clip(first_page - start, 0, ppb), jnp.clip(end_page - start, 0, ppb), copy, 0)
        if quantized:  # the block's scale tiles, one copy each
            *scale_buf, scale_sems = scale_scratch
            for src, dst in zip(scale_hbm, scale_buf):
                action(pltpu.make_async_copy(src.at[b, c, block], dst.at[slot], scale_sems.at[slot]))

    softmax_init(m_ref, l_ref, acc_ref)

    @pl.when(num_blocks > 0)
    def _first_block():
        each_copy(first_block, 0, lambda copy: copy.start())

    def step(j, carry):
        block, slot = first_block + j, lax.rem(j, 2)

        @pl.when(j + 1 < num_blocks)
        def _next_block():
            each_copy(block + 1, 1 - slot, lambda copy: copy.start())

        each_copy(block, slot, lambda copy: copy.wait())
        scales = [buf[slot] for buf in scale_scratch[:2]] or [None, None]
        attend_keys(st.rules, q_ref[...], _block_rows(k_buf[slot]), _block_rows(v_buf[slot]), *scales,
                    row_t_ref[...], m_ref, l_ref, acc_ref, rows_per_head=rows_per_head, k_start=block * block_k,
                    q_off=q_off, lo=lo, hi=hi)
        return carry

    lax.fori_loop(0, num_blocks, step, 0)
    out, _ = softmax_finish(m_ref, l_ref, acc_ref)
    o_ref[...] = out.astype(o_ref.dtype)


def _block_rows(x):
    """A block of pages ``[ppb, page_size, width]`` as key rows ``[ppb * page_size, width]``.

    The merge is free when pages are whole sublane tiles (8 rows of 32 bits,
    16 of bfloat16); bfloat16 pages of a multiple of 8 rows merge as float32.
    Quantized pages (int8, float8: 32-row tiles) come out in float32, the
    dtype they are converted through anyway.
    """
    if is_quantized_dtype(x.dtype):
        x = x.astype(jnp.float32)
    ppb, L, width = x.shape
    if ppb == 1:
        return x[0]
    rows_per_tile = NUM_SUBLANES * 4 // x.dtype.itemsize
    if L % rows_per_tile and L % NUM_SUBLANES == 0:
        return x.astype(jnp.float32).reshape(ppb * L, width).astype(x.dtype)
    return x.reshape(ppb * L, width)
