"""Pallas attention kernels for NVIDIA GPUs (Triton lowering)."""

from pallas_kernels.gpu.decode_attention import DecodeBlockSizes, decode_attention
from pallas_kernels.gpu.flash_attention import BlockSizes, flash_attention

__all__ = ["BlockSizes", "DecodeBlockSizes", "decode_attention", "flash_attention"]
