"""The Hopper (Mosaic GPU) flash-attention forward, with the Triton backward behind it.

On any machine: every case the kernel serves lowers to Mosaic GPU for CUDA
(`jax.export`, which also runs Mosaic GPU's own checks, such as shared-memory
fit), gradients lower to Mosaic GPU plus the Triton backward kernels, and what
it does not serve is refused by name. On a Hopper GPU: the shared kernel cases
run compiled (float32 cases in bfloat16: the kernel has no float32 path).
Pallas has no Mosaic-GPU interpreter that runs these kernels on a CPU, so the
compiled class skips without a Hopper GPU and says so.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import dispatch
from pallas_kernels.gpu import flash_attention_mgpu as mgpu
from tests.kernel_cases import FLASH_CASES, GRAD_CASES, FlashKernelCases, make_inputs

# Cases the kernel refuses: a bias, segment ids, a head dim outside 64/128/256, Hv != H.
REFUSED = frozenset({
    "segments_causal", "bias_full", "lengths_window_segments_softcap", "h80_padded_causal_bf16",
    "scale_and_value_dim", "grad_segments_window_softcap", "grad_bias_bf16",
})
SERVED = [c for c in FLASH_CASES if c.name not in REFUSED]


def _on_hopper() -> bool:
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


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


@pytest.mark.parametrize("case", [c for c in GRAD_CASES if c.name not in REFUSED], ids=str)
def test_gradients_lower_to_mosaic_forward_and_triton_backward(case):
    q, k, v, _, rules = _as_bf16(case)

    def loss(q, k, v):
        return jnp.sum(mgpu.flash_attention(q, k, v, **rules).astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu_v2" in text
    for kernel in ("gqa_flash_dkdv", "gqa_flash_dq"):
        assert kernel in text, f"{kernel} missing: the backward must be the Triton kernels"


@pytest.mark.parametrize("case", sorted(c.name for c in FLASH_CASES if c.name in REFUSED and not c.bias))
def test_refuses_what_it_does_not_serve_by_name(case):
    q, k, v, _, rules = _as_bf16(next(c for c in FLASH_CASES if c.name == case))
    with pytest.raises(NotImplementedError, match="cannot serve this call: .*(segment|head dim|Hv)"):
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


def test_dispatch_puts_it_first_on_gpus_and_falls_back_off_hopper(monkeypatch):
    assert gqa_jax.implementations("gpu")[:2] == ("pallas_mosaic_gpu", "pallas_triton")
    monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    request = gqa_jax.make_request(q, q[:, :, :2], q[:, :, :2], is_causal=True)
    chosen = dispatch.choose(request)
    assert chosen.name == ("pallas_mosaic_gpu" if _on_hopper() else "pallas_triton")
    with pytest.raises(ValueError, match="pallas_mosaic_gpu: .*bias"):
        dispatch.choose(gqa_jax.make_request(q, q, q, bias=np.zeros((256, 256), np.float32)), "pallas_mosaic_gpu")
    h64 = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="pallas_mosaic_gpu: causal head dim 64"):  # the measured rule
        dispatch.choose(gqa_jax.make_request(h64, h64, h64, is_causal=True), "pallas_mosaic_gpu")


@pytest.mark.skipif(not _on_hopper(), reason="needs an NVIDIA Hopper GPU (compute capability 9.x) to run Mosaic GPU")
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
