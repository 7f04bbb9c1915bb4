"""The ``"pallas_tpu"`` implementation: our Mosaic TPU kernels (`pallas_kernels.tpu`).

Importing this module registers it for TPUs, above XLA, so that
``implementation=None`` on a TPU picks it. Decode-shaped requests (a few
queries against keys with per-row lengths, nothing but positional rules) go to
the decode kernel, the rest to flash attention. The kernels always run compiled
here; tests substitute interpret-mode kernels to run this adapter on CPUs.
"""

from __future__ import annotations

import jax.numpy as jnp

from gqa_jax.adapters import flash_kwargs, mask_as_bias, refuse, rule_kwargs
from gqa_jax.dispatch import register_implementation
from gqa_jax.request import AttentionRequest

# Longest query chunk served by the decode kernel; longer ones go to flash attention.
MAX_DECODE_QUERIES = 16


def is_decode_request(request: AttentionRequest) -> bool:
    """A few queries against keys with per-row lengths and no dense or per-query rules."""
    return (
        request.q_len <= MAX_DECODE_QUERIES
        and request.key_value_seq_lengths is not None
        and not request.unsupported("bias", "mask", "segment_ids", "query_seq_lengths")
    )


def tpu_attention(request: AttentionRequest):
    """Serves a request with the TPU decode or flash-attention kernel.

    Refuses dropout and returned weights (the XLA path serves those); a dense
    boolean mask becomes an additive ``-inf`` bias.
    """
    from pallas_kernels import tpu

    refuse(request, "dropout", "return_weights")
    if request.query.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise NotImplementedError(f"needs bf16, fp16 or fp32, got {request.query.dtype}")
    if is_decode_request(request):
        return tpu.decode_attention(
            request.query, request.key, request.value, request.key_value_seq_lengths, **rule_kwargs(request)
        )
    return tpu.flash_attention(request.query, request.key, request.value, **flash_kwargs(request, mask_as_bias(request)))


register_implementation("pallas_tpu", tpu_attention, platforms=("tpu",), priority=20)
