"""On a TPU, ``implementation=None`` picks ``"pallas_tpu"``: for the pure function, the linen layers and decoding.

The platform is faked (``gqa_jax.dispatch.current_platform`` returns "tpu") and
the TPU kernels are swapped for recording wrappers that run them in interpret
mode, so the whole path, adapter included, runs here and is checked against the
reference. (On a real TPU the adapter runs the kernels compiled.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import dispatch
from gqa_jax.implementations import pallas_tpu
from gqa_jax.decoding import generate
from gqa_jax.models import Decoder, DecoderConfig
from gqa_jax.modules import GroupedQueryAttention
from pallas_kernels import tpu
from tests.kernel_cases import assert_close
from tests.reference import reference_attention

KERNELS = ("flash_attention", "decode_attention")


@pytest.fixture
def on_tpu(monkeypatch):
    """Dispatch sees a TPU; returns the list of TPU kernels called, in order."""
    calls = []
    for name in KERNELS:
        kernel = getattr(tpu, f"{name}_core")

        def recording(*args, _kernel=kernel, _name=name, **kwargs):
            calls.append(_name)
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(tpu, f"{name}_core", recording)
    monkeypatch.setattr(pallas_tpu, "interpret", True)
    monkeypatch.setattr(dispatch, "current_platform", lambda: "tpu")
    # Traces made while faking the platform must not be reused by later tests, nor earlier ones here.
    jax.clear_caches()
    yield calls
    jax.clear_caches()


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_pallas_tpu_is_the_default_on_tpu_only():
    assert gqa_jax.implementations("tpu")[0] == "pallas_tpu"
    assert "pallas_tpu" not in gqa_jax.implementations("cpu") + gqa_jax.implementations("gpu")


def test_training_call_runs_flash(on_tpu):
    rng = np.random.default_rng(0)
    q, k, v = _normal(rng, 2, 40, 4, 64), _normal(rng, 2, 40, 2, 64), _normal(rng, 2, 40, 2, 64)
    out = gqa_jax.dot_product_attention(q, k, v, is_causal=True)
    assert on_tpu == ["flash_attention"]
    assert_close(out, reference_attention(q, k, v, is_causal=True)[0], "float32")


def test_cached_decode_call_runs_decode(on_tpu):
    rng = np.random.default_rng(1)
    q, k, v = _normal(rng, 2, 2, 4, 64), _normal(rng, 2, 150, 1, 64), _normal(rng, 2, 150, 1, 64)
    lengths = np.array([150, 9], np.int32)
    out = gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
    assert on_tpu == ["decode_attention"]
    ref, _ = reference_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
    assert_close(out, ref, "float32")


def test_boolean_mask_is_served_as_a_bias(on_tpu):
    rng = np.random.default_rng(2)
    q, k, v = _normal(rng, 2, 24, 2, 64), _normal(rng, 2, 40, 2, 64), _normal(rng, 2, 40, 2, 64)
    mask = rng.random((2, 24, 40)) < 0.5
    mask[0, 3] = False  # a row that sees nothing: zeros
    out = gqa_jax.dot_product_attention(q, k, v, mask=mask)
    assert on_tpu == ["flash_attention"]
    assert_close(out, reference_attention(q, k, v, mask=mask[:, None])[0], "float32")


def test_unservable_calls_fall_back_to_xla_or_fail_clearly(on_tpu):
    rng = np.random.default_rng(3)
    q, k, v = _normal(rng, 1, 8, 2, 64), _normal(rng, 1, 8, 2, 64), _normal(rng, 1, 8, 2, 64)
    dropped = dict(dropout_rate=0.5, dropout_rng=jax.random.key(0))
    out = gqa_jax.dot_product_attention(q, k, v, **dropped)
    np.testing.assert_array_equal(out, gqa_jax.dot_product_attention(q, k, v, implementation="xla", **dropped))
    assert on_tpu == []
    with pytest.raises(ValueError, match="pallas_tpu.*return_weights"):
        gqa_jax.dot_product_attention(q, k, v, return_weights=True, implementation="pallas_tpu")


def test_linen_layer_selects_pallas_tpu(on_tpu):
    rng = np.random.default_rng(4)
    x = _normal(rng, 2, 24, 32)
    sizes = dict(head_dim=64, num_query_heads=4, num_key_value_heads=2)
    xla_layer = GroupedQueryAttention(**sizes, implementation="xla")
    params = xla_layer.init(jax.random.key(0), x, x)["params"]
    out = GroupedQueryAttention(**sizes).apply({"params": params}, x, x, use_causal_mask=True)
    assert on_tpu == ["flash_attention"]
    assert_close(out, np.asarray(xla_layer.apply({"params": params}, x, x, use_causal_mask=True)), "float32")


def test_decoding_selects_pallas_tpu(on_tpu):
    config = DecoderConfig(vocab_size=37, num_layers=1, model_dim=128, num_heads=2, num_kv_heads=1)
    prompt = np.array([[5, 9, 2, 7], [3, 1, 0, 0]], np.int32)
    lengths = np.array([4, 2], np.int32)
    xla_model = Decoder(DecoderConfig(**{**vars(config), "implementation": "xla"}))
    params = xla_model.init(jax.random.key(1), jnp.asarray(prompt))["params"]
    out = generate(Decoder(config), params, prompt, lengths, max_new_tokens=3)
    # Prefill (ragged: per-row query lengths) runs flash attention, each new token the decode kernel.
    assert on_tpu == ["flash_attention", "decode_attention"]
    np.testing.assert_array_equal(out.tokens, generate(xla_model, params, prompt, lengths, max_new_tokens=3).tokens)
