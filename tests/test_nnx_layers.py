"""What only the NNX layers have: linen's parameters, ``nnx.Cache`` decoding under ``nnx.jit``, rng streams, axis names.

The behaviour tests of the layers (Keras and zeta parity, masks, the cache
invariant, errors) run for both APIs in ``test_modules_*.py`` through the
``api`` fixture; here: linen -> NNX -> linen round trips give identical
outputs, `gqa_jax.nnx.load_linen_params` refuses trees that do not fit, a
``nnx.jit`` decode loop traces once per shape, and parameters carry logical
axis names that map onto a mesh.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gqa_jax
import gqa_jax.models
import gqa_jax.nnx

B, S, D, N, K, H = 2, 8, 8, 4, 2, 4
GQA = dict(head_dim=H, num_query_heads=N, num_key_value_heads=K)
TOL = dict(rtol=2e-5, atol=2e-5)


def _x(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# (linen layer, NNX layer, call inputs, call keywords) for the round trip.
LAYERS = {
    "gqa_gate_window": (
        gqa_jax.GroupedQueryAttention(**GQA, use_gate=True, sliding_window=3),
        lambda rngs: gqa_jax.nnx.GroupedQueryAttention(**GQA, use_gate=True, sliding_window=3, in_features=D,
                                                       value_features=6, rngs=rngs),
        (_x(B, 5, D), _x(B, S, 6, seed=1)),
        dict(use_causal_mask=True),
    ),
    "mha_rank4_output_shape": (
        gqa_jax.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=2, attention_axes=(1, 2), output_shape=(2, 3)),
        lambda rngs: gqa_jax.nnx.MultiHeadAttention(2, 3, 2, attention_axes=(1, 2), output_shape=(2, 3),
                                                    in_features=D, rngs=rngs),
        (_x(B, 3, 4, D), _x(B, 3, 5, D, seed=1)),
        {},
    ),
    "cached_mha": (
        gqa_jax.CachedMultiHeadAttention(num_heads=2, key_dim=4, use_bias=False),
        lambda rngs: gqa_jax.nnx.CachedMultiHeadAttention(2, 4, use_bias=False, in_features=D, rngs=rngs),
        (_x(B, S, D), _x(B, S, D, seed=1)),
        dict(use_causal_mask=True),
    ),
    "mqa_qk_ln": (
        gqa_jax.MultiQueryAttention(dim=D, heads=2, qk_ln=True, clip_qkv=2.0),
        lambda rngs: gqa_jax.nnx.MultiQueryAttention(D, 2, qk_ln=True, clip_qkv=2.0, rngs=rngs),
        (_x(B, S, D),),
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_linen_to_nnx_to_linen_round_trip_gives_identical_outputs(name, random_params):
    linen_layer, make_nnx, inputs, kwargs = LAYERS[name]
    params = random_params(linen_layer, *inputs)
    layer = gqa_jax.nnx.load_linen_params(nnx.jit(lambda: make_nnx(nnx.Rngs(7)))(), params)  # overwrites its init
    back = gqa_jax.nnx.linen_params(layer)
    jax.tree.map(np.testing.assert_array_equal, back, params)

    linen = jax.jit(lambda p: linen_layer.apply({"params": p}, *inputs, **kwargs))  # one program each: same code
    expected, got, again = linen(params), nnx.jit(lambda m: m(*inputs, **kwargs))(layer), linen(back)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    jax.tree.map(np.testing.assert_array_equal, again, expected)


def test_load_linen_params_refuses_trees_that_do_not_fit(random_params):
    x = _x(B, S, D)
    params = random_params(gqa_jax.GroupedQueryAttention(**GQA), x, x)
    layer = nnx.eval_shape(lambda: gqa_jax.nnx.GroupedQueryAttention(**GQA, in_features=D, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"missing \['key/bias'\], unknown \['key/scale'\]"):
        gqa_jax.nnx.load_linen_params(layer, {**params, "key": {"kernel": params["key"]["kernel"], "scale": 1.0}})
    wrong = {**params, "query": {**params["query"], "kernel": params["query"]["kernel"][:, :2]}}
    with pytest.raises(ValueError, match=r"query/kernel must have shape \(8, 4, 4\) for this module, got \(8, 2, 4\)"):
        gqa_jax.nnx.load_linen_params(layer, wrong)
    with pytest.raises(ValueError, match="the input's trailing dims must be in_shape=\\(8,\\)"):
        gqa_jax.nnx.load_linen_params(layer, params)(_x(B, S, 6))
    boxed = flax.core.freeze(jax.tree.map(lambda w: nn.LogicallyPartitioned(w, (None,) * w.ndim), params))
    jax.tree.map(np.testing.assert_array_equal, gqa_jax.nnx.linen_params(gqa_jax.nnx.load_linen_params(layer, boxed)),
                 params)  # a FrozenDict of linen's partitioning boxes loads too


def test_nnx_jit_decode_loop_traces_once_and_equals_the_causal_pass(random_params):
    """Ragged prefill (5 and 3 tokens), then one token per row per step in one compiled step; overflow is flagged."""
    x = _x(B, S + 1, D, seed=3)
    params = random_params(gqa_jax.GroupedQueryAttention(**GQA), x, x, seed=4)
    full = jax.jit(lambda p: gqa_jax.GroupedQueryAttention(**GQA).apply({"params": p}, x, x, use_causal_mask=True))(
        params
    )
    layer = nnx.eval_shape(lambda: gqa_jax.nnx.GroupedQueryAttention(**GQA, in_features=D, decode=True,
                                                                      rngs=nnx.Rngs(0)))
    layer = gqa_jax.nnx.load_linen_params(layer, params)
    layer.init_cache(batch_size=B, max_length=S)
    traces = []

    @nnx.jit
    def step(layer, tokens, num_new):
        traces.append(tokens.shape)
        return layer(tokens, use_causal_mask=True, num_new=num_new)

    prompt = jnp.stack([x[0, :5], jnp.concatenate([x[1, :3], x[1, 6:8]])])
    out = step(layer, prompt, jnp.array([5, 3]))
    np.testing.assert_allclose(out[0], full[0, :5], **TOL)
    np.testing.assert_allclose(out[1, :3], full[1, :3], **TOL)
    lengths = np.array([5, 3])
    for _ in range(3):
        tokens = x[np.arange(B), lengths][:, None]
        out = step(layer, tokens, None)
        np.testing.assert_allclose(out[:, 0], full[np.arange(B), lengths], **TOL)
        lengths = lengths + 1
    assert traces == [(B, 5, D), (B, 1, D)]
    np.testing.assert_array_equal(layer.cache_index[...], [S, 6])
    step(layer, x[:, :1], None)  # row 0 is full: its token is dropped and the overflow flagged
    np.testing.assert_array_equal(layer.cache_index[...] > S, [True, False])
    assert len(traces) == 2
    layer.init_cache(batch_size=B, max_length=S)  # empties it
    assert not layer.cache_index[...].any()
    with pytest.raises(ValueError, match="decode=True needs a cache: call init_cache"):
        jax.eval_shape(lambda: gqa_jax.nnx.GroupedQueryAttention(**GQA, in_features=D, rngs=nnx.Rngs(0))(
            x, decode=True
        ))


def test_dropout_streams_and_deterministic():
    """The layer's stream advances per call; rngs= at a call overrides it; deterministic=True and eval() turn it off."""
    x = _x(1, 4, D)
    layer = nnx.jit(lambda: gqa_jax.nnx.GroupedQueryAttention(**GQA, in_features=D, dropout=0.5, deterministic=False,
                                                              rngs=nnx.Rngs(params=0, dropout=1)))()
    call = nnx.jit(lambda layer, x, key: (layer(x), layer(x), layer(x, rngs=key), layer(x, deterministic=True)))
    first, second, keyed, plain = call(layer, x, jax.random.key(3))
    assert not np.allclose(first, second) and not np.allclose(first, plain)
    np.testing.assert_array_equal(call(layer, x, jax.random.key(3))[2], keyed)
    layer.eval()
    np.testing.assert_array_equal(nnx.jit(lambda layer, x: layer(x))(layer, x), plain)


