"""Every kernel configuration of the TPU tests lowers for TPUs, checked on this CPU machine.

``jax.export.export(..., platforms=["tpu"])`` runs, without a TPU, the Pallas to
Mosaic lowering of each ``pallas_call`` (block shapes against TPU tiling, every
operation of the kernel bodies and index maps) and serializes the Mosaic module
into the ``tpu_custom_call``. What it cannot run are Mosaic's own compiler passes
(vector layouts, VMEM budgets), which live in libtpu: those errors surface only
on a TPU (``examples/colab_tpu.ipynb``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from gqa_jax.quantization import quantize
from pallas_kernels import tpu
from tests.kernel_cases import DECODE_CASES, FLASH_CASES, GRAD_CASES, make_inputs
from tests.test_tpu_kernels import LONG, LONG_BLOCKS, SMALL_BLOCKS, with_traced_rules

KERNEL_CALL = "tpu_custom_call"


def export_for_tpu(fn, arrays, rules, **static) -> str:
    """The StableHLO text of ``fn`` exported for TPUs (array rules as traced arguments)."""
    g, traced = with_traced_rules(fn, rules, **static)
    return jax.export.export(jax.jit(g), platforms=["tpu"])(arrays, traced).mlir_module()


def _with_grads(fn, argnums=(0, 1, 2)):
    """``fn``'s output and the gradients of its sum: every forward and backward kernel."""
    def value_and_grads(*arrays, **kw):
        def loss(*a):
            out = fn(*a, **kw)
            return jnp.sum(out.astype(jnp.float32)), out
        (_, out), grads = jax.value_and_grad(loss, argnums, has_aux=True)(*arrays)
        return out, grads
    return value_and_grads


def _interpret_blocks(case):
    return LONG_BLOCKS if min(case.T, case.S) > LONG else SMALL_BLOCKS


@pytest.mark.parametrize("blocks", ["default", "interpret_tests"])
@pytest.mark.parametrize("case", FLASH_CASES + GRAD_CASES, ids=str)
def test_flash_forward_and_backward_lower_for_tpu(case, blocks):
    q, k, v, bias, rules = make_inputs(case)
    block_sizes = None if blocks == "default" else _interpret_blocks(case)

    def flash(q, k, v, bias, **kw):
        return tpu.flash_attention(q, k, v, bias=bias, block_sizes=block_sizes, **kw)

    exported = export_for_tpu(_with_grads(flash), (q, k, v, bias), rules)
    assert exported.count(KERNEL_CALL) == 3  # forward, dQ, dK/dV


def test_bias_gradient_lowers_for_tpu():
    q, k, v, bias, rules = make_inputs(next(c for c in GRAD_CASES if c.bias))
    grads = _with_grads(lambda q, k, v, bias: tpu.flash_attention(q, k, v, bias=bias, **rules), argnums=(0, 1, 2, 3))
    assert export_for_tpu(grads, (q, k, v, bias), {}).count(KERNEL_CALL) == 3


@pytest.mark.parametrize("block_k", [None, 128])
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_forward_and_backward_lower_for_tpu(case, block_k):
    q, k, v, _, rules = make_inputs(case)
    lengths = rules.pop("lengths")

    def decode(q, k, v, lengths, **kw):
        blocks = None if block_k is None else tpu.DecodeBlockSizes(block_k=block_k)
        return tpu.decode_attention(q, k, v, lengths, block_sizes=blocks, **kw)

    exported = export_for_tpu(_with_grads(decode), (q, k, v, lengths), rules)
    assert exported.count(KERNEL_CALL) == 4  # decode; its backward: flash forward, dQ, dK/dV


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("case", [DECODE_CASES[1], DECODE_CASES[6]], ids=str)  # two heads a program; one, float16
def test_quantized_decode_forward_and_backward_lower_for_tpu(case, dtype):
    """int8 / float8 tiles and float32 scale tiles; the backward differentiates the query and the scales."""
    q, k, v, _, rules = make_inputs(case)
    lengths = rules.pop("lengths")
    (kq, ks), (vq, vs) = quantize(k, dtype), quantize(v, dtype)

    def decode(q, ks, vs, kq, vq, lengths, **kw):
        return tpu.decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs, **kw)

    exported = export_for_tpu(_with_grads(decode), (q, ks, vs, kq, vq, lengths), rules)
    assert exported.count(KERNEL_CALL) == 4  # decode; its backward: flash forward, dQ, dK/dV


def test_export_really_runs_the_mosaic_lowering():
    # A block shape that TPU tiling forbids must fail here, on the CPU, at export.
    def bad(x):
        return pl.pallas_call(
            lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]),
            grid=(2,),
            in_specs=[pl.BlockSpec((8, 100), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((8, 100), lambda i: (i, 0)),
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        )(x)

    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        jax.export.export(jax.jit(bad), platforms=["tpu"])(np.zeros((16, 200), np.float32))
