"""The implementation registry: ordering, fallback, explicit names, and the GPU adapter's routing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import dispatch
from gqa_jax.implementations import pallas_triton


def _inputs(T=6, S=6, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, T, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, S, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, S, 2, 16)), jnp.float32)
    return q, k, v


@pytest.fixture
def recorder(monkeypatch):
    """Wraps every registered adapter to record which one served each call."""
    calls = []
    for name, impl in list(dispatch._REGISTRY.items()):
        def wrapped(request, _impl=impl):
            result = _impl(request)
            calls.append(_impl.name)
            return result
        monkeypatch.setitem(dispatch._REGISTRY, name,
                            dispatch.Implementation(name, impl.platforms, impl.priority, impl.supports, wrapped))
    return calls


@pytest.fixture
def fake_gpu(monkeypatch):
    """Dispatch as if on a GPU, with the Triton kernels in interpret mode."""
    monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
    monkeypatch.setattr(pallas_triton, "interpret", True)


def test_platform_order():
    assert gqa_jax.implementations("cpu") == ("xla",)
    assert gqa_jax.implementations("gpu") == ("pallas_mosaic_gpu", "pallas_triton", "cudnn", "xla")


def test_none_picks_the_best_that_serves(fake_gpu, recorder):
    q, k, v = _inputs()
    out = gqa_jax.dot_product_attention(q, k, v, is_causal=True)
    assert recorder == ["pallas_triton"]
    ref = gqa_jax.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_falls_back_in_order_when_refused(fake_gpu, recorder):
    """Returned weights: the Triton adapter refuses, cuDNN cannot run on this CPU, XLA serves."""
    q, k, v = _inputs()
    mask = jnp.tril(jnp.ones((6, 6), bool))
    out, weights = gqa_jax.dot_product_attention(q, k, v, mask=mask, return_weights=True)
    assert recorder == ["xla"]
    assert weights.shape == (2, 4, 6, 6)


def test_decode_shaped_requests_use_the_decode_kernel(fake_gpu, monkeypatch):
    import pallas_kernels.gpu as gpu_kernels

    used = []
    for name in ("decode_attention_core", "flash_attention_core"):
        original = getattr(gpu_kernels, name)
        monkeypatch.setattr(gpu_kernels, name, lambda *a, _f=original, _n=name, **kw: (used.append(_n), _f(*a, **kw))[1])
    q, k, v = _inputs(T=2, S=40)
    lengths = jnp.array([40, 13], jnp.int32)
    out = gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
    ref = gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    q, k, v = _inputs(T=20, S=40)
    gqa_jax.dot_product_attention(q, k, v, is_causal=True)
    assert used == ["decode_attention_core", "flash_attention_core"]


def test_explicit_name_that_cannot_serve_raises_with_reason(fake_gpu):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"implementation='pallas_triton' cannot serve this call: "
                                         r"pallas_triton: does not support dropout"):
        gqa_jax.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=__import__("jax").random.key(0),
                                      implementation="pallas_triton")


def test_sequence_of_names_is_tried_in_order(fake_gpu, recorder):
    q, k, v = _inputs()
    gqa_jax.dot_product_attention(q, k, v, return_weights=True, implementation=("pallas_triton", "xla"))
    assert recorder == ["xla"]
    with pytest.raises(ValueError, match="non-empty sequence"):
        gqa_jax.dot_product_attention(q, k, v, implementation=())


def test_register_a_new_implementation(monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    monkeypatch.setattr(dispatch, "current_platform", lambda: "cpu")
    seen = []

    def mine(request):
        seen.append(request.q_len)
        return jnp.zeros(request.query.shape[:3] + (request.value_head_dim,), request.query.dtype)

    gqa_jax.register_implementation("mine", mine, platforms=("cpu",), priority=99)
    q, k, v = _inputs()
    out = gqa_jax.dot_product_attention(q, k, v)
    assert seen == [6] and not np.any(np.asarray(out))
    assert gqa_jax.implementations("cpu")[0] == "mine"


def test_dense_masks_run_in_the_triton_kernel_as_a_bias(fake_gpu, recorder):
    q, k, v = _inputs()
    mask = jnp.asarray(np.random.default_rng(1).random((2, 1, 6, 6)) < 0.6).at[1, :, 3].set(False)
    out = gqa_jax.dot_product_attention(q, k, v, mask=mask)
    assert recorder == ["pallas_triton"]
    ref = gqa_jax.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    assert not np.any(np.asarray(out[1, 3]))  # a row with no visible key is zero
