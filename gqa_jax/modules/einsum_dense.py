"""`EinsumDense`: the Keras projection sublayers of attention, over `gqa_jax.projection`.

Keras names the projections of its attention layers ``query``, ``key``,
``value`` and ``attention_output`` (and ``gate``), each an ``EinsumDense`` with
a ``kernel`` and an optional ``bias``. This module declares the same
parameters with the same shapes, so weights port by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_jax.modules.initializers import Initializer, keras_initializer
from gqa_jax.projection import project_heads, project_output

Array = jax.Array


class EinsumDense(nn.Module):
    """A projection ``[..., D] -> [..., N, H]`` (heads) or ``[..., N, H] -> [..., *features]`` (output).

    Attributes:
      features: output dims: ``(N, H)`` for a heads projection, any shape for
        an output projection.
      contract: trailing input axes contracted: 1 (``D``, kernel
        ``[D, N, H]``) or 2 (``N, H``, kernel ``[N, H, *features]``).
      use_bias: add a bias of shape ``features``.
      kernel_init, bias_init: Flax initializers or Keras names (a Keras
        variance-scaling name takes its fans from the contracted and the
        output axes, as Keras' ``EinsumDense`` does).
      dtype: computation dtype (default: promoted from inputs and params).
      param_dtype: parameter dtype.
      precision: passed to the einsums.
    """

    features: Sequence[int]
    contract: int = 1
    use_bias: bool = True
    kernel_init: Initializer | str = "glorot_uniform"
    bias_init: Initializer | str = "zeros"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = tuple(self.features)
        if self.contract == 1 and len(features) != 2:
            raise ValueError(f"a heads projection needs features=(N, H), got {features=}")
        if self.contract not in (1, 2):
            raise ValueError(f"contract must be 1 or 2, got contract={self.contract}")
        x = jnp.asarray(x)
        lead, contracted = x.shape[: x.ndim - self.contract], x.shape[x.ndim - self.contract :]
        axes = tuple(range(self.contract)), tuple(range(self.contract, self.contract + len(features)))
        kernel_init = keras_initializer(self.kernel_init, in_axis=axes[0], out_axis=axes[1])
        kernel = self.param("kernel", kernel_init, contracted + features, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", keras_initializer(self.bias_init), features, self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.contract == 1:
            y = project_heads(x.reshape(1, -1, contracted[0]), kernel, bias, precision=self.precision)
        else:
            size = math.prod(features)
            y = project_output(
                x.reshape(1, -1, *contracted),
                kernel.reshape(*contracted, size),
                None if bias is None else bias.reshape(size),
                precision=self.precision,
            )
        return y.reshape(lead + features)


def dense(layer: nn.Module, name: str, features: Sequence[int], x: Array, *, contract: int = 1) -> Array:
    """Applies an `EinsumDense` named ``name`` that takes its settings from ``layer``.

    ``layer`` has the fields ``use_bias``, ``kernel_init``, ``bias_init``,
    ``dtype``, ``param_dtype`` and ``precision``; call it from ``layer``'s
    compact method.
    """
    return EinsumDense(
        features=tuple(features),
        contract=contract,
        use_bias=layer.use_bias,
        kernel_init=layer.kernel_init,
        bias_init=layer.bias_init,
        dtype=layer.dtype,
        param_dtype=layer.param_dtype,
        precision=layer.precision,
        name=name,
    )(x)
