"""What the Keras attention layers share: masks, positions, settings, outputs.

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

import jax
import jax.numpy as jnp

from gqa_jax.masks import combine_masks
from gqa_jax.modules.checks import check_optional_positive_int, check_rate
from gqa_jax.modules.implementation import check_choice, dispatch_kwargs

Array = jax.Array


def check_keras_fields(layer) -> None:
    """Checks the fields every Keras-like layer has: ``dropout``, ``sliding_window``, ``flash_attention``."""
    check_rate("dropout", layer.dropout)
    check_optional_positive_int("sliding_window", layer.sliding_window)
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
    layer, *, use_causal_mask: bool, query_offset, deterministic: bool, return_attention_scores: bool
) -> dict:
    """Keywords of `gqa_jax.dot_product_attention` for a Keras-like layer's settings and call flags.

    Args:
      layer: a module with ``dropout``, ``sliding_window``, ``flash_attention``
        and ``implementation`` fields (and a ``"dropout"`` rng when training).
      use_causal_mask: the causal rule.
      query_offset: position of the first query (see `keras_position_rules`).
      deterministic: no dropout.
      return_attention_scores: also return the weights ``[B, N, T, S]``.

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
        ),
    }


def keras_outputs(output, scores, cache):
    """``output``, then ``scores`` and ``cache`` where not None: a bare output when alone, else a tuple."""
    outputs = tuple(x for x in (output, scores, cache) if x is not None)
    return outputs[0] if len(outputs) == 1 else outputs
