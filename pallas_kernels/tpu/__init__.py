"""Pallas kernels for TPUs (Mosaic TPU): flash attention (forward and backward) and decode attention.

Both take BTNH arrays with grouped K/V heads and the keywords of their GPU
twins in `pallas_kernels.gpu`; ``interpret=True`` runs them in the Pallas TPU
interpret mode on any backend (how they are tested on CPUs).
"""

from pallas_kernels.tpu.decode_attention import DecodeBlockSizes, decode_attention, decode_attention_core
from pallas_kernels.tpu.flash_attention import BlockSizes, flash_attention, flash_attention_core, flash_backward

__all__ = [
    "BlockSizes",
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_core",
    "flash_attention",
    "flash_attention_core",
    "flash_backward",
]
