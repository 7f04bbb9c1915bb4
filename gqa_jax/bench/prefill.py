"""Prefill (training-shaped) attention: ours against the peers, forward and forward+backward.

FLOPs follow DESIGN.md: forward ``4*B*T*S*N*H``, halved when causal with
``T == S``; backward 2.5x forward, so forward+backward is 3.5x.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import gqa_jax


@dataclasses.dataclass(frozen=True)
class PrefillShape:
    """Self-attention over ``S`` tokens: query ``[B,S,N,H]``, key/value ``[B,S,K,H]``.

    ``segments > 0`` packs that many equal documents into each row (segment
    ids): our kernels take the ids, the peers without segment ids a boolean
    mask ``[B, 1, S, S]`` built from them inside the timed call. FLOPs count
    the whole row's (causal) logits for every implementation, so the ratios
    are ratios of time.
    """

    B: int
    S: int
    N: int
    K: int
    H: int
    causal: bool
    segments: int = 0

    @property
    def name(self) -> str:
        packed = f" packed{self.segments}" if self.segments else ""
        return f"B{self.B} S{self.S} N{self.N} K{self.K} H{self.H} {'causal' if self.causal else 'full'}{packed}"

    def segment_ids(self):
        """int32 ``[B, S]`` ids of the packed documents (position * segments // S), or None without packing."""
        if not self.segments:
            return None
        return jnp.asarray(np.broadcast_to(np.arange(self.S) * self.segments // self.S, (self.B, self.S)), jnp.int32)

    def segment_keywords(self) -> dict:
        """``q_segment_ids`` / ``kv_segment_ids`` for our kernels (empty without packing)."""
        ids = self.segment_ids()
        return {} if ids is None else {"q_segment_ids": ids, "kv_segment_ids": ids}

    def mask(self):
        """The packed documents as a boolean mask ``[B, 1, S, S]`` for peers without segment ids, or None."""
        ids = self.segment_ids()
        return None if ids is None else ids[:, None, :, None] == ids[:, None, None, :]

    def flops(self, mode: str) -> float:
        forward = 4.0 * self.B * self.S * self.S * self.N * self.H
        if self.causal:
            forward /= 2
        return forward if mode == "fwd" else 3.5 * forward


FULL_SHAPES = [
    PrefillShape(B, S, N, K, H, causal)
    for (B, S, N, K, H) in [
        (2, 4096, 32, 8, 128), (1, 16384, 32, 8, 128), (4, 2048, 16, 2, 64), (8, 1024, 32, 4, 128)
    ]
    for causal in (True, False)
]
# Packed documents (segment ids): the Mosaic-GPU kernel serves them since 2026-12-07; this shape measures that path.
FULL_SHAPES.append(PrefillShape(2, 4096, 32, 8, 128, True, segments=4))
QUICK_SHAPES = [PrefillShape(1, 128, 4, 2, 64, causal) for causal in (True, False)] + [
    PrefillShape(1, 128, 4, 2, 64, True, segments=3)]

MOSAIC = "gqa_jax pallas_mosaic_gpu"
TRITON = "gqa_jax pallas_triton"
OURS = (MOSAIC, TRITON)
# --quick runs our kernel in interpret mode: a correctness smoke run, not a speed; no ratio is printed for it.
INTERPRETED = "gqa_jax pallas_triton (interpret mode)"


def _triton(shape: PrefillShape, interpret: bool) -> Callable:
    if interpret:
        from pallas_kernels.gpu import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, is_causal=shape.causal, interpret=True,
                                               **shape.segment_keywords())
    return lambda q, k, v: gqa_jax.dot_product_attention(q, k, v, is_causal=shape.causal,
                                                         implementation="pallas_triton", **shape.segment_keywords())


def _mosaic(shape: PrefillShape, interpret: bool) -> Callable:
    """The Mosaic-GPU kernel itself (its Triton backward included), also where dispatch prefers Triton."""
    from pallas_kernels.gpu import flash_attention_mgpu

    return lambda q, k, v: flash_attention_mgpu.flash_attention(q, k, v, is_causal=shape.causal,
                                                                **shape.segment_keywords())


# The XLA path materializes float32 logits [B,N,S,S]: skip it where they pass this size.
XLA_LOGITS_LIMIT_BYTES = 8 * 2**30


def _jax_nn(implementation: str):
    def build(shape: PrefillShape, interpret: bool) -> Callable:
        logits_bytes = 4 * shape.B * shape.N * shape.S * shape.S
        if implementation == "xla" and logits_bytes > XLA_LOGITS_LIMIT_BYTES:
            raise MemoryError(f"skipped: float32 logits need {logits_bytes / 2**30:.0f} GiB")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=shape.mask(), is_causal=shape.causal,
                                                            implementation=implementation)
    return build


def _jax_pallas_op(shape: PrefillShape, interpret: bool) -> Callable:
    """jax's own (deprecated) Pallas GPU op; it needs K/V repeated to N heads."""
    from jax.experimental.pallas.ops.gpu import attention

    G = shape.N // shape.K

    def fn(q, k, v):
        k, v = gqa_jax.repeat_kv(k, G), gqa_jax.repeat_kv(v, G)
        return attention.mha(q, k, v, shape.segment_ids(), sm_scale=1.0 / math.sqrt(shape.H), causal=shape.causal,
                             interpret=interpret)
    return fn


def _tokamax(implementation: str):
    def build(shape: PrefillShape, interpret: bool) -> Callable:
        import tokamax
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; keep it off our command line
        return lambda q, k, v: tokamax.dot_product_attention(q, k, v, mask=shape.mask(), is_causal=shape.causal,
                                                             implementation=implementation)
    return build


def implementations(quick: bool) -> dict[str, Callable]:
    """Name -> builder(shape, interpret) of every implementation to time."""
    impls = {INTERPRETED if quick else TRITON: _triton, "jax.nn xla": _jax_nn("xla")}
    if not quick:
        impls = {MOSAIC: _mosaic, **impls}
        impls["jax.nn cudnn"] = _jax_nn("cudnn")
        impls["jax pallas op (repeated K/V)"] = _jax_pallas_op
        impls["tokamax triton"] = _tokamax("triton")
        impls["tokamax mosaic"] = _tokamax("mosaic")
    return impls


def make_inputs(shape: PrefillShape, key) -> tuple:
    kq, kk, kv, ko = jax.random.split(key, 4)
    q = jax.random.normal(kq, (shape.B, shape.S, shape.N, shape.H), jnp.bfloat16)
    k = jax.random.normal(kk, (shape.B, shape.S, shape.K, shape.H), jnp.bfloat16)
    v = jax.random.normal(kv, (shape.B, shape.S, shape.K, shape.H), jnp.bfloat16)
    do = jax.random.normal(ko, q.shape, jnp.bfloat16)
    return q, k, v, do


def timed_functions(attention: Callable) -> dict[str, tuple[Callable, Callable]]:
    """``mode -> (jitted fn, args from (q, k, v, do))`` for forward and forward+backward."""
    forward = jax.jit(attention)

    @jax.jit
    def forward_backward(q, k, v, do):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(do)

    return {
        "fwd": (forward, lambda q, k, v, do: (q, k, v)),
        "fwd+bwd": (forward_backward, lambda q, k, v, do: (q, k, v, do)),
    }
