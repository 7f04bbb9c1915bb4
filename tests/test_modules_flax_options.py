"""The layers' Flax options against flax's own attention and a float64 NumPy layer.

``dropout_rng`` / NNX ``rngs=``, ``deterministic`` (field and call),
``broadcast_dropout``, ``sow_weights`` (field and call, with and without
``attention_fn``; NNX through ``nnx.capture``), ``return_attention_scores`` on
``CachedMultiHeadAttention``, ``precision`` in the attention's matrix products,
``out_kernel_init`` and ``attention_fn``, on `GroupedQueryAttention` and
`MultiHeadAttention`, linen and NNX (the ``api`` fixture).

The oracle for dropout is `flax.linen.dot_product_attention` (or
`flax.linen.MultiHeadDotProductAttention`) on the same weights, with the
key/value heads repeated to ``N`` and the same key: flax draws its keep mask
``[B, N, T, S]`` (``[1, 1, T, S]`` when broadcast) with the same
`jax.random.bernoulli` call, so the dropped weights are the same ones.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gqa_jax
import gqa_jax.nnx
from tests.devices import has_gpu
from tests.reference import reference_attention

B, T, D, N, K, H = 2, 5, 8, 4, 2, 4
RATE = 0.5
TOL = dict(rtol=1e-5, atol=1e-5)
P = jax.lax.Precision


def _gqa(api, **fields):
    return api.GroupedQueryAttention(head_dim=H, num_query_heads=N, num_key_value_heads=K, **fields)


def _mha(api, **fields):
    return api.MultiHeadAttention(num_heads=N, key_dim=H, **fields)


# The layer builder and its queries per key/value head G.
KINDS = {"gqa": (_gqa, N // K), "mha": (_mha, 1)}


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def _layer(api, kind, **fields):
    make, _ = KINDS[kind]
    return make(api, **fields)


def _heads(params, name, x, repeats=1):
    """``x [B, L, D] -> [B, L, heads * repeats, H]``, each head repeated ``repeats`` times (float32, jnp)."""
    p = params[name]
    return jnp.repeat(jnp.einsum("bld,dnh->blnh", x, p["kernel"]) + p["bias"], repeats, axis=2)


def _output(params, heads_BTNH):
    p = params["attention_output"]
    return jnp.einsum("btnh,nhd->btd", heads_BTNH, p["kernel"]) + p["bias"]


def flax_layer(params, x, G, *, mask=None, dropout_rng=None, rate=0.0, broadcast=False):
    """The layer with `flax.linen.dot_product_attention` as its attention (K/V heads repeated ``G`` times)."""
    out = nn.dot_product_attention(
        _heads(params, "query", x),
        _heads(params, "key", x, G),
        _heads(params, "value", x, G),
        mask=mask,
        dropout_rng=dropout_rng,
        dropout_rate=rate,
        broadcast_dropout=broadcast,
        deterministic=rate == 0.0,
    )
    return _output(params, out)


def flax_mhdpa_params(params, G) -> dict:
    """Our parameters as `flax.linen.MultiHeadDotProductAttention`'s (K/V heads repeated ``G`` times)."""

    def repeated(name):
        return {"kernel": np.repeat(params[name]["kernel"], G, 1), "bias": np.repeat(params[name]["bias"], G, 0)}

    return {"query": params["query"], "key": repeated("key"), "value": repeated("value"),
            "out": params["attention_output"]}


def numpy_layer(params, x, G, *, scale=None, mask=None, is_causal=False):
    """The layer in float64 (`tests.reference.reference_attention`): ``(output [B,T,D], weights [B,N,T,S])``."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)

    def heads(name):
        return np.einsum("btd,dnh->btnh", x, p[name]["kernel"]) + p[name]["bias"]

    out, weights = reference_attention(heads("query"), heads("key"), heads("value"), mask=mask, scale=scale,
                                       is_causal=is_causal, query_offset=0)
    return np.einsum("btnh,nhd->btd", out, p["attention_output"]["kernel"]) + p["attention_output"]["bias"], weights


def apply_with_key(api, layer, params, x, key, **kwargs):
    """The layer with an explicit dropout key: linen's ``dropout_rng=``, NNX's ``rngs=`` (flax NNX's name)."""
    if api.name == "linen":
        return layer.apply({"params": params}, x, dropout_rng=key, **kwargs)
    return layer.apply({"params": params}, x, rngs={"dropout": key}, **kwargs)


def _differs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > 1e-2


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("broadcast", [False, True], ids=["per_row_head", "broadcast_dropout"])
def test_dropout_key_matches_flax_dot_product_attention(api, kind, random_params, x, broadcast):
    """``dropout_rng=`` (NNX: ``rngs=``) drops the same weights as flax's function with that key."""
    layer = _layer(api, kind, dropout=RATE, broadcast_dropout=broadcast)
    params = random_params(layer, x, seed=1)
    key = jax.random.key(3)
    got = apply_with_key(api, layer, params, x, key, deterministic=False)
    G = KINDS[kind][1]
    want = flax_layer(params, x, G, dropout_rng=key, rate=RATE, broadcast=broadcast)
    np.testing.assert_allclose(got, want, **TOL)
    assert _differs(got, flax_layer(params, x, G)), "dropout changed nothing"
    assert _differs(got, flax_layer(params, x, G, dropout_rng=key, rate=RATE, broadcast=not broadcast))


@pytest.mark.parametrize("broadcast", [False, True], ids=["per_row_head", "broadcast_dropout"])
def test_linen_dropout_stream_and_dropout_rng_as_flax_mhdpa(kind, random_params, x, broadcast):
    """Linen: the ``"dropout"`` rng stream gives flax MultiHeadDotProductAttention's numbers; ``dropout_rng`` wins over it."""
    layer = _layer(gqa_jax.modules, kind, dropout=RATE, broadcast_dropout=broadcast)
    params = random_params(layer, x, seed=1)
    G = KINDS[kind][1]
    flax_layer_ = nn.MultiHeadDotProductAttention(
        num_heads=N, qkv_features=N * H, out_features=D, dropout_rate=RATE, broadcast_dropout=broadcast
    )
    fparams = {"params": flax_mhdpa_params(params, G)}
    stream, key = jax.random.key(5), jax.random.key(6)
    got = layer.apply({"params": params}, x, deterministic=False, rngs={"dropout": stream})
    want = flax_layer_.apply(fparams, x, deterministic=False, rngs={"dropout": stream})
    np.testing.assert_allclose(got, want, **TOL)
    got = layer.apply({"params": params}, x, deterministic=False, rngs={"dropout": stream}, dropout_rng=key)
    want = flax_layer_.apply(fparams, x, deterministic=False, rngs={"dropout": stream}, dropout_rng=key)
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(got, flax_layer(params, x, G, dropout_rng=key, rate=RATE, broadcast=broadcast), **TOL)


# (field, call, dropout on): the call's flag wins; without either, no dropout (linen's field None, NNX's True).
DETERMINISTIC = {
    "default": ("omit", None, False),
    "default_call_false": ("omit", False, True),
    "field_false": (False, None, True),
    "field_false_call_true": (False, True, False),
    "field_true": (True, None, False),
    "field_true_call_false": (True, False, True),
}


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_deterministic_field_and_call(api, kind, random_params, x, case):
    field, call, dropped = DETERMINISTIC[case]
    fields = {} if field == "omit" else {"deterministic": field}
    layer = _layer(api, kind, dropout=RATE, **fields)
    params = random_params(layer, x, seed=1)
    kwargs = {} if call is None else {"deterministic": call}
    G = KINDS[kind][1]
    if dropped:
        key = jax.random.key(7)
        np.testing.assert_allclose(apply_with_key(api, layer, params, x, key, **kwargs),
                                   flax_layer(params, x, G, dropout_rng=key, rate=RATE), **TOL)
    else:  # no key given: linen would fail to draw one, NNX would draw from its own stream
        np.testing.assert_allclose(layer.apply({"params": params}, x, **kwargs), flax_layer(params, x, G), **TOL)


# ---------------------------------------------------------------- sow_weights


def test_linen_sow_weights_as_flax_mhdpa(kind, random_params, x):
    """``sow_weights`` puts flax's ``intermediates/attention_weights`` (a 1-tuple of ``[B, N, T, S]``) in place."""
    layer = _layer(gqa_jax.modules, kind, sow_weights=True)
    params = random_params(layer, x, seed=1)
    G = KINDS[kind][1]
    out, state = layer.apply({"params": params}, x, use_causal_mask=True, mutable=["intermediates"])
    flax_layer_ = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, out_features=D)
    want_out, want_state = flax_layer_.apply(
        {"params": flax_mhdpa_params(params, G)}, x, mask=nn.make_causal_mask(x[..., 0]), sow_weights=True,
        mutable=["intermediates"],
    )
    (weights,) = state["intermediates"]["attention_weights"]
    (want_weights,) = want_state["intermediates"]["attention_weights"]
    assert weights.shape == (B, N, T, T)
    np.testing.assert_allclose(weights, want_weights, **TOL)
    np.testing.assert_allclose(out, want_out, **TOL)
    _, state = layer.clone(sow_weights=False).apply({"params": params}, x, mutable=["intermediates"])
    assert not state
    # flax's call argument: on over the field's False, off over its True
    _, state = layer.clone(sow_weights=False).apply({"params": params}, x, use_causal_mask=True, sow_weights=True,
                                                    mutable=["intermediates"])
    np.testing.assert_allclose(state["intermediates"]["attention_weights"][0], want_weights, **TOL)
    _, state = layer.apply({"params": params}, x, sow_weights=False, mutable=["intermediates"])
    assert not state


