"""Each script in examples/ (and the README's NNX snippet) runs at a small size and shows what it claims."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import textwrap

import numpy as np
import pytest

from tests.multidevice import run_on_cpu_devices

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
README = EXAMPLES.parent / "README.md"


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


SHARDED_TRAINING = textwrap.dedent("""
    import importlib.util, json
    import numpy as np
    spec = importlib.util.spec_from_file_location("example_05", "examples/05_sharded_training.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.main(["--mesh", "2,2", "--steps", "40", "--num-layers", "1", "--new-tokens", "4"])
    print(json.dumps({"losses": r["losses"], "single_device_loss": r["single_device_loss"],
                      "query_spec": list(r["query_spec"]), "cache_spec": list(r["cache_spec"]),
                      "tokens": r["tokens"].tolist(), "reference_tokens": r["reference_tokens"].tolist()}))
""")


def test_sharded_training():
    """On a (2, 2) mesh of simulated CPU devices (a subprocess: jax fixes the device count when it starts)."""
    result = json.loads(run_on_cpu_devices(SHARDED_TRAINING, 4).stdout.strip().splitlines()[-1])
    losses = result["losses"]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.5 * losses[0], losses
    assert abs(losses[0] - result["single_device_loss"]) < 1e-4, (losses[0], result["single_device_loss"])
    assert result["query_spec"][:2] == [None, "model"], result["query_spec"]
    assert result["cache_spec"][:3] == ["data", None, "model"], result["cache_spec"]
    assert np.shape(result["tokens"]) == (4, 4)
    np.testing.assert_array_equal(result["tokens"], result["reference_tokens"])


def test_nnx_block(capsys):
    result = load("06_nnx_block.py").main(["--steps", "30", "--num-layers", "1", "--batch-size", "16",
                                           "--new-tokens", "4"])
    losses = result["losses"]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.5 * losses[0], losses
    assert result["cached"].shape == (3, 4)
    np.testing.assert_array_equal(result["cached"], result["recomputed"])
    assert result["linen_difference"] < 1e-5
    assert "cached loop == recomputing without a cache: True" in capsys.readouterr().out


def test_readme_nnx_snippet():
    """The python block of the README's "Flax NNX" section runs (it asserts its own claims)."""
    section = README.read_text().split("### Flax NNX", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, f"{README}:Flax NNX", "exec"), {})
