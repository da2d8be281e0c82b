"""`python -m metaformer_lab.analysis DIR [DIR...]`: the paper's table with our runs beside it.

The table goes to stdout (so `--format csv > t.csv` stays clean); problem runs, duplicates and notes go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from metaformer_lab.analysis.collect import collect_runs, duplicate_runs, problem_runs
from metaformer_lab.analysis.plots import plot_accuracy_vs_macs, plot_deltas, save_figure
from metaformer_lab.analysis.tables import (
    TABLES,
    axis_table,
    paper_table,
    protocols_side_by_side,
    report_notes,
    to_csv,
    to_latex,
    to_markdown,
)
from metaformer_lab.analysis.wandb_runs import collect_wandb

RENDER = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    description = "The paper's table with our runs beside it, from run records (result.json)."
    parser = argparse.ArgumentParser(prog="python -m metaformer_lab.analysis", description=description)
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="directories searched for result.json (default: runs)")
    parser.add_argument("--table", choices=[*TABLES, "axes"], default="table5",
                        help="a paper table, or `axes`: one row per configuration of any sweep")  # fmt: skip
    parser.add_argument("--axis", help="with --table axes: the axes to show, comma-separated (default: those varying)")
    parser.add_argument("--format", choices=list(RENDER), default="markdown", help="what is printed")
    parser.add_argument("--out", type=Path, help="write table.md/.tex/.csv, protocols.md/.tex/.csv (two protocols or "
                        "more side by side), runs.csv and the plots (PNG, PDF) here")  # fmt: skip
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of this wandb project")
    args = parser.parse_args(argv)
    if not args.dirs and not args.wandb:
        args.dirs = ["runs"]
    return args


def _report(title: str, frame: pd.DataFrame) -> None:
    """A markdown listing on stderr, long errors cut to one line."""
    frame = frame.astype(object).where(frame.notna(), "")  # blanks, not nan and <NA>
    if "error" in frame:
        frame["error"] = [" ".join(str(e).split())[:160] for e in frame["error"]]
    print(f"\n{title} ({len(frame)}):", file=sys.stderr)
    print(frame.to_markdown(index=False, disable_numparse=True), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for missing in [d for d in args.dirs if not Path(d).is_dir()]:
        print(f"note: {missing} is not a directory; no runs from it", file=sys.stderr)
    frames = [collect_runs(*[d for d in args.dirs if Path(d).is_dir()])]
    if args.wandb:
        try:
            frames.append(collect_wandb(args.wandb))
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    if args.table == "axes":
        try:
            table = axis_table(df, args.axis.split(",") if args.axis else None)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        table = paper_table(df, args.table)
    print(RENDER[args.format](table), end="" if args.format == "csv" else "\n")
    agreement = protocols_side_by_side(table)  # e.g. both CPU proxies of Table 5
    if agreement is not None:
        print("\nThe protocols side by side: Δ vs the baseline, paired by seed, and its sign against the paper's\n")
        print(RENDER[args.format](agreement), end="" if args.format == "csv" else "\n")
        table.attrs["notes"] = [*table.attrs.get("notes", []), *agreement.attrs["notes"]]

    print(f"\n{len(df)} run records; {int((df['status'] == 'completed').sum())} completed", file=sys.stderr)
    for note in report_notes(df, table):
        print(f"note: {note}", file=sys.stderr)
    problems, duplicates = problem_runs(df), duplicate_runs(df)
    if len(problems):
        _report("Runs without a result (not in the table)", problems)
    if len(duplicates):
        _report("Duplicates: one configuration and seed recorded more than once (counted once)", duplicates)

    if args.out is not None:
        written, unplotted = _write(args.out, df, table, agreement)
        print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
        if unplotted:
            print(f"not written, nothing to plot (see the notes): {', '.join(unplotted)}", file=sys.stderr)
    return 0


def _write(
    out: Path, df: pd.DataFrame, table: pd.DataFrame, agreement: pd.DataFrame | None = None
) -> tuple[list[Path], list[str]]:
    """The table's files and plots in `out`: (paths written, names of the plots with nothing to show)."""
    out.mkdir(parents=True, exist_ok=True)
    comparison = table.attrs.get("comparison")  # a paper table's numbers, unformatted
    texts = {"table.md": to_markdown(table), "table.tex": to_latex(table), "table.csv": to_csv(table),
             "runs.csv": to_csv(df), "comparison.csv": None if comparison is None else to_csv(comparison)}  # fmt: skip
    for suffix, render in {"md": to_markdown, "tex": to_latex, "csv": to_csv}.items():  # the protocols side by side
        texts[f"protocols.{suffix}"] = None if agreement is None else render(agreement)
    figures = {"deltas": plot_deltas(table)} if comparison is not None else {}
    figures["accuracy_vs_macs"] = plot_accuracy_vs_macs(df)
    stale = [name for name, text in texts.items() if text is None]
    stale += [f"deltas.{kind}" for kind in ("png", "pdf")] if comparison is None else []
    for name in stale:  # a file of an earlier call, of other runs or another table, would read as this one's
        (out / name).unlink(missing_ok=True)
    written = []
    for name, text in texts.items():
        if text is not None:
            (out / name).write_text(text if text.endswith("\n") else text + "\n")
            written.append(out / name)
    unplotted = []
    for name, fig in figures.items():
        if fig is not None:
            written += save_figure(fig, out / name)
            continue
        for path in (out / f"{name}.png", out / f"{name}.pdf"):
            path.unlink(missing_ok=True)
            unplotted.append(path.name)
    return written, unplotted


if __name__ == "__main__":
    sys.exit(main())
