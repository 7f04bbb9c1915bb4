"""Numeric conventions of the kernels, and where the GPU and TPU kernels differ on purpose.

| | GPU: Triton | GPU: Mosaic GPU | TPU: Mosaic TPU |
|---|---|---|---|
| exponent | ``exp2``; no bias: ``log2(e)`` folded into the scale (one FMA per logit); bias: natural logits, ``exp2((s - m) * log2(e) - shift)`` | ``exp2``, ``log2(e)`` in the scale (takes no bias) | natural ``exp`` (the TPU EUP has no cheaper ``exp2``) |
| masked logit | ``-inf``, running max from `LOWEST` | ``-inf``, running max floored at a finite value | ``-inf``, running max from `LOWEST` |
| row sees no key | running sum ``l == 0`` | running max at its floor | ``l == 0`` |
| shift of the weights | `prob_shift`: ``2**-32``, none for float16 | none | ``2**-32`` (compute is bf16 or f32) |
| statistics for the backward | no bias: ``lse2 = m + log2(l)``, `DEAD_LSE` if dead; bias: ``(m, shift + log2(l))``, ``(inf, inf)`` if dead | ``lse2``, `DEAD_LSE` (Triton backward) | ``(m, log(l))``, ``(inf, inf)`` if dead; summed without a bias |
| skipping masked tiles | loop bounds computed in the kernel from the rules | same | per-row visit tables prefetched to SMEM (the grid is static); the paged decode kernel bounds its in-kernel page loop |

Why:

* A finite bias is a bias, whatever its size: a row with ``finfo(float32).min``
  on every key is the uniform average (softmax is shift-invariant), as in
  ``jax.nn``. So masked logits are ``-inf`` (below every finite logit), the
  running max starts at the lowest finite float32 (a finite logit always
  raises it, ``-inf`` never does, and no ``inf - inf`` arises), and a row
  that saw no key is one whose running sum is still 0. Biased logits stay
  natural in the Triton kernel: ``bias * log2(e)`` overflows for
  ``|bias| > finfo.max / log2(e)``, ``s - m`` does not.
* With a bias the backward gets ``m`` and ``log(l)`` apart: ``m + log(l)``
  rounds ``log(l)`` away when ``|m|`` is near ``finfo.max``, which would give
  every key of a uniform row weight 1 instead of ``1/S``. The backward's
  ``exp((s - m) - log(l))`` is the forward's weight divided by ``l``.
  Without a bias ``|m|`` is moderate and one statistic (the lse) does.
* Unnormalized weights are at most ``2**-PROB_SHIFT``, so the float32
  accumulator of ``p @ v`` holds at most ``2**-32 * S * max|v|``: finite for
  any finite bfloat16 or float32 ``v`` and ``S < 2**31``. The shift cancels
  in ``acc / l``; the statistics carry it. Folded into the running max
  (``m = max(m, rowmax(s) + shift)``: no work per logit) it is exact to
  within one while ``|m| < 2**24`` and fades beyond (gone from about
  ``2**29``, logits that only a huge bias gives; overflow then also needs
  values near the dtype's maximum); the Triton bias path subtracts it inside
  the exponent (the FMA it needs anyway), exact at any ``|m|``. Weights below
  ``2**(PROB_SHIFT - 126)`` of the row's largest now flush to zero (before:
  ``2**-126``), far below what a bfloat16 or float32 output resolves.
  float16 needs no shift (``2**31 * 65504`` fits in float32) and would lose
  every weight to float16 underflow with it.

Every kernel keeps softmax statistics and accumulators in float32 and gives
zeros, never NaN, for rows that see no key.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite stand-in for -inf (the GPU decode kernel): exp(MASK_VALUE - m) underflows to 0
# without the inf - inf = NaN hazard of a real -inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Where running maxima start: the lowest finite float32, below every finite logit.
LOWEST = float(jnp.finfo(jnp.float32).min)
# The base-2 log-sum-exp GPU kernels store for rows that see no key.
DEAD_LSE = 1e30
# Unnormalized softmax weights are at most 2**-PROB_SHIFT (see the module docstring).
PROB_SHIFT = 32.0


def prob_shift(dtype) -> float:
    """The base-2 shift of unnormalized weights for values of ``dtype``: `PROB_SHIFT`, 0 for float16."""
    return 0.0 if jnp.dtype(dtype) == jnp.float16 else PROB_SHIFT
