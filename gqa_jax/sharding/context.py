"""Context-parallel attention: the sequence of one self-attention call split over a mesh axis.

Inside ``jax.shard_map`` each device holds one shard of the sequence: queries
``[B, T_local, N, H]`` and keys/values ``[B, S_local, K, H]`` at the same global
positions (self-attention, ``T == S`` globally, so positions are shared and
query ``t`` sits at global position ``t``). Two strategies compute the same
result as one unsharded `gqa_jax.dot_product_attention` call:

* `ring_attention`: K/V blocks travel around the ring (``lax.ppermute``); each
  device merges the partial results of its queries against every block by
  their log-sum-exp. The backward (a ``jax.custom_vjp``) runs the ring again,
  with dK/dV accumulators travelling with their blocks, so no device ever holds
  the whole K/V. Only collective-permutes appear in the compiled program.
* `all_gather_attention`: K/V are all-gathered and each device attends its own
  queries against all of them (simple; memory grows with the whole sequence).

Load balance: with ``load_balance=None`` device ``r`` holds the contiguous
positions ``[r*L, (r+1)*L)``; with ``"zigzag"`` the sequence is cut into ``2P``
chunks and device ``r`` holds chunks ``r`` and ``2P-1-r``, so causal work is
even across devices. `zigzag_order` gives that permutation, and
`context_parallel_attention` applies it for callers outside ``shard_map``.

The rules are those of `dot_product_attention` for self-attention: causal,
sliding window, soft-cap, scale, global key lengths ``[B]`` and segment ids
(local shards, travelling with their keys). Blocks no query of a shard can see
are skipped.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gqa_jax.attention import dot_product_attention
from gqa_jax.implementations import pallas_tpu, pallas_triton
from pallas_kernels import gpu, tpu
from pallas_kernels.arguments import check_qkv, row_vector, vary_like
from pallas_kernels.numerics import DEAD_LSE
from pallas_kernels.residuals import LN2
from pallas_kernels.rules import Rules

Array = jax.Array

__all__ = ["all_gather_attention", "context_parallel_attention", "ring_attention", "zigzag_order"]

LOAD_BALANCES = (None, "zigzag")
STRATEGIES = ("ring", "all_gather")


def zigzag_order(seq_len: int, num_shards: int) -> np.ndarray:
    """Positions in zigzag shard order: shard ``r`` holds chunks ``r`` and ``2P-1-r`` of ``2P``.

    ``x[:, zigzag_order(S, P)]`` lays a ``[B, S, ...]`` array out so that
    sharding its sequence axis ``P`` ways gives each device its zigzag chunks;
    ``np.argsort`` of the order undoes it.

    Raises:
      ValueError: when ``seq_len`` is not a multiple of ``2 * num_shards``.
    """
    if num_shards < 1 or seq_len % (2 * num_shards):
        raise ValueError(f"zigzag needs seq_len a multiple of 2 * num_shards, got {seq_len=}, {num_shards=}")
    chunk = seq_len // (2 * num_shards)
    chunks = [c for r in range(num_shards) for c in (r, 2 * num_shards - 1 - r)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def _chunks(index, num_shards: int, local_len: int, load_balance: str | None):
    """``[(first global position, local start, length)]`` of the chunks a shard holds (positions traced)."""
    if load_balance is None:
        return [(index * local_len, 0, local_len)]
    half = local_len // 2
    return [(index * half, 0, half), ((2 * num_shards - 1 - index) * half, half, half)]


def _check(query, key, value, load_balance, num_shards: int):
    check_qkv(query, key, value, dtypes=None)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"context-parallel attention is self-attention: query and key shards must be equally long, got "
            f"query.shape[1]={query.shape[1]}, key.shape[1]={key.shape[1]}"
        )
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"load_balance must be one of {LOAD_BALANCES}, got {load_balance=}")
    if load_balance == "zigzag" and query.shape[1] % 2:
        raise ValueError(f"zigzag needs an even shard length, got query.shape[1]={query.shape[1]}")
    if num_shards < 1:
        raise ValueError(f"the mesh axis must have at least one device, got {num_shards=}")


def _static_rules(query, key, *, scale, is_causal, local_window_size, logits_soft_cap) -> Rules:
    """The validated static rules (scale, causal, window, soft-cap) of the call."""
    return Rules.create(query, key, scale=scale, is_causal=is_causal, local_window_size=local_window_size,
                        logits_soft_cap=logits_soft_cap).statics()


def _block_rules(statics: Rules, q_first, k_first, k_len: int, kv_len, q_seg, kv_seg) -> Rules:
    """Rules of one (query chunk, key chunk) block: positions relative to the key chunk's first one."""
    B = kv_len.shape[0]
    return Rules(
        q_offset=jnp.broadcast_to(jnp.asarray(q_first - k_first, jnp.int32), (B,)),
        kv_len=jnp.clip(kv_len - k_first, 0, k_len).astype(jnp.int32),
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        scale=statics.scale,
        is_causal=statics.is_causal,
        window=statics.window,
        soft_cap=statics.soft_cap,
    )


