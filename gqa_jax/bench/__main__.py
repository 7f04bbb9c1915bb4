"""``python -m gqa_jax.bench``: our kernels against the peers, side by side in one process.

Usage (shell)::

    python -m gqa_jax.bench                # every prefill and decode shape (GPU)
    python -m gqa_jax.bench --quick        # tiny shapes, CPU smoke run (interpret mode)
    python -m gqa_jax.bench --only decode --out bench_out
    python -m gqa_jax.bench --only sharded       # DP, TP, decode, ring vs one device (2+ devices)
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

import jax

from gqa_jax.bench import decode, e2e, prefill, sharded
from gqa_jax.bench.report import markdown_table, write_chart, write_json
from gqa_jax.bench.timing import environment, time_fn
from gqa_jax.demo.progress import ProgressBar


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:90]


def _prefill_modes(build: Callable, shape, quick: bool) -> dict:
    return prefill.timed_functions(build(shape, interpret=quick))


def _decode_modes(build: Callable, shape, quick: bool) -> dict:
    built = build(shape, interpret=quick)  # fn, or (fn, prepare): prepare(*inputs) gives fn's arguments, untimed
    fn, prepare = built if isinstance(built, tuple) else (built, lambda *inputs: inputs)
    return {"decode": (jax.jit(fn), prepare)}


def run_family(shapes, impls: dict, make_inputs: Callable, modes: Callable, mode_names: tuple[str, ...],
               metric: Callable, *, quick: bool, reps: int, bar: ProgressBar, done: int) -> tuple[list[dict], int]:
    """Times every implementation on every shape; a failure becomes the row's ``error``."""
    results = []
    for shape in shapes:
        inputs = make_inputs(shape, jax.random.key(0))
        for impl, build in impls.items():
            try:
                timed, error = modes(build, shape, quick), None
            except Exception as e:  # a peer that is not importable or cannot serve the shape
                timed, error = None, _short(e)
            for mode in mode_names:
                row = {"case": shape.name, "mode": mode, "impl": impl, "seconds": None}
                if timed is None:
                    row["error"] = error
                else:
                    fn, args = timed[mode]
                    try:
                        row["seconds"] = time_fn(fn, [args(*inputs)], reps=reps)
                        row.update(metric(shape, mode, row["seconds"]))
                    except Exception as e:  # out of memory, unsupported on this device ...
                        row["error"] = _short(e)
                results.append(row)
                done += 1
                bar.update(done, f"{shape.name} {mode} {impl}")
        del inputs
    return results, done


