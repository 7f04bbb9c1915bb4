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
    ours = [r for key, r in by_impl.items() if key[2] in ("gqa_jax pallas_triton", "xla") and r["seconds"]]
    assert len(ours) >= 4 and all(r["seconds"] > 0 for r in ours)
    for family in ("Prefill", "Decode", "End-to-end"):
        assert family in printed
    assert (tmp_path / "prefill.png").stat().st_size > 0 and (tmp_path / "decode.png").stat().st_size > 0
