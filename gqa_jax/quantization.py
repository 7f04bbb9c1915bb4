"""Symmetric absmax quantization of keys and values, one scale per token per KV head.

A quantized cache stores ``x [B, S, K, H]`` as ``values [B, S, K, H]`` in
int8 or float8_e4m3fn and float32 ``scale [B, S, K]``, with
``x ~= values * scale[..., None]``: each token's head vector is divided by
``absmax / qmax`` (``qmax`` 127 for int8, 448 for float8_e4m3fn) and rounded
to the nearest representable value. Error bounds per element:
``|x - dequantize(quantize(x))| <= scale / 2`` for int8, and
``<= 2**-4 * |x| + 2**-10 * scale`` for float8_e4m3fn (3 mantissa bits;
subnormals below ``2**-6``). A head vector of zeros gets scale 0.

Attention takes the quantized values and their scales as they are
(`gqa_jax.dot_product_attention`'s ``key_scale=`` and ``value_scale=``): the
logits are scaled per key after ``q . k`` and the probabilities per key before
``p . v``, which is attention over the dequantized cache without making it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized import QUANTIZED_DTYPES, is_quantized_dtype

Array = jax.Array

# The largest magnitude each storage dtype holds.
_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}

__all__ = ["QUANTIZED_DTYPES", "dequantize", "is_quantized_dtype", "quantize"]

def _check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in QUANTIZED_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in QUANTIZED_DTYPES]}, got dtype={dtype}")
    return dtype


def quantize(x, dtype) -> tuple[Array, Array]:
    """Quantizes ``x [..., H]`` with one symmetric absmax scale per vector of the last axis.

    Args:
      x: floating ``[..., H]`` (e.g. keys ``[B, T, K, H]``); finite.
      dtype: ``jnp.int8`` or ``jnp.float8_e4m3fn``.

    Returns:
      ``(values [..., H] in dtype, scale [...] float32)`` with
      ``x ~= values * scale[..., None]``.

    Raises:
      TypeError: for a non-floating ``x`` or another ``dtype``.
    """
    dtype = _check_dtype(dtype)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got x.dtype={x.dtype}")
    x = x.astype(jnp.float32)
    qmax = _QMAX[dtype]
    scale = jnp.max(jnp.abs(x), axis=-1) / qmax
    scaled = x / jnp.where(scale > 0.0, scale, 1.0)[..., None]
    if dtype == jnp.int8:
        values = jnp.clip(jnp.round(scaled), -qmax, qmax).astype(dtype)
    else:
        values = jnp.clip(scaled, -qmax, qmax).astype(dtype)
    return values, scale


def dequantize(values, scale, dtype=jnp.float32) -> Array:
    """``values [..., H] * scale[..., None]`` in ``dtype`` (float32 by default).

    Raises:
      TypeError: for ``values`` not in a quantized dtype.
      ValueError: for a ``scale`` whose shape is not ``values.shape[:-1]``.
    """
    values, scale = jnp.asarray(values), jnp.asarray(scale)
    _check_dtype(values.dtype)
    if scale.shape != values.shape[:-1]:
        raise ValueError(f"scale must have shape values.shape[:-1]={values.shape[:-1]}, got {scale.shape=}")
    return (values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)
