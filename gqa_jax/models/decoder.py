"""The decoder: token embedding, ``num_layers`` pre-norm blocks, a final norm and an LM head.

Each block is RMSNorm, rotary grouped-query self-attention, a residual add,
RMSNorm, a gated MLP and a residual add; `DecoderConfig`'s options add what
the other families need (biases, sliding windows, soft-caps, Gemma's norms).
The attention is the library's layer, `gqa_jax.GroupedQueryAttention`
(`Attention` only names its parameters as below; `attention_fields` maps the
config onto the layer's fields: ``rope``, ``scale``, ``logits_soft_cap``, the
per-layer ``local_window_size``, q/k/v and output biases), with the model's
`gqa_jax.KVCache` passed to its call. Attention goes through dispatch, so the
model uses the GPU/TPU kernels where they serve the call.

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

With ``logical_axes`` every parameter carries logical axis names
(`flax.linen.with_logical_partitioning`; `gqa_jax.sharding.logical_axis_rules`
maps them): the attention's those of `gqa_jax.GroupedQueryAttention`
(``query [embed, q_heads, head_dim]``, ``key``/``value [embed, kv_heads,
head_dim]``, ``output [q_heads, head_dim, embed]``, the biases the trailing
names), ``embedding [vocab, embed]``, ``gate``/``up [embed, mlp]``, ``down
[mlp, embed]``, ``lm_head [embed, vocab]``, norm scales ``[embed]``.

Placed by those names on a mesh of explicit axes (`jax.set_mesh` with
``AxisType.Explicit``), the decoder runs forward and backward there too: the
embedding gather and the dense layers name their outputs' shardings (the
tokens' ``B, T`` and the table's or kernel's last dim), as
`gqa_jax.modules.EinsumDense` does. The logits come out sharded over the
vocabulary (``[B, T, V]`` as ``batch, length, vocab``): a loss that gathers
each target's logit (``jnp.take_along_axis``, optax's
``softmax_cross_entropy_with_integer_labels``) raises ``ShardingTypeError``
there unless the logits are resharded first (``jax.reshard(logits,
P("data"))``, an all-gather), while a one-hot product (``jnp.sum(log_probs *
jax.nn.one_hot(targets, V), -1)``) runs on the shards as they are.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

from gqa_jax.kv_cache import KVCache
from gqa_jax.models.config import DecoderConfig
from gqa_jax.modules.attention_options import logically_partitioned
from gqa_jax.modules.einsum_dense import einsum_dense
from gqa_jax.modules.grouped_query_attention import GroupedQueryAttention, projection_initializers
from gqa_jax.request import concrete_value

Array = jax.Array
Cache = tuple[KVCache, ...]


def projection_init(in_axes, out_axes):
    """The initializer of the attention projections: truncated normal, variance ``1 / fan_in``."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes)


def partitioned(config: DecoderConfig, init, axes):
    """``init`` with the logical axis names ``axes`` when ``config.logical_axes``, else as is."""
    return logically_partitioned(init, axes if config.logical_axes else None)


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
        scale = self.param("scale", partitioned(cfg, norm_init(cfg), ("embed",)), (cfg.model_dim,), cfg.param_dtype)
        return rms_norm(cfg, x, scale)


