"""The reference decoder trained on a ``(data, model)`` device mesh, then decoded there.

Run: ``python examples/05_sharded_training.py [--mesh 4,2] [--steps 60]``

Without enough accelerators the script simulates CPU devices (it sets
``--xla_force_host_platform_device_count`` before jax starts, unless
``XLA_FLAGS`` already names a count). Parameters are sharded by name, as in
Megatron-style tensor parallelism: the attention projections split their heads
(``N`` of the queries, ``K`` of the keys and values, so a query head lives
with its KV head) and the MLP its hidden units over ``"model"``; the batch is
split over ``"data"``. ``jax.jit`` partitions the train step from those
shardings. The task is the one of ``02_train_block.py`` (each sequence repeats
a random pattern of ``--period`` tokens). After training,
`gqa_jax.decoding.generate` continues prompts with a cache sharded over batch
and KV heads, and gets the same tokens as the same weights on one device.
"""

from __future__ import annotations

import os
import re

if not re.search(r"xla_force_host_platform_device_count", os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gqa_jax import KVCache  # noqa: E402
from gqa_jax.decoding import generate  # noqa: E402
from gqa_jax.models import Decoder, DecoderConfig, init_cache  # noqa: E402

# Parameter name (last path entry, or the module's name for Dense/Embed kernels) -> its spec.
PARAM_SPECS = {
    "query": P(None, "model", None),  # [D, N, H]
    "key": P(None, "model", None),  # [D, K, H]
    "value": P(None, "model", None),  # [D, K, H]
    "output": P("model", None, None),  # [N, H, D]
    "gate": P(None, "model"),  # [D, F]
    "up": P(None, "model"),  # [D, F]
    "down": P("model", None),  # [F, D]
    "lm_head": P(None, "model"),  # [D, V]
}


def param_spec(path, leaf) -> P:
    """The spec of one parameter from its path; embeddings and norm scales are replicated."""
    names = [entry.key for entry in path]
    name = names[-1] if names[-1] != "kernel" else names[-2]
    return PARAM_SPECS.get(name, P(*([None] * leaf.ndim)))


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
                           num_kv_heads=2, mlp_dim=128)
    model = Decoder(config)
    batch_sharding = NamedSharding(mesh, P("data", None))

    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, args.length), jnp.int32))["params"]
    param_shardings = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, param_spec(p, x)), abstract)
    # Initialized directly in their shards: no device ever holds the whole model.
    params = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, args.length), jnp.int32))["params"],
                     out_shardings=param_shardings)(jax.random.key(0))
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
    print(f"mesh {dict(mesh.shape)}; layers_0/attention/query [D, N, H] stays sharded as {query_spec}")

    prompt = repeated_patterns(jax.random.key(2), 2 * data, 2 * args.period, args.period, args.vocab_size)
    prompt_lengths = jnp.asarray(np.resize([2 * args.period, args.period + 1], 2 * data), jnp.int32)
    capacity = prompt.shape[1] + args.new_tokens
    cache_spec = P("data", None, "model", None)  # [B, S, K, H]: batch over data, KV heads over model
    cache = tuple(KVCache(jax.device_put(c.key, NamedSharding(mesh, cache_spec)),
                          jax.device_put(c.value, NamedSharding(mesh, cache_spec)),
                          jax.device_put(c.lengths, NamedSharding(mesh, P("data"))))
                  for c in init_cache(config, prompt.shape[0], capacity))
    sharded = generate(model, params, jax.device_put(prompt, batch_sharding),
                       jax.device_put(prompt_lengths, NamedSharding(mesh, P("data"))),
                       max_new_tokens=args.new_tokens, cache=cache)
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
