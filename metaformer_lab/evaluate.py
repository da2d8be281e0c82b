"""Top-1 / top-5 of a checkpoint on an image folder's val/ split, with the model's official eval transform.

    python -m metaformer_lab.evaluate CHECKPOINT [key=value ...] [--out FILE]

    python -m metaformer_lab.evaluate poolformer_s12.pth.tar data.root=/data/imagenet data.num_workers=8
    python -m metaformer_lab.evaluate runs/default/checkpoints/best.ckpt

CHECKPOINT is an official release file of PoolFormer or the MetaFormer Baselines (a state dict: plain, or under
`state_dict` or `model`; `module.` prefixes are dropped), a timm-layout one (`stages.N.blocks.M...`: its models
normalise after the global mean, so a timm PoolFormer v1 is built with head=layernorm), or a run's
`checkpoints/best.ckpt` or `last.ckpt`.
The model and data come from:
- a run's checkpoint: its record (`<run_dir>/result.json`): the model and data the run was trained with;
- any other file: the preset whose state-dict keys and shapes are the file's (a preset named in the file name breaks
  a tie: poolformer_s12 and metaformer_id_s12 have the same keys), on `data=imagefolder` at 224 px with the
  official release's crop_pct (`presets.EVAL_CROP_PCT`);
- `model=<preset>` always wins; the data is then that of any other file.
`key=value` sets `data.<key>` (root, image_size, crop_pct, batch_size, num_workers, ...) and `trainer.accelerator`,
`trainer.precision`, `trainer.channels_last`, `trainer.tf32`, `trainer.benchmark` (auto: as a run chooses them,
`config.resolve_device`: one GPU where there is one, else the CPU).
Evaluation is training's own validation (Lightning's validate, the same LightningModule and data module), so a run's
best.ckpt gives its record's best_val_top1 exactly (same machine, same code). Unreadable images are skipped and
counted. The JSON goes to --out, else to `<run_dir>/evaluation.json` for a run's checkpoint, else to
`./evaluation-<file stem>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from metaformer_lab.config import build_datamodule, build_model, resolve_device, tf32_enabled
from metaformer_lab.models import PRESETS, MetaFormer, create_model
from metaformer_lab.models.convert import Converted, convert_checkpoint
from metaformer_lab.models.presets import EVAL_CROP_PCT
from metaformer_lab.overrides import register_resolvers
from metaformer_lab.record import RECORD_NAME, read_record
from metaformer_lab.registry import ConfigError, did_you_mean
from metaformer_lab.training.loggers import route_library_output, shown_path
from metaformer_lab.training.module import ImageClassifier

CONF = Path(__file__).parents[1] / "conf"
# the trainer settings evaluation uses
TRAINER_KEYS = ("accelerator", "precision", "channels_last", "tf32", "benchmark")
TRAIN_ONLY = ("train_size", "rand_augment", "random_erasing")  # data settings that change nothing in validation
# a run's checkpoint -> the record's top-1 of the same weights
RECORD_TOP1 = {"best.ckpt": "best_val_top1", "last.ckpt": "final_val_top1"}


@dataclass
class Evaluation:
    """What evaluation.json holds. Top-1 and top-5 are fractions, as in result.json."""

    checkpoint: str
    model: str  # the preset, or the run's model (e.g. `small`)
    found_by: str  # "record", "file name", "keys and shapes" or "model="
    layout: str  # the file's: "official" (PoolFormer, as ours), "baselines" (sail-sg/metaformer) or "timm"
    head: str  # the head the model was built with (models/heads.py): timm's layout fixes head=layernorm for v1
    run_dir: str | None  # the run a checkpoint of ours belongs to
    data: str  # the data module's name: shapes, imagefolder, imagenet
    root: str | None  # the image folder (None for generated data)
    image_size: int
    crop_pct: float  # of the eval resize and center crop (1 for generated data: made at size, no crop)
    num_classes: int  # of the model's head
    images: int  # evaluated
    unreadable: int  # unreadable images skipped (not counted in top-1)
    unreadable_paths: list[str]  # the first 100
    top1: float
    top5: float
    record_top1: float | None  # the run record's for this file: best_val_top1 (best.ckpt), final_val_top1 (last.ckpt)
    accelerator: str
    device: str  # "cpu" or the GPU's name
    precision: str
    wall_time_s: float  # from loading the checkpoint to the last batch


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The file, unpickled with weights_only=True (plus argparse.Namespace, which timm's train.py saves as `args`)."""
    if not path.is_file():
        raise ConfigError("checkpoint", str(path), "no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        detail = str(error).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(error).split("\n")[0]
        raise ConfigError("checkpoint", str(path), f"torch.load(weights_only=True) cannot read it: {detail}") from None
    if not isinstance(loaded, dict):
        raise ConfigError("checkpoint", str(path), f"holds a {type(loaded).__name__}, not a state dict")
    return loaded


def official_state_dict(checkpoint: dict[str, Any], path: Path) -> Converted:
    """The weights of a loaded file in our layout: the state dict itself or the one under `state_dict` or `model`,
    without `module.` (DataParallel) or `model.` (our LightningModule) prefixes, other layouts converted."""
    state = next((checkpoint[key] for key in ("state_dict", "model") if isinstance(checkpoint.get(key), dict)),
                 checkpoint)  # fmt: skip
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if state and all(key.startswith("model.") for key in state):
        state = {key.removeprefix("model."): value for key, value in state.items()}
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConfigError("checkpoint", str(path), "no state dict in it (tensors by name, at the top level or under "
                          f"`state_dict` or `model`); its keys: {', '.join(list(checkpoint)[:8])}")  # fmt: skip
    try:
        return convert_checkpoint(state)
    except ValueError as error:
        raise ConfigError("checkpoint", str(path), str(error)) from None


def head_classes(state: dict[str, torch.Tensor], path: Path) -> int:
    last = next((state[key] for key in ("head.weight", "head.fc2.weight") if key in state), None)
    if last is None:
        raise ConfigError("checkpoint", str(path), "no classifier head (head.weight or head.fc2.weight) in its weights")
    return last.shape[0]


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


@lru_cache(maxsize=64)
def preset_shapes(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialization
        return shapes(create_model(name, num_classes=num_classes).state_dict())


def find_preset(state: dict[str, torch.Tensor], path: Path) -> tuple[str, str]:
    """(preset, how it was found): the one preset with the file's keys and shapes; a tie goes to the preset named
    in the file name. Neither one preset nor a name to choose by is a ConfigError that says what to type."""
    found, num_classes = shapes(state), head_classes(state, path)
    matches = [name for name in PRESETS.names() if preset_shapes(name, num_classes) == found]
    if len(matches) == 1:
        return matches[0], "keys and shapes"
    named = [name for name in matches if name in path.name]
    if len(named) == 1:
        return named[0], "file name"
    if not matches:
        raise ConfigError(
            "checkpoint",
            str(path),
            "its weights have the keys and shapes of no preset ("
            f"{', '.join(PRESETS.names())}); name one with model=<preset> to see what differs",
        )
    raise ConfigError(
        "model",
        None,
        f"required: the weights in {path.name} fit {' and '.join(matches)} alike (the "
        f"same keys and shapes); choose with {' or '.join(f'model={name}' for name in matches)}",
    )


def load_weights(model: MetaFormer, state: dict[str, torch.Tensor], key: str, value: str) -> None:
    """`state` into `model` (strict), or a ConfigError on `key=value` that names the keys and shapes that differ."""
    expected, got = shapes(model.state_dict()), shapes(state)
    if expected != got:
        differences = {
            "missing": [k for k in expected if k not in got],
            "unexpected": [k for k in got if k not in expected],
            "other shapes (file vs model)": [f"{k} {got[k]} vs {v}" for k, v in expected.items() if got.get(k, v) != v],
        }  # fmt: skip
        text = "; ".join(f"{what}: {', '.join(keys[:4])}{', ...' * (len(keys) > 4)}"
                         for what, keys in differences.items() if keys)  # fmt: skip
        raise ConfigError(key, value, f"the checkpoint's weights do not fit this model ({text})")
    model.load_state_dict(state)


def preset_config(preset: str) -> DictConfig:
    """`data=imagefolder` and the default trainer, as `run.py` composes them, with the release's crop_pct."""
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["data=imagefolder"])
    cfg.data.crop_pct = EVAL_CROP_PCT[preset]
    return cfg


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    parsed = {}
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not re.fullmatch(r"[\w.]+", key):
            raise ConfigError(override, None, "a setting is key=value, e.g. data.root=/data/imagenet or model=<preset>")
        parsed[key] = value
    return parsed


def apply_overrides(cfg: DictConfig, overrides: dict[str, str]) -> DictConfig:
    """`cfg` with `data.*` and the trainer's device settings overridden; any other key is a ConfigError."""
    valid = [f"data.{key}" for key in cfg.data if key not in TRAIN_ONLY] + [f"trainer.{key}" for key in TRAINER_KEYS]
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(key, value, f"not a setting of evaluation; {did_you_mean(key, valid)}valid: model, "
                              + ", ".join(valid))  # fmt: skip
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}" for key, value in overrides.items()]))


