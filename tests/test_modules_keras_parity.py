"""GroupedQueryAttention and MultiHeadAttention against the real Keras 3 layers.

The Keras layer is the oracle: same random weights (read with `keras_params`),
same inputs; outputs and attention scores must match in float32. Each case
runs Keras' explicit path (``return_attention_scores=True``) and its fused
path (``ops.dot_product_attention``). Tests that take the ``api`` fixture run
for the linen and the NNX layers (`tests.layer_apis`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from tests.kernel_cases import TOLERANCE_TF32

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip(f"Keras parity tests need KERAS_BACKEND=jax, got {keras.backend.backend()}", allow_module_level=True)

# Compiled float32 on a GPU/TPU may run its matrix products at lower precision (TF32, bfloat16 passes).
TOL = dict(rtol=2e-5, atol=2e-5) if jax.default_backend() == "cpu" else dict(rtol=TOLERANCE_TF32, atol=TOLERANCE_TF32)


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mask(rng, *shape):
    """A random boolean mask whose every row keeps at least its first entry."""
    mask = rng.random(shape) < 0.6
    mask[..., 0] = True
    return mask


def _keras_layer(cls, rng, *input_shapes, **config):
    """A built Keras layer with fresh random weights (zeros-initialized first: building is faster)."""
    layer = cls(**config, kernel_initializer="zeros")
    layer.build(*input_shapes)
    layer.set_weights([_normal(rng, *w.shape) / np.sqrt(w.shape[0]) for w in layer.weights])
    return layer


def _both_paths(keras_layer, ours, args, kwargs, fused=True):
    """Keras and our outputs, jitted (op-by-op Keras is slow on the CPU): with scores, then without."""

    def run(call):
        scored = call(*args, return_attention_scores=True, **kwargs)
        return scored, (call(*args, **kwargs) if fused else None)

    params = gqa_jax.keras_params(keras_layer)
    ref = jax.jit(lambda: run(keras_layer))()
    got = jax.jit(lambda p: run(lambda *a, **kw: ours.apply({"params": p}, *a, **kw)))(params)
    return ref, got


GQA_CASES = {
    "mha_causal_T_lt_S": dict(heads=(4, 4), call=dict(use_causal_mask=True)),
    "gqa2_attention_mask": dict(heads=(4, 2), masks=("attention_mask",)),
    "mqa_no_bias_causal_masked": dict(
        heads=(4, 1), use_bias=False, masks=("attention_mask",), call=dict(use_causal_mask=True)
    ),
    "gqa2_value_mask_window": dict(heads=(4, 2), masks=("value_mask",), sliding_window=3),
    "gqa2_gate_causal": dict(heads=(4, 2), use_gate=True, call=dict(use_causal_mask=True)),
}


@pytest.mark.parametrize("name", sorted(GQA_CASES))
def test_grouped_query_attention_matches_keras(api, name):
    case = GQA_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    B, T, S, Dq, Dv, Dk, H = 2, 5, 7, 12, 10, 6, 4
    N, K = case["heads"]
    config = dict(
        head_dim=H,
        num_query_heads=N,
        num_key_value_heads=K,
        use_bias=case.get("use_bias", True),
        sliding_window=case.get("sliding_window"),
        use_gate=case.get("use_gate", False),
    )
    query, value, key = _normal(rng, B, T, Dq), _normal(rng, B, S, Dv), _normal(rng, B, S, Dk)
    kwargs = dict(case.get("call", {}))
    for mask_name in case.get("masks", ()):
        kwargs[mask_name] = {"attention_mask": _mask(rng, B, T, S), "value_mask": _mask(rng, B, S)}[mask_name]
    keras_layer = _keras_layer(keras.layers.GroupQueryAttention, rng, query.shape, value.shape, key.shape, **config)
    ours = api.GroupedQueryAttention(**config)
    ((ref_out, ref_scores), ref_fused), ((out, scores), fused) = _both_paths(
        keras_layer, ours, (query, value, key), kwargs
    )
    assert out.shape == (B, T, Dq) and scores.shape == (B, N, T, S)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(scores, ref_scores, **TOL)
    np.testing.assert_allclose(fused, ref_fused, **TOL)


def test_query_mask_rows_get_zero_attention_as_documented(api):
    """Masked queries: Keras' explicit path gives zero weights, as we do; its fused path averages the values."""
    rng = np.random.default_rng(1)
    B, T, S, D = 2, 4, 6, 8
    query, value = _normal(rng, B, T, D), _normal(rng, B, S, D)
    query_mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
    keras_layer = _keras_layer(
        keras.layers.GroupQueryAttention,
        rng,
        query.shape,
        value.shape,
        head_dim=4,
        num_query_heads=4,
        num_key_value_heads=2,
    )
    ours = api.GroupedQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    ((ref_out, ref_scores), ref_fused), ((out, scores), fused) = _both_paths(
        keras_layer, ours, (query, value), dict(query_mask=query_mask)
    )
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(scores, ref_scores, **TOL)
    fused, ref_fused = np.asarray(fused), np.asarray(ref_fused)
    np.testing.assert_allclose(fused[query_mask], ref_fused[query_mask], **TOL)
    output_bias = np.asarray(keras_layer._output_dense.bias.value)
    np.testing.assert_allclose(fused[~query_mask], np.broadcast_to(output_bias, fused[~query_mask].shape), **TOL)
    assert not np.allclose(ref_fused[~query_mask], output_bias, atol=1e-3)  # Keras' uniform average


