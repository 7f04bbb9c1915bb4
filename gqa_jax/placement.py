"""Where an attention call's arrays live: the mesh axes that split its batch and heads.

Kernels (Pallas calls) cannot be partitioned automatically: on a mesh of more
than one device they must run inside ``jax.shard_map``. `Placement` records
which mesh axes split the batch (``B``) and the heads (``N`` of the queries,
``K`` of the keys and values, together) of a call; `placement_of` reads it from
explicit shardings (``q_sharding=``/``kv_sharding=``), from the arrays' own
shardings (concrete arrays, and tracers on meshes with explicit axes), or
returns None for a call that lives on one device. Sharded sequences, or head
dims, are context parallelism (`gqa_jax.sharding`) and have no kernel
placement: `Placement.refusal` says so, and dispatch falls back to XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Placement:
    """Mesh axes of a call's batch and heads.

    Attributes:
      mesh: the ``Mesh`` or ``AbstractMesh`` the arrays live on.
      batch: the mesh axis (or axes) splitting ``B``, or None.
      heads: the mesh axis (or axes) splitting ``N`` and ``K``, or None.
      refusal: why no kernel can run sharded like this (e.g. a split sequence), or None.
    """

    mesh: Any
    batch: Any = None
    heads: Any = None
    refusal: str | None = None

    def spec(self, batch: bool = True, heads: bool = True, rank: int = 4) -> P:
        """``P(batch, None, heads, None)`` for BTNH/BSKH arrays; leading ``rank`` axes for others."""
        if rank == 4:
            return P(self.batch if batch else None, None, self.heads if heads else None, None)
        return P(*([self.batch if batch else None] + [None] * (rank - 1)))

    def axis_size(self, axes) -> int:
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = 1
        for name in names:
            size *= self.mesh.shape[name]
        return size


def _sharding_of(x) -> NamedSharding | None:
    sharding = getattr(jax.typeof(x), "sharding", None) if isinstance(x, jax.core.Tracer) else getattr(x, "sharding",
                                                                                                       None)
    return sharding if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def _spec(sharding: NamedSharding) -> tuple:
    return tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))


def placement_of(query, key, q_sharding: NamedSharding | None = None,
                 kv_sharding: NamedSharding | None = None) -> Placement | None:
    """The `Placement` of ``query [B,T,N,H]`` and ``key [B,S,K,H]``, or None on one device.

    Args:
      query: the query array (or tracer).
      key: the key array.
      q_sharding: the query's ``NamedSharding`` when its arrays do not carry it
        (under ``jit`` on meshes with auto axes).
      kv_sharding: the key's and value's ``NamedSharding``; default ``q_sharding``'s
        batch and head axes.

    Raises:
      TypeError: for shardings that are not ``NamedSharding``.
    """
    for name, given in (("q_sharding", q_sharding), ("kv_sharding", kv_sharding)):
        if given is not None and not isinstance(given, NamedSharding):
            raise TypeError(f"{name} must be a jax.sharding.NamedSharding or None, got {name}={given!r}")
    q_sh = q_sharding or _sharding_of(query)
    kv_sh = kv_sharding or q_sharding or _sharding_of(key) or q_sh
    if q_sh is None or q_sh.mesh.size == 1:
        return None
    (qb, qt, qn, qh), (kb, ks, kk, kh) = _spec(q_sh), _spec(kv_sh)
    if not any((qb, qt, qn, qh, kb, ks, kk, kh)):
        return None  # replicated (or, under jit on an auto mesh, not known): one program serves
    placement = Placement(mesh=q_sh.mesh, batch=qb, heads=qn)
    if qt is not None or ks is not None:
        return dataclasses.replace(placement, refusal="the sequence is sharded: use gqa_jax.sharding (context "
                                                      f"parallel), got query spec {q_sh.spec}, key spec {kv_sh.spec}")
    if qh is not None or kh is not None:
        return dataclasses.replace(placement, refusal=f"the head dim is sharded, got query spec {q_sh.spec}, "
                                                      f"key spec {kv_sh.spec}")
    if (qb, qn) != (kb, kk):
        return dataclasses.replace(placement, refusal="query and key/value must split batch and heads over the "
                                                      f"same mesh axes, got {q_sh.spec} and {kv_sh.spec}")
    batch, batch_size = query.shape[0], placement.axis_size(qb)
    if batch % batch_size:
        return dataclasses.replace(placement, refusal=f"the batch B={batch} must divide over the batch axes {qb} "
                                                      f"of size {batch_size}")
    num_kv_heads, size = key.shape[2], placement.axis_size(qn)
    if num_kv_heads % size:
        return dataclasses.replace(placement, refusal=f"num_kv_heads K={num_kv_heads} must divide over the head "
                                                      f"axes {qn} of size {size}")
    return placement
