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
from gqa_jax.modules.attention_options import (
    broadcast_dropout_attention,
    check_attention_options,
    flax_attention,
    linen_normalize,
    matmul_precision,
    token_positions,
    transform_query_key,
)
from gqa_jax.modules.checks import check_bool, check_optional_positive_int, check_rate
from gqa_jax.modules.einsum_dense import dense
from gqa_jax.modules.implementation import check_choice, dispatch_kwargs
from gqa_jax.modules.keras_cache import cached_key_value

Array = jax.Array


def check_keras_fields(layer) -> None:
    """Checks ``dropout``, ``sliding_window``, ``use_gate``, ``flash_attention`` and the `check_attention_options`."""
    check_rate("dropout", layer.dropout)
    check_optional_positive_int("sliding_window", layer.sliding_window)
    check_bool("use_gate", layer.use_gate)
    check_choice(layer.flash_attention, layer.implementation)
    check_attention_options(layer)


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


def keras_position_rules(
    use_causal_mask: bool, sliding_window: int | None, query_offset=0, local_window_size=None
) -> dict:
    """Keyword rules of `gqa_jax.dot_product_attention` for Keras' causal mask and band.

    Args:
      use_causal_mask: keys at positions up to the query's.
      sliding_window: None, or keys within ``sliding_window - 1`` positions.
      query_offset: position of the first query (int or int ``[B]``); Keras'
        own rule is 0 (top-left), a cache write puts it at the write index.
      local_window_size: None, or int / ``(left, right)``: a query at ``p``
        sees keys in ``[p - left, p + right]`` (exclusive with
        ``sliding_window``).

    Returns:
      ``is_causal``, ``local_window_size`` and ``query_offset`` (None when no
      positional rule is on).
    """
    window = None if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    window = window if local_window_size is None else local_window_size
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
      layer: a module with ``dropout``, ``sliding_window``,
        ``local_window_size``, ``scale``, ``logits_soft_cap``,
        ``flash_attention`` and ``implementation`` fields (and a ``"dropout"`` rng when training
        without ``dropout_rng``).
      use_causal_mask: the causal rule.
      query_offset: position of the first query (see `keras_position_rules`).
      deterministic: no dropout.
      return_attention_scores: also return the weights ``[B, N, T, S]``.
      dropout_rng: the dropout key (None: drawn from ``layer``'s rng stream).

    Returns:
      ``is_causal``, ``local_window_size``, ``query_offset``, ``scale``,
      ``logits_soft_cap``, ``dropout_rate``, ``dropout_rng``,
      ``return_weights`` and ``implementation``.
    """
    return {
        **keras_position_rules(use_causal_mask, layer.sliding_window, query_offset, layer.local_window_size),
        "scale": layer.scale,
        "logits_soft_cap": layer.logits_soft_cap,
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
    mask=None,
    return_attention_scores: bool = False,
    deterministic: bool = True,
    use_causal_mask: bool = False,
    positions=None,
    kv_positions=None,
    query_offset=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    cache: Array | None = None,
    cache_update_index=None,
    decode: bool = False,
    position_offset=0,
    attend: Callable = dot_product_attention,
    project: Callable | None = None,
    normalize: Callable | None = None,
    sow_weights: bool | None = None,
    sow: Callable | None = None,
    dropout_rng=None,
):
    """The body of a Keras attention layer, from its checked inputs to its outputs.

    Projects ``query``, ``key`` and ``value`` to heads (parameters ``query``,
    ``key``, ``value``, and ``gate`` when ``layer.use_gate``), normalizes the
    query and key heads (``layer.normalize_qk``: parameters ``query_norm``,
    ``key_norm``), rotates them by their positions (``layer.rope``) and applies
    ``layer.qk_transform``, splices the new keys/values into a keras-hub
    ``cache``, folds the heads and the masks into BTNH with ``layout``, attends
    (``layer.attention_fn`` or ``attend``; at ``layer.precision``), sows the
    weights when asked, unfolds, gates, and projects the heads to
    ``output_shape`` (parameter ``attention_output``). Call it from the
    layer's compact method.

    Args:
      layer: the calling module, with the fields of `keras_attention_kwargs`,
        `gqa_jax.modules.attention_options.check_attention_options` and
        ``use_gate`` (and those of `dense` unless ``project`` is given).
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
      mask: flax's bool ``[B|1, N|1, T, S]`` (True = attend), rank-3 inputs.
      return_attention_scores: also return the weights ``[B, N, T, S]`` (as
        ``layout`` unfolds them).
      deterministic: no dropout.
      use_causal_mask: Keras' top-left causal mask; the queries sit at
        ``cache_update_index + t`` with an index.
      positions: int ``[B, T]`` / ``[T]`` positions of the queries for
        ``rope`` / ``qk_transform`` (rank-3 inputs); default
        ``position_offset + query_offset + arange(T)``.
      kv_positions: int ``[B, S]`` / ``[S]`` positions of the new keys;
        default ``positions`` when ``S == T`` and they are given, else
        ``position_offset + arange(S)``.
      query_offset: int or int ``[B]``: position of the first query for the
        causal and window rules (no cache); default 0.
      q_segment_ids, kv_segment_ids: int ``[B, T]``, ``[B, S]`` packed-sequence
        ids (see `gqa_jax.dot_product_attention`).
      cache: a checked keras-hub cache ``[B, 2, S, K, H]`` or None (see
        `gqa_jax.modules.keras_cache.cached_key_value`).
      cache_update_index: None, or int / int ``[B]``: where the new keys and
        values go in ``cache``.
      decode: ``attend`` is the layer's decode-mode cache.
      position_offset: int or int ``[B]``: position of the first new token
        (the cache index in decode mode).
      attend: the attention, called as ``attend(q [B, T, N, H], k [B, S, K, H],
        v [B, S, K, Hv], mask=..., **keras_attention_kwargs)``:
        `gqa_jax.dot_product_attention`, or a layer's own cache.
      project: the projections, called as ``project(name, features, x,
        contract=1 | 2)`` (see `gqa_jax.modules.einsum_dense.EinsumDense`);
        default: a linen `dense` sublayer of ``layer`` per name (the output
        projection initialized by ``layer.out_kernel_init`` when not None). The NNX
        layers pass their own sublayers.
      normalize: the q/k norms, called as ``normalize(name, x)``; default a
        linen sublayer (`gqa_jax.modules.attention_options.linen_normalize`).
      sow_weights: sow this call's weights (None: ``layer.sow_weights``).
        With ``layer.attention_fn`` the function gets ``module=layer`` and
        sows them itself (`gqa_jax.modules.attention_options.flax_attention`),
        as in flax's layers; otherwise the weights ``[B, N, T, S]`` (as
        ``layout`` folds them) go to ``sow``.
      sow: called as ``sow(weights)`` with ``sow_weights``; default linen's
        ``layer.sow("intermediates", "attention_weights", weights)``.
      dropout_rng: the dropout key when training (None: from the linen
        ``layer``'s ``"dropout"`` rng stream).

    Returns:
      ``output [B, ..., *output_shape]``, then the scores and the updated
      cache where present (see `keras_outputs`).

    Raises:
      ValueError: for positions without ``rope``/``qk_transform``, rope or
        ``mask`` on inputs of rank > 3, ``query_offset`` with a cache,
        ``attention_fn`` with a cache or ``return_attention_scores``, or
        ``broadcast_dropout`` with a cache.
    """
    sow_weights = layer.sow_weights if sow_weights is None else sow_weights
    for name, flag in (("return_attention_scores", return_attention_scores), ("deterministic", deterministic),
                       ("use_causal_mask", use_causal_mask), ("sow_weights", sow_weights)):
        check_bool(name, flag)
    sow_scores = sow_weights and layer.attention_fn is None  # an attention_fn sows its own (module=layer)
    num_heads, num_kv_heads = heads
    key_dim, value_dim = head_dims
    project = functools.partial(_linen_project, layer) if project is None else project
    cached = cache is not None or decode
    if query_offset is not None and cached:
        raise ValueError(f"query_offset is for calls without a cache (the cache knows the positions), got {query_offset=}")
    static_cache = cache is not None and cache_update_index is None
    q = project("query", (num_heads, key_dim), query)
    gate = jax.nn.sigmoid(project("gate", (num_heads, value_dim), query)) if layer.use_gate else None
    k = None if static_cache else project("key", (num_kv_heads, key_dim), key)
    v = None if static_cache else project("value", (num_kv_heads, value_dim), value)
    if layer.normalize_qk is not None:
        normalize = functools.partial(linen_normalize, layer) if normalize is None else normalize
        q = normalize("query_norm", q)
        k = None if k is None else normalize("key_norm", k)
    q, k = _rotate(layer, q, k, positions, kv_positions, position_offset, query_offset)
    if cache is not None:
        k, v, cache = cached_key_value(cache, cache_update_index, k, v)
    q_shape, kv_shape = q.shape[:-2], k.shape[:-2]
    keras_mask = keras_attention_mask(
        *layout.fold_masks(attention_mask, query_mask, value_mask, key_mask, q_shape, kv_shape)
    )
    options = keras_attention_kwargs(
        layer,
        use_causal_mask=use_causal_mask,
        query_offset=cache_update_index if cache is not None else (0 if query_offset is None else query_offset),
        deterministic=deterministic,
        return_attention_scores=return_attention_scores or sow_scores,
        dropout_rng=dropout_rng,
    )
    if q_segment_ids is not None or kv_segment_ids is not None:
        options.update(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    call = _attention_call(layer, attend, cached, options, sow_weights)
    with matmul_precision(layer.precision):
        result = call(
            layout.fold(q, 2), layout.fold(k, 2), layout.fold(v, 2), mask=_with_mask(keras_mask, mask, q), **options
        )
    out, scores = result if options["return_weights"] else (result, None)
    if sow_scores:
        (functools.partial(layer.sow, "intermediates", "attention_weights") if sow is None else sow)(scores)
    out = layout.unfold(out, q_shape)
    if gate is not None:
        out = out * gate.astype(out.dtype)
    out = project("attention_output", output_shape, out, contract=2)
    scores = layout.unfold_scores(scores, q_shape, kv_shape) if return_attention_scores else None
    return keras_outputs(out, scores, cache)


def _linen_project(layer, name: str, features, x: Array, contract: int = 1) -> Array:
    """A linen `dense` sublayer; ``attention_output`` with ``layer.out_kernel_init`` when given."""
    kernel_init = layer.out_kernel_init if name == "attention_output" else None
    return dense(layer, name, features, x, contract=contract, kernel_init=kernel_init)


def _rotate(layer, q, k, positions, kv_positions, position_offset, query_offset):
    """``q``, ``k`` after `transform_query_key` at the call's positions (unchanged without rope / qk_transform)."""
    if layer.rope is None and layer.qk_transform is None:
        if positions is not None or kv_positions is not None:
            raise ValueError("positions and kv_positions need rope or qk_transform, got rope=None, qk_transform=None")
        return q, k
    if q.ndim != 4:
        raise ValueError(f"rope and qk_transform need rank-3 inputs [B,T,D], got query heads of shape {q.shape}")
    T = q.shape[1]
    first = position_offset if query_offset is None else position_offset + jnp.asarray(query_offset)
    q_positions = token_positions(positions, first, T, "positions")
    k_positions = None
    if k is not None:
        if kv_positions is None and positions is not None and k.shape[1] == T:
            kv_positions = positions
        k_positions = token_positions(kv_positions, position_offset, k.shape[1], "kv_positions")
    return transform_query_key(layer, q, k, q_positions, k_positions)


def _with_mask(keras_mask, mask, q):
    """Keras' mask ANDed with flax's ``mask [B|1, N|1, T, S]`` (rank-3 inputs)."""
    if mask is None:
        return keras_mask
    mask = jnp.asarray(mask)
    if mask.ndim != 4 or mask.dtype != jnp.bool_ or q.ndim != 4:
        raise ValueError(
            f"mask must be bool [B|1, N|1, T, S] for rank-3 inputs, got mask.shape={mask.shape}, "
            f"mask.dtype={mask.dtype} and query heads of shape {q.shape}"
        )
    if keras_mask is not None and keras_mask.ndim == 3:
        keras_mask = keras_mask[:, None]  # [B|1, T|1, S|1] -> [B|1, 1, T|1, S|1]
    return combine_masks(keras_mask, mask)


def _attention_call(layer, attend: Callable, cached: bool, options: dict, sow_weights: bool) -> Callable:
    """``layer.attention_fn`` (``module=layer`` with ``sow_weights``), the broadcast-dropout path, or ``attend``."""
    if layer.attention_fn is not None:
        if cached or options["return_weights"]:
            raise ValueError(
                "attention_fn returns the output only and keeps no cache: got it with a cache, decode mode or "
                "return_attention_scores (sow_weights works: the function sows the weights through module=)"
            )
        return functools.partial(flax_attention, layer, layer.attention_fn, sow_weights=sow_weights)
    if layer.broadcast_dropout and options["dropout_rate"] > 0.0:
        if cached:
            raise ValueError("broadcast_dropout is for calls without a cache, got it with a cache or decode mode")
        return functools.partial(broadcast_dropout_attention, attend)
    return attend
