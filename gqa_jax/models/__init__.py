"""Whole models built from this library's parts, and their Hugging Face import.

- `DecoderConfig` (`gqa_jax.models.config`): sizes and the options of the
  Llama, Mistral, Qwen2 and Gemma 2 families.
- `Decoder` (`gqa_jax.models.decoder`): the linen decoder (embedding, blocks
  of rotary grouped-query attention, the library's `gqa_jax.GroupedQueryAttention`
  with the decoder's parameter names, and gated MLPs, final norm, LM head);
  `init_cache` makes its per-layer `gqa_jax.KVCache` tuple. The same model in
  NNX is `gqa_jax.nnx.Decoder`.
- `config_from_hf`, `params_from_hf` (`gqa_jax.models.hf`): a ``transformers``
  config and state dict onto the decoder (field and weight tables there).
- `params_from_keras_hub` (`gqa_jax.models.keras_hub`): a keras-hub Llama,
  Mistral, Qwen2 or Gemma backbone onto the decoder (config and parameters).

Two ways to call `Decoder`:

* ``logits = model.apply({"params": params}, tokens)``: causal forward pass
  over whole sequences (training, scoring). Right padding is harmless: a valid
  token never sees a later one.
* ``logits, cache = model.apply({"params": params}, tokens, cache, num_new=n)``:
  the tokens continue each row after the ``cache.lengths`` tokens already in
  ``cache``; only the first ``n[b]`` tokens of row ``b`` are real (ragged
  prefill). `gqa_jax.decoding` drives this.
"""

from gqa_jax.models.config import DecoderConfig
from gqa_jax.models.decoder import (
    Attention,
    Block,
    Cache,
    Decoder,
    MLP,
    RMSNorm,
    attention_fields,
    check_token_ids,
    init_cache,
    projection_init,
    token_positions,
)
from gqa_jax.models.hf import HF_MODEL_TYPES, config_from_hf, params_from_hf
from gqa_jax.models.keras_hub import KERAS_HUB_BACKBONES, params_from_keras_hub

__all__ = [
    "Attention",
    "Block",
    "Cache",
    "Decoder",
    "DecoderConfig",
    "HF_MODEL_TYPES",
    "KERAS_HUB_BACKBONES",
    "MLP",
    "RMSNorm",
    "attention_fields",
    "check_token_ids",
    "config_from_hf",
    "init_cache",
    "params_from_hf",
    "params_from_keras_hub",
    "projection_init",
    "token_positions",
]
