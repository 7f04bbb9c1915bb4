"""A jitted decoding loop with the Flax ``decode=True`` cache of `gqa_jax.GroupedQueryAttention`.

Run: ``python examples/03_decode_linen_cache.py [--new-tokens 16] [--implementation xla]``

The Flax way: ``init`` with inputs of the maximum length allocates the
``"cache"`` collection; each ``apply(..., mutable=["cache"])`` appends tokens.
Unlike ``flax.linen.MultiHeadDotProductAttention(decode=True)``, a call may
append many tokens, a different number per row (``num_new``), so ragged
prompts are prefilled in one pass. The loop is a ``lax.scan`` inside one
``jax.jit`` that donates the cache. The model is untrained: the point is that
cached greedy decoding gives exactly the tokens of recomputing everything.
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import gqa_jax


class TinyLM(nn.Module):
    """Token and position embeddings, ``num_layers`` GQA blocks, an LM head; ``decode`` for the cache."""

    vocab_size: int = 32
    max_length: int = 64
    dim: int = 64
    num_layers: int = 2
    decode: bool = False
    implementation: str | None = None

    @nn.compact
    def __call__(self, tokens, num_new=None):
        """Logits ``[B, T, vocab_size]`` of int ``tokens [B, T]``; in decode mode the first ``num_new [B]`` are real."""
        B, T = tokens.shape
        start = jnp.zeros((B,), jnp.int32)
        if self.decode:  # each row's next position, kept beside the layers' caches
            position = self.variable("cache", "position", jnp.zeros, (B,), jnp.int32)
            start = position.value
            if not self.is_initializing():
                position.value = start + (T if num_new is None else num_new)
        positions = start[:, None] + jnp.arange(T)
        x = nn.Embed(self.vocab_size, self.dim)(tokens) + nn.Embed(self.max_length, self.dim)(positions)
        for _ in range(self.num_layers):
            h = nn.LayerNorm()(x)
            attention = gqa_jax.GroupedQueryAttention(
                head_dim=self.dim // 4, num_query_heads=4, num_key_value_heads=2,
                decode=self.decode, implementation=self.implementation,
            )
            x = x + attention(h, h, use_causal_mask=True, num_new=num_new if self.decode else None)
            x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def main(argv=None) -> tuple[np.ndarray, np.ndarray]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--implementation", default=None)
    args = parser.parse_args(argv)

    B, P, M = 3, 8, args.new_tokens  # rows, padded prompt length, new tokens
    capacity = P + M
    decoder = TinyLM(max_length=capacity, decode=True, implementation=args.implementation)
    full = TinyLM(max_length=capacity, implementation=args.implementation)  # same parameters, no cache

    variables = jax.jit(decoder.init)(jax.random.key(0), jnp.zeros((B, capacity), jnp.int32))
    params, empty_cache = variables["params"], variables["cache"]  # cache: [B, capacity, K, H] per layer
    prompt_lengths = jnp.array([8, 3, 5])
    prompts = jax.random.randint(jax.random.key(1), (B, P), 0, decoder.vocab_size)

    @functools.partial(jax.jit, donate_argnums=1)
    def generate(params, cache, prompts, prompt_lengths):
        def apply(cache, tokens, num_new=None):
            logits, updated = decoder.apply(
                {"params": params, "cache": cache}, tokens, num_new=num_new, mutable=["cache"]
            )
            return logits, updated["cache"]

        logits, cache = apply(cache, prompts, prompt_lengths)  # ragged prefill, one pass
        first = jnp.argmax(logits[jnp.arange(B), prompt_lengths - 1], axis=-1)

        def step(carry, _):
            cache, token = carry
            logits, cache = apply(cache, token[:, None])  # one token per row
            token = jnp.argmax(logits[:, 0], axis=-1)
            return (cache, token), token

        (cache, _), rest = jax.lax.scan(step, (cache, first), None, length=M - 1)
        return jnp.concatenate([first[:, None], rest.T], axis=1), cache

    tokens, cache = generate(params, empty_cache, prompts, prompt_lengths)
    tokens = np.asarray(tokens)

    # The same tokens by recomputing the whole sequence for every new token, without a cache.
    forward = jax.jit(lambda sequence: full.apply({"params": params}, sequence))
    sequence = np.zeros((B, capacity), np.int32)
    sequence[:, :P] = np.asarray(prompts)
    position = np.asarray(prompt_lengths).copy()
    recomputed = []
    for _ in range(M):
        token = np.asarray(forward(sequence))[np.arange(B), position - 1].argmax(-1)
        sequence[np.arange(B), position] = token
        position += 1
        recomputed.append(token)
    recomputed = np.stack(recomputed, axis=1)

    for b in range(B):
        print(f"row {b}: prompt {np.asarray(prompts[b, : prompt_lengths[b]]).tolist()} -> {tokens[b].tolist()}")
    print(f"cached loop == recomputing without a cache: {np.array_equal(tokens, recomputed)}")
    return tokens, recomputed


if __name__ == "__main__":
    main()
