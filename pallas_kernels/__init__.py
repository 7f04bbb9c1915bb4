"""Pallas attention kernels for GPUs and TPUs, importing only jax.

* `pallas_kernels.rules.Rules`: the rules of one call (scale, causal, offsets,
  lengths, segments, window, soft-cap), validated once by `Rules.create`.
* `pallas_kernels.gpu`: flash and decode attention, Triton lowering.
* `pallas_kernels.tpu`: flash and decode attention, Mosaic TPU.
"""

from pallas_kernels.rules import Rules

__all__ = ["Rules"]
