"""A transformer block built from `gqa_jax.GroupedQueryAttention`, trained with optax.

Run: ``python examples/02_train_block.py [--steps 300] [--implementation xla]``

The task: each sequence repeats a random pattern of ``--period`` tokens, so
after the first period every token is predictable by looking ``period``
positions back, which attention learns. The loss falls from ``log(vocab)``
towards the cost of the unpredictable first period.
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import gqa_jax


class Block(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        """``x [B, T, D] -> [B, T, D]``."""
        h = nn.LayerNorm()(x)
        attention = gqa_jax.GroupedQueryAttention(
            head_dim=self.head_dim,
            num_query_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            implementation=self.implementation,
        )
        x_BTD = x + attention(h, h, use_causal_mask=True)
        h = nn.LayerNorm()(x_BTD)
        return x_BTD + nn.Dense(x_BTD.shape[-1])(nn.gelu(nn.Dense(4 * x_BTD.shape[-1])(h)))


class TinyLM(nn.Module):
    vocab_size: int
    max_length: int
    dim: int = 64
    num_layers: int = 2
    implementation: str | None = None

    @nn.compact
    def __call__(self, tokens):
        """Logits ``[B, T, vocab_size]`` of int ``tokens [B, T]``."""
        positions = jnp.arange(tokens.shape[1])
        x = nn.Embed(self.vocab_size, self.dim)(tokens) + nn.Embed(self.max_length, self.dim)(positions)
        for _ in range(self.num_layers):
            x = Block(num_heads=4, num_kv_heads=2, head_dim=self.dim // 4, implementation=self.implementation)(x)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=24, help="tokens per sequence")
    parser.add_argument("--period", type=int, default=4, help="length of the repeated pattern")
    parser.add_argument("--vocab-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--implementation", default=None)
    args = parser.parse_args(argv)

    model = TinyLM(args.vocab_size, args.length, num_layers=args.num_layers, implementation=args.implementation)
    rng = jax.random.key(0)
    params = jax.jit(model.init)(rng, jnp.zeros((1, args.length), jnp.int32))["params"]
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)

    def batch(key):
        pattern = jax.random.randint(key, (args.batch_size, args.period), 0, args.vocab_size)
        return jnp.tile(pattern, (1, math.ceil(args.length / args.period)))[:, : args.length]

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch(key))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    floor = (args.period - 1) / (args.length - 1) * math.log(args.vocab_size)
    print(f"loss at chance {math.log(args.vocab_size):.3f}; best possible about {floor:.3f}")
    losses = []
    for step in range(args.steps):
        rng, key = jax.random.split(rng)
        params, opt_state, loss = train_step(params, opt_state, key)
        losses.append(float(loss))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.3f}")
    return losses


if __name__ == "__main__":
    main()
