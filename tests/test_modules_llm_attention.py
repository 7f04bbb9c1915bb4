"""The layers' LLM options against a float64 NumPy re-derivation of the whole layer.

Projections, per-head q/k norms (RMSNorm / LayerNorm with a learnable scale),
Hugging Face's rotate-half RoPE (re-derived in `tests.test_rope`), then the
float64 oracle `tests.reference.reference_attention` with the rules (scale,
soft-cap, asymmetric window, segments, query offset, masks), then the output
projection. Tests that take the ``api`` fixture run for linen and NNX.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from tests.reference import reference_attention
from tests.test_rope import LLAMA3, hf_apply_rotary, hf_inv_freq

B, T, D, N, K, H = 2, 6, 16, 4, 2, 8
GQA = dict(head_dim=H, num_query_heads=N, num_key_value_heads=K)
TOL = dict(rtol=1e-4, atol=1e-5)


def _f64(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _norm(x, scale, kind, eps=1e-6):
    if kind == "rms":
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt(np.mean(centered**2, -1, keepdims=True) + eps) * scale


def numpy_layer(params, x, kv=None, *, normalize=None, rope=None, positions=None, kv_positions=None, **rules):
    """The layer in float64: ``rope`` is ``(rotary_dim, theta, hf rope_scaling)``; ``rules`` go to the oracle."""
    p = _f64(params)
    x = np.asarray(x, np.float64)
    kv = x if kv is None else np.asarray(kv, np.float64)

    def proj(name, inp):
        return np.einsum("btd,dnh->btnh", inp, p[name]["kernel"]) + p[name].get("bias", 0.0)

    q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
    if normalize is not None:
        q = _norm(q, p["query_norm"]["scale"], normalize)
        k = _norm(k, p["key_norm"]["scale"], normalize)
    if rope is not None:
        inv_freq = hf_inv_freq(*rope)
        q = hf_apply_rotary(q, positions, inv_freq)
        k = hf_apply_rotary(k, positions if kv_positions is None else kv_positions, inv_freq)
    out, weights = reference_attention(q, k, v, **rules)
    y = np.einsum("btnh,nhd->btd", out, p["attention_output"]["kernel"]) + p["attention_output"].get("bias", 0.0)
    return y, weights


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)


def _positions(rng, length=T):
    """Increasing per-row positions with gaps (as packed or left-padded rows have)."""
    return np.cumsum(rng.integers(1, 4, (B, length)), axis=1).astype(np.int32)


CASES = {
    "llama3_rope_rms_norm_causal": (
        dict(rope=gqa_jax.RotaryEmbedding.from_hf({"rope_theta": 5000.0, "rope_scaling": LLAMA3}), normalize_qk="rms"),
        dict(use_causal_mask=True),
        dict(rope=(H, 5000.0, LLAMA3), normalize="rms", is_causal=True, query_offset=0),
    ),
    "partial_rope_layer_norm_scale_cap_window": (
        dict(rope=gqa_jax.RotaryEmbedding(100.0, rotary_dim=4), normalize_qk="layer", scale=0.3, logits_soft_cap=2.0,
             local_window_size=(2, 1)),
        {},
        dict(rope=(4, 100.0, None), normalize="layer", scale=0.3, logits_soft_cap=2.0, local_window_size=(2, 1),
             query_offset=0),
    ),
    "mistral_window_causal_segments": (
        dict(rope=gqa_jax.RotaryEmbedding(), local_window_size=(2, 0)),
        dict(use_causal_mask=True, segments=True),
        dict(rope=(H, 10000.0, None), is_causal=True, local_window_size=(2, 0), query_offset=0, segments=True),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_llm_options_match_numpy_layer(api, random_params, x, case):
    config, call, expected = CASES[case]
    rng = np.random.default_rng(1)
    layer = api.GroupedQueryAttention(**GQA, **config)
    params = random_params(layer, x, seed=2)
    positions = _positions(rng)
    call = dict(call)
    rules = dict(expected)
    if call.pop("segments", False):
        segments = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]], np.int32)
        call.update(q_segment_ids=segments, kv_segment_ids=segments)
        rules.pop("segments")
        rules.update(q_segment_ids=segments, kv_segment_ids=segments)
    got, weights = layer.apply({"params": params}, x, positions=positions, return_attention_scores=True, **call)
    want, want_weights = numpy_layer(params, x, positions=positions, **rules)
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(weights, want_weights, **TOL)


def test_cross_attention_query_offset_kv_positions_and_mask(api, random_params, x):
    """``T != S``: queries at ``query_offset + t`` (causal rule and default positions), keys at ``kv_positions``."""
    rng = np.random.default_rng(3)
    S = 9
    kv = rng.standard_normal((B, S, D)).astype(np.float32)
    mask = rng.random((B, 1, T, S)) < 0.7
    mask[..., 0] = True
    attention_mask = rng.random((B, T, S)) < 0.8
    attention_mask[..., 0] = True
    offset = np.array([3, 1], np.int32)
    kv_positions = np.arange(S, dtype=np.int32)
    layer = api.GroupedQueryAttention(**GQA, rope=gqa_jax.RotaryEmbedding(50.0))
    params = random_params(layer, x, kv, seed=4)
    got = layer.apply({"params": params}, x, kv, use_causal_mask=True, query_offset=offset, mask=mask,
                      attention_mask=attention_mask)
    want, _ = numpy_layer(params, x, kv, rope=(H, 50.0, None), positions=offset[:, None] + np.arange(T),
                          kv_positions=kv_positions[None].repeat(B, 0), is_causal=True, query_offset=offset,
                          mask=mask & attention_mask[:, None])
    np.testing.assert_allclose(got, want, **TOL)


def test_qk_transform_hook_sees_heads_and_positions(api, random_params, x):
    """A custom transform (here: a position-dependent query gain) applied after RoPE, before the attention."""
    seen = {}

    def gain(q, k, positions, kv_positions):
        seen.update(q=q.shape, k=k.shape, positions=positions.shape, kv_positions=kv_positions.shape)
        return q * (1.0 + 0.1 * positions[:, :, None, None]), k

    layer = api.GroupedQueryAttention(**GQA, rope=gqa_jax.RotaryEmbedding(), qk_transform=gain)
    params = random_params(layer, x, seed=5)
    got = layer.apply({"params": params}, x, use_causal_mask=True)
    assert seen == dict(q=(B, T, N, H), k=(B, T, K, H), positions=(1, T), kv_positions=(1, T))
    # the same gain, in NumPy, is a per-query scale on the logits
    positions = np.arange(T)[None].repeat(B, 0)
    p = _f64(params)
    q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dnh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("btd,dnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
    inv_freq = hf_inv_freq(H, 10000.0)
    q = hf_apply_rotary(q, positions, inv_freq) * (1.0 + 0.1 * positions[:, :, None, None])
    out, _ = reference_attention(q, hf_apply_rotary(k, positions, inv_freq), v, is_causal=True)
    want = np.einsum("btnh,nhd->btd", out, p["attention_output"]["kernel"]) + p["attention_output"]["bias"]
    np.testing.assert_allclose(got, want, **TOL)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(layer, params, cache, tokens):
    out, variables = layer.apply({"params": params, "cache": cache}, tokens, use_causal_mask=True, mutable=["cache"])
    return out, variables["cache"]


@pytest.mark.parametrize("kind", ["GroupedQueryAttention", "MultiHeadAttention"])
def test_decode_mode_rotates_at_cache_positions(api, random_params, x, kind):
    """Decode mode: default positions continue after the cached tokens, so a prompt then tokens equals one pass."""
    config = dict(GQA) if kind == "GroupedQueryAttention" else dict(num_heads=N, key_dim=H)
    options = dict(rope=gqa_jax.RotaryEmbedding(), normalize_qk="rms")
    full_layer = getattr(api, kind)(**config, **options)
    params = random_params(full_layer, x, seed=6)
    full = full_layer.apply({"params": params}, x, use_causal_mask=True)
    layer = getattr(api, kind)(**config, **options, decode=True)
    _, variables = layer.apply({"params": params}, x, mutable=["cache"])  # allocates: capacity T
    cache = jax.tree.map(jnp.zeros_like, variables["cache"])
    outputs = []
    for start, stop in ((0, 3), (3, 4), (4, 6)):
        out, cache = _decode_step(layer, params, cache, x[:, start:stop])
        outputs.append(out)
    np.testing.assert_array_equal(cache["cache_index"], [T, T])
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, **TOL)


def _ragged_chunks(rng, x, chunks):
    """``(inputs [B, t, D], num_new [B], done [B])`` per chunk: row ``b`` continues ``x[b]`` by ``chunks[i][b]`` tokens.

    ``done``: the tokens of each row before the chunk; noise pads the rows.
    """
    done = np.zeros(B, int)
    for counts in chunks:
        width = max(counts)
        inputs = rng.standard_normal((B, width, D)).astype(np.float32)
        for b, n in enumerate(counts):
            inputs[b, :n] = x[b, done[b]:done[b] + n]
        yield inputs, np.asarray(counts, np.int32), done.copy()
        done += counts


def test_kv_cache_ragged_chunks_match_the_numpy_full_pass(api, random_params, x):
    """A caller's `gqa_jax.KVCache`: ragged prefill, then ragged chunks; each valid output equals the full causal pass.

    Gemma 2 / Mistral style options (rope, logit scale, soft-cap, window) at the cache positions; padded tokens are
    not written and give the output bias only.
    """
    rng = np.random.default_rng(7)
    options = dict(rope=gqa_jax.RotaryEmbedding(), scale=0.2, logits_soft_cap=3.0, local_window_size=(2, 0))
    layer = api.GroupedQueryAttention(**GQA, **options)
    params = random_params(layer, x, seed=8)
    want, _ = numpy_layer(params, x, rope=(H, 10000.0, None), positions=np.arange(T)[None].repeat(B, 0),
                          is_causal=True, query_offset=0, scale=0.2, logits_soft_cap=3.0, local_window_size=(2, 0))
    step = jax.jit(lambda inputs, cache, num_new: layer.apply({"params": params}, inputs, use_causal_mask=True,
                                                              cache=cache, num_new=num_new))
    cache = gqa_jax.KVCache.init(B, T + 2, K, H)
    for inputs, num_new, done in _ragged_chunks(rng, x, [(4, 2), (2, 1), (0, 3)]):
        got, cache = step(inputs, cache, num_new)
        for b in range(B):
            np.testing.assert_allclose(got[b, :num_new[b]], want[b, done[b]:done[b] + num_new[b]], **TOL)
            padded = got[b, num_new[b]:]
            np.testing.assert_allclose(padded, 0.0 * padded + params["attention_output"]["bias"], **TOL)
    np.testing.assert_array_equal(cache.lengths, [T, T])


def test_kv_cache_refuses_an_index_other_heads_and_other_lengths(random_params, x):
    layer = gqa_jax.GroupedQueryAttention(**GQA)
    params = random_params(layer, x)
    cache = gqa_jax.KVCache.init(B, T, K, H)
    with pytest.raises(ValueError, match="cache_update_index"):
        layer.apply({"params": params}, x, cache=cache, cache_update_index=0)
    with pytest.raises(ValueError, match=r"KVCache must have batch 2, 2 KV heads and head dim 8 .* got batch 2, 1 KV"):
        layer.apply({"params": params}, x, cache=gqa_jax.KVCache.init(B, T, 1, H))
    with pytest.raises(ValueError, match="query and value lengths must agree"):
        layer.apply({"params": params}, x, x[:, :3], cache=cache)
    with pytest.raises(ValueError, match="num_new is for decode=True or a cache=KVCache"):
        layer.apply({"params": params}, x, num_new=np.array([1, 2]))


@pytest.mark.parametrize("use_bias, use_output_bias", [(True, False), (False, True)])
def test_output_bias_apart_from_the_qkv_biases(random_params, x, use_bias, use_output_bias):
    """Qwen2's attention (q/k/v biases, none on the output) and the converse; the numbers follow the parameters."""
    layer = gqa_jax.GroupedQueryAttention(**GQA, use_bias=use_bias, use_output_bias=use_output_bias)
    params = random_params(layer, x, seed=9)
    assert {name: sorted(p) for name, p in params.items()} == {
        **{name: ["bias", "kernel"] if use_bias else ["kernel"] for name in ("query", "key", "value")},
        "attention_output": ["bias", "kernel"] if use_output_bias else ["kernel"],
    }
    want, _ = numpy_layer(params, x, is_causal=True, query_offset=0)
    np.testing.assert_allclose(layer.apply({"params": params}, x, use_causal_mask=True), want, **TOL)


