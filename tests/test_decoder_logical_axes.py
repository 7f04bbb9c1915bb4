"""The linen `gqa_jax.models.Decoder` with ``logical_axes=True``: every parameter named, placed by the rules table.

On one device: `flax.linen.get_partition_spec` gives the documented names
for every parameter (attention on `gqa_jax.GroupedQueryAttention`'s names,
embedding, MLP, norms, LM head), the boxed values are the plain ones, and
logits from boxed or unboxed params equal those of the default (unnamed)
decoder. On a (2, 2) simulated CPU mesh (a subprocess): the parameters
initialized in the shards that `gqa_jax.sharding.logical_axis_rules` gives
them, and a train step on batch-sharded tokens equals the one-device step.
"""

from __future__ import annotations

import dataclasses
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gqa_jax.models import Decoder, DecoderConfig
from tests.multidevice import run_on_cpu_devices

CFG = DecoderConfig(vocab_size=16, num_layers=1, model_dim=16, num_heads=4, num_kv_heads=2, mlp_dim=24,
                    attention_bias=True, output_bias=True, sandwich_norms=True, logical_axes=True)


def test_every_parameter_is_named_and_nothing_else_changes():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 5)), jnp.int32)
    boxed = Decoder(CFG).init(jax.random.key(0), tokens)
    plain_model = Decoder(dataclasses.replace(CFG, logical_axes=False))
    plain = plain_model.init(jax.random.key(0), tokens)
    norm = {"scale": P("embed")}
    mlp_in = {"kernel": P("embed", "mlp")}
    assert nn.get_partition_spec(boxed)["params"] == {
        "embed": {"embedding": P("vocab", "embed")},
        "layers_0": {
            "attention_norm": norm,
            "attention": {
                "query": P("embed", "q_heads", "head_dim"), "query_bias": P("q_heads", "head_dim"),
                "key": P("embed", "kv_heads", "head_dim"), "key_bias": P("kv_heads", "head_dim"),
                "value": P("embed", "kv_heads", "head_dim"), "value_bias": P("kv_heads", "head_dim"),
                "output": P("q_heads", "head_dim", "embed"), "output_bias": P("embed"),
            },
            "post_attention_norm": norm,
            "mlp_norm": norm,
            "mlp": {"gate": mlp_in, "up": mlp_in, "down": {"kernel": P("mlp", "embed")}},
            "post_mlp_norm": norm,
        },
        "final_norm": norm,
        "lm_head": {"kernel": P("embed", "vocab")},
    }
    assert all(spec == P() for spec in jax.tree.leaves(nn.get_partition_spec(plain)))
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(boxed), plain)
    want = plain_model.apply(plain, tokens)
    np.testing.assert_array_equal(Decoder(CFG).apply(boxed, tokens), want)
    np.testing.assert_array_equal(Decoder(CFG).apply(nn.meta.unbox(boxed), tokens), want)


SCRIPT = textwrap.dedent("""
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from gqa_jax.models import Decoder, DecoderConfig
    from gqa_jax.sharding import logical_axis_rules

    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    config = DecoderConfig(vocab_size=16, num_layers=1, model_dim=16, num_heads=4, num_kv_heads=2, mlp_dim=32,
                           attention_bias=True, logical_axes=True)
    model = Decoder(config)
    tokens = np.random.default_rng(0).integers(0, 16, (4, 8)).astype(np.int32)
    init = lambda rng: model.init(rng, tokens[:1, :-1])["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0))), mesh,
                                            logical_axis_rules())
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    attention = params["layers_0"]["attention"]
    assert attention["query"].value.sharding.spec == P(None, "model", None), attention["query"].value.sharding
    assert attention["key_bias"].value.sharding.spec == P("model", None)
    assert params["layers_0"]["mlp"]["down"]["kernel"].value.sharding.spec == P("model", None)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = step(jax.device_get(nn.meta.unbox(params)), tokens)
    value, grads = step(params, jax.device_put(tokens, NamedSharding(mesh, P("data"))))
    assert abs(float(value) - float(ref_loss)) < 1e-5, (value, ref_loss)
    errors = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), nn.meta.unbox(grads), ref_grads)
    assert max(jax.tree.leaves(errors)) < 1e-5, errors
    print("ok linen decoder")
""")


def test_linen_decoder_placed_by_the_rules_trains_like_one_device():
    result = run_on_cpu_devices(SCRIPT, 4)
    assert "ok linen decoder" in result.stdout, result.stdout
