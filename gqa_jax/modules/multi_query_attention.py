"""`MultiQueryAttention`: zeta's (MosaicML llm-foundry's) ``MultiQueryAttention`` as a Flax linen layer.

One fused projection ``Wqkv: dim -> dim + 2 * head_dim`` split into the
queries of ``heads`` heads and one shared key/value head, an optional clip and
LayerNorm of queries and keys, attention, and ``out_proj``. A PyTorch state
dict ports by transposing the two ``Linear`` weights
(``params["Wqkv"]["kernel"] = W.T``); ``q_ln`` / ``k_ln`` take ``weight`` as
``scale``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_jax.attention import dot_product_attention
from gqa_jax.kv_cache import KVCache
from gqa_jax.modules.checks import check_bool, check_optional_positive_real, check_positive_int, check_rate
from gqa_jax.modules.implementation import ZETA_ATTN_IMPL, dispatch_kwargs
from gqa_jax.modules.initializers import Initializer

Array = jax.Array

# PyTorch's nn.Linear default: uniform(+-1/sqrt(fan_in)) for the weight.
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _slice_bias(bias, q_len: int, kv_len: int) -> Array:
    """zeta's bias rule: a larger bias ``[B|1, N|1, T', S']`` is cut to its last ``T`` rows and ``S`` columns."""
    bias = jnp.asarray(bias)
    if bias.ndim != 4:
        raise ValueError(f"bias must have rank 4 [B|1,N|1,T|1,S|1], got bias.shape={tuple(bias.shape)}")
    return bias[:, :, max(0, bias.shape[2] - q_len) :, max(0, bias.shape[3] - kv_len) :]


def check_mqa_fields(layer) -> None:
    """Raises ``ValueError``/``TypeError`` for a bad ``dim``, ``heads``, ``attn_pdrop``, ``clip_qkv`` or ``qk_ln``."""
    check_positive_int("dim", layer.dim)
    check_positive_int("heads", layer.heads)
    if layer.dim % layer.heads:
        raise ValueError(f"dim={layer.dim} must be a multiple of heads={layer.heads}")
    check_rate("attn_pdrop", layer.attn_pdrop)
    check_optional_positive_real("clip_qkv", layer.clip_qkv)
    check_bool("qk_ln", layer.qk_ln)


