"""The LLM and Flax options of the attention layers, shared by the linen and NNX layers.

LLM attention (Llama, Mistral, Gemma, Qwen3, OLMo 2): queries and keys are
normalized per head (``normalize_qk``: RMSNorm or LayerNorm over ``H``, with a
learnable ``[H]`` scale, parameters ``query_norm`` / ``key_norm``), rotated by
their positions (``rope``: a `gqa_jax.rope.RotaryEmbedding`), then handed to a
custom ``qk_transform``; ``scale``, ``logits_soft_cap`` and the asymmetric
window ``local_window_size`` go to `gqa_jax.dot_product_attention`.

Flax ``MultiHeadDotProductAttention`` conventions: ``precision`` also reaches
the attention's matrix products (`matmul_precision`), ``broadcast_dropout``
drops the same weights in every batch row and head, ``sow_weights`` sows the
weights into ``"intermediates"`` and ``attention_fn`` replaces the attention
with a function of flax's signature (`flax_attention`), which sows the weights
itself (through its ``module=``) when ``sow_weights`` is on.

Logical partitioning (``logical_axes=True``): each projection's kernel and
bias carry the logical axis names of `PROJECTION_AXES` through
`flax.linen.with_logical_partitioning` (`logically_partitioned`), the names
that `gqa_jax.sharding.logical_axis_rules` maps to mesh axes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_jax.heads import repeat_kv
from gqa_jax.masks import causal_mask, combine_masks, segment_mask, sliding_window_mask
from gqa_jax.modules.checks import check_bool, check_optional_positive_real
from gqa_jax.rope import RotaryEmbedding

Array = jax.Array

NORMALIZE_QK = (None, "rms", "layer")

# Logical axis names of each projection's kernel; its bias has the trailing (not contracted) ones.
PROJECTION_AXES = {
    "query": ("embed", "q_heads", "head_dim"),
    "gate": ("embed", "q_heads", "head_dim"),
    "key": ("embed", "kv_heads", "head_dim"),
    "value": ("embed", "kv_heads", "head_dim"),
    "attention_output": ("q_heads", "head_dim", "embed"),
}


def logically_partitioned(init: Callable, axes) -> Callable:
    """``init`` whose linen parameters carry the logical axis names ``axes`` (None: ``init`` as is).

    ``init`` then makes `flax.linen.LogicallyPartitioned` boxes:
    `flax.linen.get_partition_spec` reads the names, ``apply`` takes the boxed
    or the plain arrays, and `flax.linen.meta.unbox` gives the plain ones.
    Without a mesh and rules nothing else changes.
    """
    return init if axes is None else nn.with_logical_partitioning(init, tuple(axes))


def check_attention_options(layer) -> None:
    """Raises ``ValueError`` / ``TypeError`` naming the field for bad LLM or Flax options of ``layer``."""
    if layer.rope is not None and not isinstance(layer.rope, RotaryEmbedding):
        raise TypeError(f"rope must be None or a gqa_jax.RotaryEmbedding, got rope={layer.rope!r}")
    for name in ("qk_transform", "attention_fn"):
        value = getattr(layer, name)
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be None or callable, got {name}={value!r}")
    check_optional_positive_real("logits_soft_cap", layer.logits_soft_cap)
    check_optional_positive_real("scale", layer.scale)
    check_optional_positive_real("norm_epsilon", layer.norm_epsilon)
    if layer.normalize_qk not in NORMALIZE_QK:
        raise ValueError(f"normalize_qk must be one of {NORMALIZE_QK}, got normalize_qk={layer.normalize_qk!r}")
    window = layer.local_window_size
    if window is not None:
        pair = (window, window) if isinstance(window, int) else tuple(window)
        if len(pair) != 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in pair):
            raise ValueError(f"local_window_size must be None, an int >= 0 or (left, right) ints >= 0, got {window=}")
        if layer.sliding_window is not None:
            raise ValueError(
                f"give sliding_window or local_window_size, not both: got sliding_window={layer.sliding_window}, "
                f"local_window_size={window}"
            )
    for name in ("broadcast_dropout", "sow_weights"):
        check_bool(name, getattr(layer, name))
    if layer.deterministic is not None:
        check_bool("deterministic", layer.deterministic)
    if layer.attention_fn is not None and layer.logits_soft_cap is not None:
        raise ValueError(
            f"attention_fn has no logits_soft_cap argument: got logits_soft_cap={layer.logits_soft_cap} "
            f"and attention_fn={layer.attention_fn!r}"
        )


def linen_normalize(layer: nn.Module, name: str, x: Array) -> Array:
    """``layer.normalize_qk`` over the head dim of ``x [..., H]``: a linen sublayer ``name`` with a ``scale [H]``.

    ``"rms"``: `flax.linen.RMSNorm`; ``"layer"``: `flax.linen.LayerNorm`
    without bias (as flax's ``normalize_qk``); epsilon ``layer.norm_epsilon``.
    Call it from ``layer``'s compact method.
    """
    norm = nn.RMSNorm if layer.normalize_qk == "rms" else functools.partial(nn.LayerNorm, use_bias=False)
    return norm(epsilon=layer.norm_epsilon, dtype=layer.dtype, param_dtype=layer.param_dtype, name=name)(x)


def merge_deterministic(call: bool | None, field: bool | None) -> bool:
    """The call's ``deterministic``, else the layer's field, else True (no dropout)."""
    return call if call is not None else (True if field is None else field)


def token_positions(positions, offset, length: int, name: str) -> Array:
    """``positions`` as int ``[B|1, L]``, or ``offset + arange(length)`` by default.

    Args:
      positions: None, int ``[L]`` or ``[B, L]``.
      offset: int or int ``[B]``: the default's first position per row.
      length: ``L``.
      name: the argument's name, for errors.
    """
    if positions is None:
        return jnp.reshape(jnp.asarray(offset, jnp.int32), (-1, 1)) + jnp.arange(length, dtype=jnp.int32)
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {name}.dtype={positions.dtype}")
    positions = positions[None] if positions.ndim == 1 else positions
    if positions.ndim != 2 or positions.shape[1] != length:
        raise ValueError(f"{name} must have shape [B, {length}] or [{length}], got {name}.shape={positions.shape}")
    return positions


def transform_query_key(layer, q: Array, k: Array | None, q_positions: Array, k_positions: Array | None):
    """Rotates ``q [B, T, N, H]`` and ``k [B, S, K, H]`` (None: cached keys, already rotated), then ``qk_transform``.

    Returns:
      ``(q, k)`` after ``layer.rope`` at the positions ``[B|1, T]`` /
      ``[B|1, S]`` and ``layer.qk_transform(q, k, q_positions, k_positions)``.
    """
    if layer.rope is not None:
        q = layer.rope.apply(q, q_positions)
        k = None if k is None else layer.rope.apply(k, k_positions)
    if layer.qk_transform is not None:
        q, k = layer.qk_transform(q, k, q_positions, k_positions)
    return q, k


def precision_name(precision) -> str | None:
    """A layer's ``precision`` (None, a `jax.lax.Precision`, its name, or a pair) as `jax.default_matmul_precision` names it."""
    if isinstance(precision, (tuple, list)):
        precision = precision[0]
    if precision is None or isinstance(precision, str):
        return precision
    return jax.lax.Precision(precision).name.lower()


def matmul_precision(precision):
    """A context in which the attention's matrix products run at the layer's ``precision`` (none for None)."""
    name = precision_name(precision)
    return contextlib.nullcontext() if name is None else jax.default_matmul_precision(name)


def rule_mask(q_len: int, kv_len: int, *, is_causal, local_window_size, query_offset, q_segment_ids=None,
              kv_segment_ids=None, **_) -> Array | None:
    """The causal, window and segment rules of `gqa_jax.dot_product_attention` as a bool ``[B|1, 1, T, S]`` mask."""
    return combine_masks(
        causal_mask(q_len, kv_len, query_offset) if is_causal else None,
        None if local_window_size is None else sliding_window_mask(q_len, kv_len, local_window_size, query_offset),
        None if q_segment_ids is None else segment_mask(q_segment_ids, kv_segment_ids),
    )


def flax_attention(layer, attention_fn: Callable, q, k, v, *, mask, sow_weights: bool, **options) -> Array:
    """Calls a flax-signature ``attention_fn`` on BTNH inputs, as `flax.linen.MultiHeadDotProductAttention` does.

    ``attention_fn(query [B, T, N, H], key [B, S, N, H], value [B, S, N, Hv],
    mask=bool [B|1, N|1, T, S], dropout_rng=, dropout_rate=,
    broadcast_dropout=, deterministic=, dtype=, precision=)``, plus
    ``module=layer`` when ``sow_weights``: the function sows the weights into
    ``layer`` itself (flax's ``dot_product_attention`` calls
    ``module.sow("intermediates", "attention_weights", weights)``; the NNX
    one ``module.sow(nnx.Intermediate, ...)``), as flax's layers let it. The
    key/value heads are repeated to ``N`` (flax's functions take equal head
    counts), the rules (causal, window, segments) become part of ``mask``,
    and a ``scale`` other than ``1/sqrt(H)`` is folded into the query. As in
    flax, a function gets only the keywords it names (all of them when it
    takes ``**kwargs``); one without ``mask`` raises ``ValueError`` when the
    call has a mask or rules, rather than attending without them.

    Returns:
      ``[B, T, N, Hv]``.
    """
    B, T, N, H = q.shape
    K, S = k.shape[2], k.shape[1]
    rules = rule_mask(T, S, **options)
    full_mask = combine_masks(mask[:, None] if mask is not None and mask.ndim == 3 else mask, rules)
    if options.get("scale") is not None:
        q = q * jnp.asarray(options["scale"] * math.sqrt(H), q.dtype)
    rate = options["dropout_rate"]
    kwargs = dict(
        mask=full_mask,
        dropout_rng=options["dropout_rng"],
        dropout_rate=rate,
        broadcast_dropout=layer.broadcast_dropout,
        deterministic=rate == 0.0,
        dtype=layer.dtype,
        precision=layer.precision,
    )
    parameters = inspect.signature(attention_fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        if full_mask is not None and "mask" not in parameters:
            raise ValueError("attention_fn takes no mask= argument, but this call has a mask or causal/window/segment "
                             f"rules; got attention_fn with parameters {list(parameters)}")
        kwargs = {name: value for name, value in kwargs.items() if name in parameters}
    if sow_weights:
        kwargs["module"] = layer
    return attention_fn(q, repeat_kv(k, N // K), repeat_kv(v, N // K), **kwargs)


def broadcast_dropout_attention(attend: Callable, q, k, v, *, dropout_rate, dropout_rng, return_weights, **options):
    """Attention with dropout masks shared by all batch rows and heads (flax's ``broadcast_dropout=True``).

    The weights ``[B, N, T, S]`` come from ``attend`` (no dropout); one keep
    mask ``[1, 1, T, S]`` with probability ``1 - dropout_rate`` scales them by
    ``1 / (1 - dropout_rate)``, and they weigh ``v [B, S, K, Hv]``.

    Returns:
      ``out [B, T, N, Hv]``, with the weights (before dropout) when
      ``return_weights``.
    """
    _, weights = attend(q, k, v, dropout_rate=0.0, dropout_rng=None, return_weights=True, **options)
    B, N, T, S = weights.shape
    K = v.shape[2]
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (1, 1, T, S))
    dropped = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", dropped.reshape(B, K, N // K, T, S), v).reshape(B, T, N, v.shape[-1])
    return (out, weights) if return_weights else out
