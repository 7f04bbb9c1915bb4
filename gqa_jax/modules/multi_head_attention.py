"""`MultiHeadAttention`: Keras ``MultiHeadAttention`` as a Flax linen layer.

Inputs of any rank ``[B, ..., D]``. Keras' ``attention_axes`` choose the axes
attended over (default: all but batch and features); the others are batch
axes. The layer folds them into the BTNH layout of
`gqa_jax.dot_product_attention` (batch axes into ``B``, attention axes into
``T`` and ``S``) and unfolds the result, so that every implementation serves
every rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_jax.attention import dot_product_attention
from gqa_jax.modules.attention_axes import AxesLayout
from gqa_jax.modules.attention_options import merge_deterministic
from gqa_jax.modules.checks import check_optional_positive_int, check_positive_int
from gqa_jax.modules.decode_cache import check_decode_arguments, linen_cache_index, linen_decode
from gqa_jax.modules.initializers import Initializer
from gqa_jax.modules.keras_attention import check_cache_index, check_keras_fields, keras_attention
from gqa_jax.modules.keras_cache import check_cache
from gqa_jax.rope import RotaryEmbedding

Array = jax.Array


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
      dtype, param_dtype: as in Flax layers; precision: for the projections
        and the attention's matrix products.
      implementation: an ``implementation=`` of `gqa_jax.dot_product_attention`
        (exclusive with ``flash_attention``).
      decode: Flax's decode mode (rank-3 inputs), as in
        `gqa_jax.modules.GroupedQueryAttention`: a ``"cache"`` collection
        (``cached_key [B, S, N, key_dim]``, ``cached_value [B, S, N,
        value_dim]``, ``cache_index [B]``) that ``init`` allocates with the
        inputs' length and each ``apply(..., mutable=["cache"])`` appends to.
      rope, qk_transform, scale, logits_soft_cap, local_window_size,
        normalize_qk, norm_epsilon, deterministic, broadcast_dropout,
        sow_weights, attention_fn, out_kernel_init: as in
        `gqa_jax.modules.GroupedQueryAttention` (``rope``, ``qk_transform`` and
        ``mask`` need rank-3 inputs).

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
    decode: bool = False
    rope: RotaryEmbedding | None = None
    qk_transform: Callable | None = None
    scale: float | None = None
    logits_soft_cap: float | None = None
    local_window_size: int | tuple[int, int] | None = None
    normalize_qk: str | None = None
    norm_epsilon: float = 1e-6
    deterministic: bool | None = None
    broadcast_dropout: bool = False
    sow_weights: bool = False
    attention_fn: Callable | None = None
    out_kernel_init: Initializer | str | None = None

    def __post_init__(self):
        check_mha_fields(self)
        super().__post_init__()

    def __call__(
        self,
        query: Array,
        value: Array | None = None,
        key: Array | None = None,
        *,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        mask=None,
        return_attention_scores: bool = False,
        deterministic: bool | None = None,
        use_causal_mask: bool = False,
        positions=None,
        kv_positions=None,
        query_offset=None,
        q_segment_ids=None,
        kv_segment_ids=None,
        num_new=None,
        dropout_rng=None,
        sow_weights: bool | None = None,
    ):
        """Attends ``query`` to ``key``/``value``.

        Args:
          query: ``[B, ..., Dq]``.
          value: ``[B, ..., Dv]``, the same rank and batch axes as ``query``;
            default ``query`` (self-attention: ``layer(x)``).
          key: ``[B, ..., Dk]``; defaults to ``value``.
          query_mask: bool ``query.shape[:-1]``: False queries see nothing.
            (Keras reads it from the query's Keras mask only.)
          value_mask, key_mask: bool ``value.shape[:-1]``: False keys are hidden.
          attention_mask: bool ``[B, <other batch axes>, <T axes>, <S axes>]``,
            broadcasting from the right (Keras' ``[B, T, S]`` for rank 3).
          return_attention_scores: also return the weights, Keras' shape
            ``[B, <other batch axes>, N, <T axes>, <S axes>]``.
          deterministic: no dropout (Keras ``training=False``); default the
            layer's ``deterministic``, else True.
          use_causal_mask: top-left causal mask over the (single) attention axis.
          mask, positions, kv_positions, query_offset, q_segment_ids,
            kv_segment_ids, num_new, dropout_rng: as in
            `gqa_jax.modules.GroupedQueryAttention` (rank-3 inputs).
          sow_weights: as in `gqa_jax.modules.GroupedQueryAttention`; the
            weights are ``[B, N, T, S]`` of the folded inputs
            (`gqa_jax.modules.attention_axes.AxesLayout`: the batch axes in
            ``B``, the attention axes in ``T`` and ``S``).

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
            mask=mask,
            return_attention_scores=return_attention_scores,
            deterministic=deterministic,
            use_causal_mask=use_causal_mask,
            positions=positions,
            kv_positions=kv_positions,
            query_offset=query_offset,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            num_new=num_new,
            dropout_rng=dropout_rng,
            sow_weights=sow_weights,
        )

    @nn.compact
    def attend(
        self,
        query,
        value=None,
        key=None,
        *,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        deterministic=None,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
        num_new=None,
        dropout_rng=None,
        **options,
    ):
        """`__call__` plus keras-hub's ``cache`` / ``cache_update_index`` (rank-3 inputs only)."""
        return multi_head_attention(
            self,
            query,
            value,
            key,
            decode=self.decode,
            cache=cache,
            cache_update_index=cache_update_index,
            num_new=num_new,
            attend=functools.partial(linen_decode, self, num_new=num_new) if self.decode else dot_product_attention,
            decode_offset=linen_cache_index(self),
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            return_attention_scores=return_attention_scores,
            deterministic=merge_deterministic(deterministic, self.deterministic),
            use_causal_mask=use_causal_mask,
            dropout_rng=dropout_rng,
            **options,
        )


def check_mha_fields(layer) -> None:
    """Raises ``ValueError`` for bad head counts and sizes, or bad Keras fields (`check_keras_fields`)."""
    check_positive_int("num_heads", layer.num_heads)
    check_positive_int("key_dim", layer.key_dim)
    check_optional_positive_int("value_dim", layer.value_dim)
    check_keras_fields(layer)


def multi_head_attention(
    layer, query, value, key, *, decode: bool, cache, cache_update_index, num_new, use_causal_mask, attend,
    decode_offset=0, **flags
):
    """The checks and body of `MultiHeadAttention.attend`, shared by the linen and NNX layers.

    Args:
      layer: the calling layer (fields of `check_mha_fields`, ``output_shape``,
        ``attention_axes`` and those that
        `gqa_jax.modules.keras_attention.keras_attention` reads).
      query, value, key, cache, cache_update_index, num_new, use_causal_mask:
        as in `MultiHeadAttention.attend`.
      decode: the layer keeps its own cache (``attend`` writes to it).
      attend: `gqa_jax.dot_product_attention`, or the layer's decode step.
      decode_offset: decode mode: int ``[B]`` tokens already cached.
      **flags: the other keywords of `keras_attention` (masks, positions,
        ``project``, ``dropout_rng`` ...).

    Returns:
      What `MultiHeadAttention.attend` returns.
    """
    check_decode_arguments(decode, cache, num_new)
    if decode and jnp.ndim(query) != 3:
        raise ValueError(f"decode=True needs rank-3 inputs [B,T,D], got query.shape={tuple(jnp.shape(query))}")
    check_cache_index(cache, cache_update_index)
    if value is None and not (cache is not None and cache_update_index is None):
        value = query  # one-argument self-attention, as flax's layers take it
    value_dim = layer.value_dim or layer.key_dim
    static_cache = cache is not None and cache_update_index is None
    key = value if key is None else key
    query = jnp.asarray(query)
    kv_shape = None if static_cache else _check_inputs(query, jnp.asarray(value), jnp.asarray(key))
    layout = AxesLayout.of(query.ndim, layer.attention_axes)
    if len(layout.attention_axes) != 1 and (use_causal_mask or layer.sliding_window is not None):
        raise ValueError(
            f"use_causal_mask and sliding_window need one attention axis, got "
            f"attention_axes={layout.attention_axes}, {use_causal_mask=}, sliding_window={layer.sliding_window}"
        )
    if cache is not None:
        cache = _check_cache(layer, query, cache, value_dim)
    elif layout.sizes(query.shape, layout.batch_axes) != layout.sizes(kv_shape, layout.batch_axes):
        raise ValueError(
            f"query and key/value must agree on the batch axes {layout.batch_axes}, got "
            f"query.shape={tuple(query.shape)} and key/value shape {tuple(kv_shape)} (without the feature axis)"
        )
    output_shape = (query.shape[-1],) if layer.output_shape is None else layer.output_shape
    for size in (output_shape,) if isinstance(output_shape, int) else output_shape:
        check_positive_int("output_shape", size)
    return keras_attention(
        layer,
        query,
        value,
        key,
        heads=(layer.num_heads, layer.num_heads),
        head_dims=(layer.key_dim, value_dim),
        output_shape=(output_shape,) if isinstance(output_shape, int) else tuple(output_shape),
        layout=layout,
        use_causal_mask=use_causal_mask,
        cache=cache,
        cache_update_index=cache_update_index,
        decode=decode,
        position_offset=decode_offset if decode else (0 if cache_update_index is None else cache_update_index),
        attend=attend,
        **flags,
    )


def _check_cache(layer, query: Array, cache, value_dim: int) -> Array:
    """``cache`` as an array after checking it against rank-3 inputs and the head sizes."""
    if query.ndim != 3:
        raise ValueError(f"a cache needs rank-3 inputs [B,T,D], got query.shape={tuple(query.shape)}")
    cache = check_cache(
        cache, batch_size=query.shape[0], num_heads=layer.num_heads, head_dim=layer.key_dim, heads_letter="N"
    )
    if value_dim != layer.key_dim:
        raise ValueError(f"a cache needs value_dim == key_dim, got value_dim={value_dim}, key_dim={layer.key_dim}")
    return cache


def _check_inputs(query, value, key) -> tuple[int, ...]:
    """Checks ranks and batch sizes; returns the key/value shape without D."""
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
