"""What a run or sweep will cost, before it starts: runs, their state, and time from measured throughput.

    python -m metaformer_lab.plan +sweep=table5_mixers seed=0,1,2 data=shapes optim.epochs=30

Takes the same overrides as `python run.py -m`, expands the sweep as Hydra's basic sweeper does, looks for each
run's directory (completed runs cost nothing, interrupted ones only their remaining epochs), and times a few
training steps of each distinct model on this machine's device.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from metaformer_lab.config import (
    build_datamodule,
    build_model,
    build_optim,
    device_count,
    model_arguments,
    register_resolvers,
    run_name,
)  # fmt: skip
from metaformer_lab.profile import measure_throughput
from metaformer_lab.record import FINAL, RECORD_NAME, read_record
from metaformer_lab.registry import ConfigError

CONF = Path(__file__).parents[1] / "conf"


@dataclass
class PlannedRun:
    run_dir: str
    state: str  # new, resume, rerun (after a failure) or done
    epochs_left: int
    images_per_s: float | None
    seconds: float | None


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs `python run.py -m <overrides>` would launch, each as its list of overrides."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    params = [f"{key}={value}" for key, value in (compose_job(fixed)[2] or {}).items()]
    jobs = BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)
    return [list(job) for batch in jobs for job in batch]


def compose_job(job: list[str]) -> tuple[DictConfig, str, DictConfig | None]:
    """A job's config (as `run.py` receives it), the run directory `run.py -m` gives it, and the sweep's params."""
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=job, return_hydra_config=True)
    run_dir = str(Path(cfg.hydra.sweep.dir) / run_name(cfg.hydra.job.override_dirname))
    with open_dict(cfg):
        params = cfg.hydra.sweeper.params
        del cfg["hydra"]
    return cfg, run_dir, params


def plan(overrides: list[str], device: torch.device, measure_steps: int = 3) -> list[PlannedRun]:
    speeds: dict[str, tuple[float, float]] = {}  # distinct model and input size -> (train, forward) img/s
    sizes: dict[str, tuple[int | None, int | None]] = {}  # distinct data settings -> (train, val) images
    planned = []
    for job in expand_sweep(overrides):
        cfg, run_dir, _ = compose_job(job)
        optim = build_optim(cfg)
        datamodule = build_datamodule(cfg)
        total = optim.epochs + optim.cooldown_epochs
        previous = read_record(run_dir) if (Path(run_dir) / RECORD_NAME).exists() else None
        if previous is not None and previous.status in FINAL:
            planned.append(PlannedRun(run_dir, "done", 0, None, 0.0))
            continue
        state = "new" if previous is None else "rerun" if previous.status == "failed" else "resume"
        epochs_left = total - (previous.epochs if state == "resume" else 0)
        key = repr((model_arguments(cfg, datamodule.num_classes), cfg.data.image_size))
        if key not in speeds:
            model = build_model(cfg, datamodule.num_classes)
            batch = min(cfg.data.batch_size, 32)  # enough to be representative, small enough to be quick
            speed = measure_throughput(model, cfg.data.image_size, batch, device, steps=measure_steps, warmup=1)
            speeds[key] = (speed.train_step_img_s, speed.forward_img_s)
        train_speed, forward_speed = speeds[key]
        data_key = repr(OmegaConf.to_container(cfg.data))
        if data_key not in sizes:  # an image folder is scanned once, not once per job
            sizes[data_key] = datamodule.split_sizes()
        train_images, val_images = sizes[data_key]
        seconds = None
        if train_images is not None:
            workers = device_count(cfg.trainer) * cfg.trainer.num_nodes
            per_epoch = train_images / train_speed + (val_images or 0) / forward_speed
            seconds = epochs_left * per_epoch / workers
        planned.append(PlannedRun(run_dir, state, epochs_left, train_speed, seconds))
    return planned


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 86400 * 2 else f"{seconds / 86400:.1f} days"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaformer_lab.plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="as for `python run.py -m`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        runs = plan(args.overrides, torch.device(args.device))
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    for run in runs:
        speed = f"{run.images_per_s:8.1f} img/s" if run.images_per_s else " " * 14
        print(f"{run.state:7s} {run.epochs_left:4d} ep {speed} {_duration(run.seconds):>10s}  {Path(run.run_dir).name}")
    todo = [r for r in runs if r.state != "done"]
    known = [r.seconds for r in todo if r.seconds is not None]
    total = sum(known) if len(known) == len(todo) else math.nan
    print(f"{len(runs)} runs: {len(runs) - len(todo)} done, {len(todo)} to run; "
          f"estimated {_duration(None if math.isnan(total) else total)} on {args.device} "
          f"(training throughput measured here, divided by the configured device count)")  # fmt: skip


if __name__ == "__main__":
    main()
