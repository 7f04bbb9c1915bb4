"""Numeric conventions of the kernels, and where the GPU and TPU kernels differ on purpose.

| | GPU (Triton, Mosaic GPU) | TPU (Mosaic TPU) |
|---|---|---|
| exponent | base 2: ``exp2``, with ``log2(e)`` folded into the scale (one FMA per logit) | natural ``exp`` (the TPU EUP has no cheaper ``exp2``) |
| masked logit | Triton: `MASK_VALUE` (finite: ``exp2(MASK_VALUE - m)`` is 0, never ``inf - inf``); Mosaic GPU: ``-inf`` with the running max floored at a finite value | ``-inf`` (the running max starts at the finite `MASK_VALUE`) |
| log-sum-exp of a row that sees no key | `DEAD_LSE` (``exp2(s - DEAD_LSE) == 0`` in the backward) | ``+inf`` |
| skipping masked tiles | loop bounds computed in the kernel from the rules | per-row visit tables prefetched to SMEM (the grid is static) |

Every kernel keeps softmax statistics and accumulators in float32 and gives
zeros, never NaN, for rows that see no key.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)
# Finite stand-in for -inf in kernels: exp(MASK_VALUE - m) underflows to 0
# without the inf - inf = NaN hazard of a real -inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# The base-2 log-sum-exp GPU kernels store for rows that see no key.
DEAD_LSE = 1e30
