"""How the inputs of a Keras attention layer map onto the BTNH layout of `gqa_jax.dot_product_attention`.

Two layouts with one interface (``fold``, ``unfold``, ``fold_masks``,
``unfold_scores``), which `gqa_jax.modules.keras_attention.keras_attention`
uses between the projections and the attention:

- `SequenceLayout`: rank-3 inputs ``[B, T|S, D]`` (``GroupedQueryAttention``),
  already in the layout: nothing moves.
- `AxesLayout`: inputs of any rank ``[B, ..., D]`` and Keras' ``attention_axes``
  (``MultiHeadAttention``): the axes not attended over join the batch axis
  ``B``, the attended ones become ``T`` (and ``S``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


class SequenceLayout:
    """Rank-3 inputs ``[B, T|S, D]``: the projections are already ``[B, T|S, heads, H]``."""

    def fold(self, x: Array, trailing: int) -> Array:
        """``x`` as it is."""
        return x

    def unfold(self, y: Array, shape: tuple[int, ...]) -> Array:
        """``y`` as it is."""
        return y

    def fold_masks(self, attention_mask, query_mask, value_mask, key_mask, q_shape, kv_shape) -> tuple:
        """The masks as they are (``attention_mask [B, T, S]``, ``query_mask [B, T]``, ``value_mask [B, S]``...)."""
        return attention_mask, query_mask, value_mask, key_mask

    def unfold_scores(self, scores: Array, q_shape, kv_shape) -> Array:
        """``scores [B, N, T, S]`` as they are."""
        return scores


@dataclasses.dataclass(frozen=True)
class AxesLayout:
    """Which axes of an input ``[B, ..., D]`` are batch axes and which are attended over.

    Attributes:
      batch_axes: axis 0 and the axes not attended over, ascending.
      attention_axes: the axes attended over, ascending.
    """

    batch_axes: tuple[int, ...]
    attention_axes: tuple[int, ...]

    @classmethod
    def of(cls, rank: int, attention_axes) -> AxesLayout:
        """The layout of rank-``rank`` inputs for Keras' ``attention_axes`` (None, an int or ints)."""
        inner = tuple(range(1, rank - 1))
        if attention_axes is None:
            axes = inner
        else:
            given = (attention_axes,) if isinstance(attention_axes, int) else tuple(attention_axes)
            axes = tuple(sorted({a + rank if a < 0 else a for a in given}))
            if len(axes) != len(given) or not axes or not set(axes) <= set(inner):
                raise ValueError(
                    f"attention_axes must be distinct axes among {list(inner)} (or their negatives) of inputs of "
                    f"rank {rank}, got {attention_axes=}"
                )
        return cls(tuple(a for a in range(rank - 1) if a not in axes), axes)

    def fold(self, x: Array, trailing: int) -> Array:
        """``[input axes but D, *trailing] -> [B', L, *trailing]`` (batch axes first, then attended ones)."""
        perm = self.batch_axes + self.attention_axes + tuple(range(x.ndim - trailing, x.ndim))
        x = jnp.transpose(x, perm)
        nb, na = len(self.batch_axes), len(self.attention_axes)
        return x.reshape(math.prod(x.shape[:nb]), math.prod(x.shape[nb : nb + na]), *x.shape[nb + na :])

    def unfold(self, y: Array, shape: tuple[int, ...]) -> Array:
        """Inverse of `fold` for an input of ``shape`` (without D): ``[B', L, *trailing] -> [*shape, *trailing]``."""
        folded = tuple(shape[a] for a in self.batch_axes + self.attention_axes)
        y = y.reshape(folded + y.shape[2:])
        order = self.batch_axes + self.attention_axes
        inverse = tuple(order.index(a) for a in range(len(order))) + tuple(range(len(order), y.ndim))
        return jnp.transpose(y, inverse)

    def fold_masks(self, attention_mask, query_mask, value_mask, key_mask, q_shape, kv_shape) -> tuple:
        """Keras' masks folded to ``attention_mask [B', T, S]``, ``query_mask [B', T]``, ``value_mask [B', S]``...

        Args:
          attention_mask: ``[batch axes..., T axes..., S axes...]``, broadcasting
            from the right.
          query_mask: of shape ``q_shape``.
          value_mask, key_mask: of shape ``kv_shape``.
          q_shape, kv_shape: the query's and the key/value's shapes without D.

        Any of the masks may be None, and stays None.
        """
        return (
            None if attention_mask is None else self._fold_attention_mask(attention_mask, q_shape, kv_shape),
            self._fold_mask("query_mask", query_mask, q_shape),
            self._fold_mask("value_mask", value_mask, kv_shape),
            self._fold_mask("key_mask", key_mask, kv_shape),
        )

    def unfold_scores(self, scores: Array, q_shape, kv_shape) -> Array:
        """``[B', N, T, S] -> [batch axes..., N, T axes..., S axes...]``, Keras' shape of the scores."""
        batch = self.sizes(q_shape, self.batch_axes)
        t_axes, s_axes = self.sizes(q_shape, self.attention_axes), self.sizes(kv_shape, self.attention_axes)
        return scores.reshape(batch + scores.shape[1:2] + t_axes + s_axes)

    def sizes(self, shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
        """The sizes of ``axes`` in ``shape``."""
        return tuple(shape[a] for a in axes)

    def _fold_mask(self, name: str, mask, shape: tuple[int, ...]) -> Array | None:
        """A per-position mask of an input of shape ``shape`` (without D), folded to ``[B', L]``; None stays None."""
        if mask is None:
            return None
        mask = jnp.asarray(mask)
        if mask.shape != tuple(shape):
            raise ValueError(
                f"{name} must have the input's shape without its feature axis, {tuple(shape)}, got "
                f"{name}.shape={tuple(mask.shape)}"
            )
        return self.fold(mask, 0)

    def _fold_attention_mask(self, mask, q_shape, kv_shape) -> Array:
        """A Keras mask ``[batch axes..., T axes..., S axes...]`` (right-aligned, broadcasting) as ``[B', T, S]``."""
        mask = jnp.asarray(mask)
        batch = self.sizes(q_shape, self.batch_axes)
        t_axes, s_axes = self.sizes(q_shape, self.attention_axes), self.sizes(kv_shape, self.attention_axes)
        full = batch + t_axes + s_axes
        if mask.ndim > len(full):
            raise ValueError(
                f"attention_mask must broadcast to {full} [batch axes, T axes, S axes], got {mask.shape=}"
            )
        mask = jnp.broadcast_to(mask.reshape((1,) * (len(full) - mask.ndim) + mask.shape), full)
        return mask.reshape(math.prod(batch), math.prod(t_axes), math.prod(s_axes))
