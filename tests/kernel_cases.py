"""Shared cases for every attention kernel: one base class, subclassed per backend.

A backend's test module subclasses `FlashKernelCases` and/or
`DecodeKernelCases` and defines how to call its kernel. The interpret-mode
subclasses run on the CPU in CI; the compiled subclasses run the very same
cases on the GPU/TPU machine (and skip themselves, saying so, elsewhere).

Every case compares against the float64 oracle in `tests/reference.py`, by
relative error ``||out - ref|| / ||ref||`` with a tolerance per dtype; NaN never
passes. Gradients compare against the gradients of the XLA path on float32
copies of the inputs (the XLA path's own gradients are checked numerically in
`tests/test_attention.py`).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import reference_attention

# Relative-error tolerances (||out - ref|| / ||ref||) by dtype.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1.5e-2, "float16": 3e-3}
# Compiled float32 on a GPU may run its matrix products as TF32.
TOLERANCE_TF32 = 3e-3
GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 4e-2, "float16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: shapes, dtype and the keyword rules."""

    name: str
    B: int
    T: int
    S: int
    N: int
    K: int
    H: int = 64
    Hv: int | None = None
    dtype: str = "float32"
    kwargs: tuple[tuple[str, Any], ...] = ()
    bias: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def seed(self) -> int:
        """A stable per-case seed (Python's str hash is salted per process)."""
        return zlib.crc32(self.name.encode())

    @property
    def rules(self) -> dict[str, Any]:
        return dict(self.kwargs)


def _kw(**kwargs) -> tuple[tuple[str, Any], ...]:
    return tuple(kwargs.items())


LEN2 = np.array([113, 40], np.int32)

FLASH_CASES = [
    Case("mha_full_T17", 2, 17, 17, 2, 2),
    Case("mha_causal_T1", 1, 1, 1, 2, 2, kwargs=_kw(is_causal=True)),
    Case("gqa2_causal_T113", 1, 113, 113, 4, 2, kwargs=_kw(is_causal=True)),
    Case("gqa4_causal_T255", 1, 255, 255, 4, 1, kwargs=_kw(is_causal=True)),
    Case("gqa8_full_T1000", 1, 1000, 1000, 8, 1, H=64, kwargs=()),
    Case("mqa_causal_T17_S113_bottom_right", 2, 17, 113, 4, 1, kwargs=_kw(is_causal=True)),
    Case("gqaN_full_T113_S17", 1, 113, 17, 4, 1, kwargs=()),
    Case("causal_explicit_offsets", 2, 17, 113, 4, 2, kwargs=_kw(is_causal=True, query_offset=np.array([96, 5], np.int32))),
    Case("kv_lengths_with_zero", 2, 64, 113, 4, 2, kwargs=_kw(key_value_seq_lengths=np.array([0, 77], np.int32))),
    Case("q_and_kv_lengths_causal", 2, 113, 113, 4, 2,
         kwargs=_kw(is_causal=True, query_seq_lengths=LEN2, key_value_seq_lengths=LEN2)),
    Case("segments_causal", 2, 113, 113, 4, 2, kwargs=_kw(is_causal=True, segments=3)),
    Case("window_left_right", 1, 113, 113, 4, 2, kwargs=_kw(local_window_size=(16, 7))),
    Case("window_causal", 2, 255, 255, 2, 1, kwargs=_kw(is_causal=True, local_window_size=(31, 0))),
    Case("soft_cap_causal", 1, 113, 113, 4, 2, kwargs=_kw(is_causal=True, logits_soft_cap=5.0)),
    Case("bias_full", 2, 17, 113, 4, 2, bias=True),
    Case("lengths_window_segments_softcap", 2, 113, 113, 4, 2,
         kwargs=_kw(is_causal=True, local_window_size=(40, 0), segments=2, key_value_seq_lengths=LEN2,
                    logits_soft_cap=10.0)),
    Case("h128_causal_bf16", 2, 255, 255, 4, 2, H=128, dtype="bfloat16", kwargs=_kw(is_causal=True)),
    Case("h256_full_f16", 1, 113, 113, 2, 1, H=256, dtype="float16"),
    Case("h80_padded_causal_bf16", 1, 113, 113, 2, 2, H=80, dtype="bfloat16", kwargs=_kw(is_causal=True)),
    Case("scale_and_value_dim", 1, 64, 64, 2, 1, H=64, Hv=128, kwargs=_kw(is_causal=True, scale=0.3)),
]

