"""The adapter protocol and what the built-in adapters share.

An implementation is a name, the platforms it runs on, a priority, a
``supports(request) -> None | reason`` check and a ``__call__(request)``.
Dispatch asks ``supports`` first and calls only an implementation that said
None; the call itself is never wrapped in a ``try``, so an error raised by a
chosen kernel reaches the user.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gqa_jax.quantization import dequantize
from gqa_jax.request import AttentionRequest
from pallas_kernels.arguments import KERNEL_DTYPES

# Longest query chunk the decode kernels serve; longer ones go to flash attention.
MAX_DECODE_QUERIES = 16


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered implementation.

    Attributes:
      name: the string users pass as ``implementation=``.
      platforms: JAX platforms it runs on (``"cpu"``, ``"gpu"``, ``"tpu"``).
      priority: order among the implementations of a platform, highest first.
      supports: ``supports(request)`` returns None when the implementation can
        serve the request, else the reason it cannot (a short phrase).
      call: ``call(request)`` returns ``[B, T, N, Hv]`` (and the weights when
        ``request.return_weights``).
    """

    name: str
    platforms: tuple[str, ...]
    priority: int
    supports: Callable[[AttentionRequest], str | None]
    call: Callable[[AttentionRequest], Any]

    def __call__(self, request: AttentionRequest):
        return self.call(request)


def kernel_refusal(request: AttentionRequest) -> str | None:
    """Why the Pallas kernels cannot serve a request (XLA-only options, dtypes, placement), or None."""
    if request.placement is not None and request.placement.refusal is not None:
        return request.placement.refusal
    if request.has_dropout:
        return "does not support dropout"
    if request.return_weights:
        return "does not support return_weights"
    if request.dtype not in KERNEL_DTYPES:
        return f"needs bfloat16, float16 or float32, got {request.dtype}"
    return None


def decode_kernel_refusal(request: AttentionRequest) -> str | None:
    """`kernel_refusal` for an implementation whose decode kernel reads a quantized cache as it is (one device only);
    its flash kernel takes the cache `dequantized`."""
    if request.is_quantized and is_decode_shaped(request) and request.placement is not None:
        return "serves decode on a quantized cache on one device only"
    return kernel_refusal(request)


def dequantized(request: AttentionRequest) -> AttentionRequest:
    """The request with a quantized cache's keys and values dequantized to the query dtype; others as they are.

    For the flash kernels (prefill-shaped calls), which take keys and values in
    the query dtype: they attend over ``dequantize(key, key_scale,
    query.dtype)``, the exact products XLA's path uses rounded once to the
    query dtype (bf16: a relative 2^-9 per value). One XLA fusion before the
    kernel reads the int8 or float8 cache and writes it in the query dtype;
    the decode kernels read the quantized cache itself.
    """
    if not request.is_quantized:
        return request
    dtype = request.query.dtype
    return dataclasses.replace(
        request, key=dequantize(request.key, request.key_scale, dtype),
        value=dequantize(request.value, request.value_scale, dtype), key_scale=None, value_scale=None)


def is_decode_shaped(request: AttentionRequest) -> bool:
    """A few queries (``T <= 16``) against more keys, with no dense mask, bias or segment ids."""
    return (
        request.q_len <= MAX_DECODE_QUERIES
        and request.q_len < request.kv_len
        and not request.has_dense_masks
        and not request.has_segments
    )


def mask_as_bias(request: AttentionRequest):
    """The request's bias with its boolean mask folded in (``-inf`` where masked), or the bias alone."""
    if request.mask is None:
        return request.bias
    bias = jnp.where(request.mask, 0.0, -jnp.inf).astype(jnp.float32)
    return bias if request.bias is None else bias + request.bias.astype(jnp.float32)


def zero_invalid_rows(request: AttentionRequest, out: jax.Array) -> jax.Array:
    """Zeros the output of padded queries and of rows with no valid key."""
    rules = request.rules
    B, T = request.batch_size, request.q_len
    valid = jnp.ones((B, T), bool)
    if rules.q_len is not None:
        valid &= jnp.arange(T)[None, :] < rules.q_len[:, None]
    if rules.kv_len is not None:
        valid &= (rules.kv_len > 0)[:, None]
    return jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))


def per_device(request: AttentionRequest, kernel: Callable[[AttentionRequest], jax.Array]) -> jax.Array:
    """``kernel(request)``, inside ``jax.shard_map`` over the batch and head axes when the call is sharded.

    Pallas calls cannot be partitioned by XLA: on a mesh each device runs the
    kernel on its own rows and heads (no collective is needed: a query head
    lives with its KV head). Outside a mesh this is ``kernel(request)``.
    """
    placement = request.placement
    if placement is None:
        return kernel(request)

    def dense_spec(x):  # [B|1, N|1, T|1, S|1]: a broadcast axis is not split
        return None if x is None else P(placement.batch if x.shape[0] > 1 else None,
                                        placement.heads if x.shape[1] > 1 else None, None, None)

    def row_spec(x):
        return None if x is None else placement.spec(heads=False, rank=x.ndim)

    rules = request.rules
    rule_specs = dataclasses.replace(rules, **{name: row_spec(getattr(rules, name)) for name in
                                               ("q_offset", "q_len", "kv_len", "q_segment_ids", "kv_segment_ids")})
    heads = placement.spec()

    def body(query, key, value, rules, bias, mask, sinks):
        return kernel(dataclasses.replace(request, query=query, key=key, value=value, rules=rules, bias=bias,
                                          mask=mask, sinks=sinks, placement=None))

    sinks_spec = None if request.sinks is None else P(placement.heads)
    in_specs = (heads, heads, heads, rule_specs, dense_spec(request.bias), dense_spec(request.mask), sinks_spec)
    inputs = (request.query, request.key, request.value, rules, request.bias, request.mask, request.sinks)
    if any(t == jax.sharding.AxisType.Explicit for t in placement.mesh.axis_types):
        # On explicit meshes every array's type carries its sharding: bring each to its spec (the small
        # per-row rules arrays are usually replicated).
        inputs = jax.reshard(inputs, jax.tree.map(lambda spec: NamedSharding(placement.mesh, spec), in_specs))
    # check_vma=False: the kernels' outputs are declared per device, which is what they are here.
    return jax.shard_map(body, mesh=placement.mesh, in_specs=in_specs, out_specs=heads, check_vma=False)(*inputs)
