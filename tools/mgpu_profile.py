"""Where the Mosaic-GPU flash forward spends its time: in-kernel phase profiles on a Hopper GPU.

Run on the GPU machine:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tools/mgpu_profile.py [--shapes NAME,...] [--space 640]

For each bench shape (`tools/mgpu_flash_check.py`'s ``BENCH``), causal and
full, the forward kernel is built with Mosaic GPU's profiler on
(`pallas_kernels.gpu.mgpu_profile`) and run once; each consumer warpgroup's
time splits into the phases the kernel marks: ``prologue`` (query and first
key tile arrive, first turn), ``wait_turn`` (the tiles of the next products
ready and the other consumer's products issued: the ping-pong), ``qk``
(``Q K^T`` issued, with the previous tile's ``P V`` at head dims 64 and 128,
and ``Q K^T`` awaited), ``softmax``, ``pv`` (head dim 256: ``P V`` issued and
awaited, next K tile awaited; 64 and 128: ``P`` converted and the output
rescaled after ``P V``, whose wait itself counts as ``other``, and the last
tile's ``P V`` issued and awaited), ``epilogue`` (normalize, store),
``other`` (loop control).
Profiles use one CTA per work item (not the persistent grid, whose many items
per CTA would not fit the profiler's shared-memory buffer); the records cost
a few cycles each, so shares, not absolute times, are the result. CTA spans
(mean and max, thousands of cycles) show how evenly the work spreads.

Prints one table last.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile

import jax

from pallas_kernels.gpu import flash_attention_mgpu as mgpu
from pallas_kernels.gpu import mgpu_profile

from mgpu_flash_check import BENCH, bench_inputs  # this script's folder is on sys.path

PHASES = ("prologue", "wait_turn", "qk", "softmax", "pv", "epilogue", "other")


def profile(shape, causal: bool, space: int) -> dict:
    """`mgpu_profile.summarize` of one forward call at ``shape = (B, S, N, K, H)``."""
    B, S, N, K, H = shape
    q, k, v = bench_inputs(B, S, N, K, H)
    blocks = mgpu.MosaicBlockSizes.for_call(H, causal)
    blocks = mgpu.MosaicBlockSizes(blocks.block_q, blocks.block_kv, blocks.max_concurrent_steps, persistent=False)
    with tempfile.TemporaryDirectory() as directory:
        with mgpu_profile.recording(directory, space):
            jax.clear_caches()
            fn = jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, is_causal=causal, block_sizes=blocks))
            jax.block_until_ready(fn(q, k, v))
        jax.effects_barrier()  # the trace is written by a host callback
        traces = sorted(glob.glob(os.path.join(directory, "*.json")))
        if not traces:
            raise RuntimeError(f"no trace written into {directory}")
        return mgpu_profile.load(traces[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="all", help="all or comma-separated bench shape names")
    parser.add_argument("--space", type=int, default=640, help="phases recorded per warpgroup (16 bytes each)")
    args = parser.parse_args()
    dev = jax.devices()[0]
    rows = []
    for name, shape in BENCH:
        if args.shapes != "all" and name not in args.shapes.split(","):
            continue
        for causal in (True, False):
            mask = "causal" if causal else "full"
            try:
                summary = profile(shape, causal, args.space)
            except Exception as e:  # noqa: BLE001 - one shape that fails is a row, not a stop
                rows.append(f"| {name} {mask} | error: {type(e).__name__}: {str(e).splitlines()[0][:90]} |")
                print(rows[-1], flush=True)
                continue
            mean, top = summary["cta_kcycles"]
            for wg, phases in summary["phases"].items():
                if not any(p in phases for p in PHASES[:-1]):
                    continue  # the producer warpgroup marks no phases
                shares = " | ".join(f"{100 * phases.get(p, 0.0):4.1f}" for p in PHASES)
                rows.append(f"| {name} {mask} | {wg} | {shares} | {summary['ctas']} | {mean:.0f} / {top:.0f} |")
                print(rows[-1], flush=True)
    print(f"\n== Mosaic-GPU forward phases, % of each consumer warpgroup's span (jax {jax.__version__}, "
          f"{dev.device_kind}) ==")
    print("| shape | wg | " + " | ".join(PHASES) + " | CTAs | CTA kcycles mean / max |")
    print("|---|---|" + "---|" * len(PHASES) + "---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
