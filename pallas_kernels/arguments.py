"""Argument checks and padding shared by the public wrappers of every kernel."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= x``."""
    return -(-x // multiple) * multiple


def check_qkv(query, key, value, names: tuple[str, str, str] = ("query", "key", "value")) -> None:
    """Ranks, matching sizes, ``N % K == 0`` and one supported dtype.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      names: how the three are called in messages (e.g. ``key_cache``).

    Raises:
      ValueError: for ranks or sizes that disagree.
      TypeError: for differing or unsupported dtypes.
    """
    q_name, k_name, v_name = names
    for name, x in zip(names, (query, key, value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4, got {name}.shape={tuple(x.shape)}")
    if key.shape[0] != query.shape[0] or value.shape[:3] != key.shape[:3] or key.shape[3] != query.shape[3]:
        raise ValueError(
            f"shapes disagree: {q_name} [B,T,N,H]={tuple(query.shape)}, {k_name} [B,S,K,H]={tuple(key.shape)}, "
            f"{v_name} [B,S,K,Hv]={tuple(value.shape)}"
        )
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads N={num_heads} must be a multiple of num_kv_heads K={num_kv_heads}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"{q_name}, {k_name} and {v_name} must share a dtype, got {q_name}.dtype={query.dtype}, "
            f"{k_name}.dtype={key.dtype}, {v_name}.dtype={value.dtype}"
        )
    if jnp.dtype(query.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, got {q_name}.dtype={query.dtype}")


def window_pair(local_window_size) -> tuple[int, int] | None:
    """``None``, an int or a ``(left, right)`` pair of non-negative ints -> a pair or None."""
    if local_window_size is None:
        return None
    window = (local_window_size,) * 2 if isinstance(local_window_size, numbers.Integral) else tuple(local_window_size)
    if len(window) != 2 or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window):
        raise TypeError(f"local_window_size must be an int or a (left, right) pair of ints, got {local_window_size=}")
    if min(window) < 0:
        raise ValueError(f"local_window_size must be non-negative, got {local_window_size=}")
    return int(window[0]), int(window[1])


def row_vector(name: str, x, batch: int, default: int | None = None) -> jax.Array:
    """An int32 ``[B]`` from a scalar or ``[B]`` integer array (or ``default`` for None)."""
    if x is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return jnp.full((batch,), default, jnp.int32)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {name}.dtype={x.dtype}")
    if x.ndim == 0:
        x = jnp.broadcast_to(x, (batch,))
    if x.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape [B]=({batch},), got {name}.shape={tuple(x.shape)}")
    return x.astype(jnp.int32)


def check_soft_cap(logits_soft_cap) -> float | None:
    """A positive float or None."""
    if logits_soft_cap is None:
        return None
    if not isinstance(logits_soft_cap, numbers.Real) or not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap=}")
    return float(logits_soft_cap)


def check_scale(scale, head_dim: int) -> float:
    """The logit scale: ``1/sqrt(H)`` by default, else a real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    return float(scale)


def pad_axis(x, axis: int, size: int):
    """Zero-pads axis ``axis`` of ``x`` up to ``size`` (no copy when it already fits; None stays None)."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)
