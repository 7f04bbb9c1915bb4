"""``python -m gqa_jax.demo``: train a small grouped-query-attention decoder, then decode with its KV cache.

Trains the reference decoder (`gqa_jax.models.Decoder`) from scratch to sort
or reverse strings of digits (`gqa_jax.demo.task`; nothing is downloaded), with
a progress bar showing the loss (``--save PATH`` keeps the trained model,
``--load PATH`` uses it instead of training); then generates answers for new, ragged
prompts with the jitted cached loop (`gqa_jax.decoding.generate`), prints
samples and the exact-match accuracy, and compares decoding speed with the
KV cache against recomputing the whole sequence at every step.

Attention goes through `gqa_jax.dot_product_attention` with
``implementation=None`` unless ``--implementation`` names one, so on a GPU or
TPU the same command runs the fastest kernel that serves each call.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_jax.decoding import generate, generate_without_cache
from gqa_jax.demo import checkpoint
from gqa_jax.demo.progress import ProgressBar
from gqa_jax.demo.task import END, OPERATIONS, VOCAB, Examples, decode
from gqa_jax.dispatch import implementations
from gqa_jax.models import Decoder, DecoderConfig

SIZES = {
    "tiny": dict(num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2),
    "small": dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2),
    "base": dict(num_layers=4, model_dim=128, num_heads=8, num_kv_heads=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gqa_jax.demo",
        description="Train a small Llama-style decoder with grouped-query attention to sort and reverse digit "
        "strings, then generate with its KV cache and compare decoding speed with and without the cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="model size: " + "; ".join(
                            f"{k}: {v['num_layers']} layers, dim {v['model_dim']}, {v['num_heads']} query / "
                            f"{v['num_kv_heads']} KV heads" for k, v in SIZES.items()))
    parser.add_argument("--implementation", default=None,
                        help="attention implementation (e.g. xla, cudnn, pallas_triton); default: dispatch picks")
    parser.add_argument("--batch-size", type=int, default=64, help="training examples per step")
    parser.add_argument("--prompt", action="append", default=[], metavar="DIGITS",
                        help="a digit string to sort and reverse after training (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument("--max-digits", type=int, default=8, help="longest digit string")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--eval-examples", type=int, default=256, help="new problems to measure accuracy on")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="new tokens per row in the decoding-speed comparison")
    parser.add_argument("--save", metavar="PATH", help="write the trained model to this file")
    parser.add_argument("--load", metavar="PATH",
                        help="use the model saved in this file instead of training (its size and --max-digits "
                        "replace the flags')")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "max_digits", "eval_examples", "decode_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


@functools.partial(jax.jit, static_argnames=("model", "max_digits"))  # compiled once per model in a process
def init_params(model: Decoder, seed: int, max_digits: int):
    """Fresh params of ``model`` for the task with up to ``max_digits`` digits."""
    return model.init(jax.random.key(seed), jnp.zeros((1, 2 * max_digits + 3), jnp.int32))["params"]


def train(model: Decoder, args: argparse.Namespace, rng: np.random.Generator):
    """AdamW on the answer tokens' cross-entropy; returns the params."""
    params = init_params(model, args.seed, args.max_digits)
    # Warm up over a tenth of the run (at most 100 steps), so the cosine part is never empty.
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, min(100, args.steps // 10), args.steps,
                                                  args.learning_rate / 10)
    optimizer = optax.adamw(schedule, weight_decay=0.01)

    def loss_fn(params, tokens, weights):
        logits = model.apply({"params": params}, tokens)[:, :-1]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.sum(losses * weights) / jnp.sum(weights)

    @jax.jit
    def step(params, opt_state, tokens, weights):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"train: {args.steps} steps of {args.batch_size} examples, {n_params:,} parameters")
    opt_state = optimizer.init(params)
    bar = ProgressBar(args.steps, label="train", unit="step")
    redraw = max(1, args.steps // 100)
    for i in range(args.steps):
        tokens, weights = Examples.random(rng, args.batch_size, args.max_digits).training_batch()
        params, opt_state, loss = step(params, opt_state, tokens, weights)
        if (i + 1) % redraw == 0 or i + 1 == args.steps:
            bar.update(i + 1, f"loss {float(loss):.4f}")
    bar.close()
    return params


def _digits(row: np.ndarray, length: int) -> str:
    return "".join(map(str, row[:length]))


def evaluate(model: Decoder, params, shown: Examples, examples: Examples) -> None:
    """Greedy answers with the cached loop: the shown problems, then accuracy on ``examples``."""
    fields = zip(dataclasses.astuple(shown), dataclasses.astuple(examples))
    both = Examples(*(np.concatenate(pair) for pair in fields))
    prompt, lengths = both.prompts()
    out = generate(model, params, prompt, lengths, max_new_tokens=both.max_digits + 1, end_token=END)
    outputs = [decode(row) for row in np.asarray(out.tokens)]
    expected = [_digits(row, n) for row, n in zip(both.answers(), both.lengths)]
    correct = np.array([o == e for o, e in zip(outputs, expected)])  # `decode` stops at the end token
    print("\nsamples (greedy, cached generation, one ragged batch):")
    for i in range(len(shown.ops) + min(6, len(examples.ops))):
        verdict = "ok" if correct[i] else f"wrong, expected {expected[i]}"
        question = _digits(both.digits[i], both.lengths[i])
        width = both.max_digits
        print(f"  {OPERATIONS[both.ops[i]]:>7} {question:>{width}} -> {outputs[i]:<{width}}  {verdict}")
    scored = correct[len(shown.ops) :]
    per_op = ", ".join(
        f"{op} {100 * scored[examples.ops == k].mean():.1f}%"
        for k, op in enumerate(OPERATIONS)
        if (examples.ops == k).any()
    )
    print(f"accuracy on {len(scored)} new problems: {100 * scored.mean():.1f}% exact ({per_op})")


def _tokens_per_second(fn, num_tokens: int) -> float:
    jax.block_until_ready(fn().tokens)  # compile
    start = time.perf_counter()
    jax.block_until_ready(fn().tokens)
    return num_tokens / (time.perf_counter() - start)


def decode_speed(model: Decoder, params, examples: Examples, new_tokens: int) -> None:
    """Tokens/s of cached generation against recomputing every step, same prompts, no end token."""
    prompt, lengths = examples.prompts()
    kwargs = dict(max_new_tokens=new_tokens)
    total = len(prompt) * new_tokens
    cached = _tokens_per_second(lambda: generate(model, params, prompt, lengths, **kwargs), total)
    recomputed = _tokens_per_second(lambda: generate_without_cache(model, params, prompt, lengths, **kwargs), total)
    print(f"\ndecode speed, {len(prompt)} rows x {new_tokens} new tokens (prompt pass included):")
    print(f"  with KVCache (jitted loop)      {cached:12,.0f} tokens/s")
    print(f"  recomputing, no cache           {recomputed:12,.0f} tokens/s")
    print(f"  the cache is {cached / recomputed:.1f}x faster")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Separate streams, so the evaluation problems are the same whether the model was trained or loaded.
    train_rng, eval_rng = np.random.default_rng(args.seed).spawn(2)
    if args.load:
        try:
            args.size, args.max_digits, saved = checkpoint.read(args.load)
        except (OSError, ValueError) as e:
            print(f"error: --load: {e}", file=sys.stderr)
            return 2
    try:
        shown = Examples.from_strings([(op, p) for p in args.prompt for op in OPERATIONS], args.max_digits)
    except ValueError as e:
        print(f"error: --prompt: {e}", file=sys.stderr)
        return 2
    config = DecoderConfig(vocab_size=len(VOCAB), implementation=args.implementation, **SIZES[args.size])
    model = Decoder(config)
    device = jax.devices()[0]
    print("gqa-jax demo: a Llama-style decoder learns to sort and reverse digit strings")
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}; attention implementation="
          f"{args.implementation!r} (dispatch order here: {', '.join(implementations())})")
    layers = f"{config.num_layers} layer" + ("s" if config.num_layers > 1 else "")
    print(f"model: {layers}, dim {config.model_dim}, {config.num_heads} query heads sharing "
          f"{config.num_kv_heads} key/value heads (head dim {config.head_dim})")
    if args.load:
        template = jax.eval_shape(lambda: init_params(model, args.seed, args.max_digits))
        try:
            params = checkpoint.restore(args.load, saved, template)
        except ValueError as e:
            print(f"error: --load: {e}", file=sys.stderr)
            return 2
        print(f"loaded the trained model from {args.load} (size {args.size}, up to {args.max_digits} digits)")
    else:
        params = train(model, args, train_rng)
    if args.save:
        checkpoint.save(args.save, args.size, args.max_digits, params)
        print(f"saved the trained model to {args.save}; reuse it with --load {args.save}")
    evaluate(model, params, shown, Examples.random(eval_rng, args.eval_examples, args.max_digits))
    decode_speed(model, params, Examples.random(eval_rng, args.batch_size, args.max_digits), args.decode_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
