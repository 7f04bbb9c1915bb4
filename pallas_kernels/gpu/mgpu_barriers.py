"""Named hardware barriers (PTX ``bar.arrive`` / ``bar.sync``) for the Mosaic-GPU kernels.

A named barrier completes when ``num_threads`` threads have reached it:
``arrive`` counts the calling threads and goes on, ``sync`` counts them and
waits. Cheaper than an mbarrier (`plgpu.Barrier`) for signals between
warpgroups of one CTA, which is what the flash kernels' ping-pong schedule and
"slot consumed" signals are. Mosaic GPU itself uses ids 0 (CTA barrier) and
1..3 (one per warpgroup), so kernels take ids from `FIRST_FREE_ID` up to
`NUM_IDS - 1`.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm

FIRST_FREE_ID = 4
NUM_IDS = 16


def arrive(barrier_id, num_threads: int) -> None:
    """``bar.arrive``: the calling threads count towards barrier ``barrier_id`` (int or traced int32 scalar)."""
    _bar("arrive", barrier_id, num_threads)


def sync(barrier_id, num_threads: int) -> None:
    """``bar.sync``: the calling threads count towards barrier ``barrier_id`` and wait for it to complete."""
    _bar("sync", barrier_id, num_threads)


def _bar(operation: str, barrier_id, num_threads: int) -> None:
    if num_threads % 32:
        raise ValueError(f"num_threads={num_threads} must be a multiple of the warp size 32")
    if isinstance(barrier_id, int):
        if not FIRST_FREE_ID <= barrier_id < NUM_IDS:
            raise ValueError(f"barrier_id={barrier_id} must be in [{FIRST_FREE_ID}, {NUM_IDS})")

        @plgpu.inline_mgpu()
        def static_bar(_):
            llvm.inline_asm(_void(), [], f"bar.{operation} {barrier_id}, {num_threads};", "", has_side_effects=True)

        static_bar()
        return

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
    def dynamic_bar(_, index):
        llvm.inline_asm(_void(), [index.registers[()]], f"bar.{operation} $0, {num_threads};", "r",
                        has_side_effects=True)

    dynamic_bar(jax.numpy.asarray(barrier_id, jax.numpy.int32))


def _void():
    return ir.Type.parse("!llvm.void")  # inside the kernel's MLIR context
