"""`CachedMultiHeadAttention`: keras-hub's ``CachedMultiHeadAttention`` as a Flax linen layer."""

from __future__ import annotations

import jax

from gqa_jax.modules.multi_head_attention import MultiHeadAttention

Array = jax.Array


class CachedMultiHeadAttention(MultiHeadAttention):
    """`MultiHeadAttention` with keras-hub's key/value cache, for autoregressive decoding.

    Three modes, as in ``keras_hub.layers.CachedMultiHeadAttention``:

    - ``cache=None``: plain multi-head attention; returns the output only.
    - ``cache`` without ``cache_update_index``: attend to the cached keys and
      values as they are (``key``/``value`` are not used); returns
      ``(output, cache)``.
    - ``cache`` with ``cache_update_index``: project ``key``/``value``, write
      them into the cache at the index with `gqa_jax.splice_cache` (a scalar
      as in keras-hub, or one index per row ``[B]`` for ragged batches), then
      attend to the whole cache; returns ``(output, new_cache)``.

    The cache is ``[B, 2, S, N, H]`` (keys, then values), which needs
    ``value_dim == key_dim`` and rank-3 inputs. As in keras-hub the layer does
    not mask unwritten cache slots by itself: pass an ``attention_mask
    [B, T, S]`` (or ``use_causal_mask=True``, where query ``t`` sits at
    ``cache_update_index + t``).

    Example::

        B, max_len, D = 2, 8, 32
        rng = np.random.default_rng(0)
        prompt = rng.standard_normal((B, 3, D), np.float32)
        layer = CachedMultiHeadAttention(num_heads=4, key_dim=16)
        variables = layer.init(jax.random.key(1), prompt, prompt)
        cache = jnp.zeros((B, 2, max_len, 4, 16))
        out, cache = layer.apply(variables, prompt, prompt, cache=cache, cache_update_index=0,
                                 use_causal_mask=True)                   # prefill: slots 0..2
        x_t = rng.standard_normal((B, 1, D), np.float32)
        out, cache = layer.apply(variables, x_t, x_t, cache=cache, cache_update_index=3,
                                 use_causal_mask=True)                   # out: [B, 1, D]
    """

    def __call__(
        self,
        query: Array,
        value: Array | None = None,
        key: Array | None = None,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        *,
        deterministic: bool | None = None,
        use_causal_mask: bool = False,
        return_attention_scores: bool = False,
        **options,
    ):
        """Attends ``query`` to the new and/or cached keys and values.

        Args:
          query: ``[B, T, D]``.
          value: ``[B, S*, Dv]``: new tokens (unused without an index).
          key: ``[B, S*, Dk]``; defaults to ``value``.
          attention_mask: bool ``[B, T, S]`` over the cache's ``S`` positions
            when there is a cache.
          cache: ``[B, 2, S, N, H]`` or None.
          cache_update_index: int or int ``[B]``, or None.
          deterministic: no dropout (default the layer's, else True).
          use_causal_mask: query ``t`` sees keys up to position
            ``cache_update_index + t`` (``t`` without a cache). Not in keras-hub,
            where callers build that ``attention_mask`` themselves.
          return_attention_scores: also return the weights ``[B, N, T, S]``
            (not in keras-hub).
          **options: the other keywords of `MultiHeadAttention.__call__`
            (``mask``, ``positions``, ``dropout_rng`` ...).

        Returns:
          ``output [B, T, Dq]`` without a cache, else ``(output, cache)``;
          with ``return_attention_scores`` the scores come second.
        """
        return self.attend(
            query,
            value,
            key,
            attention_mask=attention_mask,
            deterministic=deterministic,
            use_causal_mask=use_causal_mask,
            return_attention_scores=return_attention_scores,
            cache=cache,
            cache_update_index=cache_update_index,
            **options,
        )
