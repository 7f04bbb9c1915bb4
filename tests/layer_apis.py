"""The linen and the NNX layers behind one interface, so each behaviour test runs for both APIs.

`LINEN` holds the `gqa_jax` linen classes. `NNX` holds `NNXLayer` factories
that give the `gqa_jax.nnx` layers linen's ``init`` / ``apply``: ``apply``
builds the NNX layer abstractly with the sizes its ``params`` imply, loads
them with `gqa_jax.nnx.load_linen_params`, and calls it; the decode cache
travels as linen's ``"cache"`` collection (``cached_key``, ``cached_value``,
``cache_index``), written into and read from the layer's ``nnx.Cache`` state.
The `api` fixture (conftest) gives one of the two.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

import gqa_jax
import gqa_jax.nnx

_CACHE_NAMES = ("cached_key", "cached_value", "cache_index")


@dataclasses.dataclass(frozen=True)
class LayerAPI:
    """The four layer classes of one API (hashable: a static argument of ``jax.jit``)."""

    name: str
    GroupedQueryAttention: Any
    MultiHeadAttention: Any
    CachedMultiHeadAttention: Any
    MultiQueryAttention: Any


def _features_of_inputs(cls, query, value=None, key=None, *_, **__) -> dict:
    """``in_features`` ... from the call's inputs (what linen's ``init`` reads)."""
    if cls is gqa_jax.nnx.MultiQueryAttention:
        return {}
    value = query if value is None else value
    key = value if key is None else key
    return dict(in_features=query.shape[-1], value_features=value.shape[-1], key_features=key.shape[-1])


def _features_of_params(cls, params) -> dict:
    """``in_features`` ... from the kernels' first dims."""
    if cls is gqa_jax.nnx.MultiQueryAttention:
        return {}
    first_dim = {name: params[name]["kernel"].shape[0] for name in ("query", "value", "key")}
    return dict(in_features=first_dim["query"], value_features=first_dim["value"], key_features=first_dim["key"])


class NNXLayer:
    """An NNX layer class and its config, with linen's ``init`` and ``apply``."""

    def __init__(self, cls, **config):
        self.cls, self.config = cls, config
        self.decode = config.get("decode", False)
        features = {} if cls is gqa_jax.nnx.MultiQueryAttention else {"in_features": 8}
        nnx.eval_shape(lambda: cls(**config, **features, rngs=nnx.Rngs(0)))  # config errors, as linen's fields

    def init(self, key, *args, **kwargs) -> dict:
        """Linen's ``init``: fresh parameters (and an empty cache of the inputs' length in decode mode)."""
        layer = self.cls(**self.config, **_features_of_inputs(self.cls, *args), rngs=nnx.Rngs(key))
        layer(*args, **kwargs, **({"decode": False} if self.decode else {}))
        variables = {"params": gqa_jax.nnx.linen_params(layer)}
        if self.decode:
            value = args[1] if len(args) > 1 and args[1] is not None else args[0]
            layer.init_cache(batch_size=value.shape[0], max_length=value.shape[1])
            variables["cache"] = self._cache(layer)
        return variables

    def apply(self, variables, *args, rngs=None, mutable=False, **kwargs):
        """Linen's ``apply``: the NNX layer with ``variables["params"]`` (and ``"cache"``) called on ``args``."""
        params = variables["params"]
        layer = nnx.eval_shape(
            lambda: self.cls(**self.config, **_features_of_params(self.cls, params), rngs=nnx.Rngs(0))
        )
        gqa_jax.nnx.load_linen_params(layer, params)
        if rngs is not None:
            kwargs["rngs"] = rngs["dropout"]
        if self.decode and "cache" in variables:
            cache = variables["cache"]
            layer.init_cache(
                batch_size=cache["cached_key"].shape[0],
                max_length=cache["cached_key"].shape[1],
                dtype=cache["cached_key"].dtype,
            )
            for name in _CACHE_NAMES:
                getattr(layer, name)[...] = jnp.asarray(cache[name])
            out = layer(*args, **kwargs)
        elif self.decode:  # linen's first decode call allocates the cache and attends without it
            out = layer(*args, **kwargs, decode="cache" in kwargs)  # a keras-hub cache= is still refused
            value = args[1] if len(args) > 1 and args[1] is not None else args[0]
            layer.init_cache(batch_size=value.shape[0], max_length=value.shape[1])
        else:
            out = layer(*args, **kwargs)
        if not mutable:
            return out
        return out, ({"cache": self._cache(layer)} if self.decode else {})

    @staticmethod
    def _cache(layer) -> dict:
        return {name: getattr(layer, name)[...] for name in _CACHE_NAMES}


LINEN = LayerAPI(
    "linen",
    gqa_jax.GroupedQueryAttention,
    gqa_jax.MultiHeadAttention,
    gqa_jax.CachedMultiHeadAttention,
    gqa_jax.MultiQueryAttention,
)
NNX = LayerAPI(
    "nnx",
    *(
        functools.partial(NNXLayer, cls)
        for cls in (
            gqa_jax.nnx.GroupedQueryAttention,
            gqa_jax.nnx.MultiHeadAttention,
            gqa_jax.nnx.CachedMultiHeadAttention,
            gqa_jax.nnx.MultiQueryAttention,
        )
    ),
)
APIS = {api.name: api for api in (LINEN, NNX)}
