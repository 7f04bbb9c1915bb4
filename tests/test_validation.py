"""Bad inputs to `dot_product_attention` raise ValueError/TypeError naming the values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax

rng = np.random.default_rng(0)
Q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
KV = jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32)


def _call(q=Q, k=KV, v=KV, *args, **kwargs):
    return gqa_jax.dot_product_attention(q, k, v, *args, **kwargs)


BAD_INPUTS = [
    ("query_rank", dict(q=Q[0]), ValueError, r"query must have rank 4 \[B,T,N,H\], got query.shape=\(5, 4, 8\)"),
    ("key_rank", dict(k=KV[..., 0]), ValueError, r"key must have rank 4 .*key.shape=\(2, 7, 2\)"),
    ("heads_not_multiple", dict(k=KV[:, :, :1].repeat(3, axis=2), v=KV[:, :, :1].repeat(3, axis=2)),
     ValueError, r"N=4 must be a multiple of num_kv_heads K=3"),
    ("batch_mismatch", dict(k=KV[:1], v=KV[:1]), ValueError, r"query.shape\[0\]=2, key.shape\[0\]=1"),
    ("head_dim_mismatch", dict(k=KV[..., :4], v=KV[..., :4]), ValueError, r"query.shape\[3\]=8, key.shape\[3\]=4"),
    ("value_kv_mismatch", dict(v=KV[:, :6]), ValueError, r"value \[B,S,K,Hv\] must match key .*\(2, 6, 2, 8\)"),
    ("dtype_mismatch", dict(k=KV.astype(jnp.bfloat16)), TypeError, r"query.dtype=float32, key.dtype=bfloat16"),
    ("integer_query", dict(q=Q.astype(jnp.int32)), TypeError, r"query must be a floating-point array, got query.dtype=int32"),
    ("mask_shape", dict(mask=jnp.ones((2, 5, 6), bool)), ValueError, r"mask axis S must be 1 or S=7, got mask.shape=\(2, 1, 5, 6\)"),
    ("mask_rank", dict(mask=jnp.ones((7,), bool)), ValueError, r"mask must have rank 2 \[T,S\], 3 \[B,T,S\] or 4"),
    ("mask_float", dict(mask=jnp.ones((5, 7), jnp.float32)), TypeError, r"got mask.dtype=float32; pass an additive"),
    ("bias_heads", dict(bias=jnp.zeros((2, 3, 5, 7))), ValueError, r"bias axis N must be 1 or N=4"),
    ("negative_lengths", dict(key_value_seq_lengths=jnp.array([3, -1])), ValueError,
     r"key_value_seq_lengths must be non-negative, got key_value_seq_lengths=\[3, -1\]"),
    ("lengths_past_capacity", dict(query_seq_lengths=jnp.array([6, 2])), ValueError,
     r"query_seq_lengths must be <= T=5, got query_seq_lengths=\[6, 2\]"),
    ("lengths_shape", dict(key_value_seq_lengths=jnp.array([3, 4, 5])), ValueError,
     r"key_value_seq_lengths must have shape \[B\]=\(2,\), got key_value_seq_lengths.shape=\(3,\)"),
    ("lengths_float", dict(key_value_seq_lengths=jnp.array([3.0, 4.0])), TypeError, r"key_value_seq_lengths.dtype=float32"),
    ("negative_window", dict(local_window_size=(-1, 2)), ValueError, r"non-negative, got \(left, right\)=\(-1, 2\)"),
    ("window_not_ints", dict(local_window_size=(1.5, 2)), TypeError, r"local_window_size=\(1.5, 2\)"),
    ("offset_without_positions", dict(query_offset=3), ValueError,
     r"query_offset only matters with is_causal=True or local_window_size, got is_causal=False"),
    ("segments_alone", dict(q_segment_ids=jnp.zeros((2, 5), jnp.int32)), ValueError, r"q_segment_ids and kv_segment_ids go together"),
    ("segments_shape", dict(q_segment_ids=jnp.zeros((2, 5), jnp.int32), kv_segment_ids=jnp.zeros((2, 5), jnp.int32)),
     ValueError, r"kv_segment_ids must have shape \[B,S\]=\(2, 7\), got kv_segment_ids.shape=\(2, 5\)"),
    ("soft_cap", dict(logits_soft_cap=-1.0), ValueError, r"logits_soft_cap must be a positive float or None, got logits_soft_cap=-1.0"),
    ("dropout_rate", dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, r"dropout_rate must be in \[0, 1\), got dropout_rate=1.0"),
    ("dropout_without_rng", dict(dropout_rate=0.1), ValueError, r"dropout_rate=0.1 needs a dropout_rng"),
    ("unknown_implementation", dict(implementation="flash9"), ValueError, r"unknown implementation='flash9'"),
]


@pytest.mark.parametrize("kwargs, error, message", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        _call(**kwargs)


def test_bad_inputs_raise_under_jit_too():
    with pytest.raises(ValueError, match=r"N=4 must be a multiple of num_kv_heads K=3"):
        jax.jit(lambda q, k: gqa_jax.dot_product_attention(q, k, k))(Q, jnp.ones((2, 7, 3, 8)))


def test_implementation_on_the_wrong_platform_says_why(monkeypatch):
    monkeypatch.setattr(gqa_jax.dispatch, "current_platform", lambda: "cpu")
    with pytest.raises(ValueError, match=r"implementation='pallas_triton' cannot serve this call: "
                                         r"pallas_triton: runs on \['gpu'\], not on platform='cpu'"):
        _call(implementation="pallas_triton")
