"""Decode attention for NVIDIA GPUs: Pallas with the Triton lowering.

A few new queries per row (``T`` of 1 to 16: single-token, speculative or
chunked decoding) attend to a KV cache ``[B, S, K, H]`` that is read in place,
with per-row valid lengths. Decoding is bound by memory bandwidth, so the
kernel is built to read every needed cache byte once and no other:

* GQA packing: a program reads each K/V tile once for all ``G = N // K`` query
  heads and all ``T`` tokens of its KV head; those ``G*T`` query rows are the M
  dimension of the tile matmuls (padded to 16, the smallest Triton dot).
* Lengths bound the loop: a program visits only the tiles holding keys that
  its queries can see (`pallas_kernels.rules.Rules.kv_ranges`: length, causal,
  window, and the tiles of the sink tokens kept outside the window) and masks
  its loads at that bound, so cache memory past a row's length is never read
  and time follows the real lengths, not the capacity.
* Split-K (flash-decoding): each row's visible range is cut into
  ``num_splits`` runs of tiles handled by separate programs, which write
  float32 partial softmax statistics that a small jnp reduction combines. The
  split count is chosen from B, K, S and the SM count so that one row fills
  the GPU as well as 32 rows do.

* Quantized caches: int8 or float8_e4m3fn K/V tiles (half the bytes of
  bf16) are loaded as they are and converted in registers; the logits are
  scaled per key after ``q . k`` and the probabilities per key before
  ``p . v`` (`pallas_kernels.quantized`: float32 scales ``[B, S, K]``).
* Sink logits (`pallas_kernels.sinks`): split 0 of each row starts its
  running max and sum at the sink, as a key with no value, so the split-K
  merge counts it once.

Grid ``(B, K, row_blocks, num_splits)``. Softmax statistics are float32 and
in base 2 (``exp2``); the unnormalized probabilities are ``2**(s - m - c)``
with a static shift ``c`` (`OVERFLOW_SHIFT` when ``p . v`` runs in bfloat16 or
float32), so that the float32 accumulator of ``p . v`` stays finite for
values up to the dtype's maximum; outputs are in the input dtype; rows that
see no key give zeros. The backward pass is the flash-attention backward under the same
rules (decoding rarely differentiates; gradients are correct, not tuned).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.arguments import KERNEL_DTYPES, is_power_of_two, next_power_of_two, out_struct, row_vector
from pallas_kernels.gpu.flash_attention import flash_attention_core
from pallas_kernels.numerics import LOG2E, MASK_VALUE
from pallas_kernels.quantized import attend_dequantized, cache_vjp, check_tensors
from pallas_kernels.rules import Rules
from pallas_kernels.sinks import check_sinks

# SMs of an H100 SXM, used when no GPU reports its own count.
DEFAULT_SM_COUNT = 132
# Programs one SM is assumed to run at once; the split heuristic fills
# DEFAULT_SM_COUNT * RESIDENT_PROGRAMS_PER_SM program slots.
RESIDENT_PROGRAMS_PER_SM = 2
# Fewest splits whose last wave of programs is at least this full.
MIN_WAVE_EFFICIENCY = 0.75
# A split gets at least this many key tiles of a full-capacity row.
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 64
# Triton dots need M >= 16; query rows beyond MAX_BLOCK_ROWS go to more programs.
MIN_BLOCK_ROWS = 16
MAX_BLOCK_ROWS = 64
# Base-2 shift of the unnormalized probabilities (p <= 2**-c): the float32 sum of p * v over up to 2**31
# keys stays below 2**(128 - c + 31) * max|v| / 2**128, finite for bfloat16 and float32 values up to their
# maximum. Not used when p . v runs in float16, whose exponent would flush such small p to zero.
OVERFLOW_SHIFT = 32.0


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiling and launch parameters of the decode kernel; a field left None is picked by `default_block_sizes`.

    Attributes:
      block_k: keys per tile; a power of two >= 16.
      num_splits: programs sharing one row's visible key range (split-K).
      block_rows: packed query rows (``G*T``) per program; a power of two >= 16.
      num_warps: warps per program (1, 2, 4, 8 or 16).
      num_stages: software-pipelining depth of the tile loads (>= 1).
    """

    block_k: int | None = None
    num_splits: int | None = None
    block_rows: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, got {name}={value!r}")
        for name in ("block_k", "block_rows"):
            value = getattr(self, name)
            if value is not None and (not is_power_of_two(value) or value < 16):
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")


