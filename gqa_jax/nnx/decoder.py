"""The decoder of `gqa_jax.models` in Flax NNX, with the linen parameter tree.

Same `gqa_jax.models.DecoderConfig`, same calls (``model(tokens)`` for the
causal pass; ``model(tokens, cache, num_new=n)`` continuing a tuple of
`gqa_jax.KVCache` from `gqa_jax.models.init_cache`), same attention (the body
of the grouped-query layers,
`gqa_jax.modules.grouped_query_attention.grouped_query_attention`, with the
fields of `gqa_jax.models.decoder.attention_fields`), the same
`gqa_jax.models.token_positions`, and the same parameter names and shapes
(``layers_{i}/attention/query [D, N, H]``, ...), so
`gqa_jax.models.params_from_hf` output loads with
`gqa_jax.nnx.load_linen_params` and `gqa_jax.decoding.generate` runs either.
The parameters always carry their logical axis names (``nnx.Param`` metadata,
read by `nnx.get_partition_spec`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from gqa_jax import models
from gqa_jax.attention import dot_product_attention
from gqa_jax.kv_cache import KVCache
from gqa_jax.models import DecoderConfig
from gqa_jax.modules.attention_options import PROJECTION_AXES
from gqa_jax.modules.einsum_dense import einsum_dense
from gqa_jax.modules.grouped_query_attention import (
    check_gqa_fields,
    check_projection_fields,
    grouped_query_attention,
    projection_initializers,
)
from gqa_jax.nnx.einsum_dense import partitioned
from gqa_jax.nnx.keras_layer import ATTENTION_OPTIONS, KerasAttentionLayer
from gqa_jax.nnx.params import linen_params

Array = jax.Array


class Attention(KerasAttentionLayer):
    """`gqa_jax.models.Attention` in NNX: the grouped-query layers' body over the decoder's flat parameters.

    Args:
      config: the decoder's config.
      window: this layer's sliding window (`gqa_jax.models.DecoderConfig.window`), or None.
      rngs: ``params`` draws the projections.
    """

    def __init__(self, config: DecoderConfig, window: int | None = None, *, rngs: nnx.Rngs):
        # NNX names the axes as nnx.Param metadata (always); the linen boxes stay off.
        fields = {**models.decoder.attention_fields(config, window), "logical_axes": False}
        self.head_dim, self.num_query_heads = fields["head_dim"], fields["num_query_heads"]
        self.num_key_value_heads = fields["num_key_value_heads"]
        self.use_output_bias, self.logical_axes = fields["use_output_bias"], fields["logical_axes"]
        self.kernel_init, self.out_kernel_init = fields["kernel_init"], fields["out_kernel_init"]
        self.bias_init = fields["bias_init"]
        defaults = dict(qk_transform=None, normalize_qk=None, norm_epsilon=1e-6, broadcast_dropout=False,
                        sow_weights=False, attention_fn=None)
        self._init_settings(
            dropout=0.0,
            use_bias=fields["use_bias"],
            sliding_window=None,
            flash_attention=None,
            use_gate=False,
            implementation=fields["implementation"],
            deterministic=True,
            dtype=fields["dtype"],
            precision=None,
            options={name: fields.get(name, defaults.get(name)) for name in ATTENTION_OPTIONS},
        )
        check_gqa_fields(self)
        check_projection_fields(self)
        self._init_norms(self.head_dim, dtype=self.dtype, param_dtype=config.param_dtype, rngs=rngs)
        D, N, K, H = config.model_dim, config.num_heads, config.num_kv_heads, config.head_dim
        for name, in_shape, features in (("query", (D,), (N, H)), ("key", (D,), (K, H)), ("value", (D,), (K, H)),
                                         ("attention_output", (N, H), (D,))):
            kernel_init, bias_init = projection_initializers(self, name, len(in_shape), features)
            param = models.decoder.PARAMETER_NAMES.get(name, name)
            axes = PROJECTION_AXES[name]
            setattr(self, param, nnx.Param(partitioned(kernel_init, axes)(rngs.params(), in_shape + features,
                                                                           config.param_dtype)))
            if bias_init is not None:
                bias = partitioned(bias_init, axes[len(in_shape):])(rngs.params(), features, config.param_dtype)
                setattr(self, param + "_bias", nnx.Param(bias))

    def project(self, name: str, features: Sequence[int], x: Array, contract: int = 1) -> Array:
        """The projection ``name`` over the flat ``query``, ... ``output`` kernels and their ``_bias`` (if any)."""
        param = models.decoder.PARAMETER_NAMES.get(name, name)
        bias = getattr(self, param + "_bias", None)
        return einsum_dense(x, getattr(self, param)[...], None if bias is None else bias[...], contract=contract,
                            dtype=self.dtype)

    def __call__(self, x, positions, cache: KVCache | None = None, num_new=None):
        """Causal self-attention of ``x [B, T, D]`` at ``positions`` (as `gqa_jax.models.Block`): ``(out, cache)``."""
        result = grouped_query_attention(
            self,
            x,
            None,
            None,
            decode=False,
            cache=cache,
            cache_update_index=None,
            num_new=num_new,
            attend=dot_product_attention,
            project=self.project,
            normalize=self.normalize,
            use_causal_mask=True,
            positions=positions,
        )
        return result if cache is not None else (result, None)


def _linear(config: DecoderConfig, in_features: int, out_features: int, axes, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        dot_general=models.decoder.dense_dot_general,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """`gqa_jax.models.RMSNorm` in NNX: parameter ``scale [D]``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = partitioned(models.decoder.norm_init(config), ("embed",))
        self.scale = nnx.Param(init(rngs.params(), (config.model_dim,), config.param_dtype))

    def __call__(self, x):
        """``x [B, T, D] -> [B, T, D]``."""
        return models.decoder.rms_norm(self.config, x, self.scale[...])


