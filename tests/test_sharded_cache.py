"""A batch- and head-sharded `KVCache` is written and read where it lives (4 simulated CPU devices).

In a subprocess (the device count is fixed when jax starts): prefill and
decode steps through `KVCache.update` + `attend` on a cache sharded over batch
(and KV heads) equal the unsharded run, and the compiled step has no
all-gather or all-to-all (the write is one scatter per row).
"""

from __future__ import annotations

import textwrap

from tests.multidevice import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from gqa_jax import KVCache

    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    B, S, N, K, H = 4, 32, 4, 2, 16
    spec = P("data", None, "model")
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, spec))

    def step(cache, q, k, v, num_new):
        cache = cache.update(k, v, num_new=num_new)
        return cache, cache.attend(q, num_new=num_new)

    def run(place, jitted):
        cache = KVCache.init(B, S, K, H)
        if place:
            cache = KVCache(shard(cache.key), shard(cache.value), cache.lengths)
        outs = []
        for t, num in ((5, np.array([5, 3, 1, 4], np.int32)), (1, np.full((4,), 1, np.int32)),
                       (2, np.array([2, 1, 2, 0], np.int32))):
            q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
            k = jnp.asarray(rng.standard_normal((B, t, K, H)), jnp.float32)
            v = jnp.asarray(rng.standard_normal((B, t, K, H)), jnp.float32)
            if place:
                q, k, v = shard(q), shard(k), shard(v)
            cache, out = jitted(cache, q, k, v, jnp.asarray(num))
            outs.append(out)
        return cache, outs

    jitted = jax.jit(step)
    rng = np.random.default_rng(0)
    ref_cache, ref = run(False, jitted)
    rng = np.random.default_rng(0)
    cache, outs = run(True, jitted)
    for a, b in zip(outs, ref):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-5
    np.testing.assert_array_equal(cache.lengths, ref_cache.lengths)
    assert float(jnp.max(jnp.abs(cache.key - ref_cache.key))) == 0.0
    assert cache.key.sharding.spec[:3] == spec[:3], cache.key.sharding

    q = shard(jnp.ones((B, 1, N, H))); k = shard(jnp.ones((B, 1, K, H)))
    text = jitted.lower(cache, q, k, k, jnp.ones((B,), jnp.int32)).compile().as_text()
    found = [c for c in ("all-gather", "all-to-all") if re.search(c + r"(?:-start)?\\(", text)]
    assert not found, found
    print("ok")
""")


def test_sharded_cache_writes_and_reads_in_place():
    result = run_on_cpu_devices(SCRIPT, 4)
    assert result.stdout.strip().endswith("ok"), result.stdout
