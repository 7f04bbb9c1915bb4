"""`MultiQueryAttention` in Flax NNX: zeta's ``MultiQueryAttention`` with the linen layer's parameters.

``Wqkv`` and ``out_proj`` (``nnx.Linear``: ``kernel``, ``bias``), optional
``q_ln`` / ``k_ln`` (``nnx.LayerNorm``: ``scale``, ``bias``), and the linen
layer's body, `gqa_jax.modules.multi_query_attention.zeta_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gqa_jax.modules.initializers import Initializer
from gqa_jax.modules.multi_query_attention import TORCH_LINEAR_INIT, check_mqa_fields, zeta_attention
from gqa_jax.nnx.dropout import dropout_key, dropout_stream
from gqa_jax.nnx.einsum_dense import partitioned

Array = jax.Array


class MultiQueryAttention(nnx.Module):
    """Multi-query self-attention after zeta's ``MultiQueryAttention``, as an ``nnx.Module``.

    Args:
      dim, heads, attn_impl, clip_qkv, qk_ln, softmax_scale, attn_pdrop,
        kernel_init, bias_init, dtype, param_dtype, precision: as in
        `gqa_jax.modules.MultiQueryAttention`.
      deterministic: the default of the call's ``deterministic``.
      rngs: ``params`` draws the parameters; ``dropout`` the dropout masks.

    Parameters: ``Wqkv [dim, dim + 2 * H]`` (logical axes ``embed, None``),
    ``out_proj [dim, dim]`` (``None, embed``), ``q_ln [dim]``, ``k_ln [H]``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        attn_impl: str | Sequence[str] | None = None,
        clip_qkv: float | None = None,
        qk_ln: bool = False,
        softmax_scale: float | None = None,
        attn_pdrop: float = 0.0,
        kernel_init: Initializer = TORCH_LINEAR_INIT,
        bias_init: Initializer = nnx.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        deterministic: bool = True,
        rngs: nnx.Rngs,
    ):
        self.dim, self.heads, self.clip_qkv, self.softmax_scale = dim, heads, clip_qkv, softmax_scale
        self.attn_pdrop, self.qk_ln, self.deterministic = attn_pdrop, qk_ln, deterministic
        self.attn_impl = tuple(attn_impl) if isinstance(attn_impl, list) else attn_impl
        check_mqa_fields(self)
        self.rngs = dropout_stream(rngs, attn_pdrop)
        H = dim // heads

        def linear(features: int, axes):
            return nnx.Linear(
                dim,
                features,
                kernel_init=partitioned(kernel_init, axes),
                bias_init=partitioned(bias_init, axes[1:]),
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                rngs=rngs,
            )

        self.Wqkv = linear(dim + 2 * H, ("embed", None))
        self.out_proj = linear(dim, (None, "embed"))
        self.q_ln = self.k_ln = nnx.data(None)
        if qk_ln:
            norm = dict(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.q_ln, self.k_ln = nnx.LayerNorm(dim, **norm), nnx.LayerNorm(H, **norm)

    def __call__(
        self,
        x: Array,
        past_key_value=None,
        bias=None,
        mask=None,
        causal: bool = True,
        needs_weights: bool = False,
        *,
        deterministic: bool | None = None,
        rngs=None,
    ):
        """Self-attention of ``x [B, T, dim]``, as the linen layer's call (``past_key_value`` tuple or `KVCache`).

        ``deterministic`` defaults to the layer's; ``rngs`` (the dropout
        stream or key of this call) to the layer's stream.

        Returns:
          ``(context [B, T, dim], weights or None, past_key_value)``.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        return zeta_attention(
            self,
            x,
            wqkv=self.Wqkv,
            out_proj=self.out_proj,
            qk_norms=None if self.q_ln is None else (self.q_ln, self.k_ln),
            past_key_value=past_key_value,
            bias=bias,
            mask=mask,
            causal=causal,
            needs_weights=needs_weights,
            deterministic=deterministic,
            dropout_rng=dropout_key(self.rngs, self.attn_pdrop, deterministic, rngs),
        )
