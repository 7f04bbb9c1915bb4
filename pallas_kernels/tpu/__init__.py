"""Pallas kernels for TPUs (Mosaic TPU): flash attention (forward and backward), decode attention and
decode attention over a paged KV cache.

All take BTNH arrays with grouped K/V heads and the keywords of their GPU
twins in `pallas_kernels.gpu`; ``interpret=True`` runs them in the Pallas TPU
interpret mode on any backend (how they are tested on CPUs).
"""

from pallas_kernels.tpu.decode_attention import DecodeBlockSizes, decode_attention, decode_attention_core
from pallas_kernels.tpu.flash_attention import BlockSizes, flash_attention, flash_attention_core, flash_backward
from pallas_kernels.tpu.paged_decode_attention import PagedDecodeBlockSizes, paged_decode_attention

__all__ = [
    "BlockSizes",
    "DecodeBlockSizes",
    "PagedDecodeBlockSizes",
    "decode_attention",
    "decode_attention_core",
    "flash_attention",
    "flash_attention_core",
    "flash_backward",
    "paged_decode_attention",
]
