"""Input and output projections of multi-head attention, in einsum form.

The kernels have the Keras ``EinsumDense`` layouts: ``[D, N, H]`` for the
query/key/value projections and ``[N, H, D]`` for the output projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check(name: str, x, rank: int, letters: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} [{','.join(letters)}], got {name}.shape={tuple(x.shape)}")


def project_heads(x: Array, kernel: Array, bias: Array | None = None, *, precision=None) -> Array:
    """Projects features to heads: ``[B, T, D] x [D, N, H] (+ [N, H]) -> [B, T, N, H]``.

    Args:
      x: inputs ``[B, T, D]``.
      kernel: projection kernel ``[D, N, H]``.
      bias: optional bias ``[N, H]``.
      precision: passed to `jnp.einsum`.

    Returns:
      ``[B, T, N, H]`` in the promoted dtype of the inputs and kernel.
    """
    _check("x", x, 3, "BTD")
    _check("kernel", kernel, 3, "DNH")
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"feature dims differ: x.shape[-1]={x.shape[-1]}, kernel.shape[0]={kernel.shape[0]}")
    y_BTNH = jnp.einsum("BTD,DNH->BTNH", x, kernel, precision=precision)
    if bias is not None:
        if tuple(bias.shape) != tuple(kernel.shape[1:]):
            raise ValueError(f"bias.shape={tuple(bias.shape)} must equal kernel.shape[1:]={tuple(kernel.shape[1:])}")
        y_BTNH = y_BTNH + bias
    return y_BTNH


def project_output(x: Array, kernel: Array, bias: Array | None = None, *, precision=None,
                   out_sharding=None) -> Array:
    """Projects heads back to features: ``[B, T, N, H] x [N, H, D] (+ [D]) -> [B, T, D]``.

    Args:
      x: attention output ``[B, T, N, H]``.
      kernel: output kernel ``[N, H, D]``.
      bias: optional bias ``[D]``.
      precision: passed to `jnp.einsum`.
      out_sharding: passed to `jnp.einsum`; needed in explicit-sharding mode
        when the contracted heads are sharded (the sum over them is then
        reduced across devices).

    Returns:
      ``[B, T, D]``.
    """
    _check("x", x, 4, "BTNH")
    _check("kernel", kernel, 3, "NHD")
    if tuple(x.shape[2:]) != tuple(kernel.shape[:2]):
        raise ValueError(
            f"head dims differ: x.shape[2:]={tuple(x.shape[2:])}, kernel.shape[:2]={tuple(kernel.shape[:2])}"
        )
    y_BTD = jnp.einsum("BTNH,NHD->BTD", x, kernel, precision=precision, out_sharding=out_sharding)
    if bias is not None:
        if tuple(bias.shape) != (kernel.shape[2],):
            raise ValueError(f"bias.shape={tuple(bias.shape)} must be ({kernel.shape[2]},)")
        y_BTD = y_BTD + bias
    return y_BTD
