"""`EinsumDense` in Flax NNX: the Keras projection sublayers, with the linen layer's parameters.

Same ``kernel`` (``[D, N, H]`` or ``[N, H, *features]``) and ``bias``
(``features``) as `gqa_jax.modules.EinsumDense`, the same Keras initializer
names and the same computation (`gqa_jax.modules.einsum_dense.einsum_dense`),
built eagerly from the input's contracted shape. Parameters can carry logical
axis names for `nnx.get_partition_spec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gqa_jax.modules.einsum_dense import check_features, einsum_dense, kernel_initializer
from gqa_jax.modules.initializers import Initializer, keras_initializer

Array = jax.Array


def partitioned(init: Initializer, axes: Sequence[str | None] | None) -> Initializer:
    """``init`` whose parameters carry the logical axis names ``axes`` (None: no names).

    The names are metadata only (``eager_sharding=False``): no mesh is needed
    to build the layer, and `nnx.get_partition_spec` reads them.
    """
    if axes is None:
        return init
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


class EinsumDense(nnx.Module):
    """A projection ``[..., D] -> [..., N, H]`` (heads) or ``[..., N, H] -> [..., *features]`` (output).

    Args:
      in_shape: the contracted trailing input dims: ``(D,)`` for a heads
        projection, ``(N, H)`` for an output projection.
      features: output dims: ``(N, H)``, or any shape for an output projection.
      use_bias: add a bias of shape ``features``.
      kernel_init, bias_init: Flax initializers or Keras names (Keras'
        ``EinsumDense`` fans).
      dtype: computation dtype (default: promoted from inputs and params).
      param_dtype: parameter dtype.
      precision: passed to the einsums.
      kernel_axes: logical axis names of the kernel's dims (the bias takes
        the trailing ``len(features)``), or None.
      rngs: the ``params`` stream draws the initial values.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        features: Sequence[int],
        *,
        use_bias: bool = True,
        kernel_init: Initializer | str = "glorot_uniform",
        bias_init: Initializer | str = "zeros",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_axes: Sequence[str | None] | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_shape, self.features = tuple(in_shape), tuple(features)
        self.contract = len(self.in_shape)
        check_features(self.features, self.contract)
        if kernel_axes is not None and len(kernel_axes) != self.contract + len(self.features):
            raise ValueError(
                f"kernel_axes must name the {self.contract + len(self.features)} kernel dims "
                f"{self.in_shape + self.features}, got {kernel_axes=}"
            )
        self.dtype, self.precision = dtype, precision
        init = partitioned(kernel_initializer(kernel_init, self.contract, self.features), kernel_axes)
        self.kernel = nnx.Param(init(rngs.params(), self.in_shape + self.features, param_dtype))
        self.bias = nnx.data(None)
        if use_bias:
            bias_axes = None if kernel_axes is None else tuple(kernel_axes)[self.contract :]
            self.bias = nnx.Param(partitioned(keras_initializer(bias_init), bias_axes)(rngs.params(), self.features,
                                                                                        param_dtype))

    def __call__(self, x: Array) -> Array:
        """``x [..., *in_shape] -> [..., *features]``."""
        x = jnp.asarray(x)
        if x.shape[x.ndim - self.contract :] != self.in_shape:
            raise ValueError(
                f"the input's trailing dims must be in_shape={self.in_shape}, got x.shape={tuple(x.shape)}"
            )
        bias = None if self.bias is None else self.bias[...]
        return einsum_dense(x, self.kernel[...], bias, contract=self.contract, dtype=self.dtype,
                            precision=self.precision)