def test_parameters_carry_logical_axis_names_that_map_onto_a_mesh():
    layer = nnx.jit(lambda: gqa_jax.nnx.GroupedQueryAttention(**GQA, in_features=D, use_gate=True, rngs=nnx.Rngs(0)))()
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    names = {name: specs[name]["kernel"].get_value() for name in ("query", "key", "value", "gate", "attention_output")}
    assert names == {
        "query": jax.P("embed", "q_heads", "head_dim"),
        "gate": jax.P("embed", "q_heads", "head_dim"),
        "key": jax.P("embed", "kv_heads", "head_dim"),
        "value": jax.P("embed", "kv_heads", "head_dim"),
        "attention_output": jax.P("q_heads", "head_dim", "embed"),
    }
    assert specs["query"]["bias"].get_value() == jax.P("q_heads", "head_dim")
    config = gqa_jax.models.DecoderConfig(vocab_size=16, num_layers=1, model_dim=8, num_heads=2, num_kv_heads=1,
                                          mlp_dim=12)
    decoder = nnx.eval_shape(lambda: gqa_jax.nnx.Decoder(config, rngs=nnx.Rngs(0)))
    decoder_specs = nnx.get_partition_spec(nnx.state(decoder, nnx.Param))
    assert decoder_specs["layers_0"]["attention"]["key"].get_value() == jax.P("embed", "kv_heads", "head_dim")
    assert decoder_specs["layers_0"]["mlp"]["down"]["kernel"].get_value() == jax.P("mlp", "embed")
    rules = (("q_heads", "model"), ("kv_heads", "model"), ("embed", None), ("head_dim", None), ("mlp", "model"),
             ("vocab", None))
    mesh = jax.make_mesh((1,), ("model",))
    state = nnx.state(layer, nnx.Param)
    mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s), rules), nnx.to_pure_dict(
        nnx.get_partition_spec(state)), is_leaf=lambda s: isinstance(s, jax.P))
    placed = jax.device_put(nnx.to_pure_dict(state), jax.tree.map(lambda s: jax.NamedSharding(mesh, s), mesh_specs,
                                                                   is_leaf=lambda s: isinstance(s, jax.P)))
    assert placed["query"]["kernel"].sharding.spec == jax.P(None, "model", None)
