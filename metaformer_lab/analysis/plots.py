"""Plots of our runs against the paper: Δ top-1 vs baseline (ours against the paper's), and top-1 against MACs.

Figures are built as `matplotlib.figure.Figure` objects without pyplot, so no global backend or state is touched:
saving renders with Agg (PNG) and the PDF backend, and a notebook shows the returned Figure as it is.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from metaformer_lab.analysis.collect import aggregate_seeds


def _short(experiment: str) -> str:
    """A point label: the experiment without its table prefix (t5_identity -> identity, main_s12 -> s12)."""
    return str(experiment).removeprefix("t5_").removeprefix("main_")


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_deltas(table: pd.DataFrame) -> Figure:
    """Δ top-1 vs baseline here against the paper's, one labelled point per row with runs, and the line y = x.

    `table`: `compare_to_paper(df)`, or `paper_table(df)` (its numbers are in `attrs["comparison"]`).
    """
    comparison = table if "delta_here" in table.columns else table.attrs["comparison"]
    rows = comparison[comparison["delta_here"].notna() & ~comparison["baseline"]]
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0, color="lightgray", lw=0.8)
    ax.axvline(0, color="lightgray", lw=0.8)
    if rows.empty:
        _empty(ax, "no ablation with completed runs\nand a baseline with completed runs yet")
    else:
        # the errors of a delta: the row's seed std (the baseline's spread is common to all points)
        ax.errorbar(rows["delta_paper"], rows["delta_here"], yerr=rows["top1_here_std"].fillna(0), fmt="o",
                    capsize=3)  # fmt: skip
        for _, row in rows.iterrows():
            ax.annotate(_short(row["experiment"]), (row["delta_paper"], row["delta_here"]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
        lo = min(rows["delta_paper"].min(), rows["delta_here"].min(), 0) - 1
        hi = max(rows["delta_paper"].max(), rows["delta_here"].max(), 0) + 1
        ax.plot([lo, hi], [lo, hi], ls="--", color="gray", lw=1, label="y = x (same effect as in the paper)")
        ax.legend(loc="upper left", fontsize=8)
    baseline = comparison.loc[comparison["baseline"], "experiment"]
    ax.set_xlabel("Δ top-1 vs baseline in the paper (points)")
    ax.set_ylabel("Δ top-1 vs baseline here (points)")
    ax.set_title(f"{comparison.attrs.get('table', '')}: effect of each ablation vs "
                 f"{baseline.iloc[0] if len(baseline) else '?'}", fontsize=9)  # fmt: skip
    return fig


def plot_accuracy_vs_macs(df: pd.DataFrame) -> Figure:
    """Best val top-1 (mean ± std over seeds) against MACs, one labelled point per configuration with completed runs.

    `df`: runs from `collect_runs`. Labels: the experiment, else the run directory name without its seed.
    """
    agg = aggregate_seeds(df)
    agg = agg[agg["macs"].notna()]
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if agg.empty:
        _empty(ax, "no completed runs yet")
    else:
        macs = agg["macs"].astype("float64") / 1e9
        ax.errorbar(macs, agg["top1_mean_pct"], yerr=agg["top1_std_pct"].fillna(0), fmt="o", capsize=3)
        for x, y, experiment, name in zip(macs, agg["top1_mean_pct"], agg["experiment"], agg["name"], strict=True):
            label = _short(experiment) if isinstance(experiment, str) else name
            ax.annotate(label, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("MACs (G, at the runs' image size)")
    ax.set_ylabel("best val top-1 (%)")
    ax.set_title("Accuracy against compute, runs here", fontsize=9)
    return fig


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Write `fig` as `<path_stem>.png` and `<path_stem>.pdf`; returns both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths
