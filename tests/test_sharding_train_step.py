"""A train step of the reference decoder on a (2, 4) ``(data, model)`` mesh, placed by its logical axis names.

In a subprocess with 8 simulated CPU devices: the linen decoder
(``DecoderConfig(logical_axes=True)``) gets random parameters, placed by their
logical names (``flax.linen.get_partition_spec``, then
``flax.linen.logical_to_mesh_sharding`` with `gqa_jax.sharding.logical_axis_rules`:
heads, MLP and vocabulary over ``model``), and one jitted SGD step runs on a
batch split over ``data``. Its loss, gradients and updated parameters equal
the same step on one device; the updated parameters keep their shardings; the
compiled step reduces gradients and partial sums with all-reduces only: no
all-gather (q/k/v, K/V heads and weights stay where they are) and no
all-to-all. The step runs on a mesh of automatic axes (``jax.jit`` propagates
the shardings) and on one of explicit axes (``jax.set_mesh`` with
``AxisType.Explicit``: every array's sharding is part of its type), and for
the NNX decoder (`gqa_jax.nnx.Decoder`, same names as ``nnx.Param`` metadata)
on the explicit mesh.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.multidevice import run_on_cpu_devices

# The model, its parameters, one SGD step and the checks both meshes share.
MODEL = textwrap.dedent("""
    import re
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from gqa_jax.models import Decoder, DecoderConfig
    from gqa_jax.sharding import logical_axis_rules

    config = DecoderConfig(vocab_size=32, num_layers=2, model_dim=32, num_heads=8, num_kv_heads=4, head_dim=8,
                           mlp_dim=64, logical_axes=True)
    model = Decoder(config)
    tokens = np.random.default_rng(0).integers(0, 32, (4, 9)).astype(np.int32)
    # The parameters' shapes and logical names without running the initializers (compiling them costs seconds);
    # fresh normals, scaled by 1/sqrt(fan-in), stand in for the values.
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens[:, :-1]))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]), s.dtype),
                          nn.meta.unbox(boxed))

    def placement(axis_type):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        return mesh, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, logical_axis_rules())

    def sgd_step(loss):
        @jax.jit
        def step(params, tokens):
            value, grads = jax.value_and_grad(loss)(params, tokens)
            return value, grads, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return step

    def check_equal(got, want, shardings):
        (value, grads, new_params), (ref_value, ref_grads, ref_params) = got, want
        assert abs(float(value) - float(ref_value)) < 1e-5, (float(value), float(ref_value))
        for name, tree, ref in (("grads", grads, ref_grads), ("params", new_params, ref_params)):
            err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))
            assert err < 1e-5, (name, err)
        for p, s in zip(jax.tree.leaves(new_params), jax.tree.leaves(shardings)):
            assert p.sharding.is_equivalent_to(s, p.ndim), (p.sharding, s)

    def one_hot_loss(logits, tokens):
        # On an explicit mesh the logits [B, T, V] are typed as vocabulary-sharded, where gathering each target's
        # logit (jnp.take_along_axis) is a ShardingTypeError; the one-hot product is the same loss on the shards.
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(tokens[:, 1:], 32), axis=-1))

    def explicit_step(loss, params, shardings, mesh):
        # The SGD step on one device and on the explicit mesh: (want, got, compiled).
        step = sgd_step(loss)
        want = step(params, tokens)
        with jax.set_mesh(mesh):
            placed = jax.device_put(params, shardings)
            batch = jax.device_put(tokens, P("data"))
            compiled = step.lower(placed, batch).compile()
            return want, compiled(placed, batch), compiled

    def check_collectives(compiled):
        text = compiled.as_text()
        count = lambda op: len(re.findall(rf"\\b{op}(-start)?\\(", text))
        assert count("all-reduce") > 0, "data-parallel gradients need an all-reduce"
        assert count("all-gather") == 0 and count("all-to-all") == 0, (count("all-gather"), count("all-to-all"))
""")

AUTO = MODEL + textwrap.dedent("""
    mesh, shardings = placement(AxisType.Auto)
    attention = shardings["layers_0"]["attention"]
    assert attention["query"].spec == P(None, "model", None), attention["query"]
    assert attention["key"].spec == P(None, "model", None), attention["key"]
    assert attention["output"].spec == P("model", None, None), attention["output"]
    assert shardings["embed"]["embedding"].spec == P("model", None), shardings["embed"]

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    step = sgd_step(loss)
    want = step(params, tokens)  # one device
    placed = jax.device_put(params, shardings)
    batch = jax.device_put(tokens, NamedSharding(mesh, P("data")))
    check_equal(step(placed, batch), want, shardings)
    print("ok step")
    check_collectives(step.lower(placed, batch).compile())
    print("ok hlo")
""")

EXPLICIT = MODEL + textwrap.dedent("""
    mesh, shardings = placement(AxisType.Explicit)
    want, got, compiled = explicit_step(
        lambda params, tokens: one_hot_loss(model.apply({"params": params}, tokens[:, :-1]), tokens),
        params, shardings, mesh)
    check_equal(got, want, shardings)
    for g, s in zip(jax.tree.leaves(got[1]), jax.tree.leaves(shardings)):
        assert g.sharding.is_equivalent_to(s, g.ndim), ("grad", g.sharding, s)
    assert jax.typeof(got[2]["embed"]["embedding"]).sharding.spec == P("model", None), jax.typeof(got[2]["embed"])
    print("ok step")
    check_collectives(compiled)
    print("ok hlo")
""")


# The NNX decoder (its parameters always carry logical names) on the explicit mesh: the same step and checks.
NNX_EXPLICIT = MODEL + textwrap.dedent("""
    from flax import nnx
    from gqa_jax.nnx import Decoder as NNXDecoder

    nnx_model = NNXDecoder(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(nnx_model)
    state = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[0]), x.dtype), state)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    nnx_shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh, logical_axis_rules())
    assert nnx_shardings["embed"]["embedding"].spec == P("model", None), nnx_shardings["embed"]

    want, got, compiled = explicit_step(
        lambda state, tokens: one_hot_loss(nnx.merge(graphdef, state)(tokens[:, :-1]), tokens),
        state, nnx_shardings, mesh)
    check_equal(got, want, nnx_shardings)
    print("ok step")
    check_collectives(compiled)
    print("ok hlo")
""")


@pytest.mark.slow  # 8 simulated devices in a subprocess
@pytest.mark.parametrize("script", [AUTO, EXPLICIT, NNX_EXPLICIT], ids=["linen_auto", "linen_explicit", "nnx_explicit"])
def test_decoder_train_step_on_a_2x4_mesh_equals_one_device_without_all_gather(script):
    result = run_on_cpu_devices(script, 8)
    assert result.stdout.count("ok ") == 2, result.stdout
