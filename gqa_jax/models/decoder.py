"""The decoder: token embedding, ``num_layers`` pre-norm blocks, a final norm and an LM head.

Each block is RMSNorm, rotary grouped-query self-attention (through
`gqa_jax.project_heads`, `gqa_jax.rope.RotaryEmbedding`,
`gqa_jax.dot_product_attention` / `gqa_jax.KVCache` and
`gqa_jax.project_output`), a residual add, RMSNorm, a gated MLP and a residual
add; `DecoderConfig`'s options add what the other families need (biases,
sliding windows, soft-caps, Gemma's norms). Attention goes through dispatch,
so the model uses the GPU/TPU kernels where they serve the call.

Parameters (``D`` model dim, ``N`` heads, ``K`` KV heads, ``H`` head dim,
``F`` MLP dim, ``V`` vocabulary), bracketed ones only with the option::

    embed/embedding [V, D]
    layers_{i}/attention_norm/scale [D]
    layers_{i}/attention/query [D, N, H]   key, value [D, K, H]   output [N, H, D]
    layers_{i}/attention/(query_bias [N, H], key_bias, value_bias [K, H])   attention_bias
    layers_{i}/attention/(output_bias [D])                                 output_bias
    layers_{i}/(post_attention_norm/scale [D])                             sandwich_norms
    layers_{i}/mlp_norm/scale [D]
    layers_{i}/mlp/gate/kernel, up/kernel [D, F]   down/kernel [F, D]
    layers_{i}/(post_mlp_norm/scale [D])                                   sandwich_norms
    final_norm/scale [D]
    (lm_head/kernel [D, V])                                                 unless tie_embeddings
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.attention import dot_product_attention
from gqa_jax.kv_cache import KVCache
from gqa_jax.models.config import DecoderConfig
from gqa_jax.projection import project_heads, project_output
from gqa_jax.request import concrete_value

Array = jax.Array
Cache = tuple[KVCache, ...]


def projection_init(in_axes, out_axes):
    """The initializer of the attention projections: truncated normal, variance ``1 / fan_in``."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes)


def rms_norm(config: DecoderConfig, x, scale):
    """RMSNorm of ``x [..., D]`` in float32, times ``config.norm_offset + scale [D]``, in ``config.dtype``."""
    x_f32 = jnp.asarray(x, jnp.float32)
    normed = x_f32 * jax.lax.rsqrt(jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True) + config.norm_eps)
    return (normed * (config.norm_offset + jnp.asarray(scale, jnp.float32))).astype(config.dtype)


def norm_init(config: DecoderConfig):
    """Ones for a plain RMSNorm scale, zeros with Gemma's ``1 +`` offset: the norm starts as the identity."""
    return nn.initializers.zeros if config.norm_offset else nn.initializers.ones


class RMSNorm(nn.Module):
    """`rms_norm` with parameter ``scale [D]``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        """``x [B, T, D] -> [B, T, D]``."""
        cfg = self.config
        scale = self.param("scale", norm_init(cfg), (cfg.model_dim,), cfg.param_dtype)
        return rms_norm(cfg, x, scale)


def soft_cap(x, cap: float | None):
    """``cap * tanh(x / cap)``; ``x`` unchanged when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
    """Rotary grouped-query self-attention, with or without a `KVCache`.

    Parameters ``query [D, N, H]``, ``key [D, K, H]``, ``value [D, K, H]``,
    ``output [N, H, D]``; with ``config.attention_bias`` also ``query_bias
    [N, H]``, ``key_bias`` and ``value_bias [K, H]``, with
    ``config.output_bias`` ``output_bias [D]``.

    Attributes:
      config: the decoder's config.
      window: this layer's sliding window (`DecoderConfig.window`), or None.
    """

    config: DecoderConfig
    window: int | None = None

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
        weights = {
            "query": self.param("query", in_init, (D, N, H), cfg.param_dtype),
            "key": self.param("key", in_init, (D, K, H), cfg.param_dtype),
            "value": self.param("value", in_init, (D, K, H), cfg.param_dtype),
            "output": self.param("output", out_init, (N, H, D), cfg.param_dtype),
        }
        for name, shape in attention_bias_shapes(cfg).items():
            weights[name] = self.param(name, nn.initializers.zeros, shape, cfg.param_dtype)
        return rotary_attention(cfg, x, positions, weights, cache, num_new, window=self.window)


def attention_bias_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """The bias parameters of `Attention` under ``config``: name to shape."""
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    shapes = {}
    if config.attention_bias:
        shapes.update(query_bias=(N, H), key_bias=(K, H), value_bias=(K, H))
    if config.output_bias:
        shapes["output_bias"] = (config.model_dim,)
    return shapes


