"""The kernels inside ``jax.shard_map`` with its default ``check_vma=True``, and ring attention on the TPU kernel.

Every kernel output declares the mesh axes it varies over
(`pallas_kernels.arguments.out_struct`), so ``shard_map`` type-checks the
kernels instead of refusing them. In subprocesses (the device count is fixed
when jax starts):

* the TPU flash kernel (forward, its lse, gradients) and decode kernel
  (forward, gradients) in Pallas TPU interpret mode on a (2, 2) mesh, batch
  over ``data`` and K/V heads over ``model``, equal a float64 NumPy oracle;
* ring attention on the TPU flash kernel (``implementation="pallas_tpu"``,
  interpret mode) on 4 devices equals the XLA ring and the float64 oracle,
  forward and gradients: causal + zigzag, and key lengths + segments + window
  + soft-cap;
* the Mosaic-GPU flash kernel and its backward lower for CUDA under
  ``shard_map(check_vma=True)`` on CPU devices (no Mosaic-GPU interpreter runs
  them on a CPU; on a Hopper GPU the same code runs compiled).

TPU interpret mode hands each kernel's buffers to the first CPU device
(``io_callback`` places its operands there) while every device of the mesh
waits at the interpreter's barrier: with that device in the mesh the run can
deadlock. So the scripts simulate one device more than the mesh uses and
leave the first one out.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.multidevice import run_on_cpu_devices

COMMON = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from tests.reference import reference_attention, reference_attention_grads, visibility

    devices = np.array(jax.devices()[1:5])  # device 0 stays out: TPU interpret mode's callbacks run there
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def close(name, a, b, tol):
        err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        assert np.all(np.isfinite(np.asarray(a))) and err < tol, (name, err)
""")

TPU_KERNELS = COMMON + textwrap.dedent("""
    from pallas_kernels import tpu

    mesh = Mesh(devices.reshape(2, 2), ("data", "model"))
    heads = P("data", None, "model", None)
    lengths = np.array([128, 77], np.int32)
    B, T, N, K, H = 2, 128, 4, 2, 64
    q, k, v, ct = normal(B, T, N, H), normal(B, T, K, H), normal(B, T, K, H), normal(B, T, N, H)
    rules = dict(is_causal=True, key_value_seq_lengths=lengths)

    def sharded(fn, out_specs=heads):
        # check_vma=True is shard_map's default; the kernels must declare how their outputs vary.
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, P("data")), out_specs=out_specs))

    flash = lambda q, k, v, n: tpu.flash_attention(q, k, v, is_causal=True, key_value_seq_lengths=n, interpret=True)
    out = sharded(flash)(q, k, v, lengths)
    ref, weights = reference_attention(q, k, v, **rules)
    close("flash forward", out, ref, 1e-5)

    residuals = lambda q, k, v, n: tpu.flash_attention(q, k, v, is_causal=True, key_value_seq_lengths=n,
                                                       interpret=True, return_residuals=True)
    _, lse = sharded(residuals, out_specs=(heads, P("data", "model", None)))(q, k, v, lengths)
    logits = np.einsum("btkgh,bskh->bkgts", np.asarray(q, np.float64).reshape(B, T, K, N // K, H),
                       np.asarray(k, np.float64)).reshape(B, N, T, T) / np.sqrt(H)
    seen = visibility(B, T, T, **rules)[:, None]
    top = np.max(np.where(seen, logits, -np.inf), axis=-1, keepdims=True)
    ref_lse = (top + np.log(np.sum(np.where(seen, np.exp(logits - top), 0.0), axis=-1, keepdims=True)))[..., 0]
    close("flash lse", lse, ref_lse, 1e-4)

    loss = lambda q, k, v, n: jnp.sum(ct * sharded(flash)(q, k, v, n))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, lengths)
    for name, a, b in zip(("dq", "dk", "dv"), grads, reference_attention_grads(q, k, v, ct, **rules)):
        close("flash " + name, a, b, 1e-4)
    print("ok flash")

    S = 256
    q1, kc, vc, ct1 = normal(B, 1, N, H), normal(B, S, K, H), normal(B, S, K, H), normal(B, 1, N, H)
    cache_lengths = np.array([256, 131], np.int32)
    decode = lambda q, k, v, n: tpu.decode_attention(q, k, v, n, interpret=True)
    out = sharded(decode)(q1, kc, vc, cache_lengths)
    ref, _ = reference_attention(q1, kc, vc, is_causal=True, key_value_seq_lengths=cache_lengths)
    close("decode forward", out, ref, 1e-5)
    loss = lambda q, k, v, n: jnp.sum(ct1 * sharded(decode)(q, k, v, n))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q1, kc, vc, cache_lengths)
    ref_grads = reference_attention_grads(q1, kc, vc, ct1, is_causal=True, key_value_seq_lengths=cache_lengths)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        close("decode " + name, a, b, 1e-4)
    print("ok decode")
""")


@pytest.mark.slow  # interpret-mode forward and backward kernels on 4 devices
def test_tpu_kernels_run_under_checked_shard_map():
    result = run_on_cpu_devices(TPU_KERNELS, 5)
    assert result.stdout.count("ok ") == 2, result.stdout


