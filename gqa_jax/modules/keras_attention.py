"""What the Keras attention layers share: their body, masks, positions, settings, outputs.

`keras_attention` is the body of ``GroupedQueryAttention`` and
``MultiHeadAttention``: projections, masks, keras-hub cache splice,
attention, gate and output projection. The layers check their inputs and
choose the layout (`gqa_jax.modules.attention_axes`) and the attention call.

Keras (``MultiHeadAttention._compute_attention_mask``) ANDs the query mask
``[B, T, 1]``, the value and key masks ``[B, 1, S]``, the causal mask and the
sliding-window band with the user's ``attention_mask [B, T, S]``. Its causal
mask is top-left (query ``t`` sees keys ``s <= t``, also when ``T != S``) and
its band is ``|t - s| < sliding_window``. Here the masks become one boolean
``mask`` and the rules become ``is_causal`` / ``local_window_size`` with
``query_offset=0``, so fused kernels can serve them.

One difference: a query with no visible key gets zeros here; Keras gives zero
weights on its explicit path (``return_attention_scores=True`` or dropout) but
a uniform average on its fused path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gqa_jax.attention import dot_product_attention
from gqa_jax.masks import combine_masks
from gqa_jax.modules.attention_axes import AxesLayout, SequenceLayout
from gqa_jax.modules.checks import check_bool, check_optional_positive_int, check_rate
from gqa_jax.modules.einsum_dense import dense
from gqa_jax.modules.implementation import check_choice, dispatch_kwargs
from gqa_jax.modules.keras_cache import cached_key_value

Array = jax.Array


def check_keras_fields(layer) -> None:
    """Checks the Keras-like layer fields ``dropout``, ``sliding_window``, ``use_gate`` and ``flash_attention``."""
    check_rate("dropout", layer.dropout)
    check_optional_positive_int("sliding_window", layer.sliding_window)
    check_bool("use_gate", layer.use_gate)
    check_choice(layer.flash_attention, layer.implementation)


def _as_bool(mask) -> Array:
    """Keras casts masks to bool: nonzero attends."""
    return jnp.asarray(mask).astype(jnp.bool_)


def keras_attention_mask(attention_mask=None, query_mask=None, value_mask=None, key_mask=None) -> Array | None:
    """The AND of Keras' masks (nonzero = attend): bool ``[B|1, T|1, S|1]`` or None.

    Args:
      attention_mask: ``[B, T, S]`` (or anything that broadcasts to it).
      query_mask: ``[B, T]``: False rows see no key.
      value_mask: ``[B, S]``: False keys are hidden.
      key_mask: ``[B, S]``: as ``value_mask``.
    """
    return combine_masks(
        None if query_mask is None else _as_bool(query_mask)[:, :, None],
        None if value_mask is None else _as_bool(value_mask)[:, None, :],
        None if key_mask is None else _as_bool(key_mask)[:, None, :],
        None if attention_mask is None else _as_bool(attention_mask),
    )


def keras_position_rules(use_causal_mask: bool, sliding_window: int | None, query_offset=0) -> dict:
    """Keyword rules of `gqa_jax.dot_product_attention` for Keras' causal mask and band.

    Args:
      use_causal_mask: keys at positions up to the query's.
      sliding_window: None, or keys within ``sliding_window - 1`` positions.
      query_offset: position of the first query (int or int ``[B]``); Keras'
        own rule is 0 (top-left), a cache write puts it at the write index.

    Returns:
      ``is_causal``, ``local_window_size`` and ``query_offset`` (None when no
      positional rule is on).
    """
    window = None if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    positional = use_causal_mask or window is not None
    return {
        "is_causal": bool(use_causal_mask),
        "local_window_size": window,
        "query_offset": query_offset if positional else None,
    }


def keras_attention_kwargs(
    layer,
    *,
    use_causal_mask: bool,
    query_offset,
    deterministic: bool,
    return_attention_scores: bool,
    dropout_rng=None,
) -> dict:
    """Keywords of `gqa_jax.dot_product_attention` for a Keras-like layer's settings and call flags.

    Args:
      layer: a module with ``dropout``, ``sliding_window``, ``flash_attention``
        and ``implementation`` fields (and a ``"dropout"`` rng when training
        without ``dropout_rng``).
      use_causal_mask: the causal rule.
      query_offset: position of the first query (see `keras_position_rules`).
      deterministic: no dropout.
      return_attention_scores: also return the weights ``[B, N, T, S]``.
      dropout_rng: the dropout key (None: drawn from ``layer``'s rng stream).

    Returns:
      ``is_causal``, ``local_window_size``, ``query_offset``, ``dropout_rate``,
      ``dropout_rng``, ``return_weights`` and ``implementation``.
    """
    return {
        **keras_position_rules(use_causal_mask, layer.sliding_window, query_offset),
        **dispatch_kwargs(
            layer,
            dropout=layer.dropout,
            deterministic=deterministic,
            return_weights=return_attention_scores,
            implementation=layer.implementation,
            flash_attention=layer.flash_attention,
            dropout_rng=dropout_rng,
        ),
    }


def keras_outputs(output, scores, cache):
    """``output``, then ``scores`` and ``cache`` where not None: a bare output when alone, else a tuple."""
    outputs = tuple(x for x in (output, scores, cache) if x is not None)
    return outputs[0] if len(outputs) == 1 else outputs


def check_cache_index(cache, cache_update_index) -> None:
    """Raises ``ValueError`` for a ``cache_update_index`` without a ``cache``."""
    if cache_update_index is not None and cache is None:
        raise ValueError(f"cache_update_index needs a cache, got cache=None, {cache_update_index=}")


def keras_attention(
    layer,
    query: Array,
    value: Array | None,
    key: Array | None,
    *,
    heads: tuple[int, int],
    head_dims: tuple[int, int],
    output_shape: tuple[int, ...],
    layout: AxesLayout | SequenceLayout,
    query_mask=None,
    value_mask=None,
    key_mask=None,
    attention_mask=None,
    return_attention_scores: bool = False,
    deterministic: bool = True,
    use_causal_mask: bool = False,
    cache: Array | None = None,
    cache_update_index=None,
    attend: Callable = dot_product_attention,
    project: Callable | None = None,
    dropout_rng=None,
):
    """The body of a Keras attention layer, from its checked inputs to its outputs.

    Projects ``query``, ``key`` and ``value`` to heads (parameters ``query``,
    ``key``, ``value``, and ``gate`` when ``layer.use_gate``), splices the new
    keys/values into a keras-hub ``cache``, folds the heads and the masks into
    BTNH with ``layout``, attends, unfolds, gates, and projects the heads to
    ``output_shape`` (parameter ``attention_output``). Call it from the layer's
    compact method.

    Args:
      layer: the calling module, with the fields of `keras_attention_kwargs`
        and ``use_gate`` (and those of `dense` unless ``project`` is given).
      query: ``[B, ..., Dq]``.
      value: ``[B, ..., Dv]``; unused (may be None) with a ``cache`` and no
        ``cache_update_index``.
      key: ``[B, ..., Dk]``, as ``value``.
      heads: ``(N, K)``: query heads and key/value heads.
      head_dims: ``(H, Hv)``: query/key head size and value head size.
      output_shape: the output's trailing shape (``(Dq,)`` as Keras' default).
      layout: how the inputs map onto BTNH (`gqa_jax.modules.attention_axes`).
      query_mask, value_mask, key_mask, attention_mask: Keras' masks, in the
        shapes ``layout`` folds (see `keras_attention_mask`).
      return_attention_scores: also return the weights ``[B, N, T, S]`` (as
        ``layout`` unfolds them).
      deterministic: no dropout.
      use_causal_mask: Keras' top-left causal mask; the queries sit at
        ``cache_update_index + t`` with an index.
      cache: a checked keras-hub cache ``[B, 2, S, K, H]`` or None (see
        `gqa_jax.modules.keras_cache.cached_key_value`).
      cache_update_index: None, or int / int ``[B]``: where the new keys and
        values go in ``cache``.
      attend: the attention, called as ``attend(q [B, T, N, H], k [B, S, K, H],
        v [B, S, K, Hv], mask=..., **keras_attention_kwargs)``:
        `gqa_jax.dot_product_attention`, or a layer's own cache.
      project: the projections, called as ``project(name, features, x,
        contract=1 | 2)`` (see `gqa_jax.modules.einsum_dense.EinsumDense`);
        default: a linen `dense` sublayer of ``layer`` per name. The NNX
        layers pass their own sublayers.
      dropout_rng: the dropout key when training (None: from the linen
        ``layer``'s ``"dropout"`` rng stream).

    Returns:
      ``output [B, ..., *output_shape]``, then the scores and the updated
      cache where present (see `keras_outputs`).
    """
    for name, flag in (("return_attention_scores", return_attention_scores), ("deterministic", deterministic),
                       ("use_causal_mask", use_causal_mask)):
        check_bool(name, flag)
    num_heads, num_kv_heads = heads
    key_dim, value_dim = head_dims
    project = functools.partial(dense, layer) if project is None else project
    static_cache = cache is not None and cache_update_index is None
    q = project("query", (num_heads, key_dim), query)
    gate = jax.nn.sigmoid(project("gate", (num_heads, value_dim), query)) if layer.use_gate else None
    k = None if static_cache else project("key", (num_kv_heads, key_dim), key)
    v = None if static_cache else project("value", (num_kv_heads, value_dim), value)
    if cache is not None:
        k, v, cache = cached_key_value(cache, cache_update_index, k, v)
    q_shape, kv_shape = q.shape[:-2], k.shape[:-2]
    mask = keras_attention_mask(*layout.fold_masks(attention_mask, query_mask, value_mask, key_mask, q_shape, kv_shape))
    options = keras_attention_kwargs(
        layer,
        use_causal_mask=use_causal_mask,
        query_offset=0 if cache_update_index is None else cache_update_index,
        deterministic=deterministic,
        return_attention_scores=return_attention_scores,
        dropout_rng=dropout_rng,
    )
    result = attend(layout.fold(q, 2), layout.fold(k, 2), layout.fold(v, 2), mask=mask, **options)
    out, scores = result if return_attention_scores else (result, None)
    out = layout.unfold(out, q_shape)
    if gate is not None:
        out = out * gate.astype(out.dtype)
    out = project("attention_output", output_shape, out, contract=2)
    scores = None if scores is None else layout.unfold_scores(scores, q_shape, kv_shape)
    return keras_outputs(out, scores, cache)
