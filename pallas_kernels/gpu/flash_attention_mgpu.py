"""Flash attention forward for Hopper GPUs (sm_90) in Pallas Mosaic GPU.

Layout ``query [B,T,N,H]``, ``key [B,S,K,H]``, ``value [B,S,K,H]``, output
``[B,T,N,H]`` and base-2 log-sum-exp ``[B,N,T]``, with native grouped-query
attention: query head ``n`` streams the tiles of key/value head ``n // G``
straight from ``key``/``value`` (never repeated).

Serves the rules of `pallas_kernels.rules.Rules` except segment ids: causal
with per-row query offsets (bottom-right by default when ``T != S``), query
and key lengths, a sliding window and a logit soft-cap; bf16 and fp16; head
dims 64, 128 and 256. No bias. `unsupported_reason` says what it refuses, so
dispatch can fall back to the Triton kernel. The output contract is the
Triton forward's (`pallas_kernels.numerics`): ``lse = m + log2(l)`` of the
base-2 logits, and rows that see no key give zeros and `DEAD_LSE`, so both
the Mosaic-GPU backward (`pallas_kernels.gpu.flash_attention_mgpu_backward`,
head dims 64 and 128) and the Triton backward kernels (`flash_backward`, the
fallback) take this forward's residuals.

Design (after FlashAttention-3 and jax's ``attention_mgpu`` example). One CTA
per ``(query head, 2 * block_q query rows, batch row)``, three warpgroups:

* a producer warpgroup (few registers) copies K and V tiles with TMA into a
  ring of ``max_concurrent_steps`` shared-memory slots, each guarded by a
  "ready" barrier (TMA completion) and a "consumed" barrier (both consumers
  done with it);
* two consumer warpgroups, each owning ``block_q`` query rows, run
  ``wgmma`` for ``Q K^T`` (Q and K from shared memory) and ``P V`` (P from
  registers), with the online softmax in float32 registers in between. A
  schedule barrier ping-pongs the two consumers, so one's softmax overlaps the
  other's matrix products.

Both consumers walk the key tiles the CTA can see (``rules.kv_range`` of its
rows); tiles outside it are never loaded. For each consumer the tiles its
rows all see fully (``rules.kv_full_range``) run without mask arithmetic; the
others are masked (causal/window, key length, query length). Masked logits are
``-inf`` and the running max starts at a finite floor, so a row that has seen
nothing keeps ``p == 0`` and ``l == 0`` and never meets ``inf - inf``. In
bf16, ``p`` is taken against ``m + P_SHIFT`` (so ``p <= 2^-32`` and the float32
accumulator of ``p * v`` cannot overflow for values near bf16's max; the lse
adds the shift back); fp16 values cannot overflow it. The
exponent is ``exp2`` with ``scale * log2(e)`` folded into one FMA. Causal
query tiles run longest-first. Sequences are zero-padded to the tiles and the
padding masked by lengths.
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

from pallas_kernels.arguments import check_qkv, pad_axis, round_up
from pallas_kernels.gpu import flash_attention_mgpu_backward as mgpu_backward
from pallas_kernels.gpu.flash_attention import flash_backward
from pallas_kernels.gpu.mgpu_tiles import cta_kv_blocks, full_kv_blocks
from pallas_kernels.numerics import DEAD_LSE, LOG2E
from pallas_kernels.residuals import forward_only, from_base2
from pallas_kernels.rules import Rules

NUM_CONSUMERS = 2  # consumer warpgroups per CTA; the producer is warpgroup 2
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SMEM_BYTES = 227 * 1024  # dynamic shared memory per CTA on sm_90
SMEM_OVERHEAD = 3072  # barriers and alignment that Mosaic GPU adds (2680 bytes seen)
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
# Floor of the running row max: finite, so exp2(m_old - m_new) is never inf - inf.
M_FLOOR = -1e30
RCP_LN2 = 1.0 / math.log(2.0)
# bf16 only: p = exp2(logit - (m + P_SHIFT)) <= 2^-P_SHIFT, so the float32 sum of p * v stays finite for values
# near bf16's max (~2^128) over up to 2^(P_SHIFT - 1) keys; lse adds it back. fp16 needs none (its max is 65504)
# and its p would lose range; bf16 keeps float32's exponent range, so p loses no precision.
P_SHIFT = {jnp.dtype(jnp.bfloat16): 32.0, jnp.dtype(jnp.float16): 0.0}
BACKWARDS = ("mosaic", "triton")  # the backward kernels behind the custom_vjp


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    """Tiles of the Mosaic-GPU forward kernel.

    Attributes:
      block_q: query rows per consumer warpgroup (a CTA covers ``2 * block_q``).
      block_kv: keys per K/V tile.
      max_concurrent_steps: K/V tiles in flight (shared-memory ring slots).
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "max_concurrent_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be an int")
        if self.block_q != 64:
            raise ValueError(f"block_q={self.block_q} must be 64 (one wgmma M tile per consumer warpgroup)")
        if self.block_kv not in (64, 128, 192, 256):
            raise ValueError(f"block_kv={self.block_kv} must be one of 64, 128, 192, 256")
        if not 2 <= self.max_concurrent_steps <= 4:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be in [2, 4]")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "MosaicBlockSizes":
        """Defaults for a head dim (H200 sweep: tools/mgpu_flash_check.py)."""
        if head_dim <= 64:
            return cls(block_q=64, block_kv=128, max_concurrent_steps=2)
        if head_dim <= 128:
            return cls(block_q=64, block_kv=128, max_concurrent_steps=2)
        return cls(block_q=64, block_kv=64, max_concurrent_steps=2)

    def smem_bytes(self, head_dim: int, itemsize: int) -> int:
        """Shared memory of the Q/O tiles, the K/V ring and the lse rows."""
        q = NUM_CONSUMERS * self.block_q * head_dim * itemsize
        kv = 2 * self.max_concurrent_steps * self.block_kv * head_dim * itemsize
        return q + kv + NUM_CONSUMERS * self.block_q * 4 + SMEM_OVERHEAD

    def check(self, head_dim: int, itemsize: int) -> None:
        """Raises ValueError when the tiles do not fit shared memory for ``head_dim``."""
        need = self.smem_bytes(head_dim, itemsize)
        if need > SMEM_BYTES:
            raise ValueError(
                f"block_kv={self.block_kv} with max_concurrent_steps={self.max_concurrent_steps} needs {need} bytes "
                f"of shared memory at head_dim={head_dim}, more than SMEM_BYTES={SMEM_BYTES}"
            )


