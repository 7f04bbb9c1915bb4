"""Validation and normalization of an attention call, done once before dispatch.

`make_request` checks every argument of `gqa_jax.dot_product_attention` and
returns an `AttentionRequest` whose fields are in one canonical form (4-D
masks and biases, int32 ``[B]`` lengths and offsets, ``(left, right)``
windows). Every implementation adapter reads the request, never the raw
arguments, so all of them agree on defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.masking import default_query_offset

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionRequest:
    """One validated attention call.

    Attributes:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      bias: additive float bias ``[B|1, N|1, T|1, S|1]`` or None.
      mask: boolean mask ``[B|1, N|1, T|1, S|1]`` (True = attend) or None.
      scale: logit scale.
      is_causal: causal rule on query/key positions.
      query_offset: int32 ``[B]`` position of each row's first query, or None
        when no positional rule (causal, window) is on.
      query_offset_is_default: the offset was not given but derived (0 when
        ``T == S``, else bottom-right); adapters of libraries with top-left
        causal masks need to know.
      query_seq_lengths: int32 ``[B]`` or None.
      key_value_seq_lengths: int32 ``[B]`` or None.
      q_segment_ids: int32 ``[B, T]`` or None.
      kv_segment_ids: int32 ``[B, S]`` or None.
      local_window_size: ``(left, right)`` or None.
      logits_soft_cap: positive float or None.
      dropout_rate: probability of dropping an attention weight.
      dropout_rng: PRNG key, or None when ``dropout_rate == 0``.
      return_weights: also return the ``[B, N, T, S]`` attention weights.
    """

    query: Array
    key: Array
    value: Array
    bias: Array | None = None
    mask: Array | None = None
    scale: float = 1.0
    is_causal: bool = False
    query_offset: Array | None = None
    query_offset_is_default: bool = False
    query_seq_lengths: Array | None = None
    key_value_seq_lengths: Array | None = None
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    local_window_size: tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    dropout_rate: float = 0.0
    dropout_rng: Array | None = None
    return_weights: bool = False

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def q_len(self) -> int:
        return self.query.shape[1]

    @property
    def kv_len(self) -> int:
        return self.key.shape[1]

    @property
    def num_heads(self) -> int:
        return self.query.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[2]

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def value_head_dim(self) -> int:
        return self.value.shape[3]

    @property
    def positional(self) -> bool:
        """Whether a rule that depends on positions (causal, window) is on."""
        return self.is_causal or self.local_window_size is not None

    def unsupported(self, *features: str) -> list[str]:
        """Names of the given optional features that this request uses.

        Adapters call it to refuse requests: ``features`` are field names
        such as ``"bias"``, ``"mask"``, ``"dropout"``, ``"return_weights"``,
        ``"segment_ids"``, ``"local_window_size"``, ``"logits_soft_cap"``,
        ``"query_offset"``.
        """
        used = {
            "bias": self.bias is not None,
            "mask": self.mask is not None,
            "dropout": self.dropout_rate > 0.0,
            "return_weights": self.return_weights,
            "segment_ids": self.q_segment_ids is not None,
            "local_window_size": self.local_window_size is not None,
            "logits_soft_cap": self.logits_soft_cap is not None,
            "query_offset": self.query_offset is not None,
            "query_seq_lengths": self.query_seq_lengths is not None,
            "key_value_seq_lengths": self.key_value_seq_lengths is not None,
        }
        unknown = set(features) - set(used)
        if unknown:
            raise KeyError(f"unknown request features {sorted(unknown)}")
        return [f for f in features if used[f]]


def concrete_value(x) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known at trace time, else None."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_rank(name: str, x, rank: int, letters: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} [{','.join(letters)}], got {name}.shape={tuple(x.shape)}")


def _as_int_array(name: str, x, shape: tuple[int, ...], letters: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {name}.dtype={x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape [{letters}]={shape}, got {name}.shape={tuple(x.shape)}")
    return x.astype(jnp.int32)


def _check_lengths(name: str, lengths: Array, limit: int, limit_name: str) -> None:
    values = concrete_value(lengths)
    if values is None:
        return
    if (values < 0).any():
        raise ValueError(f"{name} must be non-negative, got {name}={values.tolist()}")
    if (values > limit).any():
        raise ValueError(f"{name} must be <= {limit_name}={limit}, got {name}={values.tolist()}")


def _normalize_4d(name: str, x, B: int, N: int, T: int, S: int) -> Array:
    """Bring a mask or bias of rank 2 ``[T,S]``, 3 ``[B,T,S]`` or 4 ``[B,N,T,S]`` to rank 4."""
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
    return x


def _normalize_window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)):
        window = (int(local_window_size), int(local_window_size))
    else:
        window = tuple(local_window_size)
        if len(window) != 2 or not all(isinstance(w, (int, np.integer)) for w in window):
            raise TypeError(f"local_window_size must be an int or a (left, right) pair of ints, got {local_window_size=}")
        window = (int(window[0]), int(window[1]))
    if window[0] < 0 or window[1] < 0:
        raise ValueError(f"local_window_size must be non-negative, got (left, right)={window}")
    return window


def make_request(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_offset=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    local_window_size=None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Any = None,
    return_weights: bool = False,
) -> AttentionRequest:
    """Validates the arguments of `gqa_jax.dot_product_attention`.

    Raises:
      ValueError: for wrong shapes, head counts, lengths, windows or rates.
      TypeError: for wrong dtypes.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    _check_rank("query", query, 4, "BTNH")
    _check_rank("key", key, 4, "BSKH")
    _check_rank("value", value, 4, "BSKH")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {name}.dtype={x.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got query.dtype={query.dtype}, "
            f"key.dtype={key.dtype}, value.dtype={value.dtype}"
        )
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: query.shape[0]={B}, key.shape[0]={key.shape[0]}, value.shape[0]={value.shape[0]}"
        )
    if key.shape[3] != H:
        raise ValueError(f"query and key head dims differ: query.shape[3]={H}, key.shape[3]={key.shape[3]}")
    if value.shape[1:3] != key.shape[1:3]:
        raise ValueError(
            f"value [B,S,K,Hv] must match key [B,S,K,H] on S and K, got key.shape={tuple(key.shape)}, "
            f"value.shape={tuple(value.shape)}"
        )
    if K == 0 or N % K != 0:
        raise ValueError(f"num_heads N={N} must be a multiple of num_kv_heads K={K}")

    if bias is not None:
        bias = _normalize_4d("bias", bias, B, N, T, S)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating-point array, got bias.dtype={bias.dtype}")
    if mask is not None:
        mask = _normalize_4d("mask", mask, B, N, T, S)
        if mask.dtype != jnp.bool_:
            if not jnp.issubdtype(mask.dtype, jnp.integer):
                raise TypeError(
                    f"mask must be boolean (True = attend) or integer 0/1, got mask.dtype={mask.dtype}; "
                    "pass an additive float mask as bias"
                )
            mask = mask != 0

    if scale is None:
        scale = 1.0 / math.sqrt(H)
    elif not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    scale = float(scale)

    if query_seq_lengths is not None:
        query_seq_lengths = _as_int_array("query_seq_lengths", query_seq_lengths, (B,), "B")
        _check_lengths("query_seq_lengths", query_seq_lengths, T, "T")
    if key_value_seq_lengths is not None:
        key_value_seq_lengths = _as_int_array("key_value_seq_lengths", key_value_seq_lengths, (B,), "B")
        _check_lengths("key_value_seq_lengths", key_value_seq_lengths, S, "S")

    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "q_segment_ids and kv_segment_ids go together, got "
            f"q_segment_ids={'None' if q_segment_ids is None else 'array'}, "
            f"kv_segment_ids={'None' if kv_segment_ids is None else 'array'}"
        )
    if q_segment_ids is not None:
        q_segment_ids = _as_int_array("q_segment_ids", q_segment_ids, (B, T), "B,T")
        kv_segment_ids = _as_int_array("kv_segment_ids", kv_segment_ids, (B, S), "B,S")

    window = _normalize_window(local_window_size)
    positional = bool(is_causal) or window is not None
    query_offset_given = query_offset
    if query_offset is not None:
        if not positional:
            raise ValueError(
                f"query_offset only matters with is_causal=True or local_window_size, got {is_causal=}, "
                f"{local_window_size=}"
            )
        offset = jnp.asarray(query_offset)
        if offset.ndim == 0:
            offset = jnp.broadcast_to(offset, (B,))
        query_offset = _as_int_array("query_offset", offset, (B,), "B")
    elif positional:
        query_offset = jnp.broadcast_to(
            default_query_offset(T, S, query_seq_lengths, key_value_seq_lengths), (B,)
        ).astype(jnp.int32)

    if logits_soft_cap is not None:
        if not isinstance(logits_soft_cap, (int, float, np.floating)) or not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap=}")
        logits_soft_cap = float(logits_soft_cap)

    if not isinstance(dropout_rate, (int, float, np.floating)) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")
    dropout_rate = float(dropout_rate)
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng, got dropout_rng=None")

    return AttentionRequest(
        query=query,
        key=key,
        value=value,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=bool(is_causal),
        query_offset=query_offset,
        query_offset_is_default=positional and query_offset_given is None,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        local_window_size=window,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng if dropout_rate > 0.0 else None,
        return_weights=bool(return_weights),
    )
