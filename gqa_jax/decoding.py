"""Autoregressive generation: ragged prefill, then a jitted loop, for any model that follows a small protocol.

`generate` writes every row's prompt (right-padded, per-row lengths) into the
model's cache in one forward pass, samples the first new token from each
row's last prompt position, then runs a ``lax.while_loop`` that feeds one
token per row per step through the cache until every row has produced its end
token or ``max_new_tokens`` tokens. The whole thing is one ``jax.jit`` call
that compiles once per shape and sampling setting; the cache is donated to it,
so the loop updates its buffers in place instead of copying them.

`generate_without_cache` produces the same tokens by recomputing the full
causal forward pass over the whole sequence at every step: the baseline that
the cache is measured against (and the oracle of the cache's tests).

The protocol. ``model`` is hashable (it is a static argument of ``jax.jit``;
flax linen modules are) and has

* ``model.apply(variables, tokens, cache, num_new=num_new) -> (logits, cache)``
  with ``variables = {"params": params}``: int32 ``tokens [B, T]`` continue
  each row after the tokens already in ``cache`` (any pytree); only the first
  ``num_new[b]`` (int32 ``[B]``; None: all ``T``) tokens of row ``b`` are
  real. ``logits [B, T, V]`` are floats; the returned cache has the input's
  structure, shapes and dtypes.
* ``model.init_cache(batch_size, max_length) -> cache``: an empty cache for
  ``max_length`` tokens per row (needed only when ``generate`` gets no
  ``cache=``).
* for `generate_without_cache`: ``model.apply(variables, tokens) -> logits
  [B, T, V]``, causal.

`gqa_jax.models.Decoder` follows it; a `gqa_jax.nnx.Decoder` (with
``params=None``) runs through the linen definition with its own weights (the
two have one parameter tree). Another model gets a ``TypeError`` naming what
it lacks or what its ``apply`` returned.

Example::

    from gqa_jax.models import Decoder, DecoderConfig
    prompts, prompt_lengths = jnp.array([[3, 4, 5], [6, 7, 0]]), jnp.array([3, 2])  # row 1: 2 tokens
    model = Decoder(DecoderConfig(vocab_size=16))
    params = model.init(jax.random.key(0), prompts)["params"]
    out = generate(model, params, prompts, prompt_lengths, max_new_tokens=8, end_token=1)
    out.tokens          # [B, 8], pad_token after each row's end token
    out.num_generated   # [B], end token included
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.cache_bookkeeping import first_layers_bookkeeping, same_bookkeeping, through_shared_bookkeeping
from gqa_jax.kv_cache import KVCache
from gqa_jax.models import Decoder, check_token_ids
from gqa_jax.nnx.decoder import linen_decoder
from gqa_jax.paged_kv_cache import PagedKVCache
from gqa_jax.request import concrete_value
from pallas_kernels.arguments import positive_int
from pallas_kernels.rules import check_int32_range

Array = jax.Array


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits.

    Attributes:
      temperature: 0 for greedy (argmax); otherwise logits are divided by it
        and a token is drawn at random.
      top_k: keep only the ``top_k`` most likely tokens (None: all).
      top_p: keep the smallest set of most likely tokens whose probability
        reaches ``top_p`` (nucleus sampling; None: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a non-negative finite float, got temperature={self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got top_k={self.top_k!r}")
        if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got top_p={self.top_p!r}")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ValueError(
                f"top_k={self.top_k} and top_p={self.top_p} only apply when sampling; "
                f"set temperature > 0, got temperature={self.temperature}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_tokens(logits: Array, rng, sampling: Sampling) -> Array:
    """Picks one token per row.

    Args:
      logits: ``[B, V]`` next-token logits.
      rng: PRNG key (unused when greedy).
      sampling: the rule.

    Returns:
      int32 ``[B]`` token ids.
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits_BV = logits.astype(jnp.float32) / sampling.temperature
    V = logits_BV.shape[-1]
    if sampling.top_k is not None:
        if sampling.top_k > V:
            raise ValueError(f"top_k={sampling.top_k} must be <= the vocabulary size V={V}")
        kth_largest = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV >= kth_largest, logits_BV, -jnp.inf)
    if sampling.top_p is not None:
        descending = -jnp.sort(-logits_BV, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p  # the most likely token always stays
        threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= threshold, logits_BV, -jnp.inf)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns.

    Attributes:
      tokens: int32 ``[B, max_new_tokens]``: each row's new tokens, its end
        token included, then ``pad_token``.
      num_generated: int32 ``[B]``: tokens each row produced (end included).
      cache: the cache after the last step (`generate` only; None for
        `generate_without_cache`). It holds the prompts and every fed token,
        i.e. all new tokens but the last; rows that stopped early kept
        feeding their end token while others ran, so their ``lengths`` may
        pass their real end.
    """

    tokens: Array
    num_generated: Array
    cache: object


PROTOCOL = (
    "apply(variables, tokens, cache, num_new=...) -> (logits [B,T,V], cache), and init_cache(batch_size, "
    "max_length) unless cache= is given (gqa_jax.decoding's docstring)"
)


def _check_model(model, *, needs_init_cache: bool) -> None:
    """Raises ``TypeError`` unless ``model`` has the protocol's methods (``init_cache`` only when it is needed)."""
    missing = [name for name, needed in (("apply", True), ("init_cache", needs_init_cache))
               if needed and not callable(getattr(model, name, None))]
    if missing:
        raise TypeError(
            f"model must follow the decoding protocol ({PROTOCOL}), e.g. a gqa_jax.models.Decoder; got model of "
            f"type {type(model).__name__} without {' or '.join(missing)}"
        )
    try:
        hash(model)
    except TypeError as error:
        raise TypeError(f"model must be hashable (a static argument of jax.jit), got model of type "
                        f"{type(model).__name__}: {error}") from None


