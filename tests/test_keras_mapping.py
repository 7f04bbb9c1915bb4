"""docs/keras_mapping.md stays true: every code block runs, every Keras argument has a row and code.

The regularizer and constraint functions of the page are also checked against
Keras' own (``layer.losses``, ``keras.constraints.MaxNorm``).
"""

from __future__ import annotations

import inspect
import pathlib
import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "keras_mapping.md"
TEXT = PAGE.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.DOTALL)
SETUP, EXAMPLES = BLOCKS[0], BLOCKS[1:]


def _covered(block: str) -> list[str]:
    """The Keras arguments a block names in its ``# Keras: a, b`` lines."""
    return [name.strip() for line in re.findall(r"^# Keras: (.*)$", block, re.MULTILINE) for name in line.split(",")]


@pytest.fixture(scope="module")
def setup_namespace():
    namespace: dict = {}
    exec(compile(SETUP, f"{PAGE}:setup", "exec"), namespace)  # noqa: S102 (the page's own code)
    return namespace


@pytest.fixture(scope="module")
def namespaces(setup_namespace):
    """Each example run once, in its own copy of the setup namespace."""
    results = {}
    for index, block in enumerate(EXAMPLES):
        namespace = dict(setup_namespace)
        exec(compile(block, f"{PAGE}:block{index}", "exec"), namespace)  # noqa: S102
        results[index] = namespace
    return results


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=[_covered(b)[0] for b in EXAMPLES])
def test_code_block_runs(namespaces, index):
    assert namespaces[index]  # the block ran (its asserts passed) in the fixture


def test_every_keras_argument_has_a_row_and_code():
    names = set()
    for cls in (keras.layers.GroupQueryAttention, keras.layers.MultiHeadAttention):
        names |= set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(cls.call).parameters)
    names |= {
        p.name for p in inspect.signature(keras.layers.Layer.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    names -= {"self", "kwargs"}
    table = {name for row in re.findall(r"^\| (.*?) \|", TEXT, re.MULTILINE) for name in re.findall(r"`(\w+)`", row)}
    assert names <= table, f"Keras arguments without a row: {sorted(names - table)}"
    coded = {name for block in EXAMPLES for name in _covered(block)}
    assert table - {"Keras"} <= coded, f"rows without code: {sorted(table - coded)}"


def _namespace_with(namespaces, function_name):
    return next(ns for ns in namespaces.values() if function_name in ns and callable(ns[function_name]))


def test_regularizer_code_matches_keras_losses(namespaces):
    ns = _namespace_with(namespaces, "weight_penalty")
    params, x = ns["params"], np.asarray(ns["x"])
    keras_layer = keras.layers.GroupQueryAttention(
        head_dim=8,
        num_query_heads=4,
        num_key_value_heads=2,
        kernel_initializer="zeros",
        kernel_regularizer=keras.regularizers.L2(3e-3),
        bias_regularizer=keras.regularizers.L1(2e-2),
        activity_regularizer=keras.regularizers.L2(5e-3),
    )
    keras_layer.build(x.shape, x.shape)
    rng = np.random.default_rng(0)
    for variable in keras_layer.weights:  # our params, biases made nonzero
        sublayer, name = variable.path.split("/")[-2:]
        value = np.asarray(params[sublayer][name])
        variable.assign(value if name == "kernel" else rng.standard_normal(value.shape).astype(np.float32))
    keras_layer(x, x)
    params = {
        s: {
            n: np.asarray(v.value)
            for n, v in [(w.path.split("/")[-1], w) for w in keras_layer.weights if w.path.split("/")[-2] == s]
        }
        for s in params
    }
    ours = ns["weight_penalty"](params, kernel_l2=3e-3, bias_l1=2e-2) + ns["activity_penalty"](params, x, rate=5e-3)
    np.testing.assert_allclose(ours, sum(float(loss) for loss in keras_layer.losses), rtol=1e-5)


def test_max_norm_code_matches_keras_constraint(namespaces):
    ns = _namespace_with(namespaces, "max_norm")
    w = np.random.default_rng(1).standard_normal((16, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(ns["max_norm"](w, 2.0), keras.constraints.MaxNorm(2.0)(w), rtol=1e-6)
