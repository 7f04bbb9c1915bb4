"""The demo's ``--save`` / ``--load`` file: an exact round trip, and clear refusals of files that do not fit."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from gqa_jax.demo import checkpoint
from gqa_jax.demo.__main__ import SIZES, init_params, main
from gqa_jax.demo.task import VOCAB
from gqa_jax.models import Decoder, DecoderConfig


def _model(size):
    return Decoder(DecoderConfig(vocab_size=len(VOCAB), **SIZES[size]))


def _template(size):
    return jax.eval_shape(lambda: init_params(_model(size), 0, 3))


def _params(size, seed=0):
    """Random params of the demo model of ``size``, drawn by NumPy (compiling ``init`` would cost seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), _template(size))


def test_round_trip_is_exact(tmp_path):
    params = _params("tiny", seed=5)
    path = tmp_path / "tiny.msgpack"
    checkpoint.save(path, "tiny", 3, params)
    size, max_digits, raw = checkpoint.read(path)
    assert (size, max_digits) == ("tiny", 3)
    restored = checkpoint.restore(path, raw, _template("tiny"))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
    for want, got in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "tiny.msgpack"
    checkpoint.save(path, "tiny", 3, _params("tiny"))
    _, _, raw = checkpoint.read(path)
    with pytest.raises(ValueError, match="does not fit this demo model: .*keys"):
        checkpoint.restore(path, raw, _template("small"))  # 2 layers where the file has 1

    first = jax.tree_util.tree_leaves_with_path(raw)[0]
    bad = jax.tree_util.tree_map_with_path(lambda k, x: x[:1] if k == first[0] else x, raw)
    name, shape = re.escape(jax.tree_util.keystr(first[0])), first[1].shape
    with pytest.raises(ValueError, match=rf"{name} has shape \(1, {shape[1]}\), expected \({shape[0]}, {shape[1]}\)"):
        checkpoint.restore(path, bad, _template("tiny"))


def test_the_loaded_width_limits_the_prompts(tmp_path, capsys):
    path = tmp_path / "tiny.msgpack"
    checkpoint.save(path, "tiny", 3, _params("tiny"))
    assert main(["--load", str(path), "--prompt", "12345"]) == 2  # the default --max-digits 8 gives way to 3
    assert "1 to max_digits=3 digits, got '12345'" in capsys.readouterr().err
