"""`pallas_kernels.rules.Rules`: one validator for every entry point, a pytree, and a standalone package."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import dispatch
from pallas_kernels import gpu, tpu
from pallas_kernels.rules import Rules

B, T, S, N, K, H = 2, 4, 8, 4, 2, 16
_rng = np.random.default_rng(0)
Q = jnp.asarray(_rng.standard_normal((B, T, N, H)), jnp.float32)
KV = jnp.asarray(_rng.standard_normal((B, S, K, H)), jnp.float32)
FULL = np.full((B,), S, np.int32)

# Entry points that take every rule, and those that take the positional ones plus a cache length.
FLASH_ENTRY_POINTS = {
    "dot_product_attention": lambda **kw: gqa_jax.dot_product_attention(Q, KV, KV, implementation="xla", **kw),
    "gpu.flash_attention": lambda **kw: gpu.flash_attention(Q, KV, KV, interpret=True, **kw),
    "tpu.flash_attention": lambda **kw: tpu.flash_attention(Q, KV, KV, interpret=True, **kw),
}
# The decode kernels default to is_causal=True; give them the front end's default.
DECODE_ENTRY_POINTS = {
    "gpu.decode_attention": lambda **kw: gpu.decode_attention(Q, KV, KV, FULL, interpret=True,
                                                              **{"is_causal": False, **kw}),
    "tpu.decode_attention": lambda **kw: tpu.decode_attention(Q, KV, KV, FULL, interpret=True,
                                                              **{"is_causal": False, **kw}),
}
POSITIONAL = ("scale", "is_causal", "query_offset", "local_window_size", "logits_soft_cap")

BAD_RULES = [
    ("window_bool", dict(is_causal=True, local_window_size=True)),
    ("window_float", dict(local_window_size=3.5)),
    ("window_triple", dict(local_window_size=(1, 2, 3))),
    ("window_negative", dict(local_window_size=(-1, 2))),
    ("window_string", dict(local_window_size="3")),
    ("scale_nan", dict(scale=float("nan"))),
    ("scale_inf", dict(scale=float("inf"))),
    ("scale_string", dict(scale="0.5")),
    ("scale_bool", dict(scale=True)),
    ("soft_cap_inf", dict(logits_soft_cap=float("inf"))),
    ("soft_cap_negative", dict(logits_soft_cap=-1.0)),
    ("soft_cap_zero", dict(logits_soft_cap=0.0)),
    ("soft_cap_string", dict(logits_soft_cap="30")),
    ("causal_string", dict(is_causal="yes")),
    ("offset_without_positions", dict(query_offset=3)),
    ("offset_shape", dict(is_causal=True, query_offset=np.array([1, 2, 3], np.int32))),
    ("offset_float", dict(is_causal=True, query_offset=np.array([1.0, 2.0], np.float32))),
    ("q_lengths_past_T", dict(query_seq_lengths=np.array([T + 1, 1], np.int32))),
    ("kv_lengths_past_S", dict(key_value_seq_lengths=np.array([S + 1, 1], np.int32))),
    ("kv_lengths_negative", dict(key_value_seq_lengths=np.array([3, -1], np.int32))),
    ("kv_lengths_shape", dict(key_value_seq_lengths=np.array([3, 4, 5], np.int32))),
    ("kv_lengths_float", dict(key_value_seq_lengths=np.array([3.0, 4.0], np.float32))),
    ("segments_alone", dict(q_segment_ids=np.zeros((B, T), np.int32))),
    ("segments_q_shape", dict(q_segment_ids=np.zeros((B, T + 1), np.int32), kv_segment_ids=np.zeros((B, S), np.int32))),
    ("segments_kv_shape", dict(q_segment_ids=np.zeros((B, T), np.int32), kv_segment_ids=np.zeros((B, 5), np.int32))),
    ("segments_float", dict(q_segment_ids=np.zeros((B, T)), kv_segment_ids=np.zeros((B, S)))),
    ("bias_batch", dict(bias=np.zeros((3, N, T, S), np.float32))),
    ("bias_heads", dict(bias=np.zeros((B, 3, T, S), np.float32))),
    ("bias_rank", dict(bias=np.zeros((S,), np.float32))),
    ("bias_int", dict(bias=np.zeros((T, S), np.int32))),
]
GOOD_RULES = [
    ("none", {}),
    ("causal_window_int", dict(is_causal=True, local_window_size=2)),
    ("window_pair_numpy_ints", dict(local_window_size=(np.int32(1), 0))),
    ("offset_scalar_softcap", dict(is_causal=True, query_offset=2, logits_soft_cap=5.0, scale=0.5)),
]


def _outcome(call, rules):
    """``("ok", output)`` or ``(exception type, message)``."""
    try:
        return "ok", np.asarray(call(**rules))
    except (ValueError, TypeError) as e:
        return type(e), str(e)


def _entry_points(rules):
    points = dict(FLASH_ENTRY_POINTS)
    if set(rules) <= set(POSITIONAL):
        points.update(DECODE_ENTRY_POINTS)
    return points


@pytest.mark.parametrize("rules", [r for _, r in BAD_RULES], ids=[name for name, _ in BAD_RULES])
def test_bad_rules_are_refused_identically_everywhere(rules):
    outcomes = {name: _outcome(call, rules) for name, call in _entry_points(rules).items()}
    kinds = {name: kind for name, (kind, _) in outcomes.items()}
    assert "ok" not in kinds.values(), f"accepted by {[n for n, k in kinds.items() if k == 'ok']}: {rules}"
    front_kind, front_message = outcomes["dot_product_attention"]
    for name, (kind, message) in outcomes.items():
        assert (kind, message) == (front_kind, front_message), f"{name} differs from dot_product_attention"


@pytest.mark.parametrize("rules", [r for _, r in GOOD_RULES], ids=[name for name, _ in GOOD_RULES])
def test_good_rules_are_accepted_everywhere_and_agree(rules):
    points = _entry_points(rules)
    outcomes = {name: _outcome(call, rules) for name, call in points.items()}
    reference = outcomes["dot_product_attention"][1]
    for name, (kind, out) in outcomes.items():
        assert kind == "ok", f"{name} refused {rules}: {out}"
    for name in FLASH_ENTRY_POINTS:  # decode entry points see FULL lengths: same rules, compared in their own tests
        np.testing.assert_allclose(outcomes[name][1], reference, atol=2e-5, err_msg=name)


def test_defaults_are_derived_once():
    rules = Rules.create(Q, KV, is_causal=True, query_seq_lengths=np.array([4, 2], np.int32),
                         key_value_seq_lengths=np.array([8, 5], np.int32))
    np.testing.assert_array_equal(rules.q_offset, [4, 3])  # bottom-right over valid lengths
    assert rules.offset_is_default and rules.scale == pytest.approx(H ** -0.5)
    square = Rules.create(Q, Q, is_causal=True)
    np.testing.assert_array_equal(square.q_offset, [0, 0])  # T == S: top-left, as jax.nn
    assert Rules.create(Q, KV).q_offset.tolist() == [0, 0] and not Rules.create(Q, KV).positional


def test_rules_are_a_pytree_that_jit_passes_unchanged():
    rules = Rules.create(Q, KV, is_causal=True, local_window_size=(2, 1), logits_soft_cap=3.0,
                         key_value_seq_lengths=np.array([8, 6], np.int32))
    leaves, treedef = jax.tree.flatten(rules)
    assert len(leaves) == 2  # q_offset and kv_len; None fields and statics are not leaves
    seen = jax.jit(lambda r: r)(rules)
    assert (seen.window, seen.soft_cap, seen.is_causal) == ((2, 1), 3.0, True)
    np.testing.assert_array_equal(seen.kv_len, [8, 6])
    assert hash(rules.statics()) == hash(seen.statics())


def test_mask_matches_the_rules_one_by_one():
    q_off = np.array([4, 1], np.int32)
    rules = Rules.create(Q, KV, is_causal=True, local_window_size=(2, 0), query_offset=q_off,
                         key_value_seq_lengths=np.array([8, 3], np.int32))
    mask = np.asarray(rules.mask(T, S))[:, 0]
    t = np.arange(T)[None, :, None] + q_off[:, None, None]
    s = np.arange(S)[None, None, :]
    expected = (s <= t) & (s >= t - 2) & (s < np.array([8, 3])[:, None, None])
    np.testing.assert_array_equal(mask, expected)


def test_pallas_kernels_imports_without_gqa_jax_or_flax():
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("gqa_jax", "flax"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import pallas_kernels, pallas_kernels.gpu, pallas_kernels.tpu, pallas_kernels.rules
        assert not [m for m in sys.modules if m.split(".")[0] in ("gqa_jax", "flax")]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_kernel_error_propagates_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))

    def broken(request):
        raise NotImplementedError("raised while tracing the kernel body")

    gqa_jax.register_implementation("broken", broken, platforms=("cpu",), priority=99)
    with pytest.raises(NotImplementedError, match="while tracing the kernel body"):
        gqa_jax.dot_product_attention(Q, KV, KV)


def test_supports_is_asked_before_the_call(monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    called = []
    gqa_jax.register_implementation("picky", lambda request: called.append(1), platforms=("cpu",), priority=99,
                                    supports=lambda request: "no causal" if request.rules.is_causal else None)
    out = gqa_jax.dot_product_attention(Q, KV, KV, is_causal=True)  # picky refuses: xla serves
    assert not called and out.shape == (B, T, N, H)
    with pytest.raises(ValueError, match="picky: no causal"):
        gqa_jax.dot_product_attention(Q, KV, KV, is_causal=True, implementation="picky")
    with pytest.raises(TypeError, match="implementation=123"):
        gqa_jax.dot_product_attention(Q, KV, KV, implementation=123)
