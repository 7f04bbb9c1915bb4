"""What the NNX Keras attention layers share: settings, projections and their logical axis names.

The linen layers declare their projections inside their call; the NNX layers
build them eagerly (`gqa_jax.nnx.EinsumDense`) and hand them to the same body,
`gqa_jax.modules.keras_attention.keras_attention`, through ``project``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gqa_jax.kv_cache import KVCache
from gqa_jax.modules.checks import check_bool


Array = jax.Array

# The LLM / Flax options (see gqa_jax.modules.attention_options), stored as given.
ATTENTION_OPTIONS = (
    "rope",
    "qk_transform",
    "scale",
    "logits_soft_cap",
    "local_window_size",
    "normalize_qk",
    "norm_epsilon",
    "broadcast_dropout",
    "sow_weights",
    "attention_fn",
)

# Logical axis names of the projections (the sharding rules map them to mesh axes).
QUERY_AXES = ("embed", "q_heads", "head_dim")
KEY_VALUE_AXES = ("embed", "kv_heads", "head_dim")
OUTPUT_AXES = ("q_heads", "head_dim", "embed")


def dense_settings(
    *, use_bias: bool, kernel_init, bias_init, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs
) -> dict:
    """The keywords of `gqa_jax.nnx.EinsumDense` that all projections of a layer share."""
    return dict(
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        rngs=rngs,
    )


def output_axes(num_features: int) -> tuple[str | None, ...]:
    """``attention_output``'s names: heads, head dim, then ``embed`` for one output dim (None for several)."""
    return OUTPUT_AXES if num_features == 1 else OUTPUT_AXES[:2] + (None,) * num_features


class KerasAttentionLayer(nnx.Module):
    """Base of the NNX Keras layers: the settings the shared body reads, and its ``project``.

    A subclass stores its sizes, calls `_init_settings`, checks itself with
    the linen layer's check, builds its projections (`gqa_jax.nnx.EinsumDense`,
    with `dense_settings`) and norms (`_init_norms`), and calls the shared
    body with ``project=self.project``, ``normalize=self.normalize``,
    ``sow_weights=self.sows_weights(sow_weights)``,
    ``sow=self.sow_attention_weights`` and a key from
    `gqa_jax.nnx.dropout.dropout_key`.
    """

    def _init_settings(
        self,
        *,
        dropout: float,
        use_bias: bool,
        sliding_window: int | None,
        flash_attention: bool | None,
        use_gate: bool,
        implementation: str | Sequence[str] | None,
        deterministic: bool,
        dtype: Any,
        precision: Any,
        options: dict,
    ) -> None:
        """Stores the settings that the shared checks and body read (``options``: `ATTENTION_OPTIONS` names)."""
        self.dropout, self.use_bias, self.sliding_window = dropout, use_bias, sliding_window
        self.flash_attention = flash_attention
        self.use_gate, self.deterministic = use_gate, deterministic
        self.dtype, self.precision = dtype, precision
        self.implementation = tuple(implementation) if isinstance(implementation, list) else implementation
        for name in ATTENTION_OPTIONS:
            value = options[name]
            setattr(self, name, tuple(value) if isinstance(value, list) else value)

    def _init_cache_state(self, num_kv_heads: int, head_dim: int, value_head_dim: int) -> None:
        """No cache yet; `init_cache` allocates ``[B, S, num_kv_heads, head_dim | value_head_dim]``."""
        self._cache_heads = (num_kv_heads, head_dim, value_head_dim)
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    def init_cache(self, *, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> None:
        """Allocates an empty decode cache of capacity ``max_length`` (``nnx.Cache`` state).

        ``cached_key`` ``[B, S, K, H]`` / ``cached_value`` ``[B, S, K, Hv]``
        in ``dtype`` and ``cache_index`` int32 ``[B]``, the linen layer's
        ``"cache"`` collection. Calling it again empties the cache.
        """
        K, H, Hv = self._cache_heads
        cache = KVCache.init(batch_size, max_length, K, H, dtype, value_head_dim=Hv)
        self.cached_key = nnx.Cache(cache.key)
        self.cached_value = nnx.Cache(cache.value)
        self.cache_index = nnx.Cache(cache.lengths)

    def _init_norms(self, head_dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> None:
        """The ``query_norm`` / ``key_norm`` sublayers of ``normalize_qk`` (``scale [H]``), or None."""
        if self.normalize_qk is None:
            self.query_norm = self.key_norm = nnx.data(None)
            return
        norm = nnx.RMSNorm if self.normalize_qk == "rms" else functools.partial(nnx.LayerNorm, use_bias=False)
        for name in ("query_norm", "key_norm"):
            setattr(
                self, name, norm(head_dim, epsilon=self.norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            )

    def normalize(self, name: str, x: Array) -> Array:
        """The norm sublayer ``name`` applied to ``x`` (the ``normalize`` of `keras_attention`)."""
        return getattr(self, name)(x)

    def sows_weights(self, sow_weights: bool | None) -> bool:
        """Whether this call sows its weights: ``sow_weights`` (None: the layer's) inside an ``nnx.capture``.

        Flax NNX collects sown values with ``nnx.capture``, which gives each
        module it captures a ``__captures__`` buffer for the call (flax's
        "Extracting intermediate values" guide); ``Module.sow`` outside one is
        deprecated (it warns and keeps one more copy on the module per
        call). So the layer sows only where the weights are collected, as a
        linen sow is a no-op unless ``"intermediates"`` is mutable.

        Raises:
          TypeError: unless ``sow_weights`` is None or a bool.
        """
        sow_weights = self.sow_weights if sow_weights is None else sow_weights
        check_bool("sow_weights", sow_weights)
        return sow_weights and hasattr(self, "__captures__")

    def sow_attention_weights(self, weights: Array) -> None:
        """Sows ``weights`` as ``nnx.Intermediate`` ``attention_weights``, as flax's NNX ``dot_product_attention``."""
        self.sow(nnx.Intermediate, "attention_weights", weights)

    def project(self, name: str, features: Sequence[int], x: Array, contract: int = 1) -> Array:
        """The projection sublayer ``name`` applied to ``x`` (the ``project`` of `keras_attention`)."""
        layer = getattr(self, name)
        if layer.features != tuple(features):
            raise ValueError(f"{name} projects to features={layer.features}, the call needs {tuple(features)}")
        return layer(x)
