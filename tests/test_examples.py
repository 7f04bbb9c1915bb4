"""Each script in examples/ runs (at a small size) and shows what it claims."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(filename: str):
    spec = importlib.util.spec_from_file_location(f"example_{filename[:2]}", EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (the Flax modules) look their module up there
    spec.loader.exec_module(module)
    return module


def test_functions(capsys):
    diffs = load("01_functions.py").main([])
    assert len(diffs) == 3 and max(diffs.values()) < 1e-5, diffs
    assert "y_BTD.shape=(2, 12, 64)" in capsys.readouterr().out


def test_train_block():
    losses = load("02_train_block.py").main(["--steps", "40", "--num-layers", "1", "--batch-size", "16"])
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses


def test_decode_linen_cache(capsys):
    tokens, recomputed = load("03_decode_linen_cache.py").main(["--new-tokens", "5"])
    assert tokens.shape == (3, 5)
    np.testing.assert_array_equal(tokens, recomputed)
    assert "cached loop == recomputing without a cache: True" in capsys.readouterr().out


def test_port_keras_weights():
    pytest.importorskip("keras", reason="keras (a test extra) is not installed")
    differences = load("04_port_keras_weights.py").main([])
    assert len(differences) == 3 and max(differences.values()) < 1e-5, differences
