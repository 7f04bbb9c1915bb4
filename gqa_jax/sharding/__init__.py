"""Scale-out on JAX's own sharding: context-parallel attention and logical axis rules.

* `gqa_jax.sharding.context`: the sequence of one self-attention call split
  over a mesh axis (`ring_attention`, `all_gather_attention`,
  `context_parallel_attention`, `zigzag_order`).
* `gqa_jax.sharding.logical`: MaxText-style rules from the layers' logical
  axis names to mesh axes (`logical_axis_rules`, `logical_to_spec`) and
  `with_logical_constraint` for activations.
"""

from gqa_jax.sharding.context import (
    all_gather_attention,
    context_parallel_attention,
    ring_attention,
    zigzag_order,
)
from gqa_jax.sharding.logical import logical_axis_rules, logical_to_spec, with_logical_constraint

__all__ = [
    "all_gather_attention",
    "context_parallel_attention",
    "logical_axis_rules",
    "logical_to_spec",
    "ring_attention",
    "with_logical_constraint",
    "zigzag_order",
]