def sowing_attention(query, key, value, mask=None, module=None, **_):
    """A custom attention of flax's signature that sows, through ``module``, under names of its own."""
    weights = nn.dot_product_attention_weights(query, key, mask=mask)
    if module is not None:
        module.sow("intermediates", "custom_weights", weights)
        module.sow("intermediates", "max_weight", weights.max())
    return jnp.einsum("bnts,bsnh->btnh", weights, value)


@pytest.mark.parametrize(
    "attention_fn, name",
    [(nn.dot_product_attention, "attention_weights"), (sowing_attention, "custom_weights")],
    ids=["flax_function", "custom_function"],
)
def test_linen_sow_weights_with_attention_fn_as_flax_mhdpa(kind, random_params, x, attention_fn, name):
    """With ``attention_fn``, ``sow_weights`` hands the function ``module=`` the layer, as flax's layer does.

    What the function sows is what ends up in ``"intermediates"``: the same tree as
    `flax.linen.MultiHeadDotProductAttention` with that function on the same weights (and the
    float64 weights); without ``sow_weights`` it gets no ``module`` and nothing is sown.
    """
    G = KINDS[kind][1]
    layer = _layer(gqa_jax.modules, kind, attention_fn=attention_fn, sow_weights=True)
    params = random_params(layer, x, seed=1)
    flax_layer_ = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, out_features=D,
                                                  attention_fn=attention_fn)
    want_out, want_state = flax_layer_.apply(
        {"params": flax_mhdpa_params(params, G)}, x, mask=nn.make_causal_mask(x[..., 0]), sow_weights=True,
        mutable=["intermediates"],
    )
    want_64, want_weights_64 = numpy_layer(params, x, G, is_causal=True)
    for fields, call in (({}, {}), ({"sow_weights": False}, {"sow_weights": True})):
        out, state = layer.clone(**fields).apply({"params": params}, x, use_causal_mask=True, **call,
                                                 mutable=["intermediates"])
        assert jax.tree.structure(state) == jax.tree.structure(want_state)
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, **TOL), state, want_state)
        (weights,) = state["intermediates"][name]
        assert weights.shape == (B, N, T, T)
        np.testing.assert_allclose(weights, want_weights_64, **TOL)
        np.testing.assert_allclose(out, want_out, **TOL)
        np.testing.assert_allclose(out, want_64, **TOL)
    _, state = layer.apply({"params": params}, x, use_causal_mask=True, sow_weights=False, mutable=["intermediates"])
    assert not state
    _, state = flax_layer_.apply({"params": flax_mhdpa_params(params, G)}, x, mutable=["intermediates"])
    assert not state


def _nnx_layer(kind, params, **fields):
    """The NNX layer of ``kind`` with the linen ``params``."""
    cls, args = (
        (gqa_jax.nnx.GroupedQueryAttention, (H, N, K)) if kind == "gqa" else (gqa_jax.nnx.MultiHeadAttention, (N, H))
    )
    layer = cls(*args, in_features=D, rngs=nnx.Rngs(0), **fields)
    gqa_jax.nnx.load_linen_params(layer, params)
    return layer


