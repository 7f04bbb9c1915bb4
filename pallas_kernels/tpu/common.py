"""Pieces shared by the Mosaic TPU kernels: tiling constants, argument checks,
lane broadcasts and the online-softmax update.

TPU vector registers are ``8 x 128`` (sublanes x lanes) 32-bit values. Row
statistics (running max, running sum, log-sum-exp) are kept lane-replicated as
``[rows, 128]`` float32 arrays, and `lanes` widens them to a tile's width, as
jax's own TPU kernels do; those are layouts that Mosaic lowers without
relayouts.
"""

from __future__ import annotations


import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.arguments import KERNEL_DTYPES
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


def scaled_logits(q, k, scale: float, soft_cap: float | None, dims=NT_DIMS):
    """``cap * tanh(scale * q.k / cap)`` in float32, and the tanh (None without cap) for the backward."""
    s = dot(q, k, dims) * scale
    if soft_cap is None:
        return s, None
    t = jnp.tanh(s * (1.0 / soft_cap))
    return t * soft_cap, t


def softmax_init(m_ref, l_ref, acc_ref) -> None:
    m_ref[...] = jnp.full(m_ref.shape, LOWEST, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def softmax_update(s, v, m_ref, l_ref, acc_ref, shift: float = 0.0) -> None:
    """One online-softmax step over a tile of logits ``s [rows, cols]`` and values ``v [cols, Hv]``.

    Masked logits are ``-inf``; the running max starts at the lowest finite
    float32 (`LOWEST`), so they contribute ``exp(-inf) = 0`` and never NaN,
    and any finite logit (a huge finite bias too) counts. ``shift`` (natural
    units) is folded into the running max, ``m = max(m, rowmax(s) + shift)``:
    every weight is at most ``exp(-shift)`` (`pallas_kernels.numerics`).
    """
    m_prev, l_prev = m_ref[...], l_ref[...]
    top = jnp.max(s, axis=-1, keepdims=True)
    m_next = jnp.maximum(m_prev, top + shift if shift else top)
    p = jnp.exp(s - lanes(m_next, s.shape[-1]))
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_ref[...] = m_next
    acc_ref[...] = acc_ref[...] * lanes(alpha, acc_ref.shape[-1]) + dot(p.astype(v.dtype), v)


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