def _check_prompt(prompt, prompt_lengths, max_new_tokens: int, sampling) -> tuple[Array, Array]:
    """``prompt`` int32 ``[B, P]`` and its lengths int32 ``[B]`` (default ``P``), checked with the settings."""
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a gqa_jax.decoding.Sampling, got {sampling=}")
    prompt_BP = jnp.asarray(prompt)
    if prompt_BP.ndim != 2:
        raise ValueError(f"prompt must have rank 2 [B,P], got prompt.shape={tuple(prompt_BP.shape)}")
    if not jnp.issubdtype(prompt_BP.dtype, jnp.integer):
        raise TypeError(f"prompt must be int token ids, got prompt.dtype={prompt_BP.dtype}")
    B, P = prompt_BP.shape
    if P < 1 or B < 1:
        raise ValueError(f"prompts need a row and at least one token, got prompt.shape={tuple(prompt_BP.shape)}")
    positive_int("max_new_tokens", max_new_tokens)
    if prompt_lengths is None:
        lengths_B = jnp.full((B,), P, jnp.int32)
    else:
        lengths_B = jnp.asarray(prompt_lengths)
        if lengths_B.shape != (B,):
            raise ValueError(f"prompt_lengths must have shape [B]=({B},), got prompt_lengths.shape={lengths_B.shape}")
        if not jnp.issubdtype(lengths_B.dtype, jnp.integer):
            raise TypeError(f"prompt_lengths must be an int array, got prompt_lengths.dtype={lengths_B.dtype}")
        values = concrete_value(lengths_B)
        if values is not None and ((values < 1) | (values > P)).any():
            raise ValueError(f"prompt_lengths must be in [1, P={P}], got prompt_lengths={values.tolist()}")
    return prompt_BP.astype(jnp.int32), lengths_B.astype(jnp.int32)


def _vocab_size(model, params, prompt_BP: Array, lengths_B: Array, cache=None) -> int:
    """``V`` of the model's logits: a `Decoder`'s config, or the shapes of one prefill call (traced, not run).

    Raises:
      TypeError: naming what ``model.apply`` returned, unless it is ``(logits
        [B, P, V] float, cache)`` with the input cache's structure, shapes and
        dtypes (``logits [B, P, V]`` alone without a cache).
    """
    if isinstance(model, Decoder):
        return model.config.vocab_size  # its shapes are checked by its own calls; no extra trace
    B, P = prompt_BP.shape
    if cache is None:
        logits = jax.eval_shape(lambda p, t: model.apply({"params": p}, t), params, prompt_BP)
        new_cache = None
    else:
        out = jax.eval_shape(lambda p, t, c, n: model.apply({"params": p}, t, c, num_new=n), params, prompt_BP,
                             cache, lengths_B)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"model.apply(variables, tokens, cache, num_new=...) must return (logits, cache), got "
                            f"{jax.tree.map(lambda x: x.shape, out)}")
        logits, new_cache = out
        given = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
        returned = jax.tree.map(lambda x: (x.shape, x.dtype), new_cache)
        if jax.tree.structure(cache) != jax.tree.structure(new_cache) or given != returned:
            raise TypeError(f"model.apply must return a cache of the structure, shapes and dtypes it got: given "
                            f"{given}, returned {returned}")
    if not (hasattr(logits, "shape") and len(logits.shape) == 3 and logits.shape[:2] == (B, P)
            and jnp.issubdtype(logits.dtype, jnp.floating)):
        raise TypeError(f"model.apply must return float logits [B,P,V] with (B, P)={(B, P)}, got "
                        f"{jax.tree.map(lambda x: (x.shape, x.dtype), logits)}")
    return int(logits.shape[2])


