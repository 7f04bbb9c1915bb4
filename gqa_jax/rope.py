"""Rotary position embeddings (RoPE), in the half-split convention of Llama-family checkpoints.

A head vector ``x`` of even size ``H`` is split into halves ``x1 = x[:H/2]``,
``x2 = x[H/2:]``; pair ``i`` (``x1[i]``, ``x2[i]``) is rotated by the angle
``position * theta ** (-2i / H)``::

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = concat(-x2, x1)

which is what Hugging Face ``LlamaAttention`` (``apply_rotary_pos_emb``) does,
so its ``q_proj``/``k_proj`` weights load without permutation. Because every
pair turns by an angle proportional to its position, the dot product of a
rotated query and a rotated key depends only on their position difference.

The same function serves queries ``[B, T, N, H]`` and keys ``[B, T, K, H]``:
the head axis is left alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Array:
    """Angular frequency of each rotated pair: float32 ``[H/2]``, ``theta ** (-2i / H)``.

    Raises:
      ValueError: if ``head_dim`` is not a positive even int or ``theta <= 1``.
    """
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int for rotary embeddings, got {head_dim=}")
    if not theta > 1.0:
        raise ValueError(f"theta must be > 1, got {theta=}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x: Array, positions, *, theta: float = 10000.0) -> Array:
    """Rotates each head vector of ``x`` by its token's position.

    Args:
      x: queries ``[B, T, N, H]`` or keys ``[B, T, K, H]``; ``H`` even.
      positions: int ``[B, T]`` position of every token (per row, so ragged
        and cached batches work), or ``[T]`` shared by all rows.
      theta: the base of the frequencies (``rope_theta`` in Llama configs).

    Returns:
      The rotated array, same shape and dtype as ``x``. The angles and the
      rotation are computed in float32.

    Raises:
      ValueError: for wrong ranks or shapes, odd ``H`` or ``theta <= 1``.
      TypeError: for non-integer positions.

    Example::

        positions = cache.lengths[:, None] + jnp.arange(T)   # [B, T]
        q = apply_rope(q, positions, theta=500000.0)
        k = apply_rope(k, positions, theta=500000.0)
    """
    x_BTNH = jnp.asarray(x)
    if x_BTNH.ndim != 4:
        raise ValueError(f"x must have rank 4 [B,T,N,H], got x.shape={tuple(x_BTNH.shape)}")
    B, T, _, H = x_BTNH.shape
    positions_BT = jnp.asarray(positions)
    if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array, got positions.dtype={positions_BT.dtype}")
    if positions_BT.ndim == 1:
        positions_BT = positions_BT[None, :]
    if positions_BT.ndim != 2 or positions_BT.shape[1] != T or positions_BT.shape[0] not in (1, B):
        raise ValueError(
            f"positions must have shape [B,T]=({B}, {T}) or [T]=({T},), got "
            f"positions.shape={tuple(jnp.shape(positions))} for x.shape={tuple(x_BTNH.shape)}"
        )
    angles = positions_BT.astype(jnp.float32)[:, :, None] * rope_frequencies(H, theta)  # [B|1, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B|1, T, 1, H]
    x_f32 = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x_f32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x_f32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BTNH.dtype)
