"""`gqa_jax.cache_bookkeeping`: when layer caches agree, and taking one cache's bookkeeping into another.

Dense and paged caches after equal and unequal writes, every bookkeeping
array changed in turn, traced caches, mixed types and geometries, and the
errors. `generate` and `decode_step` on shared bookkeeping are in
`tests/test_models.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax.cache_bookkeeping import first_layers_bookkeeping, same_bookkeeping, with_bookkeeping_of
from gqa_jax.kv_cache import KVCache
from gqa_jax.paged_kv_cache import PagedKVCache

B, K, H = 3, 2, 8


def _paged(num_pages=24, page_size=4):
    return PagedKVCache.init(batch_size=B, num_pages=num_pages, page_size=page_size, num_kv_heads=K, head_dim=H,
                             max_pages_per_row=6)


def _dense(length=24, batch_size=B):
    return KVCache.init(batch_size, length, K, H)


def _written(cache, sign=1.0):
    """``cache`` after a ragged write of 5, 0 and 3 tokens (values times ``sign``)."""
    rng = np.random.default_rng(11)
    k, v = (jnp.asarray(rng.standard_normal((B, 5, K, H)), jnp.float32) for _ in range(2))
    return cache.update(sign * k, v, num_new=jnp.array([5, 0, 3]))


@pytest.mark.parametrize("make", [_paged, _dense], ids=["paged", "dense"])
def test_caches_agree_after_equal_writes_and_not_after_any_difference(make):
    first, second = _written(make()), _written(make(), sign=-1.0)  # other values, same places
    assert same_bookkeeping((first, second)) and same_bookkeeping([first]) and same_bookkeeping((make(), make()))
    assert not same_bookkeeping((first, make()))  # one written, one empty
    changes = {"page_table": lambda c: c.page_table.at[0, 0].set(23), "lengths": lambda c: c.lengths + 1,
               "free_pages": lambda c: c.free_pages[::-1], "num_free": lambda c: c.num_free - 1}
    for name in type(first).BOOKKEEPING:
        assert not same_bookkeeping((first, dataclasses.replace(second, **{name: changes[name](second)}))), name
    seen = []
    jax.jit(lambda a, b: seen.append(same_bookkeeping((a, b))))(first, second)
    assert seen == [False]  # traced: nothing is known


def test_types_and_geometries_must_match():
    assert not same_bookkeeping(()) and not same_bookkeeping(_dense()) and not same_bookkeeping((_dense(), _paged()))
    assert not same_bookkeeping((_paged(), _paged(page_size=8)))  # equal (empty) tables, other page size
    assert not same_bookkeeping((_dense(), _dense(batch_size=2)))
    assert same_bookkeeping((_dense(24), _dense(40)))  # dense capacities may differ: only lengths are shared


@pytest.mark.parametrize("make", [_paged, _dense], ids=["paged", "dense"])
def test_with_bookkeeping_of_takes_the_arrays_and_keeps_the_values(make):
    source, target = _written(make()), _written(make(), sign=-1.0).update(*(jnp.ones((B, 1, K, H)),) * 2)
    moved = with_bookkeeping_of(target, source)
    for name in type(source).BOOKKEEPING:
        assert getattr(moved, name) is getattr(source, name), name
    kept = [f.name for f in dataclasses.fields(target) if f.name not in type(source).BOOKKEEPING]
    assert kept and all(getattr(moved, name) is getattr(target, name) for name in kept)
    layers = first_layers_bookkeeping([source, target, target])
    assert all(layer.lengths is source.lengths for layer in layers)


def test_with_bookkeeping_of_refuses_other_types_and_geometries():
    with pytest.raises(ValueError, match=r"\(B, P, page_size, M\)=\(3, 24, 4, 6\) and \(3, 12, 4, 6\)"):
        with_bookkeeping_of(_paged(), _paged(num_pages=12))
    with pytest.raises(ValueError, match=r"\(3, 24, 4, 6\) and \(3, 24, 8, 6\)"):
        with_bookkeeping_of(_paged(), _paged(page_size=8))
    with pytest.raises(ValueError, match=r"\(B,\)=\(3,\) and \(2,\)"):
        with_bookkeeping_of(_dense(), _dense(batch_size=2))
    with pytest.raises(TypeError, match="got PagedKVCache and KVCache"):
        with_bookkeeping_of(_paged(), _dense())
    with pytest.raises(TypeError, match="got tuple and tuple"):
        with_bookkeeping_of((), ())
    with pytest.raises(TypeError, match="a tuple of caches"):
        first_layers_bookkeeping(())
