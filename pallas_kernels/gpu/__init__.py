"""Pallas attention kernels for NVIDIA GPUs (Triton lowering).

Each kernel has a public wrapper (the keywords of `gqa_jax.dot_product_attention`,
validated by `pallas_kernels.rules.Rules.create`) and a ``*_core`` that takes
checked tensors and a `Rules` unchanged, as dispatch calls it.
"""

from pallas_kernels.gpu.decode_attention import DecodeBlockSizes, decode_attention, decode_attention_core
from pallas_kernels.gpu.flash_attention import BlockSizes, flash_attention, flash_attention_core, flash_backward
from pallas_kernels.gpu.paged_decode_attention import paged_decode_attention

__all__ = [
    "BlockSizes",
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_core",
    "flash_attention",
    "flash_attention_core",
    "flash_backward",
    "paged_decode_attention",
]
