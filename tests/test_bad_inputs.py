"""Bad input to every public entry point beyond attention's rules, refused with a message naming it.

`tests/test_rules.py` covers the rules and tensors of `dot_product_attention`
and the kernel wrappers. Here each class of bad input runs against every entry
point it applies to: the KV cache (`KVCache.init/update/attend`,
`splice_cache`), the linen layers, `generate` / `generate_without_cache`, the
Hugging Face import (`config_from_hf`, `params_from_hf`), and host integers
that int32 would wrap in the rules of attention. An entry point that accepts
the input (or fails with another error) fails its case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import KVCache, splice_cache
from gqa_jax.decoding import Sampling, generate, generate_without_cache
from gqa_jax.models import Decoder, DecoderConfig, config_from_hf, init_cache, params_from_hf
from gqa_jax.modules import CachedMultiHeadAttention, GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from pallas_kernels import gpu, tpu
from tests.test_models import random_hf_weights

_rng = np.random.default_rng(17)
B, T, S, K, H, D = 2, 3, 8, 2, 4, 16


def _normal(*shape, dtype=np.float32):
    return jnp.asarray(_rng.standard_normal(shape), dtype)


# -- the cache --------------------------------------------------------------------------------------------------

CACHE = KVCache.init(B, S, K, H)
NEW = _normal(B, T, K, H)
FULL_CACHE = CACHE.update(_normal(B, S - 1, K, H), _normal(B, S - 1, K, H))
CACHE_ARRAY = _normal(B, S, K, H)


def _update(key_new=NEW, value_new=NEW, cache=CACHE, **kw):
    return cache.update(key_new, value_new, **kw)


def _splice(new=NEW, index=0, cache=CACHE_ARRAY, **kw):
    return splice_cache(cache, new, index, **kw)


def _attend(query=None, cache=CACHE.update(NEW, NEW), **kw):
    return cache.attend(_normal(B, T, 2 * K, H) if query is None else query, **kw)


# -- the layers -------------------------------------------------------------------------------------------------

X = _normal(B, T, D)
GQA_FIELDS = dict(head_dim=H, num_query_heads=4, num_key_value_heads=K)
MHA_FIELDS = dict(num_heads=2, key_dim=H)
KERAS_HUB_CACHE = _normal(B, 2, S, K, H)


def _gqa(*, fields=None, call=None):
    layer = GroupedQueryAttention(**{**GQA_FIELDS, **(fields or {})})
    return layer.init(jax.random.key(0), X, X, **(call or {}))


def _mha(*, fields=None, call=None, layer=MultiHeadAttention):
    return layer(**{**MHA_FIELDS, **(fields or {})}).init(jax.random.key(0), X, X, **(call or {}))


def _gqa_keras_hub(index, cache=KERAS_HUB_CACHE):
    """The GQA layer writing into a keras-hub cache at ``cache_update_index=index``."""
    return _gqa(call=dict(cache=cache, cache_update_index=index))


def _cached_mha(**call):
    return _mha(call=dict(cache=_normal(B, 2, S, 2, H), **call), layer=CachedMultiHeadAttention)


def _mqa(*, fields=None, call=None):
    return MultiQueryAttention(dim=D, heads=4, **(fields or {})).init(jax.random.key(0), X, **(call or {}))


def _gqa_decode(x=X, **call):
    layer = GroupedQueryAttention(**GQA_FIELDS, decode=True)
    variables = layer.init(jax.random.key(0), jnp.zeros((B, S, D)), jnp.zeros((B, S, D)))
    return layer.apply(variables, x, x, mutable=["cache"], **call)


# -- generation -------------------------------------------------------------------------------------------------

CFG = DecoderConfig(vocab_size=11, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1)
MODEL = Decoder(CFG)
PARAMS = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"])
PROMPT = _rng.integers(0, CFG.vocab_size, (B, 4)).astype(np.int32)
GENERATORS = {"generate": generate, "generate_without_cache": generate_without_cache}


def _generation(prompt=PROMPT, prompt_lengths=None, model=MODEL, **kw):
    """Both generators on ``prompt`` with ``kw`` (``max_new_tokens=2`` unless given)."""
    kw = {"max_new_tokens": 2, **kw}
    return {name: lambda f=f: f(model, PARAMS, prompt, prompt_lengths, **kw) for name, f in GENERATORS.items()}


def _decoder(tokens, *args, **kw):
    """``MODEL.apply`` on ``tokens`` (with a cache and ``num_new`` when given)."""
    return MODEL.apply({"params": PARAMS}, tokens, *args, **kw)


def _with(array, index, value):
    """A copy of ``array`` with ``array[index] = value``."""
    array = array.copy()
    array[index] = value
    return array


# -- the Hugging Face import ------------------------------------------------------------------------------------

HF_LLAMA = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_scaling=None, hidden_act="silu")
HF_CFG = config_from_hf(HF_LLAMA)
HF_WEIGHTS = random_hf_weights(HF_CFG, np.random.default_rng(18))


def _hf_config(**fields):
    """The two entry points that read an HF config, for ``HF_LLAMA`` with ``fields`` changed."""
    config = {**HF_LLAMA, **fields}
    return {"config_from_hf": lambda: config_from_hf(config),
            "params_from_hf": lambda: params_from_hf(HF_WEIGHTS, config)}


def _hf_weights(**weights):
    """``params_from_hf`` with ``weights`` added to the state dict, given the DecoderConfig or the HF config."""
    state = {**HF_WEIGHTS, **weights}
    return {"params_from_hf(DecoderConfig)": lambda: params_from_hf(state, HF_CFG),
            "params_from_hf(hf_config)": lambda: params_from_hf(state, HF_LLAMA)}


# -- attention's rules: host integers that int32 would wrap -----------------------------------------------------

Q, KV = _normal(B, T, 4, H), _normal(B, S, K, H)
ATTENTION = {
    "dot_product_attention": lambda q, kv, **kw: gqa_jax.dot_product_attention(q, kv, kv, implementation="xla", **kw),
    "gpu.flash_attention": lambda q, kv, **kw: gpu.flash_attention(q, kv, kv, interpret=True, **kw),
    "tpu.flash_attention": lambda q, kv, **kw: tpu.flash_attention(q, kv, kv, interpret=True, **kw),
    "gpu.decode_attention": lambda q, kv, **kw: gpu.decode_attention(
        q, kv, kv, np.full(B, kv.shape[1], np.int32), interpret=True, **kw),
    "tpu.decode_attention": lambda q, kv, **kw: tpu.decode_attention(
        q, kv, kv, np.full(B, kv.shape[1], np.int32), interpret=True, **kw),
}


def _attention(*names, q=Q, kv=KV, **kw):
    """The attention entry points ``names`` (default all) on ``q``, ``kv`` with the keywords ``kw``."""
    return {name: lambda name=name: ATTENTION[name](q, kv, **kw) for name in names or ATTENTION}


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One class of bad input: the error every entry point must raise, and the calls that feed it."""

    name: str
    error: type[Exception]
    match: str
    calls: dict[str, Callable[[], object]]


