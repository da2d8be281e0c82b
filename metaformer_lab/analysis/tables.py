"""The paper's tables with our runs next to its numbers, and a generic table for sweeps over any axes.

`compare_to_paper` gives the numbers (one row per paper row, in the paper's order); `paper_table` formats them in the
paper's layout; `to_markdown`, `to_latex` and `to_csv` render any of the formatted tables. The paper's numbers come
from the shipped paper_results.csv only.
"""

from __future__ import annotations

import io
import math
import re
from functools import cache
from importlib import resources

import pandas as pd

from metaformer_lab.analysis.collect import CONFIG_AXES, aggregate_seeds

TABLES = ("table5", "main")
DASH = "—"  # no result here (yet)
PAPER_COLUMNS = ["Ablation", "Variant", "Params (M)", "MACs (G)", "Top-1 paper (%)",
                 "Top-1 here (%, mean ± std, n)", "Δ vs baseline here", "Δ vs baseline in the paper"]  # fmt: skip


@cache
def _paper_csv() -> pd.DataFrame:
    with resources.files("metaformer_lab.analysis").joinpath("paper_results.csv").open() as f:
        return pd.read_csv(f)


def paper_results(table: str = "table5") -> pd.DataFrame:
    """The paper's rows of `table` ("table5" or "main"), in the paper's order, as shipped in paper_results.csv."""
    if table not in TABLES:
        raise ValueError(f"table={table!r}: valid: {', '.join(TABLES)}")
    paper = _paper_csv()
    return paper[paper["table"] == table].reset_index(drop=True).copy()


def compare_to_paper(df: pd.DataFrame, table: str = "table5") -> pd.DataFrame:
    """Our runs (from `collect_runs`) against the paper, in numbers: one row per paper row, in the paper's order.

    Runs are matched to a row by their `experiment`. Baseline: the row whose ablation is "Baseline" (Table 5), else
    the first row (the main table: PoolFormer-S12). Params and MACs are ours where the row has runs, else the
    paper's (`cost_from` says which). Should one experiment have runs of several configurations (e.g. a short and a
    full schedule), the one trained for most epochs, then with most seeds, is shown and the choice is noted in
    `attrs["notes"]`; filter `df` first to choose another.
    """
    paper = paper_results(table)
    agg = aggregate_seeds(df)
    notes: list[str] = []
    rows = []
    for _, ref in paper.iterrows():
        runs = agg[agg["experiment"] == ref["experiment"]].sort_values(["epochs", "n"], ascending=False)
        ours = runs.iloc[0] if len(runs) else None
        if len(runs) > 1:
            notes.append(f"{ref['experiment']}: {len(runs)} configurations have completed runs; showing "
                         f"{ours['name']!r} (config_key {ours['config_key']}, {ours['epochs']} epochs)")  # fmt: skip
        have_cost = ours is not None and not pd.isna(ours["params"])
        rows.append({
            "ablation": ref["ablation"], "variant": ref["variant"], "experiment": ref["experiment"],
            "params_m": ours["params"] / 1e6 if have_cost else ref["params_m"],
            "macs_g": ours["macs"] / 1e9 if have_cost else ref["macs_g"],
            "cost_from": "here" if have_cost else "paper",
            "top1_paper": ref["top1"],
            "top1_here": ours["top1_mean_pct"] if ours is not None else math.nan,
            "top1_here_std": ours["top1_std_pct"] if ours is not None else math.nan,
            "n": int(ours["n"]) if ours is not None else 0,
            "problems": _problems(df, ref["experiment"]),
            "config_key": ours["config_key"] if ours is not None else None,
        })  # fmt: skip
    out = pd.DataFrame(rows)
    is_baseline = paper["ablation"].eq("Baseline")
    base = int(is_baseline.idxmax()) if is_baseline.any() else 0
    out["baseline"] = out.index == base
    out["delta_here"] = out["top1_here"] - out.loc[base, "top1_here"]
    out["delta_paper"] = out["top1_paper"] - out.loc[base, "top1_paper"]
    out.attrs["table"], out.attrs["notes"] = table, notes
    return out


def _problems(df: pd.DataFrame, experiment: str) -> str:
    """'1 diverged, 2 running': the runs of an experiment that gave no result, so that a dash is explained."""
    runs = df[(df["experiment"] == experiment) & ((df["status"] != "completed") | df["best_val_top1"].isna())]
    counts = runs["status"].value_counts(sort=False)
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


def _num(x: float) -> str:
    """Params/MACs: one decimal as the paper prints them, more significant digits for the small models here."""
    if pd.isna(x):
        return DASH
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _paper_num(x: float) -> str:
    return f"{x:.1f}"  # as the paper prints them: 11.9, 5.0, 0.2


def _delta(x: float, digits: int) -> str:
    if pd.isna(x):
        return DASH
    text = f"{x:+.{digits}f}"
    return text[1:] if float(text) == 0 else text  # 0.0, not +0.0 or -0.0