MHA_CASES = {
    "rank3_value_dim_output_shape_causal": dict(
        config=dict(num_heads=3, key_dim=4, value_dim=5, output_shape=(2, 3)), call=dict(use_causal_mask=True)
    ),
    "rank3_key_differs_attention_mask": dict(
        config=dict(num_heads=2, key_dim=4), separate_key=True, masks=("attention_mask",)
    ),
    "rank3_no_bias_int_output_shape": dict(config=dict(num_heads=2, key_dim=3, use_bias=False, output_shape=7)),
    "rank4_two_attention_axes": dict(
        config=dict(num_heads=2, key_dim=3, value_dim=2, attention_axes=(1, 2)), rank=4, masks=("attention_mask",)
    ),
    "rank4_one_axis_gate_masked": dict(
        config=dict(num_heads=2, key_dim=3, attention_axes=(-2,), use_gate=True), rank=4, masks=("attention_mask",)
    ),
}


@pytest.mark.parametrize("name", sorted(MHA_CASES))
def test_multi_head_attention_matches_keras(api, name):
    case = MHA_CASES[name]
    config = case["config"]
    rng = np.random.default_rng(sum(map(ord, name)))
    if case.get("rank", 3) == 3:
        q_shape, kv_shape, mask_shape = (2, 5, 8), (2, 6), (2, 5, 6)
    else:  # [B, X, Y, D] attended over (X, Y), or over Y with X a batch axis
        q_shape, kv_shape = (2, 3, 4, 8), (2, 3, 5)
        mask_shape = (2, 3, 4, 3, 5) if config["attention_axes"] == (1, 2) else (2, 3, 4, 5)
    query = _normal(rng, *q_shape)
    value = _normal(rng, *kv_shape, 6)
    key = _normal(rng, *kv_shape, 9) if case.get("separate_key") else None
    kwargs = dict(case.get("call", {}))
    if "attention_mask" in case.get("masks", ()):
        kwargs["attention_mask"] = _mask(rng, *mask_shape)
    shapes = (query.shape, value.shape) + (() if key is None else (key.shape,))
    keras_layer = _keras_layer(keras.layers.MultiHeadAttention, rng, *shapes, **config)
    ours = api.MultiHeadAttention(**config)
    # Keras' fused path (taken without scores) fails when value_dim != key_dim: compare it only where it runs.
    fused = config.get("value_dim", config["key_dim"]) == config["key_dim"]
    ((ref_out, ref_scores), ref_fused), ((out, scores), ours_fused) = _both_paths(
        keras_layer, ours, (query, value, key), kwargs, fused=fused
    )
    assert out.shape == ref_out.shape and scores.shape == ref_scores.shape
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(scores, ref_scores, **TOL)
    if fused:
        np.testing.assert_allclose(ours_fused, ref_fused, **TOL)


def test_multi_head_attention_query_and_value_masks_match_keras(api):
    """Keras' MHA reads the query mask from the query's Keras mask (here from `Masking`)."""
    rng = np.random.default_rng(2)
    query, value = _normal(rng, 2, 5, 8), _normal(rng, 2, 6, 8)
    query_mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], bool)
    value_mask = _mask(rng, 2, 6)
    query[~query_mask] = 0.0  # Masking's convention for padded steps
    keras_layer = _keras_layer(keras.layers.MultiHeadAttention, rng, query.shape, value.shape, num_heads=2, key_dim=4)
    ref_out, ref_scores = jax.jit(
        lambda q, v: keras_layer(keras.layers.Masking()(q), v, value_mask=value_mask, return_attention_scores=True)
    )(query, value)
    ours = api.MultiHeadAttention(num_heads=2, key_dim=4)
    out, scores = ours.apply(
        {"params": gqa_jax.keras_params(keras_layer)},
        query,
        value,
        query_mask=query_mask,
        value_mask=value_mask,
        return_attention_scores=True,
    )
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(scores, ref_scores, **TOL)
    assert not np.asarray(scores).transpose(0, 2, 1, 3)[~query_mask].any()  # masked queries: no weights


