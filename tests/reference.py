"""An independent float64 NumPy oracle for attention, written from the spec.

It shares no code with gqa_jax or pallas_kernels: every rule (positions,
default offsets, causal, window and its sink tokens, lengths, segments,
soft-cap, bias, sink logits, fully masked rows) is spelled out again here with
explicit loops.
"""

from __future__ import annotations

import numpy as np


def _row_offsets(B, T, S, is_causal, window, query_offset, q_lens, kv_lens):
    if query_offset is not None:
        return np.broadcast_to(np.asarray(query_offset, np.int64), (B,))
    if T == S:
        return np.zeros(B, np.int64)
    return np.array([kv_lens[b] - q_lens[b] for b in range(B)], np.int64)


def visibility(
    B, T, S, *, is_causal=False, query_offset=None, query_seq_lengths=None, key_value_seq_lengths=None,
    q_segment_ids=None, kv_segment_ids=None, local_window_size=None, num_sink_tokens=0,
):
    """bool [B, T, S]: which keys each query sees, by the rules alone (no user mask).

    Keys ``s < num_sink_tokens`` pass the window rule (the others still apply).
    """
    q_lens = [T] * B if query_seq_lengths is None else [int(x) for x in np.asarray(query_seq_lengths)]
    kv_lens = [S] * B if key_value_seq_lengths is None else [int(x) for x in np.asarray(key_value_seq_lengths)]
    window = local_window_size
    if isinstance(window, int):
        window = (window, window)
    offsets = _row_offsets(B, T, S, is_causal, window, query_offset, q_lens, kv_lens)
    t = np.arange(T)[:, None]
    s = np.arange(S)[None, :]
    vis = np.zeros((B, T, S), bool)
    for b in range(B):
        qpos = offsets[b] + t
        ok = (t < q_lens[b]) & (s < kv_lens[b])
        if is_causal:
            ok &= s <= qpos
        if window is not None:
            ok &= ((qpos - window[0] <= s) & (s <= qpos + window[1])) | (s < num_sink_tokens)
        if q_segment_ids is not None:
            ok &= np.asarray(q_segment_ids)[b][:, None] == np.asarray(kv_segment_ids)[b][None, :]
        vis[b] = ok
    return vis


def reference_attention(
    query, key, value, bias=None, mask=None, *, scale=None, logits_soft_cap=None, sinks=None, **rules,
):
    """Returns (output [B,T,N,Hv], weights [B,N,T,S]) in float64.

    ``rules`` are the keyword rules of `visibility`. ``bias``/``mask`` are
    already broadcastable to [B, N, T, S]. ``sinks [N]``: one more logit per
    head in each row's denominator, with no value (its weight is not returned).
    """
    q = np.asarray(query, np.float64)
    k = np.asarray(key, np.float64)
    v = np.asarray(value, np.float64)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    vis = visibility(B, T, S, **rules)[:, None]  # [B,1,T,S]
    if mask is not None:
        vis = vis & np.broadcast_to(np.asarray(mask, bool), (B, N, T, S))
    vis = np.broadcast_to(vis, (B, N, T, S))
    out = np.zeros((B, T, N, v.shape[-1]))
    weights = np.zeros((B, N, T, S))
    for n in range(N):
        kv_head = n // G
        logits = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, kv_head]) * scale
        if logits_soft_cap is not None:
            logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
        if bias is not None:
            logits = logits + np.broadcast_to(np.asarray(bias, np.float64), (B, N, T, S))[:, n]
        ok = vis[:, n] & np.isfinite(logits)
        masked = np.where(ok, logits, -np.inf)
        row_max = masked.max(axis=-1, keepdims=True)
        if sinks is not None:
            sink = float(np.asarray(sinks, np.float64)[n])
            row_max = np.maximum(row_max, sink)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)
        p = np.where(ok, np.exp(masked - row_max), 0.0)
        denom = p.sum(axis=-1, keepdims=True)
        if sinks is not None:
            denom = denom + np.exp(sink - row_max)
        w = p / np.where(denom == 0, 1.0, denom)
        weights[:, n] = w
        out[:, :, n] = np.einsum("bts,bsh->bth", w, v[:, :, kv_head])
    return out, weights


def reference_attention_grads(
    query, key, value, d_out, bias=None, mask=None, *, scale=None, logits_soft_cap=None, sinks=None, **rules,
):
    """Returns (d_query, d_key, d_value) in float64: the gradients of ``sum(output * d_out)``.

    Same arguments as `reference_attention`, plus ``d_out [B,T,N,Hv]``. Written
    out by hand from the forward (softmax, soft-cap, grouped heads), so it
    shares no code with the implementations' backward passes. Keys that are
    not visible (and rows that see none) have zero weight, hence zero
    gradients. With ``sinks`` it returns ``d_sinks [N]`` as a fourth value:
    the sink's weight is ``1 - sum(weights)`` on a row that sees a key and
    its logit gradient ``-w_sink * sum_s(w_s * d_w_s)``, as for any logit
    whose value is 0.
    """
    q = np.asarray(query, np.float64)
    k = np.asarray(key, np.float64)
    v = np.asarray(value, np.float64)
    do = np.asarray(d_out, np.float64)
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    _, weights = reference_attention(q, k, v, bias, mask, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                                     **rules)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    d_sinks = np.zeros(N)
    for n in range(N):
        kv_head = n // G
        w = weights[:, n]  # [B,T,S]
        dv[:, :, kv_head] += np.einsum("bts,btd->bsd", w, do[:, :, n])
        d_w = np.einsum("btd,bsd->bts", do[:, :, n], v[:, :, kv_head])
        d_logits = w * (d_w - (d_w * w).sum(axis=-1, keepdims=True))
        seen = w.sum(axis=-1)
        d_sinks[n] = -np.sum(np.where(seen > 0, 1.0 - seen, 0.0) * (d_w * w).sum(axis=-1))
        if logits_soft_cap is not None:
            raw = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, kv_head]) * scale
            d_logits = d_logits * (1.0 - np.tanh(raw / logits_soft_cap) ** 2)
        dq[:, :, n] = scale * np.einsum("bts,bsh->bth", d_logits, k[:, :, kv_head])
        dk[:, :, kv_head] += scale * np.einsum("bts,bth->bsh", d_logits, q[:, :, n])
    if sinks is not None:
        return dq, dk, dv, d_sinks
    return dq, dk, dv
