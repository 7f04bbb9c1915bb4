"""`MultiHeadAttention` in Flax NNX: Keras ``MultiHeadAttention`` with the linen layer's parameters.

The same checks and body as `gqa_jax.modules.MultiHeadAttention`
(`gqa_jax.modules.multi_head_attention.multi_head_attention`): inputs of any
rank, Keras' ``attention_axes``, and keras-hub's ``cache`` for
`CachedMultiHeadAttention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gqa_jax.attention import dot_product_attention
from gqa_jax.modules.decode_cache import nnx_cache_index, nnx_decode
from gqa_jax.modules.initializers import Initializer
from gqa_jax.modules.multi_head_attention import check_mha_fields, multi_head_attention
from gqa_jax.nnx.dropout import dropout_key, dropout_stream
from gqa_jax.nnx.einsum_dense import EinsumDense
from gqa_jax.nnx.keras_layer import (
    KEY_VALUE_AXES,
    QUERY_AXES,
    KerasAttentionLayer,
    dense_settings,
    output_axes,
)
from gqa_jax.rope import RotaryEmbedding

Array = jax.Array


class MultiHeadAttention(KerasAttentionLayer):
    """Multi-head attention after ``keras.layers.MultiHeadAttention``, as an ``nnx.Module``.

    Args:
      num_heads: ``N``.
      key_dim: ``H``, size of each query/key head.
      value_dim: size of each value head (default ``key_dim``).
      in_features: ``Dq``, the query's feature dim.
      value_features: ``Dv`` (default ``Dq``).
      key_features: ``Dk`` (default ``Dv``).
      output_shape: int or ints: the output's trailing shape (default ``Dq``).
      dropout, use_bias, attention_axes, sliding_window, flash_attention,
        kernel_init, bias_init, use_gate, dtype, param_dtype, precision,
        implementation: as in `gqa_jax.modules.MultiHeadAttention`.
      decode: the default of the call's ``decode`` (after `init_cache`).
      deterministic: the default of the call's ``deterministic``.
      rope, qk_transform, scale, logits_soft_cap, local_window_size,
        normalize_qk, norm_epsilon, broadcast_dropout, attention_fn,
        out_kernel_init: as in `gqa_jax.modules.GroupedQueryAttention`.
      sow_weights: the default of the call's ``sow_weights``.
      rngs: ``params`` draws the parameters; ``dropout`` the dropout masks.

    Parameters: ``query [Dq, N, key_dim]``, ``key [Dk, N, key_dim]``,
    ``value [Dv, N, value_dim]``, ``attention_output [N, value_dim,
    *output_shape]``, as the linen layer and Keras.
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        *,
        in_features: int,
        value_features: int | None = None,
        key_features: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: int | Sequence[int] | None = None,
        attention_axes: int | Sequence[int] | None = None,
        sliding_window: int | None = None,
        flash_attention: bool | None = None,
        kernel_init: Initializer | str = "glorot_uniform",
        bias_init: Initializer | str = "zeros",
        use_gate: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        implementation: str | Sequence[str] | None = None,
        decode: bool = False,
        deterministic: bool = True,
        rope: RotaryEmbedding | None = None,
        qk_transform: Callable | None = None,
        scale: float | None = None,
        logits_soft_cap: float | None = None,
        local_window_size: int | tuple[int, int] | None = None,
        normalize_qk: str | None = None,
        norm_epsilon: float = 1e-6,
        broadcast_dropout: bool = False,
        sow_weights: bool = False,
        attention_fn: Callable | None = None,
        out_kernel_init: Initializer | str | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.attention_axes = tuple(attention_axes) if isinstance(attention_axes, Sequence) else attention_axes
        self._init_settings(
            dropout=dropout,
            use_bias=use_bias,
            sliding_window=sliding_window,
            flash_attention=flash_attention,
            use_gate=use_gate,
            implementation=implementation,
            deterministic=deterministic,
            dtype=dtype,
            precision=precision,
            options=dict(
                rope=rope,
                qk_transform=qk_transform,
                scale=scale,
                logits_soft_cap=logits_soft_cap,
                local_window_size=local_window_size,
                normalize_qk=normalize_qk,
                norm_epsilon=norm_epsilon,
                broadcast_dropout=broadcast_dropout,
                sow_weights=sow_weights,
                attention_fn=attention_fn,
            ),
        )
        check_mha_fields(self)
        self.decode = decode
        self.rngs = dropout_stream(rngs, dropout)
        output_shape = in_features if output_shape is None else output_shape
        self.output_shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
        value_features = in_features if value_features is None else value_features
        key_features = value_features if key_features is None else key_features
        N, value_dim = num_heads, value_dim or key_dim
        dense = dense_settings(
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.query = EinsumDense((in_features,), (N, key_dim), kernel_axes=QUERY_AXES, **dense)
        self.key = EinsumDense((key_features,), (N, key_dim), kernel_axes=KEY_VALUE_AXES, **dense)
        self.value = EinsumDense((value_features,), (N, value_dim), kernel_axes=KEY_VALUE_AXES, **dense)
        self.gate = (
            EinsumDense((in_features,), (N, value_dim), kernel_axes=QUERY_AXES, **dense) if use_gate else nnx.data(None)
        )
        self.attention_output = EinsumDense(
            (N, value_dim),
            self.output_shape,
            kernel_axes=output_axes(len(self.output_shape)),
            **{**dense, "kernel_init": out_kernel_init or kernel_init},
        )
        self._init_norms(key_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._init_cache_state(N, key_dim, value_dim)

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
        return_attention_scores: bool = False,
        deterministic: bool | None = None,
        use_causal_mask: bool = False,
        rngs=None,
        **options,
    ):
        """Attends ``query`` to ``key``/``value``, as the linen layer's call.

        ``value`` defaults to ``query`` (self-attention); ``deterministic`` to
        the layer's; ``rngs`` (the dropout stream or key of this call) to the
        layer's stream; ``decode`` (in ``options``) to the layer's (decode mode
        after `init_cache`, as `gqa_jax.nnx.GroupedQueryAttention`). The rest,
        and ``options`` (``mask``, ``positions``, ``kv_positions``,
        ``query_offset``, segment ids, ``num_new``), as in
        `gqa_jax.modules.MultiHeadAttention`; ``sow_weights`` (in ``options``)
        as in `gqa_jax.nnx.GroupedQueryAttention` (the weights of the
        folded inputs, as the linen layer sows them).

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
            rngs=rngs,
            **options,
        )

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
        deterministic=None,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
        num_new=None,
        decode=None,
        rngs=None,
        sow_weights=None,
        **options,
    ):
        """`__call__` plus keras-hub's ``cache`` / ``cache_update_index`` (rank-3 inputs only)."""
        deterministic = self.deterministic if deterministic is None else deterministic
        decode = self.decode if decode is None else decode
        return multi_head_attention(
            self,
            query,
            value,
            key,
            decode=decode,
            cache=cache,
            cache_update_index=cache_update_index,
            num_new=num_new,
            use_causal_mask=use_causal_mask,
            attend=functools.partial(nnx_decode, self, num_new=num_new) if decode else dot_product_attention,
            decode_offset=nnx_cache_index(self),
            project=self.project,
            normalize=self.normalize,
            sow_weights=self.sows_weights(sow_weights),
            sow=self.sow_attention_weights,
            dropout_rng=dropout_key(self.rngs, self.dropout, deterministic, rngs),
            **options,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            return_attention_scores=return_attention_scores,
            deterministic=deterministic,
        )


class CachedMultiHeadAttention(MultiHeadAttention):
    """`MultiHeadAttention` with keras-hub's ``[B, 2, S, N, H]`` cache, as `gqa_jax.modules.CachedMultiHeadAttention`.

    ``cache=None``: the output alone; ``cache`` without an index: attend to it
    as is; ``cache`` with ``cache_update_index`` (scalar or per row ``[B]``):
    write the new keys/values there first. Returns ``(output, cache)`` with a
    cache. The cache is the caller's array, not layer state, so it goes
    through ``jax.lax.scan`` and ``nnx.jit`` like any other argument.
    """

    def __call__(
        self,
        query: Array,
        value: Array | None = None,
        key: Array | None = None,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        *,
        deterministic: bool | None = None,
        use_causal_mask: bool = False,
        return_attention_scores: bool = False,
        rngs=None,
        **options,
    ):
        """Attends ``query`` to the new and/or cached keys and values (arguments as the linen layer's)."""
        return self.attend(
            query,
            value,
            key,
            attention_mask=attention_mask,
            deterministic=deterministic,
            use_causal_mask=use_causal_mask,
            return_attention_scores=return_attention_scores,
            cache=cache,
            cache_update_index=cache_update_index,
            rngs=rngs,
            **options,
        )
