"""`python -m gqa_jax.bench --quick` runs end to end on a CPU (kernels in interpret mode)."""

from __future__ import annotations

import json

from gqa_jax.bench.__main__ import main


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
