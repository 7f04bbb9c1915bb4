"""Validation of an attention call, done once before dispatch.

`make_request` checks every argument of `gqa_jax.dot_product_attention` and
returns an `AttentionRequest`: the tensors (masks and biases brought to rank
4), the call's `pallas_kernels.rules.Rules` (built by `Rules.create`, the same
validator every kernel wrapper uses), and the XLA-only options (dropout,
returned weights). Implementations read the request, never the raw
arguments, and hand ``request.rules`` to kernels unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.placement import Placement, placement_of
from pallas_kernels.arguments import check_bias
from pallas_kernels.quantized import check_tensors
from pallas_kernels.rules import Rules, concrete_value
from pallas_kernels.sinks import check_sinks

Array = jax.Array

__all__ = ["AttentionRequest", "concrete_value", "make_request"]


@dataclasses.dataclass(frozen=True)
class AttentionRequest:
    """One validated attention call.

    Attributes:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      rules: scale, causal, offsets, lengths, segments, window (with its sink
        tokens) and soft-cap.
      bias: additive float bias ``[B|1, N|1, T|1, S|1]`` or None.
      mask: boolean mask ``[B|1, N|1, T|1, S|1]`` (True = attend) or None.
      dropout_rate: probability of dropping an attention weight.
      dropout_rng: PRNG key, or None when ``dropout_rate == 0``.
      return_weights: also return the ``[B, N, T, S]`` attention weights.
      placement: the mesh axes splitting batch and heads, or None on one device.
      key_scale: float32 ``[B, S, K]`` per-key scales of a quantized ``key``
        (int8 or float8_e4m3fn), or None for a float key.
      value_scale: float32 ``[B, S, K]`` scales of a quantized ``value``, or None.
      sinks: float32 ``[N]`` sink logits (`pallas_kernels.sinks`), or None.
    """

    query: Array
    key: Array
    value: Array
    rules: Rules
    bias: Array | None = None
    mask: Array | None = None
    dropout_rate: float = 0.0
    dropout_rng: Array | None = None
    return_weights: bool = False
    placement: Placement | None = None
    key_scale: Array | None = None
    value_scale: Array | None = None
    sinks: Array | None = None

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def q_len(self) -> int:
        return self.query.shape[1]

    @property
    def kv_len(self) -> int:
        return self.key.shape[1]

    @property
    def num_heads(self) -> int:
        return self.query.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[2]

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def value_head_dim(self) -> int:
        return self.value.shape[3]

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.query.dtype)

    # Features an implementation may not serve, as named properties.

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def has_dense_masks(self) -> bool:
        """A dense bias or boolean mask (kernels take them as a bias)."""
        return self.bias is not None or self.mask is not None

    @property
    def has_dropout(self) -> bool:
        return self.dropout_rate > 0.0

    @property
    def has_segments(self) -> bool:
        return self.rules.has_segments

    @property
    def has_query_lengths(self) -> bool:
        return self.rules.q_len is not None

    @property
    def has_kv_lengths(self) -> bool:
        return self.rules.kv_len is not None

    @property
    def has_soft_cap(self) -> bool:
        return self.rules.soft_cap is not None

    @property
    def has_window(self) -> bool:
        return self.rules.window is not None

    @property
    def is_quantized(self) -> bool:
        """A quantized key/value cache (int8 or float8_e4m3fn values with per-key scales)."""
        return self.key_scale is not None

    @property
    def has_sinks(self) -> bool:
        """Learned sink logits in the softmax denominator."""
        return self.sinks is not None

    @property
    def has_sink_tokens(self) -> bool:
        """Keys kept visible outside the sliding window (``num_sink_tokens > 0``)."""
        return self.rules.sink_tokens > 0


def _check_rate(dropout_rate, dropout_rng) -> float:
    if isinstance(dropout_rate, (bool, np.bool_)) or not isinstance(dropout_rate, (int, float, np.floating)):
        raise TypeError(f"dropout_rate must be a float in [0, 1), got {dropout_rate=}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng, got dropout_rng=None")
    return float(dropout_rate)


def make_request(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_offset=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    local_window_size=None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Any = None,
    return_weights: bool = False,
    q_sharding=None,
    kv_sharding=None,
    key_scale=None,
    value_scale=None,
    sinks=None,
    num_sink_tokens: int = 0,
) -> AttentionRequest:
    """Validates the arguments of `gqa_jax.dot_product_attention` (see it for their meaning).

    Returns:
      The `AttentionRequest`.

    Raises:
      ValueError: for wrong shapes, head counts, lengths, windows or rates.
      TypeError: for wrong types or dtypes.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    key_scale, value_scale = check_tensors(query, key, value, key_scale, value_scale)
    rules = Rules.create(
        query, key, scale=scale, is_causal=is_causal, query_offset=query_offset,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap, num_sink_tokens=num_sink_tokens,
    )
    B, T, N, _ = query.shape
    S = key.shape[1]
    if bias is not None:
        bias = check_bias("bias", bias, B, N, T, S)
    if mask is not None:
        mask = check_bias("mask", mask, B, N, T, S, boolean=True)
    dropout_rate = _check_rate(dropout_rate, dropout_rng)
    return AttentionRequest(
        query=query,
        key=key,
        value=value,
        rules=rules,
        bias=bias,
        mask=mask,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng if dropout_rate > 0.0 else None,
        return_weights=bool(return_weights),
        placement=placement_of(query, key, q_sharding, kv_sharding),
        key_scale=key_scale,
        value_scale=value_scale,
        sinks=check_sinks(sinks, N),
    )
