"""Shared test setup: Keras on its JAX backend, and random layer parameters without `jax.random`."""

import os

import jax
import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "jax"  # read by Keras at its first import (in the test modules)

# Float32 cases compare against float64 oracles: keep float32 matrix products at full float32
# precision on GPUs too (XLA and Triton default to TF32 there); bf16/fp16 cases cover the fast paths.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def random_params():
    """``random_params(layer, *inputs, seed=0, **call_kwargs)``: the params ``layer.init`` would make, drawn by NumPy.

    Compiling `jax.random` initializers costs seconds on a CPU; the shapes come
    from `jax.eval_shape` (no compilation), the values are fresh normals
    scaled by ``1/sqrt(shape[0])``.
    """

    def draw(layer, *inputs, seed=0, **call_kwargs):
        shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), *inputs, **call_kwargs))["params"]
        rng = np.random.default_rng(seed)
        return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(s.dtype), shapes)

    return draw


@pytest.fixture(params=["linen", "nnx"])
def api(request):
    """The layer classes of one API (`tests.layer_apis.LINEN` or `NNX`): one test body checks both."""
    from tests.layer_apis import APIS

    return APIS[request.param]
