"""The ``"pallas_triton"`` implementation: our Pallas kernels for NVIDIA GPUs (Triton lowering).

Decode-shaped requests (a few queries against a longer cache, no dense masks
or segments) go to the split-K decode kernel, the rest to flash attention; a
dense boolean mask becomes an additive ``-inf`` bias. The rules (sink tokens
included) and the sink logits reach the kernel cores unchanged. The decode
kernel reads a quantized cache as it is (on one device); flash attention takes
it dequantized to the query dtype by XLA first (`_common.dequantized`).
"""

from __future__ import annotations

import dataclasses

from gqa_jax.implementations._common import (
    Implementation,
    decode_kernel_refusal,
    dequantized,
    is_decode_shaped,
    mask_as_bias,
    per_device,
    zero_invalid_rows,
)
from gqa_jax.request import AttentionRequest
from pallas_kernels import gpu

# Tests set this to run the kernels in Pallas interpret mode on a CPU.
interpret: bool = False


def supports(request: AttentionRequest) -> str | None:
    return decode_kernel_refusal(request)


def triton_attention(request: AttentionRequest):
    if not is_decode_shaped(request):
        request = dequantized(request)
    return per_device(request, _local)


def _local(request: AttentionRequest):
    q, k, v, rules = request.query, request.key, request.value, request.rules
    if is_decode_shaped(request):
        # Padded queries are computed and then zeroed; their offsets already count them.
        out = gpu.decode_attention_core(q, k, v, dataclasses.replace(rules, q_len=None), key_scale=request.key_scale,
                                        value_scale=request.value_scale, sinks=request.sinks, interpret=interpret)
        return zero_invalid_rows(request, out) if rules.q_len is not None else out
    return gpu.flash_attention_core(q, k, v, rules, bias=mask_as_bias(request), sinks=request.sinks,
                                    interpret=interpret)


IMPLEMENTATION = Implementation(name="pallas_triton", platforms=("gpu",), priority=20, supports=supports,
                                call=triton_attention)
