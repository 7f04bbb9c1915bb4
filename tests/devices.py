"""Which accelerator the tests run on, for the compiled cases that skip without one."""

from __future__ import annotations

import jax


def has_gpu() -> bool:
    """Whether JAX sees an NVIDIA GPU (compiled Triton kernels can run)."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def on_hopper() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (compute capability 9.x: Mosaic GPU can run)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")
