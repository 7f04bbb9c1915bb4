"""Flash attention forward for Hopper GPUs (sm_90) in Pallas Mosaic GPU.

Layout ``query [B,T,N,H]``, ``key [B,S,K,H]``, ``value [B,S,K,H]``, output
``[B,T,N,H]`` and base-2 log-sum-exp ``[B,N,T]``, with native grouped-query
attention: query head ``n`` streams the tiles of key/value head ``n // G``
straight from ``key``/``value`` (never repeated).

Serves the rules of `pallas_kernels.rules.Rules`: causal with per-row query
offsets (bottom-right by default when ``T != S``), query and key lengths,
segment ids, a sliding window and a logit soft-cap; bf16 and fp16; head
dims 64, 128 and 256. No bias. `unsupported_reason` says what it refuses, so
dispatch can fall back to the Triton kernel. The output contract is the
Triton forward's (`pallas_kernels.numerics`): ``lse = m + log2(l)`` of the
base-2 logits, and rows that see no key give zeros and `DEAD_LSE`, so both
the Mosaic-GPU backward (`pallas_kernels.gpu.flash_attention_mgpu_backward`,
head dims 64 and 128) and the Triton backward kernels (`flash_backward`, the
fallback) take this forward's residuals.

Design (after FlashAttention-3, jax's ``attention_mgpu`` example and
tokamax's sm90 kernel). A work item is ``(query head, 2 * block_q query rows,
batch row)``, heads varying fastest (the query heads of one KV head run side
by side and share its tiles in L2); a CTA of three warpgroups runs one item,
or, with the persistent grid (`MosaicBlockSizes.persistent`, the default
without causal masking), one CTA per SM walks the items:

* a producer warpgroup (few registers) whose first warp copies K and V tiles
  with TMA into a ring of ``max_concurrent_steps`` shared-memory slots; each
  slot has a "ready" mbarrier (TMA completion) and a "consumed" named
  hardware barrier (`pallas_kernels.gpu.mgpu_barriers`: both consumers
  arrive, the TMA warp syncs before it refills the slot); the ring runs on
  from one item into the next;
* two consumer warpgroups, each owning ``block_q`` query rows, run
  ``wgmma`` for ``Q K^T`` (Q and K from shared memory) and ``P V`` (P from
  registers), with the online softmax in float32 registers in between. Two
  named barriers ping-pong them as in FlashAttention-3, so one's softmax
  overlaps the other's matrix products. At head dims 64 and 128 each
  consumer also overlaps its own (FA3's intra-warpgroup overlap): a step
  waits for its turn, issues ``Q K^T`` of key tile ``j`` and ``P V`` of tile
  ``j - 1`` together, lets the other consumer go, awaits only ``Q K^T``, and
  runs tile ``j``'s softmax while ``P V`` runs (H100, forward TFLOP/s against
  the sequential order in one run: B2 S4096 H128 causal 521.5 vs 508.9, full
  596.3 vs 574.2; B1 S16384 causal 623.8 vs 602.5, full 592.0 vs 595.9;
  B8 S1024 causal 387.4 vs 382.9, full 518.5 vs 505.6; B4 S2048 H64 causal
  306.8 vs 315.2, full 415.0 vs 405.3: ahead on six of eight rows, the two
  others within the run-to-run spread, so one code path for both head dims).
  Head dim 256 keeps the sequential order (not measured with the overlap: its
  128 accumulator registers per thread leave little room for a second tile
  in flight): it lets the other consumer go once its ``Q K^T`` is issued and
  waits for its turn before ``P V``.

Pallas's automatic barriers around shared-memory accesses are off
(``unsafe_no_auto_barriers``): no thread reads and writes the same shared
memory, and `plgpu.commit_smem` / `plgpu.wait_smem_to_gmem` order the output
tile's writes and TMA store.

Both consumers walk the key tiles the CTA can see (``rules.kv_range`` of its
rows); tiles outside it are never loaded. For each consumer the tiles its
rows all see fully (``rules.kv_full_range``) run without mask arithmetic; the
others are masked (causal/window, key length, query length; the length tests
are compiled in only when lengths are given or the sequences padded). With segment ids
a CTA's tiles are also narrowed to those that can hold a key of its rows'
segments (`mgpu_tiles.segment_tile_ranges`, computed by XLA before the call:
packed documents skip each other's tiles), and every visited tile is
masked: each consumer loads its rows' query segment ids once per item (one
per row of its ``wgmma`` logits), and the producer copies each key tile's
segment ids by TMA into a ring beside K's, behind the same "ready" barrier
(two arrivals then); the consumers load them (one per column) before they
release the K slot. Masked logits are ``-inf`` and the running max starts at
a finite floor, so a row that has seen nothing keeps ``p == 0`` and ``l == 0``
and never meets ``inf - inf``. In
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
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm

from pallas_kernels.arguments import check_qkv, out_struct, pad_axis, round_up, vary_like
from pallas_kernels.gpu import flash_attention_mgpu_backward as mgpu_backward
from pallas_kernels.gpu import mgpu_barriers as bars
from pallas_kernels.gpu import mgpu_profile
from pallas_kernels.gpu.flash_attention import flash_backward
from pallas_kernels.gpu.mgpu_tiles import clip_to_segments, cta_kv_blocks, full_kv_blocks, segment_tile_ranges
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
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a [64, n] wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column
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
      persistent: one CTA per SM walking the work items (the K/V ring runs on
        from one item into the next, and the next query tile loads while this
        one's output is stored), instead of one CTA per item.
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    persistent: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_kv", "max_concurrent_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be an int")
        if not isinstance(self.persistent, bool):
            raise TypeError(f"persistent={self.persistent!r} must be a bool")
        if self.block_q != 64:
            raise ValueError(f"block_q={self.block_q} must be 64 (one wgmma M tile per consumer warpgroup)")
        if self.block_kv not in (64, 128, 192, 256):
            raise ValueError(f"block_kv={self.block_kv} must be one of 64, 128, 192, 256")
        if not 2 <= self.max_concurrent_steps <= 4:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be in [2, 4]")

    @classmethod
    def for_call(cls, head_dim: int, is_causal: bool) -> "MosaicBlockSizes":
        """Defaults (H200, bf16, tools/mgpu_flash_check.py on the bench shapes).

        The persistent grid for non-causal calls at head dims 64 and 128
        (B8 S1024 N32 K4 H128 576 against 525 TFLOP/s, B4 S2048 N16 K2 H64 410
        against 391, the long shapes within 2%); causal calls one CTA per item,
        longest rows first (persistent measured 271 against 300 at H64, 573
        against 588 at B1 S16384). Head dim 256 has no shared memory for a
        separate output tile.
        """
        if head_dim <= 128:
            return cls(block_q=64, block_kv=128, max_concurrent_steps=2, persistent=not is_causal)
        return cls(block_q=64, block_kv=64, max_concurrent_steps=2)

    def smem_bytes(self, head_dim: int, itemsize: int, segments: bool = False) -> int:
        """Shared memory of the Q/O tiles, the K/V ring, the lse rows and (with segments) the key segment-id ring."""
        q = NUM_CONSUMERS * self.block_q * head_dim * itemsize * (2 if self.persistent else 1)
        kv = 2 * self.max_concurrent_steps * self.block_kv * head_dim * itemsize
        kv_seg = self.max_concurrent_steps * self.block_kv * 4 if segments else 0
        return q + kv + kv_seg + NUM_CONSUMERS * self.block_q * 4 + SMEM_OVERHEAD

    def check(self, head_dim: int, itemsize: int, segments: bool = False) -> None:
        """Raises ValueError when the tiles do not fit shared memory for ``head_dim`` (and segment ids)."""
        need = self.smem_bytes(head_dim, itemsize, segments)
        if need > SMEM_BYTES:
            raise ValueError(
                f"block_kv={self.block_kv} with max_concurrent_steps={self.max_concurrent_steps} needs {need} bytes "
                f"of shared memory at head_dim={head_dim} ({segments=}), more than SMEM_BYTES={SMEM_BYTES}"
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
      q_segment_ids: int ``[B, T]``: query ``t`` sees key ``s`` only where
        ``q_segment_ids[b, t] == kv_segment_ids[b, s]``.
      kv_segment_ids: int ``[B, S]``.
      local_window_size: int or ``(left, right)``.
      logits_soft_cap: ``cap * tanh(logits / cap)``.
      block_sizes: tiles; default `MosaicBlockSizes.for_call`.
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
      rules: the validated rules of the call.
      block_sizes: forward tiles; default `MosaicBlockSizes.for_call`.
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
      rules: the validated rules of the call.
      block_sizes: tiles; default `MosaicBlockSizes.for_call`.
    """
    B, T, N, H = query.shape
    S = key.shape[1]
    blocks = block_sizes or MosaicBlockSizes.for_call(H, rules.is_causal)
    blocks.check(H, jnp.dtype(query.dtype).itemsize, rules.has_segments)
    T_pad = round_up(T, NUM_CONSUMERS * blocks.block_q)
    S_pad = round_up(S, blocks.block_kv)
    q = pad_axis(query, 1, T_pad)
    k = pad_axis(key, 1, S_pad)
    v = pad_axis(value, 1, S_pad)
    padded = rules.padded(T, S, T_pad, S_pad)
    # Keys past S are padding whatever the lengths say (under jit they are not checked).
    kv_len = jnp.minimum(padded.kv_len, S)
    q_len = jnp.minimum(padded.q_len, T)
    segments = None
    if padded.has_segments:
        q_seg, kv_seg = padded.q_segment_ids, padded.kv_segment_ids
        ranges = segment_tile_ranges(q_seg, kv_seg, q_len, kv_len, NUM_CONSUMERS * blocks.block_q, blocks.block_kv)
        segments = (q_seg, kv_seg, ranges)
    # Every row and key is valid: masked tiles need only the positional rule (and segment ids).
    all_valid = rules.q_len is None and rules.kv_len is None and (T_pad, S_pad) == (T, S)
    out, lse = _forward_call(padded, blocks, padded.q_offset, q_len, kv_len, q, k, v, segments, all_valid)
    return out[:, :T], lse[:, :, :T]