def _check_cache(model, cache, batch_size: int, prompt_length: int, max_new_tokens: int) -> None:
    """Raises unless a `Decoder`'s cache is one `KVCache` (or `PagedKVCache`) per layer for ``batch_size`` rows,
    and every cache in ``cache`` has room (and a paged one the free pages) for ``prompt_length + max_new_tokens``
    more tokens per row."""
    if isinstance(model, Decoder):
        config = model.config
        if not isinstance(cache, (tuple, list)) or not all(isinstance(c, (KVCache, PagedKVCache)) for c in cache):
            raise TypeError(
                f"cache must be a tuple of KVCache (gqa_jax.models.init_cache) or PagedKVCache, got "
                f"{type(cache).__name__}"
            )
        if len(cache) != config.num_layers:
            raise ValueError(
                f"cache must hold one KVCache per layer: len(cache)={len(cache)} != {config.num_layers=}"
            )
        expected = (batch_size, config.num_kv_heads, config.head_dim)
        for i, layer in enumerate(cache):
            if isinstance(layer, PagedKVCache):
                got = (layer.batch_size, layer.key_pages.shape[2], layer.key_pages.shape[3])
                if got != expected:
                    raise ValueError(
                        f"cache[{i}] must hold (B, K, H)={expected} for this prompt and model, got "
                        f"cache[{i}].page_table.shape={tuple(layer.page_table.shape)}, "
                        f"cache[{i}].key_pages.shape={tuple(layer.key_pages.shape)}"
                    )
                continue
            got = (layer.key.shape[0], layer.key.shape[2], layer.key.shape[3])
            if got != expected:
                raise ValueError(
                    f"cache[{i}].key must have shape [B,S,K,H]=({batch_size}, S, {config.num_kv_heads}, "
                    f"{config.head_dim}) for this prompt and model, got cache[{i}].key.shape={tuple(layer.key.shape)}"
                )
    caches = (KVCache, PagedKVCache)
    for layer in jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, caches)):
        if not isinstance(layer, caches):
            continue
        used = concrete_value(layer.lengths)
        used = 0 if used is None else int(used.max())
        if used + prompt_length + max_new_tokens > layer.capacity:
            raise ValueError(
                f"the cache cannot hold the prompts and new tokens: cache lengths (max {used}) + prompt length "
                f"P={prompt_length} + {max_new_tokens=} = {used + prompt_length + max_new_tokens} > cache "
                f"capacity={layer.capacity}"
            )
        if isinstance(layer, PagedKVCache):
            needed, free = (concrete_value(x) for x in (layer.pages_needed(prompt_length + max_new_tokens),
                                                         layer.num_free))
            if needed is not None and free is not None and needed.sum() > free:
                raise ValueError(
                    f"the page pool cannot hold the prompts and new tokens: P={prompt_length} + {max_new_tokens=} "
                    f"more tokens per row need {int(needed.sum())} pages, num_free={int(free)}"
                )


def _check_rng(rng, sampling: Sampling):
    if rng is not None:
        return rng
    if not sampling.greedy:
        raise ValueError(f"sampling with temperature={sampling.temperature} needs an rng key, got rng=None")
    return jax.random.key(0)  # never drawn from


def _token_ids(end_token: int | None, pad_token: int, vocab_size: int) -> tuple[Array, Array]:
    """Traced (so changing them does not recompile); -1 never matches a sampled token.

    ``end_token`` must be a token the model can sample, ``[0, V)``; ``pad_token``
    is any int32 (it is never fed to the model).
    """
    for name, value in (("end_token", end_token), ("pad_token", pad_token)):
        if value is not None and not _is_int(value):
            raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if end_token is not None and not 0 <= end_token < vocab_size:
        raise ValueError(f"end_token must be in [0, vocab_size={vocab_size}), got {end_token=}")
    check_int32_range("pad_token", pad_token)
    end = -1 if end_token is None else end_token
    return jnp.asarray(end, jnp.int32), jnp.asarray(pad_token, jnp.int32)


