"""Sharded attention on the devices present, each case against the same work on one device.

* ``dp``: the batch split over the devices (data parallel), forward and forward+backward;
* ``tp``: the KV heads (and their query heads) split over the devices;
* ``decode``: one new token per row against a batch-split cache;
* ``ring`` / ``all_gather``: one long causal sequence split over the devices
  (`gqa_jax.sharding.ring_attention` / ``all_gather_attention`` in ``shard_map``,
  the data already in zigzag order, as a data pipeline would keep it).

Every call uses the default implementation; the mesh has auto axes and the
calls name their shardings (``q_sharding=``), so kernels run per device. For
each case the table gives the time, the speed-up over one device, the
collectives in the compiled program (``all-gather``, ``all-reduce``,
``reduce-scatter``, ``collective-permute``, ``all-to-all``) and its temporary
memory per device.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import gqa_jax
from gqa_jax.sharding import all_gather_attention, ring_attention

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


@dataclasses.dataclass(frozen=True)
class ShardedCase:
    """One case: ``kind`` says what is split; ``B, S, N, K, H`` as everywhere (``S`` also the query length)."""

    kind: str
    B: int
    S: int
    N: int
    K: int
    H: int

    @property
    def name(self) -> str:
        return f"{self.kind} B{self.B} S{self.S} N{self.N} K{self.K} H{self.H}"


FULL_CASES = [
    ShardedCase("dp", 16, 4096, 32, 8, 128),
    ShardedCase("tp", 2, 4096, 32, 8, 128),
    ShardedCase("decode", 8, 8192, 32, 8, 128),
    ShardedCase("ring", 1, 65536, 32, 8, 128),
    ShardedCase("all_gather", 1, 65536, 32, 8, 128),
]
QUICK_CASES = [ShardedCase(kind, 4, 64, 4, 4, 16) for kind in ("dp", "tp", "decode", "ring", "all_gather")]


def _inputs(case: ShardedCase, dtype):
    rng = np.random.default_rng(0)
    T = 1 if case.kind == "decode" else case.S
    q = jnp.asarray(rng.standard_normal((case.B, T, case.N, case.H)), dtype)
    k = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, case.H)), dtype)
    v = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, case.H)), dtype)
    return q, k, v


def _attention(case: ShardedCase, mesh, spec: P | None) -> Callable:
    """The call of a case on ``mesh`` (``spec`` None: the one-device baseline)."""
    if case.kind in ("ring", "all_gather"):
        if spec is None:
            return lambda q, k, v: gqa_jax.dot_product_attention(q, k, v, is_causal=True)
        # The data is taken to be in zigzag order already (as a data pipeline keeps it): no permutations here.
        attend = ring_attention if case.kind == "ring" else all_gather_attention
        return jax.shard_map(lambda q, k, v: attend(q, k, v, axis_name="x", load_balance="zigzag", is_causal=True),
                             mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    sharding = None if spec is None else NamedSharding(mesh, spec)
    lengths = jnp.full((case.B,), case.S, jnp.int32)
    if case.kind == "decode":
        return lambda q, k, v: gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                                             q_sharding=sharding)
    return lambda q, k, v: gqa_jax.dot_product_attention(q, k, v, is_causal=True, q_sharding=sharding)


SPECS = {"dp": P("x"), "tp": P(None, None, "x"), "decode": P("x"), "ring": P(None, "x"), "all_gather": P(None, "x")}


def _modes(case: ShardedCase, attention: Callable) -> dict[str, Callable]:
    modes = {"fwd": jax.jit(attention)}
    if case.kind != "decode":
        def forward_backward(q, k, v):
            out, vjp = jax.vjp(attention, q, k, v)
            return vjp(out)
        modes["fwd+bwd"] = jax.jit(forward_backward)
    return modes


def _collectives(text: str) -> str:
    counts = {name: len(re.findall(rf"\b{name}(?:-start)?\(", text)) for name in COLLECTIVES}
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "none"


def run_sharded(cases, time_fn: Callable, *, quick: bool) -> list[dict]:
    """Rows of ``case, mode, impl`` (one device, or ``n devices``), seconds, speed-up, collectives, temp MiB."""
    devices = jax.devices()
    rows = []
    if len(devices) < 2:
        return [{"case": case.name, "mode": "-", "impl": f"{len(devices)} device", "seconds": None,
                 "error": "skipped: needs 2 or more devices"} for case in cases]
    mesh = jax.make_mesh((len(devices),), ("x",), axis_types=(AxisType.Auto,))
    dtype = jnp.float32 if quick else jnp.bfloat16
    for case in cases:
        q, k, v = _inputs(case, dtype)
        spec = SPECS[case.kind]
        kv_spec = P("x") if case.kind == "decode" else spec
        placed = (jax.device_put(q, NamedSharding(mesh, spec if case.kind != "decode" else P("x"))),
                  jax.device_put(k, NamedSharding(mesh, kv_spec)), jax.device_put(v, NamedSharding(mesh, kv_spec)))
        one = tuple(jax.device_put(x, devices[0]) for x in (q, k, v))
        single, sharded = _modes(case, _attention(case, mesh, None)), _modes(case, _attention(case, mesh, spec))
        for mode in single:
            base = {"case": case.name, "mode": mode}
            try:
                t1 = time_fn(single[mode], [one])
                rows.append(dict(base, impl="1 device", seconds=t1))
                compiled = sharded[mode].lower(*placed).compile()
                tn = time_fn(sharded[mode], [placed])
                memory = compiled.memory_analysis()
                rows.append(dict(base, impl=f"{len(devices)} devices", seconds=tn, speedup=t1 / tn,
                                 collectives=_collectives(compiled.as_text()),
                                 temp_mib=None if memory is None else memory.temp_size_in_bytes / 2**20))
            except Exception as e:  # out of memory on one device at the long-sequence cases
                rows.append(dict(base, impl="error", seconds=None, error=f"{type(e).__name__}: {e}"[:100]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | mode | devices | time (ms) | speed-up | collectives | temp MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = "—" if r.get("seconds") is None else f"{1e3 * r['seconds']:.3f}"
        speedup = "" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        temp = "" if r.get("temp_mib") is None else f"{r['temp_mib']:.1f}"
        lines.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {ms if not r.get('error') else r['error']} | "
                     f"{speedup} | {r.get('collectives', '')} | {temp} |")
    return "\n".join(lines)
