"""Train one MetaFormer ablation: `python run.py mixer=identity norm=layernorm` (or a sweep with `-m`).

The composed config is handed to metaformer_lab.training.launch, which trains it in this process or in one fresh
process per device; the run directory is derived from the overrides. `python run.py --help` lists the groups, the
keys most used and how to shorten a run.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from metaformer_lab.overrides import check_command_line, register_resolvers
from metaformer_lab.registry import ConfigError

register_resolvers()
log = logging.getLogger("run")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # imported here, after the command line was checked: a typo is answered before torch and Lightning load
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metaformer_lab.config import per_stage_groups
    from metaformer_lab.train import discard_unstarted_run, now_utc
    from metaformer_lab.training.hydra_callbacks import report_job
    from metaformer_lab.training.launch import RanksFailed, launch
    from metaformer_lab.training.loggers import shown_path
    from metaformer_lab.training.start import AlreadyRunning, UnreadableCheckpoint

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    began = now_utc()
    try:
        record = launch(per_stage_groups(cfg, hydra_cfg.overrides.task), run_dir)
    except ConfigError as error:
        discard_unstarted_run(run_dir)  # a typo leaves no directory behind, and no row in any table
        report_job(run_dir, "refused", str(error))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # a bad setting is the user's to fix, not a crash: say what and stop, without a traceback
        print(f"error: {error}", file=sys.stderr)
        if in_sweep:
            return None  # the sweep goes on with its other runs
        raise SystemExit(2) from None
    except (AlreadyRunning, UnreadableCheckpoint) as stop:  # the line says all: what happened and what to do
        running = isinstance(stop, AlreadyRunning)  # then the directory is another process's: left as it is
        report_job(run_dir, "skipped" if running else "failed", str(stop))  # (the unreadable one's record: failed)
        print(f"{shown_path(run_dir)}: {stop}; skipped" if running else f"error: {stop}", file=sys.stderr)
        if in_sweep:
            return None
        raise SystemExit(1) from None
    except Exception as failure:  # the record says `failed`, with the error; the traceback is in run.log
        report_job(run_dir, "failed", f"{type(failure).__name__}: {failure}")
        if not in_sweep:
            if isinstance(failure, RanksFailed):  # the ranks have shown their tracebacks, the job its end line
                raise SystemExit(1) from None
            raise
        # a rank's traceback was shown by the rank; an error in this process is shown here
        log.error("%s failed; the sweep goes on", run_dir, exc_info=not isinstance(failure, RanksFailed))
        return None
    skipped = record.finished_at is not None and record.finished_at < began  # finished before this job began
    report_job(run_dir, record.status, record.error, earlier=skipped)
    return record.best_val_top1


def check_arguments(argv: list[str]) -> None:
    """Every group choice and key of the command line exists, before Hydra composes it (which would skip a group
    choice that names no file, and answer an unknown key with Hydra's advice to add it); `debug=null` as Hydra
    spells it."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)  # Hydra's own flags; Hydra itself reports bad ones
    asks_for_help = args.help or args.hydra_help or args.info or args.shell_completion
    another_config = args.config_path or args.config_name or args.config_dir
    if not (asks_for_help or another_config):
        hydra_spelling = dict(zip(args.overrides, check_command_line(args.overrides, args.multirun), strict=True))
        sys.argv[1:] = [hydra_spelling.get(arg, arg) for arg in argv]


if __name__ == "__main__":
    try:
        check_arguments(sys.argv[1:])
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)  # as for any other bad setting
    main()
