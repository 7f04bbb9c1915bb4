"""Decode attention: one new token per row against a bf16 KV cache with per-row lengths.

Decoding is memory-bound, so the figure is GB/s of K/V actually read (K and V
up to each row's length) and its fraction of the copy bandwidth measured in
the same run. Our kernel also runs on the same cache quantized to int8 and
float8_e4m3fn (`gqa_jax.quantization`, quantized once before timing); those
rows count the same bf16 bytes, so their GB/s is a bf16-equivalent rate and
their ratio to a peer is the ratio of times per step. On the ragged shapes
it also runs on the same cache laid out in a pool of pages
(`pallas_kernels.gpu.paged_decode_attention`, each row's pages shuffled
through the pool, laid out once before timing), bf16 and int8 (values and
scales in pages).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import gqa_jax
from gqa_jax.quantization import quantize
from pallas_kernels.gpu.paged_decode_attention import paged_decode_attention


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """Query ``[B,1,N,H]`` against a cache ``[B,S,K,H]``; ragged: lengths spread over (0, S/2), mean S/4."""

    B: int
    S: int
    N: int
    K: int
    H: int = 128
    ragged: bool = False

    @property
    def name(self) -> str:
        return f"B{self.B} S{self.S} N{self.N} K{self.K} H{self.H}" + (" ragged" if self.ragged else "")

    def lengths(self) -> np.ndarray:
        if not self.ragged:
            return np.full((self.B,), self.S, np.int32)
        lengths = np.linspace(self.S // 32, self.S // 2 - self.S // 32, self.B).astype(np.int32)
        return np.random.default_rng(0).permutation(lengths)

    def kv_bytes(self, itemsize: int = 2) -> int:
        """Bytes of K and V up to each row's length."""
        return int(self.lengths().sum()) * self.K * self.H * 2 * itemsize


FULL_SHAPES = [
    DecodeShape(8, 8192, 32, 8),
    DecodeShape(1, 32768, 32, 8),
    DecodeShape(32, 4096, 32, 8),
    DecodeShape(16, 8192, 64, 8),
    DecodeShape(16, 16384, 32, 8, ragged=True),
]
QUICK_SHAPES = [DecodeShape(2, 256, 4, 2, H=64, ragged=True)]

TRITON = "gqa_jax pallas_triton"
# Our kernel on the cache quantized to these dtypes.
QUANTIZED = {"gqa_jax pallas_triton int8 cache": jnp.int8, "gqa_jax pallas_triton fp8 cache": jnp.float8_e4m3fn}
# Our paged kernel on the cache in pages of these sizes (ragged shapes): (page size, quantized dtype or None).
PAGED = {"gqa_jax paged p64": (64, None), "gqa_jax paged p128": (128, None),
         "gqa_jax paged p64 int8 cache": (64, jnp.int8)}
OURS = (TRITON, *QUANTIZED, *PAGED)
# --quick runs our kernel in interpret mode: a correctness smoke run, not a speed; no ratio is printed for it.
INTERPRETED = "gqa_jax pallas_triton (interpret mode)"
CUDNN_CAPACITY = "jax.nn cudnn (capacity lengths)"


def _ours(shape: DecodeShape, interpret: bool) -> Callable:
    if interpret:
        from pallas_kernels.gpu import decode_attention

        return lambda q, k, v, n: decode_attention(q, k, v, n, interpret=True)
    return lambda q, k, v, n: gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=n,
                                                            implementation="pallas_triton")


def _quantized(dtype):
    """Our kernel on a quantized cache: ``(fn, prepare)``; ``prepare`` quantizes the inputs once, untimed."""
    def build(shape: DecodeShape, interpret: bool):
        if interpret:
            raise ValueError("compiled GPU kernels only")

        def fn(q, k, v, k_scale, v_scale, n):
            return gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=n, key_scale=k_scale,
                                                 value_scale=v_scale, implementation="pallas_triton")

        @jax.jit
        def prepare(q, k, v, n):
            return q, *quantize_cache(k, v, dtype), n

        return fn, prepare
    return build


def quantize_cache(k, v, dtype) -> tuple:
    """``(k, v, k_scale, v_scale)``: the cache ``k, v [B, S, K, H]`` quantized to ``dtype`` (`gqa_jax.quantization`)."""
    (k, k_scale), (v, v_scale) = quantize(k, dtype), quantize(v, dtype)
    return k, v, k_scale, v_scale


