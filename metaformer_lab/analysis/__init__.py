"""Analysis of run records: collect `result.json` files, aggregate seeds, the paper's tables, plots.

Reads run records (the schema in `metaformer_lab.record`) and nothing else; it imports no training code, so it runs
where only the records are (`python -m metaformer_lab.analysis runs/`, the notebooks in analysis/).
"""

from metaformer_lab.analysis.collect import (
    AXES,
    CONFIG_AXES,
    aggregate_seeds,
    collect_runs,
    config_key,
    duplicate_runs,
    problem_runs,
    protocol_label,
)
from metaformer_lab.analysis.plots import place_labels, plot_accuracy_vs_macs, plot_deltas, save_figure
from metaformer_lab.analysis.tables import (
    axis_table,
    compare_to_paper,
    here_columns,
    paper_results,
    paper_table,
    protocol_agreement,
    protocols_side_by_side,
    report_notes,
    to_csv,
    to_latex,
    to_markdown,
)
from metaformer_lab.analysis.wandb_runs import collect_wandb

__all__ = [
    "AXES",
    "CONFIG_AXES",
    "aggregate_seeds",
    "axis_table",
    "collect_runs",
    "collect_wandb",
    "compare_to_paper",
    "config_key",
    "duplicate_runs",
    "here_columns",
    "paper_results",
    "paper_table",
    "place_labels",
    "plot_accuracy_vs_macs",
    "plot_deltas",
    "problem_runs",
    "protocol_agreement",
    "protocol_label",
    "protocols_side_by_side",
    "report_notes",
    "save_figure",
    "to_csv",
    "to_latex",
    "to_markdown",
]
