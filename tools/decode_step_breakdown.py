"""Where a decode step's time goes on each kind of cache: the whole step, the cache writes, the attention.

Run on the GPU machine (a few minutes, most of it compiling eight decode loops of the 1B model;
``--caches`` runs fewer kinds)::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tools/decode_step_breakdown.py [--reps 9] [--length 512]
        [--caches "bf16 dense,bf16 paged"] [--quick]

Issue 16: a paged cache cost 16% end to end over the dense one
(`gqa_jax.bench.e2e`, bf16) where the paged decode kernel alone costs less.
For the end-to-end model (`gqa_jax.bench.e2e.shapes`' decoder: L16 D2048 N32
K8, B16) and a cache filled to ragged lengths around ``--length``, this times,
per cache kind (`gqa_jax.bench.e2e.CACHES`), in milliseconds per decode step:

* ``step``: one whole decode step (`gqa_jax.decoding.decode_step`: the
  model on one token per row, greedy tokens fed back), the cache donated and
  carried, each layer updating its own bookkeeping (lengths; a paged
  cache's page allocation and slots);
* ``step shared``: the same with one bookkeeping update for all layers (the
  layers read the first one's: what `gqa_jax.decoding.generate` does when
  the layers agree, `gqa_jax.cache_bookkeeping`);
* ``writes`` / ``writes shared``: what the step's layers do to their caches,
  without the model: ``update`` of one new token per row in each layer's
  cache (shared: as in ``step shared``);
* ``attend``: each layer's ``attend`` of one query per row over its cache
  (the decode kernels on a GPU);
* ops per step: the top-level instructions of the compiled ``step`` loops'
  bodies (a fusion counts once; on a GPU about one kernel launch each).

Each figure is the median of ``--reps`` repetitions of ``STEPS`` steps in one
jitted loop, the kinds' repetitions interleaved (`time_interleaved`); the
loops restart from the filled cache's lengths and page tables each call, so
rows do not outgrow their capacity. ``--quick``: a toy-width model with the
full run's 16 layers, for a CPU (the layers' bookkeeping shows there, the
GPU kernels' costs do not).

Prints one table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.bench import e2e
from gqa_jax.bench.timing import environment, time_interleaved
from gqa_jax.cache_bookkeeping import through_shared_bookkeeping, with_bookkeeping_of
from gqa_jax.decoding import decode_step
from gqa_jax.models import Decoder

STEPS = 16  # decode steps per timed call


def filled_cache(shape: e2e.EndToEndShape, model, params, kind: str, length: int):
    """The kind's cache after a prefill of ragged prompts (``length // 2`` to ``length`` tokens per row)."""
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, shape.config.vocab_size, (shape.B, length)), jnp.int32)
    lengths = jnp.asarray(rng.integers(length // 2, length + 1, (shape.B,)), jnp.int32)
    cache = e2e.make_cache(shape, shape.config, kind)
    _, cache = jax.jit(lambda p, t, c, n: model.apply({"params": p}, t, c, num_new=n))(params, prompt, cache, lengths)
    return cache


def restart(cache, start):
    """``cache`` with its bookkeeping set back to ``start``'s (lengths, pages): the values stay, the rows shrink."""
    return with_bookkeeping_of(cache, start)


def step_loop(model, start, *, shared: bool):
    """``STEPS`` greedy decode steps of the whole model from ``start``'s lengths, the cache carried
    (`gqa_jax.decoding.decode_step`; ``shared``: one bookkeeping update for all layers, as `generate` does)."""

    def run(caches, tokens, params):
        caches = tuple(restart(c, s) for c, s in zip(caches, start))

        def body(_, carry):
            logits, caches = decode_step(model, {"params": params}, *carry, shared_bookkeeping=shared)
            return caches, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, STEPS, body, (caches, tokens))

    return run


def write_loop(start, *, shared: bool):
    """``STEPS`` rounds of one-token ``update`` in every layer's cache (``shared``: one bookkeeping update for all,
    `gqa_jax.cache_bookkeeping.through_shared_bookkeeping`). The new keys and values differ per layer and step, as a model's do,
    so that neither their quantization nor the writes merge across layers or leave the loop."""

    def run(caches, tokens, new_kv):
        caches = tuple(restart(c, s) for c, s in zip(caches, start))

        def body(i, caches):
            def write(caches):
                return None, tuple(c.update(*((x + i.astype(x.dtype)) * (layer + 1) for x in new_kv))
                                   for layer, c in enumerate(caches))

            return (through_shared_bookkeeping(write, caches) if shared else write(caches))[1]

        return jax.lax.fori_loop(0, STEPS, body, caches), tokens

    return run


def attend_loop(caches, query, implementation):
    """``STEPS`` rounds of every layer's ``attend`` of one query per row (the caches unchanged; each round's query
    depends on the last, so the rounds are not merged; what depends on the caches alone may leave the loop, e.g.
    the page gather of the CPU's dense path)."""

    def body(_, acc):
        return acc + sum(c.attend(query + acc.astype(query.dtype), implementation=implementation)
                         for c in caches).mean()

    return jax.lax.fori_loop(0, STEPS, body, jnp.zeros((), jnp.float32))


TRIVIAL_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast"})


def loop_body_ops(compiled_text: str) -> int:
    """Instructions of the largest ``while`` body in a compiled module's text, a fusion counting once and a
    ``call`` (a GPU command buffer) as the instructions it calls: what one step of the loop launches (on a GPU,
    about one kernel each)."""
    computations = {c.split(" ", 1)[0].lstrip("%"): c for c in re.split(r"\n(?=\S.*\{\n)", compiled_text)}

    def count(name):
        total = 0
        for line in computations[name].split("\n")[1:]:
            op = re.search(r"= .*? ([a-z][\w-]*)\(", line)
            if op is None or op.group(1) in TRIVIAL_OPS:
                continue
            called = re.search(r"to_apply=%?([\w.\-]+)", line) if op.group(1) == "call" else None
            total += count(called.group(1)) if called and called.group(1) in computations else 1
        return total

    bodies = set(re.findall(r"body=%?([\w.\-]+)", compiled_text)) & set(computations)
    return max((count(body) for body in bodies), default=0)


def time_carried(fns: dict, inputs: dict, fixed: tuple, reps: int) -> dict[str, float]:
    """Median seconds per call of each ``fns[name](*inputs[name], *fixed)``, whose output (the inputs' new values)
    feeds its next call."""
    state = dict(inputs)

    def carried(name):
        def call():
            state[name] = fns[name](*state[name], *fixed[name])
            return state[name]

        return call

    return time_interleaved({name: carried(name) for name in fns}, [()], reps=reps, min_rep_seconds=0.02)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--length", type=int, default=512, help="prompt tokens per row before the steps (ragged)")
    parser.add_argument("--quick", action="store_true", help="a toy-width 16-layer model (CPU check)")
    parser.add_argument("--caches", default=",".join(e2e.CACHES),
                        help=f"comma-separated cache kinds of {list(e2e.CACHES)}")
    args = parser.parse_args()
    kinds = args.caches.split(",")
    if unknown := sorted(set(kinds) - set(e2e.CACHES)):
        parser.error(f"unknown cache kinds {unknown}; known: {list(e2e.CACHES)}")
    print(environment())
    base = e2e.shapes(args.quick)[-1]
    if args.quick:  # the toy width with the full model's layer count: the per-layer bookkeeping shows
        base = dataclasses.replace(base, config=dataclasses.replace(base.config, num_layers=16))
    shape = dataclasses.replace(base, P=args.length, new_tokens=STEPS)  # each loop restarts: room for STEPS
    config = dataclasses.replace(shape.config, implementation="xla" if args.quick else "pallas_triton")  # as e2e
    model = Decoder(config)
    params = model.init(jax.random.key(0), jnp.zeros((shape.B, 8), jnp.int32))["params"]
    rng = np.random.default_rng(1)
    K, H, N = config.num_kv_heads, config.head_dim, config.num_heads
    new_kv = tuple(jnp.asarray(rng.standard_normal((shape.B, 1, K, H)), config.dtype) for _ in range(2))
    query = jnp.asarray(rng.standard_normal((shape.B, 1, N, H)), config.dtype)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (shape.B,)), jnp.int32)

    loops, inputs, fixed, attends = {}, {}, {}, {}
    for kind in kinds:
        caches = filled_cache(shape, model, params, kind, args.length)
        start = caches  # every loop restarts from these lengths and pages
        parts = {"step": (step_loop(model, start, shared=False), params),
                 "step shared": (step_loop(model, start, shared=True), params),
                 "writes": (write_loop(start, shared=False), new_kv),
                 "writes shared": (write_loop(start, shared=True), new_kv)}
        for part, (fn, argument) in parts.items():
            name = f"{kind} {part}"
            inputs[name] = (jax.tree.map(jnp.copy, caches), tokens)  # each loop donates its own copy
            fixed[name] = (argument,)
            loops[name] = jax.jit(fn, donate_argnums=0).lower(*inputs[name], *fixed[name]).compile()  # compiled once
        attend = jax.jit(attend_loop, static_argnums=2)
        attends[kind] = lambda attend=attend, caches=caches: attend(caches, query, config.implementation)
        print(f"{kind}: filled, lengths {np.asarray(caches[0].lengths).tolist()}", flush=True)

    ops = {name: loop_body_ops(loop.as_text()) for name, loop in loops.items() if " step" in name}
    carried = time_carried(loops, inputs, fixed, args.reps)
    attended = time_interleaved(attends, [()], reps=args.reps, min_rep_seconds=0.02)
    ms = lambda seconds: f"{1e3 * seconds / STEPS:.3f}"
    print(f"\n{shape.name} at lengths ~{args.length}; ms per decode step (median of {args.reps}, {STEPS} steps a call)")
    columns = ("step", "step shared", "writes", "writes shared")
    print(f"{'cache':<12}" + "".join(f"{c:>14}" for c in columns) + f"{'attend':>14}")
    for kind in kinds:
        cells = [ms(carried[f"{kind} {c}"]) for c in columns]
        print(f"{kind:<12}" + "".join(f"{c:>14}" for c in cells + [ms(attended[kind])]))
    print("ops per step (top-level instructions of the compiled loop body): "
          + ", ".join(f"{name} {count}" for name, count in ops.items()))


if __name__ == "__main__":
    main()