def to_pages(page_size: int, key, *caches) -> tuple:
    """``(*pools, table)``: each cache ``[B, S, ...]`` (values ``[B, S, K, H]`` or scales ``[B, S, K]``) as a pool
    ``[B * S / page_size, page_size, ...]``, and one page table ``[B, S / page_size]`` for all of them that puts
    each row's pages at random places in the pool (``S`` a multiple of ``page_size``)."""
    B, S = caches[0].shape[:2]
    table = jax.random.permutation(key, B * S // page_size).reshape(B, S // page_size).astype(jnp.int32)
    pool = lambda x: jnp.zeros_like(x).reshape(-1, page_size, *x.shape[2:]).at[table.reshape(-1)].set(  # noqa: E731
        x.reshape(-1, page_size, *x.shape[2:]))
    return *(pool(x) for x in caches), table


def paged_quantized(q, k_pages, v_pages, k_scale_pages, v_scale_pages, table, n, **options):
    """`paged_decode_attention` on a quantized pool, its arguments in the order `to_pages` gives them."""
    return paged_decode_attention(q, k_pages, v_pages, table, n, key_scale_pages=k_scale_pages,
                                  value_scale_pages=v_scale_pages, **options)


def _paged(page_size: int, dtype=None):
    """Our paged kernel: ``(fn, prepare)``; ``prepare`` quantizes the cache to ``dtype`` (None: bf16 as it is) and
    lays it out in pages once, untimed."""
    def build(shape: DecodeShape, interpret: bool):
        if interpret:
            raise ValueError("compiled GPU kernels only")
        if not shape.ragged:
            raise ValueError("only for ragged shapes")

        @jax.jit
        def prepare(q, k, v, n):
            caches = (k, v) if dtype is None else quantize_cache(k, v, dtype)
            return q, *to_pages(page_size, jax.random.key(1), *caches), n

        return (paged_decode_attention if dtype is None else paged_quantized), prepare
    return build


def _jax_nn(implementation: str, capacity: bool = False):
    def build(shape: DecodeShape, interpret: bool) -> Callable:
        if capacity and not shape.ragged:
            raise ValueError("only for ragged shapes")
        return lambda q, k, v, n: jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=None if capacity else n, implementation=implementation)
    return build


def _jax_pallas_decode_op(shape: DecodeShape, interpret: bool) -> Callable:
    from jax.experimental.pallas.ops.gpu import decode_attention as op

    return lambda q, k, v, n: op.gqa(q[:, 0], k, v, kv_seq_len=n, sm_scale=1 / math.sqrt(shape.H),
                                     interpret=interpret)[:, None]


def _tokamax(shape: DecodeShape, interpret: bool) -> Callable:
    import tokamax
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; keep it off our command line
    return lambda q, k, v, n: tokamax.dot_product_attention(q, k, v, key_value_seq_lengths=n)


def implementations(quick: bool) -> dict[str, Callable]:
    """Name -> builder(shape, interpret) of every implementation to time."""
    impls = {INTERPRETED if quick else TRITON: _ours, "jax.nn xla": _jax_nn("xla")}
    if not quick:
        impls.update({name: _quantized(dtype) for name, dtype in QUANTIZED.items()})
        impls.update({name: _paged(size, dtype) for name, (size, dtype) in PAGED.items()})
        impls["jax.nn cudnn"] = _jax_nn("cudnn")
        impls[CUDNN_CAPACITY] = _jax_nn("cudnn", capacity=True)
        impls["jax pallas decode op"] = _jax_pallas_decode_op
        impls["tokamax"] = _tokamax
    return impls


def make_inputs(shape: DecodeShape, key) -> tuple:
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (shape.B, 1, shape.N, shape.H), jnp.bfloat16)
    k = jax.random.normal(kk, (shape.B, shape.S, shape.K, shape.H), jnp.bfloat16)
    v = jax.random.normal(kv, (shape.B, shape.S, shape.K, shape.H), jnp.bfloat16)
    return q, k, v, jnp.asarray(shape.lengths())


def copy_bandwidth(time_fn, num_elements: int = 1 << 29) -> float:
    """GB/s of ``x + 1`` over a bf16 array (1 GiB by default; bytes read plus written)."""
    x = jax.random.normal(jax.random.key(1), (num_elements,), jnp.bfloat16)
    seconds = time_fn(jax.jit(lambda x: x + 1), [(x,)])
    return 2 * x.nbytes / seconds / 1e9
