"""From the composed Hydra config to the objects a run is made of. Every check happens here, before training.

Errors are `ConfigError`s that name the config key as the user types it (`mixer.stages`, `optim.base_lr`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from metaformer_lab.data.datamodules import DATASETS
from metaformer_lab.models import MetaFormer, create_model
from metaformer_lab.module import OptimSettings
from metaformer_lab.registry import ConfigError

# where each MetaFormer argument comes from in the config, to name it in errors
_MIXER_KEYS = ("pool_size", "kernel_size", "head_dim")
_AXIS_KEYS = {"norm": "norm", "act": "act", "img_size": "data.image_size", "num_classes": "data"}
_AXIS_KEYS.update({key: f"mixer.{key}" for key in _MIXER_KEYS})


def checked_arguments(fn: Callable, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`values` as keyword arguments of `fn`, or a ConfigError naming the first key `fn` does not take."""
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    for key, value in values.items():
        if key not in params:
            raise ConfigError(f"{prefix}.{key}", value, "not a setting here; valid: " + ", ".join(params))
    return dict(values)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | Mapping) else node


def model_arguments(cfg: DictConfig, num_classes: int) -> tuple[str, dict[str, Any]]:
    """(preset, MetaFormer overrides) from the model, mixer, norm, act and data groups."""
    model = _plain(cfg.model)
    model.pop("name")
    preset = model.pop("preset")
    for key in ("mixer", "norm", "act", *_MIXER_KEYS):
        if key in model:
            raise ConfigError(f"model.{key}", model[key], f"set it with {_AXIS_KEYS.get(key, key)}=...")
    stages = _plain(cfg.mixer.stages)
    model.update(
        mixer=stages if stages is not None else cfg.mixer.name,
        **{key: cfg.mixer[key] for key in _MIXER_KEYS},
        norm=cfg.norm.name, act=cfg.act.name, img_size=cfg.data.image_size, num_classes=num_classes,
    )  # fmt: skip
    return preset, model


def build_model(cfg: DictConfig, num_classes: int, device: str | torch.device | None = None) -> MetaFormer:
    preset, args = model_arguments(cfg, num_classes)
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return create_model(preset, **args)
    except ConfigError as error:
        if error.key == "mixer":
            key = "mixer.stages" if cfg.mixer.stages is not None else "mixer"
        else:
            key = _AXIS_KEYS.get(error.key, f"model.{error.key}")
        raise ConfigError(key, error.value, error.expected) from None


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    data = _plain(cfg.data)
    cls = DATASETS.get(data.pop("name"))
    return cls(**checked_arguments(cls, data, "data"), shuffle_seed=cfg.seed)


def build_optim(cfg: DictConfig) -> OptimSettings:
    return OptimSettings(**checked_arguments(OptimSettings, _plain(cfg.optim), "optim"))


def device_count(trainer: Mapping[str, Any]) -> int:
    """Devices per node as Lightning will use them (`devices` may be a count, a list, -1 or "auto")."""
    devices = trainer["devices"]
    if isinstance(devices, list | tuple):
        return len(devices)
    if devices in (-1, "-1", "auto"):
        return torch.cuda.device_count() if trainer["accelerator"] in ("gpu", "cuda") else 1
    return int(devices)


def accumulation(cfg: DictConfig, optim: OptimSettings) -> int:
    """Micro-batches per optimizer step so that one step sees `optim.global_batch` images on any device count."""
    for key, value in (("data.batch_size", cfg.data.batch_size), ("trainer.num_nodes", cfg.trainer.num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(key, value, "a positive whole number")
    if device_count(cfg.trainer) < 1:
        raise ConfigError("trainer.devices", cfg.trainer.devices, "at least one device (a count, a list, -1 or auto)")
    per_step = cfg.data.batch_size * device_count(cfg.trainer) * cfg.trainer.num_nodes
    if optim.global_batch % per_step:
        raise ConfigError(
            "optim.global_batch", optim.global_batch,
            f"a multiple of data.batch_size x devices x num_nodes = {per_step}",
        )  # fmt: skip
    return optim.global_batch // per_step


def run_axes(cfg: DictConfig, model: MetaFormer) -> dict[str, Any]:
    """The ablation axes of a run, flat: the record's and wandb's keys to group and filter by."""
    specs = model.stage_specs

    def axis(name: str) -> Any:  # one value for all stages, or per stage as "a,b,c,d" (plain types for JSON)
        values = [getattr(spec, name) for spec in specs]
        return values[0] if len(set(values)) == 1 else ",".join(str(v).lower() for v in values)

    return dict(
        model=cfg.model.name, mixer=axis("mixer"), mixer_stages=[spec.mixer for spec in specs],
        pool_size=axis("pool_size"), norm=axis("norm"), act=axis("act"), residual=axis("residual"), mlp=axis("mlp"),
        seed=cfg.seed, data=cfg.data.name, image_size=cfg.data.image_size, experiment=cfg.experiment,
        sweep=cfg.sweep_name,
    )  # fmt: skip


def run_name(override_dirname: str) -> str:
    """A run directory's name from its overrides: one directory per configuration, found again on a re-run."""
    name = override_dirname.replace("/", "_") or "default"
    if len(name) > 200:  # file systems cap names at 255 bytes
        name = name[:180] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)


# set by launchers that start one process per device themselves (SLURM, torchrun, Lightning's own children)
_EXTERNAL_LAUNCH = ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "LOCAL_RANK")


def check_sweep_launch(cfg: DictConfig, environ: Mapping[str, str]) -> None:
    """Under `-m`, Lightning's DDP re-runs the command line in each device process, and with it the whole sweep.

    Refuse that combination unless a cluster launcher already starts one process per device.
    """
    processes = device_count(cfg.trainer) * cfg.trainer.num_nodes
    strategy = str(cfg.trainer.strategy)
    if processes > 1 and (strategy == "auto" or strategy.startswith("ddp")) and "spawn" not in strategy:
        if not any(key in environ for key in _EXTERNAL_LAUNCH):
            raise ConfigError(
                "trainer.strategy", strategy,
                "not under -m with Hydra's local launcher (each device process would re-launch the sweep); "
                "run the configurations one by one, or launch the sweep on SLURM with one task per device",
            )  # fmt: skip
