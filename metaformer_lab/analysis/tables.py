"""The paper's tables with our runs next to its numbers, and a generic table for sweeps over any axes.

`compare_to_paper` gives the numbers (one row per paper row, in the paper's order); `paper_table` formats them in the
paper's layout; `to_markdown`, `to_latex` and `to_csv` render any of the formatted tables. The paper's numbers come
from the shipped paper_results.csv only.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from functools import cache
from importlib import resources
from typing import Any

import pandas as pd

from metaformer_lab.analysis.collect import (
    LATE_VALIDATIONS,
    TABLE_AXES,
    aggregate_seeds,
    axis_applies,
    completed_runs,
    protocol_label,
)
from metaformer_lab.analysis.stats import paired_difference, spearman
from metaformer_lab.registry import did_you_mean

TABLES = ("table5", "main", "baselines")
DASH = "—"  # no result here (yet)
# what a paper row trained, as the record names it (paper_results.csv has a column each): a run of the row's
# experiment with other values (`experiment=t5_identity mixer=pooling`) trained another ablation
ROW_AXES = ("mixer", "pool_size", "norm", "act", "residual", "mlp")
# the columns without runs; with runs, the two "here" columns are repeated per protocol, named by `here_columns`
PAPER_COLUMNS = ["Ablation", "Variant", "Params (M)", "MACs (G)", "Top-1 paper (%)",
                 "Top-1 here (%, mean ± std, n)", "Δ vs baseline here (paired by seed, [95% CI])", "Δ / SE",
                 "Sign as paper", "Δ vs baseline in the paper"]  # fmt: skip


@cache
def _paper_csv() -> pd.DataFrame:
    with resources.files("metaformer_lab.analysis").joinpath("paper_results.csv").open() as f:
        return pd.read_csv(f)


def paper_results(table: str = "table5") -> pd.DataFrame:
    """The paper's rows of `table` (TABLES), in the paper's order, as shipped in paper_results.csv."""
    if table not in TABLES:
        raise ValueError(f"table={table!r}: valid: {', '.join(TABLES)}")
    paper = _paper_csv()
    return paper[paper["table"] == table].reset_index(drop=True).copy()


def compare_to_paper(df: pd.DataFrame, table: str = "table5") -> pd.DataFrame:
    """Our runs (from `collect_runs`) against the paper, in numbers: the paper's rows in its order, once per protocol.

    Runs are matched to a row by their `experiment`, and grouped by protocol (`protocol`): data, image size,
    training-set size and schedule, plus the model where it is not the row's own (`paper_results`' `model`), so that
    a full ImageNet sweep reads "imagenet 224 px, 1.28M img, 300+10 ep" and a `model=small` one names "small". Each
    protocol is a block of rows, most completed runs first (`attrs["protocols"]`); without runs, one block with
    protocol None. Baseline: the row whose ablation is "Baseline" (Table 5), else the first row (the main table:
    PoolFormer-S12), of the same protocol. Params and MACs are ours where the row has runs, else the paper's
    (`cost_from` says which). Should one experiment have runs of several configurations within a protocol (e.g.
    another learning rate), the one trained for most epochs, then with most seeds, is shown and the choice is noted in
    `attrs["notes"]`; filter `df` first to choose another. A run whose axes (ROW_AXES) differ from its row's trained
    another ablation (`experiment=t5_identity mixer=pooling`): it is left out, and `attrs["notes"]` says so.
    """
    paper = paper_results(table)
    model_of = dict(zip(paper["experiment"], paper["model"], strict=True))
    notes: list[str] = []
    runs = _row_runs(df[df["experiment"].isin(model_of)], paper, notes)
    runs = runs.assign(here=_paper_protocols(runs, model_of))
    agg = aggregate_seeds(runs)
    agg["here"] = _paper_protocols(agg, model_of)
    completed, total = agg.groupby("here")["n"].sum(), runs["here"].value_counts()
    protocols = sorted(total.index, key=lambda label: (-completed.get(label, 0), -total[label], label))
    if len(protocols) > 1:
        counts = ", ".join(f"{label!r} ({completed.get(label, 0)} completed)" for label in protocols)
        notes.append(f"runs of {len(protocols)} protocols, each compared with the paper on its own: {counts}")
    blocks = [_compare_block(paper, agg[agg["here"] == label], runs[runs["here"] == label], label, notes)
              for label in protocols or [None]]  # fmt: skip
    out = pd.concat(blocks, ignore_index=True)
    out.attrs.update(table=table, notes=notes, protocols=protocols)
    return out


def _axis_value(value: Any) -> str | None:
    """An axis value as one comparable string: True, "True" and "true" -> "true"; 3, 3.0, "3" -> "3"; per stage
    "a,b,c,d" as is, or the one value where all stages agree; None where unknown (a record from an older writer)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if pd.api.types.is_bool(value):
        value = str(bool(value))
    elif pd.api.types.is_float(value) and float(value).is_integer():
        value = int(value)
    stages = [part.strip().lower() for part in str(value).split(",")]
    if not any(stages):
        return None
    return stages[0] if len(set(stages)) == 1 else ",".join(stages)


