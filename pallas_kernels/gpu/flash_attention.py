"""Flash attention for NVIDIA GPUs in Pallas (Triton lowering), forward and backward.

Layout ``query [B,T,N,H]``, ``key [B,S,K,H]``, ``value [B,S,K,Hv]``, output
``[B,T,N,Hv]``, with native grouped-query attention: query head ``n`` reads the
tiles of key/value head ``n // G`` in place (K/V are never repeated), and the
backward accumulates dK/dV of a key/value head over its ``G`` query heads in
registers.

Masks are rules (`pallas_kernels.rules.Rules`), never dense ``[T,S]`` arrays:
causal with per-row query offsets, query and key lengths, segment ids, a
sliding window (with sink tokens kept visible outside it), and a logit
soft-cap; an optional dense bias and optional sink logits per query head
(`pallas_kernels.sinks`: the running max and sum start at the sink). Key tiles
a query tile cannot see are not visited (with sink tokens: the tiles holding
them, then the window's), and tiles every query sees are computed
without any mask arithmetic. Rows that see no key give zeros, and zero
gradients.

Any sequence lengths work (the wrapper pads to the tile sizes and masks the
padding by lengths); head dims are padded to a power of two. Softmax statistics
and accumulators are float32; the exponent runs in base 2, with ``log2(e)``
folded into the scale without a bias and applied after the max is subtracted
with one (`_Softmax`, `pallas_kernels.numerics`): finite biases of any size
act as biases, and the accumulator of ``p @ v`` cannot overflow.

Kernels: ``gqa_flash_forward`` (grid ``(N, B, T/block_q)``, query tiles of the
causal diagonal first), ``gqa_flash_dkdv`` (grid ``(K, B, S/block_k)``, loops
over the ``G`` query heads and the visible query tiles) and ``gqa_flash_dq``
(grid ``(N, B, T/block_q)``). The bias gradient, when a bias is given, is
computed by XLA from the kernel's softmax statistics (and dropped by XLA when
unused), and so is the sinks' gradient. `flash_backward` runs the two backward
kernels from an external forward's output and log-sum-exp (the Mosaic-GPU
forward uses it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.arguments import check_bias, check_qkv, is_power_of_two, next_power_of_two, out_struct, pad_axis
from pallas_kernels.numerics import DEAD_LSE, LN2, LOG2E, LOWEST, prob_shift
from pallas_kernels.residuals import forward_only, from_base2
from pallas_kernels.rules import Rules
from pallas_kernels.sinks import check_sinks, sink_gradient

MIN_BLOCK = 16  # the smallest tile side tl.dot takes


def _fit(block: int, length: int) -> int:
    """Shrinks a tile side to the smallest power of two covering ``length`` (>= 16)."""
    return max(MIN_BLOCK, min(block, next_power_of_two(length)))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters of the three kernels.

    Attributes:
      block_q: query tile of the forward kernel.
      block_k: key tile of the forward kernel.
      block_q_dkv: query tile of the dK/dV kernel.
      block_k_dkv: key tile of the dK/dV kernel.
      block_q_dq: query tile of the dQ kernel.
      block_k_dq: key tile of the dQ kernel.
      num_warps: warps per program, forward.
      num_stages: software-pipelining depth, forward.
      num_warps_bwd: warps per program, backward kernels.
      num_stages_bwd: software-pipelining depth, backward kernels.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
            value = getattr(self, name)
            if not isinstance(value, int) or not is_power_of_two(value) or value < MIN_BLOCK:
                raise ValueError(f"{name}={value!r} must be a power of two >= {MIN_BLOCK}")
        for name in ("num_warps", "num_warps_bwd"):
            value = getattr(self, name)
            if value not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name}={value!r} must be one of 1, 2, 4, 8, 16")
        for name in ("num_stages", "num_stages_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "BlockSizes":
        """Defaults tuned on an H100 (see BENCHMARKS.md) for a padded head dim."""
        if head_dim <= 64:
            return cls(block_q=64, block_k=64, num_warps=4, num_stages=3,
                       block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64, num_warps_bwd=4, num_stages_bwd=2)
        if head_dim <= 128:
            return cls(block_q=128, block_k=128, num_warps=8, num_stages=3,
                       block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64, num_warps_bwd=4, num_stages_bwd=2)
        return cls(block_q=64, block_k=32, num_warps=4, num_stages=2,
                   block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32, num_warps_bwd=8)

    def fit(self, q_len: int, kv_len: int) -> "BlockSizes":
        """Shrinks tiles that are longer than the sequences they tile."""
        return dataclasses.replace(
            self,
            block_q=_fit(self.block_q, q_len),
            block_k=_fit(self.block_k, kv_len),
            block_q_dkv=_fit(self.block_q_dkv, q_len),
            block_k_dkv=_fit(self.block_k_dkv, kv_len),
            block_q_dq=_fit(self.block_q_dq, q_len),
            block_k_dq=_fit(self.block_k_dq, kv_len),
        )


# ---------------------------------------------------------------------------
# Public wrappers.


def flash_attention(
    query,
    key,
    value,
    *,
    bias=None,
    scale: float | None = None,
    is_causal: bool = False,
    query_offset=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    num_sink_tokens: int = 0,
    sinks=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    return_residuals: bool = False,
):
    """Flash attention with grouped key/value heads on NVIDIA GPUs (Pallas, Triton).

    Semantics are those of `gqa_jax.dot_product_attention` (positions, default
    offsets, masks, soft-cap before bias, zeros for rows with no visible key);
    the rules are validated by `pallas_kernels.rules.Rules.create`.

    Args:
      query: ``[B, T, N, H]`` (bf16, fp16 or fp32).
      key: ``[B, S, K, H]`` with ``N % K == 0``.
      value: ``[B, S, K, Hv]``.
      bias: optional float bias ``[T,S]``, ``[B,T,S]`` or ``[B|1, N|1, T|1, S|1]``.
      scale: logit scale, default ``1/sqrt(H)``.
      is_causal: keys at positions up to the query's own.
      query_offset: int or int ``[B]``: position of query 0 of each row.
      query_seq_lengths: int ``[B]`` valid queries (the rest output zeros).
      key_value_seq_lengths: int ``[B]`` valid keys.
      q_segment_ids: int ``[B, T]``.
      kv_segment_ids: int ``[B, S]``.
      local_window_size: int or ``(left, right)``.
      logits_soft_cap: ``cap * tanh(logits / cap)``.
      num_sink_tokens: keys at positions below it stay visible outside the
        window (needs ``local_window_size``).
      sinks: optional float ``[N]`` sink logit per query head
        (`pallas_kernels.sinks`); differentiable.
      block_sizes: tiles and launch parameters; default per head dim.
      interpret: run the kernels in Pallas interpret mode (CPU).
      return_residuals: also return the log-sum-exp (`pallas_kernels.residuals`:
        natural log, float32 ``[B, N, T]``, ``-inf`` for rows that see no key);
        forward only, not with ``sinks``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, or ``(out, lse)``.

    Raises:
      ValueError, TypeError: for inconsistent shapes, dtypes or rules.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    check_qkv(query, key, value)
    rules = Rules.create(
        query, key, scale=scale, is_causal=is_causal, query_offset=query_offset,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap, num_sink_tokens=num_sink_tokens,
    )
    B, T, N, _ = query.shape
    if bias is not None:
        bias = check_bias("bias", bias, B, N, T, key.shape[1])
    return flash_attention_core(query, key, value, rules, bias=bias, sinks=check_sinks(sinks, N),
                                block_sizes=block_sizes, interpret=interpret, return_residuals=return_residuals)