def soft_cap(x, cap: float | None):
    """``cap * tanh(x / cap)``; ``x`` unchanged when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


# The decoder's names of the layer's projections (the others keep theirs).
PARAMETER_NAMES = {"attention_output": "output"}


def attention_fields(config: DecoderConfig, window: int | None = None) -> dict:
    """The fields of `gqa_jax.GroupedQueryAttention` (and `Attention`) that make one layer of the decoder's attention.

    Args:
      config: the decoder's config: sizes, ``rope``, ``query_scale`` ->
        ``scale``, ``attn_logit_soft_cap`` -> ``logits_soft_cap``,
        ``attention_bias`` -> ``use_bias`` (q, k, v), ``output_bias`` ->
        ``use_output_bias``, ``implementation``, dtypes, ``logical_axes``.
      window: this layer's sliding window ``W`` (a query sees itself and the
        ``W - 1`` keys before it: ``local_window_size=(W - 1, 0)``), or None.
    """
    return dict(
        head_dim=config.head_dim,
        num_query_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        use_bias=config.attention_bias,
        use_output_bias=config.output_bias,
        kernel_init=projection_init(0, (1, 2)),
        out_kernel_init=projection_init((0, 1), 2),
        bias_init="zeros",
        rope=config.rope,
        scale=config.query_scale,
        logits_soft_cap=config.attn_logit_soft_cap,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=config.implementation,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        logical_axes=config.logical_axes,
    )


class Attention(GroupedQueryAttention):
    """`gqa_jax.GroupedQueryAttention` with the decoder's parameter names (built from `attention_fields`).

    Parameters ``query [D, N, H]``, ``key [D, K, H]``, ``value [D, K, H]``,
    ``output [N, H, D]``; with ``use_bias`` also ``query_bias [N, H]``,
    ``key_bias`` and ``value_bias [K, H]``, with ``use_output_bias``
    ``output_bias [D]``. Everything else (its call included) is the layer's:
    ``attention(x, positions=..., use_causal_mask=True, cache=kv_cache,
    num_new=n)`` returns ``(out [B, T, D], updated cache)``.
    """

    @nn.nowrap
    def project(self, name: str, features: Sequence[int], x, contract: int = 1):
        """The layer's projection ``name`` with a flat kernel ``PARAMETER_NAMES.get(name, name)`` and its ``_bias``."""
        features = tuple(features)
        kernel_init, bias_init = projection_initializers(self, name, contract, features)
        x = jnp.asarray(x)
        param = PARAMETER_NAMES.get(name, name)
        kernel = self.param(param, kernel_init, x.shape[x.ndim - contract:] + features, self.param_dtype)
        bias = None if bias_init is None else self.param(param + "_bias", bias_init, features, self.param_dtype)
        return einsum_dense(x, kernel, bias, contract=contract, dtype=self.dtype, precision=self.precision)


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
        hidden_BTF = activation(cfg)(dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate")(x))
        hidden_BTF = hidden_BTF * dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up")(x)
        return dense(cfg, cfg.model_dim, ("mlp", "embed"), "down")(hidden_BTF)


def dense(config: DecoderConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    """A bias-free `flax.linen.Dense` of the decoder (MLP, LM head); its kernel named ``axes`` with ``logical_axes``."""
    return nn.Dense(
        features,
        use_bias=False,
        kernel_init=partitioned(config, nn.linear.default_kernel_init, axes),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        dot_general=dense_dot_general,
        name=name,
    )


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
        """``x [B, T, D] -> ([B, T, D], cache)`` for ``positions`` (int ``[B|1, T]``).

        With a ``cache`` the keys/values of the first ``num_new`` (int ``[B]``,
        default all ``T``) tokens of each row are written to it and the queries
        attend over it; without one the attention is causal over ``x``.
        """
        cfg = self.config
        post = (lambda name: RMSNorm(cfg, name=name)) if cfg.sandwich_norms else (lambda name: lambda y: y)
        attention = Attention(**attention_fields(cfg, self.window), name="attention")
        attended = attention(
            RMSNorm(cfg, name="attention_norm")(x), positions=positions, use_causal_mask=True, cache=cache,
            num_new=num_new
        )
        attended_BTD, cache = attended if cache is not None else (attended, None)
        x_BTD = x + post("post_attention_norm")(attended_BTD)
        x_BTD = x_BTD + post("post_mlp_norm")(MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BTD)))
        return x_BTD, cache


