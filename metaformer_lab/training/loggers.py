"""Where a run's output goes: Weights & Biases (names, groups and tags from the ablation axes, offline unless a key
is configured), and the console and run.log (Lightning's lines routed there, without its tips and banners)."""

from __future__ import annotations

import logging
import netrc
import os
import warnings
from pathlib import Path

import wandb
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
    logger = WandbLogger(
        name=run_dir.name,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.sweep_name or cfg.experiment or "default",
        tags=[f"{key}={value}" for key, value in axes.items() if value is not None],
        save_dir=str(run_dir),
        id=record.wandb_id,
        resume="allow",
        mode=wandb_mode(cfg.logger.mode),
        config={**axes, "params": record.params, "macs": record.macs, "schedule": record.schedule,
                "train_images": record.train_images, "max_side": record.max_side, "data_digest": record.data_digest,
                "config": record.config},  # fmt: skip
        # wandb's banners and run summary would bury the run's own lines; the run says where its wandb data went
        settings=wandb.Settings(silent=True),
    )
    # Lightning passes `anonymous`, which wandb only warns about (it has no effect), even when silent
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


# Lightning's info lines that say nothing about this run: advertisements, and lines the run's own start lines replace
# (device and precision; the schedule, which says fast_dev_run)
_NOISE = ("💡 Tip", "GPU available:", "TPU available:", "HPU available:", "Running in `fast_dev_run` mode")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE)


def shown_path(path: str | Path) -> str:
    """`path` relative to the working directory when it is below it (shorter lines), else as it is."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def route_library_output() -> None:
    """Lightning's log lines to the root logger's handlers (Hydra's console and run.log), without its noise.

    Lightning gives its loggers handlers of their own (and stops propagation when it is imported before logging is
    configured, as run.py does), so its lines would skip run.log or show twice.
    """
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
        logging.captureWarnings(True)  # Lightning's warnings too belong in run.log
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _not_noise not in logger.filters:
            logger.addFilter(_not_noise)
    # an internal deprecation between Lightning and newer torch: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # it looks only at the loader; the data module's own state (data/datamodules.py) resumes mid-epoch exactly
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def wandb_location(logger: WandbLogger) -> str | None:
    """Where the wandb run went, and how to upload it when it is offline: one line for the end of a run."""
    run = logger._experiment  # None on other ranks, and before anything was logged
    if run is None:
        return None
    if run.settings.mode == "offline" or run.offline:
        return f"wandb: offline; upload with `wandb sync {shown_path(Path(run.dir).parent)}`"
    return f"wandb: {run.url}"
