"""`GroupedQueryAttention` in Flax NNX: Keras ``GroupQueryAttention`` with the linen layer's parameters.

The same checks and body as `gqa_jax.modules.GroupedQueryAttention`
(`gqa_jax.modules.grouped_query_attention.grouped_query_attention`), so the
two give the same numbers from the same parameters. Decoding keeps the cache
as ``nnx.Cache`` state: `GroupedQueryAttention.init_cache`, then
``layer(x, decode=True)`` with any number of tokens per row.
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
from gqa_jax.modules.grouped_query_attention import check_gqa_fields, grouped_query_attention
from gqa_jax.modules.initializers import Initializer
from gqa_jax.nnx.dropout import dropout_key, dropout_stream
from gqa_jax.nnx.einsum_dense import EinsumDense
from gqa_jax.rope import RotaryEmbedding
from gqa_jax.nnx.keras_layer import (
    KEY_VALUE_AXES,
    OUTPUT_AXES,
    QUERY_AXES,
    KerasAttentionLayer,
    dense_settings,
)

Array = jax.Array


class GroupedQueryAttention(KerasAttentionLayer):
    """Grouped-query attention after ``keras.layers.GroupQueryAttention``, as an ``nnx.Module``.

    Args:
      head_dim: ``H``.
      num_query_heads: ``N``.
      num_key_value_heads: ``K`` (``N % K == 0``).
      in_features: ``Dq``, the query's feature dim (and the output's).
      value_features: ``Dv`` (default ``Dq``).
      key_features: ``Dk`` (default ``Dv``).
      dropout, use_bias, sliding_window, flash_attention, kernel_init,
        bias_init, use_gate, dtype, param_dtype, precision, implementation:
        as in `gqa_jax.modules.GroupedQueryAttention`.
      decode: the default of the call's ``decode``.
      deterministic: the default of the call's ``deterministic`` (no dropout).
      rope, qk_transform, scale, logits_soft_cap, local_window_size,
        normalize_qk, norm_epsilon, broadcast_dropout, attention_fn,
        out_kernel_init: as in `gqa_jax.modules.GroupedQueryAttention`.
      sow_weights: the default of the call's ``sow_weights``.
      rngs: ``params`` draws the parameters; ``dropout`` (or the default
        stream) the dropout masks.

    Parameters: ``query [Dq, N, H]``, ``key [Dk, K, H]``, ``value [Dv, K, H]``,
    ``attention_output [N, H, Dq]`` (``kernel``, ``bias``), ``gate [Dq, N, H]``
    with ``use_gate``, as the linen layer, with the logical axis names
    ``embed``, ``q_heads``, ``kv_heads`` and ``head_dim``.

    Example::

        from flax import nnx

        x = np.random.default_rng(0).standard_normal((2, 6, 64), np.float32)   # [B, T, 64]
        layer = GroupedQueryAttention(16, 8, 2, in_features=64, rngs=nnx.Rngs(0))
        y = layer(x, use_causal_mask=True)                         # [B, T, 64]
        y, sown = nnx.capture(layer, nnx.Intermediate)(x, use_causal_mask=True, sow_weights=True)
        (weights,) = sown["attention_weights"].get_value()         # [B, N, T, T]
        layer.init_cache(batch_size=2, max_length=16)
        y = layer(x[:, :4], decode=True, use_causal_mask=True)     # a 4-token prompt
        y = layer(x[:, 4:], decode=True, use_causal_mask=True)     # then one or more tokens per call
    """

    def __init__(
        self,
        head_dim: int,
        num_query_heads: int,
        num_key_value_heads: int,
        *,
        in_features: int,
        value_features: int | None = None,
        key_features: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
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
        self.head_dim, self.num_query_heads, self.num_key_value_heads = head_dim, num_query_heads, num_key_value_heads
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
        check_gqa_fields(self)
        self.rngs = dropout_stream(rngs, dropout)
        self.decode = decode
        value_features = in_features if value_features is None else value_features
        key_features = value_features if key_features is None else key_features
        N, K, H = num_query_heads, num_key_value_heads, head_dim
        dense = dense_settings(
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.query = EinsumDense((in_features,), (N, H), kernel_axes=QUERY_AXES, **dense)
        self.key = EinsumDense((key_features,), (K, H), kernel_axes=KEY_VALUE_AXES, **dense)
        self.value = EinsumDense((value_features,), (K, H), kernel_axes=KEY_VALUE_AXES, **dense)
        self.gate = EinsumDense((in_features,), (N, H), kernel_axes=QUERY_AXES, **dense) if use_gate else nnx.data(None)
        self.attention_output = EinsumDense(
            (N, H), (in_features,), kernel_axes=OUTPUT_AXES, **{**dense, "kernel_init": out_kernel_init or kernel_init}
        )
        self._init_norms(H, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._init_cache_state(K, H, H)

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
        cache=None,
        cache_update_index=None,
        num_new=None,
        decode: bool | None = None,
        rngs=None,
        sow_weights: bool | None = None,
    ):
        """Attends ``query`` to ``key``/``value``, as the linen layer's call.

        Args:
          query: ``[B, T, Dq]``.
          value: ``[B, S, Dv]``; default ``query`` (self-attention), unused
            with a ``cache`` and no index.
          key: ``[B, S, Dk]``; defaults to ``value``.
          query_mask, value_mask, key_mask, attention_mask, mask,
            return_attention_scores, use_causal_mask, positions, kv_positions,
            query_offset, q_segment_ids, kv_segment_ids, cache,
            cache_update_index: as in `gqa_jax.modules.GroupedQueryAttention`.
          deterministic: no dropout; default the layer's.
          num_new: decode only: int ``[B]`` valid new tokens per row (the rest
            of the ``T`` are padding: not written, zero output before the
            output projection); default all ``T``.
          decode: write the new keys/values after each row's cached tokens
            and attend over the cache (after `init_cache`); default the
            layer's ``decode``.
          rngs: the dropout stream or key of this call (default the layer's).
          sow_weights: sow the weights ``[B, N, T, S]`` as ``nnx.Intermediate``
            ``attention_weights`` (default the layer's ``sow_weights``), as
            flax's NNX ``MultiHeadAttention``: ``out, intermediates =
            nnx.capture(layer, nnx.Intermediate)(x, sow_weights=True)``
            gives them as ``intermediates["attention_weights"]``, a tuple with
            one entry per call. Outside ``nnx.capture`` nothing is sown (see
            `KerasAttentionLayer.sows_weights`). With ``attention_fn`` the
            function gets ``module=`` this layer and sows them itself.

        Returns:
          ``output [B, T, Dq]``; ``(output, scores)`` with
          ``return_attention_scores``; and the updated keras-hub cache last
          when ``cache`` is given.

        Raises:
          ValueError: for inputs that do not fit, or ``decode`` before `init_cache`.
        """
        decode = self.decode if decode is None else decode
        deterministic = self.deterministic if deterministic is None else deterministic
        return grouped_query_attention(
            self,
            query,
            value,
            key,
            decode=decode,
            cache=cache,
            cache_update_index=cache_update_index,
            num_new=num_new,
            attend=functools.partial(nnx_decode, self, num_new=num_new) if decode else dot_product_attention,
            decode_offset=nnx_cache_index(self),
            project=self.project,
            normalize=self.normalize,
            sow_weights=self.sows_weights(sow_weights),
            sow=self.sow_attention_weights,
            dropout_rng=dropout_key(self.rngs, self.dropout, deterministic, rngs),
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
        )
