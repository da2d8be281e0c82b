"""Run records -> DataFrames: every `result.json` under some directories as one row, seeds aggregated per configuration.

Analysis reads run records and nothing else: the schema contract is `metaformer_lab.record`, never training code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from metaformer_lab.record import AXES, CONFIG_AXES, NON_RESULT_KEYS, RECORD_NAME, RunRecord, read_record

# config keys left out of `config_key`: those that change no result, plus the seed (seeds of one configuration are
# grouped) and data.root (the same dataset sits at a different path on each machine)
RUN_SPECIFIC_KEYS = ("seed", *NON_RESULT_KEYS, "data.root")
# `config` (the whole resolved Hydra config) and `versions` are nested dicts: they would make runs.csv unreadable,
# so they are left out; `config_key` stands for the config, and `collect_runs(..., config=True)` flattens it.
_NESTED = ("config", "versions", "val_history")
# the mixers' arguments, and the mixers that take each (the classes of models/mixers.py; a test keeps this twin
# true): in a run whose stages have none of them, the value was never used. pool_size is a record axis; kernel_size
# and head_dim are read from the run's resolved config (`mixer.kernel_size`, `mixer.head_dim`).
MIXER_ARGUMENTS = {
    "pool_size": ("pooling",), "kernel_size": ("dwconv", "sepconv"), "head_dim": ("attention", "attention_nobias"),
}  # fmt: skip
_FROM_CONFIG = ("kernel_size", "head_dim")
# the axes of a configuration, as tables group and show them: the record's, the mixer's arguments after the mixer
# augment_on: where the training images were augmented (data.augment_on as resolved), for the paths' parity sweep
TABLE_AXES = tuple(dict.fromkeys(["model", "mixer", *MIXER_ARGUMENTS, *CONFIG_AXES, "augment_on"]))
_PER_STAGE = {"pool_size": "Int64", "kernel_size": "Int64", "head_dim": "Int64", "residual": "boolean",
              "mlp": "boolean"}  # fmt: skip
_INTS = ("seed", "image_size", "train_images", "max_side", "params", "frozen_params", "macs", "epochs", "steps",
         "global_batch", "world_size")  # fmt: skip
_FLOATS = ("best_val_top1", "best_val_top5", "final_val_top1", "final_val_top5", "late_gain_pct", "lr", "wall_time_s")
COLUMNS = (
    "status", "error", *AXES, *_FROM_CONFIG, "mixer_stages", "schedule", "train_images", "max_side", "data_digest",
    "augment_on",
    "protocol",
    "params", "frozen_params", "macs", "best_val_top1", "best_val_top5", "final_val_top1", "final_val_top5",
    "late_gain_pct", "epochs", "steps", "global_batch", "lr", "wall_time_s", "train_throughput_img_s", "accelerator",
    "device_name", "precision", "channels_last", "tf32", "cudnn_benchmark",
    "world_size", "started_at", "finished_at", "git_commit", "wandb_id", "schema_version", "name", "run_dir",
    "config_key", "duplicate",
)  # fmt: skip

# a run's protocol: what its accuracy depends on besides the ablation axes. Runs of two protocols are never compared
# in one column: a paper table has a "here" column per protocol, and its header names it.
# max_side: the long side a shards folder's images were cut to (data=shards --max-side), not the paper's pixels
PROTOCOL_PARTS = ("data", "image_size", "max_side", "train_images", "model", "schedule")


def config_key(config: dict[str, Any], axes: dict[str, Any] | None = None) -> str:
    """A short hash of the resolved config without its run-specific keys: equal for the seeds of one configuration.

    Hashing the config rather than parsing the run directory name is robust to how a run was launched (the order of
    overrides, defaults spelled out or not, `train()` called on any directory, names shortened to a hash). A record
    with no config (older or foreign writers) is keyed by its axes instead.
    """
    if config:
        kept = json.loads(json.dumps(config, default=str))  # a deep copy that also makes every leaf JSON-able
        for dotted in RUN_SPECIFIC_KEYS:
            *parents, leaf = dotted.split(".")
            node = kept
            for parent in parents:
                node = node.get(parent) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
    else:
        kept = {key: (axes or {}).get(key) for key in CONFIG_AXES}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def record_row(record: RunRecord, run_dir: str, config: bool = False) -> dict[str, Any]:
    """One DataFrame row from a record; `run_dir` is where the record was found (its own field may be stale)."""
    row = {key: value for key, value in asdict(record).items() if key not in _NESTED}
    row["mixer_stages"] = ",".join(record.mixer_stages)
    row["late_gain_pct"] = late_gain(record.val_history)
    mixer = record.config.get("mixer")
    row.update({key: _stage_values(mixer.get(key)) if isinstance(mixer, dict) else None for key in _FROM_CONFIG})
    # the images' max side is DEST's (its manifest), not the config's: runs on cut images are another configuration
    # likewise the data set's content where the record has it (data=idx: MNIST or Fashion-MNIST at any data.root)
    extra = {key: getattr(record, key) for key in ("max_side", "data_digest") if getattr(record, key)}
    keyed = {**record.config, **extra} if record.config and extra else record.config
    row.update(run_dir=run_dir, name=Path(run_dir).name, config_key=config_key(keyed, row))
    if config:
        row.update({f"config.{key}": value for key, value in _flatten(record.config).items()})
    return row


LATE_VALIDATIONS = 2  # a run still learning at its end gained top-1 over this many last validations


def late_gain(val_history: list[dict[str, float]]) -> float | None:
    """Top-1 points a run gained over its last LATE_VALIDATIONS validations (its last epochs, validating once an
    epoch): large where the budget ended while it was still learning. None with fewer validations (older records
    have none)."""
    if len(val_history) <= LATE_VALIDATIONS:
        return None
    return 100 * (val_history[-1]["top1"] - val_history[-1 - LATE_VALIDATIONS]["top1"])


def _stage_values(value: Any) -> Any:
    """A config value as the record's per-stage axes hold it: one value, or "a,b,c,d" where the stages differ."""
    if not isinstance(value, list):
        return value
    return value[0] if len(set(map(str, value))) == 1 else ",".join(str(v).lower() for v in value)