def _block_visible(statics: Rules, q_first, q_len: int, k_first, k_len: int):
    """Whether any query of the chunk can see any key of the block by position (segments aside)."""
    lo, hi = statics.kv_range(q_first, q_first + q_len - 1, k_first + k_len)
    return (hi > jnp.maximum(lo, k_first)) if statics.positional else jnp.array(True)


def _logits(q, k, rules: Rules):
    """Scaled, capped, masked float32 logits ``[B, K, G, T, S]`` and the cap's tanh (or None)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, N // K, H), k,
                   preferred_element_type=jnp.float32) * rules.scale
    t = None
    if rules.soft_cap is not None:
        t = jnp.tanh(s / rules.soft_cap)
        s = rules.soft_cap * t
    mask = rules.mask(T, k.shape[1])
    return jnp.where(mask[:, :, None], s, -jnp.inf), t


def _block_forward(q, k, v, rules: Rules):
    """Normalized float32 output ``[B, T, N, Hv]`` and natural log-sum-exp ``[B, N, T]`` (``-inf``: no key)."""
    B, T, N, _ = q.shape
    s, _ = _logits(q, k, rules)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m_safe)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total == 0.0, 1.0, total)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32)).reshape(B, T, N, v.shape[-1])
    lse = jnp.where(total[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(total[..., 0] > 0, total[..., 0], 1.0)),
                    -jnp.inf)
    return out, lse.reshape(B, N, T)


def _merge(out_a, lse_a, out_b, lse_b):
    """Two partial softmax results over disjoint key sets, merged by their log-sum-exps."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
    w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)
    to_btn1 = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B, N, T] -> [B, T, N, 1]
    return out_a * to_btn1(w_a) + out_b * to_btn1(w_b), lse


def _block_backward(q, k, v, rules: Rules, do, lse, delta, out):
    """``(dq, dk, dv)`` float32 of one block from the merged log-sum-exp and ``delta = sum(do * out)``.

    (``out``, the merged output, is what the kernel backward reads instead of ``delta``.)
    """
    del out
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    s, t = _logits(q, k, rules)
    lse5 = lse.reshape(B, K, G, T)[..., None]
    p = jnp.where(jnp.isfinite(lse5), jnp.exp(s - jnp.where(jnp.isfinite(lse5), lse5, 0.0)), 0.0)
    do5 = do.astype(jnp.float32).reshape(B, T, K, G, -1)
    dv = jnp.einsum("BKGTS,BTKGH->BSKH", p, do5)
    dp = jnp.einsum("BTKGH,BSKH->BKGTS", do5, v.astype(jnp.float32))
    ds = p * (dp - delta.reshape(B, K, G, T)[..., None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    ds = ds * rules.scale
    dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k.astype(jnp.float32)).reshape(B, T, N, H)
    dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q.astype(jnp.float32).reshape(B, T, K, G, H))
    return dq, dk, dv