def run_dir_of(path: Path) -> Path | None:
    """The run directory of `<run_dir>/checkpoints/<name>.ckpt` when it holds a run record."""
    run_dir = path.parent.parent
    return run_dir if path.parent.name == "checkpoints" and (run_dir / RECORD_NAME).is_file() else None


def evaluate(checkpoint: str | Path, overrides: Sequence[str] = ()) -> Evaluation:
    """Evaluate `checkpoint` with `key=value` overrides (see the module's docstring); nothing is written."""
    start = time.perf_counter()
    path = Path(checkpoint)
    settings = parse_overrides(overrides)
    preset = settings.pop("model", None)
    converted = official_state_dict(load_checkpoint(path), path)
    state = converted.state_dict
    num_classes = head_classes(state, path)
    run_dir = run_dir_of(path)
    record = read_record(run_dir) if run_dir is not None else None
    if record is not None and preset is None:  # ours: exactly the model and data of the run
        trained = OmegaConf.create(record.config)
        model, name, found_by = build_model(trained, num_classes), trained.model.name, "record"
        load_weights(model, state, "checkpoint", str(path))
    else:
        if preset is not None:
            PRESETS.get(preset)  # an unknown name is an error listing the presets
            found_by = "model="
        else:
            preset, found_by = find_preset(state, path)
        model = create_model(preset, num_classes=num_classes, **converted.model_overrides)
        trained, name = preset_config(preset), preset
        load_weights(model, state, "model", preset)
    cfg = apply_overrides(trained, settings)
    if model.size_bound and cfg.data.image_size != model.img_size:
        raise ConfigError("data.image_size", cfg.data.image_size, f"{model.img_size}, the input size that {name}'s "
                          "size-bound token mixers (spatial_fc, random) were built for")  # fmt: skip

    datamodule = build_datamodule(cfg)
    root = str(datamodule.root.resolve()) if hasattr(datamodule, "root") else None
    if datamodule.num_classes != num_classes:  # labels are folder indices: other classes would be scored wrongly
        raise ConfigError("data.root" if root else "data.name", root or cfg.data.name,
                          f"{datamodule.num_classes} classes, but the checkpoint's head has {num_classes} outputs; "
                          "evaluate it on a folder of its own classes (label i = the i-th class folder)")  # fmt: skip
    device = resolve_device({key: "auto" for key in TRAINER_KEYS} | OmegaConf.to_container(cfg.trainer, resolve=True))
    try:
        trainer = L.Trainer(
            accelerator=device["accelerator"], precision=device["precision"], benchmark=device["benchmark"], devices=1,
            logger=False, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=sys.stderr.isatty(),
        )  # fmt: skip
    except Exception as error:  # Lightning's own checks: no GPU here, a precision this device lacks
        settings_text = f"accelerator={device['accelerator']} precision={device['precision']}"
        raise ConfigError("trainer", settings_text, f"Lightning cannot set this up: {error}") from None
    module = ImageClassifier(model, None, num_classes, device["channels_last"])
    with tf32_enabled(device["tf32"]):
        trainer.validate(module, datamodule=datamodule, verbose=False)

    unreadable = sorted(datamodule.unreadable["val"])
    root_device = trainer.strategy.root_device
    return Evaluation(
        checkpoint=str(path.resolve()), model=name, found_by=found_by, layout=converted.layout, head=model.head_kind,
        run_dir=str(run_dir.resolve()) if run_dir else None,
        data=cfg.data.name, root=root, image_size=datamodule.image_size, crop_pct=datamodule.crop_pct,
        num_classes=num_classes, images=len(datamodule.val) - len(unreadable), unreadable=len(unreadable),
        unreadable_paths=[datamodule.sample_path("val", index) for index in unreadable[:100]],
        top1=float(trainer.callback_metrics["val/top1"]), top5=float(trainer.callback_metrics["val/top5"]),
        record_top1=getattr(record, RECORD_TOP1.get(path.name, ""), None) if found_by == "record" else None,
        accelerator=device["accelerator"], precision=device["precision"],
        device=torch.cuda.get_device_name(root_device) if root_device.type == "cuda" else root_device.type,
        wall_time_s=time.perf_counter() - start,
    )  # fmt: skip