def flash_attention_core(query, key, value, rules: Rules, *, bias=None, sinks=None,
                         block_sizes: BlockSizes | None = None, interpret: bool = False,
                         return_residuals: bool = False):
    """`flash_attention` on inputs already checked: ``rules`` from `Rules.create`, bias rank 4.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      rules: the validated rules of the call.
      bias: None or float ``[B|1, N|1, T|1, S|1]``.
      sinks: None or float32 ``[N]`` sink logits (`pallas_kernels.sinks.check_sinks`).
      block_sizes: tiles and launch parameters; default per head dim.
      interpret: run the kernels in Pallas interpret mode (CPU).
      return_residuals: also return the natural log-sum-exp ``[B, N, T]`` (forward only).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, or ``(out, lse)``.

    Raises:
      ValueError: for ``return_residuals`` with ``sinks`` (partial results
        merged by their lse would count the sink once per part).
    """
    T, Hv = query.shape[1], value.shape[-1]
    layout = _Layout.of(query, key, value, block_sizes)
    q, k, v, bias, padded_rules = layout.pad(query, key, value, bias, rules)
    if return_residuals:
        if sinks is not None:
            raise ValueError("return_residuals=True does not take sinks: merged partial results would count the "
                             "sink once per part; add the sink after merging")
        q, k, v, bias = forward_only((q, k, v, bias))
        out, stats = _forward(padded_rules.statics(), layout.blocks, interpret, padded_rules, q, k, v, bias, None)
        return out[:, :T, :, :Hv], _natural_lse(stats)[:, :, :T]
    out = _flash(padded_rules.statics(), layout.blocks, interpret, padded_rules, q, k, v, bias, sinks)
    return out[:, :T, :, :Hv]