def run_end_to_end(shapes, variants, quick: bool, reps: int, bar: ProgressBar, done: int) -> tuple[list[dict], int]:
    """Tokens/s of the reference decoder's generation loop per ``(implementation, cache)`` of ``variants``.

    Each row with tokens also gets ``agreement``: the fraction of its greedy tokens equal to those of the case's
    first bf16 dense run (named in ``agreement_with``).
    """
    results, timer = [], functools.partial(time_fn, reps=max(3, reps // 3))
    for shape in shapes:
        reference = None  # (row name, tokens) of the case's first bf16 dense run
        for impl, cache in variants:
            row = {"case": shape.name, "mode": "generate", "impl": e2e.row_name(impl, cache), "seconds": None}
            if quick and impl != "xla":
                row["error"] = "skipped: GPU kernels only"
            else:
                try:
                    row["seconds"], tokens = e2e.time_generate(shape, impl, cache, timer)
                    row["tokens_per_s"] = shape.new_token_count() / row["seconds"]
                    if reference is None and cache == e2e.BF16_DENSE:
                        reference = (row["impl"], tokens)
                    if reference is not None:
                        row["agreement"], row["agreement_with"] = e2e.agreement(tokens, reference[1]), reference[0]
                except Exception as e:  # an implementation that cannot serve on this platform, out of memory ...
                    row["error"] = _short(e)
            results.append(row)
            done += 1
            bar.update(done, f"{shape.name} {row['impl']}")
    return results, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gqa_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes for a CPU smoke run (interpret mode)")
    parser.add_argument("--only", choices=("prefill", "decode", "e2e", "sharded"),
                        help="run one family of shapes (sharded runs only when asked: it needs several devices)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median); default 10, 3 with --quick")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for results.json and charts")
    parser.add_argument("--skip", nargs="*", default=(), metavar="TEXT",
                        help="leave out the implementations whose name contains any of these")
    parser.add_argument("--shapes", nargs="*", default=(), metavar="TEXT",
                        help="run only the shapes (prefill, decode, end to end) whose name contains any of these")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 10)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    command = "python -m gqa_jax.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    run_prefill, run_decode = args.only in (None, "prefill"), args.only in (None, "decode")
    run_e2e = args.only in (None, "e2e")

    prefill_shapes = prefill.QUICK_SHAPES if args.quick else prefill.FULL_SHAPES
    decode_shapes = decode.QUICK_SHAPES if args.quick else decode.FULL_SHAPES
    if args.shapes:
        prefill_shapes, decode_shapes = ([shape for shape in shapes if any(text in shape.name for text in args.shapes)]
                                         for shapes in (prefill_shapes, decode_shapes))
    prefill_impls, decode_impls = prefill.implementations(args.quick), decode.implementations(args.quick)
    if args.skip:
        prefill_impls, decode_impls = ({name: build for name, build in impls.items()
                                        if not any(text in name for text in args.skip)}
                                       for impls in (prefill_impls, decode_impls))
    e2e_shapes = e2e.shapes(args.quick)
    if args.shapes:
        e2e_shapes = [shape for shape in e2e_shapes if any(text in shape.name for text in args.shapes)]
    e2e_variants = [(impl, cache) for impl, cache in e2e.variants(args.quick)
                    if not any(text in e2e.row_name(impl, cache) for text in args.skip)]
    total = (run_prefill * 2 * len(prefill_shapes) * len(prefill_impls)
             + run_decode * len(decode_shapes) * len(decode_impls)
             + run_e2e * len(e2e_shapes) * len(e2e_variants))
    bar = ProgressBar(max(total, 1), label="bench")
    timing = functools.partial(run_family, quick=args.quick, reps=reps, bar=bar)
    prefill_rows, decode_rows, e2e_rows, done, copy = [], [], [], 0, None
    if run_prefill:
        prefill_rows, done = timing(
            prefill_shapes, prefill_impls, prefill.make_inputs, _prefill_modes, ("fwd", "fwd+bwd"),
            lambda shape, mode, s: {"tflops": shape.flops(mode) / s / 1e12}, done=done)
    if run_decode:
        copy = decode.copy_bandwidth(functools.partial(time_fn, reps=reps), 1 << (20 if args.quick else 29))
        decode_rows, done = timing(
            decode_shapes, decode_impls, decode.make_inputs, _decode_modes, ("decode",),
            lambda shape, mode, s: {"gbps": shape.kv_bytes() / s / 1e9,
                                    "of_copy": shape.kv_bytes() / s / 1e9 / copy}, done=done)
    if run_e2e:
        e2e_rows, done = run_end_to_end(e2e_shapes, e2e_variants, args.quick, reps, bar, done)
    bar.close()
    sharded_rows = []
    if args.only == "sharded":
        # Simulated CPU devices deadlock with many collective programs in flight: one call per sync there.
        timer = functools.partial(time_fn, reps=reps, min_rep_seconds=0.0 if args.quick else 0.05)
        sharded_rows = sharded.run_sharded(sharded.QUICK_CASES if args.quick else sharded.FULL_CASES, timer,
                                           quick=args.quick)

    env_line = " | ".join(f"{k} {v}" for k, v in env.items())
    write_json(args.out / "results.json", dict(env, copy_gbps=copy, device_count=jax.device_count()),
               prefill_rows + decode_rows + e2e_rows + sharded_rows, command)
    print(f"\n{command}\n{env_line}\nresults: {args.out / 'results.json'}")
    if prefill_rows:
        write_chart(args.out / "prefill.png", prefill_rows, "tflops", "TFLOP/s", f"prefill attention, {env['device']}")
        print("\nPrefill, bf16 (TFLOP/s; forward 4·B·T·S·N·H, halved when causal; backward 2.5x forward)\n")
        print(markdown_table(prefill_rows, prefill.OURS, "tflops", "TFLOP/s"))
    if decode_rows:
        write_chart(args.out / "decode.png", decode_rows, "gbps", "GB/s of K/V read", f"decode attention, {env['device']}")
        print(f"\nDecode, T=1, bf16 cache (GB/s of K/V up to each row's length; copy bandwidth {copy:.0f} GB/s; "
              "int8/fp8 cache rows: bf16-equivalent GB/s, so ratios are ratios of time)\n")
        print(markdown_table(decode_rows, decode.OURS, "gbps", "GB/s", extra="of_copy"))
    if e2e_rows:
        print("\nEnd-to-end greedy decoding with gqa_jax.decoding.generate (new tokens/s, prefill included; int8 "
              "rows: Triton decode steps on the int8 cache, flash prefill on it dequantized; paged rows: the paged "
              "decode kernel; agreement: fraction of greedy tokens equal to the first bf16 dense row's)\n")
        print(markdown_table(e2e_rows, e2e.OURS, "tokens_per_s", "tokens/s", extra="agreement"))
    if sharded_rows:
        print(f"\nSharded attention on {jax.device_count()} devices against one (default implementation)\n")
        print(sharded.markdown(sharded_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