class MultiQueryAttention(nn.Module):
    """Multi-query self-attention after zeta's ``MultiQueryAttention``.

    Attributes:
      dim: model dim ``D`` (zeta's ``d_model``); a multiple of ``heads``.
      heads: query heads ``N``; head dim ``H = dim // heads``; one K/V head.
      attn_impl: an ``implementation=`` of `gqa_jax.dot_product_attention`
        (None: dispatch chooses), or zeta's names: ``"torch"`` is ``"xla"``;
        ``"flash"`` and ``"triton"`` prefer a fused kernel and fall back to
        XLA where none serves the call (zeta would fail).
      clip_qkv: clamp the fused projection to ``[-clip_qkv, clip_qkv]``.
      qk_ln: LayerNorm (eps 1e-5) of the queries (over ``dim``) and keys (over
        ``head_dim``), parameters ``q_ln`` and ``k_ln``.
      softmax_scale: logit scale (default ``1 / sqrt(head_dim)``).
      attn_pdrop: dropout rate on the attention weights (training only).
      kernel_init, bias_init: of ``Wqkv`` and ``out_proj`` (default: PyTorch's
        ``Linear`` kernel distribution, zero bias).
      dtype, param_dtype, precision: as in Flax layers.
    """

    dim: int
    heads: int
    attn_impl: str | Sequence[str] | None = None
    clip_qkv: float | None = None
    qk_ln: bool = False
    softmax_scale: float | None = None
    attn_pdrop: float = 0.0
    kernel_init: Initializer = TORCH_LINEAR_INIT
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def __post_init__(self):
        check_mqa_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        past_key_value=None,
        bias=None,
        mask=None,
        causal: bool = True,
        needs_weights: bool = False,
        *,
        deterministic: bool = True,
    ):
        """Self-attention of ``x``, continuing ``past_key_value`` if given.

        Args:
          x: ``[B, T, dim]``.
          past_key_value: None; a tuple ``(key [B, S0, 1, H], value [B, S0, 1, H])``
            (or ``()`` to start one) that the new keys/values are appended to, as
            in zeta; or a `gqa_jax.KVCache` of fixed capacity for jitted loops.
          bias: additive float bias ``[B|1, N|1, T|1, S|1]``; a larger one is
            cut to its last ``T`` rows and ``S`` columns, as in zeta.
          mask: bool ``[B, S]`` key padding mask (True = keep) over all keys
            (past and new; the cache's capacity for a `KVCache`).
          causal: queries see keys up to their own position; the new tokens sit
            after the past ones (bottom-right).
          needs_weights: also return the attention weights ``[B, N, T, S]``
            (before dropout).
          deterministic: no dropout.

        Returns:
          ``(context [B, T, dim], weights or None, past_key_value)``:
          ``past_key_value`` is None if it was None, else the extended tuple or
          the updated `KVCache`.
        """
        linear = dict(
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )
        norm = dict(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
        return zeta_attention(
            self,
            x,
            wqkv=nn.Dense(self.dim + 2 * (self.dim // self.heads), name="Wqkv", **linear),
            out_proj=nn.Dense(self.dim, name="out_proj", **linear),
            qk_norms=(nn.LayerNorm(name="q_ln", **norm), nn.LayerNorm(name="k_ln", **norm)) if self.qk_ln else None,
            past_key_value=past_key_value,
            bias=bias,
            mask=mask,
            causal=causal,
            needs_weights=needs_weights,
            deterministic=deterministic,
        )


def zeta_attention(
    layer,
    x,
    *,
    wqkv,
    out_proj,
    qk_norms,
    past_key_value,
    bias,
    mask,
    causal,
    needs_weights,
    deterministic,
    dropout_rng=None,
):
    """The body of `MultiQueryAttention` (linen and NNX): fused projection, attention, output projection.

    Args:
      layer: the calling layer, with the fields ``dim``, ``heads``,
        ``clip_qkv``, ``softmax_scale``, ``attn_pdrop``, ``attn_impl`` (and a
        linen ``"dropout"`` rng when training without ``dropout_rng``).
      x: ``[B, T, dim]``.
      wqkv: the fused projection ``[..., dim] -> [..., dim + 2 * H]``.
      out_proj: the output projection ``[..., dim] -> [..., dim]``.
      qk_norms: None, or the LayerNorms ``(q_ln, k_ln)`` of the queries and keys.
      past_key_value, bias, mask, causal, needs_weights, deterministic: as in
        `MultiQueryAttention.__call__`.
      dropout_rng: the dropout key when training (None: from ``layer``'s rng
        stream).

    Returns:
      ``(context [B, T, dim], weights or None, past_key_value)``.
    """
    for name, flag in (("causal", causal), ("needs_weights", needs_weights), ("deterministic", deterministic)):
        check_bool(name, flag)
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != layer.dim:
        raise ValueError(f"x must be [B,T,dim] with dim={layer.dim}, got x.shape={tuple(x.shape)}")
    B, T, _ = x.shape
    H = layer.dim // layer.heads
    qkv = wqkv(x)
    if layer.clip_qkv:
        qkv = jnp.clip(qkv, -layer.clip_qkv, layer.clip_qkv)
    query, key, value = jnp.split(qkv, [layer.dim, layer.dim + H], axis=-1)
    if qk_norms is not None:
        query, key = qk_norms[0](query).astype(qkv.dtype), qk_norms[1](key).astype(qkv.dtype)
    q = query.reshape(B, T, layer.heads, H)
    k, v = key.reshape(B, T, 1, H), value.reshape(B, T, 1, H)
    implementation = layer.attn_impl
    if isinstance(implementation, str):
        implementation = ZETA_ATTN_IMPL.get(implementation, implementation)
    options = dispatch_kwargs(
        layer,
        dropout=layer.attn_pdrop,
        deterministic=deterministic,
        return_weights=needs_weights,
        implementation=implementation,
        dropout_rng=dropout_rng,
    )
    if isinstance(past_key_value, KVCache):
        past_key_value = past_key_value.update(k, v)
        S = past_key_value.capacity
        attend = functools.partial(past_key_value.attend, q, is_causal=causal)
    else:
        if past_key_value is not None:
            if len(past_key_value) not in (0, 2):
                raise ValueError(
                    f"past_key_value must be (), (key, value) or a KVCache, got {len(past_key_value)} items"
                )
            for i, past in enumerate(past_key_value):
                past = jnp.asarray(past)
                if past.ndim != 4 or past.shape[0] != B or past.shape[2:] != (1, H):
                    raise ValueError(f"past_key_value[{i}] must have shape [B,S0,1,H]=({B}, S0, 1, {H}), "
                                     f"got past_key_value[{i}].shape={tuple(past.shape)}")
            if len(past_key_value):
                k = jnp.concatenate([jnp.asarray(past_key_value[0]).astype(k.dtype), k], axis=1)
                v = jnp.concatenate([jnp.asarray(past_key_value[1]).astype(v.dtype), v], axis=1)
            past_key_value = (k, v)
        S = k.shape[1]
        attend = functools.partial(dot_product_attention, q, k, v, is_causal=causal)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (B, S):
            raise ValueError(
                f"mask (key padding) must have shape [B,S]=({B}, {S}), got mask.shape={tuple(mask.shape)}"
            )
        mask = mask.astype(jnp.bool_)[:, None, None, :]
    result = attend(
        bias=None if bias is None else _slice_bias(bias, T, S), mask=mask, scale=layer.softmax_scale, **options
    )
    context, weights = result if needs_weights else (result, None)
    return out_proj(context.reshape(B, T, layer.dim)), weights, past_key_value
