"""MultiQueryAttention against a float64 NumPy re-implementation of zeta's torch path.

The oracle reads a PyTorch-layout state dict (``weight [out, in]``) and
follows zeta's ``MultiQueryAttention.forward`` and
``scaled_multihead_dot_product_attention`` step by step; our parameters come
from the same state dict by the documented port rule (transpose the Linear
weights). The attention itself is `tests.reference.reference_attention`.
Each test runs for the linen and the NNX layer (the ``api`` fixture,
`tests.layer_apis`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from tests.kernel_cases import TOLERANCE_TF32
from tests.reference import reference_attention

B, T, DIM, HEADS = 2, 6, 16, 4
HD = DIM // HEADS
# Compiled float32 on a GPU/TPU may run its matrix products at lower precision (TF32, bfloat16 passes).
TOL = dict(rtol=1e-4, atol=1e-5) if jax.default_backend() == "cpu" else dict(rtol=TOLERANCE_TF32, atol=TOLERANCE_TF32)


def _state_dict(rng, qk_ln=False):
    sd = {
        "Wqkv.weight": rng.standard_normal((DIM + 2 * HD, DIM)) / np.sqrt(DIM),
        "Wqkv.bias": rng.standard_normal(DIM + 2 * HD) * 0.1,
        "out_proj.weight": rng.standard_normal((DIM, DIM)) / np.sqrt(DIM),
        "out_proj.bias": rng.standard_normal(DIM) * 0.1,
    }
    if qk_ln:
        for name, size in (("q_ln", DIM), ("k_ln", HD)):
            sd[f"{name}.weight"] = 1 + 0.1 * rng.standard_normal(size)
            sd[f"{name}.bias"] = 0.1 * rng.standard_normal(size)
    return {k: v.astype(np.float32) for k, v in sd.items()}


def _port(sd):
    """Our params from a zeta state dict: Linear weights transposed, LayerNorm weight -> scale."""
    params = {}
    for name in ("Wqkv", "out_proj"):
        params[name] = {"kernel": jnp.asarray(sd[f"{name}.weight"].T), "bias": jnp.asarray(sd[f"{name}.bias"])}
    for name in ("q_ln", "k_ln"):
        if f"{name}.weight" in sd:
            params[name] = {"scale": jnp.asarray(sd[f"{name}.weight"]), "bias": jnp.asarray(sd[f"{name}.bias"])}
    return params


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def _zeta(sd, x, past=None, bias=None, mask=None, causal=True, clip_qkv=None, softmax_scale=None):
    """zeta's forward (torch path) in float64; returns (out, weights, (key, value) [B,S,1,HD])."""
    x = np.asarray(x, np.float64)
    qkv = x @ sd["Wqkv.weight"].T.astype(np.float64) + sd["Wqkv.bias"]
    if clip_qkv:
        qkv = np.clip(qkv, -clip_qkv, clip_qkv)
    q, k, v = np.split(qkv, [DIM, DIM + HD], axis=-1)
    if "q_ln.weight" in sd:
        q = _layer_norm(q, sd["q_ln.weight"], sd["q_ln.bias"])
        k = _layer_norm(k, sd["k_ln.weight"], sd["k_ln.bias"])
    b, t = x.shape[:2]
    q, k, v = q.reshape(b, t, HEADS, HD), k.reshape(b, t, 1, HD), v.reshape(b, t, 1, HD)
    if past is not None:
        k, v = np.concatenate([past[0], k], 1), np.concatenate([past[1], v], 1)
    s = k.shape[1]
    if bias is not None:
        bias = bias[:, :, max(0, bias.shape[2] - t) :, max(0, bias.shape[3] - s) :]
    out, weights = reference_attention(
        q,
        k,
        v,
        bias=bias,
        mask=None if mask is None else mask[:, None, None, :],
        scale=softmax_scale or 1 / np.sqrt(HD),
        is_causal=causal,
    )
    out = out.reshape(b, t, DIM) @ sd["out_proj.weight"].T.astype(np.float64) + sd["out_proj.bias"]
    return out, weights, (k, v)