def embed_tokens(config: DecoderConfig, embedding_VD, tokens_BT) -> Array:
    """``embedding[tokens]`` in ``config.dtype``; times ``sqrt(D)`` (in that dtype) with ``scale_embeddings``.

    Args:
      config: the decoder's config.
      embedding_VD: the token embedding ``[V, D]``.
      tokens_BT: int ``[B, T]`` token ids (negative ids count from the end,
        ids outside ``[-V, V)`` embed as NaN, as `jax.numpy.take`).

    Returns:
      ``[B, T, D]``. In explicit-sharding mode (`jax.set_mesh` with
      ``AxisType.Explicit`` axes) sharded as the tokens' ``B, T`` and the
      embedding's ``D``, whatever the vocabulary's sharding.
    """
    embedding_VD = jnp.asarray(embedding_VD, config.dtype)
    out_sharding = _explicit_sharding(tokens_BT, 2, embedding_VD)
    if out_sharding is None:
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
    else:  # jnp.take takes no out_sharding; the same gather (its default mode "fill") through .at
        x_BTD = embedding_VD.at[tokens_BT].get(mode="fill", out_sharding=out_sharding)
    if config.scale_embeddings:
        x_BTD = x_BTD * jnp.asarray(np.sqrt(config.model_dim), config.dtype)
    return x_BTD


def _explicit_sharding(lead: Array, lead_ndim: int, last: Array) -> P | None:
    """In explicit-sharding mode, a product's spec: ``lead``'s first ``lead_ndim`` dims, then ``last``'s last dim.

    The gather ``embedding[tokens]`` takes the tokens' ``B, T`` and the
    table's ``D``; a dense layer ``x [..., F] @ kernel [F, E]`` takes ``x``'s
    leading dims and the kernel's ``E``. Explicit mode needs the spec when
    the compiler cannot infer it: a gather from a vocabulary-sharded table, a
    contraction over a sharded dim (the sum is then reduced across devices).

    Returns:
      None outside explicit mode (the compiler places the result).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return None
    spec = lambda a: (tuple(jax.typeof(a).sharding.spec) + (None,) * a.ndim)[: a.ndim]
    return P(*spec(lead)[:lead_ndim], spec(last)[-1])


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None) -> Array:
    """`jax.lax.dot_general` for the decoders' dense layers (linen `Dense`, NNX `Linear`): ``lhs [..., F] @ rhs [F, E]``.

    In explicit-sharding mode an output ``[..., E]`` with no ``out_sharding``
    given (NNX's ``Linear`` passes its call's, None by default) is sharded as
    `_explicit_sharding` says (the down projection contracts the sharded
    ``mlp`` dim); otherwise this is `jax.lax.dot_general` unchanged.
    """
    if out_sharding is None:
        out_sharding = _explicit_sharding(lhs, lhs.ndim - 1, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                               out_sharding=out_sharding)


def final_logits(config: DecoderConfig, logits_BTV) -> Array:
    """Float32 logits, soft-capped by ``config.final_logit_soft_cap``."""
    return soft_cap(jnp.asarray(logits_BTV, jnp.float32), config.final_logit_soft_cap)


class Decoder(nn.Module):
    """The decoder; see the module docstring for its parameters, `DecoderConfig` for its options.

    Example::

        from gqa_jax.models import DecoderConfig

        config = DecoderConfig(vocab_size=256, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
        model = Decoder(config)
        tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)  # [B, T]
        params = model.init(jax.random.key(1), tokens)["params"]
        logits = model.apply({"params": params}, tokens)          # [B, T, V]
        cache = model.init_cache(batch_size=2, max_length=32)    # one KVCache per layer
        logits, cache = model.apply({"params": params}, tokens, cache, num_new=jnp.array([12, 5]))
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
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.model_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=partitioned(cfg, nn.linear.default_embed_init, ("vocab", "embed")),
            name="embed",
        )
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
            logits_BTV = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(x_BTD)
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
    if cache[0].lengths.shape[0] != B:
        raise ValueError(
            f"the cache's batch must match the tokens': cache[0].lengths.shape[0]={cache[0].lengths.shape[0]}, "
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


