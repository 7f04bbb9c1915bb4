"""The rules of one attention call: `Rules`, built and validated once, read by every kernel.

Positions: query ``t`` of batch row ``b`` sits at ``q_offset[b] + t``; key
``s`` sits at ``s``. A key is visible to a query when every rule that is on
agrees:

* causal: ``key_pos <= query_pos``;
* window ``(left, right)``: ``query_pos - left <= key_pos <= query_pos + right``,
  or ``key_pos < sink_tokens`` (the first keys stay visible: StreamingLLM's
  attention-sink tokens; with causal they still obey causality);
* lengths: ``t < q_len[b]`` and ``s < kv_len[b]``;
* segments: ``q_segment_ids[b, t] == kv_segment_ids[b, s]``.

The scale and the logit soft-cap travel with the rules, so a kernel core takes
tensors plus one `Rules` and nothing else that a user chose.

`Rules.create` is the only validator and defaulter: the front end
(`gqa_jax.make_request`) and every kernel's public wrapper call it, so an
argument is accepted or refused identically everywhere. `Rules` is a pytree
(static fields are metadata), so it passes through ``jit``, ``custom_vjp`` and
``shard_map`` unchanged. Kernels ask it `visible`, `kv_range` and `q_range`
instead of re-deriving the rules. With sink tokens the visible keys of a tile
are two runs, ``[0, sink_end)`` and ``[lo, hi)`` (`kv_ranges`); `kv_range`
gives their hull, so a kernel that asks only it stays correct (it visits the
gap between them, masked), and a kernel that asks `kv_ranges` skips the gap.

This module imports only jax and numpy: ``pallas_kernels`` stands alone.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def concrete_value(x) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known here and now, else None.

    None for tracers and for arrays that span devices of other processes, so
    value checks are skipped (never wrong) under ``jit`` and multi-process.
    """
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def default_query_offset(q_len: int, kv_len: int, query_seq_lengths=None, key_value_seq_lengths=None):
    """The position of each row's first query when positions matter and none is given.

    With ``T == S`` queries and keys share positions (self-attention): 0, as in
    ``jax.nn.dot_product_attention(is_causal=True)``. With ``T != S`` (chunked
    prefill, cached decoding) the last valid query is aligned with the last
    valid key: ``kv_len[b] - q_len[b]`` (bottom-right), lengths defaulting to
    ``S`` and ``T``.

    Returns:
      An int32 scalar, or ``[B]`` when lengths are given.
    """
    if q_len == kv_len:
        return jnp.zeros((), jnp.int32)
    valid_q = q_len if query_seq_lengths is None else query_seq_lengths
    valid_kv = kv_len if key_value_seq_lengths is None else key_value_seq_lengths
    return jnp.asarray(valid_kv, jnp.int32) - jnp.asarray(valid_q, jnp.int32)