def test_dropout_in_training_is_unbiased_and_needs_no_fused_kernel(api, random_params):
    """Dropout > 0 with flash_attention=True serves the call (XLA path); its mean is the deterministic output."""
    x = _normal(np.random.default_rng(3), 1, 4, 8)
    config = dict(head_dim=4, num_query_heads=2, num_key_value_heads=1, dropout=0.3)
    plain = api.GroupedQueryAttention(**config)
    layer = api.GroupedQueryAttention(**config, flash_attention=True)
    params = random_params(plain, x, x)
    n = 2000

    @jax.jit
    def run(params, keys):
        def draw(key):
            return layer.apply({"params": params}, x, x, deterministic=False, rngs={"dropout": key})

        scored = layer.apply({"params": params}, x, x, return_attention_scores=True)  # weights: XLA path too
        return jax.vmap(draw)(keys), plain.apply({"params": params}, x, x), scored

    draws, expected, (out, scores) = run(params, jax.random.split(jax.random.key(1), n))
    draws = np.asarray(draws)
    assert not np.allclose(draws[0], expected, atol=1e-3)
    np.testing.assert_array_less(np.abs(draws.mean(0) - expected), 5 * draws.std(0) / np.sqrt(n) + 1e-6)
    np.testing.assert_allclose(out, expected, **TOL)
    np.testing.assert_allclose(scores.sum(-1), 1.0, **TOL)


def test_flash_attention_true_without_a_fused_kernel_is_a_clear_error(api, monkeypatch):
    monkeypatch.setattr("gqa_jax.modules.implementation.implementations", lambda: ("xla",))
    x = _normal(np.random.default_rng(4), 1, 4, 8)
    layer = api.GroupedQueryAttention(head_dim=4, num_query_heads=2, num_key_value_heads=1, flash_attention=True)
    with pytest.raises(ValueError, match="flash_attention=True needs a fused attention implementation"):
        jax.eval_shape(lambda: layer.init(jax.random.key(0), x, x))


def test_flash_attention_false_and_none_agree_with_explicit_xla(api, random_params):
    x = _normal(np.random.default_rng(5), 2, 6, 8)
    layers = [api.MultiHeadAttention(num_heads=2, key_dim=4, flash_attention=flag) for flag in (None, False)]
    xla = api.MultiHeadAttention(num_heads=2, key_dim=4, implementation="xla")
    params = random_params(xla, x, x)
    outs = jax.jit(lambda p: [m.apply({"params": p}, x, x, use_causal_mask=True) for m in layers + [xla]])(params)
    for out in outs[:-1]:
        np.testing.assert_allclose(out, outs[-1], **TOL)


@pytest.mark.parametrize("name,contract", [("glorot_uniform", 1), ("glorot_uniform", 2), ("he_normal", 1)])
def test_keras_initializer_names_match_keras_distributions(name, contract):
    """A Keras name gives Keras' distribution for the [D, N, H] and [N, H, D] kernels (EinsumDense fans)."""
    D, N, H = 96, 4, 32
    in_shape, equation, out_shape = (
        ((1, D), "bd,dnh->bnh", (N, H)) if contract == 1 else ((1, N, H), "bnh,nhd->bd", (D,))
    )
    keras_init = type(keras.initializers.get(name))(seed=0)
    keras_dense = keras.layers.EinsumDense(equation, output_shape=out_shape, kernel_initializer=keras_init)
    keras_dense.build(in_shape)
    keras_kernel = np.asarray(keras_dense.kernel.value)
    ours = gqa_jax.modules.EinsumDense(features=out_shape, contract=contract, kernel_init=name)
    kernel = ours.init(jax.random.key(0), jnp.ones(in_shape))["params"]["kernel"]
    assert kernel.shape == keras_kernel.shape
    np.testing.assert_allclose(np.std(kernel), np.std(keras_kernel), rtol=0.05)
    np.testing.assert_allclose(np.abs(kernel).max(), np.abs(keras_kernel).max(), rtol=0.15)


def test_unknown_initializer_name_is_a_clear_error(api):
    with pytest.raises(ValueError, match="unknown Keras initializer name init='glorot'"):
        layer = api.GroupedQueryAttention(head_dim=4, num_query_heads=2, num_key_value_heads=1, kernel_init="glorot")
        layer.init(jax.random.key(0), jnp.ones((1, 2, 4)), jnp.ones((1, 2, 4)))
