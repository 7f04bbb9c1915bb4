"""The demo, ``python -m gqa_jax.demo``: a small decoder learns a digit task, then decodes with its KV cache.

- ``__main__``: the command (training, evaluation, decoding speed).
- `gqa_jax.demo.task`: the task, sorting or reversing digit strings.
- `gqa_jax.demo.checkpoint`: the trained model in one file (`--save` / `--load`).
- `gqa_jax.demo.progress`: the progress bar with rate and ETA (also used by the benchmarks).
"""
