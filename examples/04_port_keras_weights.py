"""Port the weights of Keras attention layers to the Flax layers, and check the outputs agree.

Run: ``python examples/04_port_keras_weights.py`` (needs ``pip install keras``; Keras
runs on its JAX backend here).

`gqa_jax.interop.keras_params` reads a built ``keras.layers.GroupQueryAttention``
or ``keras.layers.MultiHeadAttention`` and returns the params tree of
`gqa_jax.GroupedQueryAttention` / `gqa_jax.MultiHeadAttention`: the
parameters have the Keras names and kernel shapes (``query [D,N,H]``,
``key``/``value [D,K,H]``, ``attention_output [N,H,D]``).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gqa_jax  # noqa: E402
from gqa_jax.interop import keras_params  # noqa: E402


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)

    B, T, S, D = 2, 6, 9, 32
    query = rng.standard_normal((B, T, D)).astype(np.float32)
    value = rng.standard_normal((B, S, D)).astype(np.float32)
    attention_mask = rng.random((B, T, S)) > 0.3  # [B, T, S], True = attend
    differences = {}

    # Keras GroupQueryAttention -> gqa_jax.GroupedQueryAttention (same field names)
    fields = dict(head_dim=8, num_query_heads=4, num_key_value_heads=2)
    theirs = keras.layers.GroupQueryAttention(**fields)
    expected, expected_scores = theirs(query, value, attention_mask=attention_mask, return_attention_scores=True)
    ours = gqa_jax.GroupedQueryAttention(**fields)
    out, scores = ours.apply(
        {"params": keras_params(theirs)}, query, value, attention_mask=attention_mask, return_attention_scores=True
    )
    differences["GroupQueryAttention output"] = float(np.abs(np.asarray(out) - np.asarray(expected)).max())
    differences["GroupQueryAttention scores"] = float(np.abs(np.asarray(scores) - np.asarray(expected_scores)).max())

    # Keras MultiHeadAttention (self-attention, causal) -> gqa_jax.MultiHeadAttention
    theirs = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)
    expected = theirs(query, query, use_causal_mask=True)
    ours = gqa_jax.MultiHeadAttention(num_heads=4, key_dim=8)
    out = ours.apply({"params": keras_params(theirs)}, query, query, use_causal_mask=True)
    differences["MultiHeadAttention causal output"] = float(np.abs(np.asarray(out) - np.asarray(expected)).max())

    for name, diff in differences.items():
        print(f"{name:<34} max |ours - keras| = {diff:.1e}")
    return differences


if __name__ == "__main__":
    main()
