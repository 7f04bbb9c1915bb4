"""The reference decoder: Hugging Face weight mapping against a NumPy Llama, and the cache invariant."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax.models import Decoder, DecoderConfig, init_cache, params_from_hf
from tests.reference import reference_attention


def random_hf_weights(cfg: DecoderConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random ``LlamaForCausalLM`` state dict (HF names, ``[out, in]`` weights) for ``cfg``."""
    D, N, K, H, F, V = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size

    def dense(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm():
        return (1.0 + 0.2 * rng.standard_normal(D)).astype(np.float32)

    sd = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32), "model.norm.weight": norm()}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": dense(N * H, D),
            p + "self_attn.k_proj.weight": dense(K * H, D),
            p + "self_attn.v_proj.weight": dense(K * H, D),
            p + "self_attn.o_proj.weight": dense(D, N * H),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": dense(F, D),
            p + "mlp.up_proj.weight": dense(F, D),
            p + "mlp.down_proj.weight": dense(D, F),
        })
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = dense(V, D)
    return sd


def numpy_llama(sd: dict[str, np.ndarray], cfg: DecoderConfig, tokens: np.ndarray) -> np.ndarray:
    """Float64 logits ``[B, T, V]`` following Hugging Face ``LlamaForCausalLM`` step by step."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w = {name: np.asarray(value, np.float64) for name, value in sd.items()}
    B, T = tokens.shape

    def rms_norm(x, weight):
        return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)

    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H)
    emb = np.concatenate([np.outer(np.arange(T), inv_freq)] * 2, axis=-1)[None, :, None, :]  # [1, T, 1, H]

    def rotary(x):  # HF apply_rotary_pos_emb: x * cos + rotate_half(x) * sin
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return x * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = rotary((h @ w[p + "self_attn.q_proj.weight"].T).reshape(B, T, N, H))
        k = rotary((h @ w[p + "self_attn.k_proj.weight"].T).reshape(B, T, K, H))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(B, T, K, H)
        attended, _ = reference_attention(q, k, v, is_causal=True)
        x = x + attended.reshape(B, T, N * H) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    return x @ head.T


def _rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


CONFIGS = {
    "gqa2_untied": DecoderConfig(vocab_size=29, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=48),
    "mqa_tied_theta": DecoderConfig(
        vocab_size=23, num_layers=1, model_dim=24, num_heads=4, num_kv_heads=1, head_dim=8, mlp_dim=40,
        rope_theta=500000.0, norm_eps=1e-6, tie_embeddings=True,
    ),
    "mha": DecoderConfig(vocab_size=19, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=2, implementation="xla"),
}


@functools.lru_cache(maxsize=None)
def _jitted(cfg: DecoderConfig):
    model = Decoder(cfg)
    forward = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))
    cached = jax.jit(lambda params, tokens, cache, num_new: model.apply({"params": params}, tokens, cache,
                                                                       num_new=num_new))
    return forward, cached


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_weights_give_hf_logits(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(101)
    sd = random_hf_weights(cfg, rng)
    tokens = rng.integers(0, cfg.vocab_size, (2, 7))
    logits = _jitted(cfg)[0](params_from_hf(sd, cfg), tokens)
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == jnp.float32
    assert _rel_err(logits, numpy_llama(sd, cfg, tokens)) < 2e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mapped_params_have_the_init_layout(name):
    cfg = CONFIGS[name]
    shapes = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    mapped = params_from_hf(random_hf_weights(cfg, np.random.default_rng(102)), cfg)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(mapped)
    assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(lambda a: a.shape, mapped)


def test_cached_prefill_steps_and_chunks_equal_the_full_pass():
    """Ragged prefill, then one token per step, then a ragged two-token chunk: logits match the full pass."""
    cfg = CONFIGS["gqa2_untied"]
    rng = np.random.default_rng(103)
    params = params_from_hf(random_hf_weights(cfg, rng), cfg)
    forward, cached = _jitted(cfg)
    B, T = 3, 11
    sequence = rng.integers(0, cfg.vocab_size, (B, T))
    full = np.asarray(forward(params, sequence))
    rows = np.arange(B)[:, None]

    prompt_lengths = np.array([5, 1, 7])
    cache = init_cache(cfg, B, 12)
    logits, cache = cached(params, sequence[:, :7], cache, prompt_lengths)
    for b, n in enumerate(prompt_lengths):
        assert _rel_err(logits[b, :n], full[b, :n]) < 1e-5
    for chunk in ([1, 1, 1], [1, 1, 1], [2, 1, 2]):
        n_new = np.array(chunk)
        start = np.asarray(cache[0].lengths)
        positions = start[:, None] + np.arange(2)
        width = max(chunk)
        logits, cache = cached(params, sequence[rows, positions[:, :width]], cache, None if width == 1 else n_new)
        for b, n in enumerate(n_new):
            assert _rel_err(logits[b, :n], full[b, start[b] : start[b] + n]) < 1e-5
    np.testing.assert_array_equal(cache[0].lengths, prompt_lengths + np.array([4, 3, 4]))


def test_implementation_reaches_dispatch():
    cfg = DecoderConfig(vocab_size=11, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1,
                        implementation="no_such_kernel")
    params = params_from_hf(random_hf_weights(cfg, np.random.default_rng(104)), cfg)
    with pytest.raises(ValueError, match="implementation='no_such_kernel'"):
        jax.eval_shape(lambda p: Decoder(cfg).apply({"params": p}, jnp.zeros((1, 3), jnp.int32)), params)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        DecoderConfig(vocab_size=10, model_dim=48, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="model_dim=30 must be a multiple of num_heads=4"):
        DecoderConfig(vocab_size=10, model_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="head_dim=7 must be even"):
        DecoderConfig(vocab_size=10, head_dim=7)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got vocab_size=0"):
        DecoderConfig(vocab_size=0)

    cfg = CONFIGS["mha"]
    model, tokens = Decoder(cfg), jnp.zeros((2, 3), jnp.int32)
    params = params_from_hf(random_hf_weights(cfg, np.random.default_rng(105)), cfg)
    shape_of = lambda *args, **kwargs: jax.eval_shape(  # noqa: E731
        lambda p: model.apply({"params": p}, *args, **kwargs), params
    )
    with pytest.raises(ValueError, match="num_new needs a cache"):
        shape_of(tokens, num_new=jnp.ones(2, jnp.int32))
    with pytest.raises(ValueError, match=r"len\(cache\)=2 != cfg.num_layers=1"):
        shape_of(tokens, init_cache(cfg, 2, 8) * 2)
    with pytest.raises(TypeError, match="tokens.dtype=float32"):
        shape_of(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"tokens.shape=\(2, 3, 1\)"):
        shape_of(jnp.zeros((2, 3, 1), jnp.int32))
    sd = random_hf_weights(cfg, np.random.default_rng(106))
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:4]
    with pytest.raises(ValueError, match=r"k_proj.weight must have shape \(16, 16\)"):
        params_from_hf(sd, cfg)


def _paged_layers(cfg, page_sizes=(4, 4), dtype=None):
    """One empty `PagedKVCache` per layer of ``cfg`` for 3 rows: 12 pages of ``page_sizes[i]`` tokens, 4 per row."""
    from gqa_jax import PagedKVCache

    return tuple(PagedKVCache.init(batch_size=3, num_pages=12, page_size=size, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, max_pages_per_row=4, dtype=dtype or cfg.dtype)
                 for size in page_sizes)


def _generation_inputs(seed):
    cfg = CONFIGS["gqa2_untied"]
    rng = np.random.default_rng(seed)
    params = params_from_hf(random_hf_weights(cfg, rng), cfg)
    return cfg, Decoder(cfg), params, rng.integers(0, cfg.vocab_size, (3, 6)), np.array([6, 2, 4])


def test_generate_on_a_paged_cache_gives_the_dense_cache_tokens_and_values(monkeypatch):
    """The reference Decoder through `generate` on one `PagedKVCache` per layer (pages of rows interleaved): the
    uncached pass's tokens, and in every layer of the returned cache the dense cache's keys and values. Layers that
    agree (`same_bookkeeping`: the default dense cache, paged layers built alike) share one bookkeeping update per
    step; paged layers with another free stack or page size each update their own."""
    from gqa_jax import decoding
    from gqa_jax.cache_bookkeeping import same_bookkeeping
    from pallas_kernels.paging import gather_pages

    cfg, model, params, prompt, lengths = _generation_inputs(107)
    shared_flags, generate_cached = [], decoding._generate_cached
    monkeypatch.setattr(decoding, "_generate_cached", lambda *a, **kw: (
        shared_flags.append(kw["shared_bookkeeping"]), generate_cached(*a, **kw))[1])
    expected = decoding.generate_without_cache(model, params, prompt, lengths, max_new_tokens=5).tokens
    dense = decoding.generate(model, params, prompt, lengths, max_new_tokens=5)
    assert shared_flags == [True]
    np.testing.assert_array_equal(dense.tokens, expected)
    assert same_bookkeeping(dense.cache)
    other_stack = _paged_layers(cfg)
    other_stack = other_stack[:1] + tuple(dataclasses.replace(c, free_pages=c.free_pages[::-1]) for c in other_stack[1:])
    cases = {"same pages": (_paged_layers(cfg), True), "other free stack": (other_stack, False),
             "other page size": (_paged_layers(cfg, page_sizes=(4, 8)), False)}
    for case, (cache, shared) in cases.items():
        out = decoding.generate(model, params, prompt, lengths, max_new_tokens=5, cache=cache)
        assert shared_flags[-1] == shared, case
        np.testing.assert_array_equal(out.tokens, expected, err_msg=case)
        assert same_bookkeeping(out.cache) == shared, case
        for i, (layer, reference) in enumerate(zip(out.cache, dense.cache)):
            np.testing.assert_array_equal(layer.lengths, reference.lengths, err_msg=case)
            table = np.asarray(layer.page_table)
            free = np.asarray(layer.free_pages)[:int(layer.num_free)]
            assert sorted(table[table >= 0].tolist() + free.tolist()) == list(range(layer.num_pages)), (case, i)
            for name, pages, values in (("key", layer.key_pages, reference.key),
                                        ("value", layer.value_pages, reference.value)):
                gathered = np.asarray(gather_pages(pages, layer.page_table))
                for row, length in enumerate(np.asarray(reference.lengths)):
                    np.testing.assert_allclose(gathered[row, :length], np.asarray(values)[row, :length],
                                               rtol=1e-5, atol=1e-5, err_msg=f"{case}: layer {i} {name} row {row}")


def test_decode_step_with_shared_bookkeeping_updates_it_in_the_first_layer():
    """`decode_step(shared_bookkeeping=True)`: the first layer comes back with the step's bookkeeping, the others
    with what they came with (stale), every layer's values written as without sharing; `first_layers_bookkeeping`
    makes it whole. Dense, paged and int8 paged caches. Caches of mixed types or page geometries are refused."""
    from gqa_jax.cache_bookkeeping import first_layers_bookkeeping
    from gqa_jax.decoding import decode_step

    cfg, model, params, prompt, lengths = _generation_inputs(113)
    variables, tokens = {"params": params}, jnp.asarray(prompt[:, 0], jnp.int32)
    prefill = jax.jit(lambda variables, cache: model.apply(variables, prompt, cache, num_new=lengths)[1])
    step = jax.jit(decode_step, static_argnums=0, static_argnames="shared_bookkeeping")
    for empty in (init_cache(cfg, 3, 16), _paged_layers(cfg), _paged_layers(cfg, dtype=jnp.int8)):
        cache = prefill(variables, empty)
        plain_logits, plain = step(model, variables, cache, tokens)
        logits, shared = step(model, variables, cache, tokens, shared_bookkeeping=True)
        np.testing.assert_array_equal(logits, plain_logits)
        np.testing.assert_array_equal(plain[0].lengths, cache[0].lengths + 1)
        for name in type(cache[0]).BOOKKEEPING:
            np.testing.assert_array_equal(getattr(shared[0], name), getattr(plain[0], name))
            for stale, before in zip(shared[1:], cache[1:]):
                np.testing.assert_array_equal(getattr(stale, name), getattr(before, name), err_msg=name)
        for whole, reference in zip(first_layers_bookkeeping(shared), plain):
            for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(reference)):
                np.testing.assert_array_equal(a, b)
    mixed = (init_cache(cfg, 3, 16)[0], _paged_layers(cfg)[0])
    with pytest.raises(TypeError, match="got PagedKVCache and KVCache"):
        decode_step(model, variables, mixed, tokens, shared_bookkeeping=True)
    with pytest.raises(ValueError, match=r"\(B, P, page_size, M\)=\(3, 12, 4, 4\) and \(3, 12, 8, 4\)"):
        decode_step(model, variables, _paged_layers(cfg, page_sizes=(8, 4)), tokens, shared_bookkeeping=True)