GRAD_CASES = [
    Case("grad_mha_causal_T113", 1, 113, 113, 2, 2, kwargs=_kw(is_causal=True)),
    Case("grad_gqa4_full_T17_S113", 2, 17, 113, 4, 1),
    Case("grad_gqa2_T113_S17_lengths", 2, 113, 17, 4, 2,
         kwargs=_kw(query_seq_lengths=np.array([100, 0], np.int32), key_value_seq_lengths=np.array([17, 9], np.int32))),
    Case("grad_segments_window_softcap", 2, 113, 113, 4, 2,
         kwargs=_kw(is_causal=True, segments=3, local_window_size=(20, 0), logits_soft_cap=4.0)),
    Case("grad_bias_bf16", 1, 64, 64, 4, 2, dtype="bfloat16", bias=True, kwargs=_kw(is_causal=True)),
]

DECODE_CASES = [
    Case("decode_T1_G1", 2, 1, 256, 4, 4, kwargs=_kw(lengths=np.array([256, 77], np.int32))),
    Case("decode_T1_G4_zero_len", 3, 1, 300, 8, 2, kwargs=_kw(lengths=np.array([0, 300, 129], np.int32))),
    Case("decode_T4_G8", 2, 4, 512, 8, 1, kwargs=_kw(lengths=np.array([4, 500], np.int32))),
    Case("decode_T16_GN", 2, 16, 257, 4, 1, kwargs=_kw(lengths=np.array([16, 200], np.int32))),
    Case("decode_T4_window", 2, 4, 512, 8, 2, kwargs=_kw(lengths=np.array([511, 90], np.int32), local_window_size=(63, 0))),
    Case("decode_T1_softcap_bf16", 2, 1, 384, 8, 2, dtype="bfloat16",
         kwargs=_kw(lengths=np.array([384, 5], np.int32), logits_soft_cap=30.0)),
    Case("decode_T16_h128_f16", 1, 16, 1024, 4, 2, H=128, dtype="float16", kwargs=_kw(lengths=np.array([700], np.int32))),
]


