"""Flash attention backward for Hopper GPUs (sm_90) in Pallas Mosaic GPU.

The gradients of `pallas_kernels.gpu.flash_attention_mgpu` from its residuals
(``out`` and the base-2 log-sum-exp ``lse2 = m + log2(l)`` of the base-2
logits, `DEAD_LSE` for rows that see no key), in two ``plgpu.kernel`` calls:

* dK/dV: one CTA per ``(KV head, 2 * block_kv keys, batch row)``. Each of two
  consumer warpgroups holds ``block_kv`` keys and values in shared memory and
  the float32 ``dK``/``dV`` accumulators in registers; a producer warpgroup
  streams ``(Q, dO, lse, delta)`` tiles by TMA over the visible query tiles of
  every one of the ``G`` query heads of that KV head (native GQA: K/V are
  never repeated, dK/dV are summed over the group in registers). Per step:
  ``S^T = K Q^T``, ``P^T = exp2(S^T - lse)``, ``dV += P^T dO``,
  ``dP^T = V dO^T``, ``dS^T = P^T (dP^T - delta)``, ``dK += dS^T Q``.
* dQ: one CTA per ``(query head, 2 * block_q rows, batch row)``, consumers
  holding ``Q``, ``dO``, ``lse`` and ``delta`` of their rows and streaming the
  visible K/V tiles: ``S = Q K^T``, ``dP = dO V^T``, ``dQ += dS K``.

All matrix products are ``wgmma``; ``delta = rowsum(dO * O)`` is computed in
XLA. Rules come from `pallas_kernels.rules.Rules` as in the forward: causal
with per-row offsets, query/key lengths, segment ids, sliding window and the
logit soft-cap (its derivative ``1 - tanh^2`` is applied to ``dS``). Tiles
outside the visible range are never loaded (`pallas_kernels.gpu.mgpu_tiles`);
tiles every row or key of a consumer sees fully skip the mask arithmetic
(none with segment ids: every tile is masked); masked logits are ``-inf``, so
masked and dead entries give ``P == 0`` and zero gradients. With segment ids,
a consumer loads the ids of the rows (dQ) or keys (dK/dV) it holds once, and
the producer streams the other side's ids with each tile, as one more
pipeline input, and each CTA's loop is narrowed to the tiles that can hold
its segments (`mgpu_tiles.segment_tile_ranges`). Sequences are zero-padded to the tiles (lse padded with
`DEAD_LSE`).

Serves what the forward serves with head dims 64 and 128 (at 256 the two
float32 ``[block_kv, 256]`` accumulators of a consumer do not fit in
registers); `unsupported_reason` says what it refuses, and the forward's
``custom_vjp`` falls back to the Triton backward then.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.arguments import out_struct, pad_axis, round_up, vary_like
from pallas_kernels.gpu.mgpu_tiles import (
    clip_to_segments,
    cta_kv_blocks,
    cta_q_blocks,
    full_kv_blocks,
    full_q_blocks,
    segment_tile_ranges,
)
from pallas_kernels.numerics import DEAD_LSE, LOG2E
from pallas_kernels.rules import Rules

NUM_CONSUMERS = 2  # consumer warpgroups per CTA; the producer is the last warpgroup
HEAD_DIMS = (64, 128)
SMEM_BYTES = 227 * 1024  # dynamic shared memory per CTA on sm_90
SMEM_OVERHEAD = 3072  # barriers and alignment that Mosaic GPU adds
PRODUCER_REGISTERS = 40
_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a [64, n] wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


@dataclasses.dataclass(frozen=True)
class MosaicBackwardBlockSizes:
    """Tiles of the Mosaic-GPU backward kernels; the defaults serve both masks.

    Defaults measured forward+backward (tools/mgpu_flash_bwd_check.py, bf16,
    TFLOP/s). On an H100 in one run, causal, against the earlier causal
    default (64-key dQ steps, 3 stages, heads first): B2 S4096 N32 K8 H128 413
    vs 403, B1 S16384 487 vs 467, B4 S2048 N16 K2 H64 229 vs 225,
    B8 S1024 N32 K4 H128 303 vs 280; full, tiles first against heads first:
    479 vs 474, 507 vs 511, 366 vs 368 (within the noise). Earlier on the
    H200, 128-key dQ steps against 64 (full): 488/466, 498/495, 357/356,
    421/430.

    Attributes:
      block_q_dkv: query rows per pipeline step of the dK/dV kernel.
      block_kv_dkv: keys per consumer warpgroup of the dK/dV kernel (one wgmma M tile).
      block_q_dq: query rows per consumer warpgroup of the dQ kernel (one wgmma M tile).
      block_kv_dq: keys per pipeline step of the dQ kernel.
      max_concurrent_steps: tiles in flight (shared-memory ring slots) in both kernels.
      tiles_first: both grids run the tiles of one head before the next head's,
        so the CTAs running at once stream one head's Q/dO (dK/dV kernel) or
        K/V (dQ kernel) through L2; otherwise heads vary fastest.
    """

    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 128
    max_concurrent_steps: int = 2
    tiles_first: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "tiles_first":
                if not isinstance(value, bool):
                    raise TypeError(f"{field.name}={value!r} must be a bool")
            elif not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{field.name}={value!r} must be an int")
        for name in ("block_kv_dkv", "block_q_dq"):
            if getattr(self, name) != 64:
                raise ValueError(f"{name}={getattr(self, name)} must be 64 (one wgmma M tile per consumer warpgroup)")
        for name in ("block_q_dkv", "block_kv_dq"):
            if getattr(self, name) not in (64, 128):
                raise ValueError(f"{name}={getattr(self, name)} must be 64 or 128")
        if not 2 <= self.max_concurrent_steps <= 4:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be in [2, 4]")

    def smem_bytes(self, head_dim: int, itemsize: int, segments: bool = False) -> int:
        """Shared memory of the larger of the two kernels (with segments, each streamed tile's segment ids too)."""
        stages = self.max_concurrent_steps
        seg = 4 if segments else 0
        dkv = (NUM_CONSUMERS * 2 * self.block_kv_dkv * head_dim * itemsize
               + stages * (2 * self.block_q_dkv * head_dim * itemsize + (2 * 4 + seg) * self.block_q_dkv))
        dq = (NUM_CONSUMERS * 2 * self.block_q_dq * head_dim * itemsize
              + stages * (2 * self.block_kv_dq * head_dim * itemsize + seg * self.block_kv_dq))
        return max(dkv, dq) + SMEM_OVERHEAD

    def check(self, head_dim: int, itemsize: int, segments: bool = False) -> None:
        """Raises ValueError when the tiles do not fit shared memory for ``head_dim`` (and segment ids)."""
        need = self.smem_bytes(head_dim, itemsize, segments)
        if need > SMEM_BYTES:
            raise ValueError(
                f"max_concurrent_steps={self.max_concurrent_steps} with block_q_dkv={self.block_q_dkv}, "
                f"block_kv_dq={self.block_kv_dq} needs {need} bytes of shared memory at head_dim={head_dim} "
                f"({segments=}), more than SMEM_BYTES={SMEM_BYTES}"
            )


# ---------------------------------------------------------------------------
# Kernel bodies.


def _base2_logits(s, rules: Rules):
    """``(tanh of the soft-cap or None, base-2 logits)`` of raw scores ``s = q . k``."""
    if rules.soft_cap is None:
        return None, s * (rules.scale * LOG2E)
    t = jnp.tanh(s * (rules.scale / rules.soft_cap))
    return t, t * (rules.soft_cap * LOG2E)


def _mask_tile(logits2, *, q_axis: int, row_start, col_tile, col_block: int, full_cols, row_seg, col_seg,
               rules: Rules, offset, q_len, kv_len):
    """``logits2`` with ``-inf`` where the rules hide a key from a query, on the tiles that need it.

    A tile's rows are the side the kernel holds (from ``row_start``) and its
    columns the streamed side's tile ``col_tile`` of ``col_block``: queries
    on rows in the dQ kernel (``q_axis=0``), keys on rows in the dK/dV kernel
    (``q_axis=1``). ``row_seg``/``col_seg`` are the segment ids along each
    axis, or None. Without segment ids only column tiles outside
    ``full_cols = (lo, hi)`` (the tiles every row sees whole) are masked; with
    them every tile is.
    """

    def masked():
        rows = plgpu.broadcasted_iota(jnp.int32, logits2.shape, 0, layout=plgpu.Layout.WGMMA) + row_start
        cols = plgpu.broadcasted_iota(jnp.int32, logits2.shape, 1, layout=plgpu.Layout.WGMMA) + col_tile * col_block
        q_idx, k_idx = (rows, cols) if q_axis == 0 else (cols, rows)
        same = None
        if row_seg is not None:
            same = (lax.broadcast_in_dim(row_seg, logits2.shape, [0])
                    == lax.broadcast_in_dim(col_seg, logits2.shape, [1]))
        visible = (k_idx < kv_len) & (q_idx < q_len)
        positional = rules.visible(q_idx + offset, k_idx)
        if positional is not None:
            visible = visible & positional
        if same is not None:
            visible = visible & same
        return jnp.where(visible, logits2, -jnp.inf)

    if row_seg is None:
        lo, hi = full_cols
        return lax.cond((col_tile < lo) | (col_tile >= hi), masked, lambda: logits2)
    return masked()  # segment ids can hide any key from any query: every tile is masked


def _step_refs(refs_and_carry):
    """A pipeline step's arguments after the indices: ``(shared-memory tiles, their consumed barriers, carry)``.

    Both lists follow the pipeline's inputs, whose number depends on whether segment ids are streamed.
    """
    *refs, carry = refs_and_carry
    half = len(refs) // 2
    return refs[:half], refs[half:], carry


def _grad_logits(p, dp, delta_b, tanh):
    """``dS`` w.r.t. the raw scores, up to the factor ``scale`` applied at the end."""
    ds = p * (dp - delta_b)
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    return ds


def _dkv_kernel(offset_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs,
                dk_ref, dv_ref, k_smem2, v_smem2, kv_ready, *, rules: Rules, blocks: MosaicBackwardBlockSizes,
                num_groups: int):
    bq, bkv = blocks.block_q_dkv, blocks.block_kv_dkv
    q_seg_ref, kv_seg_ref, ranges_ref = (None, None, None) if seg_refs is None else seg_refs
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    offset, q_len, kv_len = offset_ref[batch], q_len_ref[batch], kv_len_ref[batch]
    kv_tile = lax.axis_index("kv_tiles")
    cta_start = kv_tile * (NUM_CONSUMERS * bkv)
    blk_lo, blk_hi = cta_q_blocks(rules, cta_start, NUM_CONSUMERS * bkv, bq, offset, q_len, kv_len)
    if ranges_ref is not None:  # only the query tiles of the keys' segments
        blk_lo, blk_hi = clip_to_segments(ranges_ref, batch, kv_tile, blk_lo, blk_hi)
    wg_start = cta_start + wg * bkv
    f_lo, f_hi = full_q_blocks(rules, wg_start, bkv, bq, offset, q_len, kv_len)
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    keys = (batch, pl.ds(wg_start, bkv), kv_head)

    def compute_context(pipeline_callback):
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_ready.at[wg])
        # One segment id per row of the consumer's [bkv, bq] logits (its keys).
        kv_seg = None if kv_seg_ref is None else plgpu.load(kv_seg_ref.at[batch, pl.ds(wg_start, bkv)], (),
                                                            layout=_ROW, optimized=False)
        plgpu.barrier_wait(kv_ready.at[wg])

        def accumulate(dk_acc, dv_acc):
            pipeline_callback((dk_acc, dv_acc, kv_seg))
            return dk_acc[...], dv_acc[...]

        acc = plgpu.ACC((bkv, head_dim), jnp.float32)
        dk, dv = pl.run_scoped(accumulate, acc, acc)
        k_smem[...] = (dk * rules.scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    def step(indices, *refs_and_carry):
        smems, consumed, carry = _step_refs(refs_and_carry)
        q_smem, do_smem, lse_smem, delta_smem, *q_seg_smem = smems
        q_consumed, do_consumed, lse_consumed, delta_consumed, *q_seg_consumed = consumed
        q_blk = blk_lo + indices[0]
        dk_acc, dv_acc, kv_seg = carry

        def scores(acc):
            plgpu.wgmma(acc, k_smem, plgpu.transpose_ref(q_smem, (1, 0)))
            lse = plgpu.load(lse_smem, (), layout=_COL)
            delta = plgpu.load(delta_smem, (), layout=_COL)
            plgpu.barrier_arrive(lse_consumed)
            plgpu.barrier_arrive(delta_consumed)
            q_seg = None
            if q_seg_smem:  # the query tile's segment ids, one per column
                q_seg = plgpu.load(q_seg_smem[0], (), layout=_COL)
                plgpu.barrier_arrive(q_seg_consumed[0])
            return acc[...], lse, delta, q_seg

        s_t, lse, delta, q_seg = pl.run_scoped(scores, plgpu.ACC((bkv, bq), jnp.float32))
        tanh, logits2 = _base2_logits(s_t, rules)

        logits2 = _mask_tile(logits2, q_axis=1, row_start=wg_start, col_tile=q_blk, col_block=bq,
                             full_cols=(f_lo, f_hi), row_seg=kv_seg, col_seg=q_seg, rules=rules, offset=offset,
                             q_len=q_len, kv_len=kv_len)
        p_t = jnp.exp2(logits2 - lax.broadcast_in_dim(lse, s_t.shape, [1]))

        def products(acc):
            plgpu.wgmma(acc, v_smem, plgpu.transpose_ref(do_smem, (1, 0)))
            plgpu.wgmma(dv_acc, p_t.astype(dtype), do_smem)
            return plgpu.wgmma_accumulator_load(acc, wait_n=1)  # dP^T, while dV may still run

        dp_t = pl.run_scoped(products, plgpu.ACC((bkv, bq), jnp.float32))
        ds_t = _grad_logits(p_t, dp_t, lax.broadcast_in_dim(delta, s_t.shape, [1]), tanh)
        plgpu.wgmma(dk_acc, ds_t.astype(dtype), q_smem)
        plgpu.wgmma_wait(1)
        plgpu.barrier_arrive(do_consumed)
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(q_consumed)
        return dk_acc, dv_acc, kv_seg

    def head_of(g):
        return kv_head * num_groups + g

    rows = functools.partial(plgpu.BlockSpec, (bq, None, head_dim), transforms=_TILED)
    stats = functools.partial(plgpu.BlockSpec, (None, bq))
    in_specs = [
        rows(lambda i, g: (blk_lo + i, head_of(g), 0)),  # q
        rows(lambda i, g: (blk_lo + i, head_of(g), 0)),  # dO
        stats(lambda i, g: (head_of(g), blk_lo + i)),  # lse
        stats(lambda i, g: (head_of(g), blk_lo + i)),  # delta
    ]
    inputs = [q_ref.at[batch], do_ref.at[batch], lse_ref.at[batch], delta_ref.at[batch]]
    if q_seg_ref is not None:
        in_specs.append(stats(lambda i, g: (batch, blk_lo + i)))  # the query tile's segment ids
        inputs.append(q_seg_ref)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(blk_hi - blk_lo, num_groups),
        max_concurrent_steps=blocks.max_concurrent_steps,
        num_compute_wgs=NUM_CONSUMERS,
        memory_registers=PRODUCER_REGISTERS,
        wg_axis="wg",
        manual_consumed_barriers=True,
        compute_context=compute_context,
        in_specs=in_specs,
    )
    pipeline(*inputs)


