"""A quantized key/value cache as the kernels take it: int8 or float8_e4m3fn values, float32 scales ``[B, S, K]``.

Key ``s`` of KV head ``k`` is ``key[b, s, k] * key_scale[b, s, k]`` (values
likewise). `check_tensors` is the one validator of a call's query, key, value
and scales, shared by `gqa_jax.dot_product_attention` and the decode kernels'
public wrappers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import check_qkv

# Storage dtypes of a quantized cache.
QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def is_quantized_dtype(dtype) -> bool:
    """True for the storage dtypes of a quantized cache (int8, float8_e4m3fn)."""
    return jnp.dtype(dtype) in QUANTIZED_DTYPES


def check_tensors(query, key, value, key_scale=None, value_scale=None, *,
                  names: tuple[str, str, str] = ("query", "key", "value"),
                  dtypes: tuple[jnp.dtype, ...] | None = None) -> tuple[jax.Array | None, jax.Array | None]:
    """`pallas_kernels.arguments.check_qkv`, and the scales of a quantized key and value.

    A float key and value must share the query's dtype and come without
    scales. A quantized pair shares one dtype of `QUANTIZED_DTYPES` and needs
    both scales, floating ``[B, S, K]``.

    Args:
      query, key, value: as in `check_qkv`.
      key_scale, value_scale: the scales, or None for a float cache.
      names: how query, key and value are called in messages.
      dtypes: query dtypes served (None: every floating dtype).

    Returns:
      ``(key_scale, value_scale)`` as float32, or ``(None, None)`` for a float cache.

    Raises:
      ValueError: for shapes that disagree or a missing scale.
      TypeError: for dtypes that do not fit.
    """
    k_name, v_name = names[1:]
    if key_scale is None and value_scale is None and not (is_quantized_dtype(key.dtype)
                                                          or is_quantized_dtype(value.dtype)):
        check_qkv(query, key, value, names=names, dtypes=dtypes)
        return None, None
    # Shapes as for a float cache of the query's dtype, then the quantized dtypes and the scales.
    check_qkv(query, *(jax.ShapeDtypeStruct(x.shape, query.dtype) for x in (key, value)), names=names, dtypes=dtypes)
    if not (is_quantized_dtype(key.dtype) and key.dtype == value.dtype):
        raise TypeError(
            f"a quantized cache needs {k_name} and {v_name} of one dtype in {[str(d) for d in QUANTIZED_DTYPES]} "
            f"(with key_scale and value_scale), got {k_name}.dtype={key.dtype}, {v_name}.dtype={value.dtype}"
        )
    checked = []
    for name, scale in (("key_scale", key_scale), ("value_scale", value_scale)):
        if scale is None:
            raise ValueError(f"{k_name}.dtype={key.dtype} is quantized: key_scale and value_scale [B,S,K] are "
                             f"required, got {name}=None")
        scale = jnp.asarray(scale)
        if not jnp.issubdtype(scale.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {name}.dtype={scale.dtype}")
        if scale.shape != key.shape[:3]:
            raise ValueError(f"{name} must have shape [B,S,K]={tuple(key.shape[:3])}, got {name}.shape={scale.shape}")
        checked.append(scale.astype(jnp.float32))
    return checked[0], checked[1]


def attend_dequantized(flash, query, key, value, key_scale, value_scale, *extras):
    """``flash(query, key, value, *extras)``, a quantized cache dequantized in float32 for it.

    What the decode kernels' backward passes differentiate: a float cache
    (``key_scale`` None) goes to ``flash`` as it is; a quantized one as
    ``key * key_scale`` and ``value * value_scale`` in float32, with the
    queries in float32 too (the flash kernels take one dtype), and the output
    back in the query dtype.

    Args:
      flash: the float attention, ``(query, key, value, *extras) -> [B, T, N, Hv]``.
      query: ``[B, T, N, H]``.
      key, value: ``[B, S, K, H]`` and ``[B, S, K, Hv]``, the query's dtype or quantized.
      key_scale, value_scale: float32 ``[B, S, K]`` for a quantized cache, else None.
      *extras: more arguments of ``flash`` (attention sinks).
    """
    if key_scale is None:
        return flash(query, key, value, *extras)
    key, value = (x.astype(jnp.float32) * scale[..., None] for x, scale in ((key, key_scale), (value, value_scale)))
    return flash(query.astype(jnp.float32), key, value, *extras).astype(query.dtype)


def cache_vjp(attend, query, key, value, key_scale, value_scale, d_out, *extras):
    """Cotangents of ``attend(query, key, value, key_scale, value_scale, *extras)``.

    A float cache's keys and values get cotangents; a quantized cache's
    scales get them (``sum_h d(dequantized) * values``) and its int8 or float8
    values none.

    Returns:
      ``(d_query, d_key, d_value, d_key_scale, d_value_scale, *d_extras)``,
      None for the keys and values of a quantized cache and for the scales of
      a float one.
    """
    if key_scale is None:
        _, pullback = jax.vjp(lambda q, k, v, *e: attend(q, k, v, None, None, *e), query, key, value, *extras)
        d_query, d_key, d_value, *d_extras = pullback(d_out)
        return d_query, d_key, d_value, None, None, *d_extras
    _, pullback = jax.vjp(lambda q, ks, vs, *e: attend(q, key, value, ks, vs, *e), query, key_scale, value_scale,
                          *extras)
    d_query, d_key_scale, d_value_scale, *d_extras = pullback(d_out)
    return d_query, None, None, d_key_scale, d_value_scale, *d_extras