def rotary_attention(config: DecoderConfig, x, positions, weights: dict, cache=None, num_new=None, *, window=None):
    """The body of `Attention` (linen and NNX): projections, rotary embedding, attention, output projection.

    Args:
      config: the decoder's config (rotary embedding, logit scale and
        soft-cap, implementation).
      x: ``[B, T, D]``.
      positions: int ``[B, T]`` or ``[1, T]``.
      weights: ``query [D, N, H]``, ``key [D, K, H]``, ``value [D, K, H]``,
        ``output [N, H, D]`` and the biases of `attention_bias_shapes`.
      cache, num_new: as in `Attention.__call__`.
      window: the layer's sliding window, or None.

    Returns:
      ``(out [B, T, D], cache)``.
    """
    names = sorted(weights)
    x_BTD, *cast = nn.dtypes.promote_dtype(x, *(weights[name] for name in names), dtype=config.dtype)
    w = dict(zip(names, cast))
    bias = lambda name: w.get(name + "_bias", 0)  # noqa: E731
    rope = config.rope
    q_BTNH = rope.apply(project_heads(x_BTD, w["query"]) + bias("query"), positions)
    k_BTKH = rope.apply(project_heads(x_BTD, w["key"]) + bias("key"), positions)
    v_BTKH = project_heads(x_BTD, w["value"]) + bias("value")
    options = dict(
        scale=config.query_scale,
        logits_soft_cap=config.attn_logit_soft_cap,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=config.implementation,
    )
    if cache is None:
        out_BTNH = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, **options)
    else:
        cache = cache.update(k_BTKH, v_BTKH, num_new=num_new)
        out_BTNH = cache.attend(q_BTNH, num_new=num_new, **options)
    return project_output(out_BTNH, w["output"]) + bias("output"), cache


def activation(config: DecoderConfig):
    """The MLP gate's nonlinearity: SiLU, or tanh-approximate GELU (PyTorch's ``gelu_pytorch_tanh``)."""
    return nn.silu if config.activation == "silu" else lambda x: nn.gelu(x, approximate=True)


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, no biases (``act``: `activation`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        """``x [B, T, D] -> [B, T, D]``."""
        cfg = self.config
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        hidden_BTF = activation(cfg)(dense(cfg.mlp_dim, "gate")(x)) * dense(cfg.mlp_dim, "up")(x)
        return dense(cfg.model_dim, "down")(hidden_BTF)


class Block(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

    With ``config.sandwich_norms`` each branch is normed on its way out too:
    ``x + post_attention_norm(attention(attention_norm(x)))``, then ``x +
    post_mlp_norm(mlp(mlp_norm(x)))`` (Gemma 2).
    """

    config: DecoderConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x, positions, cache: KVCache | None = None, num_new=None):
        """``x [B, T, D] -> ([B, T, D], cache)``; ``positions``, ``cache`` and ``num_new`` as in `Attention`."""
        cfg = self.config
        post = (lambda name: RMSNorm(cfg, name=name)) if cfg.sandwich_norms else (lambda name: lambda y: y)
        attended_BTD, cache = Attention(cfg, self.window, name="attention")(
            RMSNorm(cfg, name="attention_norm")(x), positions, cache, num_new
        )
        x_BTD = x + post("post_attention_norm")(attended_BTD)
        x_BTD = x_BTD + post("post_mlp_norm")(MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BTD)))
        return x_BTD, cache


def embed_tokens(config: DecoderConfig, embedding_VD, tokens_BT) -> Array:
    """``embedding[tokens]`` in ``config.dtype``; times ``sqrt(D)`` (in that dtype) with ``scale_embeddings``."""
    x_BTD = jnp.take(jnp.asarray(embedding_VD, config.dtype), tokens_BT, axis=0)
    if config.scale_embeddings:
        x_BTD = x_BTD * jnp.asarray(np.sqrt(config.model_dim), config.dtype)
    return x_BTD


def final_logits(config: DecoderConfig, logits_BTV) -> Array:
    """Float32 logits, soft-capped by ``config.final_logit_soft_cap``."""
    return soft_cap(jnp.asarray(logits_BTV, jnp.float32), config.final_logit_soft_cap)


class Decoder(nn.Module):
    """The decoder; see the module docstring for its parameters, `DecoderConfig` for its options.

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
        x_BTD = embed_tokens(cfg, embed.embedding, tokens_BT)
        new_cache = []
        for i in range(cfg.num_layers):
            x_BTD, layer_cache = Block(cfg, cfg.window(i), name=f"layers_{i}")(
                x_BTD, positions_BT, None if cache is None else cache[i], num_new
            )
            new_cache.append(layer_cache)
        x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lm_head"
            )(x_BTD)
        logits_BTV = final_logits(cfg, logits_BTV)
        return logits_BTV if cache is None else (logits_BTV, tuple(new_cache))

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """`init_cache` for this model's config (the `gqa_jax.decoding` protocol)."""
        return init_cache(self.config, batch_size, max_length)


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
            f"{name} token ids must be in [0, vocab_size={vocab_size}), "
            f"got {name}[{row}, {col}]={int(tokens[row, col])}"
        )


def init_cache(config: DecoderConfig, batch_size: int, max_length: int) -> Cache:
    """An empty cache for a `Decoder`: one `KVCache` per layer, capacity ``max_length``, in ``config.dtype``."""
    return tuple(
        KVCache.init(batch_size, max_length, config.num_kv_heads, config.head_dim, config.dtype)
        for _ in range(config.num_layers)
    )