TPU_RING = COMMON + textwrap.dedent("""
    from gqa_jax.implementations import pallas_tpu
    from gqa_jax.sharding import context_parallel_attention
    from pallas_kernels import tpu

    pallas_tpu.interpret = True  # the TPU kernels in Pallas interpret mode on the CPU
    calls = []
    for kernel in ("flash_attention_core", "flash_backward"):  # count the kernel calls the ring traces
        original = getattr(tpu, kernel)
        setattr(tpu, kernel, lambda *a, _f=original, _n=kernel, **kw: (calls.append(_n), _f(*a, **kw))[1])
    mesh = Mesh(devices, ("seq",))
    B, S, N, K, H = 1, 512, 2, 1, 64
    q, k, v, ct = normal(B, S, N, H), normal(B, S, K, H), normal(B, S, K, H), normal(B, S, N, H)
    seg = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
    cases = {
        "causal_zigzag": dict(is_causal=True, load_balance="zigzag"),
        "lengths_segments_window_softcap": dict(key_value_seq_lengths=np.array([300], np.int32), q_segment_ids=seg,
                                                kv_segment_ids=seg, local_window_size=(70, 20), logits_soft_cap=2.0),
    }
    for name, rules in cases.items():
        def ring(implementation):
            f = lambda q, k, v: jnp.sum(ct * context_parallel_attention(
                q, k, v, mesh=mesh, seq_axis="seq", implementation=implementation, **rules))
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
        calls.clear()
        (value, grads), (xla_value, xla_grads) = ring("pallas_tpu"), ring("xla")
        assert {"flash_attention_core", "flash_backward"} <= set(calls), calls
        oracle = {key: x for key, x in rules.items() if key != "load_balance"}
        ref, _ = reference_attention(q, k, v, **oracle)
        ref_grads = reference_attention_grads(q, k, v, ct, **oracle)
        close(name + " value vs xla ring", value, xla_value, 1e-3)
        close(name + " value", value, np.sum(np.asarray(ct, np.float64) * ref), 1e-3)
        for what, a, b, r in zip(("dq", "dk", "dv"), grads, xla_grads, ref_grads):
            close(name + " " + what + " vs xla ring", a, b, 1e-4)
            close(name + " " + what, a, r, 1e-4)
        print("ok", name)
""")


@pytest.mark.slow  # two ring cases, forward and backward kernels in interpret mode on 4 devices
def test_ring_on_the_tpu_kernel_equals_the_xla_ring_and_the_oracle():
    result = run_on_cpu_devices(TPU_RING, 5)
    assert result.stdout.count("ok ") == 2, result.stdout


MOSAIC_GPU = COMMON + textwrap.dedent("""
    from pallas_kernels.gpu import flash_attention_mgpu as mgpu

    mesh = Mesh(devices.reshape(2, 2), ("data", "model"))
    heads = P("data", None, "model", None)
    q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
    attend = jax.shard_map(lambda q, k, v: mgpu.flash_attention(q, k, v, is_causal=True), mesh=mesh,
                           in_specs=(heads,) * 3, out_specs=heads)  # check_vma=True
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    for name, fn, count in (("forward", attend, 1), ("gradients", jax.grad(loss, argnums=(0, 1, 2)), 3)):
        text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        calls = re.findall(r"custom_call @([\\w$.]+)", text)
        assert calls.count("mosaic_gpu_v2") == count and "all-gather" not in text, (name, calls)
        print("ok", name)
""")


def test_mosaic_gpu_kernels_lower_under_checked_shard_map():
    result = run_on_cpu_devices(MOSAIC_GPU, 5)
    assert result.stdout.count("ok ") == 2, result.stdout


TRITON = COMMON + textwrap.dedent("""
    from pallas_kernels import gpu

    mesh = Mesh(devices.reshape(2, 2), ("data", "model"))
    heads = P("data", None, "model", None)
    sm = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(heads,) * 3, out_specs=heads)  # check_vma=True
    q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.float16)
    k = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.float16)
    q1 = jax.ShapeDtypeStruct((2, 1, 4, 64), jnp.float16)
    flash = sm(lambda q, k, v: gpu.flash_attention(q, k, v, is_causal=True))
    grads = jax.grad(lambda q, k, v: jnp.sum(flash(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    cases = [("flash forward", flash, q), ("flash gradients", grads, q)] + [
        (f"decode splits={s}", sm(lambda q, k, v, s=s: gpu.decode_attention(
            q, k, v, 100, block_sizes=gpu.DecodeBlockSizes(num_splits=s))), q1) for s in (1, 2)]
    for name, fn, query in cases:
        text = jax.jit(fn).trace(query, k, k).lower(lowering_platforms=("cuda",)).as_text()
        calls = re.findall(r"custom_call @([\\w$.]+)", text)
        assert calls and set(calls) <= {"__gpu$xla.gpu.triton"} and "all-gather" not in text, (name, calls)
        print("ok", name)
""")


def test_triton_kernels_lower_under_checked_shard_map():
    result = run_on_cpu_devices(TRITON, 5)
    assert result.stdout.count("ok ") == 4, result.stdout