def check_int32_range(name: str, x) -> None:
    """Raises ``ValueError`` when host integers (Python, NumPy) in ``x`` do not fit in int32.

    Indices and lengths travel as int32; without this check ``jnp.asarray``
    would wrap a value such as ``2**40`` silently. Device arrays already have
    a JAX integer dtype and are not read.
    """
    if not isinstance(x, (numbers.Integral, list, tuple, np.ndarray)):
        return
    try:
        host = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # a sequence of traced values: not known here
    if host.dtype.kind in "iu" and host.size:
        info = np.iinfo(np.int32)
        if host.min() < info.min or host.max() > info.max:
            raise ValueError(f"{name} must fit in int32 [{info.min}, {info.max}], got {name}={host.tolist()}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _finite_real(name: str, x) -> float:
    if not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {name}={x!r} of type {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {name}={x!r}")
    return float(x)


def normalize_window(local_window_size) -> tuple[int, int] | None:
    """``None``, an int or a ``(left, right)`` pair of non-negative ints (never bools) -> a pair or None.

    Raises:
      TypeError: for anything else (floats, bools, wrong lengths).
      ValueError: for negative sizes.
    """
    if local_window_size is None:
        return None
    if _is_int(local_window_size):
        window = (local_window_size, local_window_size)
    elif isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2 and all(
        _is_int(w) for w in local_window_size
    ):
        window = tuple(local_window_size)
    else:
        raise TypeError(f"local_window_size must be an int or a (left, right) pair of ints, got {local_window_size=}")
    if min(window) < 0:
        raise ValueError(f"local_window_size must be non-negative, got (left, right)={tuple(window)}")
    return int(window[0]), int(window[1])


def _int_array(name: str, x, shape: tuple[int, ...], letters: str) -> Array:
    check_int32_range(name, x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {name}.dtype={x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape [{letters}]={shape}, got {name}.shape={tuple(x.shape)}")
    return x.astype(jnp.int32)


def _lengths(name: str, x, batch: int, limit: int, limit_name: str) -> Array | None:
    if x is None:
        return None
    x = _int_array(name, x, (batch,), "B")
    values = concrete_value(x)
    if values is not None:
        if (values < 0).any():
            raise ValueError(f"{name} must be non-negative, got {name}={values.tolist()}")
        if (values > limit).any():
            raise ValueError(f"{name} must be <= {limit_name}={limit}, got {name}={values.tolist()}")
    return x


@dataclasses.dataclass(frozen=True)
class Rules:
    """Scale, masks and soft-cap of one attention call over ``[B, T]`` queries and ``[B, S]`` keys.

    Build it with `Rules.create`; the constructor itself does not validate.

    Attributes:
      q_offset: int32 ``[B]`` position of each row's first query (zeros when
        no positional rule is on).
      q_len: int32 ``[B]`` valid queries per row, or None (all ``T``).
      kv_len: int32 ``[B]`` valid keys per row, or None (all ``S``).
      q_segment_ids: int32 ``[B, T]`` or None.
      kv_segment_ids: int32 ``[B, S]`` or None (present with ``q_segment_ids``).
      scale: logit scale (static).
      is_causal: the causal rule (static).
      window: ``(left, right)`` sliding window or None (static).
      soft_cap: ``cap * tanh(logits / cap)`` on the scaled logits, or None (static).
      offset_is_default: the offset was derived, not given (static); an
        adapter for a library with top-left causal masks needs to know.
      sink_tokens: keys at positions ``< sink_tokens`` pass the window rule
        (static; 0 when off, only with a window).
    """

    q_offset: Array
    q_len: Array | None = None
    kv_len: Array | None = None
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    scale: float = 1.0
    is_causal: bool = False
    window: tuple[int, int] | None = None
    soft_cap: float | None = None
    offset_is_default: bool = True
    sink_tokens: int = 0

    @classmethod
    def create(
        cls,
        query,
        key,
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
        num_sink_tokens: int = 0,
    ) -> "Rules":
        """Validates and defaults the rules for ``query [B, T, N, H]`` against ``key [B, S, K, H]``.

        Only the shapes of ``query`` and ``key`` are read.

        Args:
          query: ``[B, T, N, H]`` (or anything with that ``.shape``).
          key: ``[B, S, K, H]``.
          scale: logit scale, a finite real; default ``1 / sqrt(H)``.
          is_causal: queries see keys at positions ``<=`` their own.
          query_offset: int or int ``[B]`` position of each row's first query;
            only with a positional rule (causal or window). Default: 0 when
            ``T == S``, else ``key_value_seq_lengths - query_seq_lengths``
            (lengths defaulting to ``S`` and ``T``): bottom-right.
          query_seq_lengths: int ``[B]`` in ``[0, T]``.
          key_value_seq_lengths: int ``[B]`` in ``[0, S]``.
          q_segment_ids: int ``[B, T]``; needs ``kv_segment_ids``.
          kv_segment_ids: int ``[B, S]``.
          local_window_size: int or ``(left, right)`` of non-negative ints.
          logits_soft_cap: a positive finite float, or None.
          num_sink_tokens: a non-negative int: keys at positions below it stay
            visible outside the sliding window (StreamingLLM); needs
            ``local_window_size`` when positive.

        Returns:
          The validated `Rules`.

        Raises:
          ValueError: for out-of-range values or shapes that disagree.
          TypeError: for values of the wrong type.
        """
        B, T, _, H = query.shape
        S = key.shape[1]
        if H <= 0:
            raise ValueError(f"head dim H must be positive, got query.shape={tuple(query.shape)}")
        scale = 1.0 / math.sqrt(H) if scale is None else _finite_real("scale", scale)
        if not isinstance(is_causal, (bool, np.bool_)):
            raise TypeError(f"is_causal must be a bool, got {is_causal=}")
        window = normalize_window(local_window_size)
        if not _is_int(num_sink_tokens):
            raise TypeError(f"num_sink_tokens must be a non-negative int, got {num_sink_tokens=}")
        if num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be a non-negative int, got {num_sink_tokens=}")
        if num_sink_tokens and window is None:
            raise ValueError(
                f"num_sink_tokens only matters with local_window_size, got {num_sink_tokens=}, {local_window_size=}"
            )
        if logits_soft_cap is not None:
            if not isinstance(logits_soft_cap, numbers.Real) or isinstance(logits_soft_cap, (bool, np.bool_)):
                raise TypeError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap=}")
            if not 0 < logits_soft_cap < math.inf:
                raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap=}")
            logits_soft_cap = float(logits_soft_cap)
        q_len = _lengths("query_seq_lengths", query_seq_lengths, B, T, "T")
        kv_len = _lengths("key_value_seq_lengths", key_value_seq_lengths, B, S, "S")
        if (q_segment_ids is None) != (kv_segment_ids is None):
            raise ValueError(
                "q_segment_ids and kv_segment_ids go together, got "
                f"q_segment_ids={'None' if q_segment_ids is None else 'an array'}, "
                f"kv_segment_ids={'None' if kv_segment_ids is None else 'an array'}"
            )
        if q_segment_ids is not None:
            q_segment_ids = _int_array("q_segment_ids", q_segment_ids, (B, T), "B,T")
            kv_segment_ids = _int_array("kv_segment_ids", kv_segment_ids, (B, S), "B,S")

        positional = bool(is_causal) or window is not None
        if query_offset is not None:
            if not positional:
                raise ValueError(
                    f"query_offset only matters with is_causal=True or local_window_size, got {is_causal=}, "
                    f"{local_window_size=}"
                )
            check_int32_range("query_offset", query_offset)
            offset = jnp.asarray(query_offset)
            offset = _int_array("query_offset", jnp.broadcast_to(offset, (B,)) if offset.ndim == 0 else offset,
                                (B,), "B")
        elif positional:
            offset = jnp.broadcast_to(default_query_offset(T, S, q_len, kv_len), (B,))
        else:
            offset = jnp.zeros((B,), jnp.int32)
        return cls(
            q_offset=offset,
            q_len=q_len,
            kv_len=kv_len,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            scale=scale,
            is_causal=bool(is_causal),
            window=window,
            soft_cap=logits_soft_cap,
            offset_is_default=query_offset is None,
            sink_tokens=int(num_sink_tokens),
        )

    # -- what is on ------------------------------------------------------------

    @property
    def positional(self) -> bool:
        """Whether a rule that depends on positions (causal, window) is on."""
        return self.is_causal or self.window is not None

    @property
    def has_segments(self) -> bool:
        return self.q_segment_ids is not None

    @property
    def batch_size(self) -> int:
        return self.q_offset.shape[0]

    def statics(self) -> "Rules":
        """These rules without their arrays: hashable, for kernel bodies and ``custom_vjp`` statics.

        Its `visible`, `kv_range`, `kv_full_range` and `q_range` work as on the
        full rules; the per-row values come into kernels as refs instead.
        """
        return dataclasses.replace(self, q_offset=None, q_len=None, kv_len=None, q_segment_ids=None,
                                   kv_segment_ids=None)

    # -- padding for kernels ---------------------------------------------------

    def lengths(self, q_len: int, kv_len: int) -> tuple[Array, Array]:
        """``(q_len [B], kv_len [B])`` int32, the given lengths or the full ``T`` and ``S``."""
        B = self.batch_size
        q = jnp.full((B,), q_len, jnp.int32) if self.q_len is None else self.q_len
        kv = jnp.full((B,), kv_len, jnp.int32) if self.kv_len is None else self.kv_len
        return q, kv

    def padded(self, q_len: int, kv_len: int, q_padded: int, kv_padded: int) -> "Rules":
        """The rules for inputs zero-padded from ``T, S`` to ``T_pad, S_pad``.

        Lengths become explicit (so padding is masked by them) and segment ids
        are padded; kernels whose tiles must divide the sequences use this.
        """
        q, kv = self.lengths(q_len, kv_len)
        q_seg, kv_seg = self.q_segment_ids, self.kv_segment_ids
        if q_seg is not None:
            q_seg = jnp.pad(q_seg, ((0, 0), (0, q_padded - q_len)))
            kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_padded - kv_len)))
        return dataclasses.replace(self, q_len=q, kv_len=kv, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    # -- questions kernels ask -------------------------------------------------

    def visible(self, q_pos, k_pos):
        """Positional visibility (causal, window) of keys at ``k_pos`` to queries at ``q_pos``.

        Args:
          q_pos: int array of query positions, broadcastable against ``k_pos``.
          k_pos: int array of key positions.

        Returns:
          A boolean array, or None when no positional rule is on.
        """
        mask = None
        if self.is_causal:
            mask = k_pos <= q_pos
        if self.window is not None:
            left, right = self.window
            in_window = (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
            if self.sink_tokens:
                in_window = in_window | (k_pos < self.sink_tokens)
            mask = in_window if mask is None else mask & in_window
        return mask

    def kv_ranges(self, q_first, q_last, kv_len):
        """The key positions any query of a tile can see, as two runs: ``(sink_end, lo, hi)``.

        Visible keys lie in ``[0, sink_end)`` (sink tokens; empty without them)
        and ``[lo, hi)`` (the window); the runs may overlap.

        Args:
          q_first: position of the tile's first query (int scalar).
          q_last: position of the tile's last query (int scalar).
          kv_len: valid keys of the row (int scalar).

        Returns:
          int32 scalars, ``0 <= sink_end <= kv_len``, ``0 <= lo``, ``hi <= kv_len``; a run is empty when its end is
          not past its start.
        """
        lo = jnp.zeros((), jnp.int32)
        hi = jnp.asarray(kv_len, jnp.int32)
        sink_end = jnp.zeros((), jnp.int32)
        if self.sink_tokens:
            sink_end = jnp.minimum(hi, self.sink_tokens)
            if self.is_causal:
                sink_end = jnp.maximum(jnp.minimum(sink_end, q_last + 1), 0)
        if self.is_causal:
            hi = jnp.minimum(hi, q_last + 1)
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, q_first - left)
            hi = jnp.minimum(hi, q_last + right + 1)
        return sink_end.astype(jnp.int32), lo.astype(jnp.int32), hi.astype(jnp.int32)

    def kv_range(self, q_first, q_last, kv_len):
        """Half-open range ``[lo, hi)`` of key positions that any query of a tile can see.

        With sink tokens, the hull of the two runs of `kv_ranges`.

        Args:
          q_first: position of the tile's first query (int scalar).
          q_last: position of the tile's last query (int scalar).
          kv_len: valid keys of the row (int scalar).

        Returns:
          ``(lo, hi)`` int32 scalars, ``0 <= lo``, ``hi <= kv_len``; empty when ``hi <= lo``.
        """
        sink_end, lo, hi = self.kv_ranges(q_first, q_last, kv_len)
        if self.sink_tokens:
            sinks = sink_end > 0
            lo = jnp.where(sinks, 0, lo)
            hi = jnp.where(sinks, jnp.maximum(hi, sink_end), hi)
        return lo, hi

    def kv_full_range(self, q_first, q_last, kv_len):
        """Half-open range ``[lo, hi)`` of key positions that every query of a tile sees.

        Segment ids are not considered (a kernel with segments masks every tile);
        nor are sink tokens (they only add visible keys, so the range stays a
        subset of what every query sees).
        """
        lo = jnp.zeros((), jnp.int32)
        hi = jnp.asarray(kv_len, jnp.int32)
        if self.is_causal:
            hi = jnp.minimum(hi, q_first + 1)
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, q_last - left)
            hi = jnp.minimum(hi, q_first + right + 1)
        return lo.astype(jnp.int32), hi.astype(jnp.int32)

    def q_range(self, k_first, k_last, q_offset, q_len):
        """Half-open range ``[lo, hi)`` of query *indices* that can see any key of a tile.

        Args:
          k_first: position of the tile's first key (int scalar).
          k_last: position of the tile's last key (int scalar).
          q_offset: position of query index 0 of the row (int scalar).
          q_len: valid queries of the row (int scalar).

        Returns:
          ``(lo, hi)`` int32 scalars, ``hi <= q_len``; ``lo`` may be negative
          (clip it when indexing). A tile holding sink tokens is seen by every
          query its causal rule allows.
        """
        lo = jnp.zeros((), jnp.int32)
        hi = jnp.asarray(q_len, jnp.int32)
        if self.is_causal:
            lo = jnp.maximum(lo, k_first - q_offset)
        sink_lo = lo
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, k_first - right - q_offset)
            hi = jnp.minimum(hi, k_last + left + 1 - q_offset)
        if self.sink_tokens:
            sinks = k_first < self.sink_tokens
            lo = jnp.where(sinks, sink_lo, lo)
            hi = jnp.where(sinks, jnp.asarray(q_len, jnp.int32), hi)
        return lo.astype(jnp.int32), hi.astype(jnp.int32)

    def q_full_range(self, k_first, k_last, q_offset, q_len):
        """Half-open range ``[lo, hi)`` of query indices that see every key of a tile (segments aside).

        Sink tokens are not considered: the range stays a subset.
        """
        lo = jnp.zeros((), jnp.int32)
        hi = jnp.asarray(q_len, jnp.int32)
        if self.is_causal:
            lo = jnp.maximum(lo, k_last - q_offset)
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, k_last - right - q_offset)
            hi = jnp.minimum(hi, k_first + left + 1 - q_offset)
        return lo.astype(jnp.int32), hi.astype(jnp.int32)

    def mask(self, q_len: int, kv_len: int) -> Array | None:
        """Every rule as one dense boolean mask ``[B, 1, T, S]`` (True = visible), or None when none is on.

        For the XLA path and for gradients computed outside a kernel.
        """
        T, S = q_len, kv_len
        q_idx = jnp.arange(T, dtype=jnp.int32)[None, :, None]
        k_idx = jnp.arange(S, dtype=jnp.int32)[None, None, :]
        mask = self.visible(self.q_offset[:, None, None] + q_idx, k_idx)
        parts = [mask]
        if self.q_len is not None:
            parts.append(q_idx < self.q_len[:, None, None])
        if self.kv_len is not None:
            parts.append(k_idx < self.kv_len[:, None, None])
        if self.q_segment_ids is not None:
            parts.append(self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :])
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return jnp.broadcast_to(out, (self.batch_size, T, S))[:, None]


jax.tree_util.register_dataclass(
    Rules,
    data_fields=["q_offset", "q_len", "kv_len", "q_segment_ids", "kv_segment_ids"],
    meta_fields=["scale", "is_causal", "window", "soft_cap", "offset_is_default", "sink_tokens"],
)
