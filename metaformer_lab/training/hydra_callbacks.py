"""What `run.py` tells the user around its jobs: an output directory it cannot write to, before anything starts; at
the end of a sweep, what each job did, counted, and an exit status that says whether every job went well.

Each job, wherever a launcher runs it (this process, a joblib worker, a SLURM node), appends one line to the
sweep's ledger, a file named by an environment variable the launching process sets before any job starts (SLURM
passes the environment on). A failed or diverged job never stops the sweep; this summary is where it shows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metaformer_lab.record import unwritable
from metaformer_lab.training.loggers import shown_path
from metaformer_lab.training.start import cluster_ranks

LEDGER = "METAFORMER_LAB_SWEEP_LEDGER"
GOOD = ("completed",)


def report_job(run_dir: str | Path, status: str, detail: str | None = None, earlier: bool = False) -> None:
    """One job's outcome, for the sweep's summary: a record's status, `refused` (a bad setting) or `skipped` (another
    process is running it)."""
    ranks = cluster_ranks()
    if (path := os.environ.get(LEDGER)) and (ranks is None or ranks.rank == 0):  # under SLURM every rank is a job
        line = {"run_dir": shown_path(run_dir), "status": status, "detail": detail, "earlier": earlier}
        with open(path, "a") as ledger:  # one short append per job (on NFS, a line may be lost: "without a report")
            ledger.write(json.dumps(line) + "\n")


class JobsReport(Callback):
    """Refuses an output directory it cannot write to (exit 2), and ends `run.py -m` with a summary of its jobs
    (exit 1 unless every job completed)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable("hydra.run.dir", Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from metaformer_lab.overrides import sweep_jobs  # run.py has checked the command line

        _check_writable("hydra.sweep.dir", Path(config.hydra.sweep.dir))
        folder = Path(config.hydra.sweep.dir) / ".sweeps"
        folder.mkdir(exist_ok=True)
        self.ledger = (folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl").resolve()
        self.ledger.touch()
        os.environ[LEDGER] = str(self.ledger)
        hydra_state = Singleton.get_state()  # composing below would rename the jobs ("app", the compose API's name)
        try:
            self.expected: int | None = len(sweep_jobs(list(config.hydra.overrides.task)))
        except Exception:  # a sweep this cannot expand (another sweeper): the summary counts what reported
            self.expected = None
        finally:
            Singleton.set_state(hydra_state)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(LEDGER, None)
        jobs = [json.loads(line) for line in self.ledger.read_text().splitlines() if line.strip()]
        self.ledger.unlink()
        if not any(self.ledger.parent.iterdir()):
            self.ledger.parent.rmdir()
        lines, all_good = summarize(jobs, self.expected)
        print("\n".join(lines), flush=True)
        if not all_good:
            raise SystemExit(1)


def summarize(jobs: list[dict], expected: int | None) -> tuple[list[str], bool]:
    """(the summary's lines, whether every job completed)."""
    counts = Counter(job["status"] for job in jobs)
    earlier = sum(job["earlier"] for job in jobs)
    missing = (expected or 0) - len(jobs)
    parts = [f"{counts[s]} {s}" for s in ("completed", "diverged", "failed", "interrupted", "refused") if counts[s]]
    if earlier:
        parts.append(f"{earlier} of them finished before (skipped)")
    if counts["skipped"]:
        parts.append(f"{counts['skipped']} skipped (already running)")
    if missing > 0:
        parts.append(f"{missing} ended without a report (killed?)")
    total = expected if expected is not None else len(jobs)
    lines = [f"sweep of {total} job{'s' * (total != 1)}: " + ", ".join(parts or ["nothing"])]
    for job in jobs:
        if job["status"] not in GOOD:
            detail = (job["detail"] or "").strip().splitlines()
            lines.append(f"  {job['status']:<11} {job['run_dir']}" + (f": {detail[-1][:200]}" if detail else ""))
    all_good = missing <= 0 and all(job["status"] in GOOD for job in jobs)
    if counts["failed"] or counts["interrupted"] or missing > 0:
        lines.append("the same command again skips completed and diverged runs, resumes interrupted ones and starts "
                     "failed ones over")
    return lines, all_good


def _check_writable(key: str, folder: Path) -> None:
    """Create `folder` and write a file in it, or stop with a message (Hydra would show a traceback)."""
    if why := unwritable(folder):
        print(f"error: {key}={str(folder)!r}: cannot write there ({why}); set {key} to a writable directory",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
