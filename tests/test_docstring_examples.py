"""Every ``Example::`` block in the docstrings of `gqa_jax` and `pallas_kernels` runs.

The collector imports every module of the two packages and reads the
docstrings of the module, of the classes and functions it defines, and of
their methods and properties. A block is the indented text after a line that
ends in ``Example::`` or ``Examples::`` (reST literal blocks). Each runs on
CPU in a fresh namespace that holds ``jax``, ``jnp`` (``jax.numpy``), ``np``
(``numpy``) and the public names the module defines; anything else the
example imports itself, as a reader would. Shell commands go under another
heading (``Usage (shell)::``) and are not run here.

The README's ``Layers`` and ``Models`` snippets run here too (the ``Flax NNX``
one runs in ``tests/test_examples.py``).
"""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
import pallas_kernels

README = Path(__file__).resolve().parent.parent / "README.md"


HEADING = re.compile(r"^(\s*)(?:.*\s)?Examples?::\s*$")


def _modules():
    """Every module of the two packages, namespace packages (no ``__init__.py``) included."""
    for package in (gqa_jax, pallas_kernels):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root.parent).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _docstrings(module):
    """``(qualified name, docstring)`` of the module and of what it defines."""
    yield module.__name__, module.__doc__
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__ or not (inspect.isclass(obj) or callable(obj)):
            continue
        yield f"{module.__name__}.{name}", inspect.getdoc(obj) and obj.__doc__
        if inspect.isclass(obj):
            for member_name, member in vars(obj).items():
                member = getattr(member, "__func__", member)
                if inspect.isfunction(member) or isinstance(member, property):
                    yield f"{module.__name__}.{name}.{member_name}", member.__doc__


def literal_blocks(doc: str) -> list[str]:
    """The dedented literal blocks after the ``Example::`` / ``Examples::`` lines of ``doc``."""
    lines = textwrap.dedent(doc).splitlines() if doc.startswith((" ", "\n")) else _dedent_tail(doc)
    blocks = []
    for i, line in enumerate(lines):
        heading = HEADING.match(line)
        if not heading:
            continue
        indent = len(heading.group(1))
        body = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def _dedent_tail(doc: str) -> list[str]:
    """A docstring's lines with the indentation of its second and later lines removed (its first has none)."""
    first, _, rest = doc.partition("\n")
    return [first, *textwrap.dedent(rest).splitlines()]


def _examples():
    for module_name in _modules():
        module = importlib.import_module(module_name)
        for qualname, doc in _docstrings(module):
            for i, block in enumerate(literal_blocks(doc or "")):
                yield pytest.param(module_name, block, id=f"{qualname}[{i}]")


EXAMPLES = list(_examples())


def _namespace(module_name: str) -> dict:
    module = importlib.import_module(module_name)
    public = {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_") and getattr(obj, "__module__", None) == module_name
    }
    return {"__name__": f"example_of_{module_name}", "jax": jax, "jnp": jnp, "np": np, **public}


def test_examples_are_collected():
    """The collector finds the examples (a broken heading pattern would silently run nothing)."""
    ids = {param.id for param in EXAMPLES}
    assert len(EXAMPLES) >= 8, ids
    assert "gqa_jax.masks[0]" in ids and "gqa_jax.modules.cached_multi_head_attention.CachedMultiHeadAttention[0]" in ids


@pytest.mark.parametrize(("module_name", "block"), EXAMPLES)
def test_docstring_example_runs(module_name, block):
    exec(compile(block, f"<example in {module_name}>", "exec"), _namespace(module_name))


def readme_python_blocks(section: str) -> list[str]:
    """The python blocks of the README's ``## section``, before its first ``###`` subsection."""
    text = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # about 15 s of compiling on one CPU core each
@pytest.mark.parametrize("section", ["Layers", "Models"])
def test_readme_snippet_runs(section):
    if section == "Models":
        pytest.importorskip("transformers", reason="the Models snippet builds a transformers model")
    (block,) = readme_python_blocks(section)
    exec(compile(block, f"{README}:{section}", "exec"), {"__name__": f"readme_{section}"})
