"""The ``"pallas_tpu"`` implementation: our Mosaic TPU kernels (`pallas_kernels.tpu`).

Decode-shaped requests without query lengths go to the decode kernel, the rest
to flash attention; a dense boolean mask becomes an additive ``-inf`` bias.
The kernels run compiled on TPUs; tests set `interpret` to run this adapter on
CPUs.
"""

from __future__ import annotations

from gqa_jax.implementations._common import (
    Implementation,
    is_decode_shaped,
    kernel_refusal,
    mask_as_bias,
    per_device,
)
from gqa_jax.request import AttentionRequest
from pallas_kernels import tpu

# Tests set this to run the kernels in Pallas TPU interpret mode on a CPU.
interpret: bool = False


def supports(request: AttentionRequest) -> str | None:
    if request.is_quantized:
        return f"does not serve a quantized cache (key.dtype={request.key.dtype}) yet"
    if request.has_sinks:
        return "does not support sinks yet"
    return kernel_refusal(request)


def tpu_attention(request: AttentionRequest):
    return per_device(request, _local)


def _local(request: AttentionRequest):
    q, k, v, rules = request.query, request.key, request.value, request.rules
    if is_decode_shaped(request) and not request.has_query_lengths:
        return tpu.decode_attention_core(q, k, v, rules, interpret=interpret)
    return tpu.flash_attention_core(q, k, v, rules, bias=mask_as_bias(request), interpret=interpret)


IMPLEMENTATION = Implementation(name="pallas_tpu", platforms=("tpu",), priority=20, supports=supports,
                                call=tpu_attention)
