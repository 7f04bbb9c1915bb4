"""The Hopper (Mosaic GPU) flash attention: its forward and its backward (Triton backward as fallback).

On any machine: every case the kernel serves lowers to Mosaic GPU for CUDA
(`jax.export`, which also runs Mosaic GPU's own checks, such as shared-memory
fit); gradients lower to the Mosaic forward plus the two Mosaic backward
kernels (dQ, dK/dV), or to the Triton backward kernels where the Mosaic
backward refuses (head dim 256) or is asked not to run; segment ids lower on
both grids and every head dim, and reach all three kernels; what it does not
serve is refused by name. On a Hopper GPU: the shared kernel cases run compiled,
forward and gradients (float32 cases in bfloat16: the kernel has no float32
path).
Pallas's GPU interpret mode (jax 0.10.2) cannot run these kernels on a CPU
(it has no `run_state`, which holds the wgmma accumulators, and no inline-PTX
named barriers), so the compiled class skips without a Hopper GPU and says so.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import dispatch
from gqa_jax.implementations import pallas_mosaic_gpu
from pallas_kernels.gpu import flash_attention_mgpu as mgpu
from pallas_kernels.gpu import flash_attention_mgpu_backward as mgpu_bwd
from pallas_kernels.gpu.mgpu_tiles import segment_tile_ranges
from pallas_kernels.rules import Rules
from tests.devices import on_hopper
from tests.kernel_cases import FLASH_CASES, GRAD_CASES, FlashKernelCases, make_inputs

# Cases the kernel refuses: a bias, a head dim outside 64/128/256, Hv != H.
REFUSED = frozenset({"bias_full", "h80_padded_causal_bf16", "scale_and_value_dim", "grad_bias_bf16"})
SERVED = [c for c in FLASH_CASES if c.name not in REFUSED]


def _as_bf16(case):
    q, k, v, bias, rules = make_inputs(case, seed=case.seed)
    cast = (lambda x: x) if case.dtype != "float32" else (lambda x: x.astype(jnp.bfloat16))
    return cast(q), cast(k), cast(v), bias, rules


@pytest.mark.parametrize("case", SERVED, ids=str)
def test_forward_lowers_to_mosaic_gpu(case):
    q, k, v, _, rules = _as_bf16(case)
    exported = jax.export.export(jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, **rules)),
                                 platforms=["cuda"])(q, k, v)
    calls = set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))
    assert calls == {"mosaic_gpu_v2"}, calls


def _gradient_calls(q, k, v, rules, **core):
    """Custom calls of the compiled gradient of ``sum(out)`` through the kernel, lowered for CUDA."""

    def loss(q, k, v):
        r = gqa_jax.make_request(q, k, v, **rules).rules
        return jnp.sum(mgpu.flash_attention_core(q, k, v, r, **core).astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r"custom_call @([\w$.]+)", text), text


# Gradient cases: the shared gradient cases plus forward cases that carry other rules (window, soft-cap, offsets).
GRAD_LOWERING = [c for c in GRAD_CASES if c.name not in REFUSED] + [
    c for c in SERVED if c.name in {"window_causal", "window_left_right", "soft_cap_causal", "causal_explicit_offsets",
                                    "h128_causal_bf16"}
]


@pytest.mark.parametrize("case", GRAD_LOWERING, ids=str)
def test_gradients_lower_to_mosaic_forward_and_backward(case):
    q, k, v, _, rules = _as_bf16(case)
    calls, _ = _gradient_calls(q, k, v, rules)
    # One forward kernel, then the dQ and dK/dV kernels, all Mosaic GPU; no Triton kernel.
    assert calls.count("mosaic_gpu_v2") == 3, calls
    assert set(calls) == {"mosaic_gpu_v2"}, calls


@pytest.mark.parametrize("tiles_first", [False, True])
def test_both_backward_work_orders_lower(tiles_first):
    q = jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 500, 2, 128), jnp.bfloat16)
    blocks = mgpu_bwd.MosaicBackwardBlockSizes(tiles_first=tiles_first)

    def grads(q, k, v):
        rules = Rules.create(q, k, is_causal=True)
        out, lse = mgpu.forward(q, k, v, rules)
        return mgpu_bwd.backward(q, k, v, out, lse, out, rules, blocks)

    calls = re.findall(r"custom_call @([\w$.]+)", jax.export.export(jax.jit(grads), platforms=["cuda"])(q, kv, kv).mlir_module())
    assert calls == ["mosaic_gpu_v2"] * 3, calls


def test_gradients_fall_back_to_triton_backward():
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 4, 256)), jnp.bfloat16)
    k = q[:, :, :2]
    assert "head dim H=256" in mgpu_bwd.unsupported_reason(q, k, k, gqa_jax.make_request(q, k, k).rules)
    for head_dim, core in ((256, {}), (128, dict(backward="triton"))):
        x = q[..., :head_dim]
        calls, text = _gradient_calls(x, x[:, :, :2], x[:, :, :2], dict(is_causal=True), **core)
        assert calls.count("mosaic_gpu_v2") == 1, calls  # the forward only
        for kernel in ("gqa_flash_dkdv", "gqa_flash_dq"):
            assert kernel in text, f"{kernel} missing at head dim {head_dim}: the backward must be the Triton kernels"


def test_backward_choice_is_validated():
    q = jnp.zeros((1, 64, 4, 256), jnp.bfloat16)
    rules = gqa_jax.make_request(q, q, q).rules
    with pytest.raises(NotImplementedError, match="Mosaic-GPU flash backward cannot serve.*H=256"):
        mgpu.flash_attention_core(q, q, q, rules, backward="mosaic")
    with pytest.raises(ValueError, match="backward must be one of.*backward='cudnn'"):
        mgpu.flash_attention_core(q, q, q, rules, backward="cudnn")
    assert mgpu.choose_backward(q, q, q, rules) == "triton"
    assert mgpu.choose_backward(q[..., :128], q[..., :128], q[..., :128], rules) == "mosaic"


def test_backward_block_sizes_validate_and_fit_shared_memory():
    for name in ("block_kv_dkv", "block_q_dq"):
        with pytest.raises(ValueError, match=f"{name}=128 must be 64"):
            mgpu_bwd.MosaicBackwardBlockSizes(**{name: 128})
    with pytest.raises(ValueError, match="block_kv_dq=96 must be 64 or 128"):
        mgpu_bwd.MosaicBackwardBlockSizes(block_kv_dq=96)
    with pytest.raises(TypeError, match="block_q_dkv=True must be an int"):
        mgpu_bwd.MosaicBackwardBlockSizes(block_q_dkv=True)
    with pytest.raises(ValueError, match="max_concurrent_steps=1"):
        mgpu_bwd.MosaicBackwardBlockSizes(max_concurrent_steps=1)
    mgpu_bwd.MosaicBackwardBlockSizes().check(128, 2)
    with pytest.raises(TypeError, match="tiles_first=1 must be a bool"):
        mgpu_bwd.MosaicBackwardBlockSizes(tiles_first=1)
    with pytest.raises(ValueError, match="shared memory at head_dim=128"):
        mgpu_bwd.MosaicBackwardBlockSizes(block_kv_dq=128, max_concurrent_steps=3).check(128, 2)


@pytest.mark.parametrize("case", sorted(c.name for c in FLASH_CASES if c.name in REFUSED and not c.bias))
def test_refuses_what_it_does_not_serve_by_name(case):
    q, k, v, _, rules = _as_bf16(next(c for c in FLASH_CASES if c.name == case))
    with pytest.raises(NotImplementedError, match="cannot serve this call: .*(head dim|Hv)"):
        mgpu.flash_attention(q, k, v, **rules)


def test_float32_and_non_positive_scales_are_refused():
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="bf16 or fp16"):
        mgpu.flash_attention(q, q, q)
    for scale in (-0.5, 0.0):
        with pytest.raises(NotImplementedError, match=f"scale must be positive.*scale={scale}"):
            mgpu.flash_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), scale=scale)
    out = jax.eval_shape(lambda q: mgpu.flash_attention(q, q, q, scale=-0.5, logits_soft_cap=5.0), q.astype(jnp.bfloat16))
    assert out.shape == q.shape  # with a soft-cap the tanh comes first: any scale works


def test_block_sizes_validate_and_fit_shared_memory():
    with pytest.raises(ValueError, match="block_kv=96"):
        mgpu.MosaicBlockSizes(block_kv=96)
    with pytest.raises(ValueError, match="max_concurrent_steps=5"):
        mgpu.MosaicBlockSizes(max_concurrent_steps=5)
    with pytest.raises(ValueError, match="shared memory"):
        mgpu.MosaicBlockSizes(block_kv=256, max_concurrent_steps=4).check(256, 2)
    with pytest.raises(TypeError, match="persistent=1"):
        mgpu.MosaicBlockSizes(persistent=1)
    with pytest.raises(ValueError, match="shared memory"):  # the persistent grid's separate output tile
        mgpu.MosaicBlockSizes(block_kv=64, persistent=True).check(256, 2)
    assert mgpu.MosaicBlockSizes.for_call(128, is_causal=False).persistent
    assert not mgpu.MosaicBlockSizes.for_call(128, is_causal=True).persistent
    assert not mgpu.MosaicBlockSizes.for_call(256, is_causal=False).persistent
    mgpu.MosaicBlockSizes.for_call(256, is_causal=False).check(256, 2)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_both_grids_lower_for_both_masks(is_causal, persistent):
    # Defaults pick one grid per mask; the other must lower too (callers may pin it).
    q = jax.ShapeDtypeStruct((2, 300, 8, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 500, 2, 64), jnp.bfloat16)
    blocks = mgpu.MosaicBlockSizes(persistent=persistent)
    fn = jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, is_causal=is_causal, block_sizes=blocks,
                                                      key_value_seq_lengths=jnp.array([500, 123])))
    calls = set(re.findall(r"custom_call @([\w$.]+)", jax.export.export(fn, platforms=["cuda"])(q, kv, kv).mlir_module()))
    assert calls == {"mosaic_gpu_v2"}, calls


def _segment_ids(B: int, length: int, seed: int) -> np.ndarray:
    """Sorted random segment ids ``[B, length]`` in ``[0, 4)``: packed sequences of random lengths."""
    return np.sort(np.random.default_rng(seed).integers(0, 4, (B, length)), axis=1).astype(np.int32)


def _mosaic_operands(text: str) -> list[int]:
    """The operand count of each Mosaic-GPU custom call in lowered ``text``."""
    return [len(args.split(",")) for args in re.findall(r"custom_call @mosaic_gpu_v2\(([^)]*)\)", text)]


# Head dim 256 has no shared memory for the persistent grid's output tile.
@pytest.mark.parametrize("head_dim,persistent", [(64, False), (64, True), (128, False), (128, True), (256, False)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_segment_ids_lower_on_both_grids(head_dim, persistent, is_causal):
    # T != S with lengths: both sides' ids are padded to the tiles and masked together with the lengths.
    q = jax.ShapeDtypeStruct((2, 300, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 500, 2, head_dim), jnp.bfloat16)
    q_seg, kv_seg = jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 500), jnp.int32)
    blocks = dataclasses.replace(mgpu.MosaicBlockSizes.for_call(head_dim, is_causal), persistent=persistent)

    def attend(q, k, v, q_seg, kv_seg):
        return mgpu.flash_attention(q, k, v, is_causal=is_causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                    key_value_seq_lengths=jnp.array([500, 123]), block_sizes=blocks)

    text = jax.export.export(jax.jit(attend), platforms=["cuda"])(q, kv, kv, q_seg, kv_seg).mlir_module()
    # offset, q_len, kv_len, q, k, v, the two segment-id arrays and the key tile ranges of the query tiles'
    # segments; without segment ids the kernel takes six.
    assert _mosaic_operands(text) == [9], _mosaic_operands(text)
    plain = jax.export.export(jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, is_causal=is_causal,
                                                                           block_sizes=blocks)),
                              platforms=["cuda"])(q, kv, kv).mlir_module()
    assert _mosaic_operands(plain) == [6], _mosaic_operands(plain)


@pytest.mark.parametrize("is_sorted", [True, False])
def test_segment_tile_ranges_hold_every_visible_tile(is_sorted):
    # Brute force: the column tiles holding a valid column whose id equals a valid row's id of the block must lie in
    # [lo, hi); for sorted ids (packed documents) the range is exactly the tiles holding an id in the block's range.
    rng = np.random.default_rng(0 if is_sorted else 1)
    B, R, C, row_block, col_block = 3, 256, 384, 64, 32
    row_ids, col_ids = (rng.integers(0, 5, (B, n)) for n in (R, C))
    if is_sorted:
        row_ids, col_ids = np.sort(row_ids, axis=1), np.sort(col_ids, axis=1)
    row_len, col_len = np.array([256, 100, 0]), np.array([384, 200, 384])
    lo, hi = np.asarray(segment_tile_ranges(jnp.asarray(row_ids), jnp.asarray(col_ids), jnp.asarray(row_len),
                                            jnp.asarray(col_len), row_block, col_block))
    for b in range(B):
        for i in range(R // row_block):
            rows = row_ids[b, i * row_block:min((i + 1) * row_block, row_len[b])]
            seen = {c // col_block for c in range(col_len[b]) if col_ids[b, c] in set(rows.tolist())}
            if not seen:
                assert lo[b, i] == hi[b, i], (b, i, lo[b, i], hi[b, i])
                continue
            assert lo[b, i] <= min(seen) and max(seen) < hi[b, i], (b, i, lo[b, i], hi[b, i], sorted(seen))
            if is_sorted:  # exactly the tiles holding an id between the block's least and greatest
                in_range = [c // col_block for c in range(col_len[b]) if rows.min() <= col_ids[b, c] <= rows.max()]
                assert (lo[b, i], hi[b, i]) == (min(in_range), max(in_range) + 1), (b, i)
    assert (lo[2] == 0).all() and (hi[2] == 0).all()  # a row of no valid rows sees no tile


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("T,S", [(300, 300), (200, 333)])
def test_segment_id_gradients_lower_to_mosaic_forward_and_backward(head_dim, is_causal, T, S):
    q = jnp.asarray(np.random.default_rng(0).standard_normal((2, T, 4, head_dim)), jnp.bfloat16)
    k = jnp.asarray(np.random.default_rng(1).standard_normal((2, S, 2, head_dim)), jnp.bfloat16)
    rules = dict(is_causal=is_causal, q_segment_ids=_segment_ids(2, T, 2), kv_segment_ids=_segment_ids(2, S, 3),
                 query_seq_lengths=np.array([T, T // 2], np.int32), key_value_seq_lengths=np.array([S, 101], np.int32))
    calls, text = _gradient_calls(q, k, k, rules)
    assert calls == ["mosaic_gpu_v2"] * 3, calls  # the forward, dQ and dK/dV kernels
    # Each kernel takes both segment-id arrays and its tile ranges: forward 6 + 3; dQ and dK/dV 9 (with lse, dO,
    # delta) + 3.
    assert sorted(_mosaic_operands(text)) == [9, 12, 12], _mosaic_operands(text)


def test_segment_ids_at_head_dim_256_fall_back_to_triton_backward():
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 200, 4, 256)), jnp.bfloat16)
    seg = _segment_ids(1, 200, 4)
    calls, text = _gradient_calls(q, q[:, :, :2], q[:, :, :2], dict(is_causal=True, q_segment_ids=seg,
                                                                    kv_segment_ids=seg))
    assert calls.count("mosaic_gpu_v2") == 1, calls  # the forward only
    assert "gqa_flash_dkdv" in text and "gqa_flash_dq" in text


def test_dispatch_puts_it_first_on_gpus_and_falls_back_off_hopper(monkeypatch):
    assert gqa_jax.implementations("gpu")[:2] == ("pallas_mosaic_gpu", "pallas_triton")
    monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    request = gqa_jax.make_request(q, q[:, :, :2], q[:, :, :2], is_causal=True)
    chosen = dispatch.choose(request)
    assert chosen.name == ("pallas_mosaic_gpu" if on_hopper() else "pallas_triton")
    seg = np.zeros((1, 256), np.int32)
    chosen = dispatch.choose(gqa_jax.make_request(q, q[:, :, :2], q[:, :, :2], is_causal=True, q_segment_ids=seg,
                                                  kv_segment_ids=seg))
    assert chosen.name == ("pallas_mosaic_gpu" if on_hopper() else "pallas_triton")  # segment ids are served
    with pytest.raises(ValueError, match="pallas_mosaic_gpu: .*bias"):
        dispatch.choose(gqa_jax.make_request(q, q, q, bias=np.zeros((256, 256), np.float32)), "pallas_mosaic_gpu")


@pytest.mark.parametrize("is_causal", [True, False])
def test_head_dim_64_runs_mosaic_forward_and_gradients(is_causal):
    """The measured dispatch rule (gqa_jax/implementations/pallas_mosaic_gpu.py), lowered for CUDA."""
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 256, 4, 64)), jnp.bfloat16)
    k = q[:, :, :2]

    def attend(q, k, v):
        return pallas_mosaic_gpu.IMPLEMENTATION(gqa_jax.make_request(q, k, v, is_causal=is_causal))

    def calls(fn):
        text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        return re.findall(r"custom_call @([\w$.]+)", text)

    forward = calls(attend)
    gradients = calls(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    assert forward == ["mosaic_gpu_v2"], forward
    assert gradients == ["mosaic_gpu_v2"] * 3, gradients  # Mosaic forward, dQ and dK/dV kernels


@pytest.mark.skipif(not on_hopper(), reason="needs an NVIDIA Hopper GPU (compute capability 9.x) to run Mosaic GPU")
class TestMosaicFlashCompiled(FlashKernelCases):
    refused = REFUSED
    f32_cases_as = "bfloat16"

    def flash(self, q, k, v, bias=None, **rules):
        if bias is not None:
            raise NotImplementedError("the Mosaic-GPU kernel takes no bias")
        return mgpu.flash_attention(q, k, v, **rules)

    @pytest.mark.parametrize("case", [c for c in GRAD_CASES if c.name not in REFUSED], ids=str)
    def test_gradients(self, case):
        self.check_gradients(case)

    @pytest.mark.parametrize("case", SERVED, ids=str)
    def test_gradients_of_forward_cases(self, case):
        self.check_gradients(case)