CLASSES = [
    # KV cache and splice.
    BadInput("index_int32_max", ValueError, r"index=\[2147483647, 2147483647\] exceeds the cache capacity S=8", {
        "splice_cache": lambda: _splice(index=2**31 - 1),
        "splice_cache(jit)": lambda: jax.jit(lambda c, n: splice_cache(c, n, 2**31 - 1))(CACHE_ARRAY, NEW),
        "GroupedQueryAttention(cache_update_index)": lambda: _gqa_keras_hub(2**31 - 1),
        "CachedMultiHeadAttention": lambda: _cached_mha(cache_update_index=2**31 - 1),
    }),
    BadInput("index_past_int32", ValueError, r"index must fit in int32 .*got index=1099511627776", {
        "splice_cache": lambda: _splice(index=2**40),
        "GroupedQueryAttention(cache_update_index)": lambda: _gqa_keras_hub(2**40),
    }),
    BadInput("index_negative", ValueError, r"index=\[-1, -1\] exceeds the cache capacity", {
        "splice_cache": lambda: _splice(index=-1),
        "GroupedQueryAttention(cache_update_index)": lambda: _gqa_keras_hub(-1),
        "CachedMultiHeadAttention": lambda: _cached_mha(cache_update_index=-1),
    }),
    BadInput("write_past_capacity", ValueError, r"tokens at index=.* exceeds the cache capacity S=8", {
        "splice_cache": lambda: _splice(index=6),
        "KVCache.update": lambda: _update(cache=FULL_CACHE),
        "GroupedQueryAttention(cache_update_index)": lambda: _gqa_keras_hub(6),
        "GroupedQueryAttention(decode)": lambda: _gqa_decode(jnp.ones((B, S + 1, D))),
    }),
    BadInput("index_float", TypeError, r"index must be an integer array, got index.dtype=float32", {
        "splice_cache": lambda: _splice(index=1.0),
        "GroupedQueryAttention(cache_update_index)": lambda: _gqa_keras_hub(1.0),
    }),
    BadInput("index_bool", TypeError, r"index must be an integer array, got index.dtype=bool", {
        "splice_cache": lambda: _splice(index=True),
    }),
    BadInput("index_shape", ValueError, r"index must be a scalar or have shape \[B\]=\(2,\), got index.shape=\(3,\)", {
        "splice_cache": lambda: _splice(index=np.array([0, 1, 2])),
        "GroupedQueryAttention(cache_update_index)": lambda: _gqa_keras_hub(np.array([0, 1, 2])),
    }),
    BadInput("num_new_negative", ValueError, r"num_new must be in \[0, T=3\], got num_new=\[-1, 2\]", {
        "splice_cache": lambda: _splice(num_new=np.array([-1, 2])),
        "KVCache.update": lambda: _update(num_new=np.array([-1, 2])),
        "GroupedQueryAttention(decode)": lambda: _gqa_decode(num_new=np.array([-1, 2])),
    }),
    BadInput("num_new_past_T", ValueError, r"num_new must be in \[0, T=3\], got num_new=\[4, 2\]", {
        "splice_cache": lambda: _splice(num_new=np.array([4, 2])),
        "KVCache.update": lambda: _update(num_new=np.array([4, 2])),
        "GroupedQueryAttention(decode)": lambda: _gqa_decode(num_new=np.array([4, 2])),
    }),
    BadInput("num_new_float", TypeError, r"num_new must be an integer array, got num_new.dtype=float32", {
        "splice_cache": lambda: _splice(num_new=np.array([1.0, 2.0])),
        "KVCache.update": lambda: _update(num_new=np.array([1.0, 2.0])),
        "KVCache.attend": lambda: _attend(num_new=np.array([1.0, 2.0])),
        "GroupedQueryAttention(decode)": lambda: _gqa_decode(num_new=np.array([1.0, 2.0])),
    }),
    BadInput("write_integers_into_floats", TypeError, r"cache writes need floating .*new.dtype=int32", {
        "splice_cache": lambda: _splice(new=NEW.astype(jnp.int32)),
        "KVCache.update": lambda: _update(NEW.astype(jnp.int32), NEW.astype(jnp.int32)),
    }),
    BadInput("write_floats_into_integers", TypeError, r"cache writes need floating .*cache.dtype=int32", {
        "splice_cache": lambda: _splice(cache=CACHE_ARRAY.astype(jnp.int32)),
        "GroupedQueryAttention(cache_update_index)": lambda: _gqa_keras_hub(0, KERAS_HUB_CACHE.astype(jnp.int32)),
    }),
    BadInput("new_kv_heads", ValueError, r"(key_new|value_new) must have shape \[B,T,K,Hv?\]=\(2, T, 2, 4\) for this "
             r"cache, got (key_new|value_new).shape=\(2, 3, 1, 4\)", {
        "KVCache.update(key_new)": lambda: _update(key_new=_normal(B, T, 1, H)),
        "KVCache.update(value_new)": lambda: _update(value_new=_normal(B, T, 1, H)),
    }),
    BadInput("new_trailing_dims", ValueError, r"new \[B,T,...\] must match cache \[B,S,...\] except on axis 1", {
        "splice_cache(heads)": lambda: _splice(new=_normal(B, T, 1, H)),
        "splice_cache(head_dim)": lambda: _splice(new=_normal(B, T, K, H + 1)),
        "splice_cache(batch)": lambda: _splice(new=_normal(B + 1, T, K, H)),
    }),
    BadInput("new_head_dim_or_batch", ValueError, r"key_new must have shape \[B,T,K,H\]=\(2, T, 2, 4\) for this "
             r"cache", {
        "KVCache.update(head_dim)": lambda: _update(_normal(B, T, K, H + 1), _normal(B, T, K, H + 1)),
        "KVCache.update(batch)": lambda: _update(_normal(B + 1, T, K, H), _normal(B + 1, T, K, H)),
        "KVCache.update(rank)": lambda: _update(_normal(B, T, K * H), _normal(B, T, K * H)),
    }),
    BadInput("key_value_lengths_differ", ValueError, r"key_new and value_new \[B,T,...\] differ", {
        "KVCache.update": lambda: _update(value_new=_normal(B, T - 1, K, H)),
    }),
    BadInput("attend_before_update", ValueError, r"the newest num_new=\[3, 3\] queries must already be in the cache "
             r"\(call update first\), got cache lengths=\[0, 0\]", {
        "KVCache.attend": lambda: _attend(cache=CACHE),
        "KVCache.attend(num_new)": lambda: _attend(cache=CACHE, num_new=np.array([3, 3])),
    }),
    BadInput("attend_head_counts", ValueError, r"num_heads N=3 must be a multiple of num_kv_heads K=2", {
        "KVCache.attend": lambda: _attend(_normal(B, T, 3, H)),
    }),
    BadInput("init_size_zero", ValueError, r"(batch_size|max_length|num_kv_heads|head_dim|value_head_dim) must be a "
             r"positive int, got \1=0", {
        "KVCache.init(batch_size)": lambda: KVCache.init(0, S, K, H),
        "KVCache.init(max_length)": lambda: KVCache.init(B, 0, K, H),
        "KVCache.init(num_kv_heads)": lambda: KVCache.init(B, S, 0, H),
        "KVCache.init(head_dim)": lambda: KVCache.init(B, S, K, 0),
        "KVCache.init(value_head_dim)": lambda: KVCache.init(B, S, K, H, value_head_dim=0),
        "init_cache(max_length)": lambda: init_cache(CFG, B, 0),
    }),
    BadInput("init_size_not_int", TypeError, r"(batch_size|max_length|head_dim) must be a positive int, got "
             r"\1=(True|8.0|'4') of type", {
        "KVCache.init(bool)": lambda: KVCache.init(True, S, K, H),
        "KVCache.init(float)": lambda: KVCache.init(B, 8.0, K, H),
        "KVCache.init(str)": lambda: KVCache.init(B, S, K, "4"),
    }),
    BadInput("init_dtype_not_floating", TypeError,
             r"dtype must be a floating dtype or int8 / float8_e4m3fn \(quantized\), got dtype=(int32|bool)", {
        "KVCache.init(int32)": lambda: KVCache.init(B, S, K, H, jnp.int32),
        "KVCache.init(bool)": lambda: KVCache.init(B, S, K, H, jnp.bool_),
    }),
    # Generation.
    BadInput("prompt_token_past_vocab", ValueError, r"prompt token ids must be in \[0, vocab_size=11\), "
             r"got prompt\[0, 1\]=11", _generation(_with(PROMPT, (0, 1), 11))),
    BadInput("prompt_token_negative", ValueError,
             r"prompt token ids must be in \[0, vocab_size=11\), got prompt\[1, 0\]=-3",
             _generation(_with(PROMPT, (1, 0), -3))),
    BadInput("prompt_rank", ValueError, r"prompt must have rank 2 \[B,P\], got prompt.shape=\(2, 4, 1\)",
             _generation(PROMPT[..., None])),
    BadInput("prompt_float", TypeError, r"prompt must be int token ids, got prompt.dtype=float32",
             _generation(PROMPT.astype(np.float32))),
    BadInput("prompt_lengths_range", ValueError, r"prompt_lengths must be in \[1, P=4\], got prompt_lengths=\[0, 5\]",
             _generation(prompt_lengths=np.array([0, 5], np.int32))),
    BadInput("prompt_lengths_float", TypeError,
             r"prompt_lengths must be an int array, got prompt_lengths.dtype=float32",
             _generation(prompt_lengths=np.array([1.0, 2.0], np.float32))),
    BadInput("max_new_tokens_zero", ValueError, r"max_new_tokens must be a positive int, got max_new_tokens=0",
             _generation(max_new_tokens=0)),
    BadInput("max_new_tokens_bool", TypeError, r"max_new_tokens must be a positive int, got max_new_tokens=True",
             _generation(max_new_tokens=True)),
    BadInput("end_token_past_vocab", ValueError, r"end_token must be in \[0, vocab_size=11\), got end_token=11",
             _generation(end_token=11)),
    BadInput("end_token_bool", TypeError, r"end_token must be an int, got end_token=True", _generation(end_token=True)),
    BadInput("pad_token_past_int32", ValueError, r"pad_token must fit in int32 .*got pad_token=1099511627776",
             _generation(pad_token=2**40)),
    BadInput("sampling_type", TypeError, r"sampling must be a gqa_jax.decoding.Sampling, got sampling=\{'temperature'",
             _generation(sampling={"temperature": 1.0})),
    BadInput("top_k_past_vocab", ValueError, r"top_k=50 must be <= the vocabulary size V=11",
             _generation(sampling=Sampling(1.0, top_k=50), rng=jax.random.key(0))),
    BadInput("model_type", TypeError, r"model must follow the decoding protocol .*got model of type str without apply",
             _generation(model="llama")),
    BadInput("sampling_settings", ValueError, r"(temperature|top_k|top_p) must be .*got \1=(nan|inf|True)", {
        "Sampling(temperature=nan)": lambda: Sampling(temperature=float("nan")),
        "Sampling(temperature=inf)": lambda: Sampling(temperature=float("inf")),
        "Sampling(temperature=True)": lambda: Sampling(temperature=True),
        "Sampling(top_k=True)": lambda: Sampling(1.0, top_k=True),
        "Sampling(top_p=nan)": lambda: Sampling(1.0, top_p=float("nan")),
    }),
    BadInput("cache_for_another_batch", ValueError, r"cache\[0\].key must have shape \[B,S,K,H\]=\(2, S, 1, 8\) for "
             r"this prompt and model, got cache\[0\].key.shape=\(3, 10, 1, 8\)", {
        "generate": lambda: generate(MODEL, PARAMS, PROMPT, max_new_tokens=2, cache=init_cache(CFG, 3, 10)),
    }),
    BadInput("cache_type", TypeError, r"cache must be a tuple of KVCache", {
        "generate": lambda: generate(MODEL, PARAMS, PROMPT, max_new_tokens=2, cache=np.zeros((1, 2, 10, 1, 8))),
    }),
    BadInput("decoder_token_past_vocab", ValueError, r"tokens token ids must be in \[0, vocab_size=11\), "
             r"got tokens\[0, 1\]=11", {
        "Decoder": lambda: _decoder(_with(PROMPT, (0, 1), 11)),
        "Decoder(cache, num_new)": lambda: _decoder(_with(PROMPT, (0, 1), 11), init_cache(CFG, B, 8),
                                                    num_new=np.array([2, 4], np.int32)),
    }),
    BadInput("decoder_config", (TypeError, ValueError), r"(num_heads|num_layers|rope_theta|norm_eps|tie_embeddings) "
             r"must be .*got \1=(0|True|nan|-1.0|'no')", {
        "DecoderConfig(num_heads=0)": lambda: DecoderConfig(vocab_size=11, num_heads=0),
        "DecoderConfig(num_layers=True)": lambda: DecoderConfig(vocab_size=11, num_layers=True),
        "DecoderConfig(rope_theta=nan)": lambda: DecoderConfig(vocab_size=11, rope_theta=float("nan")),
        "DecoderConfig(norm_eps=-1)": lambda: DecoderConfig(vocab_size=11, norm_eps=-1.0),
        "DecoderConfig(tie_embeddings='no')": lambda: DecoderConfig(vocab_size=11, tie_embeddings="no"),
        "config_from_hf(num_hidden_layers=True)": lambda: config_from_hf({**HF_LLAMA, "num_hidden_layers": True}),
    }),
    BadInput("decoder_cache_batch", ValueError, r"cache\[0\].lengths.shape\[0\]=3, tokens.shape\[0\]=2", {
        "Decoder(cache)": lambda: _decoder(PROMPT, init_cache(CFG, 3, 8)),
    }),
    # Layers: flags and fields that must be bools, sizes, shapes.
    BadInput("call_flag_not_bool", TypeError, r"(use_causal_mask|return_attention_scores|deterministic|causal|"
             r"needs_weights) must be True or False, got \1='no'", {
        "GroupedQueryAttention(use_causal_mask)": lambda: _gqa(call=dict(use_causal_mask="no")),
        "GroupedQueryAttention(return_attention_scores)": lambda: _gqa(call=dict(return_attention_scores="no")),
        "GroupedQueryAttention(deterministic)": lambda: _gqa(call=dict(deterministic="no")),
        "MultiHeadAttention(use_causal_mask)": lambda: _mha(call=dict(use_causal_mask="no")),
        "CachedMultiHeadAttention(use_causal_mask)": lambda: _cached_mha(use_causal_mask="no"),
        "MultiQueryAttention(causal)": lambda: _mqa(call=dict(causal="no")),
        "MultiQueryAttention(needs_weights)": lambda: _mqa(call=dict(needs_weights="no")),
        "MultiQueryAttention(deterministic)": lambda: _mqa(call=dict(deterministic="no")),
    }),
    BadInput("field_not_bool", TypeError, r"(use_bias|use_gate|decode|qk_ln) must be True or False, got \1='no'", {
        "GroupedQueryAttention(use_bias)": lambda: _gqa(fields=dict(use_bias="no")),
        "GroupedQueryAttention(use_gate)": lambda: _gqa(fields=dict(use_gate="no")),
        "GroupedQueryAttention(decode)": lambda: _gqa(fields=dict(decode="no")),
        "MultiHeadAttention(use_bias)": lambda: _mha(fields=dict(use_bias="no")),
        "MultiHeadAttention(use_gate)": lambda: _mha(fields=dict(use_gate="no")),
        "MultiQueryAttention(qk_ln)": lambda: MultiQueryAttention(dim=D, heads=4, qk_ln="no"),
    }),
    BadInput("output_shape_zero", ValueError, r"output_shape must be a positive int, got output_shape=0", {
        "MultiHeadAttention(int)": lambda: _mha(fields=dict(output_shape=0)),
        "MultiHeadAttention(tuple)": lambda: _mha(fields=dict(output_shape=(4, 0))),
    }),
    BadInput("clip_qkv", (TypeError, ValueError), r"clip_qkv must be None or positive.*got clip_qkv=('1'|nan|-1.0)", {
        "MultiQueryAttention(str)": lambda: MultiQueryAttention(dim=D, heads=4, clip_qkv="1"),
        "MultiQueryAttention(nan)": lambda: MultiQueryAttention(dim=D, heads=4, clip_qkv=float("nan")),
        "MultiQueryAttention(negative)": lambda: MultiQueryAttention(dim=D, heads=4, clip_qkv=-1.0),
    }),
    BadInput("past_key_value_shape", ValueError, r"past_key_value\[0\] must have shape \[B,S0,1,H\]=\(2, S0, 1, 4\), "
             r"got past_key_value\[0\].shape=\(2, 3, 2, 4\)", {
        "MultiQueryAttention": lambda: _mqa(call=dict(past_key_value=(_normal(B, 3, 2, H), _normal(B, 3, 2, H)))),
    }),
    # The Hugging Face import.
    BadInput("hf_bidirectional", ValueError, r"use_bidirectional_attention=True is not supported",
             _hf_config(model_type="gemma2", use_bidirectional_attention=True)),
    BadInput("hf_mlp_bias", ValueError, r"mlp_bias=True is not supported", _hf_config(mlp_bias=True)),
    BadInput("hf_rope_scaling", ValueError, r"rope_scaling=\{'rope_type': 'dynamic'.* is not supported",
             _hf_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    BadInput("hf_rope_parameters", ValueError, r"rope_parameters=\{'rope_type': 'yarn'.* is not supported",
             _hf_config(rope_parameters={"rope_type": "yarn", "factor": 4.0})),
    BadInput("hf_chunked_attention", ValueError, r"layer_types=\['chunked_attention'\] is not supported",
             _hf_config(model_type="mistral", layer_types=["chunked_attention"])),
    BadInput("hf_model_type", ValueError, r"model_type='(qwen3|gemma3_text)' is not supported", {
        **{f"qwen3 {k}": v for k, v in _hf_config(model_type="qwen3").items()},
        **{f"gemma3 {k}": v for k, v in _hf_config(model_type="gemma3_text").items()},
    }),
    BadInput("hf_hidden_act", ValueError, r"hidden_act='gelu' is not supported", _hf_config(hidden_act="gelu")),
    BadInput("hf_layer_types", ValueError, r"layer_types=\['sliding_attention'\] is not supported",
             _hf_config(layer_types=["sliding_attention"])),
    BadInput("hf_partial_rotary", ValueError, r"partial_rotary_factor=0.5 is not supported",
             _hf_config(partial_rotary_factor=0.5)),
    BadInput("hf_config_type", TypeError, r"hf_config must be a transformers config or its dict .*got str", {
        "config_from_hf": lambda: config_from_hf("llama"),
        "params_from_hf": lambda: params_from_hf(HF_WEIGHTS, "llama"),
    }),
    BadInput("hf_attention_bias_weights", ValueError, r"model.layers.0.self_attn.q_proj.bias would not be used: "
             r"attention biases", _hf_weights(**{"model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32)})),
    BadInput("hf_mlp_bias_weights", ValueError, r"model.layers.0.mlp.up_proj.bias would not be used: MLP biases",
             _hf_weights(**{"model.layers.0.mlp.up_proj.bias": np.zeros(24, np.float32)})),
    BadInput("hf_untied_head_with_tied_config", ValueError, r"lm_head.weight differs from model.embed_tokens.weight", {
        "params_from_hf(DecoderConfig)": lambda: params_from_hf(
            HF_WEIGHTS, dataclasses.replace(HF_CFG, tie_embeddings=True)),
        "params_from_hf(hf_config)": lambda: params_from_hf(HF_WEIGHTS, {**HF_LLAMA, "tie_word_embeddings": True}),
    }),
    # Attention: host integers that int32 would wrap.
    BadInput("lengths_past_int32", ValueError, r"key_value_seq_lengths must fit in int32 .*got key_value_seq_lengths="
             r"\[8589934592, 1\]", _attention(
        "dot_product_attention", "gpu.flash_attention", "tpu.flash_attention",
        key_value_seq_lengths=np.array([2**33, 1], np.int64))),
    BadInput("head_dim_zero", ValueError, r"head dims must be positive, got query.shape=\(2, 3, 4, 0\)",
             _attention(q=Q[..., :0], kv=KV[..., :0])),
    BadInput("no_keys", ValueError, r"(key|key_cache) must hold at least one key, got \1.shape=\(2, 0, 2, 4\)",
             _attention(kv=KV[:, :0])),
    BadInput("offset_past_int32", ValueError, r"query_offset must fit in int32 .*got query_offset=1099511627776",
             _attention(is_causal=True, query_offset=2**40)),
]


CASES = [(bad, entry) for bad in CLASSES for entry in bad.calls]


def test_there_are_at_least_30_classes_with_unique_names():
    assert len(CLASSES) >= 30
    assert len({bad.name for bad in CLASSES}) == len(CLASSES)


@pytest.mark.parametrize("bad, entry", CASES, ids=[f"{bad.name}-{entry}" for bad, entry in CASES])
def test_bad_input_is_refused_naming_it(bad, entry):
    with pytest.raises(bad.error, match=bad.match):
        bad.calls[entry]()


def test_padding_after_the_real_tokens_may_hold_any_id():
    prompt = _with(PROMPT, (0, 3), -1)  # row 0 has 3 real tokens: the 4th is padding
    _decoder(prompt, init_cache(CFG, B, 8), num_new=np.array([3, 4], np.int32))
    generate(MODEL, PARAMS, prompt, np.array([3, 4], np.int32), max_new_tokens=1)


def test_a_sequence_of_traced_indices_passes_the_int32_check():
    write = jax.jit(lambda a, b: splice_cache(CACHE_ARRAY, NEW[:, :1], (a, b)))
    out = write(jnp.int32(1), jnp.int32(2))
    np.testing.assert_array_equal(out[0, 1], NEW[0, 0])
    np.testing.assert_array_equal(out[1, 2], NEW[1, 0])
