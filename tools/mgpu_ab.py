"""A/B of the Mosaic-GPU flash forward against an earlier revision of it, in one process on a Hopper GPU.

Run on the GPU machine (tokamax optional: ``bash .peers/install.sh && export PYTHONPATH=.peers/site:.``):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tools/mgpu_ab.py --rev REV [--shapes NAME,...] [--reps 13] [--no-peers]

Loads ``pallas_kernels/gpu/flash_attention_mgpu.py`` as it was at git revision
``REV`` beside the working tree's (its imports resolve to the working tree's
other modules, so it suits revisions that changed this file's kernel), and for
each bench shape (`tools/mgpu_flash_check.py`'s ``BENCH``), causal and full,
compiles both ahead of time, prints how far their outputs differ, and times
them with tokamax's Mosaic kernel in interleaved repetitions
(`gqa_jax.bench.timing.time_interleaved`): the clock drift between runs, up to
9% on the H100, falls on all alike. FLOPs ``4*B*T*S*N*H``, halved when causal.

Prints one table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

from gqa_jax.bench.timing import environment, time_interleaved
from pallas_kernels.gpu import flash_attention_mgpu as mgpu

from mgpu_flash_check import BENCH, bench_inputs, tokamax_forward  # this script's folder is on sys.path

KERNEL = "pallas_kernels/gpu/flash_attention_mgpu.py"


def load_revision(rev: str):
    """The kernel module as it was at git revision ``rev`` (any name git knows), imported under its own name."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout

    commit = git("rev-parse", "--short", f"{rev}^{{commit}}").strip()
    name = f"flash_attention_mgpu_at_{commit}"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{name}.py")
        with open(path, "w") as f:
            f.write(git("show", f"{commit}:{KERNEL}"))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", required=True, help="git revision of the kernel to compare against")
    parser.add_argument("--shapes", default="all", help="all, or comma-separated BENCH names")
    parser.add_argument("--reps", type=int, default=13)
    parser.add_argument("--no-peers", action="store_true", help="leave tokamax out")
    args = parser.parse_args()
    print(environment(), flush=True)
    before = load_revision(args.rev)
    kernels = {f"ours@{before.__name__.rsplit('_', 1)[1]}": before, "ours": mgpu}
    rows = []
    for name, (B, S, N, K, H) in BENCH:
        if args.shapes != "all" and name not in args.shapes.split(","):
            continue
        q, k, v = bench_inputs(B, S, N, K, H)
        for causal in (True, False):
            fns = {label: jax.jit(lambda q, k, v, m=module, c=causal: m.flash_attention(q, k, v, is_causal=c))
                   for label, module in kernels.items()}
            tokamax = None if args.no_peers else tokamax_forward(causal)
            if tokamax is not None:
                fns["tokamax mosaic"] = tokamax
            fns = {label: fn.lower(q, k, v).compile() for label, fn in fns.items()}
            outs = {label: np.asarray(fn(q, k, v), np.float32) for label, fn in fns.items()}
            ref = outs["ours"]
            seconds = time_interleaved(fns, [(q, k, v)], reps=args.reps)
            flops = 4 * B * S * S * N * H / (2 if causal else 1)
            for label, t in seconds.items():
                diff = float(np.abs(outs[label] - ref).max())
                rows.append((name, "causal" if causal else "full", label, flops / t / 1e12, t * 1e3, diff))
                print(*rows[-1], flush=True)
    print(f"\n== forward bf16 TFLOP/s, interleaved (jax {jax.__version__}, {jax.devices()[0].device_kind}) ==")
    print(f"{'shape':24s} {'mask':6s} {'impl':20s} {'TFLOP/s':>8s} {'ms':>8s} max|diff| vs ours")
    for shape, mask, label, tflops, ms, diff in rows:
        print(f"{shape:24s} {mask:6s} {label:20s} {tflops:8.1f} {ms:8.3f} {diff:.1e}")


if __name__ == "__main__":
    main()
