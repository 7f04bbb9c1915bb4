"""Sweeps the Triton flash kernel's tiles and launch parameters on an NVIDIA GPU.

Run on the GPU machine: ``PYTHONPATH=. python tools/gpu_flash_sweep.py [--bwd]``.
Prints TFLOP/s per configuration next to cuDNN on the same inputs; the winners
become `BlockSizes.for_head_dim`. Figures that are reported come from
``python -m gqa_jax.bench``, not from this script.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax

from gqa_jax.bench import prefill
from gqa_jax.bench.timing import environment, time_fn
from pallas_kernels.gpu import BlockSizes, flash_attention

SHAPES = [prefill.PrefillShape(2, 4096, 32, 8, 128, True), prefill.PrefillShape(2, 4096, 32, 8, 128, False),
          prefill.PrefillShape(4, 2048, 16, 2, 64, True)]
FWD = [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
       for bq, bk, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                            (128, 32, 4, 4), (64, 128, 4, 3), (128, 64, 8, 4)]]
BWD = [dict(block_q_dkv=a, block_k_dkv=b, block_q_dq=c, block_k_dq=d, num_warps_bwd=w, num_stages_bwd=s)
       for a, b, c, d, w, s in [(64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 8, 2), (64, 64, 64, 64, 4, 2),
                                (64, 128, 64, 128, 8, 3), (32, 64, 64, 32, 4, 3), (64, 128, 128, 64, 4, 2)]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bwd", action="store_true", help="sweep the backward tiles (forward+backward timed)")
    parser.add_argument("--shape", default="", help="only shapes whose name contains this")
    args = parser.parse_args()
    print(environment())
    rows = []
    for shape in [s for s in SHAPES if args.shape in s.name]:
        q, k, v, do = prefill.make_inputs(shape, jax.random.key(0))
        mode = "fwd+bwd" if args.bwd else "fwd"
        cudnn = prefill.timed_functions(prefill._jax_nn("cudnn")(shape, False))[mode]
        t = time_fn(cudnn[0], [cudnn[1](q, k, v, do)], reps=5)
        rows.append((shape.name, mode, "cudnn", shape.flops(mode) / t / 1e12))
        base = BlockSizes.for_head_dim(shape.H)
        for cfg in (BWD if args.bwd else FWD):
            blocks = dataclasses.replace(base, **cfg)
            fn = lambda q, k, v, blocks=blocks: flash_attention(q, k, v, is_causal=shape.causal, block_sizes=blocks)
            timed = prefill.timed_functions(fn)[mode]
            try:
                t = time_fn(timed[0], [timed[1](q, k, v, do)], reps=5)
                rows.append((shape.name, mode, str(cfg), shape.flops(mode) / t / 1e12))
            except Exception as e:  # a configuration that does not compile (registers, shared memory)
                rows.append((shape.name, mode, str(cfg), f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
            print(rows[-1], flush=True)
    print()
    for name, mode, cfg, value in rows:
        print(f"{name:32s} {mode:8s} {value if isinstance(value, str) else f'{value:7.1f}'}  {cfg}")


if __name__ == "__main__":
    main()
