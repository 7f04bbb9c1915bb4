"""Attention sinks: one learned logit per query head in the softmax denominator (as in gpt-oss).

With ``sinks [N]`` the weight of key ``s`` for query head ``n`` is

    p_s = exp(l_s) / (sum_s' exp(l_s') + exp(sinks[n]))

over the keys the query sees: the sink takes a share of the mass and gives no
value, so ``out = sum_s p_s v_s`` may be shorter than any value (a head can
attend to "nothing"). ``-inf`` is no sink for that head. A row that sees no
key gives zeros. The math is float32 whatever the dtype of ``sinks``.

The kernels treat the sink as one more key with no value: their running max
starts at the sink's logit and their running sum at its weight, so no
separate finalize step is needed and a dominant sink cannot overflow the
weights. The log-sum-exp they keep includes the sink, and the backward is the
usual one: ``ds = p * (dp - D)`` with ``D = rowsum(dO * O)``, plus
``d sinks[n] = -sum_{b,t} p_sink[b,n,t] * D[b,n,t]`` (`sink_gradient`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sinks(sinks, num_heads: int) -> jax.Array | None:
    """``sinks`` as float32 ``[N]`` (or None).

    Raises:
      TypeError: for a dtype that is not floating.
      ValueError: for a shape other than ``[N]``.
    """
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks)
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks must be a floating-point array [N], got sinks.dtype={sinks.dtype}")
    if sinks.shape != (num_heads,):
        raise ValueError(f"sinks must have shape [N]=({num_heads},), got sinks.shape={tuple(sinks.shape)}")
    return sinks.astype(jnp.float32)


def sink_gradient(sinks, lse, delta):
    """``d sinks [N]`` from the natural log-sum-exp ``lse [B, N, T]`` (sink included) and ``delta = rowsum(dO * O)``.

    Rows with an infinite ``lse`` (padding; the kernels' dead rows) get no sink weight.
    """
    p_sink = jnp.where(jnp.isfinite(lse), jnp.exp(sinks[None, :, None] - lse), 0.0)
    return -jnp.sum(p_sink * delta, axis=(0, 2))
