"""A Flax NNX block built from `gqa_jax.nnx.GroupedQueryAttention`: trained with nnx.Optimizer, then decoded.

Run: ``python examples/06_nnx_block.py [--steps 200] [--implementation xla]``

The task of ``02_train_block.py``: each sequence repeats a random pattern of
``--period`` tokens. After training, the model continues prompts greedily
through the attention layers' decode cache (``nnx.Cache`` state, one
``nnx.jit`` step per token) and gets the same tokens as recomputing the full
causal pass each step; the trained attention weights also run unchanged in
the linen layer.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gqa_jax
import gqa_jax.nnx


class Block(nnx.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, *, implementation, rngs: nnx.Rngs):
        self.attention_norm, self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.attention = gqa_jax.nnx.GroupedQueryAttention(
            dim // 4, 4, 2, in_features=dim, implementation=implementation, rngs=rngs
        )
        self.up, self.down = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x, decode: bool):
        """``x [B, T, D] -> [B, T, D]``; with ``decode`` the tokens continue the attention cache."""
        x = x + self.attention(self.attention_norm(x), use_causal_mask=True, decode=decode)
        return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nnx.Module):
    def __init__(self, vocab_size: int, max_length: int, *, dim: int = 64, num_layers: int = 2, implementation=None,
                 rngs: nnx.Rngs):
        self.embed, self.position = nnx.Embed(vocab_size, dim, rngs=rngs), nnx.Embed(max_length, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, implementation=implementation, rngs=rngs) for _ in range(num_layers)])
        self.norm, self.head = nnx.LayerNorm(dim, rngs=rngs), nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, tokens, positions, decode: bool = False):
        """Logits ``[B, T, V]`` of int ``tokens [B, T]`` at int ``positions [T]``."""
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x, decode)
        return self.head(self.norm(x))

    def init_cache(self, batch_size: int, max_length: int) -> None:
        for block in self.blocks:
            block.attention.init_cache(batch_size=batch_size, max_length=max_length)


def repeated_patterns(rng, batch_size: int, length: int, period: int, vocab_size: int) -> jax.Array:
    pattern = jax.random.randint(rng, (batch_size, period), 0, vocab_size)
    return jnp.tile(pattern, (1, -(-length // period)))[:, :length]


@nnx.jit
def train_step(model, optimizer, tokens):
    def loss_fn(model):
        logits = model(tokens[:, :-1], jnp.arange(tokens.shape[1] - 1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def decode_step(model, tokens, positions):
    """Greedy next tokens ``[B]`` after feeding ``tokens [B, T]`` at ``positions [T]`` through the caches."""
    return jnp.argmax(model(tokens, positions, decode=True)[:, -1], axis=-1)


@nnx.jit
def recompute_step(model, sequence, last):
    """Greedy next tokens ``[B]`` after position ``last`` from the full causal pass over ``sequence [B, L]``.

    Causal: the tokens after ``last`` (padding) do not change it, so one compiled step serves every length.
    """
    return jnp.argmax(model(sequence, jnp.arange(sequence.shape[1]))[:, last], axis=-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=24, help="tokens per training sequence")
    parser.add_argument("--period", type=int, default=4, help="length of the repeated pattern")
    parser.add_argument("--vocab-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--implementation", default=None)
    args = parser.parse_args(argv)

    max_length = args.length + args.new_tokens
    model = nnx.jit(  # one compiled initialization instead of many small eager ones
        lambda: TinyLM(args.vocab_size, max_length, num_layers=args.num_layers, implementation=args.implementation,
                       rngs=nnx.Rngs(0))
    )()
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    rng = jax.random.key(1)
    losses = []
    for step in range(args.steps):
        rng, batch_rng = jax.random.split(rng)
        tokens = repeated_patterns(batch_rng, args.batch_size, args.length, args.period, args.vocab_size)
        losses.append(float(train_step(model, optimizer, tokens)))
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.3f}")

    prompt = repeated_patterns(jax.random.key(2), 3, 2 * args.period, args.period, args.vocab_size)
    P = prompt.shape[1]
    model.init_cache(batch_size=3, max_length=P + args.new_tokens)
    token = decode_step(model, prompt, jnp.arange(P))  # prefill: the whole prompt in one write
    cached, sequence, recomputed = [token], jnp.pad(prompt, ((0, 0), (0, args.new_tokens))), []
    for i in range(args.new_tokens):
        recomputed.append(recompute_step(model, sequence, P - 1 + i))
        sequence = sequence.at[:, P + i].set(recomputed[-1])
        if i + 1 < args.new_tokens:
            token = decode_step(model, token[:, None], jnp.array([P + i]))
            cached.append(token)
    cached, recomputed = np.stack(cached, 1), np.stack(recomputed, 1)
    print(f"prompt {np.asarray(prompt[0]).tolist()} -> {cached[0].tolist()}")
    print(f"cached loop == recomputing without a cache: {bool((cached == recomputed).all())}")

    attention = model.blocks[0].attention
    x = jax.random.normal(jax.random.key(3), (2, 5, 64))
    linen = gqa_jax.GroupedQueryAttention(head_dim=16, num_query_heads=4, num_key_value_heads=2)
    linen_out = jax.jit(lambda p, x: linen.apply({"params": p}, x, x, use_causal_mask=True))(
        gqa_jax.nnx.linen_params(attention), x
    )
    nnx_out = nnx.jit(lambda attention, x: attention(x, use_causal_mask=True))(attention, x)
    difference = float(jnp.abs(linen_out - nnx_out).max())
    print(f"linen layer with the trained NNX weights, max |difference|: {difference:.1e}")
    return {"losses": losses, "cached": cached, "recomputed": recomputed, "linen_difference": difference}


if __name__ == "__main__":
    main()
