"""Tensor checks and padding shared by the front end and the public wrapper of every kernel.

The rules of a call (scale, causal, offsets, lengths, segments, window,
soft-cap) are validated by `pallas_kernels.rules.Rules.create`; the tensors
(query, key, value, bias) by the functions here. Both are the only validators:
`gqa_jax.dot_product_attention` and each kernel wrapper call the same ones, so
they accept and refuse the same arguments with the same messages.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rules import check_int32_range

# Input dtypes the kernels serve.
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _varying(tree) -> frozenset:
    """The ``shard_map`` axes any array of ``tree`` varies over (empty outside ``shard_map``)."""
    return frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in jax.tree.leaves(tree)))


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
    """A kernel output's ``jax.ShapeDtypeStruct``, varying over the ``shard_map`` axes its inputs vary over.

    Under ``jax.shard_map(..., check_vma=True)`` (the default) a Pallas call
    must declare over which manual mesh axes each output varies; a kernel's
    output varies over the union of its inputs' axes, which is what this gives
    (nothing outside ``shard_map``).

    Args:
      shape: the output shape.
      dtype: the output dtype.
      *like: the kernel's inputs: arrays, pytrees of arrays, or None.
    """
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=_varying(like)))


def vary_like(x, *like):
    """``x`` (a pytree) cast to vary over the ``shard_map`` axes ``like`` varies over, where it does not yet.

    For values built without the inputs' axes: constants in ``lax.cond``
    branches, and the outputs of ``plgpu.kernel``, which traces its kernel with
    ``check_vma`` off and drops the axes `out_struct` declares.
    """
    missing = _varying(like) - _varying(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= x``."""
    return -(-x // multiple) * multiple


def is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def next_power_of_two(x: int) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``)."""
    return 1 << max(x - 1, 0).bit_length()


def check_qkv(query, key, value, *, names: tuple[str, str, str] = ("query", "key", "value"),
              dtypes: tuple[jnp.dtype, ...] | None = KERNEL_DTYPES) -> None:
    """Ranks, matching sizes, ``N % K == 0``, non-empty heads and one dtype.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      names: how the three are called in messages (e.g. ``key_cache``).
      dtypes: the dtypes served; None allows every floating dtype.

    Raises:
      ValueError: for ranks or sizes that disagree.
      TypeError: for differing or unsupported dtypes.
    """
    q_name, k_name, v_name = names
    letters = ("B,T,N,H", "B,S,K,H", "B,S,K,Hv")
    for name, x, axes in zip(names, (query, key, value), letters):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [{axes}], got {name}.shape={tuple(x.shape)}")
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        raise ValueError(
            f"batch sizes differ: {q_name}.shape[0]={query.shape[0]}, {k_name}.shape[0]={key.shape[0]}, "
            f"{v_name}.shape[0]={value.shape[0]}"
        )
    if key.shape[3] != query.shape[3]:
        raise ValueError(
            f"{q_name} and {k_name} head dims differ: {q_name}.shape[3]={query.shape[3]}, "
            f"{k_name}.shape[3]={key.shape[3]}"
        )
    if value.shape[1:3] != key.shape[1:3]:
        raise ValueError(
            f"{v_name} [B,S,K,Hv] must match {k_name} [B,S,K,H] on S and K, got {k_name}.shape={tuple(key.shape)}, "
            f"{v_name}.shape={tuple(value.shape)}"
        )
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads N={num_heads} must be a multiple of num_kv_heads K={num_kv_heads}")
    if query.shape[3] == 0 or value.shape[3] == 0:
        raise ValueError(
            f"head dims must be positive, got {q_name}.shape={tuple(query.shape)}, {v_name}.shape={tuple(value.shape)}"
        )
    if key.shape[1] == 0:
        raise ValueError(f"{k_name} must hold at least one key, got {k_name}.shape={tuple(key.shape)}")
    for name, x in zip(names, (query, key, value)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {name}.dtype={x.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"{q_name}, {k_name} and {v_name} must share a dtype, got {q_name}.dtype={query.dtype}, "
            f"{k_name}.dtype={key.dtype}, {v_name}.dtype={value.dtype}"
        )
    if dtypes is not None and jnp.dtype(query.dtype) not in dtypes:
        raise TypeError(f"dtype must be one of {[str(d) for d in dtypes]}, got {q_name}.dtype={query.dtype}")


def check_bias(name: str, x, B: int, N: int, T: int, S: int, *, boolean: bool = False) -> jax.Array:
    """A bias (or boolean mask) of rank 2 ``[T,S]``, 3 ``[B,T,S]`` or 4 ``[B,N,T,S]``, as rank 4.

    Each axis is either full or 1 (broadcast).

    Args:
      name: ``"bias"`` or ``"mask"``, for messages.
      x: the array.
      B, N, T, S: the sizes of the call.
      boolean: a mask (bool, or integer 0/1 turned into bool) rather than a float bias.

    Returns:
      ``[B|1, N|1, T|1, S|1]``.

    Raises:
      ValueError: for a rank or axis size that does not fit.
      TypeError: for a dtype that does not fit.
    """
    x = jnp.asarray(x)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise ValueError(f"{name} must have rank 2 [T,S], 3 [B,T,S] or 4 [B,N,T,S], got {name}.shape={tuple(x.shape)}")
    for axis, (letter, size) in enumerate(zip("BNTS", (B, N, T, S))):
        if x.shape[axis] not in (1, size):
            raise ValueError(
                f"{name} axis {letter} must be 1 or {letter}={size}, got {name}.shape={tuple(x.shape)} "
                f"for query [B,T,N,H] and key [B,S,K,H] with {B=}, {T=}, {N=}, {S=}"
            )
    if boolean:
        if x.dtype == jnp.bool_:
            return x
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"{name} must be boolean (True = attend) or integer 0/1, got {name}.dtype={x.dtype}; "
                "pass an additive float mask as bias"
            )
        return x != 0
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got {name}.dtype={x.dtype}")
    return x


def positive_int(name: str, value) -> int:
    """``value`` as an int after checking it is a positive integer (NumPy ints too, never a bool).

    Raises:
      TypeError: for a non-integer (floats, bools, strings).
      ValueError: for zero or a negative value.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {name}={value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return int(value)


def row_vector(name: str, x, batch: int, default: int | None = None) -> jax.Array:
    """An int32 ``[B]`` from a scalar or ``[B]`` integer array (or ``default`` for None).

    Raises:
      TypeError: for a non-integer dtype (bools included).
      ValueError: for a shape other than ``[]`` or ``[B]``, or host integers outside int32.
    """
    if x is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return jnp.full((batch,), default, jnp.int32)
    check_int32_range(name, x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {name}.dtype={x.dtype}")
    if x.ndim == 0:
        x = jnp.broadcast_to(x, (batch,))
    if x.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape [B]=({batch},), got {name}.shape={tuple(x.shape)}")
    return x.astype(jnp.int32)


def pad_axis(x, axis: int, size: int):
    """Zero-pads axis ``axis`` of ``x`` up to ``size`` (no copy when it already fits; None stays None)."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)