def _triton_forward(q, k, v, rules: Rules):
    """`_block_forward` on the Triton flash kernel (its residual API: natural lse, ``-inf`` for dead rows)."""
    out, lse = gpu.flash_attention_core(q, k, v, rules, interpret=pallas_triton.interpret, return_residuals=True)
    return out.astype(jnp.float32), lse


def _triton_backward(q, k, v, rules: Rules, do, lse, delta, out):
    """`_block_backward` on the Triton backward kernels, fed the merged lse (base 2) and output."""
    del delta  # the kernels form it from ``out`` and ``do``
    lse2 = jnp.where(jnp.isfinite(lse), lse / LN2, DEAD_LSE)
    dq, dk, dv, _ = gpu.flash_backward(q, k, v, out.astype(q.dtype), lse2, do.astype(q.dtype), rules,
                                       interpret=pallas_triton.interpret)
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


def _tpu_forward(q, k, v, rules: Rules):
    """`_block_forward` on the TPU flash kernel (its residual API: natural lse, ``-inf`` for dead rows)."""
    out, lse = tpu.flash_attention_core(q, k, v, rules, interpret=pallas_tpu.interpret, return_residuals=True)
    return out.astype(jnp.float32), lse


def _tpu_backward(q, k, v, rules: Rules, do, lse, delta, out):
    """`_block_backward` on the TPU backward kernels, fed the merged (natural) lse and output."""
    del delta  # the kernels form it from ``out`` and ``do``
    grads = tpu.flash_backward(q, k, v, out, lse, do, rules, interpret=pallas_tpu.interpret)
    return tuple(g.astype(jnp.float32) for g in grads)


# implementation= of `ring_attention` -> (block forward, block backward).
RING_BLOCKS = {
    "xla": (_block_forward, _block_backward),
    "pallas_triton": (_triton_forward, _triton_backward),
    "pallas_tpu": (_tpu_forward, _tpu_backward),
}
# Kernels ``shard_map`` runs unchecked in Pallas interpret mode: jax's Triton interpreter drops the varying
# mesh axes in the backward ("add requires varying manual axes to match"); compiled, they are checked.
UNCHECKED_KERNELS = ("pallas_triton",)
# Blocks run on every device, visible or not: the TPU kernel skips masked tiles itself, and in TPU interpret
# mode each kernel call waits at a barrier of all devices, so a device that skipped a call would hang its peers.
ALWAYS_RUN = ("pallas_tpu",)


