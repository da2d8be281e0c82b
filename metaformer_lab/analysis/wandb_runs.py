"""Runs from Weights & Biases instead of run directories, in the DataFrame schema of `collect_runs`.

wandb is imported only here and only when called: the rest of analysis works without it and without a network.
What training puts there (training/loggers.py, train.py `_finish_wandb`): the flat axes, params, macs and the
resolved config at the top of the run config; params, macs, best_val_top1 and status in the summary.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from metaformer_lab.analysis.collect import AXES, record_row, runs_frame
from metaformer_lab.record import STATUSES, RunRecord

# a run's wandb state when its summary has no status (e.g. killed before `_finish_wandb`)
_STATES = {
    "finished": "completed", "running": "running", "crashed": "failed", "failed": "failed", "killed": "interrupted",
}  # fmt: skip


def collect_wandb(path: str, api: Any = None) -> pd.DataFrame:
    """Every run of the wandb project `path` ("entity/project"), one row each, as `collect_runs` returns them."""
    if api is None:
        try:
            import wandb
        except ImportError as error:
            raise RuntimeError("reading runs from wandb needs the wandb package (pip install wandb)") from error
        try:
            api = wandb.Api()
        except Exception as error:
            raise RuntimeError(f"cannot reach wandb ({type(error).__name__}: {error}); offline or not logged in? "
                               "Run `wandb login`, or analyse the run directories instead") from error  # fmt: skip
    try:
        runs = list(api.runs(path))
    except Exception as error:
        raise RuntimeError(f"cannot read wandb runs of {path!r}: {type(error).__name__}: {error}") from error
    return runs_frame([_row(run) for run in runs])


def _row(run: Any) -> dict[str, Any]:
    config, summary = dict(run.config), dict(run.summary)
    resolved = config.get("config") or {}
    status = summary.get("status") or _STATES.get(run.state, run.state)
    axes = {key: config[key] for key in AXES if config.get(key) is not None}
    axes.setdefault("image_size", (resolved.get("data") or {}).get("image_size"))  # not among wandb's axes
    record = RunRecord(
        status=status if status in STATUSES else "failed",
        error=None if status in STATUSES else f"wandb state {run.state!r}",
        **axes,
        # the protocol, where training logged it (else the label has no schedule and training-set size)
        schedule=summary.get("schedule", config.get("schedule")) or "",
        train_images=summary.get("train_images", config.get("train_images")),
        max_side=summary.get("max_side", config.get("max_side")),
        data_digest=config.get("data_digest"),
        val_history=list(summary.get("val_history") or []),
        params=summary.get("params", config.get("params")),
        macs=summary.get("macs", config.get("macs")),
        best_val_top1=summary.get("best_val_top1"),
        final_val_top1=summary.get("val/top1"),
        final_val_top5=summary.get("val/top5"),
        wandb_id=run.id,
        config=resolved,
    )  # fmt: skip
    return record_row(record, run_dir=getattr(run, "url", run.id))