CASES = {
    "causal": dict(),
    "clip_qk_ln_scale": dict(config=dict(clip_qkv=0.5, qk_ln=True, softmax_scale=0.3)),
    "padding_mask_sliced_bias_not_causal": dict(call=dict(causal=False), mask=True, bias=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_multi_query_attention_matches_zeta(api, name):
    case = CASES[name]
    config, call = case.get("config", {}), dict(case.get("call", {}))
    rng = np.random.default_rng(sum(map(ord, name)))
    sd = _state_dict(rng, qk_ln=config.get("qk_ln", False))
    x = rng.standard_normal((B, T, DIM)).astype(np.float32)
    if case.get("mask"):
        call["mask"] = rng.random((B, T)) < 0.7
        call["mask"][:, 0] = True
    if case.get("bias"):
        call["bias"] = (rng.standard_normal((1, HEADS, T + 2, T + 3)) * 0.5).astype(np.float32)  # cut to [T, S]
    layer = api.MultiQueryAttention(dim=DIM, heads=HEADS, **config)
    out, weights, past = jax.jit(lambda p: layer.apply({"params": p}, x, needs_weights=True, **call))(_port(sd))
    ref_out, ref_weights, _ = _zeta(
        sd, x, clip_qkv=config.get("clip_qkv"), softmax_scale=config.get("softmax_scale"), **call
    )
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(weights, ref_weights, **TOL)
    assert past is None


def test_past_key_value_tuple_continues_the_sequence(api):
    """Prompt of 4 from an empty tuple, then 2 more tokens: equals zeta's pass, which equals the full causal pass."""
    rng = np.random.default_rng(1)
    sd = _state_dict(rng)
    x = rng.standard_normal((B, T, DIM)).astype(np.float32)
    layer = api.MultiQueryAttention(dim=DIM, heads=HEADS, attn_impl="torch")

    @jax.jit
    def run(params):
        first, _, past = layer.apply({"params": params}, x[:, :4], past_key_value=())
        second, _, past = layer.apply({"params": params}, x[:, 4:], past_key_value=past)
        return jnp.concatenate([first, second], 1), past

    out, (key, value) = run(_port(sd))
    ref_out, _, (ref_key, ref_value) = _zeta(sd, x)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(key, ref_key, **TOL)
    np.testing.assert_allclose(value, ref_value, **TOL)
    assert key.shape == value.shape == (B, T, 1, HD)


def test_fixed_capacity_kv_cache_in_a_jitted_loop(api):
    rng = np.random.default_rng(2)
    sd = _state_dict(rng)
    x = rng.standard_normal((B, T, DIM)).astype(np.float32)
    layer = api.MultiQueryAttention(dim=DIM, heads=HEADS, attn_impl="flash")
    step = jax.jit(lambda p, token, cache: layer.apply({"params": p}, token, past_key_value=cache))
    cache = gqa_jax.KVCache.init(batch_size=B, max_length=T + 2, num_kv_heads=1, head_dim=HD)
    outputs = []
    for t in range(T):
        out, _, cache = step(_port(sd), x[:, t : t + 1], cache)
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, 1), _zeta(sd, x)[0], **TOL)
    np.testing.assert_array_equal(cache.lengths, [T, T])


def test_attn_impl_names_agree(api):
    rng = np.random.default_rng(3)
    sd = _state_dict(rng)
    x = rng.standard_normal((B, T, DIM)).astype(np.float32)

    @jax.jit
    def run(params):
        return [
            api.MultiQueryAttention(dim=DIM, heads=HEADS, attn_impl=impl).apply({"params": params}, x)[0]
            for impl in (None, "torch", "flash", "triton", "xla")
        ]

    outs = run(_port(sd))
    for out in outs:
        np.testing.assert_allclose(out, outs[-1], **TOL)
