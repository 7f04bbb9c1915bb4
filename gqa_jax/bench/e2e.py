"""End-to-end decoding: tokens/s of `gqa_jax.decoding.generate` with the reference decoder.

A Llama-style model of realistic width (random weights: speed does not depend
on them), ragged prompts prefilled in one pass, then greedy steps through the
KV cache; the same call with the attention implementation pinned to each name,
and on each kind of cache (`CACHES`):

* ``bf16 dense``: the model's own cache (`gqa_jax.models.init_cache`, one
  `gqa_jax.KVCache` per layer in the model's dtype, bfloat16);
* ``int8 dense``: `gqa_jax.KVCache` quantized to int8 (float32 scale per token
  per KV head);
* ``bf16 paged`` / ``int8 paged``: `gqa_jax.paged_kv_cache.PagedKVCache` per
  layer, pages of ``page_size`` tokens, a pool of exactly the pages the rows
  need (``B * ceil((P + new) / page_size)``).

Every cache holds ``P + new`` tokens per row (the paged ones as whole pages:
``page_size`` divides it here), so the attention sees the same keys on each.
A fresh cache is built inside every timed call (`generate` donates it), as
`generate` builds its default one.

Notes on what runs:

* On a quantized cache, the decode steps read the int8 cache in the decode
  kernel; the prefill runs the flash kernel on the cache dequantized to
  bfloat16 (`gqa_jax.implementations._common.dequantized`).
* A paged cache's decode steps run the Pallas paged decode kernel (Triton
  on a GPU: `PagedKVCache.attend` takes ``implementation="pallas_triton"``,
  alone or first, as its own); its prefill gathers each row's pages into a
  dense cache and attends over it with the pinned implementation.
* Every cache's layers are built alike, so `generate` updates their
  lengths (and pages) once per step for all layers
  (`gqa_jax.cache_bookkeeping`), not once per layer.

Greedy tokens are compared with the case's first bf16 dense run (Triton's,
where it ran): ``agreement`` is the fraction of generated tokens equal to it.
Quantization moves logits slightly, and a token that differs changes every
later one, so this is a strict figure; a bf16 paged cache must agree exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.decoding import generate
from gqa_jax.kv_cache import KVCache
from gqa_jax.models import Decoder, DecoderConfig
from gqa_jax.paged_kv_cache import PagedKVCache


@dataclasses.dataclass(frozen=True)
class EndToEndShape:
    """``B`` rows, prompts of up to ``P`` tokens (ragged down to P/2), ``new_tokens`` generated; paged caches in pages
    of ``page_size`` tokens."""

    config: DecoderConfig
    B: int
    P: int
    new_tokens: int
    page_size: int = 64

    @property
    def name(self) -> str:
        c = self.config
        return (f"L{c.num_layers} D{c.model_dim} N{c.num_heads} K{c.num_kv_heads} B{self.B} "
                f"prompt<={self.P} new{self.new_tokens}")

    def new_token_count(self) -> int:
        return self.B * self.new_tokens

    def pages_per_row(self) -> int:
        """Pages a row needs for ``P + new_tokens`` tokens."""
        return -(-(self.P + self.new_tokens) // self.page_size)


def _config(quick: bool, **overrides) -> DecoderConfig:
    if quick:  # bf16 activations and caches as in the full run, so the rows' names hold
        return DecoderConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2,
                             dtype=jnp.bfloat16, **overrides)
    # About 1B parameters: a Llama-3.2-1B-like width with 16 layers, bf16.
    return DecoderConfig(vocab_size=32000, num_layers=16, model_dim=2048, num_heads=32, num_kv_heads=8,
                         mlp_dim=8192, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **overrides)


def shapes(quick: bool) -> list[EndToEndShape]:
    """The end-to-end shapes: long prompts and few new tokens (prefill-heavy), then short prompts and many new
    tokens (decode-heavy, where the caches' decode steps decide the time)."""
    if quick:
        return [EndToEndShape(_config(True), B=2, P=8, new_tokens=4, page_size=4)]
    config = _config(False)
    return [EndToEndShape(config, B=16, P=2048, new_tokens=128, page_size=64),
            EndToEndShape(config, B=16, P=256, new_tokens=1024, page_size=64)]


IMPLEMENTATIONS = ("pallas_triton", "xla")
# Cache kinds: name -> (storage dtype, None for the model's own dtype; paged).
CACHES = {
    "bf16 dense": (None, False),
    "int8 dense": (jnp.int8, False),
    "bf16 paged": (None, True),
    "int8 paged": (jnp.int8, True),
}
BF16_DENSE = "bf16 dense"


def row_name(implementation: str, cache: str) -> str:
    """The row's ``impl``, e.g. ``"pallas_triton int8 paged cache"``."""
    return f"{implementation} {cache} cache"


# Our rows in the table (the XLA bf16 dense row is the peer they are measured against).
OURS = tuple(row_name("pallas_triton", cache) for cache in CACHES)


def variants(quick: bool) -> list[tuple[str, str]]:
    """``(implementation, cache)`` of every row: Triton on every cache, XLA on the bf16 dense one.

    ``quick`` (a CPU, where the Triton rows are skipped) adds XLA on the other caches, so that their code runs.
    """
    rows = [("pallas_triton", cache) for cache in CACHES] + [("xla", BF16_DENSE)]
    if quick:
        rows += [("xla", cache) for cache in CACHES if cache != BF16_DENSE]
    return rows


def make_cache(shape: EndToEndShape, config: DecoderConfig, cache: str) -> tuple:
    """An empty cache of kind ``cache`` for the decoder, one per layer, room for ``P + new_tokens`` tokens per row."""
    dtype, paged = CACHES[cache]
    dtype = config.dtype if dtype is None else dtype
    if not paged:
        length = shape.P + shape.new_tokens
        return tuple(KVCache.init(shape.B, length, config.num_kv_heads, config.head_dim, dtype)
                     for _ in range(config.num_layers))
    pages = shape.pages_per_row()
    return tuple(
        PagedKVCache.init(batch_size=shape.B, num_pages=shape.B * pages, page_size=shape.page_size,
                          num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, max_pages_per_row=pages,
                          dtype=dtype)
        for _ in range(config.num_layers)
    )


def make_generate(shape: EndToEndShape, implementation: str | None, cache: str = BF16_DENSE):
    """A zero-argument callable generating once on a fresh cache of kind ``cache`` (returns the tokens)."""
    config = dataclasses.replace(shape.config, implementation=implementation)
    model = Decoder(config)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, config.vocab_size, (shape.B, shape.P)), jnp.int32)
    lengths = jnp.asarray(rng.integers(shape.P // 2, shape.P + 1, (shape.B,)), jnp.int32)
    params = model.init(jax.random.key(0), prompt[:, :8])["params"]
    init_cache = jax.jit(lambda: make_cache(shape, config, cache))  # one dispatch per call, not one per array
    return lambda: generate(model, params, prompt, lengths, max_new_tokens=shape.new_tokens, cache=init_cache()).tokens


def time_generate(shape: EndToEndShape, implementation: str | None, cache: str, timer) -> tuple[float, np.ndarray]:
    """``timer(fn, arg_sets)``'s seconds per generation (`gqa_jax.bench.timing.time_fn`: compile untimed, median of
    repetitions) and the generated tokens (greedy: every call's), int32 ``[B, new_tokens]``."""
    run, last = make_generate(shape, implementation, cache), []

    def call():
        last[:] = [run()]
        return last[0]

    return timer(call, [()]), np.asarray(last[0])


def agreement(tokens, reference) -> float:
    """The fraction of generated tokens equal to ``reference``'s (same shape ``[B, new_tokens]``)."""
    tokens, reference = np.asarray(tokens), np.asarray(reference)
    return float(np.mean(tokens == reference))
