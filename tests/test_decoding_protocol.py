"""`gqa_jax.decoding.generate` with a model that is not a `Decoder` but follows the protocol, against NumPy."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax.decoding import generate, generate_without_cache

V = 13


@dataclasses.dataclass(frozen=True)
class RunningSum:
    """Next-token logits ``table[(x_1 + ... + x_t) % V]``; its cache is each row's running sum (a dict)."""

    def init_cache(self, batch_size, max_length):
        return {"sum": jnp.zeros((batch_size,), jnp.int32)}

    def apply(self, variables, tokens, cache=None, *, num_new=None):
        table = variables["params"]["table"]
        B, T = tokens.shape
        if cache is None:
            return table[jnp.cumsum(tokens, axis=1) % V]
        real = jnp.arange(T)[None, :] < (T if num_new is None else num_new[:, None])
        sums = cache["sum"][:, None] + jnp.cumsum(jnp.where(real, tokens, 0), axis=1)
        return table[sums % V], {"sum": sums[:, -1]}


def oracle(table, prompt, lengths, max_new_tokens):
    out = []
    for row, n in zip(prompt, lengths):
        state, tokens = int(row[:n].sum()) % V, []
        for _ in range(max_new_tokens):
            tokens.append(int(np.argmax(table[state])))
            state = (state + tokens[-1]) % V
        out.append(tokens)
    return np.array(out)


def _setup():
    rng = np.random.default_rng(7)
    table = rng.standard_normal((V, V)).astype(np.float32)
    lengths = np.array([5, 2, 4])
    prompt = rng.integers(0, V, (3, 5))
    prompt[np.arange(5)[None, :] >= lengths[:, None]] = -1  # padding is never fed
    return {"table": jnp.asarray(table)}, prompt, lengths


def test_a_protocol_model_generates_greedy_tokens_with_and_without_its_cache():
    params, prompt, lengths = _setup()
    expected = oracle(np.asarray(params["table"]), prompt, lengths, 6)
    out = generate(RunningSum(), params, prompt, lengths, max_new_tokens=6)
    np.testing.assert_array_equal(out.tokens, expected)
    assert set(out.cache) == {"sum"}
    uncached = generate_without_cache(RunningSum(), params, prompt, lengths, max_new_tokens=6)
    np.testing.assert_array_equal(uncached.tokens, expected)


class NoCacheLogits(RunningSum):
    def apply(self, variables, tokens, cache=None, *, num_new=None):
        out = super().apply(variables, tokens, cache, num_new=num_new)
        return out[0] if cache is not None else out


class GrowingCache(RunningSum):
    def apply(self, variables, tokens, cache=None, *, num_new=None):
        logits, cache = super().apply(variables, tokens, cache, num_new=num_new)
        return logits, {"sum": cache["sum"], "extra": cache["sum"]}


class FlatLogits(RunningSum):
    def apply(self, variables, tokens, cache=None, *, num_new=None):
        logits, cache = super().apply(variables, tokens, cache, num_new=num_new)
        return logits[:, -1], cache


class Unhashable(RunningSum):
    __hash__ = None


class NoInitCache:
    __hash__ = object.__hash__
    apply = RunningSum.apply


@pytest.mark.parametrize("model, cache, error, message", [
    (object(), None, TypeError, r"model must follow the decoding protocol .*got model of type object without apply"),
    (NoInitCache(), None, TypeError, r"got model of type NoInitCache without init_cache"),
    (NoCacheLogits(), None, TypeError, r"must return \(logits, cache\), got \(3, 5, 13\)"),
    (GrowingCache(), None, TypeError, r"must return a cache of the structure, shapes and dtypes it got: given "
                                      r"\{'sum'.*returned \{'extra'"),
    (FlatLogits(), None, TypeError, r"float logits \[B,P,V\] with \(B, P\)=\(3, 5\), got \(\(3, 13\), "),
    (Unhashable(), None, TypeError, r"model must be hashable"),
])
def test_models_outside_the_protocol_are_refused_naming_what_they_lack(model, cache, error, message):
    params, prompt, lengths = _setup()
    with pytest.raises(error, match=message):
        generate(model, params, prompt, lengths, max_new_tokens=2, cache=cache)


def test_a_model_without_init_cache_runs_with_a_given_cache_and_checks_token_ids():
    params, prompt, lengths = _setup()
    cache = {"sum": jnp.zeros((3,), jnp.int32)}
    out = generate(NoInitCache(), params, prompt, lengths, max_new_tokens=3, cache=cache)
    np.testing.assert_array_equal(out.tokens, oracle(np.asarray(params["table"]), prompt, lengths, 3))
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, vocab_size=13\), got prompt\[0, 1\]=13"):
        generate(RunningSum(), params, np.where(np.arange(5) == 1, V, prompt), lengths, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"end_token must be in \[0, vocab_size=13\), got end_token=13"):
        generate(RunningSum(), params, prompt, lengths, max_new_tokens=2, end_token=13)
