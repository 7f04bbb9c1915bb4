"""A small Llama-style decoder built from this library's parts.

Token embedding, then ``num_layers`` pre-norm blocks (RMSNorm, rotary
grouped-query attention through `gqa_jax.project_heads`, `gqa_jax.apply_rope`,
`gqa_jax.dot_product_attention` / `gqa_jax.KVCache`, and
`gqa_jax.project_output`; RMSNorm, SwiGLU MLP), a final RMSNorm and an LM head
(or the transposed embedding when tied). Attention goes through dispatch, so
the model uses the GPU/TPU kernels where they serve the call.

Two ways to call `Decoder`:

* ``logits = model.apply({"params": params}, tokens)``: causal forward pass
  over whole sequences (training, scoring). Right padding is harmless: a valid
  token never sees a later one.
* ``logits, cache = model.apply({"params": params}, tokens, cache, num_new=n)``:
  the tokens continue each row after the ``cache.lengths`` tokens already in
  ``cache`` (a tuple of `gqa_jax.KVCache`, one per layer, from `init_cache`);
  only the first ``n[b]`` tokens of row ``b`` are real (ragged prefill).
  `gqa_jax.decoding` drives this.

Parameter layout and Llama-family (Hugging Face ``LlamaForCausalLM``) names.
``D`` model dim, ``N`` heads, ``K`` KV heads, ``H`` head dim, ``F`` MLP dim,
``V`` vocabulary; HF linear weights are ``[out, in]``. `params_from_hf` does
this mapping (``...`` is ``model.layers.{i}.``)::

    HF name [shape]                                 our path [shape]                       conversion
    model.embed_tokens.weight [V, D]                embed/embedding [V, D]                 as is
    ...input_layernorm.weight [D]                   layers_{i}/attention_norm/scale [D]    as is
    ...self_attn.q_proj.weight [N*H, D]             layers_{i}/attention/query [D, N, H]   w.T.reshape(D, N, H)
    ...self_attn.k_proj.weight [K*H, D]             layers_{i}/attention/key [D, K, H]     w.T.reshape(D, K, H)
    ...self_attn.v_proj.weight [K*H, D]             layers_{i}/attention/value [D, K, H]   w.T.reshape(D, K, H)
    ...self_attn.o_proj.weight [D, N*H]             layers_{i}/attention/output [N, H, D]  w.T.reshape(N, H, D)
    ...post_attention_layernorm.weight [D]          layers_{i}/mlp_norm/scale [D]          as is
    ...mlp.gate_proj.weight [F, D]                  layers_{i}/mlp/gate/kernel [D, F]      w.T
    ...mlp.up_proj.weight [F, D]                    layers_{i}/mlp/up/kernel [D, F]        w.T
    ...mlp.down_proj.weight [D, F]                  layers_{i}/mlp/down/kernel [F, D]      w.T
    model.norm.weight [D]                           final_norm/scale [D]                   as is
    lm_head.weight [V, D] (untied only)             lm_head/kernel [D, V]                  w.T

Config (`config_from_hf`): ``hidden_size -> model_dim``, ``num_hidden_layers
-> num_layers``, ``num_attention_heads -> num_heads``, ``num_key_value_heads ->
num_kv_heads``, ``head_dim``, ``intermediate_size -> mlp_dim``, ``rope_theta``,
``rms_norm_eps -> norm_eps``, ``tie_word_embeddings -> tie_embeddings``.
`config_from_hf` refuses, naming the field, every setting that would change
the math here without a trace in the weights: ``rope_scaling`` /
``rope_parameters`` other than the default rotary, ``sliding_window``,
``attention_bias``, ``mlp_bias``, a ``hidden_act`` other than SiLU, partial
rotary, logit soft-caps, non-full ``layer_types``, and model types other than
``llama`` and ``mistral``. `params_from_hf` refuses weights it would not use
(q/k/v or MLP biases, an untied ``lm_head`` under ``tie_embeddings``).

Hugging Face checkpoints already use the half-split rotary convention of
`gqa_jax.apply_rope` (their conversion script permuted Meta's interleaved
``q``/``k`` rows), so no permutation is needed; Meta's original
``consolidated.pth`` weights would need that permutation first. Not
supported: ``rope_scaling`` (Llama 3.1+ long-context frequencies), attention
or MLP biases (Qwen2), sliding windows (Mistral v0.1).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.attention import dot_product_attention
from gqa_jax.kv_cache import KVCache
from gqa_jax.projection import project_heads, project_output
from gqa_jax.request import concrete_value
from gqa_jax.rope import apply_rope
from pallas_kernels.arguments import positive_int

Array = jax.Array
Cache = tuple[KVCache, ...]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and options of a `Decoder`.

    Attributes:
      vocab_size: ``V``.
      num_layers: transformer blocks.
      model_dim: ``D``.
      num_heads: query heads ``N``.
      num_kv_heads: key/value heads ``K``; ``N % K == 0`` (``K == N``: MHA,
        ``K == 1``: MQA).
      head_dim: ``H``; default ``D // N``.
      mlp_dim: hidden size ``F`` of the SwiGLU MLP; default ``4 * D``.
      rope_theta: base of the rotary frequencies.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: compute logits with the transposed token embedding
        instead of a separate LM head.
      dtype: computation (and cache) dtype.
      param_dtype: parameter dtype.
      implementation: passed to `gqa_jax.dot_product_attention` (None: the
        fastest that serves each call on this platform).
    """

    vocab_size: int
    num_layers: int = 2
    model_dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | tuple[str, ...] | None = None

    def __post_init__(self):
        sizes = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
        for name in sizes:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        if self.head_dim is None:
            if self.model_dim % self.num_heads:
                raise ValueError(
                    f"model_dim={self.model_dim} must be a multiple of num_heads={self.num_heads} "
                    f"when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.model_dim // self.num_heads)
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", 4 * self.model_dim)
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite float, got {name}={value!r}")
        if not isinstance(self.tie_embeddings, (bool, np.bool_)):
            raise TypeError(f"tie_embeddings must be True or False, got tie_embeddings={self.tie_embeddings!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if isinstance(self.implementation, list):
            object.__setattr__(self, "implementation", tuple(self.implementation))


def projection_init(in_axes, out_axes):
    """The initializer of the attention projections: truncated normal, variance ``1 / fan_in``."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes)


class Attention(nn.Module):
    """Rotary grouped-query self-attention, with or without a `KVCache`.

    Parameters ``query [D, N, H]``, ``key [D, K, H]``, ``value [D, K, H]``,
    ``output [N, H, D]``; no biases.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, cache: KVCache | None = None, num_new=None):
        """Self-attention of ``x [B, T, D]``, queries and keys rotated to ``positions`` (int ``[B, T]`` or ``[1, T]``).

        With a ``cache``, the keys/values of the first ``num_new`` (int ``[B]``,
        default all ``T``) tokens of each row are written to it and the queries
        attend over it.

        Returns:
          ``(out [B, T, D], cache)``.
        """
        cfg = self.config
        D, N, K, H = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        in_init, out_init = projection_init(0, (1, 2)), projection_init((0, 1), 2)
        w_q_DNH = self.param("query", in_init, (D, N, H), cfg.param_dtype)
        w_k_DKH = self.param("key", in_init, (D, K, H), cfg.param_dtype)
        w_v_DKH = self.param("value", in_init, (D, K, H), cfg.param_dtype)
        w_o_NHD = self.param("output", out_init, (N, H, D), cfg.param_dtype)
        return rotary_attention(cfg, x, positions, (w_q_DNH, w_k_DKH, w_v_DKH, w_o_NHD), cache, num_new)


def rotary_attention(
    config: DecoderConfig, x, positions, weights: tuple[Array, Array, Array, Array], cache=None, num_new=None
):
    """The body of `Attention` (linen and NNX): projections, rotary embedding, attention, output projection.

    Args:
      config: the decoder's config.
      x: ``[B, T, D]``.
      positions: int ``[B, T]`` or ``[1, T]``.
      weights: ``(query [D, N, H], key [D, K, H], value [D, K, H], output [N, H, D])``.
      cache, num_new: as in `Attention.__call__`.

    Returns:
      ``(out [B, T, D], cache)``.
    """
    x_BTD, w_q_DNH, w_k_DKH, w_v_DKH, w_o_NHD = nn.dtypes.promote_dtype(x, *weights, dtype=config.dtype)
    q_BTNH = apply_rope(project_heads(x_BTD, w_q_DNH), positions, theta=config.rope_theta)
    k_BTKH = apply_rope(project_heads(x_BTD, w_k_DKH), positions, theta=config.rope_theta)
    v_BTKH = project_heads(x_BTD, w_v_DKH)
    if cache is None:
        out_BTNH = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=config.implementation)
    else:
        cache = cache.update(k_BTKH, v_BTKH, num_new=num_new)
        out_BTNH = cache.attend(q_BTNH, num_new=num_new, implementation=config.implementation)
    return project_output(out_BTNH, w_o_NHD), cache


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        """``x [B, T, D] -> [B, T, D]``."""
        cfg = self.config
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        hidden_BTF = nn.silu(dense(cfg.mlp_dim, "gate")(x)) * dense(cfg.mlp_dim, "up")(x)
        return dense(cfg.model_dim, "down")(hidden_BTF)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, cache: KVCache | None = None, num_new=None):
        """``x [B, T, D] -> ([B, T, D], cache)``; ``positions``, ``cache`` and ``num_new`` as in `Attention`."""
        cfg = self.config
        norm = lambda name: nn.RMSNorm(  # noqa: E731
            epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        attended_BTD, cache = Attention(cfg, name="attention")(norm("attention_norm")(x), positions, cache, num_new)
        x_BTD = x + attended_BTD
        x_BTD = x_BTD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BTD))
        return x_BTD, cache


