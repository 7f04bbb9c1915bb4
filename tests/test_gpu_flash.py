"""The Triton flash-attention kernel: the shared kernel cases in interpret mode
(CPU, CI), compiled on an NVIDIA GPU, and lowered to Triton for CUDA on any machine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gpu import BlockSizes, flash_attention
from tests.devices import has_gpu
from tests.kernel_cases import FLASH_CASES, GRAD_CASES, TOLERANCE_TF32, FlashKernelCases, make_inputs


class TestTritonFlashInterpret(FlashKernelCases):
    def flash(self, q, k, v, bias=None, **rules):
        return flash_attention(q, k, v, bias=bias, interpret=True, **rules)

    @pytest.mark.slow  # backward kernels in interpret mode: each case compiles and runs several seconds on a CPU
    @pytest.mark.parametrize("case", GRAD_CASES, ids=str)
    def test_gradients(self, case):
        super().test_gradients(case)


@pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU to run the compiled Triton kernels")
class TestTritonFlashCompiled(FlashKernelCases):
    f32_tolerance = TOLERANCE_TF32

    def flash(self, q, k, v, bias=None, **rules):
        return flash_attention(q, k, v, bias=bias, **rules)


def _lower_for_cuda(fn, *args):
    """Runs the Pallas-to-Triton lowering for CUDA; raises on any lowering error."""
    triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton_call])(*args)


@pytest.mark.parametrize("case", FLASH_CASES + GRAD_CASES, ids=str)
def test_lowers_to_triton(case):
    q, k, v, bias, rules = make_inputs(case, seed=case.seed)

    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, bias=bias, **rules).astype(jnp.float32))

    exported = _lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v)
    text = exported.mlir_module()
    for kernel in ("gqa_flash_forward", "gqa_flash_dkdv", "gqa_flash_dq"):
        assert kernel in text, f"{kernel} missing from the lowered module"


def test_block_sizes_validate():
    with pytest.raises(ValueError, match="block_q=48"):
        BlockSizes(block_q=48)
    with pytest.raises(ValueError, match="num_warps=3"):
        BlockSizes(num_warps=3)


def test_custom_block_sizes_agree_with_default():
    q, k, v, _, rules = make_inputs(FLASH_CASES[3], seed=7)
    small = BlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=16)
    a = flash_attention(q, k, v, interpret=True, **rules)
    b = flash_attention(q, k, v, block_sizes=small, interpret=True, **rules)
    assert float(jnp.max(jnp.abs(a - b))) < 1e-5