def axis_applies(frame: pd.DataFrame, axis: str) -> pd.Series:
    """Per row of `frame` (runs or configurations): does its value of `axis` mean anything? A mixer's argument
    (MIXER_ARGUMENTS) only where some stage's mixer takes it (an identity model's pool_size does not); any other
    axis, and any row whose mixer is not recorded, yes."""
    users = MIXER_ARGUMENTS.get(axis)
    if users is None:
        return pd.Series(True, index=frame.index)
    return frame["mixer"].map(lambda mixer: not _known(mixer) or any(m in users for m in str(mixer).split(",")))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _known(value: Any) -> bool:
    return value != "" if isinstance(value, str) else value is not None and not pd.isna(value)


def _count(n: int) -> str:
    """20000 -> 20k, 1281167 -> 1.28M: three significant digits."""
    rounded = float(f"{n:.3g}")
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if rounded >= scale:
            return f"{rounded / scale:g}{suffix}"
    return f"{rounded:g}"


def protocol_label(run: Mapping[str, Any], omit: Collection[str] = ()) -> str:
    """A run's protocol (PROTOCOL_PARTS) as a label: "shapes 32 px, 20k img, small, 12 ep".

    Unknown parts, and those in `omit` (e.g. the model where a table row names it already), are left out.
    """
    text = {key: str(run.get(key)) for key in PROTOCOL_PARTS if key not in omit and _known(run.get(key))}
    if "image_size" in text:
        text["image_size"] = f"{int(run['image_size'])} px"
    if "train_images" in text:
        text["train_images"] = f"{_count(int(run['train_images']))} img"
    if "max_side" in text:
        text["max_side"] = f"max side {int(run['max_side'])}"
    items = [" ".join(text[key] for key in ("data", "image_size") if key in text)]  # "shapes 32 px"
    items += [text[key] for key in ("max_side", "train_images", "model", "schedule") if key in text]
    return ", ".join(item for item in items if item) or "protocol unknown"


def runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows as a DataFrame with every column of COLUMNS (also when empty), typed, duplicates flagged."""
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))
    df = pd.DataFrame(rows, columns=[*COLUMNS, *extra])
    for column in _INTS:  # nullable ints: an unreadable row has no seed, a failed one no params
        df[column] = pd.to_numeric(df[column], errors="coerce").round().astype("Int64")
    for column in (*_FLOATS, "train_throughput_img_s"):
        df[column] = pd.to_numeric(df[column], errors="coerce").astype("float64")
    for column, dtype in _PER_STAGE.items():
        # one value for all stages, or per stage as "3,5,3,3" (like `mixer`): typed unless some run varies by stage
        per_stage = df[column].map(lambda value: isinstance(value, str)).any()
        df[column] = (
            df[column].map(lambda v: v if pd.isna(v) else str(v).lower()) if per_stage else df[column].astype(dtype)
        )
    # the same configuration and seed recorded more than once (a sweep run twice into two roots, a copied run dir):
    # every copy is flagged, and aggregate_seeds counts the seed once
    readable = df["config_key"].notna() & df["seed"].notna()
    df["duplicate"] = readable & df.duplicated(["config_key", "seed"], keep=False)
    # records older than the `schedule` field: the epochs they completed stand for it
    unplanned = ~df["schedule"].map(_known) & df["epochs"].fillna(0).gt(0)
    df.loc[unplanned, "schedule"] = [f"{epochs} ep" for epochs in df.loc[unplanned, "epochs"]]
    df["protocol"] = [
        None if run["status"] == "unreadable" else protocol_label(run) for run in df.to_dict("records")
    ]  # fmt: skip
    return df


def collect_runs(*dirs: str | Path, config: bool = False) -> pd.DataFrame:
    """Every `result.json` under `dirs` (recursively), one row per run, sorted by experiment, axes and seed.

    A record that cannot be read is a row with status "unreadable" and the reason in `error`, never dropped.
    `config=True` adds the resolved config, flattened, as `config.<key>` columns (e.g. `config.optim.epochs`).
    """
    paths = sorted({path.resolve() for root in dirs for path in Path(root).rglob(RECORD_NAME)})
    rows = []
    for path in paths:
        run_dir = str(path.parent)
        try:
            rows.append(record_row(read_record(path), run_dir, config=config))
        except Exception as error:  # any corrupt file (bad JSON, wrong types, unreadable) must show, not crash
            rows.append(dict(status="unreadable", error=f"{type(error).__name__}: {error}", run_dir=run_dir,
                             name=path.parent.name))  # fmt: skip
    df = runs_frame(rows)
    order = ["experiment", *TABLE_AXES[:-1], "config_key", "seed", "run_dir"]
    return df.sort_values(order, na_position="last", kind="stable", ignore_index=True)


def completed_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The completed runs with a validation score, one per configuration and seed: of a seed recorded twice, the
    copy that finished last."""
    done = df[(df["status"] == "completed") & df["best_val_top1"].notna()]
    done = done.sort_values("finished_at", na_position="first", kind="stable")
    return done.drop_duplicates(["config_key", "seed"], keep="last")


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Completed runs grouped by configuration (`config_key`): mean, std (over seeds) and n of best val top-1/top-5.

    Accuracies are in percent here (records store fractions). A seed recorded twice counts once: the copy that
    finished last. Columns: config_key, the axes (TABLE_AXES), schedule, train_images, protocol, name, seeds, n,
    top1/top5 mean and std, params, frozen_params, macs, epochs, late_gain_mean_pct (`late_gain`, mean over seeds).
    """
    done = completed_runs(df)
    rows = []
    for key, runs in done.groupby("config_key", sort=False):
        first = runs.iloc[0]
        top1, top5 = runs["best_val_top1"] * 100, runs["best_val_top5"] * 100
        rows.append({
            "config_key": key, **{axis: first[axis] for axis in TABLE_AXES},
            "schedule": first["schedule"], "train_images": first["train_images"], "protocol": first["protocol"],
            "name": _without_seed(first["name"]), "seeds": ",".join(str(s) for s in sorted(runs["seed"])),
            "n": len(runs), "top1_mean_pct": top1.mean(), "top1_std_pct": top1.std(),  # std: ddof=1, NaN for n=1
            "top5_mean_pct": top5.mean(), "top5_std_pct": top5.std(),
            "params": first["params"], "frozen_params": first["frozen_params"], "macs": first["macs"],
            "epochs": runs["epochs"].max(), "late_gain_mean_pct": runs["late_gain_pct"].mean(),
        })  # fmt: skip
    columns = ["config_key", *TABLE_AXES, "schedule", "train_images", "protocol", "name", "seeds", "n",
               "top1_mean_pct", "top1_std_pct", "top5_mean_pct", "top5_std_pct", "params", "frozen_params", "macs",
               "epochs", "late_gain_mean_pct"]  # fmt: skip
    agg = pd.DataFrame(rows, columns=columns)
    return agg.sort_values(["experiment", *TABLE_AXES[:-1]], na_position="last", kind="stable", ignore_index=True)


def _without_seed(name: str) -> str:
    """A Hydra run directory name (`experiment=t5_identity,optim.epochs=3,seed=1`) without its seed item."""
    return ",".join(item for item in str(name).split(",") if not item.startswith("seed="))


def problem_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not give a result: failed, diverged, running, interrupted, unreadable, or completed without a
    validation score; with status and error. Tables count them and the CLI lists them, so none goes unnoticed."""
    bad = df[(df["status"] != "completed") | df["best_val_top1"].isna()].copy()
    no_score = (bad["status"] == "completed") & bad["error"].isna()
    bad.loc[no_score, "error"] = "completed without a validation score"
    columns = ["status", "experiment", "name", "seed", "epochs", "error", "run_dir"]
    return bad[columns].sort_values(["status", "experiment", "name"], na_position="last", ignore_index=True)


def duplicate_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The records flagged `duplicate`: one configuration and seed recorded more than once."""
    columns = ["config_key", "seed", "status", "experiment", "finished_at", "run_dir"]
    return df.loc[df["duplicate"], columns].sort_values(["config_key", "seed"], ignore_index=True)
