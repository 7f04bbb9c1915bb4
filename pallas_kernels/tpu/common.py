"""Pieces shared by the Mosaic TPU kernels: tiling constants, argument checks,
lane broadcasts, the online-softmax update and the layout of per-key scales.

TPU vector registers are ``8 x 128`` (sublanes x lanes) 32-bit values. Row
statistics (running max, running sum, log-sum-exp) are kept lane-replicated as
``[rows, 128]`` float32 arrays, and `lanes` widens them to a tile's width, as
jax's own TPU kernels do; those are layouts that Mosaic lowers without
relayouts.
"""

from __future__ import annotations


import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.arguments import KERNEL_DTYPES, pad_axis
from pallas_kernels.numerics import LOWEST

NUM_LANES = 128
NUM_SUBLANES = 8
# Input dtypes served; float16 is computed in float32 (TPUs have no float16 units).
# ``q @ k.T`` with the head dim of both operands contracted.
NT_DIMS = (((1,), (1,)), ((), ()))


def interpret_params(interpret) -> pltpu.InterpretParams | bool:
    """``False`` -> compiled (False); ``True`` -> the default TPU interpret mode; params as given."""
    if interpret is False:
        return False
    if interpret is True:
        return pltpu.InterpretParams()
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise TypeError(f"interpret must be a bool or a pltpu.InterpretParams, got {interpret=}")


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype kernels compute in: float16 inputs run as float32."""
    dtype = jnp.dtype(dtype)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in KERNEL_DTYPES]}, got {dtype=}")
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else dtype


def lanes(x, width: int):
    """A lane-replicated ``[rows, 128]`` array widened (or cut) to ``[rows, width]``."""
    if width % NUM_LANES == 0:
        return jnp.tile(x, (1, width // NUM_LANES))
    if width < NUM_LANES:
        return x[:, :width]
    raise NotImplementedError(f"{width=} must be a multiple of {NUM_LANES} or smaller than it")


def dot(a, b, dims=None):
    """A float32-accumulated tile product; float32 operands multiply at full precision."""
    dims = (((a.ndim - 1,), (0,)), ((), ())) if dims is None else dims
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def scaled_logits(q, k, scale: float, soft_cap: float | None, dims=NT_DIMS, key_scale=None):
    """``cap * tanh(scale * q.k / cap)`` in float32, and the tanh (None without cap) for the backward.

    ``key_scale`` (float32, broadcast against the logits ``[rows, keys]``)
    dequantizes the keys of a quantized tile after the product: ``q . (k *
    key_scale) = (q . k) * key_scale``.
    """
    s = dot(q, k, dims)
    if key_scale is not None:
        s = s * key_scale
    s = s * scale
    if soft_cap is None:
        return s, None
    t = jnp.tanh(s * (1.0 / soft_cap))
    return t * soft_cap, t


def softmax_init(m_ref, l_ref, acc_ref) -> None:
    m_ref[...] = jnp.full(m_ref.shape, LOWEST, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def softmax_update(s, v, m_ref, l_ref, acc_ref, shift: float = 0.0, value_scale=None) -> None:
    """One online-softmax step over a tile of logits ``s [rows, cols]`` and values ``v [cols, Hv]``.

    Masked logits are ``-inf``; the running max starts at the lowest finite
    float32 (`LOWEST`), so they contribute ``exp(-inf) = 0`` and never NaN,
    and any finite logit (a huge finite bias too) counts. ``shift`` (natural
    units) is folded into the running max, ``m = max(m, rowmax(s) + shift)``:
    every weight is at most ``exp(-shift)`` (`pallas_kernels.numerics`).
    ``value_scale`` (float32, broadcast against ``s``; zero where masked)
    dequantizes the values of a quantized tile through the weights, ``p . (v
    * scale) = (p * scale) . v``; the running sum takes the weights unscaled.
    """
    m_prev, l_prev = m_ref[...], l_ref[...]
    top = jnp.max(s, axis=-1, keepdims=True)
    m_next = jnp.maximum(m_prev, top + shift if shift else top)
    p = jnp.exp(s - lanes(m_next, s.shape[-1]))
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_ref[...] = m_next
    weights = p if value_scale is None else p * value_scale
    acc_ref[...] = acc_ref[...] * lanes(alpha, acc_ref.shape[-1]) + dot(weights.astype(v.dtype), v)


def softmax_finish(m_ref, l_ref, acc_ref):
    """``(output [rows, Hv], (m, log_l))`` in float32, the row statistics ``[rows, 128]`` each.

    ``m + log_l`` is the log-sum-exp; kept apart, ``exp((s - m) - log_l)`` is
    the normalized weight even where ``|m|`` is so large that ``m + log_l``
    rounds ``log_l`` away. Rows that saw no key give 0 and ``m = log_l = inf``.
    """
    l = l_ref[...]
    empty = l == 0.0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    out = acc_ref[...] * lanes(inv, acc_ref.shape[-1])
    m = jnp.where(empty, jnp.inf, m_ref[...])
    log_l = jnp.where(empty, jnp.inf, jnp.log(jnp.where(empty, 1.0, l)))
    return out, (m, log_l)


def scale_tiles(scale, heads_per_program: int, block_k: int):
    """Per-key scales ``[B, S, K]`` laid out as the decode kernels read them: ``[B, K // hb, cdiv(S, block_k), hb,
    block_k]``, a tile's keys along lanes (the axis of the logits they scale), ``S`` zero-padded to whole tiles.

    In ``[B, S, K]`` one head's scales are a strided column, which a kernel
    could lay along lanes only by a transpose in VMEM; this copy, made by XLA
    before the kernel, moves 16 bytes per key and head (both scale arrays,
    read and written) against the ``H + Hv`` bytes of int8 / float8 keys and
    values the kernel reads per key and head: 6% at ``H = Hv = 128`` (more for
    rows much shorter than the capacity: it covers every slot).

    Args:
      scale: float32 ``[B, S, K]``.
      heads_per_program: ``hb``, the K/V heads one program serves (a divisor of ``K``).
      block_k: keys per tile.

    Returns:
      float32 ``[B, K // hb, cdiv(S, block_k), hb, block_k]``: element ``[b,
      c, j, i, l]`` scales key ``j * block_k + l`` of head ``c * hb + i``.
    """
    B, S, K = scale.shape
    num_tiles = pl.cdiv(S, block_k)
    scale = pad_axis(scale, 1, num_tiles * block_k)
    return scale.reshape(B, num_tiles, block_k, K // heads_per_program, heads_per_program).transpose(0, 3, 1, 4, 2)


def head_rows(x, rows_per_head: int, num_rows: int):
    """Per-head rows ``x [hb, cols]`` spread over query rows that are head-major: row ``r`` takes ``x[r //
    rows_per_head]`` (rows past the last head's, padding, the last head's). One head gives ``x`` itself, which
    broadcasts.

    Returns:
      ``[num_rows, cols]``, or ``x`` when ``hb == 1``.
    """
    heads = x.shape[0]
    if heads == 1:
        return x
    row = lax.broadcasted_iota(jnp.int32, (num_rows, x.shape[1]), 0)
    out = jnp.broadcast_to(x[heads - 1:], row.shape)
    for i in reversed(range(heads - 1)):  # selects, not an integer division: comparisons lower on every TPU
        out = jnp.where(row < (i + 1) * rows_per_head, x[i:i + 1], out)
    return out