def _dq_kernel(offset_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs, dq_ref,
               q_smem2, do_smem2, q_ready, *, rules: Rules, blocks: MosaicBackwardBlockSizes, num_groups: int,
               num_q_tiles: int):
    bq, bkv = blocks.block_q_dq, blocks.block_kv_dq
    q_seg_ref, kv_seg_ref, ranges_ref = (None, None, None) if seg_refs is None else seg_refs
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = lax.axis_index("q_tiles")
    if rules.is_causal:
        tile = num_q_tiles - 1 - tile  # longest rows first
    wg = lax.axis_index("wg")
    offset, q_len, kv_len = offset_ref[batch], q_len_ref[batch], kv_len_ref[batch]
    cta_start = tile * (NUM_CONSUMERS * bq)
    blk_lo, blk_hi = cta_kv_blocks(rules, cta_start, NUM_CONSUMERS * bq, bkv, offset, q_len, kv_len)
    if ranges_ref is not None:  # only the key tiles of the rows' segments
        blk_lo, blk_hi = clip_to_segments(ranges_ref, batch, tile, blk_lo, blk_hi)
    wg_start = cta_start + wg * bq
    f_lo, f_hi = full_kv_blocks(rules, wg_start, bq, bkv, offset, q_len, kv_len, blk_lo, blk_hi)
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    rows = (batch, pl.ds(wg_start, bq), head)
    kv_head = lax.div(head, jnp.array(num_groups, head.dtype))

    def compute_context(pipeline_callback):
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, q_ready.at[wg])
        stats = (batch, head, pl.ds(wg_start, bq))
        lse = plgpu.load(lse_ref.at[stats], (), layout=_ROW, optimized=False)
        delta = plgpu.load(delta_ref.at[stats], (), layout=_ROW, optimized=False)
        q_seg = None if q_seg_ref is None else plgpu.load(q_seg_ref.at[batch, pl.ds(wg_start, bq)], (),
                                                          layout=_ROW, optimized=False)
        plgpu.barrier_wait(q_ready.at[wg])

        def accumulate(dq_acc):
            pipeline_callback((dq_acc, lse, delta, q_seg))
            return dq_acc[...]

        dq = pl.run_scoped(accumulate, plgpu.ACC((bq, head_dim), jnp.float32))
        q_smem[...] = (dq * rules.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    def step(indices, *refs_and_carry):
        (k_smem, v_smem, *kv_seg_smem), (k_consumed, v_consumed, *kv_seg_consumed), carry = _step_refs(refs_and_carry)
        k_blk = blk_lo + indices[0]
        dq_acc, lse, delta, q_seg = carry

        def products(s_acc, dp_acc):
            plgpu.wgmma(dp_acc, do_smem, plgpu.transpose_ref(v_smem, (1, 0)))
            plgpu.wgmma(s_acc, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
            kv_seg = None
            if kv_seg_smem:  # the key tile's segment ids, one per column, loaded while the wgmmas run
                kv_seg = plgpu.load(kv_seg_smem[0], (), layout=_COL)
                plgpu.barrier_arrive(kv_seg_consumed[0])
            plgpu.wgmma_wait(1)
            plgpu.barrier_arrive(v_consumed)
            return s_acc[...], dp_acc[...], kv_seg

        acc = plgpu.ACC((bq, bkv), jnp.float32)
        s, dp, kv_seg = pl.run_scoped(products, acc, acc)
        tanh, logits2 = _base2_logits(s, rules)

        logits2 = _mask_tile(logits2, q_axis=0, row_start=wg_start, col_tile=k_blk, col_block=bkv,
                             full_cols=(f_lo, f_hi), row_seg=q_seg, col_seg=kv_seg, rules=rules, offset=offset,
                             q_len=q_len, kv_len=kv_len)
        p = jnp.exp2(logits2 - lax.broadcast_in_dim(lse, s.shape, [0]))
        ds = _grad_logits(p, dp, lax.broadcast_in_dim(delta, s.shape, [0]), tanh)
        plgpu.wgmma(dq_acc, ds.astype(dtype), k_smem)
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(k_consumed)
        return dq_acc, lse, delta, q_seg

    keys = functools.partial(plgpu.BlockSpec, (bkv, head_dim), transforms=_TILED)
    in_specs = [keys(lambda i: (blk_lo + i, 0)), keys(lambda i: (blk_lo + i, 0))]
    inputs = [k_ref.at[batch, :, kv_head, :], v_ref.at[batch, :, kv_head, :]]
    if kv_seg_ref is not None:
        in_specs.append(plgpu.BlockSpec((None, bkv), lambda i: (batch, blk_lo + i)))  # the key tile's segment ids
        inputs.append(kv_seg_ref)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(blk_hi - blk_lo,),
        max_concurrent_steps=blocks.max_concurrent_steps,
        num_compute_wgs=NUM_CONSUMERS,
        memory_registers=PRODUCER_REGISTERS,
        wg_axis="wg",
        manual_consumed_barriers=True,
        compute_context=compute_context,
        in_specs=in_specs,
    )
    pipeline(*inputs)


# ---------------------------------------------------------------------------
# Public entry points.


def unsupported_reason(query, key, value, rules: Rules) -> str | None:
    """Why this backward cannot serve a call the Mosaic-GPU forward serves (None when it can).

    Args:
      query: ``[B, T, N, H]`` (anything with ``.shape`` and ``.dtype``).
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, H]``.
      rules: the validated rules of the call.
    """
    H = query.shape[-1]
    if H not in HEAD_DIMS:
        return f"head dim H={H} is not one of {HEAD_DIMS} (dK and dV accumulators would not fit in registers)"
    return None


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def backward(query, key, value, out, lse2, d_out, rules: Rules, block_sizes: MosaicBackwardBlockSizes | None = None):
    """Gradients ``(dq, dk, dv)`` of the Mosaic-GPU forward, in the dtypes of ``query, key, value``.

    Args:
      query: ``[B, T, N, H]`` bf16 or fp16.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, H]``.
      out: ``[B, T, N, H]`` the forward's output.
      lse2: ``[B, N, T]`` float32, the forward's base-2 log-sum-exp (`DEAD_LSE` for dead rows).
      d_out: ``[B, T, N, H]`` the output cotangent.
      rules: the validated rules of the call.
      block_sizes: tiles; default `MosaicBackwardBlockSizes()`.
    """
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    blocks = block_sizes or MosaicBackwardBlockSizes()
    blocks.check(H, jnp.dtype(query.dtype).itemsize, rules.has_segments)
    T_pad = round_up(T, math.lcm(NUM_CONSUMERS * blocks.block_q_dq, blocks.block_q_dkv))
    S_pad = round_up(S, math.lcm(NUM_CONSUMERS * blocks.block_kv_dkv, blocks.block_kv_dq))
    d_out = d_out.astype(query.dtype)
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    q, do = pad_axis(query, 1, T_pad), pad_axis(d_out, 1, T_pad)
    k, v = pad_axis(key, 1, S_pad), pad_axis(value, 1, S_pad)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, T_pad - T)), constant_values=DEAD_LSE)
    delta = pad_axis(delta, 2, T_pad)
    padded = rules.padded(T, S, T_pad, S_pad)
    kv_len = jnp.minimum(padded.kv_len, S)
    q_len = jnp.minimum(padded.q_len, T)
    rows_dq = NUM_CONSUMERS * blocks.block_q_dq
    keys_dkv = NUM_CONSUMERS * blocks.block_kv_dkv
    args = (padded.q_offset, q_len, kv_len, q, k, v, do, lse2, delta)
    segments_dq = segments_dkv = None
    if padded.has_segments:  # each kernel narrows its loop to the tiles of its rows' segments (segment_tile_ranges)
        q_seg, kv_seg = padded.q_segment_ids, padded.kv_segment_ids
        segments_dq = (q_seg, kv_seg, segment_tile_ranges(q_seg, kv_seg, q_len, kv_len, rows_dq,
                                                          blocks.block_kv_dq))
        segments_dkv = (q_seg, kv_seg, segment_tile_ranges(kv_seg, q_seg, kv_len, q_len, keys_dkv,
                                                           blocks.block_q_dkv))
    statics = dict(rules=rules.statics(), blocks=blocks, num_groups=N // K)
    params = plgpu.CompilerParams(approx_math=True)
    launch = dict(num_threads=NUM_CONSUMERS + 1, thread_name="wg", compiler_params=params)

    def grid(heads: int, tiles: int, tile_name: str):
        if blocks.tiles_first:
            return dict(grid=(tiles, heads, B), grid_names=(tile_name, "heads", "batch"))
        return dict(grid=(heads, tiles, B), grid_names=("heads", tile_name, "batch"))

    dq = plgpu.kernel(
        functools.partial(_dq_kernel, num_q_tiles=T_pad // rows_dq, **statics),
        out_type=out_struct(q.shape, q.dtype, args, segments_dq),
        scratch_types=[
            plgpu.SMEM((NUM_CONSUMERS, blocks.block_q_dq, H), q.dtype, transforms=_TILED),
            plgpu.SMEM((NUM_CONSUMERS, blocks.block_q_dq, H), q.dtype, transforms=_TILED),
            plgpu.Barrier(num_arrivals=2, num_barriers=NUM_CONSUMERS),
        ],
        **grid(N, T_pad // rows_dq, "q_tiles"),
        **launch,
    )(*args, segments_dq)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, **statics),
        out_type=(out_struct(k.shape, k.dtype, args, segments_dkv), out_struct(v.shape, v.dtype, args, segments_dkv)),
        scratch_types=[
            plgpu.SMEM((NUM_CONSUMERS, blocks.block_kv_dkv, H), k.dtype, transforms=_TILED),
            plgpu.SMEM((NUM_CONSUMERS, blocks.block_kv_dkv, H), v.dtype, transforms=_TILED),
            plgpu.Barrier(num_arrivals=2, num_barriers=NUM_CONSUMERS),
        ],
        **grid(K, S_pad // keys_dkv, "kv_tiles"),
        **launch,
    )(*args, segments_dkv)
    dq, dk, dv = vary_like((dq, dk, dv), (args, segments_dq))
    return dq[:, :T], dk[:, :S], dv[:, :S]
