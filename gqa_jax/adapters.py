"""Adapters that hand an `AttentionRequest` to one implementation.

Each adapter checks what its implementation can serve and raises
``NotImplementedError`` with the reason otherwise, so that dispatch can fall
back. Importing this module registers the built-in implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_jax.dispatch import register_implementation
from gqa_jax.request import AttentionRequest
from gqa_jax.xla import xla_attention


def refuse(request: AttentionRequest, *features: str) -> None:
    """Raises ``NotImplementedError`` if the request uses any of ``features``."""
    used = request.unsupported(*features)
    if used:
        raise NotImplementedError(f"does not support {', '.join(used)}")


def rule_kwargs(request: AttentionRequest) -> dict:
    """The keywords every kernel takes: scale and the positional rules."""
    return dict(
        scale=request.scale,
        is_causal=request.is_causal,
        query_offset=request.query_offset,
        local_window_size=request.local_window_size,
        logits_soft_cap=request.logits_soft_cap,
    )


def flash_kwargs(request: AttentionRequest, bias=None) -> dict:
    """The keywords of the flash kernels (GPU and TPU): the rules, lengths, segments and ``bias``."""
    return dict(
        rule_kwargs(request),
        bias=bias,
        query_seq_lengths=request.query_seq_lengths,
        key_value_seq_lengths=request.key_value_seq_lengths,
        q_segment_ids=request.q_segment_ids,
        kv_segment_ids=request.kv_segment_ids,
    )


def mask_as_bias(request: AttentionRequest):
    """The request's bias with its boolean mask folded in (``-inf`` where masked), or the bias alone."""
    if request.mask is None:
        return request.bias
    bias = jnp.where(request.mask, 0.0, -jnp.inf).astype(jnp.float32)
    return bias if request.bias is None else bias + request.bias.astype(jnp.float32)


def zero_invalid_rows(request: AttentionRequest, out: jax.Array) -> jax.Array:
    """Zeros the output of padded queries and of rows with no valid key."""
    B, T = request.batch_size, request.q_len
    valid = jnp.ones((B, T), bool)
    if request.query_seq_lengths is not None:
        valid &= jnp.arange(T)[None, :] < request.query_seq_lengths[:, None]
    if request.key_value_seq_lengths is not None:
        valid &= (request.key_value_seq_lengths > 0)[:, None]
    return jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))


def cudnn_attention(request: AttentionRequest):
    """``jax.nn.dot_product_attention(implementation="cudnn")`` on eligible requests.

    cuDNN's causal mask is top-left, so bottom-right causal requests are served
    only where the two coincide: ``T == S`` with the default offset, or a single
    query (``T == 1``) at the default offset, where causal adds nothing to the
    key lengths.
    """
    refuse(request, "dropout", "return_weights", "segment_ids", "logits_soft_cap")
    if request.query.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"needs bfloat16 or float16, got {request.query.dtype}")
    if request.head_dim != request.value_head_dim:
        raise NotImplementedError(f"needs equal head dims, got H={request.head_dim}, Hv={request.value_head_dim}")
    is_causal = request.is_causal
    if request.positional:
        top_left = request.query_offset_is_default and request.q_len == request.kv_len
        single_query = request.query_offset_is_default and request.q_len == 1
        if not (top_left or (single_query and request.local_window_size is None)):
            raise NotImplementedError("masks are top-left; this request needs other query offsets")
        if single_query and not top_left:
            is_causal = False
    try:
        out = jax.nn.dot_product_attention(
            request.query,
            request.key,
            request.value,
            bias=request.bias,
            mask=request.mask,
            scale=request.scale,
            is_causal=is_causal,
            query_seq_lengths=request.query_seq_lengths,
            key_value_seq_lengths=request.key_value_seq_lengths,
            local_window_size=request.local_window_size,
            implementation="cudnn",
        )
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        raise NotImplementedError(f"refused the call: {e}") from e
    return zero_invalid_rows(request, out)


register_implementation("xla", xla_attention, platforms=("cpu", "gpu", "tpu"), priority=0)
register_implementation("cudnn", cudnn_attention, platforms=("gpu",), priority=10)

from gqa_jax import adapters_gpu as _adapters_gpu  # noqa: E402,F401  (registers "pallas_triton")
from gqa_jax import adapters_tpu as _adapters_tpu  # noqa: E402,F401  (registers "pallas_tpu")