def make_inputs(case: Case, seed: int = 0):
    """Fresh random q, k, v (and bias, segment ids) for a case."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    Hv = case.H if case.Hv is None else case.Hv
    q = jnp.asarray(rng.standard_normal((case.B, case.T, case.N, case.H)), dtype)
    k = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, case.H)), dtype)
    v = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, Hv)), dtype)
    rules = case.rules
    segments = rules.pop("segments", None)
    if segments:
        # Sorted random segment ids: packed sequences of random lengths.
        rules["q_segment_ids"] = np.sort(rng.integers(0, segments, (case.B, case.T)), axis=1).astype(np.int32)
        rules["kv_segment_ids"] = (
            rules["q_segment_ids"] if case.T == case.S
            else np.sort(rng.integers(0, segments, (case.B, case.S)), axis=1).astype(np.int32)
        )
    bias = None
    if case.bias:
        bias = jnp.asarray(rng.standard_normal((case.B, case.N, case.T, case.S)), jnp.float32)
    return q, k, v, bias, rules


def relative_error(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def assert_close(out, ref, dtype: str, tol: float | None = None, what: str = "output") -> None:
    out = np.asarray(jnp.asarray(out, jnp.float32))
    assert out.shape == np.shape(ref), f"{what} shape {out.shape} != reference {np.shape(ref)}"
    assert np.all(np.isfinite(out)), f"{what} has NaN/inf"
    tol = TOLERANCE[dtype] if tol is None else tol
    err = relative_error(out, ref)
    assert err <= tol, f"{what} relative error {err:.3g} > {tol:.3g} ({dtype})"


def _reference(q, k, v, bias, rules):
    rules = dict(rules)
    scale = rules.pop("scale", None)
    cap = rules.pop("logits_soft_cap", None)
    ref, _ = reference_attention(q, k, v, bias=bias, scale=scale, logits_soft_cap=cap, **rules)
    return ref


class FlashKernelCases:
    """Forward and gradient cases for a flash-attention kernel.

    Subclasses define ``flash(q, k, v, bias=None, **rules)`` returning
    ``[B, T, N, Hv]``. A kernel that cannot serve a case must refuse it with
    ``NotImplementedError`` or ``ValueError`` naming the feature; subclasses list
    those cases by name in ``refused`` so the test checks the refusal.
    """

    refused: frozenset[str] = frozenset()
    f32_tolerance: float = TOLERANCE["float32"]
    # A kernel without float32 runs the float32 cases in this dtype (inputs drawn, then cast).
    f32_cases_as: str | None = None

    def flash(self, q, k, v, bias=None, **rules):
        raise NotImplementedError

    def _tolerance(self, dtype: str) -> float:
        return self.f32_tolerance if dtype == "float32" else TOLERANCE[dtype]

    def _case(self, case: Case) -> Case:
        if self.f32_cases_as is not None and case.dtype == "float32":
            return dataclasses.replace(case, dtype=self.f32_cases_as)
        return case

    @pytest.mark.parametrize("case", FLASH_CASES, ids=str)
    def test_forward(self, case: Case):
        case = self._case(case)
        q, k, v, bias, rules = make_inputs(case, seed=case.seed)
        if case.name in self.refused:
            with pytest.raises((NotImplementedError, ValueError)):
                self.flash(q, k, v, bias=bias, **rules)
            return
        out = self.flash(q, k, v, bias=bias, **rules)
        assert out.dtype == q.dtype, f"output dtype {out.dtype} != input dtype {q.dtype}"
        assert_close(out, _reference(q, k, v, bias, rules), case.dtype, self._tolerance(case.dtype))

    @pytest.mark.parametrize("case", GRAD_CASES, ids=str)
    def test_gradients(self, case: Case):
        if case.name in self.refused:
            pytest.fail(f"{type(self).__name__} refuses gradient case {case.name}; gradients are required")
        self.check_gradients(case)

    def check_gradients(self, case: Case):
        """The kernel's dQ, dK, dV against the XLA path's gradients on float32 copies."""
        import gqa_jax

        case = self._case(case)
        q, k, v, bias, rules = make_inputs(case, seed=case.seed)
        cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape[:3] + (v.shape[-1],)), jnp.float32)

        def loss_kernel(q, k, v):
            return jnp.sum(self.flash(q, k, v, bias=bias, **rules).astype(jnp.float32) * cotangent)

        def loss_xla(q, k, v):
            out = gqa_jax.dot_product_attention(q, k, v, bias=bias, implementation="xla", **rules)
            return jnp.sum(out * cotangent)

        grads = jax.grad(loss_kernel, argnums=(0, 1, 2))(q, k, v)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        expected = jax.grad(loss_xla, argnums=(0, 1, 2))(*f32)
        tol = GRAD_TOLERANCE[case.dtype] if case.dtype != "float32" else max(GRAD_TOLERANCE["float32"], self.f32_tolerance)
        for name, g, e, x in zip("qkv", grads, expected, (q, k, v)):
            assert g.dtype == x.dtype, f"d{name} dtype {g.dtype} != {x.dtype}"
            assert_close(g, np.asarray(e), case.dtype, tol, what=f"d{name}")


class DecodeKernelCases:
    """Cases for a decode kernel: few queries against a cache with per-row lengths.

    Subclasses define ``decode(q, k_cache, v_cache, lengths, **rules)``. The
    queries are the newest ``T`` tokens of each row: query ``t`` sits at
    ``lengths[b] - T + t`` and attends causally.
    """

    f32_tolerance: float = TOLERANCE["float32"]

    def decode(self, q, k_cache, v_cache, lengths, **rules):
        raise NotImplementedError

    @pytest.mark.parametrize("case", DECODE_CASES, ids=str)
    def test_decode(self, case: Case):
        q, k, v, _, rules = make_inputs(case, seed=case.seed)
        lengths = rules.pop("lengths")
        out = self.decode(q, k, v, jnp.asarray(lengths), **rules)
        assert out.dtype == q.dtype
        ref = _reference(
            q, k, v, None,
            dict(rules, is_causal=True, query_offset=lengths - case.T, key_value_seq_lengths=lengths),
        )
        tol = self.f32_tolerance if case.dtype == "float32" else TOLERANCE[case.dtype]
        assert_close(out, ref, case.dtype, tol)
