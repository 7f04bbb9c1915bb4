"""Logical axis rules (`gqa_jax.sharding.logical`): the table, its errors, and its use on an NNX model.

In process: the MaxText-style table, the specs Flax derives from it for the
NNX decoder's logical names, and the errors. In a subprocess with 4 simulated
CPU devices: the NNX decoder placed on a (2, 2) ``(data, model)`` mesh by
``nn.logical_to_mesh_sharding`` has its heads, MLP and vocabulary split over
``model``; its loss and gradients on a batch-sharded input equal one device;
`with_logical_constraint` sets an activation's sharding under ``jit`` on auto
and explicit meshes.
"""

from __future__ import annotations

import textwrap

import flax.linen as nn
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gqa_jax.models import DecoderConfig
from gqa_jax.nnx import Decoder
from gqa_jax.sharding import logical_axis_rules, logical_to_spec, with_logical_constraint

from tests.multidevice import run_on_cpu_devices


def test_rules_map_batch_to_data_and_heads_mlp_vocab_to_model():
    rules = dict(logical_axis_rules())
    assert rules == {"batch": "data", "length": None, "embed": None, "q_heads": "model", "kv_heads": "model",
                     "head_dim": None, "mlp": "model", "vocab": "model"}
    custom_rules = logical_axis_rules(data=("replica", "fsdp"), model="tensor", sequence="seq", shard_kv_heads=False)
    custom = dict(custom_rules)
    assert custom["batch"] == ("replica", "fsdp") and custom["length"] == "seq"
    assert custom["q_heads"] == "tensor" and custom["kv_heads"] is None
    assert logical_to_spec(("batch", "length", "q_heads", "head_dim")) == P("data", None, "model", None)
    with nn.logical_axis_rules(custom_rules):  # Flax's context rules are the default when set
        assert logical_to_spec(("batch", "kv_heads")) == P(("replica", "fsdp"), None)


def test_nnx_decoder_parameters_get_the_tensor_parallel_specs():
    config = DecoderConfig(vocab_size=16, num_layers=1, model_dim=16, num_heads=4, num_kv_heads=2, mlp_dim=32)
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model)))
    mesh_specs = {path: nn.logical_to_mesh_axes(names, logical_axis_rules()) for path, names in (
        ("query", specs["layers_0"]["attention"]["query"]), ("key", specs["layers_0"]["attention"]["key"]),
        ("output", specs["layers_0"]["attention"]["output"]), ("gate", specs["layers_0"]["mlp"]["gate"]["kernel"]),
        ("down", specs["layers_0"]["mlp"]["down"]["kernel"]), ("embedding", specs["embed"]["embedding"]),
        ("norm", specs["final_norm"]["scale"]))}
    assert mesh_specs == {"query": P(None, "model", None), "key": P(None, "model", None),
                          "output": P("model", None, None), "gate": P(None, "model"), "down": P("model", None),
                          "embedding": P("model", None), "norm": P(None)}, mesh_specs


def test_errors_and_no_mesh():
    with pytest.raises(ValueError, match="data and model both name mesh axis 'x'"):
        logical_axis_rules(data="x", model="x")
    with pytest.raises(TypeError, match="model must be a mesh axis name"):
        logical_axis_rules(model=3)
    with pytest.raises(TypeError, match="shard_kv_heads must be True or False"):
        logical_axis_rules(shard_kv_heads="yes")
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"len\(names\)=3"):
        with_logical_constraint(x, ("batch", "length", "embed"))
    with pytest.raises(TypeError, match="names must be a sequence"):
        logical_to_spec("batch")
    assert with_logical_constraint(x, ("batch", "embed")) is x  # one device: nothing to constrain


SCRIPT = textwrap.dedent("""
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from gqa_jax.models import DecoderConfig
    from gqa_jax.nnx import Decoder
    from gqa_jax.sharding import logical_axis_rules, with_logical_constraint

    rules = logical_axis_rules()
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    config = DecoderConfig(vocab_size=16, num_layers=1, model_dim=16, num_heads=4, num_kv_heads=2, mlp_dim=32)
    model = Decoder(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 16, (4, 8)).astype(np.int32)

    def loss(model, tokens):
        logits = model(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    step = nnx.jit(nnx.value_and_grad(loss))
    ref_loss, ref_grads = step(model, tokens)
    state = nnx.state(model)
    shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    assert model.layers_0.attention.query[...].sharding.spec == P(None, "model", None)
    value, grads = step(model, jax.device_put(tokens, NamedSharding(mesh, P("data"))))
    assert abs(float(value) - float(ref_loss)) < 1e-5, (value, ref_loss)
    flat, ref_flat = jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(nnx.to_pure_dict(ref_grads))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat, ref_flat)) < 1e-5
    placed = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    for w, s in zip(placed, jax.tree.leaves(nnx.to_pure_dict(shardings))):
        assert w.sharding.is_equivalent_to(s, w.ndim), (w.sharding, s)
    print("ok nnx decoder")

    x = jnp.arange(4 * 6 * 8, dtype=jnp.float32).reshape(4, 6, 8)
    names = ("batch", "length", "q_heads")
    out = jax.jit(lambda x: with_logical_constraint(2 * x, names, rules=rules, mesh=mesh))(x)
    assert out.sharding.spec == P("data", None, "model"), out.sharding
    np.testing.assert_array_equal(out, 2 * x)
    with jax.set_mesh(mesh):  # the current mesh
        out = jax.jit(lambda x: with_logical_constraint(2 * x, names, rules=rules))(x)
    assert out.sharding.spec == P("data", None, "model"), out.sharding
    explicit = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(explicit):
        traced = []
        def f(x):
            y = with_logical_constraint(2 * x, names)
            traced.append(jax.typeof(y).sharding.spec)  # explicit axes: the sharding is part of the type
            return y
        out = jax.jit(f)(x)
        assert traced == [P("data", None, "model")] and out.sharding.spec == P("data", None, "model"), traced
    print("ok constraint")
""")


def test_nnx_decoder_on_a_mesh_and_activation_constraints():
    result = run_on_cpu_devices(SCRIPT, 4)
    assert "ok nnx decoder" in result.stdout and "ok constraint" in result.stdout, result.stdout
