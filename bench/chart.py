"""The ratio chart of the comparison benchmark: every target against HAProxy, from a compare.py summary.

    .venv/bin/python bench/chart.py [bench/results/latest.json] [bench/results/ratios.png]

Rows: raw rate ÷ HAProxy's in the same round (memory: HAProxy's KiB per idle connection ÷ the target's, so
higher is better everywhere); work per balancer CPU-second ÷ HAProxy's; raw rate ÷ the direct connection's
(the ceiling).  One column per worker count; bars are medians over rounds, whiskers min–max.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ("haproxy", "nginx", "asyncio", "fastlb")
COLORS = {"haproxy": "#d62728", "nginx": "#4caf50", "asyncio": "#ff9800", "fastlb": "#1f77b4"}
# (ratio key in the summary, title, reference drawn at 1, targets not shown)
ROWS = (
    ("vs_haproxy", "rate ÷ HAProxy's", "HAProxy = 1", {"haproxy"}),
    ("per_cpu_vs_haproxy", "work per balancer CPU-second ÷ HAProxy's", "HAProxy = 1", {"haproxy"}),
    ("vs_direct", "rate ÷ direct (no balancer)", "direct = 1", set()),
)
LABELS = {
    "bulk1": "bulk\n1 stream",
    "bulk4": "bulk\n4 streams",
    "keepalive": "keep-alive\nreq/s",
    "close": "new conn\nper request",
    "idle": "idle memory\n(inverse)",
}


def _bar(cell: dict | None, invert: bool) -> tuple[float, float, float] | None:
    """(value, lower error, upper error) of a ratio cell; inverted for lower-is-better metrics."""
    if not cell or cell["min"] <= 0:
        return None
    med, lo, hi = cell["median"], cell["min"], cell["max"]
    if invert:
        med, lo, hi = 1 / med, 1 / hi, 1 / lo
    return med, med - lo, hi - med


def render(summary: dict, out: Path) -> Path:
    results = summary["results"]
    workers = sorted(results, key=int)
    workloads = [w for w in summary["settings"]["workloads"] if w in LABELS]
    fig, axes = plt.subplots(
        len(ROWS), len(workers), figsize=(max(8, 6.5 * len(workers)), 11), squeeze=False, sharey="row"
    )
    for col, w in enumerate(workers):
        for row, (key, title, ref_label, hidden) in enumerate(ROWS):
            ax = axes[row][col]
            shown = [wl for wl in workloads if wl != "idle" or key == "vs_haproxy"]
            targets = [
                t
                for t in ORDER
                if t not in hidden and any(results[w].get(wl, {}).get(t, {}).get(key) for wl in shown)
            ]
            width = 0.8 / max(1, len(targets))
            for i, target in enumerate(targets):
                xs, ys, lo, hi = [], [], [], []
                for x, wl in enumerate(shown):
                    bar = _bar(results[w].get(wl, {}).get(target, {}).get(key), invert=wl == "idle")
                    if bar:
                        xs.append(x - 0.4 + width * (i + 0.5))
                        ys.append(bar[0])
                        lo.append(bar[1])
                        hi.append(bar[2])
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=COLORS[target], label=target)
                for x, y in zip(xs, ys, strict=True):
                    ax.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=6)
            ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=ref_label)
            ax.set_xticks(range(len(shown)), [LABELS[wl] for wl in shown], fontsize=8)
            ax.set_title(f"{w} worker{'s' if w != '1' else ''}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel("ratio (higher is better)")
            if col == len(workers) - 1:
                ax.legend(fontsize=7, loc="upper right")
    meta, s = summary["meta"], summary["settings"]
    fig.suptitle(
        f"fastlb benchmark: each balancer on {s['cpu_quota_pct']}% of one CPU\n"
        f"medians of {s['rounds']} round(s), whiskers min–max; {meta['cpu_model']}, Linux {meta['kernel']}, "
        f"{meta['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else HERE / "results" / "latest.json"
    out = Path(argv[1]) if len(argv) > 1 else src.with_name("ratios.png")
    render(json.loads(src.read_text()), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
