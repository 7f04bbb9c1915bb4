"""Checks and times the Mosaic-GPU flash forward (`pallas_kernels.gpu.flash_attention_mgpu`) on a Hopper GPU.

Run on the GPU machine:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tools/mgpu_flash_check.py [--cases all|none|NAME,...]
        [--bench all|none|NAME,...] [--variants 64x128x2,64x64x3] [--no-peers]

1. Correctness: each case against a float32 XLA reference written here (its own
   masks, not `Rules.mask`): relative L2 error of the output, max error of the
   log-sum-exp (`return_residuals`) on live rows, dead rows exactly zero / ``-inf``, no NaN.
2. Timing: the bench shapes (bf16, causal and full), each block-size variant
   of ours next to ``jax.nn.dot_product_attention(implementation="cudnn")`` and
   the Triton kernel (`pallas_kernels.gpu.flash_attention`),
   in the same process on the same inputs, each compiled ahead of time: medians of
   interleaved repetitions of many back-to-back calls with one sync each
   (`gqa_jax.bench.timing.time_interleaved`). FLOPs ``4*B*T*S*N*H``, halved when causal.

Prints two short tables last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.bench.timing import time_interleaved
from pallas_kernels.gpu import flash_attention_mgpu as mgpu
from pallas_kernels.gpu.flash_attention import flash_attention as triton_flash
from pallas_kernels.numerics import DEAD_LSE

LOG2E = math.log2(math.e)
BF16, FP16 = jnp.bfloat16, jnp.float16

# name, (B, T, S, N, K, H), dtype, rules keywords (lengths/offsets as lists; ``segments=n``: random segment ids,
# `segment_ids`), blocks (bq, bkv, stages) or None
CASES = [
    ("full_g4_h128", (2, 256, 256, 8, 2, 128), BF16, {}, None),
    ("causal_g4_h128", (2, 256, 256, 8, 2, 128), BF16, dict(is_causal=True), None),
    ("causal_TneS_g1_h64", (2, 128, 384, 4, 4, 64), BF16, dict(is_causal=True), None),
    ("causal_off_len_g8", (2, 200, 333, 8, 1, 128), BF16,
     dict(is_causal=True, query_offset=[5, 130], key_value_seq_lengths=[333, 100], query_seq_lengths=[200, 77]), None),
    ("full_kvlen_fp16_h64", (2, 77, 1000, 8, 2, 64), FP16, dict(key_value_seq_lengths=[1000, 513]), None),
    ("full_qlen_TneS", (2, 100, 300, 8, 2, 128), BF16, dict(query_seq_lengths=[100, 50]), None),
    ("causal_fp16_h128", (1, 512, 512, 8, 2, 128), FP16, dict(is_causal=True), None),
    ("causal_len_h64_g8", (2, 333, 333, 8, 1, 64), BF16,
     dict(is_causal=True, key_value_seq_lengths=[333, 201], query_seq_lengths=[300, 333]), None),
    ("dead_rows", (2, 256, 256, 4, 1, 128), BF16,
     dict(is_causal=True, key_value_seq_lengths=[0, 256], query_seq_lengths=[256, 100]), None),
    ("decode_T1", (2, 1, 777, 8, 1, 128), BF16, dict(is_causal=True), None),
    ("chunk_T64_S1000", (2, 64, 1000, 8, 2, 128), BF16, dict(is_causal=True, key_value_seq_lengths=[1000, 400]), None),
    ("window_causal", (1, 1024, 1024, 8, 2, 128), BF16, dict(is_causal=True, local_window_size=(128, 0)), None),
    ("window_sym", (1, 300, 300, 4, 4, 128), BF16, dict(local_window_size=(32, 16)), None),
    ("softcap_causal", (1, 512, 512, 8, 2, 128), BF16, dict(is_causal=True, logits_soft_cap=20.0, scale=0.3), None),
    ("h256_causal", (1, 256, 256, 4, 2, 256), BF16, dict(is_causal=True), None),
    ("long_causal_g8", (1, 2048, 2048, 16, 2, 128), BF16, dict(is_causal=True), None),
    ("full_h64_bkv256", (1, 1024, 1024, 8, 2, 64), BF16, {}, (64, 256, 2)),
    ("full_bkv64_s3", (1, 1024, 1024, 8, 2, 128), BF16, {}, (64, 64, 3)),
    ("causal_bkv64_s4", (1, 1024, 1024, 8, 2, 128), BF16, dict(is_causal=True), (64, 64, 4)),
    # The persistent grid: more work items than SMs, so each CTA runs several (ring and ping-pong across items).
    ("persistent_full_len", (2, 2048, 2048, 16, 2, 128), BF16,
     dict(key_value_seq_lengths=[2048, 1500], query_seq_lengths=[2048, 1000]), (64, 128, 2, True)),
    ("persistent_causal_off", (4, 1024, 1024, 16, 4, 128), BF16,
     dict(is_causal=True, query_offset=[0, 0, 7, 0], key_value_seq_lengths=[1024, 0, 1024, 512]), (64, 128, 2, True)),
    ("persistent_h64_short", (4, 512, 300, 32, 4, 64), BF16, dict(key_value_seq_lengths=[300, 1, 257, 128]),
     (64, 128, 2, True)),
    # Values near bf16's max (issue 17): uniform in +-1e38; the float32 accumulator must not overflow.
    ("bf16_values_near_max", (1, 512, 4096, 4, 2, 128), BF16, dict(is_causal=True, value_scale=1e38), None),
    # Segment ids: packed sequences (sorted ids), ids in any order, T != S (rows whose segment has no key are dead),
    # and the persistent grid with more items than SMs (the key tiles' ids ride the K ring across items).
    ("segments_causal_h128", (2, 300, 300, 8, 2, 128), BF16,
     dict(is_causal=True, segments=4, key_value_seq_lengths=[300, 211]), None),
    ("segments_full_TneS_h64", (2, 200, 333, 8, 2, 64), BF16, dict(segments=3, query_seq_lengths=[200, 150]), None),
    ("segments_unsorted_window_softcap_fp16", (1, 256, 256, 4, 2, 128), FP16,
     dict(is_causal=True, local_window_size=(64, 0), segments=3, segments_sorted=False, logits_soft_cap=20.0), None),
    ("segments_h256_causal", (1, 256, 256, 4, 2, 256), BF16, dict(is_causal=True, segments=3), None),
    ("segments_persistent_full", (4, 512, 512, 16, 2, 128), BF16, dict(segments=5), (64, 128, 2, True)),
]

# Gradients: tools/mgpu_flash_bwd_check.py (a superset of the cases this tool had).

# name, (B, S, N, K, H)
BENCH = [
    ("B2_S4096_N32_K8_H128", (2, 4096, 32, 8, 128)),
    ("B1_S16384_N32_K8_H128", (1, 16384, 32, 8, 128)),
    ("B4_S2048_N16_K2_H64", (4, 2048, 16, 2, 64)),
    ("B8_S1024_N32_K4_H128", (8, 1024, 32, 4, 128)),
]


def reference(q, k, v, *, scale=None, is_causal=False, query_offset=None, query_seq_lengths=None,
              key_value_seq_lengths=None, local_window_size=None, logits_soft_cap=None, q_segment_ids=None,
              kv_segment_ids=None):
    """Float32 attention with its own masks: ``(out [B,T,N,H], lse2 [B,N,T])``; dead rows give 0 and DEAD_LSE."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    q_len = jnp.full((B,), T) if query_seq_lengths is None else jnp.asarray(query_seq_lengths)
    kv_len = jnp.full((B,), S) if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths)
    positional = is_causal or local_window_size is not None
    if query_offset is not None:
        offset = jnp.broadcast_to(jnp.asarray(query_offset), (B,))
    elif positional and T != S:
        offset = kv_len - q_len
    else:
        offset = jnp.zeros((B,), jnp.int32)
    qf = q.astype(jnp.float32).reshape(B, T, K, G, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32), precision="highest") * scale
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    t_idx = jnp.arange(T)[None, :, None]
    s_idx = jnp.arange(S)[None, None, :]
    q_pos = offset[:, None, None] + t_idx
    mask = (t_idx < q_len[:, None, None]) & (s_idx < kv_len[:, None, None])
    if is_causal:
        mask = mask & (s_idx <= q_pos)
    if local_window_size is not None:
        left, right = (local_window_size, local_window_size) if isinstance(local_window_size, int) \
            else local_window_size
        mask = mask & (s_idx >= q_pos - left) & (s_idx <= q_pos + right)
    if q_segment_ids is not None:
        mask = mask & (jnp.asarray(q_segment_ids)[:, :, None] == jnp.asarray(kv_segment_ids)[:, None, :])
    mask = mask[:, None, None]  # [B,1,1,T,S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    live = jnp.isfinite(m)
    p = jnp.where(mask, jnp.exp(s - jnp.where(live, m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    w = p / jnp.where(live, l, 1.0)
    out = jnp.einsum("bkgts,bskh->btkgh", w, v.astype(jnp.float32), precision="highest").reshape(B, T, N, -1)
    lse2 = jnp.where(live, (m + jnp.log(jnp.where(live, l, 1.0))) * LOG2E, DEAD_LSE)[..., 0]
    return out, lse2.reshape(B, N, T)


def _blocks(spec):
    return None if spec is None else mgpu.MosaicBlockSizes(*spec)


def parse_variant(text):
    """``BQxBKVxSTAGES[-p]``: the `MosaicBlockSizes` fields; ``-p`` = the persistent grid."""
    sizes, _, flags = text.partition("-")
    return tuple(int(x) for x in sizes.split("x")) + ("p" in flags,)


def _tokamax_mosaic():
    try:
        import tokamax
        from absl import flags
    except ImportError:
        return None
    flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; keep it off our command line
    return tokamax


def tokamax_forward(causal: bool):
    """tokamax's Mosaic-GPU attention as a jitted ``(q, k, v) -> out``, or None where tokamax is not installed."""
    tokamax = _tokamax_mosaic()
    if tokamax is None:
        return None
    return jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic"))


def bench_inputs(B, S, N, K, H, seed: int = 1):
    """Random bf16 ``q [B,S,N,H], k [B,S,K,H], v [B,S,K,H]`` for a bench shape."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(BF16)
                 for key, shape in ((kq, (B, S, N, H)), (kk, (B, S, K, H)), (kv, (B, S, K, H))))


def _kwargs(kw):
    return {name: (jnp.asarray(val, jnp.int32) if isinstance(val, list) else val) for name, val in kw.items()}


def segment_ids(kw, rng, B, T, S):
    """``kw`` with ``segments=n`` (and ``segments_sorted``, default True) replaced by random segment ids in ``[0, n)``.

    Sorted ids are packed sequences of random lengths; unsorted ones mix the segments. ``kv_segment_ids`` is
    ``q_segment_ids`` when ``T == S``, else drawn on its own (queries whose segment has no key see nothing).
    """
    kw = dict(kw)
    count, is_sorted = kw.pop("segments", None), kw.pop("segments_sorted", True)
    if count is None:
        return kw

    def draw(length):
        ids = rng.integers(0, count, (B, length)).astype(np.int32)
        return np.sort(ids, axis=1) if is_sorted else ids

    kw["q_segment_ids"] = jnp.asarray(draw(T))
    kw["kv_segment_ids"] = kw["q_segment_ids"] if T == S else jnp.asarray(draw(S))
    return kw


def check_case(name, dims, dtype, kw, blocks, key: int):
    B, T, S, N, K, H = dims
    rng = np.random.default_rng(key)
    kw = dict(kw)
    value_scale = kw.pop("value_scale", None)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
               for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    if value_scale is not None:
        v = jnp.asarray(rng.uniform(-value_scale, value_scale, (B, S, K, H)).astype(np.float32)).astype(dtype)
    kw = _kwargs(segment_ids(kw, rng, B, T, S))
    fn = jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, block_sizes=_blocks(blocks), return_residuals=True,
                                                      **kw))
    out, lse = jax.block_until_ready(fn(q, k, v))
    ref_out, ref_lse = jax.jit(lambda q, k, v: reference(q, k, v, **kw))(q, k, v)
    out32 = np.asarray(out, np.float64)  # float64 norms: values near 1e38 would overflow float32 squares
    ref_out, ref_lse, lse = np.asarray(ref_out, np.float64), np.asarray(ref_lse), np.asarray(lse)
    nan = bool(not np.isfinite(out32).all() or np.isnan(lse).any())  # any inf in the output counts
    rel = float(np.linalg.norm(out32 - ref_out) / max(np.linalg.norm(ref_out), 1e-30))
    dead = ref_lse >= 0.5 * DEAD_LSE
    live = ~dead
    ref_nat = ref_lse * math.log(2.0)  # the residual API gives the natural lse, -inf for dead rows
    lse_err = float(np.max(np.abs(lse[live] - ref_nat[live]) / np.maximum(1.0, np.abs(ref_nat[live])))) \
        if live.any() else 0.0
    dead_ok = bool(np.all(np.isneginf(lse[dead]))) and bool(np.all(out32.transpose(0, 2, 1, 3)[dead] == 0.0))
    tol = 1.5e-2 if dtype == BF16 else 5e-3
    ok = (not nan) and rel <= tol and lse_err <= 1e-2 and dead_ok
    return dict(name=name, ok=ok, rel=rel, lse_err=lse_err, dead=int(dead.sum()), dead_ok=dead_ok, nan=nan)


def bench(names, variants, peers, reps=7):
    """Forward TFLOP/s rows of the bench shapes: our block-size variants and the peers, each compiled ahead of time
    and timed in interleaved repetitions (`time_interleaved`), so clock drift falls on all alike."""
    rows = []
    for name, (B, S, N, K, H) in BENCH:
        if names != "all" and name not in names:
            continue
        q, k, v = bench_inputs(B, S, N, K, H)
        for causal in (True, False):
            mask = "causal" if causal else "full"
            flops = 4 * B * S * S * N * H / (2 if causal else 1)
            fns = {}
            for spec in variants:
                blocks = _blocks(spec)
                fns["mgpu " + "x".join(map(str, spec[:3])) + ("-p" if spec[3] else "")] = jax.jit(
                    lambda q, k, v, blocks=blocks, c=causal: mgpu.flash_attention(q, k, v, is_causal=c,
                                                                                  block_sizes=blocks))
            if peers:
                fns["cudnn"] = jax.jit(lambda q, k, v, c=causal: jax.nn.dot_product_attention(
                    q, k, v, is_causal=c, implementation="cudnn"))
                fns["triton"] = jax.jit(lambda q, k, v, c=causal: triton_flash(q, k, v, is_causal=c))
                tokamax = tokamax_forward(causal)
                if tokamax is not None:
                    fns["tokamax mosaic"] = tokamax
            compiled, outs = {}, {}
            for impl, fn in fns.items():
                try:
                    compiled[impl] = fn.lower(q, k, v).compile()
                    outs[impl] = np.asarray(compiled[impl](q, k, v), np.float32)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a row, not a stop
                    rows.append((name, mask, impl, "  error", f"{type(e).__name__}",
                                 str(e).splitlines()[0][:80] if str(e) else ""))
                    print(*rows[-1], flush=True)
            if not compiled:
                continue
            ref = next(iter(outs.values()))
            seconds = time_interleaved(compiled, [(q, k, v)], reps=reps, min_rep_seconds=0.03)
            for impl, t in seconds.items():
                err = float(np.linalg.norm(outs[impl] - ref) / np.linalg.norm(ref))
                rows.append((name, mask, impl, f"{flops / t / 1e12:7.1f}", f"{t * 1e3:8.3f}", f"{err:.1e}"))
                print(*rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="all", help="all, none, or comma-separated case names")
    parser.add_argument("--bench", default="all", help="all, none, or comma-separated bench shape names")
    parser.add_argument("--variants", default="64x128x2",
                        help="block_q x block_kv x stages[-p] (parse_variant), comma-separated")
    parser.add_argument("--no-peers", action="store_true", help="time only our variants")
    parser.add_argument("--progress", default="", help="JSON-lines file of finished cases: skipped on a rerun")
    parser.add_argument("--case-timeout", type=float, default=0.0, help="seconds; a case past it is a HANG, exit 3")
    args = parser.parse_args()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform}, cc "
          f"{getattr(dev, 'compute_capability', '?')})", flush=True)

    results = []
    done = {}
    if args.progress and os.path.exists(args.progress):
        with open(args.progress) as f:
            for line in f:
                r = json.loads(line)
                r["error"] = (r.get("error", "") + " (earlier run)").strip()
                done[r["name"]] = r

    def record(r):
        results.append(r)
        print(r, flush=True)
        if args.progress:
            with open(args.progress, "a") as f:
                f.write(json.dumps(r) + "\n")

    if args.cases != "none":
        todo = [(name, dims, dtype, kw, blocks, check_case) for name, dims, dtype, kw, blocks in CASES]
        for i, (name, dims, dtype, kw, blocks, check) in enumerate(todo):
            if args.cases != "all" and name not in args.cases.split(","):
                continue
            if name in done:
                results.append(done[name])
                continue
            timer = None
            if args.case_timeout:
                def hang(name=name):
                    record(dict(name=name, ok=False, rel=float("nan"), lse_err=float("nan"), dead=-1, dead_ok=False,
                                nan=False, error=f"HANG: no result in {args.case_timeout:.0f}s"))
                    os._exit(3)
                timer = threading.Timer(args.case_timeout, hang)
                timer.start()
            t0 = time.perf_counter()
            try:
                r = check(name, dims, dtype, kw, blocks, 100 + i)
            except Exception as e:  # noqa: BLE001 - report and go on
                r = dict(name=name, ok=False, rel=float("nan"), lse_err=float("nan"), dead=-1, dead_ok=False,
                         nan=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
            if timer is not None:
                timer.cancel()
            r["seconds"] = round(time.perf_counter() - t0, 1)
            record(r)

    rows = []
    if args.bench != "none":
        variants = [parse_variant(v) for v in args.variants.split(",")]
        rows = bench(args.bench, variants, not args.no_peers)

    print(f"\n== correctness (jax {jax.__version__}, {dev.device_kind}) ==")
    for r in results:
        extra = f"{r.get('seconds', '')}s {r.get('error', '')}"
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['name']:24s} rel={r['rel']:.2e} lse={r['lse_err']:.2e} "
              f"dead_rows={r['dead']} dead_ok={r['dead_ok']} nan={r['nan']} {extra}")
    if rows:
        print(f"\n== forward bf16 TFLOP/s (jax {jax.__version__}, {dev.device_kind}) ==")
        print(f"{'shape':24s} {'mask':6s} {'impl':16s} {'TFLOP/s':>7s} {'ms':>8s} err_vs_first")
        for row in rows:
            print(f"{row[0]:24s} {row[1]:6s} {row[2]:16s} {row[3]:>7s} {row[4]:>8s} {row[5]}")


if __name__ == "__main__":
    main()