def flax_nnx_mha(params, G, **fields) -> nnx.MultiHeadAttention:
    """flax's NNX ``MultiHeadAttention`` with our parameters (``num_kv_heads = N // G``: it groups heads as we do)."""
    layer = nnx.MultiHeadAttention(N, D, N * H, D, num_kv_heads=N // G, decode=False, rngs=nnx.Rngs(0), **fields)
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value"), ("attention_output", "out")):
        for leaf in ("kernel", "bias"):
            getattr(getattr(layer, theirs), leaf)[...] = jnp.asarray(params[ours][leaf])
    return layer


@pytest.mark.parametrize("attention_fn", [None, nnx.dot_product_attention], ids=["own", "flax_nnx_function"])
def test_nnx_sow_weights_as_flax_nnx_mha(kind, random_params, x, attention_fn):
    """NNX: ``nnx.capture(layer, nnx.Intermediate)`` gives flax's NNX ``MultiHeadAttention`` weights, with no warning.

    flax 0.12.8 deprecates ``Module.sow`` outside ``nnx.capture`` (a DeprecationWarning, and a copy
    kept on the module per call), so the layer sows only inside a capture; there the weights equal
    flax's NNX layer's on the same parameters (``sow_weights=True`` in its call) and the float64 ones.
    The call's ``sow_weights`` overrides the field either way, as in flax.
    """
    G = KINDS[kind][1]
    params = random_params(_layer(gqa_jax.modules, kind), x, seed=1)
    fn = {} if attention_fn is None else {"attention_fn": attention_fn}
    layer = _nnx_layer(kind, params, sow_weights=True, **fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want_out, want = nnx.capture(flax_nnx_mha(params, G, **fn), nnx.Intermediate)(
            x, mask=nnx.make_causal_mask(x[..., 0]), sow_weights=True
        )
        out, got = nnx.capture(layer, nnx.Intermediate)(x, use_causal_mask=True)
        plain = layer(x, use_causal_mask=True)
        _, off = nnx.capture(layer, nnx.Intermediate)(x, use_causal_mask=True, sow_weights=False)
        _, on = nnx.capture(_nnx_layer(kind, params, **fn), nnx.Intermediate)(x, use_causal_mask=True,
                                                                              sow_weights=True)
    want_64, want_weights_64 = numpy_layer(params, x, G, is_causal=True)
    (weights,) = got["attention_weights"].get_value()
    (want_weights,) = want["attention_weights"].get_value()
    assert set(got) == set(want) == set(on) == {"attention_weights"}
    assert weights.shape == (B, N, T, T)
    np.testing.assert_allclose(weights, want_weights, **TOL)
    np.testing.assert_allclose(weights, want_weights_64, **TOL)
    np.testing.assert_allclose(on["attention_weights"].get_value()[0], want_weights, **TOL)
    for y in (out, plain):
        np.testing.assert_allclose(y, want_out, **TOL)
        np.testing.assert_allclose(y, want_64, **TOL)
    assert not off
    assert not nnx.state(layer, nnx.Intermediate), "a call outside nnx.capture left weights on the layer"


# ---------------------------------------------------------------- CachedMultiHeadAttention scores


def test_cached_mha_return_attention_scores(api, random_params, x):
    """With a cache and per-row indices the scores are the float64 weights over the spliced cache."""
    S, T_new = 7, 2
    rng = np.random.default_rng(4)
    layer = api.CachedMultiHeadAttention(num_heads=N, key_dim=H)
    params = random_params(layer, x, seed=1)
    cache = rng.standard_normal((B, 2, S, N, H)).astype(np.float32)
    new = x[:, :T_new]
    index = np.array([1, 4], np.int32)
    out, scores, new_cache = layer.apply({"params": params}, new, new, cache=cache, cache_update_index=index,
                                         use_causal_mask=True, return_attention_scores=True)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def heads(name):
        return np.einsum("btd,dnh->btnh", new, p[name]["kernel"]) + p[name]["bias"]

    want_cache = cache.astype(np.float64)
    for b, i in enumerate(index):
        want_cache[b, 0, i:i + T_new], want_cache[b, 1, i:i + T_new] = heads("key")[b], heads("value")[b]
    want, want_scores = reference_attention(heads("query"), want_cache[:, 0], want_cache[:, 1], is_causal=True,
                                            query_offset=index)
    want = np.einsum("btnh,nhd->btd", want, p["attention_output"]["kernel"]) + p["attention_output"]["bias"]
    assert scores.shape == (B, N, T_new, S)
    np.testing.assert_allclose(scores, want_scores, **TOL)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(new_cache, want_cache, **TOL)
    out_static, scores_static, same_cache = layer.apply({"params": params}, new, cache=new_cache,
                                                        return_attention_scores=True)
    want_static, want_scores_static = reference_attention(heads("query"), want_cache[:, 0], want_cache[:, 1])
    np.testing.assert_allclose(scores_static, want_scores_static, **TOL)
    np.testing.assert_allclose(same_cache, new_cache)
    out_plain, scores_plain = layer.apply({"params": params}, x, x, return_attention_scores=True)
    want_plain, want_scores_plain = numpy_layer(params, x, 1)
    np.testing.assert_allclose(scores_plain, want_scores_plain, **TOL)
    np.testing.assert_allclose(out_plain, want_plain, **TOL)


# ---------------------------------------------------------------- precision


def _dot_precisions(jaxpr) -> list:
    """The ``precision`` of every ``dot_general`` in ``jaxpr`` and its sub-jaxprs (jit, custom_vjp ...)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _dot_precisions(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _dot_precisions(sub)
    return found


@pytest.mark.parametrize("precision", [P.HIGH, P.DEFAULT, "high"], ids=["HIGH", "DEFAULT", "name_high"])
def test_precision_reaches_the_attention_matmuls(api, kind, x, precision):
    """All six products (q, k, v projections, logits, weights @ v, output) run at the layer's precision.

    The test session runs at ``jax_default_matmul_precision="highest"`` (conftest), so a product the
    layer's ``precision`` missed shows up as HIGHEST.
    """
    layer = _layer(api, kind, precision=precision)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), variables)
    jaxpr = jax.make_jaxpr(lambda v: layer.apply(v, x, use_causal_mask=True))(variables)
    want = P(precision) if isinstance(precision, P) else P.HIGH
    assert _dot_precisions(jaxpr.jaxpr) == [(want, want)] * 6
    default = _layer(api, kind)
    assert _dot_precisions(jax.make_jaxpr(lambda v: default.apply(v, x))(variables).jaxpr) == [(P.HIGHEST,) * 2] * 6


@pytest.mark.skipif(not has_gpu(), reason="float32 DEFAULT and HIGHEST give the same products on a CPU")
def test_precision_default_vs_highest_observable_on_gpu(random_params):
    """On a GPU, DEFAULT float32 products (TF32) are measurably further from float64 than HIGHEST ones."""
    x = np.random.default_rng(0).standard_normal((2, 64, 256)).astype(np.float32)
    layer = gqa_jax.GroupedQueryAttention(head_dim=64, num_query_heads=4, num_key_value_heads=2, flash_attention=False)
    params = random_params(layer, x, seed=1)
    want, _ = numpy_layer(params, x, 2)
    errors = {}
    for precision in (P.DEFAULT, P.HIGHEST):
        got = layer.clone(precision=precision).apply({"params": params}, x)
        errors[precision] = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert errors[P.HIGHEST] < 1e-4, errors
    assert errors[P.DEFAULT] > 10 * errors[P.HIGHEST], errors


# ---------------------------------------------------------------- out_kernel_init


def test_out_kernel_init(api, kind, x):
    """``out_kernel_init`` initializes ``attention_output [N, H, D]`` only; without it ``kernel_init`` does."""
    seen = []

    def out_init(key, shape, dtype=jnp.float32):
        seen.append(tuple(shape))
        return jnp.full(shape, -0.5, dtype)

    params = _layer(api, kind, kernel_init=nn.initializers.constant(0.25), out_kernel_init=out_init).init(
        jax.random.key(0), x)["params"]
    assert seen and set(seen) == {(N, H, D)}
    np.testing.assert_array_equal(params["attention_output"]["kernel"], np.full((N, H, D), -0.5))
    for name in ("query", "key", "value"):
        np.testing.assert_array_equal(params[name]["kernel"], np.full(params[name]["kernel"].shape, 0.25))
    params = _layer(api, kind, kernel_init=nn.initializers.constant(0.25), out_kernel_init="zeros").init(
        jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(params["attention_output"]["kernel"], np.zeros((N, H, D)))
    params = _layer(api, kind, kernel_init=nn.initializers.constant(0.25)).init(jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(params["attention_output"]["kernel"], np.full((N, H, D), 0.25))


def test_linen_out_kernel_init_carries_logical_axis_names(kind, x):
    """A logically partitioned ``out_kernel_init`` labels ``attention_output``'s ``[N, H, D]`` kernel."""
    names = ("q_heads", "head_dim", "embed")
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
    variables = _layer(gqa_jax.modules, kind, out_kernel_init=init).init(jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["attention_output"]["kernel"] == jax.sharding.PartitionSpec(*names)
    assert specs["query"]["kernel"] == jax.sharding.PartitionSpec()


# ---------------------------------------------------------------- attention_fn


def test_attention_fn_flax_function_with_masks(api, kind, random_params, x):
    """``attention_fn=flax.linen.dot_product_attention`` with causal + padding masks == flax's layer."""
    layer = _layer(api, kind, attention_fn=nn.dot_product_attention)
    params = random_params(layer, x, seed=1)
    G = KINDS[kind][1]
    valid = np.arange(T)[None, :] < np.array([[T], [3]])  # [B, S]
    got = layer.apply({"params": params}, x, use_causal_mask=True, mask=jnp.asarray(valid[:, None, None, :]))
    want_mask = nn.combine_masks(nn.make_causal_mask(x[..., 0]), jnp.asarray(valid[:, None, None, :]))
    np.testing.assert_allclose(got, flax_layer(params, x, G, mask=want_mask), **TOL)
    assert _differs(got, flax_layer(params, x, G))


def test_attention_fn_receives_flax_arguments(api, kind, random_params, x):
    """The function gets BTNH inputs with K/V repeated to ``N`` heads, the rules in ``mask``; its output is used."""
    seen = {}

    def attention_fn(query, key, value, **kwargs):
        seen.update(query=query.shape, key=key.shape, value=value.shape, **kwargs)
        return jnp.ones_like(query)

    layer = _layer(api, kind, attention_fn=attention_fn)
    params = random_params(layer, x, seed=1)
    got = layer.apply({"params": params}, x, use_causal_mask=True)
    assert seen["query"] == seen["key"] == seen["value"] == (B, T, N, H)
    mask = np.broadcast_to(np.asarray(seen["mask"]), (B, N, T, T))
    np.testing.assert_array_equal(mask, np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, N, T, T)))
    assert seen["dropout_rate"] == 0.0 and seen["deterministic"] is True
    assert seen["broadcast_dropout"] is False
    np.testing.assert_allclose(got, _output(params, jnp.ones((B, T, N, H))), **TOL)


def test_attention_fn_gets_only_the_keywords_it_names(api, kind, random_params, x):
    """As in flax, a function without ``**kwargs`` gets the keywords it names; one without ``mask`` refuses rules."""
    G = KINDS[kind][1]

    def attention_fn(query, key, value, mask=None):
        return nn.dot_product_attention(query, key, value, mask=mask)

    def unmasked_fn(query, key, value):
        return nn.dot_product_attention(query, key, value)

    params = random_params(_layer(api, kind), x, seed=1)
    got = _layer(api, kind, attention_fn=attention_fn).apply({"params": params}, x, use_causal_mask=True)
    np.testing.assert_allclose(got, flax_layer(params, x, G, mask=nn.make_causal_mask(x[..., 0])), **TOL)
    layer = _layer(api, kind, attention_fn=unmasked_fn)
    np.testing.assert_allclose(layer.apply({"params": params}, x), flax_layer(params, x, G), **TOL)
    with pytest.raises(ValueError, match="attention_fn takes no mask= argument"):
        layer.apply({"params": params}, x, use_causal_mask=True)


def test_attention_fn_scale_and_dropout(api, kind, random_params, x):
    """A ``scale`` reaches the function (float64 oracle); dropout goes to it with the call's key and flags."""
    G = KINDS[kind][1]
    layer = _layer(api, kind, attention_fn=nn.dot_product_attention, scale=0.3)
    params = random_params(layer, x, seed=1)
    want, _ = numpy_layer(params, x, G, scale=0.3)
    np.testing.assert_allclose(layer.apply({"params": params}, x), want, **TOL)
    key = jax.random.key(8)
    for broadcast in (False, True):
        layer = _layer(api, kind, attention_fn=nn.dot_product_attention, dropout=RATE, broadcast_dropout=broadcast)
        got = apply_with_key(api, layer, params, x, key, deterministic=False)
        np.testing.assert_allclose(
            got, flax_layer(params, x, G, dropout_rng=key, rate=RATE, broadcast=broadcast), **TOL
        )


def test_attention_fn_refuses_weights(api, kind, x):
    """The function returns the output only: asking for the weights is a clear error, not a silent None."""
    layer = _layer(api, kind, attention_fn=nn.dot_product_attention)
    with pytest.raises(ValueError, match="attention_fn returns the output only"):
        layer.init(jax.random.key(0), x, return_attention_scores=True)