def _forward_call(rules: Rules, blocks: MosaicBlockSizes, offset, q_len, kv_len, q, k, v, segments,
                  all_valid: bool):
    """The ``plgpu.kernel`` on padded inputs: ``(out [B,T_pad,N,H], lse [B,N,T_pad])``.

    ``segments`` is ``(q_segment_ids [B,T_pad], kv_segment_ids [B,S_pad], key tile ranges [2,B,T_pad/(2*block_q)])``
    (`segment_tile_ranges`) or None; the segment work is compiled in only with them. ``all_valid``: every query
    and key is valid (no lengths, no padding), so masked tiles skip the length tests.
    """
    B, T_pad, N, H = q.shape
    K = k.shape[2]
    rows = NUM_CONSUMERS * blocks.block_q
    work = (N, T_pad // rows, B)  # one work item per (query head, 2 * block_q rows, batch row); heads vary fastest
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    stages = blocks.max_concurrent_steps
    q_tile = plgpu.SMEM((NUM_CONSUMERS, blocks.block_q, H), q.dtype, transforms=tiled)
    scratch = [
        q_tile,
        plgpu.SMEM((stages, blocks.block_kv, H), k.dtype, transforms=tiled),
        plgpu.SMEM((stages, blocks.block_kv, H), v.dtype, transforms=tiled),
        plgpu.SMEM((NUM_CONSUMERS, blocks.block_q), jnp.float32),
        # The key tiles' segment ids, one ring slot per K slot, copied behind K's "ready" barrier (two arrivals).
        None if segments is None else plgpu.SMEM((stages, blocks.block_kv), jnp.int32),
        plgpu.Barrier(num_arrivals=1 if segments is None else 2, num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=NUM_CONSUMERS),
    ]
    if blocks.persistent:
        # A grid of one CTA per SM walking the work items; the output tile has its own buffer so the next
        # item's query tile can load while this one's output is stored.
        scratch.append(q_tile)
        num_ctas = min(math.prod(work), num_sms())
        grid, grid_names = (num_ctas,), ("ctas",)
    else:
        num_ctas = None
        grid, grid_names = work, ("heads", "q_tiles", "batch")
    kernel = functools.partial(_forward_kernel, rules=rules.statics(), blocks=blocks, num_groups=N // K, work=work,
                               num_ctas=num_ctas, all_valid=all_valid)
    args = (offset, q_len, kv_len, q, k, v, segments)
    outputs = plgpu.kernel(
        kernel,
        out_type=(out_struct((B, T_pad, N, H), q.dtype, args), out_struct((B, N, T_pad), jnp.float32, args)),
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=NUM_CONSUMERS + 1,
        thread_name="wg",
        # No automatic barriers around shared-memory accesses: no thread reads and writes the same shared
        # memory (wgmma and TMA read it asynchronously; `commit_smem` orders the output writes before the TMA
        # store, and `wait_smem_to_gmem` the store's reads before the next writes).
        compiler_params=mgpu_profile.compiler_params(approx_math=True, unsafe_no_auto_barriers=True),
    )(*args)
    return vary_like(outputs, args)


def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132 on H100/H200 SXM when lowering on a machine without one)."""
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or 132) if device.platform == "gpu" else 132


# ---------------------------------------------------------------------------
# Kernel body: two consumer warpgroups and a TMA producer.


def _both(a, b):
    """``a & b`` where either may be None (no condition)."""
    return b if a is None else a if b is None else a & b


def _fence_proxy_async() -> None:
    """``fence.proxy.async.shared::cta``: this thread's view of shared memory ordered against TMA's (async proxy)."""

    @plgpu.inline_mgpu()
    def fence(_):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.proxy.async.shared::cta;", "", has_side_effects=True)

    fence()


def _forward_kernel(offset_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, seg_refs, out_ref, lse_ref,
                    q_smem, k_smem, v_smem, lse_smem, kv_seg_smem, k_ready, v_ready, q_ready, *o_smem,
                    rules: Rules, blocks: MosaicBlockSizes, num_groups: int, work: tuple[int, int, int],
                    num_ctas: int | None, all_valid: bool):
    bq, bkv, stages = blocks.block_q, blocks.block_kv, blocks.max_concurrent_steps
    q_seg_ref, kv_seg_ref, ranges_ref = (None, None, None) if seg_refs is None else seg_refs
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    shift = P_SHIFT[jnp.dtype(dtype)]
    num_heads, num_q_tiles, _ = work
    wg = lax.axis_index("wg")
    o_smem = o_smem[0] if o_smem else q_smem  # not persistent: the output goes out through the query buffer

    # Named barriers: the consumers' ping-pong (two ids), then "K consumed" and "V consumed" per ring slot.
    sched_id = bars.FIRST_FREE_ID
    k_consumed_id = sched_id + 2
    v_consumed_id = k_consumed_id + stages
    consumer_threads = NUM_CONSUMERS * 128
    ring_threads = consumer_threads + 32  # both consumers arrive, the producer's TMA warp syncs

    def let_other_go():
        bars.arrive(sched_id + 1 - wg, consumer_threads)

    def wait_my_turn():
        bars.sync(sched_id + wg, consumer_threads)

    if num_ctas is None:
        first_item = None
        num_items = 1
        grid_index = tuple(lax.axis_index(name) for name in ("heads", "q_tiles", "batch"))
    else:
        first_item = lax.axis_index("ctas")
        num_items = lax.div(math.prod(work) - 1 - first_item, num_ctas) + 1

    def item_of(i):
        """``(head, q tile, batch, offset, q_len, kv_len, first row, key tiles [lo, hi))`` of this CTA's item ``i``."""
        if first_item is None:
            head, tile, batch = grid_index
        else:
            index = first_item + i * num_ctas
            head, rest = lax.rem(index, num_heads), lax.div(index, num_heads)
            tile, batch = lax.rem(rest, num_q_tiles), lax.div(rest, num_q_tiles)
        if rules.is_causal:
            tile = num_q_tiles - 1 - tile  # longest rows first
        offset, q_len, kv_len = offset_ref[batch], q_len_ref[batch], kv_len_ref[batch]
        cta_start = tile * (NUM_CONSUMERS * bq)
        blk_lo, blk_hi = cta_kv_blocks(rules, cta_start, NUM_CONSUMERS * bq, bkv, offset, q_len, kv_len)
        if ranges_ref is not None:  # only the key tiles of the rows' segments
            blk_lo, blk_hi = clip_to_segments(ranges_ref, batch, tile, blk_lo, blk_hi)
        return head, batch, offset, q_len, kv_len, cta_start, blk_lo, blk_hi

    def for_each_item(body):
        """Runs ``body(i, steps) -> steps`` over this CTA's items; ``steps`` counts K/V tiles through the ring
        before item ``i`` (None for the one item of a CTA that is not persistent)."""
        if first_item is None:
            body(0, None)
        else:
            lax.fori_loop(0, num_items, body, jnp.int32(0))

    def ring_step(steps, j, blk_lo):
        """The ring position of key tile ``j`` of an item whose tiles start at ``blk_lo``."""
        return j - blk_lo if steps is None else steps + (j - blk_lo)

    @pl.when(wg < NUM_CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        q_tile, o_tile = q_smem.at[wg], o_smem.at[wg]

        def load_q(i):
            head, batch, *_, cta_start, _, _ = item_of(i)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(cta_start + wg * bq, bq), head], q_tile, q_ready.at[wg])

        load_q(0)

        def item(i, steps):
            head, batch, offset, q_len, kv_len, cta_start, blk_lo, blk_hi = item_of(i)
            wg_start = cta_start + wg * bq
            if q_seg_ref is None:
                q_seg = None
                f_lo, f_hi = full_kv_blocks(rules, wg_start, bq, bkv, offset, q_len, kv_len, blk_lo, blk_hi)
            else:
                # One segment id per row of the consumer's [bq, bkv] logits; every tile is masked (no full range).
                q_seg = plgpu.load(q_seg_ref.at[batch, pl.ds(wg_start, bq)], (), layout=_ROW, optimized=False)
                f_lo = f_hi = None
            if rules.soft_cap is None:
                pre_scale, scale2 = None, rules.scale * LOG2E
            else:
                pre_scale, scale2 = rules.scale / rules.soft_cap, rules.soft_cap * LOG2E

            def slot_of(j):
                return lax.rem(ring_step(steps, j, blk_lo), stages)

            m = plgpu.layout_cast(jnp.full((bq,), M_FLOOR, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.full((bq,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bq, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
            with jax.named_scope("prologue"):
                plgpu.barrier_wait(q_ready.at[wg])

                @pl.when(blk_hi > blk_lo)
                def _():
                    plgpu.barrier_wait(k_ready.at[slot_of(blk_lo)])

                pl.when(wg == 1)(wait_my_turn)

            def key_segments(slot):
                """The segment ids of the key tile in ``slot`` (one per column), or None without segment ids."""
                return None if q_seg is None else plgpu.load(kv_seg_smem.at[slot], (), layout=_COL)

            def logits(s, j, kv_seg, masked: bool):
                """Key tile ``j``'s logits, soft-capped, ``-inf`` where a masked tile hides a key from a row."""
                if pre_scale is not None:
                    s = jnp.tanh(s * pre_scale)
                if masked:
                    row = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                    col = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                    k_idx = col + j * bkv
                    visible = None if all_valid else (k_idx < kv_len) & (row < q_len - wg_start)
                    visible = _both(visible, rules.visible(row + (offset + wg_start), k_idx))
                    if q_seg is not None:
                        visible = _both(visible, lax.broadcast_in_dim(q_seg, s.shape, [0])
                                        == lax.broadcast_in_dim(kv_seg, s.shape, [1]))
                    if visible is not None:
                        s = jnp.where(visible, s, -jnp.inf)
                return s

            def online_softmax(s, m):
                """``(m_new, alpha, p)``: base-2 online softmax of one tile (scale2 > 0 commutes with the max, so
                p is one FMA and one exp2 per logit)."""
                m_new = jnp.maximum(m, s.max(axis=1) * scale2)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new + shift if shift else m_new, s.shape, [0]))
                return m_new, alpha, p

            # Head dims 64 and 128: FlashAttention-3's intra-warpgroup overlap. Each step issues Q K^T of tile j
            # and P V of tile j - 1 together, awaits only Q K^T and runs tile j's softmax while P V runs; P is
            # converted to 16 bits into the registers P V reads only after P V is done (rewriting them earlier
            # makes ptxas serialize the wgmma). Carry: (acc, m, l, p16 of the previous tile).

            def first_tile(carry):
                acc, m, l, p16 = carry

                def qk_product(s_ref):
                    plgpu.wgmma(s_ref, q_tile, plgpu.transpose_ref(k_smem.at[slot_of(blk_lo)], (1, 0)))
                    let_other_go()
                    return s_ref[...], key_segments(slot_of(blk_lo))

                with jax.named_scope("qk"):
                    s, kv_seg = pl.run_scoped(qk_product, plgpu.ACC((bq, bkv), jnp.float32))
                    bars.arrive(k_consumed_id + slot_of(blk_lo), ring_threads)
                with jax.named_scope("softmax"):
                    m, alpha, p = online_softmax(logits(s, blk_lo, kv_seg, masked=True), m)
                    l = l * alpha + p.sum(axis=1)
                    p16 = p.astype(dtype)
                return acc, m, l, p16

            def overlapped_step(j, carry, *, masked: bool):
                acc, m, l, p16 = carry
                slot, prev = slot_of(j), slot_of(j - 1)
                with jax.named_scope("wait_turn"):
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[prev])
                    wait_my_turn()

                def step(refs):
                    acc_ref, m_ref, alpha_ref, l_ref, p_ref = refs

                    def products(s_ref):
                        plgpu.wgmma(s_ref, q_tile, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        plgpu.wgmma(acc_ref, p16, v_smem.at[prev])
                        let_other_go()
                        kv_seg = key_segments(slot)
                        return plgpu.wgmma_accumulator_load(s_ref, wait_n=1), kv_seg  # Q K^T done, P V runs on

                    with jax.named_scope("qk"):
                        s, kv_seg = pl.run_scoped(products, plgpu.ACC((bq, bkv), jnp.float32))
                        bars.arrive(k_consumed_id + slot, ring_threads)
                    with jax.named_scope("softmax"):
                        m_new, alpha, p = online_softmax(logits(s, j, kv_seg, masked), m_ref[...])
                        m_ref[...], alpha_ref[...] = m_new, alpha
                        l_ref[...] = l_ref[...] * alpha + p.sum(axis=1)
                        p_ref[...] = p

                # p_init (and m as alpha's) only give the state its shapes: `step` writes both before any read.
                p_init = plgpu.layout_cast(jnp.full((bq, bkv), 0, jnp.float32), plgpu.Layout.WGMMA)
                # Leaving run_state awaits P V (counted as "other" in a profile).
                acc, m, alpha, l, p = pl.run_state(step)((plgpu.ACC.init(acc), m, m, l, p_init))
                with jax.named_scope("pv"):
                    bars.arrive(v_consumed_id + prev, ring_threads)
                    p16 = p.astype(dtype)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                return acc, m, l, p16

            def last_tile(carry):
                acc, m, l, p16 = carry
                slot = slot_of(blk_hi - 1)
                with jax.named_scope("wait_turn"):
                    plgpu.barrier_wait(v_ready.at[slot])
                    wait_my_turn()
                with jax.named_scope("pv"):
                    acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p16, v_smem.at[slot]))(
                        plgpu.ACC.init(acc))
                    bars.arrive(v_consumed_id + slot, ring_threads)
                return acc, m, l, p16

            # Head dim 256 (no registers for a second tile in flight): Q K^T, softmax, P V in turn.

            def sequential_step(j, carry, *, masked: bool):
                acc, m, l = carry
                slot = slot_of(j)

                def qk_product(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    let_other_go()
                    # The key tile's segment ids load while the wgmma runs; their slot is released with K's.
                    kv_seg = key_segments(slot)
                    return acc_ref[...], kv_seg

                with jax.named_scope("qk"):
                    s, kv_seg = pl.run_scoped(qk_product, plgpu.ACC((bq, bkv), jnp.float32))
                    bars.arrive(k_consumed_id + slot, ring_threads)
                with jax.named_scope("softmax"):
                    m_new, alpha, p = online_softmax(logits(s, j, kv_seg, masked), m)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l = l * alpha
                    p16 = p.astype(dtype)
                with jax.named_scope("wait_turn"):
                    plgpu.barrier_wait(v_ready.at[slot])
                    wait_my_turn()
                with jax.named_scope("softmax"):
                    l = l + p.sum(axis=1)

                def pv_product(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(j + 1 < blk_hi)
                    def _():
                        plgpu.barrier_wait(k_ready.at[slot_of(j + 1)])

                with jax.named_scope("pv"):
                    acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
                    bars.arrive(v_consumed_id + slot, ring_threads)
                return acc, m_new, l

            def tile_loops(step, carry, first, lo, hi):
                """Runs ``step`` over key tiles ``[first, blk_hi)``: masked before ``lo``, unmasked in ``[lo, hi)``,
                masked after; all masked where ``lo`` is None (segment ids can hide any key from any row)."""
                if lo is None:
                    return lax.fori_loop(first, blk_hi, functools.partial(step, masked=True), carry)
                carry = lax.fori_loop(first, lo, functools.partial(step, masked=True), carry)
                carry = lax.fori_loop(lo, hi, functools.partial(step, masked=False), carry)
                return lax.fori_loop(hi, blk_hi, functools.partial(step, masked=True), carry)

            if head_dim <= 128:
                p16 = plgpu.layout_cast(jnp.full((bq, bkv), 0, dtype), plgpu.Layout.WGMMA)
                some = blk_hi > blk_lo
                carry = lax.cond(some, first_tile, lambda c: c, (acc, m, l, p16))
                # Tile blk_lo's Q K^T and softmax ran in first_tile (masked, even where its rows see it whole); its
                # P V runs in the next step, or in last_tile.
                first = blk_lo + 1
                lo, hi = (None, None) if f_lo is None else (jnp.maximum(f_lo, first), jnp.maximum(f_hi, first))
                carry = tile_loops(overlapped_step, carry, first, lo, hi)
                acc, m, l, _ = lax.cond(some, last_tile, lambda c: c, carry)
            else:
                acc, m, l = tile_loops(sequential_step, (acc, m, l), blk_lo, f_lo, f_hi)
            if first_item is None:
                pl.when(wg == 0)(let_other_go)
            else:
                # Wait for the other consumer as well: its last "my turn" must pass before this one's next
                # arrival, or two arrivals would meet one barrier phase.
                pl.when(wg == 0)(lambda: bars.sync(sched_id + 1, consumer_threads))
                pl.when(i + 1 < num_items)(functools.partial(load_q, i + 1))  # the query tile is free again

            with jax.named_scope("epilogue"):
                live = m > 0.5 * M_FLOOR
                l_safe = jnp.where(live, l, 1.0)
                acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read their tiles
                o_tile[...] = acc.astype(dtype)
                lse_smem.at[wg][...] = jnp.where(live, m + (jnp.log(l_safe) * RCP_LN2 + shift), DEAD_LSE)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_tile, out_ref.at[batch, pl.ds(wg_start, bq), head])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(wg_start, bq)])
            return None if steps is None else steps + (blk_hi - blk_lo)

        for_each_item(item)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_CONSUMERS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

        def item(i, steps):
            head, batch, *_, blk_lo, blk_hi = item_of(i)
            kv_head = lax.div(head, jnp.array(num_groups, head.dtype))

            @pl.loop(blk_lo, blk_hi)
            def _(j):
                step = ring_step(steps, j, blk_lo)
                slot = lax.rem(step, stages)
                keys = (batch, pl.ds(j * bkv, bkv), kv_head)
                refill = step >= stages  # the slot held tile step - stages: wait until both consumers are done

                pl.when(refill)(lambda: bars.sync(k_consumed_id + slot, ring_threads))
                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
                if kv_seg_ref is not None:
                    # The consumers read the slot's previous ids with plain loads (generic proxy); order those
                    # reads before the TMA (async proxy) overwrites them.
                    pl.when(refill)(_fence_proxy_async)
                    plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, pl.ds(j * bkv, bkv)], kv_seg_smem.at[slot],
                                            k_ready.at[slot])
                pl.when(refill)(lambda: bars.sync(v_consumed_id + slot, ring_threads))
                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

            return None if steps is None else steps + (blk_hi - blk_lo)

        # One warp issues the copies: the named barriers count exactly its 32 threads.
        @plgpu.warp_map
        def _(warp):
            pl.when(warp == 0)(lambda: for_each_item(item))
