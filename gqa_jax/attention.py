"""`dot_product_attention`: the one entry point to every implementation."""

from __future__ import annotations

from typing import Sequence

import jax

from gqa_jax.dispatch import run
from gqa_jax.request import make_request

Array = jax.Array


def dot_product_attention(
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
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    return_weights: bool = False,
    implementation: str | Sequence[str] | None = None,
    q_sharding=None,
    kv_sharding=None,
    key_scale=None,
    value_scale=None,
    sinks=None,
    num_sink_tokens: int = 0,
):
    """Scaled dot-product attention with grouped key/value heads.

    ``softmax(mask(cap(scale * Q K^T) + bias)) V`` per head (with ``sinks``, each
    head's softmax denominator gains ``exp(sinks[n])``), where query head
    ``n`` reads key/value head ``n // G`` (``G = N // K``): multi-head attention
    when ``K == N``, multi-query when ``K == 1``. A superset of
    `jax.nn.dot_product_attention`; where both apply they agree (except on rows
    with no visible key, which are zeros here).

    Positions: query ``t`` of row ``b`` sits at ``query_offset[b] + t``, key ``s``
    at ``s``. Causal and window rules compare positions. When no offset is
    given: 0 if ``T == S`` (top-left, as in `jax.nn`), else bottom-right, i.e.
    ``key_value_seq_lengths[b] - query_seq_lengths[b]`` (lengths defaulting to
    ``S`` and ``T``), which is what chunked prefill and cached decoding need.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]`` with ``N % K == 0``; the query's dtype, or int8 /
        float8_e4m3fn with ``key_scale`` (a quantized cache).
      value: ``[B, S, K, Hv]``; ``Hv`` may differ from ``H``; the key's dtype.
      bias: optional float bias added to the logits, ``[T,S]``, ``[B,T,S]`` or
        ``[B,N,T,S]``, each axis either full or 1.
      mask: optional boolean mask (True = attend) of the same shapes as bias;
        a Keras ``attention_mask [B,T,S]`` works as is.
      scale: logit scale; default ``1 / sqrt(H)``.
      is_causal: queries see keys at positions ``<=`` their own.
      query_offset: int or int ``[B]`` position of each row's first query.
      query_seq_lengths: int ``[B]`` valid queries per row; the rest output 0.
      key_value_seq_lengths: int ``[B]`` valid keys per row.
      q_segment_ids: int ``[B, T]`` packed-sequence ids of the queries.
      kv_segment_ids: int ``[B, S]`` ids of the keys; a query sees only keys
        of its own segment.
      local_window_size: int or ``(left, right)``: a query at position ``p``
        sees keys in ``[p - left, p + right]``.
      num_sink_tokens: int ``k >= 0``: keys at positions ``< k`` stay visible
        outside the window (StreamingLLM's "keep the first k tokens"); causal
        and lengths still apply to them. Needs ``local_window_size`` when
        positive. Served by ``"xla"``, ``"pallas_triton"`` (which skips the
        tiles between the sink tokens and the window) and ``"pallas_tpu"``;
        ``"cudnn"`` refuses it, ``"pallas_mosaic_gpu"`` leaves it to
        ``"pallas_triton"``.
      logits_soft_cap: ``cap * tanh(logits / cap)`` on the scaled logits,
        before bias and masks.
      dropout_rate: probability of dropping an attention weight (needs
        ``dropout_rng``); none when 0.
      dropout_rng: PRNG key for dropout.
      return_weights: also return the weights.
      implementation: None (the fastest that serves the call on this
        platform), a name such as ``"xla"``, ``"cudnn"``, ``"pallas_triton"``,
        ``"pallas_mosaic_gpu"``, ``"pallas_tpu"``, or a sequence of names
        asked in order.
      q_sharding: optional ``NamedSharding`` of the query, for calls under
        ``jit`` on meshes with auto axes (elsewhere the arrays carry it). On a
        mesh of several devices, kernels run inside ``jax.shard_map`` over the
        batch and head axes; a sharded sequence goes to XLA (or see
        `gqa_jax.sharding` for context parallelism).
      kv_sharding: optional ``NamedSharding`` of key and value.
      key_scale: float ``[B, S, K]``, required with a quantized key: key ``s``
        of head ``k`` is ``key[b, s, k] * key_scale[b, s, k]`` (see
        `gqa_jax.quantization`). ``"xla"`` and the decode kernels
        (decode-shaped calls of ``"pallas_triton"`` and ``"pallas_tpu"``)
        apply it to the logits after ``q . k``, so the dequantized cache is
        never made; the flash kernels (other calls of ``"pallas_triton"``,
        ``"pallas_mosaic_gpu"`` and ``"pallas_tpu"``) take the cache
        dequantized to the query dtype. ``"cudnn"`` refuses it.
      value_scale: float ``[B, S, K]``, required with a quantized value:
        applied to the weights before ``p . v``.
      sinks: optional float ``[N]`` (any float dtype; float32 math) learned
        sink logit per query head, as in gpt-oss: query head ``n``'s weights
        are ``exp(l_s) / (sum_s' exp(l_s') + exp(sinks[n]))``; the sink has
        no value, so the weights sum to less than 1. Differentiable; ``-inf``
        is no sink. The returned weights exclude the sink. Served by
        ``"xla"`` and ``"pallas_triton"``; the others refuse it.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, or ``(output, weights)`` with
      weights ``[B, N, T, S]`` when ``return_weights``. Rows with no visible
      key give zeros (with sinks too).

    Raises:
      ValueError, TypeError: for invalid arguments, or an implementation that
        cannot serve the call.

    Example::

        k1, k2 = jax.random.split(jax.random.key(0))
        q = jax.random.normal(k1, (2, 8, 8, 64))   # B=2, T=8, N=8, H=64
        kv = jax.random.normal(k2, (2, 8, 2, 64))  # K=2: 4 query heads per KV head
        out = dot_product_attention(q, kv, kv, is_causal=True)  # [2, 8, 8, 64]
    """
    request = make_request(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_offset=query_offset,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_weights=return_weights,
        q_sharding=q_sharding,
        kv_sharding=kv_sharding,
        key_scale=key_scale,
        value_scale=value_scale,
        sinks=sinks,
        num_sink_tokens=num_sink_tokens,
    )
    return run(request, implementation)
