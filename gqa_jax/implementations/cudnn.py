"""The ``"cudnn"`` implementation: ``jax.nn.dot_product_attention(implementation="cudnn")``.

cuDNN's causal mask is top-left, so bottom-right causal requests are served
only where the two coincide: ``T == S`` with the default offset, or a single
query (``T == 1``) at the default offset, where causal adds nothing to the key
lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_jax.implementations._common import Implementation, zero_invalid_rows
from gqa_jax.request import AttentionRequest

# Head dims cuDNN's fused attention takes (multiples of 8 up to 256).
MAX_HEAD_DIM = 256


def _single_query(request: AttentionRequest) -> bool:
    """One query at the default (bottom-right) offset, no window: causal adds nothing to the key lengths."""
    rules = request.rules
    return rules.offset_is_default and request.q_len == 1 and rules.window is None and request.q_len != request.kv_len


def supports(request: AttentionRequest) -> str | None:
    if request.is_quantized:
        return f"does not serve a quantized cache (key.dtype={request.key.dtype})"
    if request.has_dropout:
        return "does not support dropout"
    if request.return_weights:
        return "does not support return_weights"
    if request.has_segments:
        return "does not support segment ids"
    if request.has_soft_cap:
        return "does not support logits_soft_cap"
    if request.has_sinks:
        return "does not support sinks"
    if request.has_sink_tokens:
        return "does not support num_sink_tokens"
    if request.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16, got {request.dtype}"
    if request.head_dim != request.value_head_dim:
        return f"needs equal head dims, got H={request.head_dim}, Hv={request.value_head_dim}"
    if request.head_dim % 8 or request.head_dim > MAX_HEAD_DIM:
        return f"needs a head dim that is a multiple of 8 up to {MAX_HEAD_DIM}, got H={request.head_dim}"
    if request.rules.positional:
        top_left = request.rules.offset_is_default and request.q_len == request.kv_len
        if not (top_left or _single_query(request)):
            return "masks are top-left; this request needs other query offsets"
    return None


def cudnn_attention(request: AttentionRequest):
    rules = request.rules
    out = jax.nn.dot_product_attention(
        request.query,
        request.key,
        request.value,
        bias=request.bias,
        mask=request.mask,
        scale=rules.scale,
        is_causal=rules.is_causal and not _single_query(request),
        query_seq_lengths=rules.q_len,
        key_value_seq_lengths=rules.kv_len,
        local_window_size=rules.window,
        implementation="cudnn",
    )
    return zero_invalid_rows(request, out)


IMPLEMENTATION = Implementation(name="cudnn", platforms=("gpu",), priority=10, supports=supports,
                                call=cudnn_attention)