# ---------------------------------------------------------------------------
# Public wrappers.


def flash_attention(
    query,
    key,
    value,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_offset=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    block_sizes: MosaicBlockSizes | None = None,
    return_residuals: bool = False,
):
    """Flash attention forward with grouped key/value heads on Hopper GPUs (Pallas Mosaic GPU).

    Semantics are those of `gqa_jax.dot_product_attention`; the rules are
    validated by `pallas_kernels.rules.Rules.create`. Differentiable: the
    gradients come from the backward `choose_backward` picks, fed this forward's residuals.

    Args:
      query: ``[B, T, N, H]`` bf16 or fp16, ``H`` in 64, 128, 256.
      key: ``[B, S, K, H]`` with ``N % K == 0``.
      value: ``[B, S, K, H]``.
      scale: logit scale, default ``1/sqrt(H)``.
      is_causal: keys at positions up to the query's own.
      query_offset: int or int ``[B]``: position of query 0 of each row.
      query_seq_lengths: int ``[B]`` valid queries (the rest output zeros).
      key_value_seq_lengths: int ``[B]`` valid keys.
      q_segment_ids: not supported yet (raises).
      kv_segment_ids: not supported yet (raises).
      local_window_size: int or ``(left, right)``.
      logits_soft_cap: ``cap * tanh(logits / cap)``.
      block_sizes: tiles; default `MosaicBlockSizes.for_head_dim`.
      return_residuals: also return the log-sum-exp (`pallas_kernels.residuals`:
        natural log, float32 ``[B, N, T]``, ``-inf`` for rows that see no key);
        forward only.

    Returns:
      ``out [B, T, N, H]`` in the query dtype, or ``(out, lse [B, N, T] float32)``
      with ``return_residuals``.

    Raises:
      ValueError, TypeError: for inconsistent shapes, dtypes or rules.
      NotImplementedError: for what `unsupported_reason` refuses.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    check_qkv(query, key, value, dtypes=None)
    rules = Rules.create(
        query, key, scale=scale, is_causal=is_causal, query_offset=query_offset,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
    )
    reason = _unsupported_inputs(query, key, value, rules, None)
    if reason is not None:
        raise NotImplementedError(f"the Mosaic-GPU flash forward cannot serve this call: {reason}")
    if return_residuals:
        out, lse2 = forward(*forward_only((query, key, value)), rules, block_sizes)
        return out, from_base2(lse2)
    return flash_attention_core(query, key, value, rules, block_sizes=block_sizes)


def flash_attention_core(query, key, value, rules: Rules, *, block_sizes: MosaicBlockSizes | None = None,
                         backward: str = "auto"):
    """`flash_attention` on checked inputs (``rules`` from `Rules.create`), differentiable.

    The forward is this file's kernel; the gradients come from the Mosaic-GPU
    backward (`pallas_kernels.gpu.flash_attention_mgpu_backward`) or the Triton
    backward kernels (`pallas_kernels.gpu.flash_attention.flash_backward`),
    both fed this forward's output and log-sum-exp.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, H]``.
      rules: the validated rules of the call (no segment ids).
      block_sizes: forward tiles; default `MosaicBlockSizes.for_head_dim`.
      backward: ``"mosaic"``, ``"triton"`` or ``"auto"`` (`choose_backward`).

    Returns:
      ``[B, T, N, H]`` in the query dtype.

    Raises:
      ValueError: for an unknown ``backward``.
      NotImplementedError: for ``backward="mosaic"`` on a call the Mosaic backward refuses.
    """
    if backward == "auto":
        backward = choose_backward(query, key, value, rules)
    elif backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {('auto',) + BACKWARDS}, got {backward=}")
    elif backward == "mosaic":
        reason = mgpu_backward.unsupported_reason(query, key, value, rules)
        if reason is not None:
            raise NotImplementedError(f"the Mosaic-GPU flash backward cannot serve this call: {reason}")
    return _attention(block_sizes, backward, query, key, value, rules)


def choose_backward(query, key, value, rules: Rules) -> str:
    """The backward that `flash_attention_core` runs by default: ``"mosaic"`` where it serves, else ``"triton"``.

    Measured rule (H200, bf16, forward+backward TFLOP/s, Mosaic forward with
    the Mosaic / the Triton backward, tools/mgpu_flash_bwd_check.py): the
    Mosaic backward is faster on all eight bench shapes, 1.07-1.30x
    (B2 S4096 N32 K8 H128 391/341 causal, 464/364 full; B1 S16384 455/368,
    498/382; B4 S2048 N16 K2 H64 219/169, 357/274; B8 S1024 N32 K4 H128
    286/266, 421/328), so the Triton backward runs only where the Mosaic one
    refuses (head dim 256).
    """
    if mgpu_backward.unsupported_reason(query, key, value, rules) is not None:
        return "triton"
    return "mosaic"


def unsupported_reason(query, key, value, rules: Rules, bias) -> str | None:
    """Why this kernel cannot serve a call (None when it can), for dispatch.

    Args:
      query: ``[B, T, N, H]`` (anything with ``.shape`` and ``.dtype``).
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      rules: the validated rules of the call.
      bias: the call's bias or None.
    """
    reason = _unsupported_inputs(query, key, value, rules, bias)
    if reason is not None:
        return reason
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return "no device"
    if device.platform != "gpu" or not str(getattr(device, "compute_capability", "")).startswith("9"):
        return f"needs a Hopper GPU (compute capability 9.x), got {device.device_kind} ({device.platform})"
    return None


def _unsupported_inputs(query, key, value, rules: Rules, bias) -> str | None:
    """The shape, dtype and rule checks of `unsupported_reason` (no device check)."""
    if bias is not None:
        return "a bias is not supported"
    if rules.has_segments:
        return "segment ids are not supported yet"
    dtype = jnp.dtype(query.dtype)
    if dtype not in DTYPES or jnp.dtype(key.dtype) != dtype or jnp.dtype(value.dtype) != dtype:
        return f"dtypes must be bf16 or fp16 and equal, got {query.dtype=}, {key.dtype=}, {value.dtype=}"
    H, Hv = query.shape[-1], value.shape[-1]
    if H not in HEAD_DIMS or Hv != H:
        return f"head dims must be equal and one of {HEAD_DIMS}, got H={H}, Hv={Hv}"
    if rules.soft_cap is None and rules.scale <= 0:
        # The kernel takes the row max before scaling (max(s) * scale == max(s * scale) needs scale > 0).
        return f"the logit scale must be positive without a soft-cap, got scale={rules.scale}"
    return None


# ---------------------------------------------------------------------------
# Differentiable core: this forward, the Mosaic-GPU or Triton backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(block_sizes, backward, query, key, value, rules):
    out, _ = forward(query, key, value, rules, block_sizes)
    return out


def _attention_fwd(block_sizes, backward, query, key, value, rules):
    out, lse = forward(query, key, value, rules, block_sizes)
    return out, (query, key, value, rules, out, lse)


def _attention_bwd(block_sizes, backward, residuals, d_out):
    query, key, value, rules, out, lse = residuals
    if backward == "mosaic":
        dq, dk, dv = mgpu_backward.backward(query, key, value, out, lse, d_out, rules)
    else:
        dq, dk, dv, _ = flash_backward(query, key, value, out, lse, d_out, rules)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------
# Forward builder (pads, then one plgpu.kernel).


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def forward(query, key, value, rules: Rules, block_sizes: MosaicBlockSizes | None = None):
    """The forward core on checked inputs: ``(out [B,T,N,H] query.dtype, lse [B,N,T] float32)``.

    ``lse`` is base 2 of the base-2 logits (``m + log2(l)``), `DEAD_LSE` for
    rows that see no key (their ``out`` is zero).

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, H]``.
      rules: the validated rules of the call (no segment ids).
      block_sizes: tiles; default `MosaicBlockSizes.for_head_dim`.
    """
    B, T, N, H = query.shape
    S = key.shape[1]
    blocks = block_sizes or MosaicBlockSizes.for_head_dim(H)
    blocks.check(H, jnp.dtype(query.dtype).itemsize)
    T_pad = round_up(T, NUM_CONSUMERS * blocks.block_q)
    S_pad = round_up(S, blocks.block_kv)
    q = pad_axis(query, 1, T_pad)
    k = pad_axis(key, 1, S_pad)
    v = pad_axis(value, 1, S_pad)
    padded = rules.padded(T, S, T_pad, S_pad)
    # Keys past S are padding whatever the lengths say (under jit they are not checked).
    kv_len = jnp.minimum(padded.kv_len, S)
    q_len = jnp.minimum(padded.q_len, T)
    out, lse = _forward_call(padded, blocks, padded.q_offset, q_len, kv_len, q, k, v)
    return out[:, :T], lse[:, :, :T]


def _forward_call(rules: Rules, blocks: MosaicBlockSizes, offset, q_len, kv_len, q, k, v):
    """The ``plgpu.kernel`` on padded inputs: ``(out [B,T_pad,N,H], lse [B,N,T_pad])``."""
    B, T_pad, N, H = q.shape
    K = k.shape[2]
    rows = NUM_CONSUMERS * blocks.block_q
    num_q_tiles = T_pad // rows
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    stages = blocks.max_concurrent_steps
    scratch = [
        plgpu.SMEM((NUM_CONSUMERS, blocks.block_q, H), q.dtype, transforms=tiled),
        plgpu.SMEM((stages, blocks.block_kv, H), k.dtype, transforms=tiled),
        plgpu.SMEM((stages, blocks.block_kv, H), v.dtype, transforms=tiled),
        plgpu.SMEM((NUM_CONSUMERS, blocks.block_q), jnp.float32),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=NUM_CONSUMERS),
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS),
    ]
    kernel = functools.partial(_forward_kernel, rules=rules.statics(), blocks=blocks, num_groups=N // K,
                               num_q_tiles=num_q_tiles)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, T_pad, N, H), q.dtype), jax.ShapeDtypeStruct((B, N, T_pad), jnp.float32)),
        scratch_types=scratch,
        grid=(N, num_q_tiles, B),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=NUM_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(offset, q_len, kv_len, q, k, v)


# ---------------------------------------------------------------------------
# Kernel body: two consumer warpgroups and a TMA producer.


def _forward_kernel(offset_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
                    qo_smem, k_smem, v_smem, lse_smem, k_ready, v_ready, q_ready, k_consumed, v_consumed, schedule,
                    *, rules: Rules, blocks: MosaicBlockSizes, num_groups: int, num_q_tiles: int):
    bq, bkv, stages = blocks.block_q, blocks.block_kv, blocks.max_concurrent_steps
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    shift = P_SHIFT[jnp.dtype(dtype)]
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = lax.axis_index("q_tiles")
    if rules.is_causal:
        tile = num_q_tiles - 1 - tile
    wg = lax.axis_index("wg")
    offset, q_len, kv_len = offset_ref[batch], q_len_ref[batch], kv_len_ref[batch]
    cta_start = tile * (NUM_CONSUMERS * bq)
    blk_lo, blk_hi = cta_kv_blocks(rules, cta_start, NUM_CONSUMERS * bq, bkv, offset, q_len, kv_len)
    num_steps = blk_hi - blk_lo

    def slot_of(j):
        return lax.rem(j - blk_lo, stages)

    def schedule_barrier():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < NUM_CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        qo = qo_smem.at[wg]
        wg_start = cta_start + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(wg_start, bq), head], qo, q_ready.at[wg])
        f_lo, f_hi = full_kv_blocks(rules, wg_start, bq, bkv, offset, q_len, kv_len, blk_lo, blk_hi)
        if rules.soft_cap is None:
            pre_scale, scale2 = None, rules.scale * LOG2E
        else:
            pre_scale, scale2 = rules.scale / rules.soft_cap, rules.soft_cap * LOG2E

        m = plgpu.layout_cast(jnp.full((bq,), M_FLOOR, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.full((bq,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((bq, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(q_ready.at[wg])

        @pl.when(num_steps > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        pl.when(wg == 1)(schedule_barrier)

        def body(j, carry, *, masked: bool):
            acc, m, l = carry
            slot = slot_of(j)

            def qk_product(acc_ref):
                plgpu.wgmma(acc_ref, qo, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                schedule_barrier()
                return acc_ref[...]

            s = pl.run_scoped(qk_product, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if pre_scale is not None:
                s = jnp.tanh(s * pre_scale)
            if masked:
                row = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                col = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                k_idx = col + j * bkv
                visible = (k_idx < kv_len) & (row < q_len - wg_start)
                positional = rules.visible(row + (offset + wg_start), k_idx)
                if positional is not None:
                    visible = visible & positional
                s = jnp.where(visible, s, -jnp.inf)
            # Base-2 online softmax; scale2 > 0 commutes with the max, so p is one FMA per logit.
            m_new = jnp.maximum(m, s.max(axis=1) * scale2)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new + shift if shift else m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha
            p16 = p.astype(dtype)

            def end_softmax():
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(schedule)

            # The order of the row sum and the barriers matters for speed (as in jax's example).
            if head_dim <= 128:
                l = l + p.sum(axis=1)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                end_softmax()
            else:
                end_softmax()
                l = l + p.sum(axis=1)

            def pv_product(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                @pl.when(j + 1 < blk_hi)
                def _():
                    plgpu.barrier_wait(k_ready.at[slot_of(j + 1)])

            acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        carry = lax.fori_loop(blk_lo, f_lo, functools.partial(body, masked=True), carry)
        carry = lax.fori_loop(f_lo, f_hi, functools.partial(body, masked=False), carry)
        acc, m, l = lax.fori_loop(f_hi, blk_hi, functools.partial(body, masked=True), carry)
        pl.when(wg == 0)(schedule_barrier)

        live = m > 0.5 * M_FLOOR
        l_safe = jnp.where(live, l, 1.0)
        acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        qo[...] = acc.astype(dtype)
        lse_smem.at[wg][...] = jnp.where(live, m + (jnp.log(l_safe) * RCP_LN2 + shift), DEAD_LSE)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo, out_ref.at[batch, pl.ds(wg_start, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(wg_start, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_CONSUMERS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.array(num_groups, head.dtype))

        def issue(step, slot):
            keys = (batch, pl.ds((blk_lo + step) * bkv, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

        for slot in range(stages):
            pl.when(slot < num_steps)(functools.partial(issue, slot, slot))

        @pl.loop(stages, jnp.maximum(num_steps, stages))
        def _(step):
            slot = lax.rem(step, stages)
            keys = (batch, pl.ds((blk_lo + step) * bkv, bkv), kv_head)
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])