def test_logical_axes_name_every_projection_and_change_nothing_else(x):
    from jax.sharding import PartitionSpec as P

    from gqa_jax.sharding import logical_axis_rules

    plain_layer = gqa_jax.GroupedQueryAttention(**GQA, use_gate=True)
    layer = gqa_jax.GroupedQueryAttention(**GQA, use_gate=True, logical_axes=True)
    boxed = layer.init(jax.random.key(0), x)
    plain = plain_layer.init(jax.random.key(0), x)
    heads = dict(kernel=P("embed", "q_heads", "head_dim"), bias=P("q_heads", "head_dim"))
    kv_heads = dict(kernel=P("embed", "kv_heads", "head_dim"), bias=P("kv_heads", "head_dim"))
    assert nn.get_partition_spec(boxed)["params"] == dict(
        query=heads, gate=heads, key=kv_heads, value=kv_heads,
        attention_output=dict(kernel=P("q_heads", "head_dim", "embed"), bias=P("embed")),
    )
    specs = nn.logical_to_mesh_axes(("embed", "kv_heads", "head_dim"), logical_axis_rules())
    assert specs == P(None, "model", None)
    # Without the option: plain arrays, P() everywhere; with it the same values, boxed.
    assert not any(isinstance(leaf, nn.LogicallyPartitioned)
                   for leaf in jax.tree.leaves(plain, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned)))
    assert all(spec == P() for spec in jax.tree.leaves(nn.get_partition_spec(plain)))
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(boxed), plain)
    want = plain_layer.apply(plain, x, use_causal_mask=True)
    np.testing.assert_array_equal(layer.apply(boxed, x, use_causal_mask=True), want)
    np.testing.assert_array_equal(layer.apply(nn.meta.unbox(boxed), x, use_causal_mask=True), want)
