"""Dropout keys of the NNX layers, as ``nnx.Dropout`` draws them.

A layer with dropout forks the ``dropout`` stream of its constructor's
``rngs`` (`dropout_stream`); each call draws a key from it, or from the
call's own ``rngs=`` (`dropout_key`). The key goes to
`gqa_jax.dot_product_attention` through the linen layers' shared bodies.
"""

from __future__ import annotations

from flax import nnx


def dropout_stream(rngs: nnx.Rngs, rate: float):
    """The layer's own stream: ``rngs.dropout`` forked (the default stream without one), or none when ``rate == 0``."""
    return rngs.dropout.fork() if rate > 0 else nnx.data(None)


def dropout_key(stream, rate: float, deterministic: bool, rngs=None):
    """The dropout key of a call, or None without dropout.

    Args:
      stream: the layer's stream (`dropout_stream`).
      rate: the layer's dropout rate.
      deterministic: no dropout.
      rngs: None (the layer's stream), an ``nnx.Rngs`` (its ``dropout``
        stream), an ``nnx.RngStream``, or a key.
    """
    if deterministic is True or rate == 0:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return stream() if rngs is None else rngs
