"""keras-hub Llama, Mistral, Qwen2 and Gemma (1 and 2) backbones as a `gqa_jax.models.Decoder`.

`params_from_keras_hub` reads a built keras-hub backbone into a
`DecoderConfig` and the decoder's parameters. The settings are read
from the layers the backbone runs, not only from its constructor arguments,
because keras-hub does not always pass them on (its Gemma blocks keep a norm
epsilon of 1e-6 and always scale queries by ``head_dim``). Tested against
keras-hub on tiny random backbones (``tests/test_keras_hub_models.py``): our
logits equal the backbone's hidden states projected by its token embedding,
as ``*CausalLM`` computes them.

Config (``D`` model dim, ``N`` heads, ``K`` KV heads, ``H`` head dim, ``F`` MLP dim)::

    vocabulary_size -> vocab_size      num_layers -> num_layers       hidden_dim -> model_dim
    num_query_heads -> num_heads       num_key_value_heads -> num_kv_heads
    H, F from the query and gate kernels (Gemma: F = intermediate_dim // 2)
    layer_norm_epsilon (of every norm the backbone runs) -> norm_eps
    token_embedding.tie_weights -> tie_embeddings
    q/k/v biases (Qwen2) -> attention_bias; an output bias -> output_bias
    rope_max_wavelength -> rope_theta (Gemma: 10000)
    Llama 3.1: rope_frequency_adjustment_factor, rope_low_freq_factor, rope_high_freq_factor,
      rope_pretraining_sequence_length -> rope_scaling=Llama3RopeScaling(...)
    Mistral, Qwen2: rope_scaling_factor != 1 -> rope_scaling=LinearRopeScaling(factor)
    Mistral: sliding_window -> sliding_window (every layer)
    Gemma: always norm_offset=1 ((1 + w) RMSNorms), scale_embeddings (x sqrt(D)), activation="gelu_tanh";
      use_post_attention_norm and use_post_ffw_norm (both) -> sandwich_norms;
      attention_logit_soft_cap, final_logit_soft_cap -> *_soft_cap;
      query_head_dim_normalize=False (of the attention layers) -> query_scale = (D // N) ** -0.5;
      use_sliding_window_attention (even layers), sliding_window_size -> layer_types, sliding_window

Weights (``...`` is ``transformer_layers[i].``; Gemma's names after the slash)::

    keras-hub layer [shape]                                     our path [shape]
    token_embedding.embeddings [V, D]                           embed/embedding [V, D]
    token_embedding.reverse_embeddings [D, V] (untied only)     lm_head/kernel [D, V]
    ..._self_attention_layernorm / pre_attention_norm [D]       layers_{i}/attention_norm/scale [D]
    ..._self_attention_layer / attention: query, key, value,    layers_{i}/attention/query [D, N, H], key, value
      attention_output (through `gqa_jax.keras_params`,           [D, K, H], output [N, H, D], query_bias [N, H],
      which turns Gemma's [N, D, H] kernels into [D, N, H])       key_bias, value_bias [K, H], output_bias [D]
    post_attention_norm [D] (Gemma 2)                           layers_{i}/post_attention_norm/scale [D]
    ..._feedforward_layernorm / pre_ffw_norm [D]                layers_{i}/mlp_norm/scale [D]
    ..._feedforward_gate_dense / gating_ffw [D, F]              layers_{i}/mlp/gate/kernel [D, F]
    ..._feedforward_intermediate_dense / gating_ffw_2 [D, F]    layers_{i}/mlp/up/kernel [D, F]
    ..._feedforward_output_dense / ffw_linear [F, D]            layers_{i}/mlp/down/kernel [F, D]
    post_ffw_norm [D] (Gemma 2)                                 layers_{i}/post_mlp_norm/scale [D]
    layer_norm [D]                                              final_norm/scale [D]

Refused (ValueError naming the field): other backbones (Gemma 3, Qwen 3, Mixtral
... and subclasses of none of the four), quantized weights, Llama's
``rope_position_scaling_factor != 1`` (keras-hub 0.32's Llama rotary embedding
ignores it, so the backbone computes unscaled positions while the field says
otherwise), Qwen2's ``use_sliding_window_attention=True`` (keras-hub's Qwen
attention drops the window on its fused path, which the JAX and torch backends
take), Gemma with only one of the two post norms, and norms of different
epsilons. ``dropout`` is a training setting and is not read. Keras' rotary
embedding is the half-split one of `gqa_jax.rope` (Gemma interleaves the
rotated halves of queries and keys alike, which leaves the attention
unchanged), so no permutation is needed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gqa_jax.interop import _array, keras_params
from gqa_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, DecoderConfig
from gqa_jax.rope import Llama3RopeScaling, LinearRopeScaling

# keras_hub.models class names, in the order they are tried (Llama3Backbone is a LlamaBackbone).
KERAS_HUB_BACKBONES = ("LlamaBackbone", "MistralBackbone", "QwenBackbone", "GemmaBackbone")


def _one(name: str, values) -> Any:
    """The value every layer agrees on; ValueError naming ``name`` otherwise."""
    distinct = sorted(set(values), key=repr)
    if len(distinct) != 1:
        raise ValueError(f"{name} differs between the backbone's layers ({distinct}); DecoderConfig has one {name}")
    return distinct[0]


def _family(backbone) -> str:
    import keras_hub

    if not isinstance(backbone, keras_hub.models.Backbone):
        raise TypeError(f"backbone must be a keras_hub.models.Backbone, got {type(backbone).__name__}")
    for name in KERAS_HUB_BACKBONES:
        if isinstance(backbone, getattr(keras_hub.models, name)):
            return name
    raise ValueError(f"backbone of type {type(backbone).__name__} is not supported: only {list(KERAS_HUB_BACKBONES)}")


def _llama_like_weights(backbone) -> dict:
    """Llama, Mistral and Qwen2 blocks (the same sublayer names) as the family-neutral weights of `_decoder_params`."""
    layers = []
    for block in backbone.transformer_layers:
        layers.append({
            "attention_norm": block._self_attention_layernorm,
            "attention": keras_params(block._self_attention_layer),
            "mlp_norm": block._feedforward_layernorm,
            "gate": block._feedforward_gate_dense.kernel,
            "up": block._feedforward_intermediate_dense.kernel,
            "down": block._feedforward_output_dense.kernel,
        })
    return {"layers": layers}


def _gemma_weights(backbone) -> dict:
    """Gemma blocks as the family-neutral weights of `_decoder_params`."""
    layers = []
    for block in backbone.transformer_layers:
        layer = {
            "attention_norm": block.pre_attention_norm,
            "attention": keras_params(block.attention),
            "mlp_norm": block.pre_ffw_norm,
            "gate": block.gating_ffw.kernel,
            "up": block.gating_ffw_2.kernel,
            "down": block.ffw_linear.kernel,
        }
        if block.use_post_attention_norm:
            layer.update(post_attention_norm=block.post_attention_norm, post_mlp_norm=block.post_ffw_norm)
        layers.append(layer)
    return {"layers": layers}


def _family_fields(backbone, family: str) -> dict:
    """The family's `DecoderConfig` fields beyond the sizes: rotary embedding, windows, Gemma's options; refusals."""
    if family == "GemmaBackbone":
        blocks = backbone.transformer_layers
        theta = _one("rope_max_wavelength", (block.attention.rope_layer.max_wavelength for block in blocks))
        return dict(rope_theta=float(theta), **_gemma_fields(backbone))
    fields = dict(rope_theta=float(backbone.rope_max_wavelength))
    if family == "LlamaBackbone":
        if backbone.rope_position_scaling_factor != 1.0:
            raise ValueError(
                f"rope_position_scaling_factor={backbone.rope_position_scaling_factor!r} is not supported: keras-hub's "
                "LlamaRotaryEmbedding ignores it (the backbone computes unscaled positions)"
            )
        if backbone.rope_frequency_adjustment_factor is not None:
            fields["rope_scaling"] = Llama3RopeScaling(
                factor=backbone.rope_frequency_adjustment_factor,
                low_freq_factor=backbone.rope_low_freq_factor,
                high_freq_factor=backbone.rope_high_freq_factor,
                original_max_position_embeddings=backbone.rope_pretraining_sequence_length,
            )
        return fields
    if backbone.rope_scaling_factor != 1.0:
        fields["rope_scaling"] = LinearRopeScaling(backbone.rope_scaling_factor)
    if family == "MistralBackbone":
        fields["sliding_window"] = _one("sliding_window", (b.sliding_window for b in backbone.transformer_layers))
    elif backbone.use_sliding_window_attention:
        raise ValueError(
            "use_sliding_window_attention=True is not supported: keras-hub's Qwen attention drops the window on its "
            "fused path (taken on the JAX and torch backends)"
        )
    return fields


def _gemma_fields(backbone) -> dict:
    blocks = backbone.transformer_layers
    post_attention, post_ffw = _one("use_post_attention_norm, use_post_ffw_norm", (
        (block.use_post_attention_norm, block.use_post_ffw_norm) for block in blocks))
    if post_attention != post_ffw:
        raise ValueError(
            f"use_post_attention_norm={post_attention!r} with use_post_ffw_norm={post_ffw!r} is not supported: only "
            "both (sandwich_norms) or neither"
        )
    attentions = [block.attention for block in blocks]
    normalize = _one("query_head_dim_normalize", (a.query_head_dim_normalize for a in attentions))
    sliding = [a.use_sliding_window_attention for a in attentions]
    windows = [a.sliding_window_size for a in attentions if a.use_sliding_window_attention]
    window = _one("sliding_window_size", windows) if windows else None
    return dict(
        norm_offset=1.0,
        scale_embeddings=True,
        activation="gelu_tanh",
        sandwich_norms=bool(post_attention),
        attn_logit_soft_cap=_one("attention_logit_soft_cap", (a.logit_soft_cap for a in attentions)),
        final_logit_soft_cap=backbone.token_embedding.logit_soft_cap,
        query_scale=None if normalize else (backbone.hidden_dim // backbone.num_query_heads) ** -0.5,
        sliding_window=window,
        layer_types=None if window is None else tuple(SLIDING_ATTENTION if s else FULL_ATTENTION for s in sliding),
    )


def _norm_eps(weights: dict) -> float:
    """The one epsilon of every norm layer in ``weights`` (ValueError naming ``layer_norm_epsilon`` otherwise)."""
    norms = [weights["final_norm"]] + [layer[name] for layer in weights["layers"] for name in layer if "norm" in name]
    eps = sorted({float(norm.epsilon) for norm in norms})
    if len(eps) != 1:
        raise ValueError(
            f"layer_norm_epsilon: the backbone's norms use the epsilons {eps} (keras-hub's Gemma blocks keep 1e-6 "
            "whatever the backbone's layer_norm_epsilon), but DecoderConfig has one norm_eps"
        )
    return eps[0]


def params_from_keras_hub(backbone, **overrides) -> tuple[DecoderConfig, dict]:
    """The `DecoderConfig` and parameters of a keras-hub Llama, Mistral, Qwen2 or Gemma (1, 2) backbone.

    Args:
      backbone: a ``keras_hub.models.LlamaBackbone`` (or ``Llama3Backbone``),
        ``MistralBackbone``, ``QwenBackbone`` or ``GemmaBackbone``, built
        (keras-hub backbones are built when constructed) and unquantized.
      **overrides: other `DecoderConfig` fields (``dtype``, ``param_dtype``,
        ``implementation``).

    Returns:
      ``(config, params)``: ``Decoder(config).apply({"params": params},
      tokens)`` gives the logits of the matching keras-hub ``*CausalLM``
      (``backbone.token_embedding(hidden, reverse=True)``); params in
      ``config.param_dtype``. See the module docstring for the mapping.

    Raises:
      TypeError: for an object that is not a keras-hub backbone.
      ValueError: naming the field, for another backbone, quantized weights,
        or a setting the decoder does not compute (module docstring).
    """
    import keras  # the caller has a keras-hub backbone, so Keras is installed

    family = _family(backbone)
    for weight in backbone.weights:
        if not keras.backend.is_float_dtype(weight.dtype):
            raise ValueError(f"{weight.path} has dtype={weight.dtype!r}: quantized backbones are not supported")
    family_fields = _family_fields(backbone, family)
    weights = _gemma_weights(backbone) if family == "GemmaBackbone" else _llama_like_weights(backbone)
    embedding = backbone.token_embedding
    weights.update(
        embedding=embedding.embeddings,
        final_norm=backbone.layer_norm,
        lm_head=None if embedding.tie_weights else embedding.reverse_embeddings,
    )
    attention = weights["layers"][0]["attention"]
    _, N, H = attention["query"]["kernel"].shape
    fields = dict(
        vocab_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        model_dim=backbone.hidden_dim,
        num_heads=N,
        num_kv_heads=attention["key"]["kernel"].shape[1],
        head_dim=H,
        mlp_dim=weights["layers"][0]["gate"].shape[1],
        norm_eps=_norm_eps(weights),
        tie_embeddings=bool(embedding.tie_weights),
        attention_bias=_one("query bias", ("bias" in layer["attention"]["query"] for layer in weights["layers"])),
        output_bias=_one("output bias", (
            "bias" in layer["attention"]["attention_output"] for layer in weights["layers"])),
        **family_fields,
    )
    config = DecoderConfig(**fields, **overrides)
    params = _decoder_params(config, weights)
    return config, jax.tree_util.tree_map(lambda w: jnp.asarray(w, config.param_dtype), params)


def _decoder_params(config: DecoderConfig, weights: dict) -> dict:
    """The `Decoder` parameter tree (the names of its module docstring) from family-neutral weights.

    ``weights``: ``embedding``, ``lm_head`` (None when tied), ``final_norm``
    and per layer ``attention_norm``, ``attention`` (a `keras_params` tree),
    ``mlp_norm``, ``gate``, ``up``, ``down`` and, with sandwich norms,
    ``post_attention_norm``, ``post_mlp_norm``; norms are Keras layers with a
    ``scale``, the rest Keras variables or arrays.
    """
    params = {"embed": {"embedding": _array(weights["embedding"])},
              "final_norm": {"scale": _array(weights["final_norm"].scale)}}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": _array(weights["lm_head"])}
    for i, layer in enumerate(weights["layers"]):
        attn = layer["attention"]
        attention = {"query": attn["query"]["kernel"], "key": attn["key"]["kernel"], "value": attn["value"]["kernel"],
                     "output": attn["attention_output"]["kernel"]}
        if config.attention_bias:
            attention.update(query_bias=attn["query"]["bias"], key_bias=attn["key"]["bias"],
                             value_bias=attn["value"]["bias"])
        if config.output_bias:
            attention["output_bias"] = attn["attention_output"]["bias"]
        tree = {
            "attention_norm": {"scale": _array(layer["attention_norm"].scale)},
            "attention": attention,
            "mlp_norm": {"scale": _array(layer["mlp_norm"].scale)},
            "mlp": {name: {"kernel": _array(layer[name])} for name in ("gate", "up", "down")},
        }
        if config.sandwich_norms:
            tree["post_attention_norm"] = {"scale": _array(layer["post_attention_norm"].scale)}
            tree["post_mlp_norm"] = {"scale": _array(layer["post_mlp_norm"].scale)}
        params[f"layers_{i}"] = tree
    return params
