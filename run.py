"""Train one MetaFormer ablation: `python run.py mixer=identity norm=layernorm` (or a sweep with `-m`).

The composed config is handed to metaformer_lab.train; the run directory is derived from the overrides.
`python run.py --help` lists the groups, the keys most used and how to shorten a run.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metaformer_lab.config import check_group_syntax, check_sweep_launch, per_stage_groups, register_resolvers
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import discard_unstarted_run, train

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        cfg = per_stage_groups(cfg, hydra_cfg.overrides.task)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            check_sweep_launch(cfg, os.environ)
        record = train(cfg, run_dir)
    except ConfigError as error:
        discard_unstarted_run(run_dir)  # a typo leaves no directory behind, and no row in any table
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # a bad setting is the user's to fix, not a crash: say what and stop, without a traceback
        print(f"error: {error}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None  # the sweep goes on with its other runs
        raise SystemExit(2) from None
    return record.best_val_top1


if __name__ == "__main__":
    try:
        check_group_syntax(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"error: {error}")
    main()
