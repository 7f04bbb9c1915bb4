"""Grouped-query attention with the pure functions: projections, rotary embeddings, masks, a KV cache.

Run: ``python examples/01_functions.py [--implementation xla]``

Every array is BTNH: queries ``[B, T, N, H]``, keys/values ``[B, S, K, H]``,
``N % K == 0``. Each step prints what it checks against a simpler computation.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import gqa_jax


def max_diff(a, b) -> jax.Array:
    return jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)))


@functools.partial(jax.jit, static_argnames="impl")
def checks(x, w_q, w_k, w_v, w_o, impl=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Each step next to a simpler computation of the same thing; returns the output and the largest differences.

    The functions run eagerly too; under one ``jax.jit`` the script compiles once instead of op by op.

    Args:
      x: inputs ``[B, T, D]``.
      w_q: query kernel ``[D, N, H]``.
      w_k, w_v: key and value kernels ``[D, K, H]``.
      w_o: output kernel ``[N, H, D]``.
      impl: an ``implementation=`` of `gqa_jax.dot_product_attention`.
    """
    B, T, _ = x.shape
    N, K = w_q.shape[1], w_k.shape[1]
    H = w_q.shape[2]
    diffs = {}

    # 1. Project to heads and rotate queries and keys by their positions (RoPE).
    positions_BT = jnp.arange(T)[None, :].repeat(B, axis=0)
    q = gqa_jax.apply_rope(gqa_jax.project_heads(x, w_q), positions_BT)  # [B, T, N, H]
    k = gqa_jax.apply_rope(gqa_jax.project_heads(x, w_k), positions_BT)  # [B, T, K, H]
    v = gqa_jax.project_heads(x, w_v)  # [B, T, K, H]

    # 2. Causal GQA: no repeated K/V on the hot path; the same as repeating K/V to N heads (the Keras way).
    out = gqa_jax.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    G = N // K
    mha = jax.nn.dot_product_attention(q, gqa_jax.repeat_kv(k, G), gqa_jax.repeat_kv(v, G), is_causal=True)
    diffs["step 2: causal GQA vs repeated-K/V multi-head attention"] = max_diff(out, mha)
    y_BTD = gqa_jax.project_output(out, w_o)  # [B, T, D]

    # 3. Masks: sliding window + padding (ragged rows), as rules or as one explicit boolean mask.
    lengths = jnp.array([T, 7])
    ruled = gqa_jax.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(4, 0), key_value_seq_lengths=lengths, implementation=impl
    )
    mask = gqa_jax.combine_masks(
        gqa_jax.causal_mask(T, T), gqa_jax.sliding_window_mask(T, T, (4, 0)), gqa_jax.padding_mask(T, T, None, lengths)
    )  # [B, 1, T, T]
    masked = gqa_jax.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    diffs["step 3: window + padding rules vs the same explicit mask"] = max_diff(ruled, masked)

    # 4. A KV cache: prefill ragged prompts, then decode one token per row per step: the full causal pass again.
    prompt_lengths = jnp.array([5, 9])
    cache = gqa_jax.KVCache.init(batch_size=B, max_length=T, num_kv_heads=K, head_dim=H)
    cache = cache.update(k, v, num_new=prompt_lengths)  # writes only each row's first prompt_lengths tokens
    prefill = cache.attend(q, num_new=prompt_lengths, implementation=impl)  # padded queries give 0
    valid = (jnp.arange(T)[None, :] < prompt_lengths[:, None])[:, :, None, None]
    worst = max_diff(prefill, jnp.where(valid, out, 0.0))
    rows = jnp.arange(B)
    for _ in range(2):
        at = cache.lengths  # each row's next position
        cache = cache.update(k[rows, at][:, None], v[rows, at][:, None])
        step_out = cache.attend(q[rows, at][:, None], implementation=impl)  # [B, 1, N, H]
        worst = jnp.maximum(worst, max_diff(step_out[:, 0], out[rows, at]))
    diffs["step 4: cached prefill + 2 decode steps vs the full pass"] = worst
    return y_BTD, diffs


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementation", default=None, help="e.g. xla, cudnn, pallas_triton; default: dispatch")
    impl = parser.parse_args(argv).implementation
    print(f"platform {gqa_jax.current_platform()}, implementations in dispatch order: {gqa_jax.implementations()}")

    B, T, D, N, K, H = 2, 12, 64, 8, 2, 16  # 8 query heads share 2 key/value heads: G = 4
    keys = jax.random.split(jax.random.key(0), 5)
    x_BTD = jax.random.normal(keys[0], (B, T, D))
    w_q_DNH = jax.random.normal(keys[1], (D, N, H)) / D**0.5
    w_k_DKH = jax.random.normal(keys[2], (D, K, H)) / D**0.5
    w_v_DKH = jax.random.normal(keys[3], (D, K, H)) / D**0.5
    w_o_NHD = jax.random.normal(keys[4], (N, H, D)) / (N * H) ** 0.5

    y_BTD, diffs = checks(x_BTD, w_q_DNH, w_k_DKH, w_v_DKH, w_o_NHD, impl=impl)
    diffs = {name: float(d) for name, d in diffs.items()}
    for name, diff in diffs.items():
        print(f"{name:<58} max |diff| {diff:.1e}")
    print(f"attention block output: y_BTD.shape={tuple(y_BTD.shape)}")
    return diffs


if __name__ == "__main__":
    main()