class Decoder(nn.Module):
    """The Llama-style decoder; see the module docstring for its parameters.

    Example::

        config = DecoderConfig(vocab_size=256, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
        model = Decoder(config)
        params = model.init(jax.random.key(0), tokens)["params"]
        logits = model.apply({"params": params}, tokens)          # [B, T, V]
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens, cache: Sequence[KVCache] | None = None, *, num_new=None):
        """Logits of the next token at every position.

        Args:
          tokens: int ``[B, T]`` token ids.
          cache: optional tuple of `KVCache` (one per layer, from `init_cache`)
            holding each row's earlier tokens; the tokens continue them.
          num_new: with a cache, optional int ``[B]``: only the first
            ``num_new[b]`` tokens of row ``b`` are written and attend (right
            padding); default all ``T``.

        Returns:
          float32 logits ``[B, T, V]`` without a cache; ``(logits, new_cache)``
          with one. Logits at padded positions are meaningless.

        Raises:
          ValueError, TypeError: for wrong token shapes or dtypes, a cache of
            the wrong number of layers, or ``num_new`` without a cache.
        """
        cfg = self.config
        tokens_BT, positions_BT = token_positions(cfg, tokens, cache, num_new)
        embed = nn.Embed(cfg.vocab_size, cfg.model_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="embed")
        x_BTD = embed(tokens_BT)
        new_cache = []
        for i in range(cfg.num_layers):
            x_BTD, layer_cache = Block(cfg, name=f"layers_{i}")(
                x_BTD, positions_BT, None if cache is None else cache[i], num_new
            )
            new_cache.append(layer_cache)
        x_BTD = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lm_head"
            )(x_BTD)
        logits_BTV = logits_BTV.astype(jnp.float32)
        return logits_BTV if cache is None else (logits_BTV, tuple(new_cache))


def token_positions(config: DecoderConfig, tokens, cache, num_new) -> tuple[Array, Array]:
    """The checked ``tokens [B, T]`` of a `Decoder` call and their positions (int ``[B, T]`` or ``[1, T]``).

    Raises:
      ValueError, TypeError: as `Decoder.__call__`.
    """
    tokens_BT = jnp.asarray(tokens)
    if tokens_BT.ndim != 2:
        raise ValueError(f"tokens must have rank 2 [B,T], got tokens.shape={tuple(tokens_BT.shape)}")
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token ids, got tokens.dtype={tokens_BT.dtype}")
    B, T = tokens_BT.shape
    if cache is None and num_new is not None:
        raise ValueError("num_new needs a cache, got cache=None")
    check_token_ids("tokens", tokens_BT, config.vocab_size, num_new)
    if cache is None:
        return tokens_BT, jnp.arange(T, dtype=jnp.int32)[None, :]
    if len(cache) != config.num_layers:
        raise ValueError(
            f"cache must hold one KVCache per layer: {len(cache)=} != cfg.num_layers={config.num_layers}"
        )
    if cache[0].key.shape[0] != B:
        raise ValueError(
            f"the cache's batch must match the tokens': cache[0].key.shape[0]={cache[0].key.shape[0]}, "
            f"tokens.shape[0]={B}"
        )
    return tokens_BT, cache[0].lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]


def check_token_ids(name: str, tokens_BT, vocab_size: int, num_real=None) -> None:
    """Raises ``ValueError`` for a known token id outside ``[0, V)`` among the real tokens of each row.

    Args:
      name: the argument, for the message.
      tokens_BT: int ``[B, T]``.
      vocab_size: ``V``.
      num_real: optional int ``[B]``: only the first ``num_real[b]`` tokens of
        row ``b`` are real (the padding may hold any int); default all.

    Traced values are not read (the check is skipped under ``jit``).
    """
    tokens, count = concrete_value(tokens_BT), None if num_real is None else concrete_value(num_real)
    if tokens is None or (num_real is not None and count is None):
        return
    real = np.ones(tokens.shape, bool)
    if count is not None:
        real = np.arange(tokens.shape[1])[None, :] < np.broadcast_to(count, tokens.shape[:1])[:, None]
    bad = real & ((tokens < 0) | (tokens >= vocab_size))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(
            f"{name} token ids must be in [0, vocab_size={vocab_size}), got {name}[{row}, {col}]={int(tokens[row, col])}"
        )


def init_cache(config: DecoderConfig, batch_size: int, max_length: int) -> Cache:
    """An empty cache for a `Decoder`: one `KVCache` per layer, capacity ``max_length``, in ``config.dtype``."""
    return tuple(
        KVCache.init(batch_size, max_length, config.num_kv_heads, config.head_dim, config.dtype)
        for _ in range(config.num_layers)
    )


# Model types whose math this decoder reproduces (with the settings `config_from_hf` checks).
HF_MODEL_TYPES = ("llama", "mistral")
_HF_ROPE_TYPES = (None, "default")


def _hf_fields(hf_config) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if callable(getattr(hf_config, "to_dict", None)):
        return hf_config.to_dict()
    raise TypeError(
        f"hf_config must be a transformers config or its dict (config.json), got {type(hf_config).__name__}"
    )


def _refuse_unsupported_hf_settings(fields: dict) -> None:
    model_type = fields.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported: only {list(HF_MODEL_TYPES)}")
    for name in ("attention_bias", "mlp_bias"):
        if fields.get(name):
            raise ValueError(f"{name}={fields[name]!r} is not supported: the decoder's projections have no biases")
    for name in ("rope_scaling", "rope_parameters"):
        rope = fields.get(name)
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, Mapping) else rope
            if kind not in _HF_ROPE_TYPES:
                raise ValueError(f"{name}={rope!r} is not supported: only the default rotary frequencies")
    if fields.get("sliding_window") is not None and fields.get("use_sliding_window", True):
        raise ValueError(
            f"sliding_window={fields['sliding_window']!r} is not supported: the decoder attends over every "
            "earlier token"
        )
    if any(kind != "full_attention" for kind in fields.get("layer_types") or ()):
        raise ValueError(f"layer_types={fields['layer_types']!r} is not supported: only full attention in every layer")
    if fields.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act={fields['hidden_act']!r} is not supported: the MLP is SwiGLU (silu)")
    if fields.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={fields['partial_rotary_factor']!r} is not supported: only 1.0")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if fields.get(name) is not None:
            raise ValueError(f"{name}={fields[name]!r} is not supported: no logit soft-cap")


def config_from_hf(hf_config, **overrides) -> DecoderConfig:
    """The `DecoderConfig` of a Hugging Face Llama-family config, refusing what this decoder does not compute.

    Args:
      hf_config: a ``transformers`` config (e.g. ``LlamaConfig``) or its dict
        (the parsed ``config.json``); a dict without ``model_type`` is read as
        Llama.
      **overrides: other `DecoderConfig` fields (``dtype``, ``param_dtype``,
        ``implementation``).

    Returns:
      The config (see the module docstring for the field mapping).

    Raises:
      ValueError: naming the field, for a setting that changes the model's
        math and is not supported here, or a missing size.
      TypeError: for an ``hf_config`` of another type.
    """
    fields = _hf_fields(hf_config)
    _refuse_unsupported_hf_settings(fields)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if fields.get(name) is None]
    if missing:
        raise ValueError(f"hf_config lacks {missing}")
    rope = fields.get("rope_parameters") or {}
    num_kv_heads = fields.get("num_key_value_heads")
    return DecoderConfig(
        vocab_size=fields["vocab_size"],
        num_layers=fields["num_hidden_layers"],
        model_dim=fields["hidden_size"],
        num_heads=fields["num_attention_heads"],
        num_kv_heads=fields["num_attention_heads"] if num_kv_heads is None else num_kv_heads,
        head_dim=fields.get("head_dim"),
        mlp_dim=fields["intermediate_size"],
        rope_theta=float(fields.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(fields.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(fields.get("tie_word_embeddings", False)),
        **overrides,
    )


def _unused_weight_reason(name: str) -> str:
    if name.endswith(".bias") and ".self_attn." in name:
        return "attention biases (attention_bias=True, as in Qwen2) are not supported"
    if name.endswith(".bias") and ".mlp." in name:
        return "MLP biases (mlp_bias=True) are not supported"
    return "this decoder has no such weight"


def params_from_hf(state_dict: Mapping[str, Any], config) -> dict:
    """Maps a Hugging Face ``LlamaForCausalLM`` state dict onto `Decoder` parameters.

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
        weight (a bias, a separate ``lm_head`` with tied embeddings) that the
        decoder would silently drop.
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

    def cast(tree):
        return jax.tree_util.tree_map(lambda w: jnp.asarray(w, config.param_dtype), tree)

    params = {"embed": {"embedding": get("model.embed_tokens.weight", (V, D))}}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        params[f"layers_{i}"] = {
            "attention_norm": {"scale": get(p + "input_layernorm.weight", (D,))},
            "attention": {
                "query": get(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H),
                "key": get(p + "self_attn.k_proj.weight", (K * H, D)).T.reshape(D, K, H),
                "value": get(p + "self_attn.v_proj.weight", (K * H, D)).T.reshape(D, K, H),
                "output": get(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(N, H, D),
            },
            "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight", (D,))},
            "mlp": {
                "gate": {"kernel": get(p + "mlp.gate_proj.weight", (F, D)).T},
                "up": {"kernel": get(p + "mlp.up_proj.weight", (F, D)).T},
                "down": {"kernel": get(p + "mlp.down_proj.weight", (D, F)).T},
            },
        }
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
    return cast(params)