def ring_attention(
    query,
    key,
    value,
    *,
    axis_name: str,
    is_causal: bool = False,
    load_balance: str | None = None,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    implementation: str | None = None,
):
    """Ring attention over mesh axis ``axis_name``; call it inside ``jax.shard_map``.

    Args:
      query: ``[B, L, N, H]``, this device's shard of the sequence.
      key: ``[B, L, K, H]`` at the same positions.
      value: ``[B, L, K, Hv]``.
      axis_name: the mesh axis the sequence is split over (``P`` devices, global length ``P * L``).
      is_causal: keys at global positions up to the query's own.
      load_balance: None (contiguous shards) or ``"zigzag"`` (see `zigzag_order`).
      scale: logit scale, default ``1 / sqrt(H)``.
      local_window_size: int or ``(left, right)`` window on global positions.
      logits_soft_cap: ``cap * tanh(logits / cap)``.
      key_value_seq_lengths: int ``[B]`` valid keys of the global sequence.
      q_segment_ids: int ``[B, L]``, this shard's ids (with ``kv_segment_ids``).
      kv_segment_ids: int ``[B, L]``.
      implementation: what computes each block: None or ``"xla"`` (einsums),
        ``"pallas_triton"`` or ``"pallas_tpu"`` (the Triton or TPU flash
        kernels: forward with ``return_residuals=True``, backward from the
        merged log-sum-exp; compiled on a GPU or TPU, or in Pallas interpret
        mode where `gqa_jax.implementations.pallas_triton` or ``pallas_tpu``
        sets ``interpret``). In Triton interpret mode, call it in
        ``jax.shard_map(..., check_vma=False)`` (jax's interpreter loses the
        varying mesh axes in the backward); compiled kernels are checked.

    Returns:
      ``[B, L, N, Hv]`` in the query dtype, equal to the matching rows of the
      unsharded call; rows that see no key give zeros. Differentiable.

    Raises:
      ValueError: for an ``implementation`` that is not one of `RING_BLOCKS`.
    """
    implementation = "xla" if implementation is None else implementation
    if implementation not in RING_BLOCKS:
        raise ValueError(f"implementation must be None or one of {sorted(RING_BLOCKS)}, got {implementation=}")
    num_shards, (query, key, value), kv_len, segments = _prepare(
        query, key, value, axis_name, load_balance, key_value_seq_lengths, q_segment_ids, kv_segment_ids)
    statics = _static_rules(query, key, scale=scale, is_causal=is_causal, local_window_size=local_window_size,
                            logits_soft_cap=logits_soft_cap)
    return _ring(statics, axis_name, num_shards, load_balance, implementation, query, key, value, kv_len, *segments)


