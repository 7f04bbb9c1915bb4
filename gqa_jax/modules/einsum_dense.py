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
from jax.sharding import AxisType, PartitionSpec as P

from gqa_jax.modules.checks import check_bool
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
        check_features(features, self.contract)
        check_bool("use_bias", self.use_bias)
        x = jnp.asarray(x)
        contracted = x.shape[x.ndim - self.contract :]
        kernel = self.param("kernel", kernel_initializer(self.kernel_init, self.contract, features),
                            contracted + features, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", keras_initializer(self.bias_init), features, self.param_dtype)
        return einsum_dense(x, kernel, bias, contract=self.contract, dtype=self.dtype, precision=self.precision)


def check_features(features: tuple[int, ...], contract: int) -> None:
    """Raises ``ValueError`` unless ``contract`` is 1 with ``features=(N, H)``, or 2."""
    if contract == 1 and len(features) != 2:
        raise ValueError(f"a heads projection needs features=(N, H), got {features=}")
    if contract not in (1, 2):
        raise ValueError(f"contract must be 1 or 2, got contract={contract}")


def kernel_initializer(init: Initializer | str, contract: int, features: tuple[int, ...]) -> Initializer:
    """``init`` resolved with Keras' fans: the ``contract`` leading kernel axes in, the ``features`` axes out."""
    return keras_initializer(
        init, in_axis=tuple(range(contract)), out_axis=tuple(range(contract, contract + len(features)))
    )


def einsum_dense(x: Array, kernel: Array, bias: Array | None, *, contract: int, dtype=None, precision=None) -> Array:
    """The projection of `EinsumDense` with given parameters (shared by the linen and NNX layers).

    Args:
      x: ``[..., D]`` (``contract=1``) or ``[..., N, H]`` (``contract=2``).
      kernel: ``[D, N, H]`` or ``[N, H, *features]``.
      bias: ``features`` (the kernel's trailing shape) or None.
      contract: trailing axes of ``x`` contracted, 1 or 2.
      dtype: computation dtype (default: promoted from the inputs).
      precision: passed to the einsums.

    Returns:
      ``[..., *features]``.
    """
    x, kernel, bias = nn.dtypes.promote_dtype(jnp.asarray(x), kernel, bias, dtype=dtype)
    lead, contracted = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
    features = kernel.shape[contract:]
    x_BT = _two_leading_axes(x, lead, contracted)
    if contract == 1:
        y = project_heads(x_BT, kernel, bias, precision=precision)
    else:
        size = math.prod(features)
        kernel = kernel.reshape(*contracted, size)
        y = project_output(x_BT, kernel, None if bias is None else bias.reshape(size), precision=precision,
                           out_sharding=_explicit_output_sharding(x_BT, kernel))
    return y if y.shape == lead + features else y.reshape(lead + features)


def _explicit_output_sharding(x_BTNH: Array, kernel_NHF: Array) -> P | None:
    """In explicit-sharding mode, the output projection's ``[B, T, F]`` spec: ``x``'s ``B, T`` and the kernel's ``F``.

    None otherwise (the compiler places it). Explicit mode needs it when the
    contracted heads are sharded: the sum over them is reduced across devices.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return None
    spec = lambda a: tuple(jax.typeof(a).sharding.spec) + (None,) * a.ndim
    return P(*spec(x_BTNH)[:2], spec(kernel_NHF)[2])


def _two_leading_axes(x: Array, lead: tuple[int, ...], contracted: tuple[int, ...]) -> Array:
    """``x [*lead, *contracted]`` as ``[B, T, *contracted]``: the leading axes merged into ``B``, or ones added.

    ``[B, T, ...]`` inputs (the usual case) pass unchanged, and only major axes
    are ever merged, so a batch-sharded input keeps its sharding in
    explicit-sharding mode (where flattening ``B`` and ``T`` together is a
    ``ShardingTypeError``).
    """
    if len(lead) == 2:
        return x
    if len(lead) < 2:
        return x.reshape((1,) * (2 - len(lead)) + x.shape)
    return x.reshape(math.prod(lead[:-1]), lead[-1], *contracted)


def dense(
    layer: nn.Module, name: str, features: Sequence[int], x: Array, *, contract: int = 1, kernel_init=None
) -> Array:
    """Applies an `EinsumDense` named ``name`` that takes its settings from ``layer``.

    ``layer`` has the fields ``use_bias``, ``kernel_init``, ``bias_init``,
    ``dtype``, ``param_dtype`` and ``precision``; call it from ``layer``'s
    compact method. ``kernel_init`` (not None) replaces ``layer.kernel_init``.
    """
    return EinsumDense(
        features=tuple(features),
        contract=contract,
        use_bias=layer.use_bias,
        kernel_init=layer.kernel_init if kernel_init is None else kernel_init,
        bias_init=layer.bias_init,
        dtype=layer.dtype,
        param_dtype=layer.param_dtype,
        precision=layer.precision,
        name=name,
    )(x)
