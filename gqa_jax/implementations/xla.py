"""The ``"xla"`` implementation: grouped einsums, float32 softmax, every feature.

It is the reference path of the library: it serves every request (masks,
bias, dropout, returned weights, a quantized cache), never repeats K/V to N
heads (queries are grouped to ``[B, T, K, G, H]`` instead), and is the
fallback of every other implementation. Sink logits join each row's softmax
denominator as one more entry with no value. A quantized cache is dequantized in
the products: int8 / float8_e4m3fn keys are cast (exactly) to the query dtype
and the logits scaled per key; the weights are scaled per key and multiply the
values in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_jax.implementations._common import Implementation
from gqa_jax.request import AttentionRequest

Array = jax.Array


def request_mask(request: AttentionRequest) -> Array | None:
    """All of a request's masks combined: bool ``[B|1, N|1, T, S]`` or None."""
    rules_mask = request.rules.mask(request.q_len, request.kv_len)
    if request.mask is None:
        return rules_mask
    return request.mask if rules_mask is None else request.mask & rules_mask


def _grouped(x: Array | None, num_kv_heads: int) -> Array | None:
    """``[B|1, N|1, T|1, S|1] -> [B|1, K|1, G|1, T|1, S|1]``."""
    if x is None:
        return None
    b, n, t, s = x.shape
    if n == 1:
        return x[:, :, None]
    return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def masked_softmax(logits: Array, mask: Array | None, sinks: Array | None = None) -> Array:
    """Float32 softmax over the last axis that gives zeros on fully masked rows.

    Entries where ``mask`` is False, and logits of ``-inf`` (from a bias), get
    zero weight; a row with no visible entry is all zeros, in values and in
    gradients (never NaN). ``sinks`` (broadcastable to ``logits`` with a last
    axis of 1) are logits of one more entry whose weight is not returned.
    """
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        row_max = jnp.maximum(row_max, sinks)
    row_max = jax.lax.stop_gradient(row_max)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalized = jnp.exp(logits - row_max)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    if sinks is not None:
        total = total + jnp.exp(sinks - row_max)
    return unnormalized / jnp.where(total == 0.0, 1.0, total)


def _per_key(scale_BSK: Array) -> Array:
    """``[B, S, K] -> [B, K, 1, 1, S]``, broadcasting against ``[B, K, G, T, S]``."""
    return scale_BSK.transpose(0, 2, 1)[:, :, None, None, :]


def attention_weights(request: AttentionRequest) -> Array:
    """Softmax weights ``[B, K, G, T, S]`` in float32 (before dropout)."""
    B, T, N, H = request.query.shape
    K = request.num_kv_heads
    rules = request.rules
    q_BTKGH = request.query.reshape(B, T, K, N // K, H)
    key = request.key.astype(request.dtype) if request.is_quantized else request.key
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, key, preferred_element_type=jnp.float32)
    if request.is_quantized:
        logits = logits * _per_key(request.key_scale)
    logits = logits * rules.scale
    if rules.soft_cap is not None:
        logits = rules.soft_cap * jnp.tanh(logits / rules.soft_cap)
    if request.bias is not None:
        logits = logits + _grouped(request.bias, K).astype(jnp.float32)
    sinks = None if request.sinks is None else request.sinks.reshape(1, K, N // K, 1, 1)
    return masked_softmax(logits, _grouped(request_mask(request), K), sinks)


def xla_attention(request: AttentionRequest):
    """Serves any request; returns ``[B, T, N, Hv]`` (and ``[B, N, T, S]`` weights if asked)."""
    B, T, N, _ = request.query.shape
    dtype = request.query.dtype
    weights = attention_weights(request)
    probs = weights
    if request.dropout_rate > 0.0:
        keep = jax.random.bernoulli(request.dropout_rng, 1.0 - request.dropout_rate, weights.shape)
        probs = jnp.where(keep, weights / (1.0 - request.dropout_rate), 0.0)
    if request.is_quantized:
        probs, value = probs * _per_key(request.value_scale), request.value.astype(jnp.float32)
    else:
        probs, value = probs.astype(request.value.dtype), request.value
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value, preferred_element_type=jnp.float32)
    out = out.reshape(B, T, N, request.value_head_dim).astype(dtype)
    if request.return_weights:
        return out, weights.reshape(B, N, T, request.kv_len).astype(dtype)
    return out


IMPLEMENTATION = Implementation(
    name="xla", platforms=("cpu", "gpu", "tpu"), priority=0, supports=lambda request: None, call=xla_attention
)