def _mean_std(mean: float, std: float, n: int, problems: str = "", digits: int = 1) -> str:
    if n == 0:
        return f"{DASH} ({problems})" if problems else DASH
    text = f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}") + f" (n={n}"
    return text + (f"; {problems})" if problems else ")")


def paper_table(df: pd.DataFrame, table: str = "table5", digits: int = 1) -> pd.DataFrame:
    """The paper's table in its layout with our runs beside it, as strings (PAPER_COLUMNS), one row per paper row.

    Rows without runs show the paper's values and a dash in the "here" columns. Our Params/MACs replace the paper's
    where runs exist; a value followed by "(paper)" is the paper's. The numbers are in `attrs["comparison"]`.
    """
    comparison = compare_to_paper(df, table)
    rows = []
    for _, row in comparison.iterrows():
        if row["cost_from"] == "here":
            params, macs = _num(row["params_m"]), _num(row["macs_g"])
        else:
            params, macs = (_paper_num(row[key]) + " (paper)" for key in ("params_m", "macs_g"))
        rows.append([
            row["ablation"], row["variant"], params, macs,
            f"{row['top1_paper']:.1f}",
            _mean_std(row["top1_here"], row["top1_here_std"], row["n"], row["problems"], digits),
            "baseline" if row["baseline"] else _delta(row["delta_here"], digits),
            "baseline" if row["baseline"] else _delta(row["delta_paper"], 1),
        ])  # fmt: skip
    out = pd.DataFrame(rows, columns=PAPER_COLUMNS)
    out.attrs.update(comparison=comparison, notes=comparison.attrs["notes"], table=table)
    return out


def axis_table(df: pd.DataFrame, axis: str | list[str] | None = None, digits: int = 1) -> pd.DataFrame:
    """Any sweep, paper experiment or not: one row per configuration with top-1 and top-5 as mean ± std (n).

    `axis`: the axis (or axes) to show; by default every axis that varies among the completed runs. A "Config"
    column (the run directory name without its seed) is added when the shown axes do not tell the rows apart.
    """
    agg = aggregate_seeds(df)
    if axis is None:
        axes = [a for a in CONFIG_AXES if agg[a].nunique(dropna=False) > 1] or ["model", "mixer"]
    else:
        axes = [axis] if isinstance(axis, str) else list(axis)
    agg = agg.sort_values(axes, na_position="last", kind="stable", ignore_index=True)
    out = pd.DataFrame({a: agg[a].astype(object).where(agg[a].notna(), DASH).astype(str) for a in axes})
    if out.duplicated().any():
        out["Config"] = agg["name"]
    out["Params (M)"] = [_num(p / 1e6) for p in pd.to_numeric(agg["params"], errors="coerce").astype("float64")]
    out["MACs (G)"] = [_num(m / 1e9) for m in pd.to_numeric(agg["macs"], errors="coerce").astype("float64")]
    for k in ("top1", "top5"):
        out[f"Top-{k[-1]} (%, mean ± std, n)"] = [
            _mean_std(mean, std, n, digits=digits)
            for mean, std, n in zip(agg[f"{k}_mean_pct"], agg[f"{k}_std_pct"], agg["n"], strict=True)
        ]
    out.attrs.update(notes=[], table="axes")
    return out


def _blank_repeats(table: pd.DataFrame) -> pd.DataFrame:
    """The paper names each ablation once, on the first row of its group."""
    if "Ablation" not in table.columns:
        return table
    out = table.copy()
    out.loc[out["Ablation"].eq(out["Ablation"].shift()), "Ablation"] = ""
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table of a formatted table (`paper_table`, `axis_table`)."""
    # disable_numparse: tabulate would otherwise reformat "11.90" and align numbers differently from dashes
    return _blank_repeats(table).to_markdown(index=False, disable_numparse=True)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    # a "[" right after a row's \\ would be read as \\[length]
    "[": "{[}", "]": "{]}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "→": r"$\rightarrow$", "—": "---", "−": "$-$", "×": r"$\times$",
}  # fmt: skip
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    """`text` as LaTeX source: special characters escaped, ± Δ → — as math or dashes; a leading sign as math."""
    text = _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], str(text))
    return re.sub(r"^([+-])(?=\d)", r"$\1$", text)


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); a rule between the paper's ablation groups."""
    text_columns = {"Ablation", "Variant", "Config"}
    spec = "".join("l" if c in text_columns or c.islower() else "r" for c in table.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule"]
    lines.append(" & ".join(latex_escape(c) for c in table.columns) + r" \\")
    lines.append(r"\midrule")
    shown = _blank_repeats(table)
    for i, row in enumerate(shown.itertuples(index=False)):
        if i and "Ablation" in table.columns and row[0]:
            lines.append(r"\midrule")
        lines.append(" & ".join(latex_escape(cell) for cell in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def to_csv(table: pd.DataFrame) -> str:
    """The table as CSV, every row complete (no blanked repeats)."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return buffer.getvalue()