def _sample_loop(step, state, logits_BV, rng, *, max_new_tokens, sampling, end_token, pad_token):
    """The loop shared by both paths; returns ``(tokens, num_generated, state)``.

    ``step(state, tokens_B, i) -> (logits_BV, state)`` feeds new token ``i - 1`` and gives the logits of token ``i``.
    """
    B = logits_BV.shape[0]
    rng, first_rng = jax.random.split(rng)
    token = sample_tokens(logits_BV, first_rng, sampling)
    tokens = jnp.full((B, max_new_tokens), pad_token, jnp.int32).at[:, 0].set(token)
    done = token == end_token
    count = jnp.ones((B,), jnp.int32)

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, last, done, count, state, rng = carry
        logits_BV, state = step(state, last, i)
        rng, step_rng = jax.random.split(rng)
        token = jnp.where(done, pad_token, sample_tokens(logits_BV, step_rng, sampling))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        count = count + (~done).astype(jnp.int32)
        last = jnp.where(done, last, token)  # stopped rows keep feeding their end token, a valid id
        done = done | (token == end_token)
        return i + 1, tokens, last, done, count, state, rng

    carry = (jnp.ones((), jnp.int32), tokens, token, done, count, state, rng)
    _, tokens, _, _, count, state, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, count, state


def _zero_padding(prompt_BP: Array, lengths_B: Array) -> Array:
    """Token 0 in place of the padding (which may hold ids outside the vocabulary, e.g. -1)."""
    return jnp.where(jnp.arange(prompt_BP.shape[1])[None, :] < lengths_B[:, None], prompt_BP, 0)


def _last_valid(logits_BTV: Array, lengths_B: Array) -> Array:
    """``logits_BTV[b, lengths_B[b] - 1]``: ``[B, V]``."""
    return jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]


_STATIC = ("model", "max_new_tokens", "sampling")


def decode_step(model, variables, cache, tokens_B: Array, *, shared_bookkeeping: bool = False
                ) -> tuple[Array, object]:
    """One step of a generation loop: the model on one new token per row, through its cache.

    Args:
      model: a model of the protocol (module docstring).
      variables: ``{"params": params}``.
      cache: the model's cache.
      tokens_B: int32 ``[B]`` the new token of each row.
      shared_bookkeeping: for a `gqa_jax.models.Decoder` whose layers' caches
        agree (`gqa_jax.cache_bookkeeping.same_bookkeeping`): the step runs
        `gqa_jax.cache_bookkeeping.through_shared_bookkeeping` (the lengths,
        slots and page allocation computed once for all layers; the layers
        after the first come back with stale bookkeeping, which
        `gqa_jax.cache_bookkeeping.first_layers_bookkeeping` mends after the
        loop).

    Returns:
      ``(logits_BV, cache)``.

    Raises:
      TypeError, ValueError: with ``shared_bookkeeping``, for a cache that is
        not a tuple of caches of one type and geometry.
    """
    def apply(cache):
        logits_B1V, cache = model.apply(variables, tokens_B[:, None], cache)
        return logits_B1V[:, 0], cache

    return through_shared_bookkeeping(apply, cache) if shared_bookkeeping else apply(cache)


@functools.partial(jax.jit, static_argnames=_STATIC + ("shared_bookkeeping",), donate_argnames=("cache",))
def _generate_cached(model, params, prompt_BP, lengths_B, cache, rng, end_token, pad_token, *, max_new_tokens,
                     sampling, shared_bookkeeping):
    variables = {"params": params}
    if shared_bookkeeping:
        cache = first_layers_bookkeeping(cache)
    logits_BPV, cache = model.apply(variables, _zero_padding(prompt_BP, lengths_B), cache, num_new=lengths_B)
    tokens, count, cache = _sample_loop(
        lambda cache, tokens_B, i: decode_step(model, variables, cache, tokens_B,
                                               shared_bookkeeping=shared_bookkeeping),
        cache, _last_valid(logits_BPV, lengths_B), rng,
        max_new_tokens=max_new_tokens, sampling=sampling, end_token=end_token, pad_token=pad_token,
    )
    return Generation(tokens, count, first_layers_bookkeeping(cache) if shared_bookkeeping else cache)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_uncached(model, params, prompt_BP, lengths_B, rng, end_token, pad_token, *, max_new_tokens, sampling):
    variables = {"params": params}
    B = prompt_BP.shape[0]
    rows = jnp.arange(B)
    sequence = jnp.pad(_zero_padding(prompt_BP, lengths_B), ((0, 0), (0, max_new_tokens)))

    def step(sequence, tokens_B, i):
        position = lengths_B + i - 1
        sequence = sequence.at[rows, position].set(tokens_B)
        return model.apply(variables, sequence)[rows, position], sequence

    tokens, count, _ = _sample_loop(
        step, sequence, _last_valid(model.apply(variables, sequence), lengths_B), rng,
        max_new_tokens=max_new_tokens, sampling=sampling, end_token=end_token, pad_token=pad_token,
    )
    return Generation(tokens, count, None)


