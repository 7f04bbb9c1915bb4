"""`python -m gqa_jax.bench --quick` runs end to end on a CPU (kernels in interpret mode)."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.bench import e2e, prefill
from gqa_jax.bench.__main__ import main
from gqa_jax.paged_kv_cache import PagedKVCache


def test_quick_benchmark_writes_results(tmp_path, capsys):
    assert main(["--quick", "--reps", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["jax"]
    by_impl = {(r["case"], r["mode"], r["impl"]): r for r in results["results"]}
    ours = [r for key, r in by_impl.items() if key[2] in ("gqa_jax pallas_triton (interpret mode)", "xla")
            and r["seconds"]]
    assert len(ours) >= 4 and all(r["seconds"] > 0 for r in ours)
    # Interpret-mode rows are labelled as such and get no speed ratio against the peers.
    interpreted = [line for line in printed.splitlines() if "(interpret mode)" in line]
    assert interpreted and all(line.rstrip().endswith("|  |") for line in interpreted), interpreted
    for family in ("Prefill", "Decode", "End-to-end"):
        assert family in printed
    assert (tmp_path / "prefill.png").stat().st_size > 0 and (tmp_path / "decode.png").stat().st_size > 0
    # End to end: every cache kind; on a CPU the Triton rows are skipped and XLA runs each cache.
    e2e_rows = {r["impl"]: r for r in results["results"] if r["mode"] == "generate"}
    assert list(e2e_rows) == [e2e.row_name(impl, cache) for impl, cache in e2e.variants(quick=True)]
    for cache in e2e.CACHES:
        assert e2e_rows[e2e.row_name("pallas_triton", cache)]["error"] == "skipped: GPU kernels only"
        row = e2e_rows[e2e.row_name("xla", cache)]
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0, row
        assert 0 <= row["agreement"] <= 1 and row["agreement_with"] == "xla bf16 dense cache", row
        assert f"| xla {cache} cache |" in printed
    assert e2e_rows["xla bf16 paged cache"]["agreement"] == 1.0  # paging moves no value


def test_shapes_and_skip_filter_the_rows(tmp_path):
    assert main(["--quick", "--only", "prefill", "--reps", "1", "--shapes", "packed", "--skip", "xla",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    packed = [shape.name for shape in prefill.QUICK_SHAPES if "packed" in shape.name]
    assert packed and sorted({r["case"] for r in rows}) == sorted(packed)
    assert rows and not any("xla" in r["impl"] for r in rows)


def test_shapes_filter_the_end_to_end_rows(tmp_path):
    """``--shapes`` names end-to-end shapes too: a name matching none leaves no `generate` row to run."""
    assert not any("nothing-like-this" in shape.name for shape in e2e.shapes(quick=True))
    assert main(["--quick", "--only", "e2e", "--reps", "1", "--shapes", "nothing-like-this",
                 "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["results"] == []


def test_end_to_end_paged_cache_generates_the_dense_cache_tokens():
    """The bf16 paged rows generate exactly the bf16 dense rows' tokens (paging must not change results)."""
    shape = e2e.shapes(quick=True)[0]
    dense, paged = (np.asarray(e2e.make_generate(shape, "xla", cache)()) for cache in ("bf16 dense", "bf16 paged"))
    assert dense.shape == (shape.B, shape.new_tokens)
    np.testing.assert_array_equal(paged, dense)


def test_end_to_end_full_rows_and_cache_sizes():
    """The GPU run's rows: Triton on each cache, XLA on bf16 dense; every cache holds P + new tokens per row."""
    assert [e2e.row_name(impl, cache) for impl, cache in e2e.variants(quick=False)] == [
        "pallas_triton bf16 dense cache", "pallas_triton int8 dense cache", "pallas_triton bf16 paged cache",
        "pallas_triton int8 paged cache", "xla bf16 dense cache"]
    prefill_heavy, decode_heavy = e2e.shapes(quick=False)
    assert prefill_heavy.P > prefill_heavy.new_tokens and decode_heavy.new_tokens > decode_heavy.P
    for shape, cache in itertools.product((prefill_heavy, decode_heavy), e2e.CACHES):
        config = shape.config
        layers = jax.eval_shape(lambda: e2e.make_cache(shape, config, cache))  # shapes only: no memory
        assert len(layers) == config.num_layers
        layer = layers[0]
        if isinstance(layer, PagedKVCache):
            assert layer.key_pages.shape == (shape.B * shape.pages_per_row(), shape.page_size, config.num_kv_heads,
                                             config.head_dim)
            assert layer.page_table.shape == (shape.B, shape.pages_per_row())
            capacity = shape.pages_per_row() * shape.page_size
        else:
            capacity = layer.key.shape[1]
        assert capacity == shape.P + shape.new_tokens, cache
        key = layer.key_pages if isinstance(layer, PagedKVCache) else layer.key
        assert key.dtype == (jnp.int8 if cache.startswith("int8") else config.dtype), cache
        assert layer.is_quantized == cache.startswith("int8"), cache


def test_sharded_mode_on_two_simulated_devices(tmp_path):
    from tests.multidevice import run_on_cpu_devices

    script = (f"from gqa_jax.bench.__main__ import main; "
              f"main(['--quick', '--only', 'sharded', '--reps', '1', '--out', {str(tmp_path)!r}])")
    result = run_on_cpu_devices(script, 2, timeout=600)
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    sharded = {(r["case"].split()[0], r["mode"]): r for r in rows if r["impl"] == "2 devices"}
    assert len(sharded) == 9, sorted(sharded)
    for (kind, mode), r in sharded.items():
        assert r["seconds"] > 0 and r["speedup"] > 0, r
        if kind in ("dp", "tp", "decode"):
            assert r["collectives"] == "none", r  # a query head lives with its KV head: nothing to exchange
        elif kind == "ring":
            assert "collective-permute" in r["collectives"] and "all-gather" not in r["collectives"], r
    assert "Sharded attention on 2 devices" in result.stdout


def test_sharded_mode_says_it_needs_devices(tmp_path, capsys):
    assert main(["--quick", "--only", "sharded", "--reps", "1", "--out", str(tmp_path)]) == 0
    assert "skipped: needs 2 or more devices" in capsys.readouterr().out


def test_packed_prefill_gives_our_kernel_ids_and_the_peers_the_same_mask():
    """The packed shape's segment ids (our kernel) and boolean mask (jax.nn peers) describe the same attention."""
    shape = next(s for s in prefill.QUICK_SHAPES if s.segments)
    q, k, v, _ = prefill.make_inputs(shape, jax.random.key(0))
    ours = prefill.implementations(quick=True)[prefill.INTERPRETED](shape, interpret=True)(q, k, v)
    peer = prefill.implementations(quick=True)["jax.nn xla"](shape, interpret=True)(q, k, v)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(peer, np.float32), atol=2e-2)
    unpacked = prefill.PrefillShape(shape.B, shape.S, shape.N, shape.K, shape.H, shape.causal)
    apart = prefill.implementations(quick=True)["jax.nn xla"](unpacked, interpret=True)(q, k, v)
    assert np.abs(np.asarray(apart, np.float32) - np.asarray(peer, np.float32)).max() > 0.1  # the mask matters
