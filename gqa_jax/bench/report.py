"""Tables, JSON and a chart from benchmark results."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _names(ours: str | tuple[str, ...]) -> tuple[str, ...]:
    return (ours,) if isinstance(ours, str) else tuple(ours)


def ratio_to_best_peer(results: list[dict], ours: str | tuple[str, ...], metric: str
                       ) -> dict[tuple[str, str, str], float | None]:
    """``(case, mode, our impl) -> ours / best peer`` on ``metric`` (higher is better).

    ``ours`` names one or more of our implementations; none of them counts as a peer.
    """
    ours = _names(ours)
    groups = defaultdict(dict)
    for r in results:
        if r.get(metric) is not None:
            groups[(r["case"], r["mode"])][r["impl"]] = r[metric]
    ratios = {}
    for (case, mode), by_impl in groups.items():
        peers = [v for name, v in by_impl.items() if name not in ours]
        for name in ours:
            ratios[(case, mode, name)] = by_impl[name] / max(peers) if name in by_impl and peers else None
    return ratios


def markdown_table(results: list[dict], ours: str | tuple[str, ...], metric: str, unit: str,
                   extra: str | None = None) -> str:
    """One row per (case, mode, implementation), our rows marked with the ratio to the best peer."""
    ratios = ratio_to_best_peer(results, ours, metric)
    header = f"| case | mode | implementation | time (ms) | {unit} |" + (f" {extra} |" if extra else "") + " ours / best peer |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        value = "—" if r.get(metric) is None else f"{r[metric]:.1f}"
        ms = "—" if r.get("seconds") is None else f"{1e3 * r['seconds']:.3f}"
        note = r.get("error") or ""
        ratio = ""
        if ratios.get((r["case"], r["mode"], r["impl"])) is not None:
            ratio = f"{ratios[(r['case'], r['mode'], r['impl'])]:.2f}x"
        row = f"| {r['case']} | {r['mode']} | {r['impl']} | {ms} | {value if not note else note} |"
        if extra:
            row += f" {'' if r.get(extra) is None else format(r[extra], '.2f')} |"
        lines.append(row + f" {ratio} |")
    return "\n".join(lines)


def write_json(path: Path, environment: dict, results: list[dict], command: str) -> None:
    path.write_text(json.dumps({"command": command, "environment": environment, "results": results}, indent=2))


def write_chart(path: Path, results: list[dict], metric: str, unit: str, title: str) -> bool:
    """Grouped bar chart of ``metric`` per case and mode; False when matplotlib is missing.

    Implementations without a figure for a case (skipped, out of memory, failed) are marked "n/a" there.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys((r["case"], r["mode"]) for r in results))  # in the order they ran
    impls = list(dict.fromkeys(r["impl"] for r in results if r.get(metric)))  # those with a figure
    values = {(r["case"], r["mode"], r["impl"]): r.get(metric) or 0.0 for r in results}
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 5))
    for i, impl in enumerate(impls):
        xs = [c + i * width for c in range(len(cases))]
        heights = [values.get((case, mode, impl), 0.0) for case, mode in cases]
        ax.bar(xs, heights, width, label=impl)
        for x, height in zip(xs, heights):  # a peer that was skipped, ran out of memory or failed
            if not height:
                ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{case}\n{mode}" for case, mode in cases], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
