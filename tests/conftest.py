import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from metaformer_lab.config import per_stage_groups
from metaformer_lab.overrides import register_resolvers
from metaformer_lab.record import RunRecord, read_record

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data"
FAULTS = str(Path(__file__).parent / "faults")  # sitecustomize.py: injects failures into processes a test starts
# a few seconds of training on the embedded data
QUICK = [
    "data.train_size=256", "data.val_size=128", "data.batch_size=64", "optim.global_batch=64", "optim.epochs=2",
    "optim.warmup_epochs=0", "logger=csv", "model.depths=[1,1,1,1]", "model.dims=[32,32,64,64]", "trainer=cpu",
]  # fmt: skip
# one short epoch on an image folder (add data.root=...)
FOLDER_RUN = [
    "data=imagefolder", "data.image_size=32", "data.batch_size=10", "optim.global_batch=10", "data.num_workers=0",
    "model.depths=[1,1,1,1]", "model.dims=[16,16,32,32]", "optim.epochs=1", "logger=csv", "trainer=cpu",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _few_threads():
    # 2-core CI machine: oversubscribing threads makes the tiny models slower, not faster
    torch.set_num_threads(1)


def compose_config(*overrides: str) -> DictConfig:
    """The config `python run.py <overrides>` trains (run.py applies per_stage_groups as well)."""
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return per_stage_groups(compose("config", overrides=list(overrides)), overrides)


def run_cli_many(cases: dict[str, list[str]], root: Path, timeout: int = 300) -> dict[str, subprocess.CompletedProcess]:
    """`python run.py args...` for each named case, each in its own folder under `root`, in one interpreter (the
    imports paid once: tests/run_many.py). For command lines that stop before training."""
    folders = {name: root / f"case{i}" for i, name in enumerate(cases)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    payload = json.dumps([[str(folders[name]), args] for name, args in cases.items()])
    driver = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "run_many.py"), str(ROOT / "run.py"), payload], env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert driver.returncode == 0, driver.stderr[-3000:]
    codes = json.loads(driver.stdout.strip().splitlines()[-1])
    results = {}
    for (name, args), code in zip(cases.items(), codes, strict=True):
        folder = folders[name]
        results[name] = subprocess.CompletedProcess(args, code, (folder / "stdout").read_text(),
                                                    (folder / "stderr").read_text())  # fmt: skip
        results[name].cwd = folder  # where it ran (its runs/, if any)
    return results


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python run.py args...` in `cwd`, as a user would type it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def only_record(root: Path) -> RunRecord:
    """The one run record under `root`."""
    records = list(root.rglob("result.json"))
    assert len(records) == 1, records
    return read_record(records[0])


def records_by_mixer(root: Path) -> dict[str, RunRecord]:
    """The run records under `root` (a sweep's), by mixer."""
    return {record.mixer: record for record in map(read_record, root.rglob("result.json"))}