def _row_runs(runs: pd.DataFrame, paper: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """The runs that trained their paper row's ablation: the others are left out, and a note says what they trained.

    An axis the run does not record (NaN, "") cannot be checked: the run is kept, and a note names the axis."""
    row_of = paper.set_index("experiment")
    keep: list[bool] = []
    left_out: Counter[tuple[str, str]] = Counter()  # (experiment, what differs): runs
    unchecked: Counter[tuple[str, str]] = Counter()  # (experiment, axes not recorded): runs
    for run in runs.to_dict("records"):
        row = row_of.loc[run["experiment"]]
        differ, unknown = [], []
        for axis in ROW_AXES:
            ours, theirs = _axis_value(run.get(axis)), _axis_value(row[axis])
            if ours is None:
                unknown.append(axis)
            elif ours != theirs:
                differ.append((axis, ours, theirs))
        keep.append(not differ)
        if differ:
            trained = ", ".join(f"{axis}={ours}" for axis, ours, _ in differ)
            row_is = ", ".join(f"{axis}={theirs}" for axis, _, theirs in differ)
            left_out[run["experiment"], f"trained {trained}, the row is {row_is}"] += 1
        elif unknown:
            unchecked[run["experiment"], ", ".join(unknown)] += 1
    for (experiment, why), n in left_out.items():
        notes.append(f"{experiment}: {n} run{'s' * (n != 1)} left out: {why}")
    for (experiment, axes), n in unchecked.items():
        notes.append(f"{experiment}: {n} run{'s' * (n != 1)} without {axes} recorded: counted, unchecked")
    return runs.loc[keep]  # .loc: an empty list is no rows, not no columns


def trained_their_rows(agg: pd.DataFrame) -> pd.Series:
    """Per configuration: does it carry a paper row's experiment and that row's axes (so the row's name fits it)?"""
    paper = _paper_csv()
    named = agg[agg["experiment"].isin(paper["experiment"])]
    return agg.index.to_series().isin(_row_runs(named, paper, []).index)


def _paper_protocols(frame: pd.DataFrame, model_of: dict[str, str]) -> list[str]:
    """Each run's protocol as a paper table names it: without the model where it is the paper row's own."""
    return [
        protocol_label(run, omit=("model",) if run["model"] == model_of[run["experiment"]] else ())
        for run in frame.to_dict("records")
    ]


def _compare_block(paper: pd.DataFrame, agg: pd.DataFrame, runs: pd.DataFrame, protocol: str | None,
                   notes: list[str]) -> pd.DataFrame:  # fmt: skip
    """`compare_to_paper` for the runs of one protocol (`agg` aggregated, `runs` all of them)."""
    rows = []
    for _, ref in paper.iterrows():
        candidates = agg[agg["experiment"] == ref["experiment"]].sort_values(["epochs", "n"], ascending=False)
        ours = candidates.iloc[0] if len(candidates) else None
        if len(candidates) > 1:
            notes.append(f"{ref['experiment']} [{protocol}]: {len(candidates)} configurations have completed "
                         f"runs; showing {ours['name']!r} (config_key {ours['config_key']}, {ours['epochs']} "
                         "epochs)")  # fmt: skip
        have_cost = ours is not None and not pd.isna(ours["params"])
        rows.append({
            "ablation": ref["ablation"], "variant": ref["variant"], "experiment": ref["experiment"],
            "protocol": protocol,
            "params_m": ours["params"] / 1e6 if have_cost else ref["params_m"],
            "macs_g": ours["macs"] / 1e9 if have_cost else ref["macs_g"],
            "cost_from": "here" if have_cost else "paper",
            "top1_paper": ref["top1"],
            "top1_here": ours["top1_mean_pct"] if ours is not None else math.nan,
            "top1_here_std": ours["top1_std_pct"] if ours is not None else math.nan,
            "n": int(ours["n"]) if ours is not None else 0,
            "problems": _problems(runs, ref["experiment"]),
            "config_key": ours["config_key"] if ours is not None else None,
        })  # fmt: skip
    out = pd.DataFrame(rows)
    is_baseline = paper["ablation"].eq("Baseline")
    base = int(is_baseline.idxmax()) if is_baseline.any() else 0
    out["baseline"] = out.index == base
    out["delta_here"] = out["top1_here"] - out.loc[base, "top1_here"]
    out["delta_paper"] = out["top1_paper"] - out.loc[base, "top1_paper"]
    done = completed_runs(runs)
    baseline_scores = _seed_scores(done, out.loc[base, "config_key"])
    paired = [paired_difference(_seed_scores(done, key), baseline_scores) for key in out["config_key"]]
    out["paired_n"] = [p.n for p in paired]
    out["paired_delta"], out["paired_se"] = [p.mean for p in paired], [p.se for p in paired]
    out["paired_low"], out["paired_high"] = [p.low for p in paired], [p.high for p in paired]
    out["paired_t"] = [p.t for p in paired]
    out["sign_agrees"] = [_sign_agrees(here, theirs, n) for here, theirs, n
                          in zip(out["paired_delta"], out["delta_paper"], out["paired_n"], strict=True)]  # fmt: skip
    out.loc[base, ["paired_delta", "paired_se", "paired_low", "paired_high", "paired_t", "sign_agrees"]] = math.nan
    return out


def _seed_scores(done: pd.DataFrame, config_key: str | None) -> pd.Series:
    """Best val top-1 (%) of a configuration by seed, from `completed_runs`."""
    runs = done[done["config_key"] == config_key]
    return pd.Series(runs["best_val_top1"].to_numpy() * 100, index=runs["seed"].to_numpy(), dtype="float64")


def _sign_agrees(here: float, paper: float, n: int) -> object:
    """Does our paired difference go the paper's way? None where either has no sign (no runs, or the paper's 0.0)."""
    if n == 0 or pd.isna(here) or round(paper, 1) == 0 or here == 0:
        return None
    return (here > 0) == (paper > 0)


def ablation_deltas(comparison: pd.DataFrame) -> pd.DataFrame:
    """The rows of `compare_to_paper` with a Δ here: not the baseline, and it and the baseline have completed runs
    of one protocol."""
    return comparison[comparison["delta_here"].notna() & ~comparison["baseline"]]


def report_notes(df: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """The notes to read with `table` (`paper_table` or `axis_table` of the runs `df`) and its plots, which the
    command prints and the notebooks show: what has nothing to show and why, then the table's own notes."""
    notes = []
    with_results = aggregate_seeds(df)
    comparison = table.attrs.get("comparison")
    if with_results.empty:
        notes.append("no completed run yet: nothing to plot")
    elif comparison is not None and comparison["n"].sum() == 0:
        notes.append("no completed run has the experiment of a row of this table, so no Δ to plot; for other sweeps "
                     "use --table axes (axis_table in Python)")  # fmt: skip
    elif comparison is not None and ablation_deltas(comparison).empty:
        baseline = comparison.loc[comparison["baseline"], "experiment"].iloc[0]
        notes.append(f"no Δ to plot: no row has completed runs of a protocol in which the baseline ({baseline}) "
                     "has some")  # fmt: skip
    if not with_results.empty and with_results["macs"].isna().all():
        notes.append("no completed run records its MACs: no plot of accuracy against compute")
    return notes + list(table.attrs.get("notes", [])) + learning_at_the_end(with_results)


STILL_LEARNING_PCT = 1.0  # top-1 points over the last LATE_VALIDATIONS validations: the budget ended too soon


def learning_at_the_end(agg: pd.DataFrame, threshold: float = STILL_LEARNING_PCT) -> list[str]:
    """Per protocol, a note on whether its budget let every configuration learn what it could: those that gained
    `threshold` points of top-1 or more over their last validations (mean over seeds: `late_gain`), or the one
    that gained most. Runs with no learning curve (older records, few validations) are left out."""
    from metaformer_lab.analysis.plots import point_labels  # the plots' labels; plots imports this module

    notes = []
    curves = agg[agg["late_gain_mean_pct"].notna()]
    curves = curves.assign(label=point_labels(curves) if len(curves) else [])
    for protocol, rows in curves.groupby("protocol", sort=False, dropna=False):
        rows = rows.sort_values("late_gain_mean_pct", ascending=False, kind="stable")
        gains = [f"{label} {_delta(gain, 1)}" for label, gain in zip(rows["label"], rows["late_gain_mean_pct"],
                                                                        strict=True)]  # fmt: skip
        rising = int((rows["late_gain_mean_pct"] >= threshold).sum())
        over = f"top-1 over the last {LATE_VALIDATIONS} validations, mean over seeds"
        if rising:
            notes.append(f"{protocol}: still learning at the end ({threshold:g} point or more of {over}): "
                         f"{', '.join(gains[:rising])}; a longer budget may change these rows")  # fmt: skip
        else:
            notes.append(f"{protocol}: no configuration was still learning at the end: each of {len(rows)} gained "
                         f"under {threshold:g} point of {over} (most: {gains[0]})")  # fmt: skip
    return notes


def _resolved_sign(row: pd.Series) -> str:
    """Whether a row's paired Δ here goes the paper's way at more than 2 standard errors: "agrees", "opposite",
    "within 2 SE" (or fewer than 2 paired seeds), and "—" where the paper's Δ has no sign (0.0) or there are no runs."""
    if row["baseline"] or row["paired_n"] == 0 or round(row["delta_paper"], 1) == 0:
        return DASH
    if row["paired_n"] < 2 or pd.isna(row["paired_t"]) or abs(row["paired_t"]) <= 2:
        return "within 2 SE"
    return "agrees" if (row["paired_delta"] > 0) == (row["delta_paper"] > 0) else "opposite"


def protocol_agreement(comparison: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """The protocols of a paper table side by side (e.g. the two CPU proxies of Table 5): per row, the paper's Δ vs
    its baseline, then per protocol the paired Δ here with its Δ / SE and whether its sign is the paper's at more
    than 2 SE (`_resolved_sign`). `attrs["notes"]`: per protocol, which rows agree and which go the other way at
    > 2 SE, and Spearman's rank correlation of top-1 with the paper's."""
    blocks = [(protocol, block) for protocol, block in protocol_blocks(comparison) if protocol is not None]
    first = blocks[0][1] if blocks else comparison
    out = pd.DataFrame({"Ablation": first["ablation"].to_numpy(), "Variant": first["variant"].to_numpy(),
                        "Δ paper": _deltas(first, "delta_paper", 1)})  # fmt: skip
    notes = []
    for protocol, block in blocks:
        out[f"Δ here (Δ / SE): {protocol}"] = [
            "baseline" if row["baseline"] else DASH if pd.isna(row["paired_delta"]) else
            f"{_delta(row['paired_delta'], digits)} ({_delta(row['paired_t'], 1)})" for _, row in block.iterrows()
        ]  # fmt: skip
        verdicts = [_resolved_sign(row) for _, row in block.iterrows()]
        out[f"Sign at > 2 SE: {protocol}"] = ["" if base else v for base, v in zip(block["baseline"], verdicts,
                                                                                    strict=True)]  # fmt: skip
        signed = [v for v in verdicts if v != DASH]
        named = {kind: [variant for variant, v in zip(block["variant"], verdicts, strict=True) if v == kind]
                 for kind in ("agrees", "opposite")}  # fmt: skip
        rho, rows = rank_correlation(block)
        notes.append(
            f"{protocol}: {len(named['agrees'])} of {len(signed)} rows agree in sign with the paper at > 2 SE; "
            f"opposite at > 2 SE: {', '.join(named['opposite']) or 'none'}; Spearman rank correlation of top-1 "
            f"with the paper's over {rows} rows: {rho:.2f}"
        )  # fmt: skip
    out.attrs.update(notes=notes)
    return out


def protocols_side_by_side(table: pd.DataFrame) -> pd.DataFrame | None:
    """`protocol_agreement` of a paper table (`paper_table`) whose runs hold two or more protocols (both CPU proxies
    of Table 5), else None: the command's and the notebook's second table."""
    comparison = table.attrs.get("comparison")
    if comparison is None or comparison["protocol"].nunique() < 2:
        return None
    return protocol_agreement(comparison)


def rank_correlation(block: pd.DataFrame) -> tuple[float, int]:
    """(Spearman's rho between our top-1 and the paper's over the rows of one protocol that have runs, rows)."""
    have = block[block["n"] > 0]
    return spearman(have["top1_here"], have["top1_paper"]), len(have)


def protocol_blocks(comparison: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """`compare_to_paper`'s rows split by protocol, in its order: [(protocol, rows in the paper's order), ...]."""
    return [
        (label, comparison[comparison["protocol"].isna() if label is None else comparison["protocol"].eq(label)])
        for label in dict.fromkeys(comparison["protocol"])
    ]


def here_columns(protocol: str | None) -> tuple[str, str, str, str]:
    """The headers of a protocol's "here" columns (top-1, paired Δ, Δ / SE, sign as the paper's): "Top-1 here:
    shapes 32 px, small, 1 ep (%, ...)", ...; without runs (protocol None) the generic PAPER_COLUMNS."""
    if protocol is None:
        return PAPER_COLUMNS[5], PAPER_COLUMNS[6], PAPER_COLUMNS[7], PAPER_COLUMNS[8]
    return (f"Top-1 here: {protocol} (%, mean ± std, n)", f"Δ vs baseline here: {protocol} (paired by seed, [95% CI])",
            f"Δ / SE: {protocol}", f"Sign as paper: {protocol}")  # fmt: skip


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


def _deltas(block: pd.DataFrame, column: str, digits: int) -> list[str]:
    return ["baseline" if base else _delta(x, digits) for base, x in zip(block["baseline"], block[column], strict=True)]


def _paired(row: pd.Series, digits: int) -> str:
    """The paired difference: "-2.9 [-5.6, -0.2]"; one seed: "-2.9"; no seed shared with the baseline: the
    difference of the means, said so."""
    if row["baseline"]:
        return "baseline"
    if row["paired_n"] == 0:
        return _delta(row["delta_here"], digits) + (" (unpaired)" if not pd.isna(row["delta_here"]) else "")
    text = _delta(row["paired_delta"], digits)
    if row["paired_n"] >= 2:
        text += f" [{_delta(row['paired_low'], digits)}, {_delta(row['paired_high'], digits)}]"
    return text


def _agreement(value: object) -> str:
    return DASH if value is None or pd.isna(value) else "yes" if value else "no"


def _mean_std(mean: float, std: float, n: int, problems: str = "", digits: int = 1) -> str:
    if n == 0:
        return f"{DASH} ({problems})" if problems else DASH
    text = f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}") + f" (n={n}"
    return text + (f"; {problems})" if problems else ")")


def paper_table(df: pd.DataFrame, table: str = "table5", digits: int = 1) -> pd.DataFrame:
    """The paper's table in its layout with our runs beside it, as strings, one row per paper row.

    The columns are PAPER_COLUMNS, with the two "here" columns once per protocol of the runs (`here_columns`: their
    headers name the protocol), most completed runs first. Rows without runs show the paper's values and a dash in
    the "here" columns. Our Params/MACs (of the first protocol) replace the paper's where runs exist; a value followed
    by "(paper)" is the paper's. The numbers are in `attrs["comparison"]`.
    """
    comparison = compare_to_paper(df, table)
    blocks = protocol_blocks(comparison)
    first = blocks[0][1]
    cost = [
        (_num(row["params_m"]), _num(row["macs_g"])) if row["cost_from"] == "here"
        else (_paper_num(row["params_m"]) + " (paper)", _paper_num(row["macs_g"]) + " (paper)")
        for _, row in first.iterrows()
    ]  # fmt: skip
    out = pd.DataFrame({
        "Ablation": first["ablation"].to_numpy(), "Variant": first["variant"].to_numpy(),
        "Params (M)": [params for params, _ in cost], "MACs (G)": [macs for _, macs in cost],
        "Top-1 paper (%)": [f"{top1:.1f}" for top1 in first["top1_paper"]],
    })  # fmt: skip
    notes = list(comparison.attrs["notes"])
    for protocol, block in blocks:
        top1, delta, t, sign = here_columns(protocol)
        out[top1] = [
            _mean_std(row["top1_here"], row["top1_here_std"], row["n"], row["problems"], digits)
            for _, row in block.iterrows()
        ]
        out[delta] = [_paired(row, digits) for _, row in block.iterrows()]
        out[t] = ["" if base else _delta(x, 1) for base, x in zip(block["baseline"], block["paired_t"], strict=True)]
        out[sign] = ["" if base else _agreement(x) for base, x in zip(block["baseline"], block["sign_agrees"],
                                                                       strict=True)]  # fmt: skip
        rho, rows = rank_correlation(block)
        if protocol is not None and rows >= 3:
            notes.append(f"{protocol}: Spearman rank correlation of top-1 here with the paper's over {rows} rows: "
                         f"{rho:.2f}")  # fmt: skip
    out[PAPER_COLUMNS[-1]] = _deltas(first, "delta_paper", 1)
    if len(blocks) > 1:
        notes.append(f"Params and MACs: those of the runs of {blocks[0][0]!r} where it has some, else the paper's")
    out.attrs.update(comparison=comparison, notes=notes, table=table)
    return out


def axis_table(df: pd.DataFrame, axis: str | list[str] | None = None, digits: int = 1) -> pd.DataFrame:
    """Any sweep, paper experiment or not: one row per configuration with top-1 and top-5 as mean ± std (n).

    `axis`: the axis (or axes) to show; by default every axis that varies among the completed runs. The protocol
    (`protocol_label`, less the axes shown) is a "Protocol" column, rows grouped by it with most completed runs
    first, where the runs have several; with one, `attrs["notes"]` names it. A "Config" column (the run directory
    name without its seed) is added when the shown columns do not tell the rows apart. A mixer's argument is blank
    where no stage's mixer takes it (`axis_applies`: an identity model's pool_size), a dash where it is not recorded.
    """
    agg = aggregate_seeds(df)
    if axis is None:  # a mixer's argument varies where its mixer is used, not where its value means nothing
        varying = [a for a in TABLE_AXES if agg.loc[axis_applies(agg, a), a].nunique(dropna=False) > 1]
        axes = varying or ["model", "mixer"]
    else:
        axes = [axis] if isinstance(axis, str) else list(axis)
        for name in axes:
            if name not in TABLE_AXES:
                raise ValueError(f"--axis {name}: not an axis of the records; {did_you_mean(name, TABLE_AXES)}valid: "
                                 + ", ".join(TABLE_AXES))  # fmt: skip
    agg["Protocol"] = [protocol_label(run, omit=axes) for run in agg.to_dict("records")]
    agg["_completed"] = agg.groupby("Protocol")["n"].transform("sum")
    agg = agg.sort_values(["_completed", "Protocol", *axes], ascending=[False] + [True] * (1 + len(axes)),
                          na_position="last", kind="stable", ignore_index=True)  # fmt: skip
    out = pd.DataFrame({a: _axis_cells(agg, a) for a in axes})
    notes = []
    if agg["Protocol"].nunique() > 1:
        out.insert(0, "Protocol", agg["Protocol"])
    elif len(agg):
        notes.append(f"protocol of all rows: {agg['Protocol'].iloc[0]}")
    if out.duplicated().any():
        out["Config"] = agg["name"]
    out["Params (M)"] = [_num(p / 1e6) for p in pd.to_numeric(agg["params"], errors="coerce").astype("float64")]
    out["MACs (G)"] = [_num(m / 1e9) for m in pd.to_numeric(agg["macs"], errors="coerce").astype("float64")]
    for k in ("top1", "top5"):
        out[f"Top-{k[-1]} (%, mean ± std, n)"] = [
            _mean_std(mean, std, n, digits=digits)
            for mean, std, n in zip(agg[f"{k}_mean_pct"], agg[f"{k}_std_pct"], agg["n"], strict=True)
        ]
    out.attrs.update(notes=notes, table="axes")
    return out


def _axis_cells(agg: pd.DataFrame, axis: str) -> list[str]:
    """An axis column of `axis_table`: blank where its value means nothing (`axis_applies`), a dash where unknown."""
    return ["" if not used else DASH if pd.isna(value) else str(value)
            for value, used in zip(agg[axis], axis_applies(agg, axis), strict=True)]  # fmt: skip


_GROUPS = ("Ablation", "Protocol")  # columns whose rows come in groups: named once, a rule between groups


def _group_column(table: pd.DataFrame) -> str | None:
    return next((c for c in _GROUPS if c in table.columns), None)


def _blank_repeats(table: pd.DataFrame) -> pd.DataFrame:
    """The paper names each ablation once, on the first row of its group (and so does a protocol)."""
    group = _group_column(table)
    if group is None:
        return table
    out = table.copy()
    out.loc[out[group].eq(out[group].shift()), group] = ""
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
    "<": "$<$", ">": "$>$",  # in text mode (OT1) they print as ¡ and ¿
    "±": r"$\pm$", "Δ": r"$\Delta$", "→": r"$\rightarrow$", "—": "---", "−": "$-$", "×": r"$\times$",
}  # fmt: skip
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    """`text` as LaTeX source: special characters escaped, ± Δ → — as math or dashes; a leading sign as math."""
    text = _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], str(text))
    return re.sub(r"^([+-])(?=\d)", r"$\1$", text)


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); a rule between ablation (or protocol) groups."""
    text_columns = {"Ablation", "Variant", "Config", "Protocol"}  # the rest is numbers, and axes (lower case)
    spec = "".join("l" if c in text_columns or c.islower() else "r" for c in table.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule"]
    lines.append(" & ".join(latex_escape(c) for c in table.columns) + r" \\")
    lines.append(r"\midrule")
    shown = _blank_repeats(table)
    group = _group_column(table)
    for i, row in enumerate(shown.itertuples(index=False)):
        if i and group is not None and row[table.columns.get_loc(group)]:
            lines.append(r"\midrule")
        lines.append(" & ".join(latex_escape(cell) for cell in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def to_csv(table: pd.DataFrame) -> str:
    """The table as CSV, every row complete (no blanked repeats)."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return buffer.getvalue()
