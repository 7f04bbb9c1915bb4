"""The ``"pallas_triton"`` implementation: our Pallas kernels for NVIDIA GPUs.

Importing this module registers it (priority above cuDNN and XLA on GPUs).
"""

from __future__ import annotations

import jax.numpy as jnp

from gqa_jax.adapters import flash_kwargs, mask_as_bias, refuse, rule_kwargs, zero_invalid_rows
from gqa_jax.dispatch import register_implementation
from gqa_jax.request import AttentionRequest

# Tests set this to run the adapter's kernels in Pallas interpret mode on a CPU.
interpret: bool = False


# Decode kernel: a few new queries against a longer (cached) key sequence.
MAX_DECODE_QUERIES = 16


def is_decode_shaped(request: AttentionRequest) -> bool:
    """A few queries (T <= 16) against more keys, without the features only flash serves."""
    return (
        request.q_len <= MAX_DECODE_QUERIES
        and request.q_len < request.kv_len
        and not request.unsupported("bias", "mask", "segment_ids")
    )


def _decode(request: AttentionRequest):
    from pallas_kernels.gpu import decode_attention

    B, S = request.batch_size, request.kv_len
    lengths = request.key_value_seq_lengths
    out = decode_attention(
        request.query,
        request.key,
        request.value,
        jnp.full((B,), S, jnp.int32) if lengths is None else lengths,
        interpret=interpret,
        **rule_kwargs(request),
    )
    return zero_invalid_rows(request, out) if request.query_seq_lengths is not None else out


def _flash(request: AttentionRequest):
    from pallas_kernels.gpu import flash_attention

    return flash_attention(
        request.query, request.key, request.value, interpret=interpret, **flash_kwargs(request, mask_as_bias(request))
    )


def triton_attention(request: AttentionRequest):
    """Serves a request with the Triton kernels: decode-shaped ones with the
    split-K decode kernel, the rest with flash attention.

    Refuses dropout and returned weights (the XLA path serves those) and
    dtypes other than bf16/fp16/fp32; a dense boolean mask becomes an additive
    ``-inf`` bias.
    """
    refuse(request, "dropout", "return_weights")
    if request.query.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise NotImplementedError(f"needs bf16, fp16 or fp32, got {request.query.dtype}")
    return _decode(request) if is_decode_shaped(request) else _flash(request)


register_implementation("pallas_triton", triton_attention, platforms=("gpu",), priority=20)
