"""The demo's trained model in one file (``--save`` / ``--load``): its size, its task width and its params.

The file is `flax.serialization` msgpack (no extra dependency). Loading checks
every parameter's path and shape against a freshly built model of the saved
size, so a file from another size or another version of the model is refused
with a clear error instead of decoding garbage.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

_FORMAT = "gqa-jax demo model v1"


def save(path: str | os.PathLike, size: str, max_digits: int, params) -> None:
    """Writes ``params`` of the demo model of ``size`` trained on up to ``max_digits`` digits to ``path``."""
    state = {"format": _FORMAT, "size": size, "max_digits": max_digits,
             "params": jax.tree_util.tree_map(np.asarray, params)}
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(state))


def read(path: str | os.PathLike) -> tuple[str, int, dict]:
    """``(size, max_digits, raw params)`` from a file written by `save`.

    Raises:
      ValueError: the file is not a demo model.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on foreign bytes
        raise ValueError(f"{os.fspath(path)!r} is not a gqa-jax demo model ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{os.fspath(path)!r} is not a gqa-jax demo model: format {found!r}, expected {_FORMAT!r}")
    return state["size"], int(state["max_digits"]), state["params"]


def restore(path: str | os.PathLike, raw_params: dict, template):
    """``raw_params`` (from `read`) with the structure of ``template`` after checking every path and shape.

    Args:
      path: the file they came from, for the error message.
      raw_params: the nested dict `read` returns.
      template: params of the model to load into, or their `jax.eval_shape`.

    Raises:
      ValueError: the saved tree or a shape differs from ``template``'s.
    """
    try:
        params = serialization.from_state_dict(template, raw_params)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)!r} does not fit this demo model: {e}") from e
    shapes = lambda tree: [(jax.tree_util.keystr(k), np.shape(x)) for k, x in jax.tree_util.tree_leaves_with_path(tree)]
    for (name, want), (_, got) in zip(shapes(template), shapes(params)):
        if want != got:
            raise ValueError(f"{os.fspath(path)!r} does not fit this demo model: {name} has shape {got}, expected {want}")
    return jax.tree_util.tree_map(jnp.asarray, params)
