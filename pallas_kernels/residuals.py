"""The residual API of the flash kernels: ``return_residuals=True`` gives ``(out, lse)``.

One convention on GPU and TPU: ``lse[b, n, t]`` is the natural log-sum-exp of
the scaled (soft-capped, biased) logits of query ``t`` over the keys it sees,
float32 ``[B, N, T]``, and ``-inf`` for rows that see no key (their output is
zero). Partial results over disjoint key sets merge by it (ring attention).
The kernels keep their own internal forms (`pallas_kernels.numerics`); the
functions here convert. The residual outputs are forward only: differentiating
through them raises, instead of giving a gradient that ignores the lse.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.numerics import DEAD_LSE

LN2 = math.log(2.0)


def from_base2(lse2):
    """The GPU kernels' base-2 lse (`DEAD_LSE` for dead rows) as the natural one (``-inf``)."""
    return jnp.where(lse2 >= 0.5 * DEAD_LSE, -jnp.inf, lse2 * LN2)


def from_tpu(lse):
    """The TPU kernels' natural lse (``+inf`` for dead rows) with ``-inf`` for dead rows."""
    return jnp.where(jnp.isposinf(lse), -jnp.inf, lse)


@jax.custom_jvp
def forward_only(x):
    """``x`` (a pytree) unchanged; differentiating through it raises. Kernels wrap their inputs in it."""
    return x


@forward_only.defjvp
def _forward_only_jvp(primals, tangents):
    raise NotImplementedError(
        "return_residuals=True is forward only: differentiate the call without it (or run the backward "
        "yourself, e.g. pallas_kernels.gpu.flash_backward, as ring attention does)"
    )
