"""Tile ranges shared by the Mosaic-GPU flash kernels (forward, dQ and dK/dV).

Each function asks `pallas_kernels.rules.Rules` which tiles a CTA or one of
its consumer warpgroups can see (or sees fully), in tile units, so the kernels
never visit a fully masked tile and skip the mask arithmetic on full ones.
Values are int32 scalars traced inside a kernel.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.rules import Rules


def cdiv(a, b: int):
    """``ceil(a / b)`` of a traced non-negative int and a static positive one."""
    return lax.div(a + (b - 1), b)


def cta_kv_blocks(rules: Rules, cta_start, rows: int, block_kv: int, offset, q_len, kv_len):
    """Key tiles ``[blk_lo, blk_hi)`` any valid row of the CTA's ``rows`` queries from ``cta_start`` can see."""
    q_first = offset + cta_start
    q_last = offset + jnp.minimum(cta_start + rows, q_len) - 1
    lo, hi = rules.kv_range(q_first, q_last, kv_len)
    live = (cta_start < q_len) & (hi > lo)
    blk_lo = jnp.where(live, lax.div(lo, block_kv), 0)
    blk_hi = jnp.where(live, cdiv(hi, block_kv), 0)
    return blk_lo, blk_hi


def full_kv_blocks(rules: Rules, wg_start, block_q: int, block_kv: int, offset, q_len, kv_len, blk_lo, blk_hi):
    """Sub-range ``[f_lo, f_hi)`` of ``[blk_lo, blk_hi)`` that every one of ``block_q`` rows from ``wg_start`` sees.

    Empty when the rows reach past ``q_len`` (those rows must stay masked).
    """
    q_first = offset + wg_start
    q_last = q_first + block_q - 1
    full_lo, full_hi = rules.kv_full_range(q_first, q_last, kv_len)
    full_lo, full_hi = jnp.maximum(full_lo, 0), jnp.maximum(full_hi, 0)
    full_hi = jnp.where(wg_start + block_q <= q_len, full_hi, 0)
    f_lo = jnp.minimum(jnp.maximum(cdiv(full_lo, block_kv), blk_lo), blk_hi)
    f_hi = jnp.minimum(jnp.maximum(lax.div(full_hi, block_kv), f_lo), blk_hi)
    return f_lo, f_hi


def cta_q_blocks(rules: Rules, cta_start, keys: int, block_q: int, offset, q_len, kv_len):
    """Query tiles ``[blk_lo, blk_hi)`` that can see any valid key of the CTA's ``keys`` keys from ``cta_start``."""
    k_last = jnp.minimum(cta_start + keys, kv_len) - 1
    lo, hi = rules.q_range(cta_start, k_last, offset, q_len)
    lo = jnp.maximum(lo, 0)
    live = (cta_start < kv_len) & (hi > lo)
    blk_lo = jnp.where(live, lax.div(lo, block_q), 0)
    blk_hi = jnp.where(live, cdiv(hi, block_q), 0)
    return blk_lo, blk_hi


def full_q_blocks(rules: Rules, wg_start, block_kv: int, block_q: int, offset, q_len, kv_len):
    """Query tiles ``[f_lo, f_hi)`` whose every row sees all ``block_kv`` keys from ``wg_start``.

    Empty when the keys reach past ``kv_len`` (they must stay masked). The
    range may reach outside the CTA's visible tiles; callers only compare.
    """
    lo, hi = rules.q_full_range(wg_start, wg_start + block_kv - 1, offset, q_len)
    lo, hi = jnp.maximum(lo, 0), jnp.maximum(hi, 0)
    hi = jnp.where(wg_start + block_kv <= kv_len, hi, 0)
    f_lo = cdiv(lo, block_q)
    f_hi = jnp.maximum(lax.div(hi, block_q), f_lo)
    return f_lo, f_hi


def segment_tile_ranges(row_ids, col_ids, row_len, col_len, row_block: int, col_block: int):
    """Per block of ``row_block`` rows, the column tiles that can hold a key of one of its segments.

    Computed by XLA before a kernel runs (the kernels narrow their tile loops
    with `clip_to_segments`): for packed documents, a query tile's keys are
    those of its documents, so the tiles of the other documents are skipped
    rather than masked. A tile of ``col_block`` columns is in the range of a
    row block when the id ranges (min to max) of their valid positions
    overlap; the range spans from the first such tile to the last, a superset
    of the tiles holding a key of an equal id (for sorted ids, exactly the
    tiles holding an id between the block's least and greatest).

    Args:
      row_ids: int ``[B, R]`` segment ids of the rows (queries, or keys in the dK/dV kernel).
      col_ids: int ``[B, C]`` segment ids of the columns.
      row_len, col_len: int ``[B]`` valid rows and columns (positions past them count for nothing).
      row_block, col_block: block and tile sizes dividing ``R`` and ``C``.

    Returns:
      int32 ``[2, B, R // row_block]``: ``[lo, hi)`` in column tiles; ``0, 0`` where no column can be seen.
    """
    B, R = row_ids.shape
    C = col_ids.shape[1]
    big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min

    def id_range(ids, length, size, block):
        valid = jnp.arange(size)[None, :] < length[:, None]
        blocks = (B, size // block, block)
        ids = ids.astype(jnp.int32)
        return (jnp.where(valid, ids, big).reshape(blocks).min(-1),
                jnp.where(valid, ids, small).reshape(blocks).max(-1))

    row_min, row_max = id_range(row_ids, row_len, R, row_block)
    col_min, col_max = id_range(col_ids, col_len, C, col_block)
    overlap = (col_min[:, None, :] <= row_max[:, :, None]) & (col_max[:, None, :] >= row_min[:, :, None])
    seen = overlap.any(-1)
    lo = jnp.argmax(overlap, axis=-1)
    hi = overlap.shape[-1] - jnp.argmax(overlap[..., ::-1], axis=-1)
    return jnp.stack([jnp.where(seen, lo, 0), jnp.where(seen, hi, 0)]).astype(jnp.int32)


def clip_to_segments(ranges_ref, batch, block, lo, hi):
    """``[lo, hi)`` narrowed to row block ``block``'s `segment_tile_ranges` (read from ``ranges_ref [2, B, n]``).

    Never ``hi < lo``: an empty range stays empty where it starts, so loops and ring positions never run backwards.
    """
    lo = jnp.maximum(lo, ranges_ref[0, batch, block])
    return lo, jnp.maximum(jnp.minimum(hi, ranges_ref[1, batch, block]), lo)