def gpu_sm_count() -> int:
    """Streaming multiprocessors of the first GPU, or `DEFAULT_SM_COUNT` without one."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return DEFAULT_SM_COUNT
    count = getattr(devices[0], "core_count", None)
    return int(count) if count else DEFAULT_SM_COUNT


def choose_num_splits(
    batch: int, num_kv_heads: int, kv_len: int, *, block_k: int, row_blocks: int = 1, sm_count: int | None = None
) -> int:
    """Split-K factor that fills the GPU with programs.

    Returns the fewest splits whose programs (``batch * num_kv_heads *
    row_blocks * splits``) fill ``sm_count * RESIDENT_PROGRAMS_PER_SM`` slots
    with the last wave at least `MIN_WAVE_EFFICIENCY` full, giving each split
    at least `MIN_TILES_PER_SPLIT` tiles of a full row and at most `MAX_SPLITS`.

    Args:
      batch: B.
      num_kv_heads: K.
      kv_len: cache capacity S.
      block_k: keys per tile.
      row_blocks: programs per KV head for the packed query rows.
      sm_count: SMs of the GPU; default `gpu_sm_count()`.

    Returns:
      An int in ``[1, MAX_SPLITS]``.
    """
    sm_count = gpu_sm_count() if sm_count is None else sm_count
    slots = sm_count * RESIDENT_PROGRAMS_PER_SM
    programs = batch * num_kv_heads * row_blocks
    most = max(1, min(MAX_SPLITS, kv_len // (MIN_TILES_PER_SPLIT * block_k)))
    for splits in range(1, most + 1):
        waves = programs * splits / slots
        if waves / math.ceil(waves) >= MIN_WAVE_EFFICIENCY:
            return splits
    return most


def default_block_sizes(
    batch: int,
    kv_len: int,
    num_kv_heads: int,
    num_rows: int,
    head_dim: int,
    dtype,
    *,
    num_splits: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    sm_count: int | None = None,
) -> DecodeBlockSizes:
    """The block sizes for a decode shape; given values override the table.

    Table: ``block_k`` 128 when a cache row (``H`` padded) is at most 256 bytes,
    else 64 (never above S rounded up to a power of two); ``block_rows`` the
    packed rows ``G*T`` padded to a power of two in [16, 64]; 4 warps up to 32
    rows with tiles under 128 keys, else 8; 3 pipeline stages when a K plus V tile is at most 32 KiB,
    else 2; ``num_splits`` from `choose_num_splits`.

    Args:
      batch: B.
      kv_len: cache capacity S.
      num_kv_heads: K.
      num_rows: packed query rows per KV head, ``G * T``.
      head_dim: the larger of H and Hv.
      dtype: cache dtype.
      num_splits, block_k, num_warps, num_stages: overrides (None: table).
      sm_count: SMs of the GPU; default `gpu_sm_count()`.

    Returns:
      A validated `DecodeBlockSizes`.
    """
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes = next_power_of_two(max(head_dim, 16)) * itemsize
    if block_k is None:
        block_k = min(128 if row_bytes <= 256 else 64, max(16, next_power_of_two(kv_len)))
    block_rows = min(max(next_power_of_two(num_rows), MIN_BLOCK_ROWS), MAX_BLOCK_ROWS)
    if num_warps is None:  # 8 warps measured faster on an H100 for 128-key tiles (BENCHMARKS.md)
        num_warps = 4 if block_rows <= 32 and block_k < 128 else 8
    if num_stages is None:
        num_stages = 3 if 2 * block_k * row_bytes <= 32 * 1024 else 2
    blocks = DecodeBlockSizes(
        block_k=block_k,
        num_splits=1 if num_splits is None else num_splits,
        block_rows=block_rows,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits is None:
        num_splits = choose_num_splits(
            batch, num_kv_heads, kv_len, block_k=block_k, row_blocks=-(-num_rows // block_rows), sm_count=sm_count
        )
        blocks = dataclasses.replace(blocks, num_splits=num_splits)
    return blocks


# ---------------------------------------------------------------------------
# Public wrappers.


def decode_attention(
    query,
    key_cache,
    value_cache,
    lengths,
    *,
    scale: float | None = None,
    is_causal: bool = True,
    query_offset=None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    num_sink_tokens: int = 0,
    key_scale=None,
    value_scale=None,
    sinks=None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool = False,
):
    """Attention of a few new queries to a KV cache with per-row lengths.

    Semantics are those of `gqa_jax.dot_product_attention` with
    ``key_value_seq_lengths=lengths`` (rules validated by
    `pallas_kernels.rules.Rules.create`): query head ``n`` reads KV head
    ``n // G``; query ``t`` of row ``b`` sits at position ``lengths[b] - T + t``
    (the newest ``T`` tokens) unless ``query_offset`` says otherwise; keys
    ``s < lengths[b]`` are valid; a row of length 0 gives zeros. Memory past a
    row's length is never read.

    Args:
      query: ``[B, T, N, H]``; T is small (1 to 16), larger T works but packs
        ``G*T`` rows per KV head into more programs.
      key_cache: ``[B, S, K, H]`` with ``N % K == 0``, same dtype as query
        (bfloat16, float16 or float32), or int8 / float8_e4m3fn with
        ``key_scale`` (a quantized cache).
      value_cache: ``[B, S, K, Hv]``, the key cache's dtype.
      lengths: int scalar or ``[B]`` valid keys per row, in ``[0, S]``.
      scale: logit scale; default ``1 / sqrt(H)``.
      is_causal: queries see keys at positions ``<=`` their own.
      query_offset: optional int scalar or ``[B]`` position of each row's
        first query; default ``lengths - T``.
      local_window_size: int or ``(left, right)``: a query at position ``p``
        sees keys in ``[p - left, p + right]``.
      logits_soft_cap: ``cap * tanh(logits / cap)`` on the scaled logits.
      num_sink_tokens: keys at positions below it stay visible outside the
        window (StreamingLLM; needs ``local_window_size``).
      key_scale: float ``[B, S, K]`` scales of a quantized key cache: key
        ``s`` is ``key_cache[b, s, k] * key_scale[b, s, k]``.
      value_scale: float ``[B, S, K]`` scales of a quantized value cache.
      sinks: optional float ``[N]`` sink logit per query head
        (`pallas_kernels.sinks`); differentiable.
      block_sizes: tuning overrides; fields left None are picked by
        `default_block_sizes`.
      interpret: run the kernel in the Pallas interpreter (CPU).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype. Differentiable (flash backward;
      a quantized cache gets gradients for its scales only).

    Raises:
      ValueError, TypeError: for inconsistent shapes, dtypes or rules.

    Example::

        q_BTNH = jnp.ones((2, 1, 8, 64), jnp.float16)                 # one new token, N=8
        key_cache = value_cache = jnp.ones((2, 256, 2, 64), jnp.float16)  # [B, S, K, H]
        out = decode_attention(q_BTNH, key_cache, value_cache, jnp.array([200, 7]),
                               interpret=jax.default_backend() != "gpu")  # [2, 1, 8, 64]
    """
    query, key_cache, value_cache = jnp.asarray(query), jnp.asarray(key_cache), jnp.asarray(value_cache)
    key_scale, value_scale = check_tensors(query, key_cache, value_cache, key_scale, value_scale,
                                           names=("query", "key_cache", "value_cache"), dtypes=KERNEL_DTYPES)
    rules = Rules.create(
        query, key_cache, scale=scale, is_causal=is_causal, query_offset=query_offset,
        key_value_seq_lengths=row_vector("lengths", lengths, query.shape[0]), local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap, num_sink_tokens=num_sink_tokens,
    )
    return decode_attention_core(query, key_cache, value_cache, rules, key_scale=key_scale, value_scale=value_scale,
                                 sinks=check_sinks(sinks, query.shape[2]), block_sizes=block_sizes,
                                 interpret=interpret)


def decode_attention_core(query, key_cache, value_cache, rules: Rules, *, key_scale=None, value_scale=None,
                          sinks=None, block_sizes: DecodeBlockSizes | None = None, interpret: bool = False):
    """`decode_attention` on checked inputs: ``rules`` from `Rules.create` (no query lengths or segments).

    Args:
      query: ``[B, T, N, H]``.
      key_cache: ``[B, S, K, H]``.
      value_cache: ``[B, S, K, Hv]``.
      rules: the validated rules; ``kv_len`` None means every row holds ``S`` keys.
      key_scale, value_scale: float32 ``[B, S, K]`` for a quantized cache, else None.
      sinks: None or float32 ``[N]`` sink logits (`pallas_kernels.sinks.check_sinks`).
      block_sizes: tuning overrides, as in `decode_attention`.
      interpret: run the kernel in the Pallas interpreter (CPU).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype.
    """
    if rules.q_len is not None or rules.has_segments:
        raise ValueError("decode_attention serves neither query_seq_lengths nor segment ids; use flash_attention")
    B, T, N, H = query.shape
    _, S, K, Hv = value_cache.shape
    overrides = block_sizes or DecodeBlockSizes()
    blocks = default_block_sizes(
        B, S, K, T * (N // K), max(H, Hv), key_cache.dtype, num_splits=overrides.num_splits,
        block_k=overrides.block_k, num_warps=overrides.num_warps, num_stages=overrides.num_stages,
    )
    if overrides.block_rows is not None:
        blocks = dataclasses.replace(blocks, block_rows=overrides.block_rows)
    flat_size = blocks.num_splits * B * T * N * max(H, Hv)
    if flat_size >= 2**31:
        raise ValueError(
            f"num_splits * B*T*N * max(H, Hv) = {flat_size} must be < 2**31 (int32 offsets), got "
            f"num_splits={blocks.num_splits}, {query.shape=}, {value_cache.shape=}"
        )
    lengths = jnp.clip(rules.lengths(T, S)[1], 0, S)
    return _decode(query, key_cache, value_cache, dataclasses.replace(rules, kv_len=lengths), key_scale, value_scale,
                   sinks, rules.statics(), blocks, bool(interpret))


# ---------------------------------------------------------------------------
# Differentiable core.


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _decode(query, key_cache, value_cache, rules: Rules, key_scale, value_scale, sinks, statics: Rules,
            blocks: DecodeBlockSizes, interpret: bool):
    return _decode_forward(query, key_cache, value_cache, rules, key_scale, value_scale, sinks, statics, blocks,
                           interpret)


def _decode_fwd(query, key_cache, value_cache, rules, key_scale, value_scale, sinks, statics, blocks, interpret):
    out = _decode_forward(query, key_cache, value_cache, rules, key_scale, value_scale, sinks, statics, blocks,
                          interpret)
    return out, (query, key_cache, value_cache, rules, key_scale, value_scale, sinks)


def _decode_bwd(statics, blocks, interpret, residuals, d_out):
    """The flash-attention backward under the same rules (lengths, offsets, window, soft-cap, sinks).

    A quantized cache is dequantized (float32) for it; its integer or float8
    values get no gradient, its scales get ``sum_h d(dequantized) * values``
    (`pallas_kernels.quantized.cache_vjp`).
    """
    query, key_cache, value_cache, rules, key_scale, value_scale, sinks = residuals

    def flash(q, k, v, sinks):
        return flash_attention_core(q, k, v, rules, sinks=sinks, interpret=interpret)

    d_query, d_key, d_value, d_key_scale, d_value_scale, d_sinks = cache_vjp(
        functools.partial(attend_dequantized, flash), query, key_cache, value_cache, key_scale, value_scale, d_out,
        sinks)
    return d_query, d_key, d_value, None, d_key_scale, d_value_scale, d_sinks


_decode.defvjp(_decode_fwd, _decode_bwd)


# ---------------------------------------------------------------------------
# pallas_call builder and the split-K merge.


def _products_dtype(query_dtype, cache_dtype) -> jnp.dtype:
    """The dtype of the tile products: the cache's, or for a quantized cache float32 (float32 queries) or bfloat16.

    Quantized tiles convert exactly to both; bfloat16 rather than float16
    because scaled values may exceed float16's range.
    """
    if jnp.dtype(cache_dtype) in KERNEL_DTYPES:
        return jnp.dtype(cache_dtype)
    return jnp.dtype(jnp.float32) if query_dtype == jnp.float32 else jnp.dtype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("statics", "blocks", "interpret"))
def _decode_forward(query, key_cache, value_cache, rules: Rules, key_scale, value_scale, sinks, statics: Rules,
                    blocks: DecodeBlockSizes, interpret: bool):
    B, T, N, H = query.shape
    _, S, K, Hv = value_cache.shape
    in_specs = [
        row_spec(),
        row_spec(),
        whole_spec(B * T * N * H),
        pl.BlockSpec((None, S, None, next_power_of_two(max(H, 16))), lambda b, k, r, s: (b, 0, k, 0)),
        pl.BlockSpec((None, S, None, next_power_of_two(max(Hv, 16))), lambda b, k, r, s: (b, 0, k, 0)),
    ]
    quantized = key_scale is not None
    if quantized:
        in_specs += [pl.BlockSpec((None, S, None), lambda b, k, r, s: (b, 0, k))] * 2
    if sinks is not None:
        in_specs.append(whole_spec(N))
    kernel = functools.partial(_decode_kernel, quantized=quantized, has_sinks=sinks is not None,
                               **program_statics(query, value_cache, statics, blocks))
    return split_k_call(
        kernel, in_specs,
        (rules.kv_len, rules.q_offset, query.reshape(-1), key_cache, value_cache,
         *((key_scale, value_scale) if quantized else ()), *(() if sinks is None else (sinks,))),
        query=query, value=value_cache, blocks=blocks, interpret=interpret, name="gqa_decode_attention",
        varying=(rules, query, key_cache, value_cache, key_scale, value_scale, sinks))


def row_spec() -> pl.BlockSpec:
    """The block of a ``[B]`` operand of a split-K decode kernel: this program's batch row (a scalar)."""
    return pl.BlockSpec((None,), lambda b, k, r, s: (b,))