def _prepare(query, key, value, axis_name: str, load_balance, key_value_seq_lengths, q_segment_ids, kv_segment_ids):
    """The checked shards, ``kv_len [B]`` of the global sequence and the segment ids, for both strategies."""
    num_shards = lax.axis_size(axis_name)
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    _check(query, key, value, load_balance, num_shards)
    B, L = query.shape[:2]
    kv_len = row_vector("key_value_seq_lengths", key_value_seq_lengths, B, num_shards * L)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together")
    segments = None, None
    if q_segment_ids is not None:
        shard = jax.ShapeDtypeStruct((B, L, 1, 1), jnp.float32)  # Rules.create reads only the shapes
        rules = Rules.create(shard, shard, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
        segments = rules.q_segment_ids, rules.kv_segment_ids
    return num_shards, (query, key, value), kv_len, segments


def _ring_steps(axis_name: str, num_shards: int, load_balance, L: int):
    """For each ring step, this device's ``(query chunk, key chunk)`` pairs, chunks as `_chunks` gives them."""
    me = lax.axis_index(axis_name)
    q_chunks = _chunks(me, num_shards, L, load_balance)
    for step in range(num_shards):
        source = lax.rem(me - step + num_shards, num_shards)
        yield step, [(qc, kc) for qc in q_chunks for kc in _chunks(source, num_shards, L, load_balance)]


def _block(statics: Rules, q_chunk, k_chunk, q, k_blk, v_blk, kv_len, q_seg, kv_seg_blk):
    """One block's ``(q, k, v, rules, visible)``: the slices of the query and key chunks and their rules."""
    (q_first, q_start, q_n), (k_first, k_start, k_n) = q_chunk, k_chunk
    slice_ = lambda x, start, n: None if x is None else lax.dynamic_slice_in_dim(x, start, n, 1)
    rules = _block_rules(statics, q_first, k_first, k_n, kv_len, slice_(q_seg, q_start, q_n),
                         slice_(kv_seg_blk, k_start, k_n))
    visible = _block_visible(statics, q_first, q_n, k_first, k_n)
    return slice_(q, q_start, q_n), slice_(k_blk, k_start, k_n), slice_(v_blk, k_start, k_n), rules, visible


def _full(shape, value, like):
    """A float32 constant that varies over the same ``shard_map`` axes as ``like`` (for ``lax.cond`` branches)."""
    return vary_like(jnp.full(shape, value, jnp.float32), like)


def _when_visible(implementation: str, visible, run, skip, *args):
    """``run(*args)`` for a block some query can see, else ``skip(*args)`` (always ``run`` for `ALWAYS_RUN`)."""
    return run(*args) if implementation in ALWAYS_RUN else lax.cond(visible, run, skip, *args)


def _permute(axis_name: str, num_shards: int, *xs):
    pairs = [(i, (i + 1) % num_shards) for i in range(num_shards)]
    return tuple(None if x is None else lax.ppermute(x, axis_name, pairs) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring(statics, axis_name, num_shards, load_balance, implementation, q, k, v, kv_len, q_seg, kv_seg):
    return _ring_forward(statics, axis_name, num_shards, load_balance, implementation, q, k, v, kv_len, q_seg,
                         kv_seg)[0]


def _ring_forward(statics, axis_name, num_shards, load_balance, implementation, q, k, v, kv_len, q_seg, kv_seg):
    block_forward = RING_BLOCKS[implementation][0]
    B, L, N, _ = q.shape
    out = jnp.zeros((B, L, N, v.shape[-1]), jnp.float32)
    lse = jnp.full((B, N, L), -jnp.inf, jnp.float32)
    k_blk, v_blk, seg_blk = k, v, kv_seg
    for step, blocks in _ring_steps(axis_name, num_shards, load_balance, L):
        if step:
            k_blk, v_blk, seg_blk = _permute(axis_name, num_shards, k_blk, v_blk, seg_blk)
        for q_chunk, k_chunk in blocks:
            (_, q_start, q_n) = q_chunk
            qb, kb, vb, rules, visible = _block(statics, q_chunk, k_chunk, q, k_blk, v_blk, kv_len, q_seg, seg_blk)
            o_b, l_b = _when_visible(
                implementation,
                visible,
                block_forward,
                lambda qb, kb, vb, rules: (_full(qb.shape[:3] + vb.shape[-1:], 0.0, qb),
                                           _full((B, N, q_n), -jnp.inf, qb)),
                qb, kb, vb, rules,
            )
            o_old = lax.dynamic_slice_in_dim(out, q_start, q_n, 1)
            l_old = lax.dynamic_slice_in_dim(lse, q_start, q_n, 2)
            o_new, l_new = _merge(o_old, l_old, o_b, l_b)
            out = lax.dynamic_update_slice_in_dim(out, o_new, q_start, 1)
            lse = lax.dynamic_update_slice_in_dim(lse, l_new, q_start, 2)
    result = out.astype(q.dtype)
    return result, (q, k, v, kv_len, q_seg, kv_seg, result, lse)


def _ring_fwd(statics, axis_name, num_shards, load_balance, implementation, q, k, v, kv_len, q_seg, kv_seg):
    return _ring_forward(statics, axis_name, num_shards, load_balance, implementation, q, k, v, kv_len, q_seg,
                         kv_seg)


def _ring_bwd(statics, axis_name, num_shards, load_balance, implementation, residuals, d_out):
    block_backward = RING_BLOCKS[implementation][1]
    q, k, v, kv_len, q_seg, kv_seg, out, lse = residuals
    L = q.shape[1]
    delta = jnp.swapaxes(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, 2)  # [B,N,L]
    dq = jnp.zeros(q.shape, jnp.float32)
    dk_acc, dv_acc = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    k_blk, v_blk, seg_blk = k, v, kv_seg
    for step, blocks in _ring_steps(axis_name, num_shards, load_balance, L):
        if step:
            k_blk, v_blk, seg_blk, dk_acc, dv_acc = _permute(axis_name, num_shards, k_blk, v_blk, seg_blk,
                                                             dk_acc, dv_acc)
        for q_chunk, k_chunk in blocks:
            (_, q_start, q_n), (_, k_start, k_n) = q_chunk, k_chunk
            qb, kb, vb, rules, visible = _block(statics, q_chunk, k_chunk, q, k_blk, v_blk, kv_len, q_seg, seg_blk)
            dob = lax.dynamic_slice_in_dim(d_out, q_start, q_n, 1)
            lse_b = lax.dynamic_slice_in_dim(lse, q_start, q_n, 2)
            delta_b = lax.dynamic_slice_in_dim(delta, q_start, q_n, 2)
            out_b = lax.dynamic_slice_in_dim(out, q_start, q_n, 1)
            dq_b, dk_b, dv_b = _when_visible(
                implementation,
                visible,
                block_backward,
                lambda qb, kb, vb, *_: (_full(qb.shape, 0.0, qb), _full(kb.shape, 0.0, kb), _full(vb.shape, 0.0, vb)),
                qb, kb, vb, rules, dob, lse_b, delta_b, out_b,
            )
            dq = lax.dynamic_update_slice_in_dim(dq, lax.dynamic_slice_in_dim(dq, q_start, q_n, 1) + dq_b, q_start, 1)
            dk_acc = lax.dynamic_update_slice_in_dim(
                dk_acc, lax.dynamic_slice_in_dim(dk_acc, k_start, k_n, 1) + dk_b, k_start, 1)
            dv_acc = lax.dynamic_update_slice_in_dim(
                dv_acc, lax.dynamic_slice_in_dim(dv_acc, k_start, k_n, 1) + dv_b, k_start, 1)
    # One more hop brings every accumulator home to the device that owns its block.
    dk_acc, dv_acc = _permute(axis_name, num_shards, dk_acc, dv_acc)
    return dq.astype(q.dtype), dk_acc.astype(k.dtype), dv_acc.astype(v.dtype), None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def all_gather_attention(
    query,
    key,
    value,
    *,
    axis_name: str,
    is_causal: bool = False,
    load_balance: str | None = None,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    implementation: str | Sequence[str] | None = None,
):
    """Context-parallel attention by all-gathering K/V; call it inside ``jax.shard_map``.

    Same arguments and result as `ring_attention`; each device attends its own
    queries against the gathered sequence with `gqa_jax.dot_product_attention`
    (``implementation`` picks its backend). Its backward reduce-scatters dK/dV.
    """
    num_shards, (query, key, value), kv_len, (q_seg, kv_seg) = _prepare(
        query, key, value, axis_name, load_balance, key_value_seq_lengths, q_segment_ids, kv_segment_ids)
    B, L = query.shape[:2]
    S = num_shards * L
    gather = lambda x: lax.all_gather(x, axis_name, axis=1, tiled=True)
    k_all, v_all = gather(key), gather(value)
    kv_seg_all = None if kv_seg is None else gather(kv_seg)
    if load_balance == "zigzag":
        natural = np.argsort(zigzag_order(S, num_shards))
        k_all, v_all = k_all[:, natural], v_all[:, natural]
        kv_seg_all = None if kv_seg_all is None else kv_seg_all[:, natural]
    positional = is_causal or local_window_size is not None
    outs = []
    for q_first, q_start, q_n in _chunks(lax.axis_index(axis_name), num_shards, L, load_balance):
        q_chunk = lax.dynamic_slice_in_dim(query, q_start, q_n, 1)
        outs.append(dot_product_attention(
            q_chunk, k_all, v_all, scale=scale, is_causal=is_causal,
            query_offset=jnp.broadcast_to(q_first, (B,)).astype(jnp.int32) if positional else None,
            key_value_seq_lengths=kv_len, local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
            q_segment_ids=None if q_seg is None else lax.dynamic_slice_in_dim(q_seg, q_start, q_n, 1),
            kv_segment_ids=kv_seg_all, implementation=implementation,
        ))
    return jnp.concatenate(outs, axis=1)


def context_parallel_attention(
    query,
    key,
    value,
    *,
    mesh: Mesh,
    seq_axis: str,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    strategy: str = "ring",
    load_balance: str | None = None,
    **rules,
):
    """Self-attention with the sequence split over ``seq_axis`` of ``mesh``, for callers outside ``shard_map``.

    Args:
      query: ``[B, S, N, H]`` global arrays in natural order.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      mesh: the device mesh.
      seq_axis: mesh axis the sequence is split over.
      batch_axis: optional mesh axis for the batch (data parallel).
      head_axis: optional mesh axis for the heads; ``K`` must divide by its size.
      strategy: ``"ring"`` (`ring_attention`) or ``"all_gather"`` (`all_gather_attention`).
      load_balance: None or ``"zigzag"``; with zigzag the sequence is permuted
        into zigzag order and back around the call (keep data in that order
        to save the two permutations).
      **rules: ``is_causal``, ``scale``, ``local_window_size``,
        ``logits_soft_cap``, ``key_value_seq_lengths`` ``[B]``,
        ``q_segment_ids``/``kv_segment_ids`` ``[B, S]``.

    Returns:
      ``[B, S, N, Hv]``, equal to ``dot_product_attention(query, key, value, **rules)``.

    Raises:
      ValueError: for a strategy, axis or size that does not fit.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy=}")
    for name in (seq_axis, batch_axis, head_axis):
        if name is not None and name not in mesh.axis_names:
            raise ValueError(f"mesh axis {name!r} is not one of mesh.axis_names={mesh.axis_names}")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    num_shards = mesh.shape[seq_axis]
    S = query.shape[1]
    if S % num_shards:
        raise ValueError(f"the sequence S={S} must divide over mesh axis {seq_axis!r} of size {num_shards}")
    if head_axis is not None and key.shape[2] % mesh.shape[head_axis]:
        raise ValueError(f"num_kv_heads K={key.shape[2]} must divide over mesh axis {head_axis!r} of size "
                         f"{mesh.shape[head_axis]}")
    order = zigzag_order(S, num_shards) if load_balance == "zigzag" else None
    seq_arrays = {"q_segment_ids", "kv_segment_ids"}
    if order is not None:
        query, key, value = query[:, order], key[:, order], value[:, order]
        rules = {name: (jnp.asarray(x)[:, order] if name in seq_arrays and x is not None else x)
                 for name, x in rules.items()}
    heads = P(batch_axis, seq_axis, head_axis, None)
    arrays = {name: rules.pop(name) for name in ("key_value_seq_lengths", *seq_arrays) if rules.get(name) is not None}
    specs = {name: P(batch_axis) if name == "key_value_seq_lengths" else P(batch_axis, seq_axis) for name in arrays}
    attend = ring_attention if strategy == "ring" else all_gather_attention

    def body(q, k, v, arrays):
        return attend(q, k, v, axis_name=seq_axis, load_balance=load_balance, **rules, **arrays)

    in_specs = (heads, heads, heads, specs)
    inputs = (query, key, value, {name: jnp.asarray(x) for name, x in arrays.items()})
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        # Explicit-sharding meshes type every array's sharding: bring the inputs to the specs first.
        inputs = jax.reshard(inputs, jax.tree.map(lambda spec: NamedSharding(mesh, spec), in_specs))
    out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=heads,
                        check_vma=not _may_run_unchecked_kernel(rules.get("implementation")))(*inputs)
    if order is None:
        return out
    natural = np.argsort(order)
    return out.at[:, natural].get(out_sharding=NamedSharding(mesh, heads)) if explicit else out[:, natural]


def _may_run_unchecked_kernel(implementation) -> bool:
    """Whether the call may run one of `UNCHECKED_KERNELS` in interpret mode (named: interpret mode runs on a CPU,
    where dispatch never picks them)."""
    if not pallas_triton.interpret:
        return False
    names = [implementation] if implementation is None or isinstance(implementation, str) else list(implementation)
    return any(name in UNCHECKED_KERNELS for name in names)
