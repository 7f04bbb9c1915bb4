"""Two processes of 4 simulated CPU devices each (``jax.distributed`` on 127.0.0.1) run on global arrays.

Each process builds the same inputs from one seed, places its shards of a
batch-sharded (or replicated) global array on its own devices, and calls the
library eagerly and under ``jit``: `dot_product_attention` with global
``key_value_seq_lengths``, `KVCache.update(num_new=...)` + ``attend`` and
`gqa_jax.decoding.generate`. Their value checks cannot read arrays that span
another process's devices, and must skip them instead of failing. Results,
gathered to every process, equal the same computation in one process on one
device.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.multidevice import run_processes_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    process_id, num_processes, coordinator = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    assert jax.device_count() == 4 * num_processes and jax.local_device_count() == 4

    import gqa_jax
    from gqa_jax import KVCache
    from gqa_jax.decoding import generate
    from gqa_jax.models import Decoder, DecoderConfig, init_cache

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    local = jax.local_devices()[0]

    def global_array(x, spec):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    def gathered(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def on_one_device(f, *args):
        return jax.tree.map(np.asarray, f(*jax.device_put(args, local)))

    def close(a, b, what, tol=1e-5):
        err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        assert err < tol, (what, err)

    rng = np.random.default_rng(0)
    B, T, N, K, H = 8, 12, 4, 2, 16
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, T, K, H)).astype(np.float32)
    v = rng.standard_normal((B, T, K, H)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B).astype(np.int32)
    batch = P("data")
    gq, gk, gv, glengths = (global_array(x, batch) for x in (q, k, v, lengths))
    assert not glengths.is_fully_addressable

    attend = lambda q, k, v, n: gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=n)
    ref = on_one_device(attend, q, k, v, lengths)
    close(gathered(attend(gq, gk, gv, glengths)), ref, "attention eager")
    close(gathered(jax.jit(attend)(gq, gk, gv, glengths)), ref, "attention jit")
    print("ok attention", flush=True)

    num_new = rng.integers(0, T + 1, B).astype(np.int32)

    def cached(k, v, q, num_new, place):
        cache = KVCache.init(B, 2 * T, K, H)
        cache = KVCache(*(place(np.asarray(x)) for x in (cache.key, cache.value, cache.lengths)))
        cache = cache.update(k, v, num_new=num_new)
        return cache.lengths, cache.key, cache.attend(q, num_new=num_new)

    ref = on_one_device(lambda *a: cached(*a, jnp.asarray), k, v, q, num_new)
    got = cached(gk, gv, gq, global_array(num_new, batch), lambda x: global_array(x, batch))
    for what, a, b in zip(("lengths", "key", "attend"), got, ref):
        close(gathered(a), b, "cache " + what)
    print("ok cache", flush=True)

    config = DecoderConfig(vocab_size=32, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
    model = Decoder(config)
    prompt = rng.integers(0, 32, (B, 6)).astype(np.int32)
    prompt_lengths = rng.integers(1, 7, B).astype(np.int32)
    params = on_one_device(jax.jit(model.init), jax.random.key(0), prompt[:1])["params"]  # same in every process
    ref = on_one_device(lambda p, x, n: generate(model, p, x, n, max_new_tokens=4).tokens, params, prompt,
                        prompt_lengths)
    cache = tuple(KVCache(*(global_array(np.asarray(x), batch) for x in (c.key, c.value, c.lengths)))
                  for c in init_cache(config, B, 10))
    out = generate(model, jax.tree.map(lambda w: global_array(w, P()), params), global_array(prompt, batch),
                   global_array(prompt_lengths, batch), max_new_tokens=4, cache=cache)
    np.testing.assert_array_equal(gathered(out.tokens), ref)
    print("ok generate", flush=True)
""")


@pytest.mark.slow  # ~40 s of CPU (80 s wall on a loaded 2-core machine): two processes compile every step
@pytest.mark.slow  # two JAX processes and one reference process
def test_two_processes_of_four_cpu_devices_equal_one_process():
    outputs = run_processes_on_cpu_devices(SCRIPT, num_processes=2, devices_per_process=4)
    for output in outputs:
        for step in ("attention", "cache", "generate"):
            assert f"ok {step}" in output, output
