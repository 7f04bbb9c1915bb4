"""What the NNX Keras attention layers share: settings, projections and their logical axis names.

The linen layers declare their projections inside their call; the NNX layers
build them eagerly (`gqa_jax.nnx.EinsumDense`) and hand them to the same body,
`gqa_jax.modules.keras_attention.keras_attention`, through ``project``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx


Array = jax.Array

# Logical axis names of the projections (the sharding rules map them to mesh axes).
QUERY_AXES = ("embed", "q_heads", "head_dim")
KEY_VALUE_AXES = ("embed", "kv_heads", "head_dim")
OUTPUT_AXES = ("q_heads", "head_dim", "embed")


def dense_settings(
    *, use_bias: bool, kernel_init, bias_init, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs
) -> dict:
    """The keywords of `gqa_jax.nnx.EinsumDense` that all projections of a layer share."""
    return dict(
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        rngs=rngs,
    )


def output_axes(num_features: int) -> tuple[str | None, ...]:
    """``attention_output``'s names: heads, head dim, then ``embed`` for one output dim (None for several)."""
    return OUTPUT_AXES if num_features == 1 else OUTPUT_AXES[:2] + (None,) * num_features


class KerasAttentionLayer(nnx.Module):
    """Base of the NNX Keras layers: the settings the shared body reads, and its ``project``.

    A subclass stores its sizes, calls `_init_settings`, checks itself with
    the linen layer's check, builds its projections (`gqa_jax.nnx.EinsumDense`,
    with `dense_settings`), and calls the shared body with
    ``project=self.project`` and a key from `gqa_jax.nnx.dropout.dropout_key`.
    """

    def _init_settings(
        self,
        *,
        dropout: float,
        use_bias: bool,
        sliding_window: int | None,
        flash_attention: bool | None,
        use_gate: bool,
        implementation: str | Sequence[str] | None,
        deterministic: bool,
    ) -> None:
        """Stores the settings that the shared checks and body read."""
        self.dropout, self.use_bias, self.sliding_window = dropout, use_bias, sliding_window
        self.flash_attention = flash_attention
        self.use_gate, self.deterministic = use_gate, deterministic
        self.implementation = tuple(implementation) if isinstance(implementation, list) else implementation

    def project(self, name: str, features: Sequence[int], x: Array, contract: int = 1) -> Array:
        """The projection sublayer ``name`` applied to ``x`` (the ``project`` of `keras_attention`)."""
        layer = getattr(self, name)
        if layer.features != tuple(features):
            raise ValueError(f"{name} projects to features={layer.features}, the call needs {tuple(features)}")
        return layer(x)
