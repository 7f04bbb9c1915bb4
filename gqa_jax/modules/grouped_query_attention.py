"""`GroupedQueryAttention`: Keras ``GroupQueryAttention`` as a Flax linen layer.

Same parameters (``query [Dq,N,H]``, ``key [Dk,K,H]``, ``value [Dv,K,H]``,
``attention_output [N,H,Dq]``, each with ``kernel`` and ``bias``), same masks,
same numbers; the attention itself is `gqa_jax.dot_product_attention`, which
never repeats K/V to N heads. On top of Keras: keras-hub's ``cache`` /
``cache_update_index`` (with per-row indices), Flax's ``decode=True`` with
multi-token, per-row cache writes, and a caller's `gqa_jax.KVCache` (``cache=``
with ragged ``num_new``; the updated cache comes back), as a model's
generation loop keeps it. ``use_output_bias`` gives the output projection a
bias setting of its own (Qwen2: q/k/v biases only), ``logical_axes`` names
the parameters' dims for sharding, and `GroupedQueryAttention.project` is the
one place parameters are declared (a model overrides it to keep its own
parameter names: `gqa_jax.models.decoder.Attention`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_jax.attention import dot_product_attention
from gqa_jax.kv_cache import KVCache
from gqa_jax.modules.attention_axes import SequenceLayout
from gqa_jax.modules.attention_options import PROJECTION_AXES, logically_partitioned, merge_deterministic
from gqa_jax.modules.checks import check_bool, check_positive_int
from gqa_jax.modules.decode_cache import (
    CACHE_TYPES,
    KVCacheAttend,
    check_decode_arguments,
    check_kv_cache,
    linen_cache_index,
    linen_decode,
)
from gqa_jax.modules.einsum_dense import EinsumDense, kernel_initializer
from gqa_jax.modules.initializers import Initializer, keras_initializer
from gqa_jax.modules.keras_attention import check_cache_index, check_keras_fields, keras_attention
from gqa_jax.modules.keras_cache import check_cache
from gqa_jax.rope import RotaryEmbedding

Array = jax.Array


def check_sequences(query, value=None, key=None) -> None:
    """Raises ``ValueError`` unless query ``[B,T,Dq]``, value ``[B,S,Dv]`` and key ``[B,S,Dk]`` agree (None: unused)."""
    given = [(name, x) for name, x in (("query", query), ("value", value), ("key", key)) if x is not None]
    for name, x in given:
        if x.ndim != 3:
            raise ValueError(f"{name} must have rank 3 [B,T|S,D], got {name}.shape={tuple(x.shape)}")
    if len({x.shape[0] for _, x in given}) > 1:
        raise ValueError("batch sizes differ: " + ", ".join(f"{name}.shape={tuple(x.shape)}" for name, x in given))
    if value is not None and key is not None and value.shape[1] != key.shape[1]:
        raise ValueError(
            f"key and value lengths S differ: key.shape={tuple(key.shape)}, value.shape={tuple(value.shape)}"
        )


def check_gqa_fields(layer) -> None:
    """Raises ``ValueError`` for bad head counts and sizes, or bad Keras fields (`check_keras_fields`)."""
    check_positive_int("head_dim", layer.head_dim)
    check_positive_int("num_query_heads", layer.num_query_heads)
    check_positive_int("num_key_value_heads", layer.num_key_value_heads)
    if layer.num_query_heads % layer.num_key_value_heads:
        raise ValueError(
            f"num_query_heads={layer.num_query_heads} must be a multiple of "
            f"num_key_value_heads={layer.num_key_value_heads}"
        )
    check_keras_fields(layer)


def check_projection_fields(layer) -> None:
    """Raises ``TypeError`` unless ``use_bias``, ``logical_axes`` are bools and ``use_output_bias`` None or a bool."""
    check_bool("use_bias", layer.use_bias)
    check_bool("logical_axes", layer.logical_axes)
    if layer.use_output_bias is not None:
        check_bool("use_output_bias", layer.use_output_bias)


def projection_initializers(layer, name: str, contract: int, features: tuple[int, ...]):
    """``(kernel_init, bias_init)`` of ``layer``'s projection ``name``; ``bias_init`` None when it has no bias.

    The kernel's initializer is ``layer.out_kernel_init`` for
    ``attention_output`` when given, else ``layer.kernel_init``, resolved with
    Keras' fans (`gqa_jax.modules.einsum_dense.kernel_initializer`). The
    output projection has a bias when ``layer.use_output_bias`` (None: as
    ``layer.use_bias``), the others when ``layer.use_bias``. With
    ``layer.logical_axes`` the kernel carries the names of
    `gqa_jax.modules.attention_options.PROJECTION_AXES` and the bias the
    trailing ones.
    """
    output = name == "attention_output"
    init = layer.out_kernel_init if output and layer.out_kernel_init is not None else layer.kernel_init
    use_bias = layer.use_bias if not output or layer.use_output_bias is None else layer.use_output_bias
    axes = PROJECTION_AXES[name] if layer.logical_axes else None
    kernel_init = logically_partitioned(kernel_initializer(init, contract, features), axes)
    if not use_bias:
        return kernel_init, None
    return kernel_init, logically_partitioned(keras_initializer(layer.bias_init), axes and axes[contract:])


def grouped_query_attention(
    layer, query, value, key, *, decode: bool, cache, cache_update_index, num_new, attend, decode_offset=0,
    **flags
):
    """The checks and body of `GroupedQueryAttention.__call__`, shared by the linen and NNX layers.

    Args:
      layer: the calling layer (fields of `check_gqa_fields`, and those that
        `gqa_jax.modules.keras_attention.keras_attention` reads).
      query, value, key: as in `GroupedQueryAttention.__call__`.
      decode: the layer keeps its own cache (``attend`` writes to it).
      cache, cache_update_index, num_new: as in `GroupedQueryAttention.__call__`.
      attend: `gqa_jax.dot_product_attention`, or the layer's decode step.
      decode_offset: decode mode: int ``[B]`` tokens already cached (the
        first new token's position).
      **flags: the other keywords of `keras_attention` (masks, positions,
        ``project``, ``dropout_rng`` ...).

    Returns:
      What `GroupedQueryAttention.__call__` returns.
    """
    N, K, H = layer.num_query_heads, layer.num_key_value_heads, layer.head_dim
    check_decode_arguments(decode, cache, num_new)
    check_cache_index(cache, cache_update_index)
    if isinstance(cache, CACHE_TYPES):
        return _kv_cache_attention(layer, query, value, key, cache, cache_update_index, num_new, **flags)
    if value is None and not (cache is not None and cache_update_index is None):
        value = query  # one-argument self-attention, as flax's layers take it
    key = value if key is None else key
    query = jnp.asarray(query)
    if cache is not None and cache_update_index is None:
        check_sequences(query)
    else:
        check_sequences(query, jnp.asarray(value), jnp.asarray(key))
    if cache is not None:
        cache = check_cache(cache, batch_size=query.shape[0], num_heads=K, head_dim=H, heads_letter="K")
    return keras_attention(
        layer,
        query,
        value,
        key,
        heads=(N, K),
        head_dims=(H, H),
        output_shape=(query.shape[-1],),
        layout=SequenceLayout(),
        cache=cache,
        cache_update_index=cache_update_index,
        decode=decode,
        position_offset=decode_offset if decode else (0 if cache_update_index is None else cache_update_index),
        attend=attend,
        **flags,
    )


def _kv_cache_attention(layer, query, value, key, cache: KVCache, cache_update_index, num_new, **flags):
    """`grouped_query_attention` with a caller's `KVCache`: write the new keys/values after its lengths, attend over it.

    The queries and new keys sit at ``cache.lengths[b] + t`` (the default
    positions of ``rope``); the outputs end with the updated cache.
    """
    N, K, H = layer.num_query_heads, layer.num_key_value_heads, layer.head_dim
    value = query if value is None else value
    key = value if key is None else key
    query, value, key = jnp.asarray(query), jnp.asarray(value), jnp.asarray(key)
    check_sequences(query, value, key)
    if value.shape[1] != query.shape[1]:
        raise ValueError(
            "with a KVCache the new keys/values are the queries' tokens: query and value lengths must agree, got "
            f"query.shape={tuple(query.shape)}, value.shape={tuple(value.shape)}"
        )
    check_kv_cache(cache, cache_update_index, batch_size=query.shape[0], num_kv_heads=K, head_dim=H)
    attend = KVCacheAttend(cache, num_new)
    outputs = keras_attention(
        layer,
        query,
        value,
        key,
        heads=(N, K),
        head_dims=(H, H),
        output_shape=(query.shape[-1],),
        layout=SequenceLayout(),
        decode=True,
        position_offset=cache.lengths,
        attend=attend,
        **flags,
    )
    return (*outputs, attend.cache) if isinstance(outputs, tuple) else (outputs, attend.cache)


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention after ``keras.layers.GroupQueryAttention``.

    ``K = num_key_value_heads`` key/value heads are shared by ``N =
    num_query_heads`` query heads (``N % K == 0``): multi-query when ``K == 1``,
    multi-head when ``K == N``.

    Attributes:
      head_dim: ``H``, size of each head.
      num_query_heads: ``N``.
      num_key_value_heads: ``K``.
      dropout: rate of dropout on the attention weights (training only; needs
        a ``"dropout"`` rng).
      use_bias: projections have biases.
      use_output_bias: the output projection (``attention_output``) has a
        bias; None (default): as ``use_bias``. ``use_bias=True,
        use_output_bias=False`` is Qwen2's attention.
      sliding_window: None, or each query sees keys within
        ``sliding_window - 1`` positions (Keras' symmetric band).
      flash_attention: None (dispatch chooses), True (demand a fused kernel:
        clear error if none serves the call), False (the XLA path). Dropout in
        training and ``return_attention_scores`` fall back to XLA.
      kernel_init, bias_init: Flax initializers or Keras names.
      use_gate: Keras' gated attention: the output heads are multiplied by
        ``sigmoid(gate(query))`` (parameters ``gate [Dq,N,H]``).
      dtype: computation dtype; param_dtype: parameter dtype; precision: for
        the projections and the attention's matrix products.
      implementation: an ``implementation=`` of `gqa_jax.dot_product_attention`
        (exclusive with ``flash_attention``).
      decode: keep a key/value cache in the ``"cache"`` collection: ``init``
        with inputs of the maximum length allocates it, each
        ``apply(..., mutable=["cache"])`` appends any number of tokens per row
        (``num_new``) and attends over everything written so far.
      rope: a `gqa_jax.RotaryEmbedding` for the queries and keys (at the
        call's ``positions``), or None.
      qk_transform: None, or ``qk_transform(q [B,T,N,H], k [B,S,K,H] | None,
        positions [B|1,T], kv_positions [B|1,S] | None) -> (q, k)``, applied
        after the norms and ``rope`` (``k`` is None for a cache read as is).
      scale: logit scale (default ``1/sqrt(H)``).
      logits_soft_cap: ``cap * tanh(logits / cap)`` (Gemma 2), or None.
      local_window_size: None, int or ``(left, right)``: a query at ``p`` sees
        keys in ``[p - left, p + right]`` (with ``use_causal_mask``, Mistral's
        window is ``(W - 1, 0)``); exclusive with ``sliding_window``.
      normalize_qk: None, ``"rms"`` or ``"layer"``: normalize each query and
        key head over ``H`` before ``rope`` (Gemma 3, OLMo 2, Qwen3), with a
        learnable scale (parameters ``query_norm``, ``key_norm``, each
        ``{"scale": [H]}``); norm_epsilon: its epsilon.
      deterministic: the default of the call's ``deterministic`` (None: True).
      broadcast_dropout: flax's: one dropout mask for every batch row and
        head (not with a cache).
      sow_weights: the default of the call's ``sow_weights``: sow the weights
        ``[B, N, T, S]`` into ``"intermediates"`` as ``"attention_weights"``
        (as flax does; ``apply(..., mutable=["intermediates"])`` returns
        them).
      attention_fn: None, or a function with the signature of
        `flax.linen.dot_product_attention` replacing the attention (keys and
        values repeated to ``N`` heads; the causal and window rules arrive in
        its ``mask``; no cache). With ``sow_weights`` it also gets
        ``module=`` this layer and sows the weights itself (flax's
        ``dot_product_attention`` does), as in flax's
        ``MultiHeadDotProductAttention``.
      out_kernel_init: initializer of ``attention_output``'s kernel (default
        ``kernel_init``).
      logical_axes: declare the projections with logical axis names
        (`flax.linen.with_logical_partitioning`): ``query`` and ``gate``
        kernels ``(embed, q_heads, head_dim)``, ``key`` and ``value``
        ``(embed, kv_heads, head_dim)``, ``attention_output`` ``(q_heads,
        head_dim, embed)``, biases the trailing names. ``init`` then returns
        `flax.linen.LogicallyPartitioned` boxes for `flax.linen.get_partition_spec`
        and `gqa_jax.sharding.logical_axis_rules`; ``apply`` takes boxed or
        plain params (`flax.linen.meta.unbox`). Default False: plain arrays.

    Example::

        layer = GroupedQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2)
        x = jax.random.normal(jax.random.key(0), (2, 10, 64))       # [B, T, D]
        params = layer.init(jax.random.key(1), x)["params"]
        y = layer.apply({"params": params}, x, use_causal_mask=True)  # [B, T, D]

        # A model's generation loop keeps a KVCache: ragged prefill (10 and 4 tokens), then a step.
        from gqa_jax import KVCache

        cache = KVCache.init(batch_size=2, max_length=32, num_kv_heads=2, head_dim=16)
        y, cache = layer.apply({"params": params}, x, use_causal_mask=True, cache=cache, num_new=jnp.array([10, 4]))
        y, cache = layer.apply({"params": params}, x[:, :1], use_causal_mask=True, cache=cache)  # lengths [11, 5]
    """

    head_dim: int
    num_query_heads: int
    num_key_value_heads: int
    dropout: float = 0.0
    use_bias: bool = True
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
    use_output_bias: bool | None = None
    logical_axes: bool = False

    def __post_init__(self):
        check_gqa_fields(self)
        check_projection_fields(self)
        super().__post_init__()

    @nn.nowrap
    def project(self, name: str, features: Sequence[int], x: Array, contract: int = 1) -> Array:
        """Declares and applies the projection ``name``: an `EinsumDense` sublayer (`keras_attention`'s ``project``).

        Args:
          name: ``query``, ``gate``, ``key``, ``value`` (``x [B, T, D] ->
            [B, T, heads, H]``, ``contract=1``) or ``attention_output``
            (``[B, T, N, H] -> [B, T, *features]``, ``contract=2``).
          features: the output's trailing dims.
          x: the input.
          contract: trailing input dims contracted.

        Initializers, bias and logical axis names: `projection_initializers`.
        A subclass overrides this method to lay the same projections out under
        other parameter names; call it from the compact ``__call__`` only.
        """
        features = tuple(features)
        kernel_init, bias_init = projection_initializers(self, name, contract, features)
        return EinsumDense(
            features=features,
            contract=contract,
            use_bias=bias_init is not None,
            kernel_init=kernel_init,
            bias_init=self.bias_init if bias_init is None else bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name=name,
        )(x)

    @nn.compact
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
        dropout_rng=None,
        sow_weights: bool | None = None,
    ):
        """Attends ``query`` to ``key``/``value``.

        Args:
          query: ``[B, T, Dq]``.
          value: ``[B, S, Dv]``; default ``query`` (self-attention: ``layer(x)``),
            unused with a ``cache`` and no index.
          key: ``[B, S, Dk]``; defaults to ``value``.
          query_mask: bool ``[B, T]``: False queries see nothing (output 0
            before the output projection).
          value_mask, key_mask: bool ``[B, S]``: False keys are hidden.
          attention_mask: bool ``[B, T, S]`` (True = attend). With a cache or
            in decode mode, ``S`` (here and in the masks above) is the cache's.
          mask: flax's bool ``[B|1, N|1, T, S]`` (True = attend), ANDed with
            the masks above.
          return_attention_scores: also return the weights ``[B, N, T, S]``.
          deterministic: no dropout (Keras ``training=False``); default the
            layer's ``deterministic``, else True.
          use_causal_mask: query ``t`` sees keys ``s <= t`` (top-left, as in
            Keras); with a cache the queries sit at ``cache_update_index + t``,
            in decode mode after the tokens already cached.
          cache: keras-hub cache ``[B, 2, S, K, H]``; without
            ``cache_update_index`` the layer attends to it as is (``key`` and
            ``value`` unused). Or a `gqa_jax.KVCache` (``[B, S, K, H]``, any
            dtype it holds, quantized included): the new keys/values (``S ==
            T``) are written after each row's ``cache.lengths`` and the
            queries, at positions ``cache.lengths[b] + t``, attend over it
            (``use_causal_mask``: causally); the updated `KVCache` is
            returned.
          cache_update_index: int or int ``[B]``: where the new keys/values go
            in a keras-hub cache.
          num_new: decode mode or a `KVCache` only: int ``[B]`` valid new
            tokens per row (the rest of the ``T`` are padding: not written,
            output 0 before the output projection); default all ``T``.
          positions: int ``[B, T]`` or ``[T]``: the queries' positions for
            ``rope`` / ``qk_transform``; default ``arange(T)`` after the
            cached tokens (decode mode, a `KVCache`), after
            ``cache_update_index``, or after ``query_offset``.
          kv_positions: int ``[B, S]`` or ``[S]``: the new keys' positions;
            default ``positions`` when given and ``S == T``, else
            ``arange(S)`` (after the cached tokens / the index).
          query_offset: int or int ``[B]``: the first query's position for the
            causal and window rules (no cache; keys sit at ``0 .. S-1``).
          q_segment_ids, kv_segment_ids: int ``[B, T]``, ``[B, S]``: a query
            sees only keys of its own packed sequence.
          dropout_rng: the dropout key (default: the ``"dropout"`` rng).
          sow_weights: sow this call's weights (flax's call argument);
            default the layer's ``sow_weights``.

        Returns:
          ``output [B, T, Dq]``; ``(output, scores)`` with
          ``return_attention_scores``; and the updated cache last when
          ``cache`` is given.
        """
        return grouped_query_attention(
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
            project=self.project,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            mask=mask,
            return_attention_scores=return_attention_scores,
            deterministic=merge_deterministic(deterministic, self.deterministic),
            use_causal_mask=use_causal_mask,
            positions=positions,
            kv_positions=kv_positions,
            query_offset=query_offset,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            dropout_rng=dropout_rng,
            sow_weights=sow_weights,
        )


GroupQueryAttention = GroupedQueryAttention
