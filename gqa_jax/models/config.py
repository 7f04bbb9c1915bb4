"""`DecoderConfig`: the sizes and options of a `gqa_jax.models.Decoder`.

The defaults are Llama's; the options cover the other families that
`gqa_jax.models.config_from_hf` reads (Mistral's sliding window, Qwen2's q/k/v
biases, Llama 3's rotary scaling, Gemma 2's soft-caps, norms and activation).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from gqa_jax.rope import Llama3RopeScaling, LinearRopeScaling, RotaryEmbedding
from pallas_kernels.arguments import positive_int

# Attention kinds of ``layer_types``, as Hugging Face names them.
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
# MLP activations: the gate's nonlinearity (``silu``: SwiGLU; ``gelu_tanh``: GeGLU with tanh-approximate GELU).
ACTIVATIONS = ("silu", "gelu_tanh")


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _check_positive_float(name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if _is_bool(value) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        kind = "None or a positive finite float" if optional else "a positive finite float"
        raise ValueError(f"{name} must be {kind}, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and options of a `Decoder` (defaults: a Llama).

    Attributes:
      vocab_size: ``V``.
      num_layers: transformer blocks.
      model_dim: ``D``.
      num_heads: query heads ``N``.
      num_kv_heads: key/value heads ``K``; ``N % K == 0`` (``K == N``: MHA,
        ``K == 1``: MQA).
      head_dim: ``H``; default ``D // N``.
      mlp_dim: hidden size ``F`` of the gated MLP; default ``4 * D``.
      rope_theta: base of the rotary frequencies.
      rope_scaling: None, or a `gqa_jax.rope.LinearRopeScaling` /
        `gqa_jax.rope.Llama3RopeScaling` of the frequencies (Llama 3.1+).
      norm_eps: RMSNorm epsilon.
      tie_embeddings: compute logits with the transposed token embedding
        instead of a separate LM head.
      attention_bias: the query, key and value projections have biases
        (Qwen2).
      output_bias: the attention output projection has a bias (Llama's
        ``attention_bias=True`` sets both).
      sliding_window: None, or ``W``: in the sliding layers a query sees
        itself and the ``W - 1`` keys before it (Mistral, Gemma 2).
      layer_types: None, or one of ``"full_attention"`` /
        ``"sliding_attention"`` per layer; None means every layer slides when
        ``sliding_window`` is set.
      query_scale: the attention logit scale; default ``1 / sqrt(H)``
        (Gemma 2: ``query_pre_attn_scalar ** -0.5``).
      attn_logit_soft_cap: None, or ``c``: attention logits become
        ``c * tanh(logits / c)``.
      final_logit_soft_cap: None, or ``c``: the output logits are soft-capped
        the same way.
      activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, Gemma).
      norm_offset: RMSNorms multiply by ``norm_offset + scale`` (Gemma: 1,
        with scales initialized to 0).
      sandwich_norms: norms after the attention and after the MLP too, before
        each residual add (Gemma 2: ``post_attention_norm``, ``post_mlp_norm``).
      scale_embeddings: multiply the token embeddings by ``sqrt(D)`` (Gemma).
      dtype: computation (and cache) dtype.
      param_dtype: parameter dtype.
      implementation: passed to `gqa_jax.dot_product_attention` (None: the
        fastest that serves each call on this platform).
      logical_axes: declare every parameter with logical axis names (see
        `gqa_jax.models.decoder`): ``init`` then returns
        `flax.linen.LogicallyPartitioned` boxes that
        `flax.linen.get_partition_spec` reads; ``apply`` takes boxed or plain
        params (`flax.linen.meta.unbox`). Default False: plain arrays.

    Raises:
      ValueError, TypeError: naming the field and its value, for a size that
        is not a positive int, heads that do not group, an odd ``head_dim``,
        or an option of the wrong kind.
    """

    vocab_size: int
    num_layers: int = 2
    model_dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: LinearRopeScaling | Llama3RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    output_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    query_scale: float | None = None
    attn_logit_soft_cap: float | None = None
    final_logit_soft_cap: float | None = None
    activation: str = "silu"
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | tuple[str, ...] | None = None
    logical_axes: bool = False

    def __post_init__(self):
        sizes = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "sliding_window")
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
            _check_positive_float(name, getattr(self, name))
        for name in ("query_scale", "attn_logit_soft_cap", "final_logit_soft_cap"):
            _check_positive_float(name, getattr(self, name), optional=True)
        if _is_bool(self.norm_offset) or not isinstance(self.norm_offset, numbers.Real) or not math.isfinite(
            self.norm_offset
        ):
            raise ValueError(f"norm_offset must be a finite float, got norm_offset={self.norm_offset!r}")
        for name in ("tie_embeddings", "attention_bias", "output_bias", "sandwich_norms", "scale_embeddings",
                     "logical_axes"):
            if not _is_bool(getattr(self, name)):
                raise TypeError(f"{name} must be True or False, got {name}={getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, (LinearRopeScaling, Llama3RopeScaling)):
            raise TypeError(
                "rope_scaling must be None, a LinearRopeScaling or a Llama3RopeScaling, got "
                f"rope_scaling={self.rope_scaling!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got activation={self.activation!r}")
        self._check_layer_types()
        if isinstance(self.implementation, list):
            object.__setattr__(self, "implementation", tuple(self.implementation))

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            return
        kinds = tuple(self.layer_types)
        if len(kinds) != self.num_layers or any(kind not in (FULL_ATTENTION, SLIDING_ATTENTION) for kind in kinds):
            raise ValueError(
                f"layer_types must give {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r} for each of the "
                f"num_layers={self.num_layers} layers, got layer_types={self.layer_types!r}"
            )
        if SLIDING_ATTENTION in kinds and self.sliding_window is None:
            raise ValueError(f"layer_types={kinds!r} has sliding layers but sliding_window=None")
        object.__setattr__(self, "layer_types", kinds)

    @property
    def rope(self) -> RotaryEmbedding:
        """The rotary embedding of queries and keys."""
        return RotaryEmbedding(theta=float(self.rope_theta), scaling=self.rope_scaling)

    def window(self, layer: int) -> int | None:
        """The sliding window ``W`` of layer ``layer`` (None: it attends over every earlier token)."""
        if self.layer_types is None or self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None
