"""Mask builders against the oracle's visibility rules."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import causal_mask, combine_masks, padding_mask, segment_mask, sliding_window_mask
from tests.reference import visibility


@pytest.mark.parametrize("T, S, offset", [(5, 5, None), (3, 9, None), (4, 9, np.array([2, 7]))])
def test_causal_mask(T, S, offset):
    mask = causal_mask(T, S, None if offset is None else jnp.asarray(offset))
    B = 1 if offset is None else 2
    chex.assert_shape(mask, (B, 1, T, S))
    np.testing.assert_array_equal(np.asarray(mask[:, 0]), visibility(B, T, S, is_causal=True, query_offset=offset))


@pytest.mark.parametrize("window", [2, (3, 0), (0, 2)])
def test_sliding_window_mask(window):
    mask = sliding_window_mask(6, 10, window, query_offset=jnp.array([1, 4]))
    expected = visibility(2, 6, 10, local_window_size=window, query_offset=np.array([1, 4]))
    np.testing.assert_array_equal(np.asarray(mask[:, 0]), expected)


def test_sliding_window_rejects_negative_sizes():
    with pytest.raises(ValueError, match=r"\(left, right\)=\(-2, 0\)"):
        sliding_window_mask(3, 3, (-2, 0))


def test_padding_mask():
    q_len, kv_len = np.array([3, 0]), np.array([5, 2])
    mask = padding_mask(4, 6, jnp.asarray(q_len), jnp.asarray(kv_len))
    expected = visibility(2, 4, 6, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    np.testing.assert_array_equal(np.asarray(mask[:, 0]), expected)
    chex.assert_shape(padding_mask(4, 6), (1, 1, 4, 6))


def test_segment_mask_and_combination():
    q_seg = np.array([[0, 0, 1, 1], [0, 1, 1, 2]])
    mask = combine_masks(segment_mask(jnp.asarray(q_seg), jnp.asarray(q_seg)), causal_mask(4, 4), None)
    expected = visibility(2, 4, 4, is_causal=True, q_segment_ids=q_seg, kv_segment_ids=q_seg)
    np.testing.assert_array_equal(np.asarray(mask[:, 0]), expected)
    assert combine_masks(None, None) is None
