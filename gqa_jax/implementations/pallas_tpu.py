"""The ``"pallas_tpu"`` implementation: our Mosaic TPU kernels (`pallas_kernels.tpu`).

Decode-shaped requests without query lengths go to the decode kernel, the rest
to flash attention; a dense boolean mask becomes an additive ``-inf`` bias. The
decode kernel reads a quantized cache as it is in decode-shaped calls (on one
device, query lengths included: padded queries are computed, then zeroed);
flash attention takes it dequantized to the query dtype by XLA first
(`_common.dequantized`). The kernels run compiled on TPUs; tests set
`interpret` to run this adapter on CPUs.
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
from pallas_kernels import tpu

# Tests set this to run the kernels in Pallas TPU interpret mode on a CPU.
interpret: bool = False


def supports(request: AttentionRequest) -> str | None:
    if request.has_sinks:
        return "does not support sinks yet"
    return decode_kernel_refusal(request)


def tpu_attention(request: AttentionRequest):
    if not is_decode_shaped(request):
        request = dequantized(request)
    return per_device(request, _local)


def _local(request: AttentionRequest):
    q, k, v, rules = request.query, request.key, request.value, request.rules
    if request.is_quantized:  # decode-shaped; query lengths are served by zeroing padded queries
        out = tpu.decode_attention_core(q, k, v, dataclasses.replace(rules, q_len=None), key_scale=request.key_scale,
                                        value_scale=request.value_scale, interpret=interpret)
        return zero_invalid_rows(request, out) if rules.q_len is not None else out
    if is_decode_shaped(request) and not request.has_query_lengths:
        return tpu.decode_attention_core(q, k, v, rules, interpret=interpret)
    return tpu.flash_attention_core(q, k, v, rules, bias=mask_as_bias(request), interpret=interpret)


IMPLEMENTATION = Implementation(name="pallas_tpu", platforms=("tpu",), priority=20, supports=supports,
                                call=tpu_attention)
