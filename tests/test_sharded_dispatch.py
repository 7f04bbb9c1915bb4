"""Kernels on a mesh: dispatch runs them inside ``shard_map`` over batch and heads (4 simulated CPU devices).

A subprocess (the device count is fixed when jax starts) fakes a GPU platform
and runs the Triton kernels in interpret mode: batch-, head- and batch+head-
sharded calls, eager and under ``jit``, on explicit meshes (the arrays carry
their sharding) and auto meshes (``q_sharding=`` says it), equal the unsharded
XLA path, keep the input sharding, and compile without all-gather or
all-to-all. A sharded sequence has no kernel placement: a pinned kernel raises
with the reason, and on an auto mesh ``implementation=None`` falls back to XLA.
(On an explicit mesh the XLA path itself cannot yet take a split sequence: its
einsums would need output shardings.)
"""

from __future__ import annotations

import textwrap

from tests.multidevice import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import gqa_jax
    from gqa_jax import dispatch
    from gqa_jax.implementations import pallas_triton

    dispatch.current_platform = lambda: "gpu"
    pallas_triton.interpret = True
    called = []
    original = pallas_triton._local
    pallas_triton._local = lambda request: (called.append(request.query.shape), original(request))[1]

    rng = np.random.default_rng(0)
    B, T, N, K, H = 4, 24, 8, 4, 16
    q0 = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k0 = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    v0 = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    lengths = jnp.asarray([24, 7, 13, 24], jnp.int32)
    ref = gqa_jax.dot_product_attention(q0, k0, v0, is_causal=True, key_value_seq_lengths=lengths,
                                        implementation="xla")

    def attend(q, k, v, **kw):
        return gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths, **kw)

    for axis_types in ((AxisType.Explicit,) * 2, (AxisType.Auto,) * 2):
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=axis_types)
        explicit = axis_types[0] == AxisType.Explicit
        for spec in (P("data"), P(None, None, "model"), P("data", None, "model")):
            sharding = NamedSharding(mesh, spec)
            q, k, v = (jax.device_put(x, sharding) for x in (q0, k0, v0))
            kw = {} if explicit else dict(q_sharding=sharding)
            called.clear()
            jitted = jax.jit(lambda q, k, v: attend(q, k, v, **kw))
            out = jitted(q, k, v)
            local = (B // mesh.shape["data"] if spec[0] else B, T, N // mesh.shape["model"] if len(spec) > 2 else N, H)
            assert called and all(s == local for s in called), (spec, called, local)
            assert float(jnp.max(jnp.abs(out - ref))) < 1e-5, spec
            assert out.sharding.spec[:3] == tuple(spec) + (None,) * (3 - len(spec)) or not explicit, out.sharding
            text = jitted.lower(q, k, v).compile().as_text()
            assert "all-gather" not in text and "all-to-all" not in text, (spec, "collective in the kernel path")
            if explicit:
                called.clear()
                eager = attend(q, k, v)
                assert called and float(jnp.max(jnp.abs(eager - ref))) < 1e-5
            print("ok", "explicit" if explicit else "auto", spec)

        seq = NamedSharding(mesh, P(None, "data"))
        q, k, v = (jax.device_put(x, seq) for x in (q0, k0, v0))
        kw = {} if explicit else dict(q_sharding=seq)
        if not explicit:  # (explicit meshes: the XLA path's einsums need output shardings for a split sequence)
            called.clear()
            out = jax.jit(lambda q, k, v: attend(q, k, v, **kw))(q, k, v)
            assert not called and float(jnp.max(jnp.abs(out - ref))) < 1e-5  # XLA served it
        try:
            jax.jit(lambda q, k, v: attend(q, k, v, implementation="pallas_triton", **kw))(q, k, v)
        except ValueError as e:
            assert "the sequence is sharded" in str(e), e
        else:
            raise AssertionError("a pinned kernel accepted a sharded sequence")
        print("ok", "explicit" if explicit else "auto", "sequence-sharded falls back")
""")


def test_kernels_run_per_device_on_a_mesh():
    result = run_on_cpu_devices(SCRIPT, 4)
    assert result.stdout.count("ok ") == 8, result.stdout
