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
    """Why the Pallas kernels cannot serve a request (XLA-only options, dtypes), or None."""
    if request.has_dropout:
        return "does not support dropout"
    if request.return_weights:
        return "does not support return_weights"
    if request.dtype not in KERNEL_DTYPES:
        return f"needs bfloat16, float16 or float32, got {request.dtype}"
    return None


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