def generate(
    model,
    params,
    prompt,
    prompt_lengths=None,
    *,
    max_new_tokens: int,
    cache=None,
    sampling: Sampling = Sampling(),
    end_token: int | None = None,
    pad_token: int = 0,
    rng=None,
) -> Generation:
    """Generates up to ``max_new_tokens`` tokens per row through the model's cache.

    Args:
      model: a model of the protocol (module docstring), e.g. the
        `gqa_jax.models.Decoder`, or a `gqa_jax.nnx.Decoder` (run through the
        linen definition with its own weights: the same parameter tree).
      params: the model's ``params`` collection (``apply`` gets ``{"params":
        params}``); None for an NNX model.
      prompt: int ``[B, P]`` prompts, right-padded (the padding may hold any int).
      prompt_lengths: optional int ``[B]`` real prompt lengths, each in
        ``[1, P]``; default ``P``.
      max_new_tokens: the most tokens generated per row.
      cache: optional cache (for a `Decoder`: from `gqa_jax.models.init_cache`),
        empty or holding earlier tokens that the prompts continue. It is
        donated: do not use it after the call; use ``Generation.cache``.
        Default: ``model.init_cache(B, P + max_new_tokens)``. The layers of a
        `Decoder`'s cache that agree (built alike:
        `gqa_jax.cache_bookkeeping.same_bookkeeping`) share one update of
        their lengths, slots and pages per step (`decode_step`); layers that
        differ each update their own.
      sampling: greedy by default.
      end_token: a row stops after producing it (None: rows run to
        ``max_new_tokens``).
      pad_token: fills the tokens after a row's end (any int; never fed to the model).
      rng: PRNG key; needed unless greedy.

    Returns:
      A `Generation`.

    Raises:
      ValueError: for bad prompts or lengths, token ids outside the model's
        vocabulary, or a `gqa_jax.KVCache` (or `gqa_jax.paged_kv_cache.PagedKVCache`:
        row capacity or free pages) that cannot hold ``P + max_new_tokens``
        more tokens per row.
      TypeError: for a model outside the protocol (naming what it lacks or
        what its ``apply`` returned), or an NNX model with ``params``.
    """
    model, params = linen_decoder(model, params)
    _check_model(model, needs_init_cache=cache is None)
    prompt_BP, lengths_B = _check_prompt(prompt, prompt_lengths, max_new_tokens, sampling)
    B, P = prompt_BP.shape
    if cache is None:
        cache = model.init_cache(B, P + max_new_tokens)
    _check_cache(model, cache, B, P, max_new_tokens)
    cache = tuple(cache) if isinstance(cache, list) else cache
    vocab_size = _vocab_size(model, params, _zero_padding(prompt_BP, lengths_B), lengths_B, cache)
    check_token_ids("prompt", prompt_BP, vocab_size, lengths_B)
    return _generate_cached(
        model, params, prompt_BP, lengths_B, cache, _check_rng(rng, sampling),
        *_token_ids(end_token, pad_token, vocab_size), max_new_tokens=int(max_new_tokens), sampling=sampling,
        shared_bookkeeping=isinstance(model, Decoder) and same_bookkeeping(cache),
    )


def generate_without_cache(
    model,
    params,
    prompt,
    prompt_lengths=None,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    end_token: int | None = None,
    pad_token: int = 0,
    rng=None,
) -> Generation:
    """`generate` that recomputes the whole ``[B, P + max_new_tokens]`` causal pass at every step.

    Same arguments (no cache) and, for the same ``rng``, the same tokens as
    `generate` up to floating-point rounding; quadratically more work. It is
    the baseline that cached decoding is measured against. The model needs
    only ``model.apply(variables, tokens) -> logits [B, T, V]``.
    """
    model, params = linen_decoder(model, params)
    _check_model(model, needs_init_cache=False)
    prompt_BP, lengths_B = _check_prompt(prompt, prompt_lengths, max_new_tokens, sampling)
    vocab_size = _vocab_size(model, params, _zero_padding(prompt_BP, lengths_B), lengths_B)
    check_token_ids("prompt", prompt_BP, vocab_size, lengths_B)
    return _generate_uncached(
        model, params, prompt_BP, lengths_B, _check_rng(rng, sampling),
        *_token_ids(end_token, pad_token, vocab_size), max_new_tokens=int(max_new_tokens), sampling=sampling,
    )
