"""Weights & Biases set-up: names, groups and tags from the ablation axes, offline unless a key is configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from metaformer_lab.record import AXES, RunRecord


def wandb_mode(configured: str | None) -> str | None:
    """`logger.mode` if set; else WANDB_MODE if set (wandb reads it); else online with an API key, offline without."""
    if configured is not None or os.environ.get("WANDB_MODE"):
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def wandb_logger(cfg: DictConfig, run_dir: Path, record: RunRecord) -> WandbLogger:
    """A WandbLogger whose run is named after the run directory, grouped by experiment or sweep, tagged by axis.

    The run id is kept in the record, so a resumed run continues the same wandb run.
    """
    axes = {key: getattr(record, key) for key in AXES}
    if os.environ.get("WANDB_RUN_ID"):  # a `wandb agent` chose the run this process belongs to
        record.wandb_id = os.environ["WANDB_RUN_ID"]
    elif record.wandb_id is None:
        record.wandb_id = f"{run_dir.name[:40]}-{os.urandom(4).hex()}".replace("=", "-").replace(",", "_")
    return WandbLogger(
        name=run_dir.name,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.sweep_name or cfg.experiment or "default",
        tags=[f"{key}={value}" for key, value in axes.items() if value is not None],
        save_dir=str(run_dir),
        id=record.wandb_id,
        resume="allow",
        mode=wandb_mode(cfg.logger.mode),
        config={**axes, "params": record.params, "macs": record.macs, "config": record.config},
    )
