"""A model's layer caches that share their bookkeeping: one allocation per step for all layers.

Every layer of a decoder writes the same tokens into its own cache
(`gqa_jax.KVCache` or `gqa_jax.PagedKVCache`), so the layers' bookkeeping, which
tokens each row holds and where (``BOOKKEEPING``: a dense cache's lengths, a
paged cache's page table, lengths and free stack), is equal in every layer,
and so is every step's update of it: the lengths, slots and (paged) page
allocation. Computed per layer it is one set of small XLA operations per layer
per step. When every layer reads the first layer's bookkeeping
(`with_bookkeeping_of`), those computations are the same in every layer and
XLA computes them once (`through_shared_bookkeeping`);
`gqa_jax.decoding.generate` does this for a `gqa_jax.models.Decoder` whose
layers are known to agree (`same_bookkeeping`).

Example::

    from gqa_jax import KVCache
    cache = tuple(KVCache.init(2, 32, 2, 16) for _ in range(4))   # four layers, built alike
    same_bookkeeping(cache)                                       # True: concrete and equal
    cache = first_layers_bookkeeping(cache)                       # every layer reads layer 0's lengths
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gqa_jax.kv_cache import KVCache
from gqa_jax.paged_kv_cache import PagedKVCache
from gqa_jax.request import concrete_value

CACHE_TYPES = (KVCache, PagedKVCache)


def same_bookkeeping(caches) -> bool:
    """Whether ``caches`` (e.g. a model's layers) are known to hold the same tokens in the same places.

    True for a non-empty sequence of caches of one type and one ``geometry``
    (a dense cache's batch size; a paged cache's batch size, page count, page
    size and table width) whose ``BOOKKEEPING`` arrays are concrete and equal;
    their keys and values, dtypes and (dense) capacities may differ. Caches that
    agree so and take the same writes keep agreeing. False for anything else,
    traced caches included (nothing is known of them).
    """
    if not isinstance(caches, (tuple, list)) or not caches:
        return False
    kind = type(caches[0])
    if kind not in CACHE_TYPES or any(type(c) is not kind for c in caches):
        return False
    if len({c.geometry for c in caches}) != 1:
        return False
    first = [concrete_value(getattr(caches[0], name)) for name in kind.BOOKKEEPING]
    if any(x is None for x in first):
        return False
    for cache in caches[1:]:
        values = [concrete_value(getattr(cache, name)) for name in kind.BOOKKEEPING]
        if any(x is None or not np.array_equal(x, y) for x, y in zip(values, first)):
            return False
    return True


def with_bookkeeping_of(cache, other):
    """``cache``'s keys and values with ``other``'s ``BOOKKEEPING`` arrays.

    Raises:
      TypeError: for caches of other types, or not `gqa_jax.KVCache` /
        `gqa_jax.PagedKVCache`.
      ValueError: for caches of other ``geometry``.
    """
    if type(cache) not in CACHE_TYPES or type(other) is not type(cache):
        raise TypeError(f"bookkeeping is shared between caches of one type (KVCache or PagedKVCache), got "
                        f"{type(cache).__name__} and {type(other).__name__}")
    if cache.geometry != other.geometry:
        raise ValueError(f"bookkeeping is shared between caches of one geometry, got {type(cache).__name__}s of "
                         f"{type(cache).GEOMETRY}={cache.geometry} and {other.geometry}")
    return dataclasses.replace(cache, **{name: getattr(other, name) for name in cache.BOOKKEEPING})


def first_layers_bookkeeping(caches) -> tuple:
    """Every cache of ``caches`` (a tuple or list, one per layer) with the first one's bookkeeping.

    Raises:
      TypeError, ValueError: as `with_bookkeeping_of`; TypeError for an empty
        or non-sequence ``caches``.
    """
    if not isinstance(caches, (tuple, list)) or not caches:
        raise TypeError(f"shared bookkeeping needs a tuple of caches (one per layer), got {caches!r:.80}")
    return tuple(with_bookkeeping_of(layer, caches[0]) for layer in caches)


def through_shared_bookkeeping(write, caches) -> tuple:
    """``write(caches) -> (out, new caches)`` with every layer reading the first layer's bookkeeping.

    XLA then computes the layers' bookkeeping updates once, not once per
    layer. The returned layers after the first keep the bookkeeping they came
    with (stale), so that a loop carries it unchanged instead of copying the
    first layer's into every layer; `first_layers_bookkeeping` makes the
    caches whole after the loop.

    Args:
      write: takes a tuple of caches (one per layer) and returns ``(out, new
        tuple)``, every layer taking the same writes (a decoder's layers do).
      caches: the tuple, its layers agreeing (`same_bookkeeping`).

    Returns:
      ``(out, new caches)``.
    """
    out, new = write(first_layers_bookkeeping(caches))
    return out, tuple(new[:1]) + tuple(with_bookkeeping_of(layer, old) for layer, old in zip(new[1:], caches[1:]))
