"""The demo's task: sort or reverse a string of digits, as next-token prediction.

One character per token. An example reads ``S31415=11345.`` (sort) or
``R31415=51413.`` (reverse): an operation, ``k`` digits, ``=``, the answer,
and the end token ``.``. The prompt is everything up to and including ``=``
(``k + 2`` tokens, so a batch of prompts is ragged); the model is trained on
the answer and the end token only. A person can check every output at a
glance, and exact-match accuracy measures the result.
"""

from __future__ import annotations

import dataclasses

import numpy as np

VOCAB = "0123456789SR=."
OPERATIONS = ("sort", "reverse")
_OP_TOKEN = (VOCAB.index("S"), VOCAB.index("R"))
EQUALS = VOCAB.index("=")
END = VOCAB.index(".")


@dataclasses.dataclass(frozen=True)
class Examples:
    """A batch of problems.

    Attributes:
      ops: int ``[n]``, an index into `OPERATIONS`.
      digits: int ``[n, max_digits]``; row ``i`` uses its first ``lengths[i]``.
      lengths: int ``[n]``, at least 1.
    """

    ops: np.ndarray
    digits: np.ndarray
    lengths: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, n: int, max_digits: int) -> "Examples":
        """``n`` problems with 1 to ``max_digits`` digits and a random operation."""
        return cls(
            ops=rng.integers(0, len(OPERATIONS), n),
            digits=rng.integers(0, 10, (n, max_digits)),
            lengths=rng.integers(1, max_digits + 1, n),
        )

    @classmethod
    def from_strings(cls, problems: list[tuple[str, str]], max_digits: int) -> "Examples":
        """Problems given as ``(operation, digit string)``, e.g. ``("sort", "31415")``."""
        for op, text in problems:
            if op not in OPERATIONS:
                raise ValueError(f"operation must be one of {OPERATIONS}, got {op=}")
            if not (text.isdigit() and 1 <= len(text) <= max_digits):
                raise ValueError(f"a prompt must be 1 to {max_digits=} digits, got {text!r}")
        digits = np.zeros((len(problems), max_digits), np.int64)
        for i, (_, text) in enumerate(problems):
            digits[i, : len(text)] = [int(c) for c in text]
        return cls(
            ops=np.array([OPERATIONS.index(op) for op, _ in problems], np.int64),
            digits=digits,
            lengths=np.array([len(text) for _, text in problems], np.int64),
        )

    @property
    def max_digits(self) -> int:
        return self.digits.shape[1]

    def answers(self) -> np.ndarray:
        """int ``[n, max_digits]``: the sorted or reversed digits, left-aligned."""
        n, width = self.digits.shape
        position = np.arange(width)[None, :]
        valid = position < self.lengths[:, None]
        sorted_digits = np.sort(np.where(valid, self.digits, 10), axis=1)
        reversed_index = np.clip(self.lengths[:, None] - 1 - position, 0, width - 1)
        reversed_digits = np.take_along_axis(self.digits, reversed_index, axis=1)
        answer = np.where(self.ops[:, None] == 0, sorted_digits, reversed_digits)
        return np.where(valid, answer, 0)

    def prompts(self) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded prompts int32 ``[n, max_digits + 2]`` and their lengths ``[n]`` (``k + 2``)."""
        n, width = self.digits.shape
        tokens = np.zeros((n, width + 2), np.int32)
        tokens[:, 0] = np.take(_OP_TOKEN, self.ops)
        tokens[:, 1 : width + 1] = self.digits
        tokens[np.arange(n), self.lengths + 1] = EQUALS
        return tokens, (self.lengths + 2).astype(np.int32)

    def training_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Whole sequences int32 ``[n, 2 * max_digits + 3]`` and float32 weights ``[n, 2 * max_digits + 2]``.

        ``weights[i, t]`` is 1 where token ``t + 1`` of row ``i`` is part of
        the answer (end token included): the loss covers those predictions.
        """
        n, width = self.digits.shape
        prompt, prompt_lengths = self.prompts()
        tokens = np.zeros((n, 2 * width + 3), np.int32)
        tokens[:, : width + 2] = prompt
        tokens[np.arange(n)[:, None], prompt_lengths[:, None] + np.arange(width)] = self.answers()  # 0 past k
        tokens[np.arange(n), prompt_lengths + self.lengths] = END
        target = np.arange(1, 2 * width + 3)[None, :]
        weights = (target >= prompt_lengths[:, None]) & (target <= (prompt_lengths + self.lengths)[:, None])
        return tokens, weights.astype(np.float32)


def decode(tokens) -> str:
    """Token ids to text, up to (not including) the first end token."""
    text = "".join(VOCAB[t] if 0 <= t < len(VOCAB) else "?" for t in np.asarray(tokens).tolist())
    return text.split(".")[0]
