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


def project_heads(x_BTD: Array, kernel_DNH: Array, bias_NH: Array | None = None, *, precision=None) -> Array:
    """Projects features to heads: ``[B, T, D] x [D, N, H] (+ [N, H]) -> [B, T, N, H]``.

    Args:
      x_BTD: inputs ``[B, T, D]``.
      kernel_DNH: projection kernel ``[D, N, H]``.
      bias_NH: optional bias ``[N, H]``.
      precision: passed to `jnp.einsum`.

    Returns:
      ``[B, T, N, H]`` in the promoted dtype of the inputs and kernel.
    """
    _check("x_BTD", x_BTD, 3, "BTD")
    _check("kernel_DNH", kernel_DNH, 3, "DNH")
    if x_BTD.shape[-1] != kernel_DNH.shape[0]:
        raise ValueError(
            f"feature dims differ: x_BTD.shape[-1]={x_BTD.shape[-1]}, kernel_DNH.shape[0]={kernel_DNH.shape[0]}"
        )
    y = jnp.einsum("BTD,DNH->BTNH", x_BTD, kernel_DNH, precision=precision)
    if bias_NH is not None:
        if tuple(bias_NH.shape) != tuple(kernel_DNH.shape[1:]):
            raise ValueError(
                f"bias_NH.shape={tuple(bias_NH.shape)} must equal kernel_DNH.shape[1:]={tuple(kernel_DNH.shape[1:])}"
            )
        y = y + bias_NH
    return y


def project_output(x_BTNH: Array, kernel_NHD: Array, bias_D: Array | None = None, *, precision=None) -> Array:
    """Projects heads back to features: ``[B, T, N, H] x [N, H, D] (+ [D]) -> [B, T, D]``.

    Args:
      x_BTNH: attention output ``[B, T, N, H]``.
      kernel_NHD: output kernel ``[N, H, D]``.
      bias_D: optional bias ``[D]``.
      precision: passed to `jnp.einsum`.

    Returns:
      ``[B, T, D]``.
    """
    _check("x_BTNH", x_BTNH, 4, "BTNH")
    _check("kernel_NHD", kernel_NHD, 3, "NHD")
    if tuple(x_BTNH.shape[2:]) != tuple(kernel_NHD.shape[:2]):
        raise ValueError(
            f"head dims differ: x_BTNH.shape[2:]={tuple(x_BTNH.shape[2:])}, "
            f"kernel_NHD.shape[:2]={tuple(kernel_NHD.shape[:2])}"
        )
    y = jnp.einsum("BTNH,NHD->BTD", x_BTNH, kernel_NHD, precision=precision)
    if bias_D is not None:
        if tuple(bias_D.shape) != (kernel_NHD.shape[2],):
            raise ValueError(f"bias_D.shape={tuple(bias_D.shape)} must be ({kernel_NHD.shape[2]},)")
        y = y + bias_D
    return y