def whole_spec(size: int) -> pl.BlockSpec:
    """The block of a flat ``[size]`` operand or output of a split-K decode kernel: all of it."""
    return pl.BlockSpec((size,), lambda b, k, r, s: (0,))


def program_statics(query, value, statics: Rules, blocks: DecodeBlockSizes) -> dict:
    """The static keywords of `decode_program` for a call with ``query [B,T,N,H]`` and a ``value`` cache or pool
    ``[..., K, Hv]`` (its dtype picks the products' dtype)."""
    _, T, N, H = query.shape
    K, Hv = value.shape[-2:]
    return dict(rules=statics, q_len=T, num_heads=N, group=N // K, head_dim=H, value_head_dim=Hv, blocks=blocks,
                products_dtype=_products_dtype(query.dtype, value.dtype))


def split_k_call(kernel, in_specs, operands, *, query, value, blocks: DecodeBlockSizes, interpret: bool, name: str,
                 varying=()):
    """Runs a split-K decode kernel (`decode_program`) and merges its splits: ``[B, T, N, Hv]`` in the query dtype.

    Grid ``(B, K, row_blocks, num_splits)``; one split writes the output, more
    write float32 partials that `_combine_splits` merges.

    Args:
      kernel: the kernel body, its statics bound.
      in_specs: the block specs of ``operands``.
      operands: the kernel's inputs.
      query: ``[B, T, N, H]``.
      value: the value cache or pool ``[..., K, Hv]``.
      blocks: the tiling.
      interpret: run in the Pallas interpreter.
      name: the kernel's name.
      varying: what the outputs vary with under ``shard_map`` (`out_struct`).
    """
    B, T, N, _ = query.shape
    K, Hv = value.shape[-2:]
    splits, tokens = blocks.num_splits, B * T * N
    if splits == 1:
        out_shape = [out_struct((tokens * Hv,), query.dtype, varying)]
    else:
        out_shape = [
            out_struct((splits * tokens * Hv,), jnp.float32, varying),
            out_struct((splits * tokens,), jnp.float32, varying),
            out_struct((splits * tokens,), jnp.float32, varying),
        ]
    results = pl.pallas_call(
        kernel,
        grid=(B, K, -(-T * (N // K) // blocks.block_rows), splits),
        in_specs=in_specs,
        out_specs=[whole_spec(x.shape[0]) for x in out_shape],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)
    if splits == 1:
        return results[0].reshape(B, T, N, Hv)
    acc, m, l = results
    out = _combine_splits(acc.reshape(splits, B, T, N, Hv), m.reshape(splits, B, T, N), l.reshape(splits, B, T, N))
    return out.astype(query.dtype)


def _combine_splits(acc, m, l):
    """Merges per-split partials ``acc [splits,B,T,N,Hv]``, ``m, l [splits,B,T,N]`` (base 2).

    Splits that saw no key hold ``m = MASK_VALUE``, ``l = 0``, ``acc = 0`` and
    get zero weight; a row that no split saw gives zeros.
    """
    m_max = jnp.max(m, axis=0)
    weight = jnp.exp2(m - m_max)
    total = jnp.sum(weight * l, axis=0)
    out = jnp.sum(weight[..., None] * acc, axis=0)
    return out / jnp.where(total == 0.0, 1.0, total)[..., None]


# ---------------------------------------------------------------------------
# Kernel body.


def _decode_kernel(
    lengths_ref,  # [] keys of this row (clamped to S)
    offsets_ref,  # [] position of this row's first query
    q_ref,  # [B*T*N*H] the whole query, flat
    k_ref,  # [S, Hp] this row's key cache of one KV head
    v_ref,  # [S, Hvp]
    *refs,  # quantized: key and value scales [S]; with sinks: the sink logits [N]; then the outputs:
    # (out [B*T*N*Hv],) or (acc [splits*B*T*N*Hv], m [splits*B*T*N], l [splits*B*T*N]), flat
    quantized: bool,
    has_sinks: bool,
    **statics,
):
    (k_scale_ref, v_scale_ref), refs = (refs[:2], refs[2:]) if quantized else ((None, None), refs)
    sink_ref, out_refs = (refs[0], refs[1:]) if has_sinks else (None, refs)
    block_k = statics["blocks"].block_k

    def tile_rows(tile, k_start, k_pos, in_range):
        return pl.ds(k_start, block_k)

    decode_program(q_ref, k_ref, v_ref, k_scale_ref, v_scale_ref, sink_ref, out_refs, lengths_ref[()], offsets_ref[()],
                   tile_rows, **statics)


def decode_program(q_ref, k_ref, v_ref, k_scale_ref, v_scale_ref, sink_ref, out_refs, length, offset, tile_rows, *,
                   rules: Rules, q_len: int, num_heads: int, group: int, head_dim: int, value_head_dim: int,
                   blocks: DecodeBlockSizes, products_dtype: jnp.dtype):
    """One program of the split-K decode kernels, dense (`_decode_kernel`) and paged.

    Grid ``(B, K, row_blocks, num_splits)``: the program attends the packed
    query rows ``row_block`` of KV head ``kv_head`` of row ``batch_row`` to
    its split's run of the visited key tiles, and writes the output (one
    split) or its float32 partials ``acc, m, l`` for `_combine_splits`.

    Args:
      q_ref: ``[B*T*N*H]`` the whole query, flat.
      k_ref, v_ref: ``[R, Hp]`` and ``[R, Hvp]`` rows of one KV head's keys and values.
      k_scale_ref, v_scale_ref: ``[R]`` their scales (a quantized cache), or None.
      sink_ref: ``[N]`` sink logits, or None.
      out_refs: ``(out,)`` or ``(acc, m, l)``, flat.
      length, offset: this row's valid keys (clamped to the cache) and first query position.
      tile_rows: ``(tile, k_start, k_pos, in_range) -> rows``: where key tile ``tile`` (keys
        ``k_pos = k_start + [0, block_k)``) lies in ``k_ref``: a `pl.ds` of ``block_k``
        contiguous rows, or their int32 ``[block_k]`` row ids (`_load_rows`).
    """
    shift = probability_shift(products_dtype)
    quantized = k_scale_ref is not None
    block_rows, block_k, num_splits = blocks.block_rows, blocks.block_k, blocks.num_splits
    batch_row, kv_head, row_block, split = (pl.program_id(axis) for axis in range(4))

    # Packed query rows of this KV head, t-major: row = t * G + g reads head kv_head * G + g.
    num_rows = q_len * group
    first_row = row_block * block_rows
    rows = first_row + jnp.arange(block_rows, dtype=jnp.int32)
    t = lax.div(rows, group)
    real = rows < num_rows
    token = (batch_row * q_len + t) * num_heads + kv_head * group + rows - t * group  # flat (b, t, n)
    q_pos = offset + t
    last_row = jnp.minimum(first_row + block_rows, num_rows) - 1
    first_tile, num_tiles, tile_of, hi = _visited_tiles(
        rules, offset + lax.div(first_row, group), offset + lax.div(last_row, group), length, block_k)
    # This split's run of the visited tiles.
    per_split = lax.div(num_tiles + num_splits - 1, num_splits)
    start = first_tile + split * per_split
    stop = jnp.minimum(start + per_split, first_tile + num_tiles)

    q_offsets, q_mask = _row_offsets(0, token, head_dim, real)
    q = plgpu.load(q_ref.at[q_offsets], mask=q_mask, other=0.0).astype(products_dtype)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        tile = tile_of(i)
        k_start = tile * block_k
        k_pos = k_start + jnp.arange(block_k, dtype=jnp.int32)
        in_range = k_pos < hi
        key_rows = tile_rows(tile, k_start, k_pos, in_range)
        k = _convert(_load_rows(k_ref, key_rows, in_range, head_dim), products_dtype)
        qk = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if quantized:  # dequantized keys: q . (k * scale) = (q . k) * scale
            qk = qk * plgpu.load(k_scale_ref.at[key_rows], mask=in_range, other=0.0)[None, :]
        s = _base2_logits(qk, rules.scale, rules.soft_cap)
        mask = in_range[None, :]
        rule = rules.visible(q_pos[:, None], k_pos[None, :])
        if rule is not None:
            mask = mask & rule
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(s - (m_next[:, None] + shift)), 0.0)
        v = _convert(_load_rows(v_ref, key_rows, in_range, value_head_dim), products_dtype)
        v_scale = plgpu.load(v_scale_ref.at[key_rows], mask=in_range, other=0.0) if quantized else None
        pv = _value_product(p, v, v_scale, products_dtype)
        return acc * correction[:, None] + pv, m_next, l_prev * correction + jnp.sum(p, axis=1)

    m, l = jnp.full((block_rows,), MASK_VALUE, jnp.float32), jnp.zeros((block_rows,), jnp.float32)
    if sink_ref is not None:  # the sink: one key with no value, in split 0 only (the merge adds the splits)
        head = kv_head * group + rows - t * group
        sink = plgpu.load(sink_ref.at[head], mask=real, other=0.0) * LOG2E
        first = split == 0
        m = jnp.where(first, jnp.maximum(sink, MASK_VALUE), m)
        l = jnp.where(first, jnp.exp2(sink - (m + shift)), l)
    init = (jnp.zeros((block_rows, v_ref.shape[-1]), jnp.float32), m, l)
    acc, m, l = lax.fori_loop(start, stop, body, init)

    if num_splits == 1:
        (out_ref,) = out_refs
        out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
        _store(out_ref, *_row_offsets(0, token, value_head_dim, real), out.astype(out_ref.dtype))
    else:
        acc_ref, m_ref, l_ref = out_refs
        split_base = split * (m_ref.shape[0] // num_splits)  # B*T*N tokens per split
        _store(acc_ref, *_row_offsets(split_base * value_head_dim, token, value_head_dim, real), acc)
        _store(m_ref, split_base + token, real, m)
        _store(l_ref, split_base + token, real, l)


# ---------------------------------------------------------------------------
# Tile helpers.


def _visited_tiles(rules: Rules, q_first, q_last, length, block_k: int):
    """The key tiles a program visits: ``(first, count, tile_of, bound)``.

    Visit ``i`` in ``[first, first + count)`` reads tile ``tile_of(i)``; keys
    at ``bound`` and past it are never loaded. Without sink tokens the tiles
    covering `Rules.kv_range`; with them, the sink tokens' tiles and then the
    window's (`Rules.kv_ranges`), skipping the tiles between.
    """
    if not rules.sink_tokens:
        lo, hi = rules.kv_range(q_first, q_last, length)
        first = lax.div(lo, block_k)
        return first, jnp.where(hi > lo, lax.div(hi + block_k - 1, block_k) - first, 0), lambda i: i, hi
    sink_end, lo, hi = rules.kv_ranges(q_first, q_last, length)
    sink_tiles = lax.div(sink_end + block_k - 1, block_k)
    window_first = jnp.maximum(lax.div(lo, block_k), sink_tiles)
    window_tiles = jnp.where(hi > lo, jnp.maximum(lax.div(hi + block_k - 1, block_k) - window_first, 0), 0)
    return (jnp.zeros((), jnp.int32), sink_tiles + window_tiles,
            lambda i: jnp.where(i < sink_tiles, i, window_first + i - sink_tiles), jnp.maximum(hi, sink_end))


def _base2_logits(qk, scale: float, soft_cap: float | None):
    """``cap * tanh(scale * qk / cap)`` (or ``scale * qk``) in base-2 units."""
    if soft_cap is None:
        return qk * (scale * LOG2E)
    return jnp.tanh(qk * (scale / soft_cap)) * (soft_cap * LOG2E)


def probability_shift(products_dtype) -> float:
    """The static base-2 shift of the unnormalized probabilities: `OVERFLOW_SHIFT`, or 0 for float16 products."""
    return 0.0 if products_dtype == jnp.float16 else OVERFLOW_SHIFT


def _value_product(p, v, v_scale, products_dtype):
    """``p . v`` in float32 for probabilities ``p [rows, block_k]`` and a value tile ``v [block_k, Hv]``.

    With ``v_scale [block_k]`` (a quantized tile, converted by `_convert`) the
    values are dequantized through the probabilities: ``p . (v * scale) =
    (p * scale) . v``.
    """
    weights = p if v_scale is None else p * v_scale[None, :]
    return lax.dot_general(weights.astype(products_dtype), v, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _convert(tile, dtype):
    """A loaded tile in ``dtype``; float8 goes through float16 (exact; the conversion the hardware has)."""
    if tile.dtype == dtype:
        return tile
    if jnp.issubdtype(tile.dtype, jnp.floating) and tile.dtype.itemsize == 1:
        tile = tile.astype(jnp.float16)
    return tile.astype(dtype)


def _load_tile(ref, start, block_k: int, in_range, width: int):
    """Rows ``[start, start + block_k)`` of a ``[S, width_padded]`` ref, zero past the bound."""
    width_padded = ref.shape[-1]
    mask = in_range[:, None]
    if width != width_padded:
        mask = mask & (jnp.arange(width_padded, dtype=jnp.int32) < width)[None, :]
    return plgpu.load(ref.at[pl.ds(start, block_k), :], mask=mask, other=0.0)


def _load_rows(ref, rows, in_range, width: int):
    """Rows of a ``[R, width_padded]`` ref, zero off ``in_range`` and past ``width``: ``rows`` is a `pl.ds` of
    ``block_k`` contiguous rows (`_load_tile`) or their int32 ``[block_k]`` ids (a gather)."""
    if isinstance(rows, pl.Slice):
        return _load_tile(ref, rows.start, rows.size, in_range, width)
    columns = jnp.arange(ref.shape[-1], dtype=jnp.int32)
    mask = in_range[:, None]
    if width != ref.shape[-1]:
        mask = mask & (columns < width)[None, :]
    return plgpu.load(ref.at[rows[:, None], columns[None, :]], mask=mask, other=0.0)


def _row_offsets(base, token, width: int, real):
    """Flat offsets ``base + token * width + column`` of ``[rows, width_padded]`` and their mask."""
    width_padded = next_power_of_two(max(width, 16))
    columns = jnp.arange(width_padded, dtype=jnp.int32)
    offsets = base + token[:, None] * width + columns[None, :]
    return offsets, real[:, None] & (columns < width)[None, :]


def _store(ref, offsets, mask, value):
    """Masked scatter into a flat ref. Masked lanes point past the end: never written."""
    plgpu.store(ref.at[jnp.where(mask, offsets, ref.shape[0])], value, mask=mask)