def default_output(result: Evaluation) -> Path:
    if result.run_dir is not None:
        return Path(result.run_dir) / "evaluation.json"
    stem = Path(result.checkpoint).name
    for suffix in (".tar", ".pth", ".pt", ".ckpt", ".bin"):  # poolformer_s12.pth.tar -> poolformer_s12
        stem = stem.removesuffix(suffix)
    return Path(f"evaluation-{stem}.json")


def summary(result: Evaluation, out: Path) -> str:
    """One line: what was evaluated, how the model was found, the result and where the JSON went."""
    images = f"{result.images:,} images"
    if result.unreadable:
        images += f" ({result.unreadable} unreadable skipped)"
    record = f" (record: {result.record_top1:.2%})" if result.record_top1 is not None else ""
    crop = f", crop {result.crop_pct:g}" if result.root is not None else ""  # generated images are made at size
    source = result.found_by
    if result.layout != "official":
        source += f"; {result.layout} layout, head={result.head}"
    return (
        f"{result.model} ({source}) on {result.data} val at {result.image_size} px{crop}: top-1 "
        f"{result.top1:.2%}{record}, top-5 {result.top5:.2%} of {images}; {result.device}, precision "
        f"{result.precision}, {result.wall_time_s:.0f} s; wrote {shown_path(out)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metaformer_lab.evaluate", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("checkpoint", help="an official or timm-layout .pth(.tar), or a run's checkpoints/*.ckpt")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="model=<preset>, data.*, trainer.*")
    parser.add_argument("--out", help="the JSON file (default: see below)")
    args = parser.parse_intermixed_args(argv)
    route_library_output()  # without Lightning's tips and hardware lines
    try:
        result = evaluate(args.checkpoint, args.overrides)
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)  # a bad input is the user's to fix: what and why, no traceback
        return 2
    out = Path(args.out) if args.out else default_output(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(summary(result, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