def flash_backward(query, key, value, out, lse, d_out, rules: Rules, *, bias=None,
                   block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Gradients of flash attention from a forward's output and base-2 log-sum-exp.

    For forward kernels that share this file's conventions (`pallas_kernels.numerics`):
    ``lse[b, n, t] = log2(sum_s exp2(logits2))`` of the base-2 logits, and
    `DEAD_LSE` for rows that see no key. With a bias the backward kernels take
    the natural pair ``(max, log of the row sum)`` (`pallas_kernels.numerics`);
    here it is made from ``lse``, exact while ``|lse|`` is far from
    ``finfo.max`` (this file's own forward keeps the pair itself).

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      out: ``[B, T, N, Hv]`` forward output.
      lse: float32 ``[B, N, T]``.
      d_out: ``[B, T, N, Hv]`` cotangent of ``out``.
      rules: the validated rules of the forward.
      bias: None or float ``[B|1, N|1, T|1, S|1]``.
      block_sizes: tiles of the backward kernels; default per head dim.
      interpret: run the kernels in Pallas interpret mode (CPU).

    Returns:
      ``(dq, dk, dv, dbias)``, ``dbias`` None without a bias.
    """
    B, T, N, H = query.shape
    S, Hv = key.shape[1], value.shape[-1]
    layout = _Layout.of(query, key, value, block_sizes)
    q, k, v, bias_p, padded_rules = layout.pad(query, key, value, bias, rules)
    out_p = pad_axis(pad_axis(out, 1, layout.T_pad), 3, layout.Hv_pad)
    do_p = pad_axis(pad_axis(d_out, 1, layout.T_pad), 3, layout.Hv_pad)
    lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, layout.T_pad - T)), constant_values=DEAD_LSE)
    stats = (lse_p, None)
    if bias is not None:
        dead = lse_p >= 0.5 * DEAD_LSE
        stats = (jnp.where(dead, jnp.inf, lse_p * LN2), jnp.where(dead, jnp.inf, 0.0))
    dq, dk, dv, dbias, _ = _backward(padded_rules.statics(), layout.blocks, interpret, padded_rules, q, k, v, bias_p,
                                     None, out_p, stats, do_p)
    if dbias is not None:
        dbias = dbias[:, :, :T, :S]
        for axis in (2, 3):
            if bias.shape[axis] == 1:
                dbias = jnp.sum(dbias, axis=axis, keepdims=True)
    return dq[:, :T, :, :H], dk[:, :S, :, :H], dv[:, :S, :, :Hv], dbias


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Tiles and padded sizes of one call."""

    blocks: BlockSizes
    T: int
    S: int
    T_pad: int
    S_pad: int
    H_pad: int
    Hv_pad: int

    @classmethod
    def of(cls, query, key, value, block_sizes: BlockSizes | None) -> "_Layout":
        T, H, S, Hv = query.shape[1], query.shape[3], key.shape[1], value.shape[3]
        blocks = (block_sizes or BlockSizes.for_head_dim(next_power_of_two(max(H, Hv)))).fit(T, S)
        q_mult = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
        k_mult = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
        return cls(blocks, T, S, pl.cdiv(T, q_mult) * q_mult, pl.cdiv(S, k_mult) * k_mult,
                   max(MIN_BLOCK, next_power_of_two(H)), max(MIN_BLOCK, next_power_of_two(Hv)))

    def pad(self, query, key, value, bias, rules: Rules):
        """Zero-padded ``(q, k, v, bias [B|1, N|1, T_pad, S_pad], rules)``."""
        q = pad_axis(pad_axis(query, 1, self.T_pad), 3, self.H_pad)
        k = pad_axis(pad_axis(key, 1, self.S_pad), 3, self.H_pad)
        v = pad_axis(pad_axis(value, 1, self.S_pad), 3, self.Hv_pad)
        if bias is not None:
            bias = jnp.broadcast_to(bias, bias.shape[:2] + (self.T, self.S))
            bias = pad_axis(pad_axis(bias, 2, self.T_pad), 3, self.S_pad)
        padded = rules.padded(self.T, self.S, self.T_pad, self.S_pad)
        # Keys past S are padding whatever the lengths say (under jit they are not checked).
        padded = dataclasses.replace(padded, kv_len=jnp.minimum(padded.kv_len, self.S))
        return q, k, v, bias, padded


# ---------------------------------------------------------------------------
# Differentiable core on padded inputs.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(statics: Rules, blocks: BlockSizes, interpret, rules: Rules, q, k, v, bias, sinks):
    out, _ = _forward(statics, blocks, interpret, rules, q, k, v, bias, sinks)
    return out


def _flash_fwd(statics, blocks, interpret, rules, q, k, v, bias, sinks):
    out, stats = _forward(statics, blocks, interpret, rules, q, k, v, bias, sinks)
    return out, (rules, q, k, v, bias, sinks, out, stats)


def _flash_bwd(statics, blocks, interpret, residuals, do):
    rules, q, k, v, bias, sinks, out, stats = residuals
    dq, dk, dv, dbias, dsinks = _backward(statics, blocks, interpret, rules, q, k, v, bias, sinks, out, stats, do)
    return None, dq, dk, dv, dbias, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


def _natural_lse(stats):
    """The residual lse (natural, ``-inf`` for dead rows) from the row statistics of `_Softmax.finish`."""
    lse, r = stats
    if r is None:
        return from_base2(lse)
    return jnp.where(jnp.isposinf(lse), -jnp.inf, lse + r * LN2)


def _backward(statics: Rules, blocks: BlockSizes, interpret, rules: Rules, q, k, v, bias, sinks, out, stats, do):
    """``(dq, dk, dv, dbias, dsinks)`` on padded inputs; ``stats`` as `_Softmax.finish` gives them (sink included).

    ``dbias`` and ``dsinks`` are None without a bias or sinks.
    """
    lse, r = stats
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
    args = (rules.q_offset, rules.q_len, rules.kv_len, q, k, v, rules.q_segment_ids, rules.kv_segment_ids, bias,
            do, lse, r, delta)
    dk, dv = _dkdv(statics, blocks, *args, interpret=interpret)
    dq = _dq(statics, blocks, *args, interpret=interpret)
    dbias = None
    if bias is not None:
        B, T, N, Hv = do.shape
        S, K = v.shape[1], v.shape[2]
        dp = jnp.einsum("btkgh,bskh->bkgts", do.reshape(B, T, K, N // K, Hv).astype(jnp.float32),
                        v.astype(jnp.float32)).reshape(B, N, T, S)
        dbias = _bias_grad(statics, rules, q, k, bias, lse, r, lambda p: p * (dp - delta[..., None]))
    dsinks = None if sinks is None else sink_gradient(sinks, _natural_lse(stats), delta)
    return dq, dk, dv, dbias, dsinks


def _bias_grad(statics: Rules, rules: Rules, q, k, bias, m, r, ds_fn):
    """dL/dbias ``[B|1, N|1, T, S]`` by XLA from the kernel's statistics ``(m, r)``."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, N // K, H), k,
                        preferred_element_type=jnp.float32).reshape(B, N, T, S)
    s = _logits(logits, bias, statics)[0]
    s = jnp.where(rules.mask(T, S), s, -jnp.inf)
    p = _Softmax(natural=True, shift=0.0).probs(s, m[..., None], r[..., None])
    dbias = ds_fn(p)
    for axis in (0, 1):
        if bias.shape[axis] == 1:
            dbias = jnp.sum(dbias, axis=axis, keepdims=True)
    return dbias.astype(bias.dtype)


# ---------------------------------------------------------------------------
# pallas_call builders (inputs already padded).


def _row_spec():
    return pl.BlockSpec((None,), lambda a, b, c: (b,))


def _query_major_specs(q, k, v, q_seg, bias, block_q: int, causal: bool):
    """BlockSpecs of the ``(N, B, T/block_q)`` grid that the forward and dQ kernels share.

    Returns:
      ``(in_specs, q_tile, stats)``: the specs of ``(offset, q_len, kv_len, q,
      k, v, q_seg, kv_seg, bias)``, a function giving the spec of a query tile
      ``[block_q, width]``, and the spec of a tile of a ``[B, N, T]`` statistic.
    """
    T, N, H, S, K, Hv = q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2], v.shape[-1]
    G, nq = N // K, T // block_q

    def tile(i):
        return _q_tile(i, nq, causal)

    def q_tile(width):
        return pl.BlockSpec((None, block_q, None, width), lambda n, b, i: (b, tile(i), n, 0))

    def kv(width):
        return pl.BlockSpec((None, S, None, width), lambda n, b, i: (b, 0, n // G, 0))

    specs = [_row_spec(), _row_spec(), _row_spec(), q_tile(H), kv(H), kv(Hv)]
    if q_seg is None:
        specs += [None, None]
    else:
        specs += [pl.BlockSpec((None, block_q), lambda n, b, i: (b, tile(i))),
                  pl.BlockSpec((None, S), lambda n, b, i: (b, 0))]
    if bias is None:
        specs.append(None)
    else:
        per_batch, per_head = bias.shape[0] > 1, bias.shape[1] > 1
        specs.append(pl.BlockSpec(
            (None, None, block_q, S), lambda n, b, i: (b if per_batch else 0, n if per_head else 0, tile(i), 0)
        ))
    stats = pl.BlockSpec((None, None, block_q), lambda n, b, i: (b, n, tile(i)))
    return specs, q_tile, stats


def _forward(statics: Rules, blocks: BlockSizes, interpret, rules: Rules, q, k, v, bias, sinks):
    """Output ``[B, T, N, Hv]`` and the row statistics ``(lse, r)`` of `_Softmax.finish`, ``[B, N, T]``."""
    B, T, N, _ = q.shape
    Hv = v.shape[-1]
    bq = blocks.block_q
    q_seg, kv_seg = rules.q_segment_ids, rules.kv_segment_ids
    in_specs, q_tile, stats = _query_major_specs(q, k, v, q_seg, bias, bq, statics.is_causal)
    num_stats = 1 if bias is None else 2
    sink_spec = None if sinks is None else pl.BlockSpec((None,), lambda n, b, i: (n,))
    out, *row_stats = pl.pallas_call(
        functools.partial(_forward_kernel, rules=statics, blocks=blocks, num_q_blocks=T // bq),
        grid=(N, B, T // bq),
        in_specs=in_specs + [sink_spec],
        out_specs=[q_tile(Hv)] + [stats] * num_stats,
        out_shape=[out_struct((B, T, N, Hv), q.dtype, rules, q, k, v, bias, sinks)]
        + [out_struct((B, N, T), jnp.float32, rules, q, k, v, bias, sinks)] * num_stats,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="gqa_flash_forward",
    )(rules.q_offset, rules.q_len, rules.kv_len, q, k, v, q_seg, kv_seg, bias, sinks)
    return out, (row_stats[0], row_stats[1] if bias is not None else None)


def _dkdv(statics: Rules, blocks: BlockSizes, offset, q_len, kv_len, q, k, v, q_seg, kv_seg, bias, do, lse, r, delta,
          *, interpret):
    B, T, N, H = q.shape
    S, K, Hv = k.shape[1], k.shape[2], v.shape[-1]
    G = N // K
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    nk = S // bk

    def heads(width):  # all G query heads of KV head `kh`, every query
        return pl.BlockSpec((None, T, G, width), lambda kh, b, j: (b, 0, kh, 0))

    in_specs = [
        _row_spec(), _row_spec(), _row_spec(), heads(H),
        pl.BlockSpec((None, bk, None, H), lambda kh, b, j: (b, j, kh, 0)),
        pl.BlockSpec((None, bk, None, Hv), lambda kh, b, j: (b, j, kh, 0)),
    ]
    if q_seg is None:
        in_specs += [None, None]
    else:
        in_specs += [pl.BlockSpec((None, T), lambda kh, b, j: (b, 0)), pl.BlockSpec((None, bk), lambda kh, b, j: (b, j))]
    if bias is None:
        in_specs.append(None)
    else:
        per_batch, per_head = bias.shape[0] > 1, bias.shape[1] > 1
        in_specs.append(pl.BlockSpec(
            (None, G if per_head else 1, T, bk), lambda kh, b, j: (b if per_batch else 0, kh if per_head else 0, 0, j)
        ))
    row_stats = pl.BlockSpec((None, G, T), lambda kh, b, j: (b, kh, 0))
    in_specs += [heads(Hv), row_stats, None if r is None else row_stats, row_stats]
    args = (offset, q_len, kv_len, q, k, v, q_seg, kv_seg, bias, do, lse, r, delta)
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, rules=statics, blocks=blocks, num_q_blocks=T // bq),
        grid=(K, B, nk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, H), lambda kh, b, j: (b, j, kh, 0)),
                   pl.BlockSpec((None, bk, None, Hv), lambda kh, b, j: (b, j, kh, 0))],
        out_shape=[out_struct(k.shape, k.dtype, args), out_struct(v.shape, v.dtype, args)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd),
        interpret=interpret,
        name="gqa_flash_dkdv",
    )(*args)


def _dq(statics: Rules, blocks: BlockSizes, offset, q_len, kv_len, q, k, v, q_seg, kv_seg, bias, do, lse, r, delta, *,
        interpret):
    B, T, N, H = q.shape
    Hv = v.shape[-1]
    bq = blocks.block_q_dq
    in_specs, q_tile, stats = _query_major_specs(q, k, v, q_seg, bias, bq, statics.is_causal)
    args = (offset, q_len, kv_len, q, k, v, q_seg, kv_seg, bias, do, lse, r, delta)
    return pl.pallas_call(
        functools.partial(_dq_kernel, rules=statics, blocks=blocks, num_q_blocks=T // bq),
        grid=(N, B, T // bq),
        in_specs=in_specs + [q_tile(Hv), stats, None if r is None else stats, stats],
        out_specs=q_tile(H),
        out_shape=out_struct(q.shape, q.dtype, args),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd),
        interpret=interpret,
        name="gqa_flash_dq",
    )(*args)


# ---------------------------------------------------------------------------
# Kernel bodies.


def _forward_kernel(offset_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref,
                    sink_ref, o_ref, lse_ref, r_ref=None, *, rules: Rules, blocks: BlockSizes, num_q_blocks: int):
    bq, bk = blocks.block_q, blocks.block_k
    softmax = _Softmax.of(bias_ref, v_ref.dtype)
    q_start = _q_tile(pl.program_id(2), num_q_blocks, rules.is_causal) * bq
    offset, q_len, kv_len = offset_ref[...], q_len_ref[...], kv_len_ref[...]
    q = q_ref[...]
    q_pos = offset + q_start + jnp.arange(bq, dtype=jnp.int32)
    q_seg = q_seg_ref[...] if q_seg_ref is not None else None

    def body(j, carry, *, masked):
        acc, m, l = carry
        k_start = pl.multiple_of(j * bk, bk)
        _, s, _ = _kv_tile_logits(q, q_pos, q_seg, k_start, k_ref, bias_ref, kv_seg_ref, kv_len, bk, rules,
                                  masked=masked)
        m_new = softmax.running_max(m, s)
        p = softmax.forward_probs(s, m_new)
        alpha = softmax.rescale(m, m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(k_start, bk), :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    acc = jnp.zeros((bq, o_ref.shape[-1]), jnp.float32)
    m, l = softmax.start(None if sink_ref is None else sink_ref[...], bq)
    tiles = _kv_blocks(q_start, bq, bk, offset, q_len, kv_len, rules, has_segments=q_seg_ref is not None)
    acc, m, l = _kv_tile_loop(tiles, body, (acc, m, l))

    # A visible key with a finite logit adds about 2**-shift to l, and so does a finite sink (acc stays 0 for
    # a row that sees no key: its output is 0); masked keys add exp2(-inf) = 0.
    live = (l > 0.0) & (q_start + jnp.arange(bq, dtype=jnp.int32) < q_len)
    l_safe = jnp.where(live, l, 1.0)
    o_ref[...] = jnp.where(live[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    for ref, stat in zip((lse_ref, r_ref), softmax.finish(m, l_safe, live)):
        ref[...] = stat


def _dkdv_kernel(offset_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref,
                 do_ref, lse_ref, r_ref, delta_ref, dk_ref, dv_ref, *, rules: Rules, blocks: BlockSizes,
                 num_q_blocks: int):
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    softmax = _Softmax.of(bias_ref, v_ref.dtype)
    k_start = pl.program_id(2) * bk
    offset, q_len, kv_len = offset_ref[...], q_len_ref[...], kv_len_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    k_idx = k_start + jnp.arange(bk, dtype=jnp.int32)
    kv_seg = kv_seg_ref[...] if kv_seg_ref is not None else None

    k_last = jnp.minimum(k_start + bk, kv_len) - 1
    lo, hi = rules.q_range(k_start, k_last, offset, q_len)
    live = (k_start < kv_len) & (hi > lo)
    blk_lo = jnp.where(live, lax.div(jnp.maximum(lo, 0), bq), 0)
    blk_hi = jnp.where(live, _cdiv(hi, bq), 0)
    # Query indices that see every key of this tile (rows past q_len are dead: p == 0).
    full_first, full_end = rules.q_full_range(k_start, k_start + bk - 1, offset, num_q_blocks * bq)
    full_end = jnp.where(k_start + bk <= kv_len, full_end, 0)
    f_lo, f_hi = _full_block_range(blk_lo, blk_hi, full_first, full_end, bq, has_segments=kv_seg is not None)

    def head_body(g, carry):
        def body(i, carry, *, masked):
            dk, dv = carry
            q_start = pl.multiple_of(i * bq, bq)
            q = q_ref[pl.ds(q_start, bq), g, :]
            do = do_ref[pl.ds(q_start, bq), g, :]
            lse = lse_ref[g, pl.ds(q_start, bq)]
            r = r_ref[g, pl.ds(q_start, bq)] if r_ref is not None else None
            delta = delta_ref[g, pl.ds(q_start, bq)]
            bias = bias_ref[g if bias_ref.shape[0] > 1 else 0, pl.ds(q_start, bq), :] if bias_ref is not None else None
            s, t = _tile_logits(q, k, bias, rules)
            if masked:
                q_pos = offset + q_start + jnp.arange(bq, dtype=jnp.int32)
                q_seg = q_seg_ref[pl.ds(q_start, bq)] if q_seg_ref is not None else None
                s = jnp.where(_tile_mask(q_pos, k_idx, kv_len, q_seg, kv_seg, rules), s, -jnp.inf)
            p = softmax.backward_probs(s, lse, r)
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            dp = plgpu.dot(do, v, trans_b=True)
            ds = p * (dp - delta[:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            dk = dk + plgpu.dot((ds * rules.scale).astype(q.dtype), q, trans_a=True)
            return dk, dv

        return _three_phase_loop(blk_lo, f_lo, f_hi, blk_hi, body, carry)

    dk = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
    dv = jnp.zeros((bk, v_ref.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[1], head_body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(offset_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref,
               do_ref, lse_ref, r_ref, delta_ref, dq_ref, *, rules: Rules, blocks: BlockSizes, num_q_blocks: int):
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    softmax = _Softmax.of(bias_ref, v_ref.dtype)
    q_start = _q_tile(pl.program_id(2), num_q_blocks, rules.is_causal) * bq
    offset, q_len, kv_len = offset_ref[...], q_len_ref[...], kv_len_ref[...]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    r = r_ref[...] if r_ref is not None else None
    delta = delta_ref[...]
    q_pos = offset + q_start + jnp.arange(bq, dtype=jnp.int32)
    q_seg = q_seg_ref[...] if q_seg_ref is not None else None

    def body(j, dq, *, masked):
        k_start = pl.multiple_of(j * bk, bk)
        k, s, t = _kv_tile_logits(q, q_pos, q_seg, k_start, k_ref, bias_ref, kv_seg_ref, kv_len, bk, rules,
                                  masked=masked)
        v = v_ref[pl.ds(k_start, bk), :]
        p = softmax.backward_probs(s, lse, r)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + plgpu.dot((ds * rules.scale).astype(k.dtype), k)

    dq = jnp.zeros((bq, q_ref.shape[-1]), jnp.float32)
    tiles = _kv_blocks(q_start, bq, bk, offset, q_len, kv_len, rules, has_segments=q_seg_ref is not None)
    dq = _kv_tile_loop(tiles, body, dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ---------------------------------------------------------------------------
# Tile helpers shared by the three kernels.


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


@dataclasses.dataclass(frozen=True)
class _Softmax:
    """The online softmax of the three kernels: logit units, weight shift, row statistics.

    Derivation and limits: `pallas_kernels.numerics`. ``shift`` is `prob_shift`
    of the value dtype; every unnormalized forward weight is at most ``2**-shift``.

    Without a bias (``natural=False``) the logits are base 2 (``log2(e)`` is
    in the scale) and the shift is folded into the running max,
    ``m = max(m, rowmax(s) + shift)``, ``p = exp2(s - m)``: the same work per
    logit as with no shift. Row statistic: ``lse2 = m + log2(l)``, `DEAD_LSE`
    for rows that see no key (the form `flash_backward` takes).

    With a bias (``natural=True``) the logits are natural, ``m`` is the plain
    running max and ``p = exp2((s - m) * log2(e) - shift)``. Row statistics:
    the pair ``(m, r = shift + log2(l))``, ``(+inf, +inf)`` for rows that see no
    key; the backward's ``exp2((s - m) * log2(e) - r)`` is the forward's
    weight divided by ``l`` even where ``m + r ln 2`` would round ``r`` away.
    """

    natural: bool
    shift: float

    @classmethod
    def of(cls, bias, value_dtype) -> "_Softmax":
        return cls(natural=bias is not None, shift=prob_shift(value_dtype))

    def start(self, sink, rows: int):
        """The running max and sum ``[rows]`` before the first key.

        ``LOWEST`` and 0, or with a sink logit (natural, a scalar) those of
        one key of that logit: the sink joins the denominator, never the
        values. A sink of ``-inf`` gives ``LOWEST`` and 0.
        """
        m = jnp.full((rows,), LOWEST, jnp.float32)
        if sink is None:
            return m, jnp.zeros((rows,), jnp.float32)
        s = jnp.full((rows, 1), sink * (1.0 if self.natural else LOG2E), jnp.float32)
        m = self.running_max(m, s)
        return m, self.forward_probs(s, m)[:, 0]

    def running_max(self, m, s):
        """The running max ``[bq]`` after logits ``s [bq, bk]``."""
        top = jnp.max(s, axis=1)
        return jnp.maximum(m, top + self.shift if self.shift and not self.natural else top)

    def probs(self, s, m, r=None):
        """``exp2`` of logits ``s`` against statistics ``m`` (and ``r``) broadcast to them."""
        x = s - m
        if self.natural:
            x = x * LOG2E
        return jnp.exp2(x if r is None else x - r)

    def forward_probs(self, s, m):
        """Unnormalized weights ``[bq, bk]`` of logits ``s`` against the running max ``m [bq]``."""
        return self.probs(s, m[:, None], self.shift if self.natural and self.shift else None)

    def backward_probs(self, s, lse, r):
        """Normalized weights ``[bq, bk]`` from the forward's row statistics ``[bq]`` (``r`` None without a bias)."""
        return self.probs(s, lse[:, None], None if r is None else r[:, None])

    def rescale(self, m_old, m_new):
        """The factor ``[bq]`` that moves sums over ``m_old`` onto ``m_new``."""
        return self.probs(m_old, m_new)

    def finish(self, m, l_safe, live):
        """Row statistics ``(lse2,)`` or ``(m, r)`` of rows ``[bq]`` (``l_safe`` is 1 where not ``live``)."""
        log_l = jnp.log2(l_safe)
        if not self.natural:
            return (jnp.where(live, m + log_l, DEAD_LSE),)
        return jnp.where(live, m, jnp.inf), jnp.where(live, log_l + self.shift, jnp.inf)


def _logits(qk, bias, rules: Rules):
    """Logits of raw ``q.k`` products and ``tanh`` of the soft-cap (or None).

    Base 2 without a bias; natural, plus the bias, with one (`_Softmax`).
    """
    unit = 1.0 if bias is not None else LOG2E
    if rules.soft_cap is None:
        s, t = qk * (rules.scale * unit), None
    else:
        t = jnp.tanh(qk * (rules.scale / rules.soft_cap))
        s = t * (rules.soft_cap * unit)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    return s, t


def _tile_logits(q, k, bias, rules: Rules):
    """Logits ``[bq, bk]`` of a tile (`_logits`), and ``tanh`` of the soft-cap (or None)."""
    return _logits(plgpu.dot(q, k, trans_b=True), bias, rules)


def _tile_mask(q_pos, k_idx, kv_len, q_seg, kv_seg, rules: Rules):
    """Visibility ``[bq, bk]`` of keys ``k_idx`` to queries at ``q_pos``."""
    mask = (k_idx < kv_len)[None, :]
    positional = rules.visible(q_pos[:, None], k_idx[None, :])
    if positional is not None:
        mask = mask & positional
    if q_seg is not None:
        mask = mask & (q_seg[:, None] == kv_seg[None, :])
    return mask


def _kv_tile_logits(q, q_pos, q_seg, k_start, k_ref, bias_ref, kv_seg_ref, kv_len, block_k: int, rules: Rules, *,
                    masked: bool):
    """One key tile of a query tile (forward and dQ): the key tile, its logits (``-inf`` where masked), the tanh."""
    k = k_ref[pl.ds(k_start, block_k), :]
    bias = bias_ref[:, pl.ds(k_start, block_k)] if bias_ref is not None else None
    s, t = _tile_logits(q, k, bias, rules)
    if masked:
        k_idx = k_start + jnp.arange(block_k, dtype=jnp.int32)
        kv_seg = kv_seg_ref[pl.ds(k_start, block_k)] if kv_seg_ref is not None else None
        s = jnp.where(_tile_mask(q_pos, k_idx, kv_len, q_seg, kv_seg, rules), s, -jnp.inf)
    return k, s, t


def _full_block_range(blk_lo, blk_hi, full_first_pos, full_end_pos, block: int, *, has_segments: bool):
    """Sub-range ``[f_lo, f_hi)`` of ``[blk_lo, blk_hi)`` whose tiles need no mask.

    ``[full_first_pos, full_end_pos)`` are the positions visible to every row of
    the tile (on the other axis). With segments every tile needs the mask.
    """
    if has_segments:
        return blk_hi, blk_hi
    first = jnp.maximum(full_first_pos, 0)
    end = jnp.maximum(full_end_pos, 0)
    f_lo = jnp.clip(_cdiv(first, block), blk_lo, blk_hi)
    f_hi = jnp.clip(lax.div(end, block), f_lo, blk_hi)
    return f_lo, f_hi


def _three_phase_loop(blk_lo, f_lo, f_hi, blk_hi, body, carry):
    """Runs ``body(i, carry, masked)`` over masked, unmasked and masked tiles."""
    carry = lax.fori_loop(blk_lo, f_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(f_lo, f_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(f_hi, blk_hi, functools.partial(body, masked=True), carry)


def _kv_blocks(q_start, block_q: int, block_k: int, offset, q_len, kv_len, rules: Rules, *, has_segments: bool):
    """Key tiles a query tile visits: ``(sink_hi, blk_lo, f_lo, f_hi, blk_hi)``.

    ``[0, sink_hi)`` are the tiles holding visible sink tokens (None without
    sink tokens), then ``[blk_lo, blk_hi)`` the window's, from ``sink_hi`` on
    (`_kv_tile_loop`).
    """
    q_first = offset + q_start
    q_last = offset + jnp.minimum(q_start + block_q, q_len) - 1
    sink_end, lo, hi = rules.kv_ranges(q_first, q_last, kv_len)
    live = (q_start < q_len) & (hi > lo)
    blk_lo = jnp.where(live, lax.div(lo, block_k), 0)
    blk_hi = jnp.where(live, _cdiv(hi, block_k), 0)
    sink_hi = None
    if rules.sink_tokens:
        sink_hi = jnp.where(q_start < q_len, _cdiv(sink_end, block_k), 0)
        blk_lo = jnp.maximum(blk_lo, sink_hi)
        blk_hi = jnp.maximum(blk_hi, blk_lo)
    full_first, full_end = rules.kv_full_range(q_first, q_last, kv_len)
    f_lo, f_hi = _full_block_range(blk_lo, blk_hi, full_first, full_end, block_k, has_segments=has_segments)
    return sink_hi, blk_lo, f_lo, f_hi, blk_hi


def _kv_tile_loop(tiles, body, carry):
    """Runs ``body`` over the tiles of `_kv_blocks`: the sink tokens' (masked), then the window's three phases."""
    sink_hi, *window = tiles
    if sink_hi is not None:
        carry = lax.fori_loop(0, sink_hi, functools.partial(body, masked=True), carry)
    return _three_phase_loop(*window, body, carry)


def _q_tile(i, num_q_blocks: int, causal: bool):
    """Query tile of program ``i``: the causal diagonal's long tiles go first."""
    return num_q_blocks - 1 - i if causal else i
