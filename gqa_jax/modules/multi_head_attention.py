"""`MultiHeadAttention`: Keras ``MultiHeadAttention`` as a Flax linen layer.

Inputs of any rank ``[B, ..., D]``. Keras' ``attention_axes`` choose the axes
attended over (default: all but batch and features); the others are batch
axes. The layer folds them into the BTNH layout of
`gqa_jax.dot_product_attention` (batch axes into ``B``, attention axes into
``T`` and ``S``) and unfolds the result, so that every implementation serves
every rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_jax.attention import dot_product_attention
from gqa_jax.modules.checks import check_optional_positive_int, check_positive_int
from gqa_jax.modules.einsum_dense import dense
from gqa_jax.modules.initializers import Initializer
from gqa_jax.modules.keras_attention import (
    check_keras_fields,
    keras_attention_kwargs,
    keras_attention_mask,
    keras_outputs,
)
from gqa_jax.modules.keras_cache import cached_key_value, check_cache

Array = jax.Array


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
        """Inverse of `fold` for an input of shape ``shape`` (without D): ``[B', L, *trailing] -> [*shape, *trailing]``."""
        folded = tuple(shape[a] for a in self.batch_axes + self.attention_axes)
        y = y.reshape(folded + y.shape[2:])
        order = self.batch_axes + self.attention_axes
        inverse = tuple(order.index(a) for a in range(len(order))) + tuple(range(len(order), y.ndim))
        return jnp.transpose(y, inverse)

    def fold_mask(self, name: str, mask, shape: tuple[int, ...]) -> Array | None:
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

    def sizes(self, shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
        """The sizes of ``axes`` in ``shape``."""
        return tuple(shape[a] for a in axes)


def fold_attention_mask(mask, layout: AxesLayout, q_shape, kv_shape) -> Array:
    """A Keras mask ``[batch axes..., T axes..., S axes...]`` (right-aligned, broadcasting) as ``[B', T, S]``."""
    mask = jnp.asarray(mask)
    batch = layout.sizes(q_shape, layout.batch_axes)
    t_axes, s_axes = layout.sizes(q_shape, layout.attention_axes), layout.sizes(kv_shape, layout.attention_axes)
    full = batch + t_axes + s_axes
    if mask.ndim > len(full):
        raise ValueError(f"attention_mask must broadcast to {full} [batch axes, T axes, S axes], got {mask.shape=}")
    mask = jnp.broadcast_to(mask.reshape((1,) * (len(full) - mask.ndim) + mask.shape), full)
    return mask.reshape(math.prod(batch), math.prod(t_axes), math.prod(s_axes))


class MultiHeadAttention(nn.Module):
    """Multi-head attention after ``keras.layers.MultiHeadAttention``.

    Attributes:
      num_heads: ``N``.
      key_dim: ``H``, size of each query/key head.
      value_dim: size of each value head (default ``key_dim``).
      dropout: rate of dropout on the attention weights (training only; needs
        a ``"dropout"`` rng).
      use_bias: projections have biases.
      output_shape: int or ints: the output's trailing shape (default: the
        query's feature dim).
      attention_axes: int or ints: input axes attended over (default: all but
        the batch and feature axes), e.g. ``(1, 2)`` for the two spatial axes
        of ``[B, H, W, C]``.
      sliding_window: None, or each query sees keys within
        ``sliding_window - 1`` positions (one attention axis only).
      flash_attention: None (dispatch chooses), True (demand a fused kernel),
        False (the XLA path).
      kernel_init, bias_init: Flax initializers or Keras names.
      use_gate: output heads multiplied by ``sigmoid(gate(query))``.
      dtype, param_dtype, precision: as in Flax layers.
      implementation: an ``implementation=`` of `gqa_jax.dot_product_attention`
        (exclusive with ``flash_attention``).

    Parameters: ``query [D, N, key_dim]``, ``key [Dk, N, key_dim]``,
    ``value [Dv, N, value_dim]``, ``attention_output [N, value_dim,
    *output_shape]``, as Keras.
    """

    num_heads: int
    key_dim: int
    value_dim: int | None = None
    dropout: float = 0.0
    use_bias: bool = True
    output_shape: int | Sequence[int] | None = None
    attention_axes: int | Sequence[int] | None = None
    sliding_window: int | None = None
    flash_attention: bool | None = None
    kernel_init: Initializer | str = "glorot_uniform"
    bias_init: Initializer | str = "zeros"
    use_gate: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    implementation: str | Sequence[str] | None = None

    def __post_init__(self):
        check_positive_int("num_heads", self.num_heads)
        check_positive_int("key_dim", self.key_dim)
        check_optional_positive_int("value_dim", self.value_dim)
        check_keras_fields(self)
        super().__post_init__()

    def __call__(
        self,
        query: Array,
        value: Array,
        key: Array | None = None,
        *,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores: bool = False,
        deterministic: bool = True,
        use_causal_mask: bool = False,
    ):
        """Attends ``query`` to ``key``/``value``.

        Args:
          query: ``[B, ..., Dq]``.
          value: ``[B, ..., Dv]``, the same rank and batch axes as ``query``.
          key: ``[B, ..., Dk]``; defaults to ``value``.
          query_mask: bool ``query.shape[:-1]``: False queries see nothing.
            (Keras reads it from the query's Keras mask only.)
          value_mask, key_mask: bool ``value.shape[:-1]``: False keys are hidden.
          attention_mask: bool ``[B, <other batch axes>, <T axes>, <S axes>]``,
            broadcasting from the right (Keras' ``[B, T, S]`` for rank 3).
          return_attention_scores: also return the weights, Keras' shape
            ``[B, <other batch axes>, N, <T axes>, <S axes>]``.
          deterministic: no dropout (Keras ``training=False``).
          use_causal_mask: top-left causal mask over the (single) attention axis.

        Returns:
          ``output [B, ..., *output_shape]``, or ``(output, scores)``.
        """
        return self.attend(
            query,
            value,
            key,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            return_attention_scores=return_attention_scores,
            deterministic=deterministic,
            use_causal_mask=use_causal_mask,
        )

    @nn.compact
    def attend(
        self,
        query,
        value,
        key=None,
        *,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        deterministic=True,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
    ):
        """`__call__` plus keras-hub's ``cache`` / ``cache_update_index`` (rank-3 inputs only)."""
        if cache_update_index is not None and cache is None:
            raise ValueError(f"cache_update_index needs a cache, got cache=None, {cache_update_index=}")
        value_dim = self.value_dim or self.key_dim
        static_cache = cache is not None and cache_update_index is None
        key = value if key is None else key
        query = jnp.asarray(query)
        kv_shape = None if static_cache else self._check_inputs(query, jnp.asarray(value), jnp.asarray(key))
        layout = AxesLayout.of(query.ndim, self.attention_axes)
        if len(layout.attention_axes) != 1 and (use_causal_mask or self.sliding_window is not None):
            raise ValueError(
                f"use_causal_mask and sliding_window need one attention axis, got "
                f"attention_axes={layout.attention_axes}, {use_causal_mask=}, sliding_window={self.sliding_window}"
            )
        q = dense(self, "query", (self.num_heads, self.key_dim), query)
        gate = nn.sigmoid(dense(self, "gate", (self.num_heads, value_dim), query)) if self.use_gate else None
        k = None if static_cache else dense(self, "key", (self.num_heads, self.key_dim), key)
        v = None if static_cache else dense(self, "value", (self.num_heads, value_dim), value)
        if cache is not None:
            if query.ndim != 3:
                raise ValueError(f"a cache needs rank-3 inputs [B,T,D], got query.shape={tuple(query.shape)}")
            cache = check_cache(
                cache, batch_size=query.shape[0], num_heads=self.num_heads, head_dim=self.key_dim, heads_letter="N"
            )
            if value_dim != self.key_dim:
                raise ValueError(
                    f"a cache needs value_dim == key_dim, got value_dim={value_dim}, key_dim={self.key_dim}"
                )
            k, v, cache = cached_key_value(cache, cache_update_index, k, v)
            kv_shape = k.shape[:2]
        if layout.sizes(query.shape, layout.batch_axes) != layout.sizes(kv_shape, layout.batch_axes):
            raise ValueError(
                f"query and key/value must agree on the batch axes {layout.batch_axes}, got "
                f"query.shape={tuple(query.shape)} and key/value shape {tuple(kv_shape)} (without the feature axis)"
            )
        folded_q, folded_k, folded_v = layout.fold(q, 2), layout.fold(k, 2), layout.fold(v, 2)
        mask = keras_attention_mask(
            None if attention_mask is None else fold_attention_mask(attention_mask, layout, query.shape[:-1], kv_shape),
            layout.fold_mask("query_mask", query_mask, query.shape[:-1]),
            layout.fold_mask("value_mask", value_mask, kv_shape),
            layout.fold_mask("key_mask", key_mask, kv_shape),
        )
        options = keras_attention_kwargs(
            self,
            use_causal_mask=use_causal_mask,
            query_offset=0 if cache_update_index is None else cache_update_index,
            deterministic=deterministic,
            return_attention_scores=return_attention_scores,
        )
        result = dot_product_attention(folded_q, folded_k, folded_v, mask=mask, **options)
        out, scores = result if return_attention_scores else (result, None)
        out = layout.unfold(out, query.shape[:-1])
        if gate is not None:
            out = out * gate.astype(out.dtype)
        output_shape = self.output_shape or (query.shape[-1],)
        output_shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
        out = dense(self, "attention_output", output_shape, out, contract=2)
        if return_attention_scores:
            batch = layout.sizes(query.shape, layout.batch_axes)
            t_axes, s_axes = (
                layout.sizes(query.shape, layout.attention_axes),
                layout.sizes(kv_shape, layout.attention_axes),
            )
            scores = scores.reshape(batch + (self.num_heads,) + t_axes + s_axes)
        return keras_outputs(out, scores, cache)

    @staticmethod
    def _check_inputs(query, value, key) -> tuple[int, ...]:
        """Checks ranks and batch axes; returns the key/value shape without D."""
        if query.ndim < 3 or value.ndim != query.ndim or key.ndim != query.ndim:
            raise ValueError(
                f"query, value and key must have one rank >= 3 [B,...,D], got query.shape={tuple(query.shape)}, "
                f"value.shape={tuple(value.shape)}, key.shape={tuple(key.shape)}"
            )
        if value.shape[:-1] != key.shape[:-1]:
            raise ValueError(
                f"key and value must agree on all axes but the last, got key.shape={tuple(key.shape)}, "
                f"value.shape={tuple(value.shape)}"
            )
        if query.shape[0] != value.shape[0]:
            raise ValueError(f"batch sizes differ: query.shape={tuple(query.shape)}, value.shape={tuple(value.shape)}")
        return value.shape[:-1]
