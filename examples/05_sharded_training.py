"""The reference decoder trained on a ``(data, model)`` device mesh, then decoded there.

Run: ``python examples/05_sharded_training.py [--mesh 4,2] [--steps 60]``

Without enough accelerators the script simulates CPU devices (it sets
``--xla_force_host_platform_device_count`` before jax starts, unless
``XLA_FLAGS`` already names a count). The model is built with
``DecoderConfig(logical_axes=True)``: every parameter names its dims
(``embed``, ``q_heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``), and
`gqa_jax.sharding.logical_axis_rules` maps those names to the mesh, as in
Megatron-style tensor parallelism: the attention projections split their heads
(``N`` of the queries, ``K`` of the keys and values, so a query head lives
with its KV head), the MLP its hidden units and the embedding and LM head the
vocabulary over ``"model"``; the batch (``batch``) is split over ``"data"``.
``flax.linen.get_partition_spec`` reads the names and
``flax.linen.logical_to_mesh_sharding`` turns them into shardings, from which
``jax.jit`` partitions the train step. The task is the one of
``02_train_block.py`` (each sequence repeats a random pattern of ``--period``
tokens). After training, `gqa_jax.decoding.generate` continues prompts with a
cache sharded over batch and KV heads (by the same rules), and gets the same
tokens as the same weights on one device.
"""

from __future__ import annotations

import os
import re

if not re.search(r"xla_force_host_platform_device_count", os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from gqa_jax import KVCache  # noqa: E402
from gqa_jax.decoding import generate  # noqa: E402
from gqa_jax.models import Decoder, DecoderConfig, init_cache  # noqa: E402
from gqa_jax.sharding import logical_axis_rules, logical_to_spec  # noqa: E402


def make_mesh(data: int, model: int) -> jax.sharding.Mesh:
    """A ``(data, model)`` mesh on the default devices, or on simulated CPU devices when there are too few."""
    devices = jax.devices()
    if len(devices) < data * model:
        devices = jax.devices("cpu")
    if len(devices) < data * model:
        raise ValueError(f"the mesh needs {data * model} devices, found {len(devices)}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model}")
    return jax.sharding.Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def repeated_patterns(rng, batch_size: int, length: int, period: int, vocab_size: int) -> jax.Array:
    pattern = jax.random.randint(rng, (batch_size, period), 0, vocab_size)
    return jnp.tile(pattern, (1, math.ceil(length / period)))[:, :length]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="4,2", help="data,model mesh shape")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=24, help="tokens per training sequence")
    parser.add_argument("--period", type=int, default=4, help="length of the repeated pattern")
    parser.add_argument("--vocab-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    data, model_axis = (int(n) for n in args.mesh.split(","))
    mesh = make_mesh(data, model_axis)
    config = DecoderConfig(vocab_size=args.vocab_size, num_layers=args.num_layers, model_dim=64, num_heads=4,
                           num_kv_heads=2, mlp_dim=128, logical_axes=True)
    model = Decoder(config)
    rules = logical_axis_rules()  # batch -> data; q_heads, kv_heads, mlp, vocab -> model; the rest replicated
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))

    def init(rng):
        # init returns each parameter boxed with its logical names (flax.linen.LogicallyPartitioned).
        return model.init(rng, jnp.zeros((1, args.length), jnp.int32))["params"]

    names = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0)))  # logical names, no values computed
    param_shardings = nn.logical_to_mesh_sharding(names, mesh, rules)
    # Initialized directly in their shards: no device ever holds the whole model.
    params = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=param_shardings)(jax.random.key(0))
    optimizer = optax.adamw(args.learning_rate)
    opt_state = jax.jit(optimizer.init)(params)  # the moments follow their parameters' shardings

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def batch(step):
        rng = jax.random.fold_in(jax.random.key(1), step)
        return repeated_patterns(rng, args.batch_size, args.length, args.period, args.vocab_size)

    single_device_loss = float(jax.jit(loss_fn)(jax.device_get(params), batch(0)))
    losses = []
    for step in range(args.steps):
        params, opt_state, loss = train_step(params, opt_state, jax.device_put(batch(step), batch_sharding))
        losses.append(float(loss))
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.3f}")
    print(f"first loss on the mesh {losses[0]:.6f}, on one device {single_device_loss:.6f}")
    query_spec = params["layers_0"]["attention"]["query"].sharding.spec
    print(f"mesh {dict(mesh.shape)}; layers_0/attention/query [D, N, H] {names['layers_0']['attention']['query']} "
          f"stays sharded as {query_spec}")

    prompt = repeated_patterns(jax.random.key(2), 2 * data, 2 * args.period, args.period, args.vocab_size)
    prompt_lengths = jnp.asarray(np.resize([2 * args.period, args.period + 1], 2 * data), jnp.int32)
    capacity = prompt.shape[1] + args.new_tokens
    # [B, S, K, H]: batch over data, KV heads over model.
    cache_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules))
    rows_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    cache = tuple(KVCache(jax.device_put(c.key, cache_sharding), jax.device_put(c.value, cache_sharding),
                          jax.device_put(c.lengths, rows_sharding))
                  for c in init_cache(config, prompt.shape[0], capacity))
    sharded = generate(model, params, jax.device_put(prompt, batch_sharding),
                       jax.device_put(prompt_lengths, rows_sharding), max_new_tokens=args.new_tokens, cache=cache)
    one_device = generate(model, jax.device_get(params), jax.device_get(prompt), jax.device_get(prompt_lengths),
                          max_new_tokens=args.new_tokens)
    tokens, reference = np.asarray(sharded.tokens), np.asarray(one_device.tokens)
    print(f"prompt {np.asarray(prompt[0, :prompt_lengths[0]]).tolist()} -> {tokens[0].tolist()}")
    print(f"cache sharded as {sharded.cache[0].key.sharding.spec}")
    print(f"sharded generation == one device: {bool((tokens == reference).all())}")
    return {"losses": losses, "single_device_loss": single_device_loss, "query_spec": query_spec,
            "tokens": tokens, "reference_tokens": reference, "cache_spec": sharded.cache[0].key.sharding.spec}


if __name__ == "__main__":
    main()
