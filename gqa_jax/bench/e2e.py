"""End-to-end decoding: tokens/s of `gqa_jax.decoding.generate` with the reference decoder.

A Llama-style model of realistic width (random weights: speed does not depend
on them), ragged prompts prefilled in one pass, then greedy steps through the
KV cache; the same call with the attention implementation pinned to each name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.decoding import generate
from gqa_jax.models import Decoder, DecoderConfig


@dataclasses.dataclass(frozen=True)
class EndToEndShape:
    """``B`` rows, prompts of up to ``P`` tokens (ragged down to P/2), ``new_tokens`` generated."""

    config: DecoderConfig
    B: int
    P: int
    new_tokens: int

    @property
    def name(self) -> str:
        c = self.config
        return (f"L{c.num_layers} D{c.model_dim} N{c.num_heads} K{c.num_kv_heads} B{self.B} "
                f"prompt<={self.P} new{self.new_tokens}")

    def new_token_count(self) -> int:
        return self.B * self.new_tokens


def _config(quick: bool, **overrides) -> DecoderConfig:
    if quick:
        return DecoderConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2, **overrides)
    # About 1B parameters: a Llama-3.2-1B-like width with 16 layers, bf16.
    return DecoderConfig(vocab_size=32000, num_layers=16, model_dim=2048, num_heads=32, num_kv_heads=8,
                         mlp_dim=8192, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **overrides)


def shapes(quick: bool) -> list[EndToEndShape]:
    if quick:
        return [EndToEndShape(_config(True), B=2, P=8, new_tokens=4)]
    return [EndToEndShape(_config(False), B=16, P=2048, new_tokens=128)]


IMPLEMENTATIONS = ("pallas_triton", "xla")


def make_generate(shape: EndToEndShape, implementation: str | None):
    """A zero-argument callable generating once (returns the tokens)."""
    config = dataclasses.replace(shape.config, implementation=implementation)
    model = Decoder(config)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, config.vocab_size, (shape.B, shape.P)), jnp.int32)
    lengths = jnp.asarray(rng.integers(shape.P // 2, shape.P + 1, (shape.B,)), jnp.int32)
    params = model.init(jax.random.key(0), prompt[:, :8])["params"]
    return lambda: generate(model, params, prompt, lengths, max_new_tokens=shape.new_tokens).tokens
