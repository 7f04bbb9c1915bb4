"""Hugging Face Llama, Mistral, Qwen2 and Gemma 2 checkpoints as a `gqa_jax.models.Decoder`.

`config_from_hf` reads a ``transformers`` config (or its ``config.json``
dict) into a `DecoderConfig`, refusing, by field name, every setting that
would change the math without a trace in the weights and that the decoder
does not compute. `params_from_hf` maps the state dict onto the decoder's
parameters. Tested against ``transformers`` (``tests/test_hf_models.py``):
logits, cached ragged prefill and greedy generation.

Config fields (``D`` model dim, ``N`` heads, ``K`` KV heads, ``H`` head dim)::

    hidden_size -> model_dim           num_hidden_layers -> num_layers      intermediate_size -> mlp_dim
    num_attention_heads -> num_heads   num_key_value_heads -> num_kv_heads  head_dim (default D // N)
    rope_theta, rope_scaling / rope_parameters ("default", "linear", "llama3") -> rope_theta, rope_scaling
    rms_norm_eps -> norm_eps           tie_word_embeddings -> tie_embeddings
    attention_bias -> attention_bias and output_bias (q, k, v and o biases; Qwen2: q, k, v always)
    sliding_window, layer_types (Mistral: every layer slides; Qwen2: use_sliding_window, max_window_layers)
    Gemma 2: attn_logit_softcapping, final_logit_softcapping -> *_soft_cap;
      query_pre_attn_scalar -> query_scale = query_pre_attn_scalar ** -0.5; hidden_activation
      gelu_pytorch_tanh -> activation="gelu_tanh"; and always norm_offset=1 ((1 + w) RMSNorms),
      sandwich_norms, scale_embeddings (x sqrt(D))

Weights (HF linear weights are ``[out, in]``; ``...`` is ``model.layers.{i}.``)::

    HF name [shape]                                 our path [shape]                       conversion
    model.embed_tokens.weight [V, D]                embed/embedding [V, D]                 as is
    ...input_layernorm.weight [D]                   layers_{i}/attention_norm/scale [D]    as is
    ...self_attn.q_proj.weight [N*H, D]             layers_{i}/attention/query [D, N, H]   w.T.reshape(D, N, H)
    ...self_attn.k_proj.weight [K*H, D]             layers_{i}/attention/key [D, K, H]     w.T.reshape(D, K, H)
    ...self_attn.v_proj.weight [K*H, D]             layers_{i}/attention/value [D, K, H]   w.T.reshape(D, K, H)
    ...self_attn.o_proj.weight [D, N*H]             layers_{i}/attention/output [N, H, D]  w.T.reshape(N, H, D)
    ...self_attn.q_proj.bias [N*H]                  layers_{i}/attention/query_bias [N, H] b.reshape(N, H)
    ...self_attn.{k,v}_proj.bias [K*H]              .../key_bias, value_bias [K, H]        b.reshape(K, H)
    ...self_attn.o_proj.bias [D]                    layers_{i}/attention/output_bias [D]   as is
    ...post_attention_layernorm.weight [D]          layers_{i}/mlp_norm/scale [D]          as is (Gemma 2:
                                                    layers_{i}/post_attention_norm/scale)
    ...pre_feedforward_layernorm.weight [D]         layers_{i}/mlp_norm/scale [D]          Gemma 2 only
    ...post_feedforward_layernorm.weight [D]        layers_{i}/post_mlp_norm/scale [D]     Gemma 2 only
    ...mlp.gate_proj.weight [F, D]                  layers_{i}/mlp/gate/kernel [D, F]      w.T
    ...mlp.up_proj.weight [F, D]                    layers_{i}/mlp/up/kernel [D, F]        w.T
    ...mlp.down_proj.weight [D, F]                  layers_{i}/mlp/down/kernel [F, D]      w.T
    model.norm.weight [D]                           final_norm/scale [D]                   as is
    lm_head.weight [V, D] (untied only)             lm_head/kernel [D, V]                  w.T

Refused (`config_from_hf` names the field): other model types, ``mlp_bias``,
rotary types other than default/linear/llama3, partial rotary, an MLP
activation other than the family's (SiLU; Gemma 2's tanh GELU), bidirectional
attention, and layer types other than full and sliding attention.
`params_from_hf` refuses weights it would not use.

Hugging Face checkpoints use the half-split rotary convention of
`gqa_jax.rope` (their conversion scripts permuted Meta's interleaved ``q``/``k``
rows), so no permutation is needed; Meta's original ``consolidated.pth``
weights would need that permutation first.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, DecoderConfig
from gqa_jax.rope import RotaryEmbedding

# Model types whose math the decoder reproduces (with the settings `config_from_hf` checks).
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2")
_HF_ROPE_TYPES = (None, "default", "linear", "llama3")
# The MLP activation each family's config may name (HF ``hidden_act`` / ``hidden_activation``) and ours.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_FAMILY_ACTIVATION = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "gemma2": "gelu_tanh"}


def _hf_fields(hf_config) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if callable(getattr(hf_config, "to_dict", None)):
        return hf_config.to_dict()
    raise TypeError(
        f"hf_config must be a transformers config or its dict (config.json), got {type(hf_config).__name__}"
    )


def _check_rope(fields: dict) -> RotaryEmbedding:
    for name in ("rope_scaling", "rope_parameters"):
        rope = fields.get(name)
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, Mapping) else rope
            if kind not in _HF_ROPE_TYPES:
                raise ValueError(
                    f"{name}={rope!r} is not supported: only the default, 'linear' and 'llama3' rotary frequencies"
                )
    factor = fields.get("partial_rotary_factor")
    if factor is None and isinstance(fields.get("rope_parameters"), Mapping):
        factor = fields["rope_parameters"].get("partial_rotary_factor")
    if factor not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={factor!r} is not supported: only 1.0")
    return RotaryEmbedding.from_hf(fields)


def _activation(fields: dict, model_type: str) -> str:
    name = "hidden_activation" if fields.get("hidden_activation") is not None else "hidden_act"
    act = fields.get(name, "gelu_pytorch_tanh" if model_type == "gemma2" else "silu")
    if _ACTIVATIONS.get(act) != _FAMILY_ACTIVATION[model_type]:
        expected = [k for k, v in _ACTIVATIONS.items() if v == _FAMILY_ACTIVATION[model_type]]
        raise ValueError(f"{name}={act!r} is not supported for model_type={model_type!r}: only {expected}")
    return _ACTIVATIONS[act]


def _layer_types(fields: dict, model_type: str, num_layers: int):
    """``(sliding_window, layer_types)``: the sliding layers as the family's HF model picks them."""
    window = fields.get("sliding_window")
    if model_type == "llama" or not fields.get("use_sliding_window", True):
        window = None  # Llama has no sliding window; Qwen2 uses it only with use_sliding_window
    kinds = fields.get("layer_types")
    if kinds is None and model_type == "qwen2" and window is not None:
        first = fields.get("max_window_layers", num_layers)
        kinds = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]
    if kinds is not None:
        unknown = sorted(set(kinds) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise ValueError(f"layer_types={list(kinds)!r} is not supported: only {FULL_ATTENTION!r} and "
                             f"{SLIDING_ATTENTION!r}, got {unknown}")
        if SLIDING_ATTENTION not in kinds:
            return None, None
        if window is None:
            raise ValueError(f"layer_types={list(kinds)!r} is not supported without a window, got sliding_window=None")
        kinds = tuple(kinds)
    return window, kinds


def config_from_hf(hf_config, **overrides) -> DecoderConfig:
    """The `DecoderConfig` of a Hugging Face Llama, Mistral, Qwen2 or Gemma 2 config, refusing what it cannot compute.

    Args:
      hf_config: a ``transformers`` config (e.g. ``LlamaConfig``) or its dict
        (the parsed ``config.json``); a dict without ``model_type`` is read as
        Llama.
      **overrides: other `DecoderConfig` fields (``dtype``, ``param_dtype``,
        ``implementation``).

    Returns:
      The config (see the module docstring for the field mapping).

    Raises:
      ValueError: naming the field and its value, for a setting that changes
        the model's math and is not supported here, or a missing size.
      TypeError: for an ``hf_config`` of another type.
    """
    fields = _hf_fields(hf_config)
    model_type = fields.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported: only {list(HF_MODEL_TYPES)}")
    if fields.get("mlp_bias"):
        raise ValueError(f"mlp_bias={fields['mlp_bias']!r} is not supported: the decoder's MLP has no biases")
    if fields.get("use_bidirectional_attention"):
        raise ValueError(
            f"use_bidirectional_attention={fields['use_bidirectional_attention']!r} is not supported: the decoder "
            "is causal"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if fields.get(name) is None]
    if missing:
        raise ValueError(f"hf_config lacks {missing}")
    rope = _check_rope(fields)
    act = _activation(fields, model_type)
    window, kinds = _layer_types(fields, model_type, fields["num_hidden_layers"])
    num_kv_heads = fields.get("num_key_value_heads")
    bias = bool(fields.get("attention_bias", False))
    gemma = model_type == "gemma2"
    family = {}
    if gemma:
        scalar = fields.get("query_pre_attn_scalar")
        family = dict(
            attn_logit_soft_cap=fields.get("attn_logit_softcapping"),
            final_logit_soft_cap=fields.get("final_logit_softcapping"),
            query_scale=None if scalar is None else float(scalar) ** -0.5,
            norm_offset=1.0,
            sandwich_norms=True,
            scale_embeddings=True,
        )
    return DecoderConfig(
        vocab_size=fields["vocab_size"],
        num_layers=fields["num_hidden_layers"],
        model_dim=fields["hidden_size"],
        num_heads=fields["num_attention_heads"],
        num_kv_heads=fields["num_attention_heads"] if num_kv_heads is None else num_kv_heads,
        head_dim=fields.get("head_dim"),
        mlp_dim=fields["intermediate_size"],
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        norm_eps=float(fields.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(fields.get("tie_word_embeddings", gemma)),
        attention_bias=bias or model_type == "qwen2",
        output_bias=bias,
        sliding_window=window,
        layer_types=kinds,
        activation=act,
        **family,
        **overrides,
    )


def _unused_weight_reason(name: str) -> str:
    if name.endswith(".bias") and ".self_attn." in name:
        return "attention biases are off in this config (attention_bias=False)"
    if name.endswith(".bias") and ".mlp." in name:
        return "MLP biases (mlp_bias=True) are not supported"
    return "this decoder has no such weight"


def params_from_hf(state_dict: Mapping[str, Any], config) -> dict:
    """Maps a Hugging Face ``*ForCausalLM`` state dict (Llama, Mistral, Qwen2, Gemma 2) onto `Decoder` parameters.

    Args:
      state_dict: HF names (see the module docstring's table) to arrays
        (NumPy, or anything ``np.asarray`` takes, e.g. ``tensor.float().numpy()``).
        Rotary ``inv_freq`` buffers are ignored; any other weight that would
        not be used is refused.
      config: the matching `DecoderConfig`, or the HF config itself (read by
        `config_from_hf`, which refuses unsupported settings).

    Returns:
      The ``params`` collection, in ``config.param_dtype``.

    Raises:
      KeyError: for a missing weight.
      ValueError: for a weight whose shape does not match the config, or a
        weight (a bias the config lacks, a separate ``lm_head`` with tied
        embeddings) that the decoder would silently drop.
    """
    if not isinstance(config, DecoderConfig):
        config = config_from_hf(config)
    D, N, K, H = config.model_dim, config.num_heads, config.num_kv_heads, config.head_dim
    F, V = config.mlp_dim, config.vocab_size
    used = set()

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        w = np.asarray(state_dict[name])
        if w.shape != shape:
            raise ValueError(f"{name} must have shape {shape} for this config, got {w.shape}")
        return w

    params = {"embed": {"embedding": get("model.embed_tokens.weight", (V, D))}}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attention = {
            "query": get(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H),
            "key": get(p + "self_attn.k_proj.weight", (K * H, D)).T.reshape(D, K, H),
            "value": get(p + "self_attn.v_proj.weight", (K * H, D)).T.reshape(D, K, H),
            "output": get(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(N, H, D),
        }
        if config.attention_bias:
            attention["query_bias"] = get(p + "self_attn.q_proj.bias", (N * H,)).reshape(N, H)
            attention["key_bias"] = get(p + "self_attn.k_proj.bias", (K * H,)).reshape(K, H)
            attention["value_bias"] = get(p + "self_attn.v_proj.bias", (K * H,)).reshape(K, H)
        if config.output_bias:
            attention["output_bias"] = get(p + "self_attn.o_proj.bias", (D,))
        layer = {
            "attention_norm": {"scale": get(p + "input_layernorm.weight", (D,))},
            "attention": attention,
            "mlp": {
                "gate": {"kernel": get(p + "mlp.gate_proj.weight", (F, D)).T},
                "up": {"kernel": get(p + "mlp.up_proj.weight", (F, D)).T},
                "down": {"kernel": get(p + "mlp.down_proj.weight", (D, F)).T},
            },
        }
        if config.sandwich_norms:
            layer["post_attention_norm"] = {"scale": get(p + "post_attention_layernorm.weight", (D,))}
            layer["mlp_norm"] = {"scale": get(p + "pre_feedforward_layernorm.weight", (D,))}
            layer["post_mlp_norm"] = {"scale": get(p + "post_feedforward_layernorm.weight", (D,))}
        else:
            layer["mlp_norm"] = {"scale": get(p + "post_attention_layernorm.weight", (D,))}
        params[f"layers_{i}"] = layer
    params["final_norm"] = {"scale": get("model.norm.weight", (D,))}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (V, D)).T}
    elif "lm_head.weight" in state_dict:  # torch lists tied weights under both names
        if not np.array_equal(get("lm_head.weight", (V, D)), params["embed"]["embedding"]):
            raise ValueError(
                "lm_head.weight differs from model.embed_tokens.weight, but config.tie_embeddings=True "
                "(HF tie_word_embeddings) would use the embedding"
            )
    unused = sorted(name for name in state_dict if name not in used and not name.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ValueError(f"{unused[0]} would not be used: {_unused_weight_reason(unused[0])} (unused: {unused})")
    return jax.tree_util.tree_map(lambda w: jnp.asarray(w, config.param_dtype), params)
