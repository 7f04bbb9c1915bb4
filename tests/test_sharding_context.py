"""Context-parallel attention (`gqa_jax.sharding`) on 4 simulated CPU devices equals one unsharded call.

Runs in a subprocess (the device count is fixed when jax starts): ring and
all-gather strategies, contiguous and zigzag shards, causal, causal with key
lengths and segment ids, a sliding window, a soft-cap, GQA (each rule case with
each strategy and each shard order, 8 of the 16 combinations); forward and gradients against
`dot_product_attention` on the whole sequence; the ring's compiled program has
collective-permutes and no all-gather, and needs less temporary memory than
the all-gather variant at a long sequence. On 2 devices, the ring on the Triton
flash kernels (interpret mode) equals the XLA ring, forward and gradients.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from gqa_jax.sharding import zigzag_order

from tests.multidevice import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    import gqa_jax
    from gqa_jax.sharding import context_parallel_attention

    mesh = jax.make_mesh((4,), ("seq",))
    rng = np.random.default_rng(0)
    B, S, N, K, H = 2, 64, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((B, S, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    seg = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
    cases = {
        "causal": dict(is_causal=True),
        "causal_lengths_segments": dict(is_causal=True, key_value_seq_lengths=np.array([64, 37], np.int32),
                                        q_segment_ids=seg, kv_segment_ids=seg),
        "window": dict(local_window_size=(9, 3)),
        "full_softcap": dict(logits_soft_cap=2.0),
    }
    # Each rule case meets each strategy and each balance, and each strategy each balance (8 of the 16 triples).
    pairs = {("ring", None): ("causal", "window"), ("ring", "zigzag"): ("causal_lengths_segments", "full_softcap"),
             ("all_gather", None): ("causal_lengths_segments", "full_softcap"),
             ("all_gather", "zigzag"): ("causal", "window")}
    for (strategy, balance), names in pairs.items():
        for name in names:
            rules = cases[name]
            def sharded(q, k, v):
                return context_parallel_attention(q, k, v, mesh=mesh, seq_axis="seq", strategy=strategy,
                                                  load_balance=balance, **rules)
            def dense(q, k, v):
                return gqa_jax.dot_product_attention(q, k, v, implementation="xla", **rules)
            out, ref = jax.jit(sharded)(q, k, v), dense(q, k, v)
            err = float(jnp.max(jnp.abs(out - ref)))
            assert err < 1e-5, (strategy, balance, name, "forward", err)
            ct = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
            loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * ct))
            g = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
            gr = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
            for what, a, b in zip("qkv", g, gr):
                gerr = float(jnp.max(jnp.abs(a - b)))
                assert gerr < 1e-4, (strategy, balance, name, "d" + what, gerr)
            print("ok", strategy, balance, name)

    # The compiled ring: collective-permutes only; less temporary memory than gathering a long sequence.
    S2 = 2048
    q2 = jnp.zeros((1, S2, 4, 64), jnp.float32); k2 = jnp.zeros((1, S2, 2, 64), jnp.float32)
    def compiled(strategy):
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(context_parallel_attention(
            q, k, v, mesh=mesh, seq_axis="seq", strategy=strategy, is_causal=True)), argnums=(0, 1, 2)))
        return f.lower(q2, k2, k2).compile()
    ring, gathered = compiled("ring"), compiled("all_gather")
    text = ring.as_text()
    assert "collective-permute" in text and "all-gather" not in text and "all-to-all" not in text
    assert "all-gather" in gathered.as_text()
    ring_temp = ring.memory_analysis().temp_size_in_bytes
    gather_temp = gathered.memory_analysis().temp_size_in_bytes
    assert ring_temp < gather_temp, (ring_temp, gather_temp)
    print("ok hlo", ring_temp, gather_temp)
""")


@pytest.mark.slow  # 4 simulated devices in a subprocess
def test_context_parallel_equals_unsharded_on_4_devices():
    result = run_on_cpu_devices(SCRIPT, 4)
    assert result.stdout.count("ok ") == 9, result.stdout  # 8 cases and the HLO check


def test_zigzag_order_balances_causal_work():
    order = zigzag_order(16, 4)  # 8 chunks of 2: shard r holds chunks r and 7 - r
    np.testing.assert_array_equal(order[:4], [0, 1, 14, 15])
    np.testing.assert_array_equal(np.sort(order), np.arange(16))
    work = [sum(p + 1 for p in order[r * 4:(r + 1) * 4]) for r in range(4)]  # causal keys per shard
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="multiple of 2 \\* num_shards"):
        zigzag_order(12, 4)


KERNEL_RING = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from gqa_jax.implementations import pallas_triton
    from gqa_jax.sharding import context_parallel_attention

    from pallas_kernels import gpu

    pallas_triton.interpret = True  # the Triton kernels in Pallas interpret mode on the CPU
    calls = []
    for kernel in ("flash_attention_core", "flash_backward"):  # count the kernel calls the ring traces
        original = getattr(gpu, kernel)
        setattr(gpu, kernel, lambda *a, _f=original, _n=kernel, **kw: (calls.append(_n), _f(*a, **kw))[1])
    mesh = jax.make_mesh((2,), ("seq",))
    rng = np.random.default_rng(1)
    B, S, N, K, H = 2, 32, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((B, S, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    seg = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
    ct = jnp.asarray(rng.standard_normal((B, S, N, H)), jnp.float32)
    cases = {
        "causal_zigzag": dict(is_causal=True, load_balance="zigzag"),
        "causal_lengths_segments": dict(is_causal=True, key_value_seq_lengths=np.array([32, 11], np.int32),
                                        q_segment_ids=seg, kv_segment_ids=seg),
        "window_softcap": dict(local_window_size=(5, 3), logits_soft_cap=2.0),
    }
    for name, rules in cases.items():
        def ring(implementation):
            f = lambda q, k, v: jnp.sum(ct * context_parallel_attention(
                q, k, v, mesh=mesh, seq_axis="seq", implementation=implementation, **rules))
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
        calls.clear()
        (value, grads), (ref_value, ref_grads) = ring("pallas_triton"), ring("xla")
        assert {"flash_attention_core", "flash_backward"} <= set(calls), calls
        assert abs(float(value - ref_value)) < 1e-3, (name, float(value), float(ref_value))
        for what, a, b in zip("qkv", grads, ref_grads):
            err = float(jnp.max(jnp.abs(a - b)))
            assert err < 1e-4, (name, "d" + what, err)
        print("ok", name)
""")


def test_ring_on_the_triton_kernels_equals_the_xla_ring():
    """Per-block forward with return_residuals=True and backward from the merged lse (2 devices, interpret mode)."""
    result = run_on_cpu_devices(KERNEL_RING, 2)
    assert result.stdout.count("ok ") == 3, result.stdout
