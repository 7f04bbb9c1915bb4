"""The ``"pallas_mosaic_gpu"`` implementation: our Hopper flash attention (Pallas Mosaic GPU).

First on GPUs of compute capability 9.x for the prefill-shaped calls its
kernel serves (`pallas_kernels.gpu.flash_attention_mgpu.unsupported_reason`
says what it does not: a bias or dense mask, float32, head dims other than
64/128/256); decode-shaped calls and everything else fall back to
``"pallas_triton"`` per request. A quantized cache is taken dequantized to the
query dtype by XLA first (`_common.dequantized`). The forward runs on Mosaic
GPU; the backward on the Mosaic-GPU backward kernels from its residuals (head
dims 64 and 128), on the Triton backward kernels otherwise
(`pallas_kernels.gpu.flash_attention_mgpu.choose_backward`).

Measured rule (H200, bf16, `python -m gqa_jax.bench --only prefill`,
BENCHMARKS.md): every call it serves runs the Mosaic forward, causal head dim
64 too since the forward's named-barrier rework (310 against the Triton
forward's 295 TFLOP/s at B4 S2048 N16 K2; before it, Triton's forward was
faster there and served those calls undifferentiated).
"""

from __future__ import annotations

import jax

from gqa_jax.implementations._common import (
    Implementation,
    dequantized,
    is_decode_shaped,
    kernel_refusal,
    per_device,
)
from gqa_jax.request import AttentionRequest
from pallas_kernels.gpu import flash_attention_mgpu


def supports(request: AttentionRequest) -> str | None:
    reason = kernel_refusal(request)
    if reason is not None:
        return reason
    if request.has_dense_masks:
        return "a bias or dense mask is not supported"
    if request.has_sinks:
        return "sinks are not supported (the Triton kernels serve them)"
    if request.has_sink_tokens:
        # The kernels are correct under sink tokens (they visit Rules.kv_range's hull, the gap included; tested on
        # an H200); the Triton kernels skip the tiles between the sink tokens and the window.
        return "num_sink_tokens goes to the Triton kernels (they skip the tiles between the sink tokens and the window)"
    if is_decode_shaped(request):
        return "decode-shaped calls go to the Triton decode kernel"
    key, value = request.key, request.value
    if request.is_quantized:  # the kernel takes it `dequantized`
        key, value = (jax.ShapeDtypeStruct(x.shape, request.query.dtype) for x in (key, value))
    return flash_attention_mgpu.unsupported_reason(request.query, key, value, request.rules, None)


def mosaic_attention(request: AttentionRequest):
    return per_device(dequantized(request),
                      lambda r: flash_attention_mgpu.flash_attention_core(r.query, r.key, r.value, r.rules))


IMPLEMENTATION = Implementation(name="pallas_mosaic_gpu", platforms=("gpu",), priority=30, supports=supports,
                                call=mosaic_attention)
