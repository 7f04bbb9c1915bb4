"""Logical axis names to mesh axes: one rules table for parameters and activations (MaxText style).

The layers name their parameters' dims (``embed``, ``q_heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``vocab``; see `gqa_jax.nnx`); activations add
``batch`` and ``length``. `logical_axis_rules` returns the table that maps
those names to the axes of a ``(data, model)`` mesh: data parallel over the
batch, tensor parallel over the heads (a query head lives with its KV head,
so attention stays local), the MLP hidden units and the vocabulary, with the
model dim replicated. The table is what Flax reads:
``nn.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh, rules)``
places an NNX model's parameters, ``nn.logical_axis_rules(rules)`` sets it for
linen. `with_logical_constraint` pins an activation to the same table.

Example::

    import flax.linen as nn
    from flax import nnx
    import gqa_jax.nnx

    model = gqa_jax.nnx.GroupedQueryAttention(16, 8, 2, in_features=64, rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((1, 1), ("data", "model"))   # e.g. (4, 2) on 8 devices
    rules = logical_axis_rules()          # batch -> data, heads/mlp/vocab -> model
    shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(nnx.state(model)), mesh, rules)
    nnx.update(model, jax.device_put(nnx.state(model), shardings))   # query kernel: P(None, "model", None)
    x_BTD = jnp.ones((2, 6, 64))
    x_BTD = with_logical_constraint(x_BTD, ("batch", "length", "embed"), rules=rules, mesh=mesh)
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]

__all__ = ["logical_axis_rules", "logical_to_spec", "with_logical_constraint"]


def _mesh_axes(name: str, value) -> MeshAxes:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be a mesh axis name, a tuple of names or None, got {name}={value!r}")


def _names(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else axes


def logical_axis_rules(*, data: MeshAxes = "data", model: MeshAxes = "model", sequence: MeshAxes = None,
                       shard_kv_heads: bool = True) -> Rules:
    """The rules from the library's logical axis names to mesh axes.

    Args:
      data: mesh axis (or axes) of the batch (``batch``); None: no data parallelism.
      model: mesh axis (or axes) of the heads (``q_heads``, ``kv_heads``), the
        MLP hidden units (``mlp``) and the vocabulary (``vocab``); None: no
        tensor parallelism.
      sequence: mesh axis of the activations' sequence (``length``); context
        parallel attention (`gqa_jax.sharding.context_parallel_attention`)
        takes it. Default None.
      shard_kv_heads: False replicates the KV heads (``kv_heads -> None``), as
        MaxText does when ``K`` is smaller than the model axis; the queries
        stay sharded and dispatch serves the call with XLA.

    Returns:
      ``((logical name, mesh axes), ...)`` for ``batch, length, embed,
      q_heads, kv_heads, head_dim, mlp, vocab``; ``embed`` and ``head_dim``
      are replicated.

    Raises:
      TypeError: for axes that are not a name, a tuple of names or None.
      ValueError: when two of ``data``, ``model``, ``sequence`` share a mesh axis.
    """
    given = {name: _mesh_axes(name, value) for name, value in
             (("data", data), ("model", model), ("sequence", sequence))}
    if not isinstance(shard_kv_heads, bool):
        raise TypeError(f"shard_kv_heads must be True or False, got {shard_kv_heads=!r}")
    seen = {}
    for name, axes in given.items():
        for axis in _names(axes):
            if axis in seen:
                raise ValueError(f"{seen[axis]} and {name} both name mesh axis {axis!r}: got {given}")
            seen[axis] = name
    model = given["model"]
    return (
        ("batch", given["data"]),
        ("length", given["sequence"]),
        ("embed", None),
        ("q_heads", model),
        ("kv_heads", model if shard_kv_heads else None),
        ("head_dim", None),
        ("mlp", model),
        ("vocab", model),
    )


def _rules_or_default(rules) -> Rules:
    if rules is not None:
        return tuple(rules)
    return tuple(nn.get_logical_axis_rules()) or logical_axis_rules()


def logical_to_spec(names: Sequence[str | None], rules=None) -> P:
    """The ``PartitionSpec`` of an array whose dims carry the logical ``names``.

    Args:
      names: one logical name (or None: replicated) per dim.
      rules: ``((logical name, mesh axes), ...)``; default the rules set by
        ``flax.linen.logical_axis_rules(...)`` if any, else `logical_axis_rules()`.
        Names the rules do not list are replicated.
    """
    rules = _rules_or_default(rules)
    if isinstance(names, str) or not all(n is None or isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of logical axis names or None, got {names=!r}")
    return nn.logical_to_mesh_axes(tuple(names), rules)


def with_logical_constraint(x, names: Sequence[str | None], *, rules=None, mesh: Mesh | None = None):
    """``x`` constrained to the sharding its logical dim ``names`` map to; unchanged off a mesh.

    Args:
      x: an array (or tracer) of rank ``len(names)``, e.g. ``[B, T, D]`` with
        ``("batch", "length", "embed")``.
      names: one logical name (or None) per dim.
      rules: as `logical_to_spec`.
      mesh: the mesh; default the one of ``jax.set_mesh``. Without any, ``x``
        is returned as is (one device).

    Returns:
      ``x`` with a sharding constraint (auto mesh axes) or resharded (explicit
      axes, where the sharding is part of the type).

    Raises:
      ValueError: when ``len(names)`` is not ``x.ndim``.
    """
    names = tuple(names) if not isinstance(names, str) else names
    spec = logical_to_spec(names, rules)
    if len(names) != x.ndim:
        raise ValueError(f"names must name every dim of x: len(names)={len(names)} ({names}), "
                         f"x.shape={tuple(x.shape)}")
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
    if AxisType.Explicit in mesh.axis_types:
        return jax.reshard(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)