class MLP(nnx.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``: ``gate``/``up`` ``[D, F]``, ``down [F, D]``, no biases."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        D, F = config.model_dim, config.mlp_dim
        self.config = config
        self.gate = _linear(config, D, F, ("embed", "mlp"), rngs)
        self.up = _linear(config, D, F, ("embed", "mlp"), rngs)
        self.down = _linear(config, F, D, ("mlp", "embed"), rngs)

    def __call__(self, x):
        """``x [B, T, D] -> [B, T, D]``."""
        return self.down(models.decoder.activation(self.config)(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """`gqa_jax.models.Block` in NNX: pre-norm attention and MLP branches (and Gemma 2's sandwich norms)."""

    def __init__(self, config: DecoderConfig, window: int | None = None, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config, rngs=rngs)
        self.attention = Attention(config, window, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        sandwich = config.sandwich_norms
        self.post_attention_norm = RMSNorm(config, rngs=rngs) if sandwich else nnx.data(None)
        self.post_mlp_norm = RMSNorm(config, rngs=rngs) if sandwich else nnx.data(None)

    def __call__(self, x, positions, cache: KVCache | None = None, num_new=None):
        """``x [B, T, D] -> ([B, T, D], cache)``."""
        post = lambda norm, y: y if norm is None else norm(y)  # noqa: E731
        attended_BTD, cache = self.attention(self.attention_norm(x), positions, cache, num_new)
        x_BTD = x + post(self.post_attention_norm, attended_BTD)
        return x_BTD + post(self.post_mlp_norm, self.mlp(self.mlp_norm(x_BTD))), cache


class Decoder(nnx.Module):
    """`gqa_jax.models.Decoder` as an ``nnx.Module``; see the module docstring.

    Args:
      config: sizes and options.
      rngs: ``params`` draws the parameters.

    Example::

        from flax import nnx
        from gqa_jax.decoding import generate
        from gqa_jax.models import DecoderConfig

        model = Decoder(DecoderConfig(vocab_size=256), rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
        logits = model(tokens)                                     # [B, T, V]
        out = generate(model, None, tokens, max_new_tokens=4)      # out.tokens: [B, 4]
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size,
            config.model_dim,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=partitioned(nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
                                       ("vocab", "embed")),
            rngs=rngs,
        )
        for i in range(config.num_layers):
            setattr(self, f"layers_{i}", Block(config, config.window(i), rngs=rngs))
        self.final_norm = RMSNorm(config, rngs=rngs)
        self.lm_head = (
            nnx.data(None) if config.tie_embeddings else _linear(config, config.model_dim, config.vocab_size,
                                                                 ("embed", "vocab"), rngs)
        )

    def __call__(self, tokens, cache: Sequence[KVCache] | None = None, *, num_new=None):
        """Logits of the next token at every position, as `gqa_jax.models.Decoder.__call__`.

        Args:
          tokens: int ``[B, T]``.
          cache: optional tuple of `KVCache`, one per layer.
          num_new: with a cache, optional int ``[B]`` valid tokens per row.

        Returns:
          float32 logits ``[B, T, V]``; ``(logits, new_cache)`` with a cache.
        """
        cfg = self.config
        tokens_BT, positions_BT = models.token_positions(cfg, tokens, cache, num_new)
        x_BTD = models.decoder.embed_tokens(cfg, self.embed.embedding[...], tokens_BT)
        new_cache = []
        for i in range(cfg.num_layers):
            x_BTD, layer_cache = getattr(self, f"layers_{i}")(
                x_BTD, positions_BT, None if cache is None else cache[i], num_new
            )
            new_cache.append(layer_cache)
        x_BTD = self.final_norm(x_BTD)
        logits_BTV = self.embed.attend(x_BTD) if cfg.tie_embeddings else self.lm_head(x_BTD)
        logits_BTV = models.decoder.final_logits(cfg, logits_BTV)
        return logits_BTV if cache is None else (logits_BTV, tuple(new_cache))


def linen_decoder(model, params):
    """``(linen Decoder, params)`` for `gqa_jax.decoding`: a linen model as given, an NNX one with its own weights.

    Raises:
      TypeError: an NNX `Decoder` with ``params`` that is not None (its
        weights are its own), naming both.
    """
    if not isinstance(model, Decoder):
        return model, params
    if params is not None:
        raise TypeError(
            f"an NNX Decoder carries its own parameters: pass params=None, got model={type(model).__name__} and "
            f"params of type {type(params).__name__}"
        )
    return models.Decoder(model.config), linen_params(model)
