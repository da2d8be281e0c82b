"""Train one MetaFormer ablation: `python run.py mixer=identity norm=layernorm` (or a sweep with `-m`).

The composed config is handed to metaformer_lab.train; the run directory is derived from the overrides.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metaformer_lab.config import check_sweep_launch, register_resolvers
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import train

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            check_sweep_launch(cfg, os.environ)
        record = train(cfg, hydra_cfg.runtime.output_dir)
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # a bad setting is the user's to fix, not a crash: say what and stop, without a traceback
        print(f"error: {error}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None  # the sweep goes on with its other runs (this one's record, if it got one, says failed)
        raise SystemExit(2) from None
    return record.best_val_top1


if __name__ == "__main__":
    main()
