"""Checks and times the Mosaic-GPU flash backward (`pallas_kernels.gpu.flash_attention_mgpu_backward`) on a Hopper GPU.

Run on the GPU machine (tokamax from the carried wheels, optional):

    bash .peers/install.sh && export PYTHONPATH=.peers/site:.
    PYTHONUNBUFFERED=1 python3 tools/mgpu_flash_bwd_check.py [--cases all|none|NAME,...]
        [--bench all|none|NAME,...] [--variants 64.64.64.64.3,64.64.64.128.2-t] [--no-peers] [--case-timeout S]

1. Correctness: dq, dk, dv of ``sum(out * do)`` through `flash_attention`
   (its default backward) against the float32 XLA reference of
   ``tools/mgpu_flash_check.py`` (its own masks): relative L2 error per
   gradient; dq of rows that see no key and dk, dv of keys no query sees
   exactly zero; no NaN.
2. Timing, bf16, the bench shapes causal and full: forward+backward of ours
   with the Mosaic backward (default tiles through the ``custom_vjp``, then
   each tile variant called directly), ours with the Triton backward, cuDNN
   (``jax.nn.dot_product_attention(implementation="cudnn")``) and tokamax
   Mosaic GPU, in one process on the same inputs; median over samples of many
   back-to-back calls with one sync (`tools.mgpu_flash_check.time_fn`). FLOPs
   ``3.5 * 4*B*S*S*N*H``, halved when causal (DESIGN.md). Each row's
   gradients are compared with cuDNN's (worst relative L2 of dq, dk, dv).

Prints two short tables last.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gpu import flash_attention_mgpu as mgpu
from pallas_kernels.gpu import flash_attention_mgpu_backward as mgpu_bwd
from pallas_kernels.rules import Rules
from tools.mgpu_flash_check import BENCH, BF16, FP16, _kwargs, reference, segment_ids, time_fn

# name, (B, T, S, N, K, H), dtype, rules keywords (lengths/offsets as lists; ``segments=n``: random segment ids,
# `tools.mgpu_flash_check.segment_ids`)
GRAD_CASES = [
    ("causal_kvlen_g4_h128", (2, 200, 333, 8, 2, 128), BF16, dict(is_causal=True, key_value_seq_lengths=[333, 250])),
    ("full_g4_h64", (2, 256, 256, 8, 2, 64), BF16, {}),
    ("causal_fp16_h128", (1, 512, 512, 8, 2, 128), FP16, dict(is_causal=True)),
    ("causal_off_len_g8", (2, 200, 333, 8, 1, 128), BF16,
     dict(is_causal=True, query_offset=[5, 130], key_value_seq_lengths=[333, 100], query_seq_lengths=[200, 77])),
    ("dead_rows", (2, 256, 256, 4, 1, 128), BF16,
     dict(is_causal=True, key_value_seq_lengths=[0, 256], query_seq_lengths=[256, 100])),
    ("window_causal", (1, 1024, 1024, 8, 2, 128), BF16, dict(is_causal=True, local_window_size=(128, 0))),
    ("window_sym_h64", (1, 300, 300, 4, 4, 64), BF16, dict(local_window_size=(32, 16))),
    ("softcap_causal", (1, 512, 512, 8, 2, 128), BF16, dict(is_causal=True, logits_soft_cap=20.0, scale=0.3)),
    ("softcap_full_fp16_h64", (2, 130, 70, 4, 2, 64), FP16, dict(logits_soft_cap=5.0)),
    ("chunk_T64_S1000", (2, 64, 1000, 8, 2, 128), BF16, dict(is_causal=True, key_value_seq_lengths=[1000, 400])),
    ("long_causal_g8", (1, 2048, 2048, 16, 2, 128), BF16, dict(is_causal=True)),
    ("decode_T1", (2, 1, 777, 8, 1, 128), BF16, dict(is_causal=True)),
    ("h256_causal_triton_fallback", (1, 256, 256, 4, 2, 256), BF16, dict(is_causal=True)),
    ("segments_causal_h128", (2, 300, 300, 8, 2, 128), BF16,
     dict(is_causal=True, segments=4, key_value_seq_lengths=[300, 211])),
    ("segments_full_TneS_h64", (2, 200, 333, 8, 2, 64), BF16, dict(segments=3, query_seq_lengths=[200, 150])),
    ("segments_unsorted_window_softcap", (1, 256, 256, 4, 2, 128), BF16,
     dict(is_causal=True, local_window_size=(64, 0), segments=3, segments_sorted=False, logits_soft_cap=20.0)),
]
TOLERANCE = {BF16: 3e-2, FP16: 1e-2}
DEFAULT_VARIANTS = "64.64.64.64.3,64.64.64.128.2"


def check_grad(name, dims, dtype, kw, key: int):
    B, T, S, N, K, H = dims
    rng = np.random.default_rng(key)
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32))
                   for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)))
    kw = _kwargs(segment_ids(kw, rng, B, T, S))
    args = tuple(x.astype(dtype) for x in (q, k, v))
    which = mgpu.choose_backward(*args, Rules.create(args[0], args[1], **kw))

    def ours(q, k, v):
        return jnp.sum(mgpu.flash_attention(q, k, v, **kw).astype(jnp.float32) * do)

    def ref(q, k, v):
        return jnp.sum(reference(q, k, v, **kw)[0] * do)

    grads = jax.block_until_ready(jax.jit(jax.grad(ours, (0, 1, 2)))(*args))
    f32 = tuple(x.astype(jnp.float32) for x in args)
    ref_grads = jax.jit(jax.grad(ref, (0, 1, 2)))(*f32)
    ref_out = np.asarray(jax.jit(lambda q, k, v: reference(q, k, v, **kw)[0])(*f32))
    # Structural zeros: dq of rows that see no key (output row zero), dk and dv of keys no query sees (dv row zero;
    # dO is random, so a dv row is zero only when no probability reaches it).
    dead_q = np.all(ref_out == 0.0, axis=-1)  # [B, T, N]
    unseen_k = np.all(np.asarray(ref_grads[2]) == 0.0, axis=-1)  # [B, S, K]
    rels, nan, zeros_ok = [], False, True
    for g, r, zero in zip(grads, ref_grads, (dead_q, unseen_k, unseen_k)):
        g, r = np.asarray(g, np.float32), np.asarray(r)
        nan = nan or bool(np.isnan(g).any())
        rels.append(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)))
        zeros_ok = zeros_ok and bool(np.all(g[zero] == 0.0))
    ok = (not nan) and max(rels) <= TOLERANCE[dtype] and zeros_ok
    return dict(name=name, ok=ok, backward=which, rels=rels, zeros_ok=zeros_ok, nan=nan)


def _variant(spec: str) -> mgpu_bwd.MosaicBackwardBlockSizes:
    """``BQDKV.BKVDKV.BQDQ.BKVDQ.STAGES[-t]``: the `MosaicBackwardBlockSizes` fields; ``-t`` = tiles first."""
    sizes, _, flags = spec.partition("-")
    return mgpu_bwd.MosaicBackwardBlockSizes(*(int(x) for x in sizes.split(".")), tiles_first="t" in flags)


def fwd_bwd_functions(causal: bool, variants, peers: bool):
    """``name -> jitted (q, k, v, do) -> (dq, dk, dv)`` of each implementation (forward included)."""

    def through_vjp(attention):
        def fn(q, k, v, do):
            _, vjp = jax.vjp(attention, q, k, v)
            return vjp(do)
        return jax.jit(fn)

    def core(backward):
        def attention(q, k, v):
            return mgpu.flash_attention_core(q, k, v, Rules.create(q, k, is_causal=causal), backward=backward)
        return attention

    fns = {"ours mosaic bwd": through_vjp(core("mosaic"))}
    if peers:
        fns["ours triton bwd"] = through_vjp(core("triton"))
    for spec in variants:
        blocks = _variant(spec)

        def direct(q, k, v, do, blocks=blocks):
            rules = Rules.create(q, k, is_causal=causal)
            out, lse = mgpu.forward(q, k, v, rules)
            return mgpu_bwd.backward(q, k, v, out, lse, do, rules, blocks)

        fns[f"ours mosaic {spec}"] = jax.jit(direct)
    if peers:
        fns["cudnn"] = through_vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                               implementation="cudnn"))
        try:
            import tokamax
            from absl import flags

            flags.FLAGS.mark_as_parsed()
            fns["tokamax mosaic"] = through_vjp(lambda q, k, v: tokamax.dot_product_attention(
                q, k, v, is_causal=causal, implementation="mosaic"))
        except ImportError as e:
            print(f"tokamax missing: {e}", flush=True)
    return fns


def bench(names, variants, peers):
    rows = []
    for name, (B, S, N, K, H) in BENCH:
        if names != "all" and name not in names.split(","):
            continue
        kq, kk, kv, ko = jax.random.split(jax.random.key(1), 4)
        q = jax.random.normal(kq, (B, S, N, H), jnp.float32).astype(BF16)
        k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(BF16)
        v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(BF16)
        do = jax.random.normal(ko, (B, S, N, H), jnp.float32).astype(BF16)
        for causal in (True, False):
            flops = 3.5 * 4 * B * S * S * N * H / (2 if causal else 1)
            results, times = {}, {}
            for impl, fn in fwd_bwd_functions(causal, variants, peers).items():
                try:
                    times[impl] = time_fn(fn, (q, k, v, do), flops)
                    results[impl] = [np.asarray(g, np.float32) for g in fn(q, k, v, do)]
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a row, not a stop
                    times[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            base = results.get("cudnn")
            for impl, t in times.items():
                if isinstance(t, str):
                    row = (name, "causal" if causal else "full", impl, "  error", "", t)
                else:
                    err = "" if base is None or impl not in results else "{:.1e}".format(max(
                        float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(results[impl], base)))
                    row = (name, "causal" if causal else "full", impl, f"{flops / t / 1e12:7.1f}", f"{t * 1e3:8.3f}",
                           err)
                rows.append(row)
                print(*row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="all", help="all, none, or comma-separated case names")
    parser.add_argument("--bench", default="all", help="all, none, or comma-separated bench shape names")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="backward tiles block_q_dkv.block_kv_dkv.block_q_dq.block_kv_dq.stages[-t], comma-separated")
    parser.add_argument("--no-peers", action="store_true", help="time only ours")
    parser.add_argument("--case-timeout", type=float, default=0.0, help="seconds; a case past it is a HANG, exit 3")
    args = parser.parse_args()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, device {dev.device_kind} (cc {getattr(dev, 'compute_capability', '?')})", flush=True)

    results = []
    if args.cases != "none":
        for i, (name, dims, dtype, kw) in enumerate(GRAD_CASES):
            if args.cases != "all" and name not in args.cases.split(","):
                continue
            timer = None
            if args.case_timeout:
                def hang(name=name):
                    print(f"HANG {name}: no result in {args.case_timeout:.0f}s", flush=True)
                    os._exit(3)
                timer = threading.Timer(args.case_timeout, hang)
                timer.start()
            t0 = time.perf_counter()
            try:
                r = check_grad(name, dims, dtype, kw, 200 + i)
            except Exception as e:  # noqa: BLE001 - report and go on
                r = dict(name=name, ok=False, backward="?", rels=[float("nan")] * 3, zeros_ok=False, nan=False,
                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            if timer is not None:
                timer.cancel()
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(r, flush=True)

    rows = []
    if args.bench != "none":
        rows = bench(args.bench, [v for v in args.variants.split(",") if v], not args.no_peers)

    print(f"\n== gradients vs float32 reference (jax {jax.__version__}, {dev.device_kind}) ==")
    for r in results:
        rels = ",".join(f"{x:.1e}" for x in r["rels"])
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['name']:30s} bwd={r['backward']:6s} dq,dk,dv rel={rels} "
              f"zeros_ok={r['zeros_ok']} nan={r['nan']} {r['seconds']}s {r.get('error', '')}")
    if results:
        print(f"passed {sum(r['ok'] for r in results)}/{len(results)}")
    if rows:
        print(f"\n== forward+backward bf16 TFLOP/s (jax {jax.__version__}, {dev.device_kind}) ==")
        print(f"{'shape':24s} {'mask':6s} {'impl':24s} {'TFLOP/s':>7s} {'ms':>8s} grad_err_vs_cudnn")
        for row in rows:
            print(f"{row[0]:24s} {row[1]:6s} {row[2]:24s} {row[3]:>7s} {row[4]:>8s} {row[5]}")


if __name__ == "__main__":
    main()
