"""From the composed Hydra config to the objects a run is made of. Every check happens here, before training.

Errors are `ConfigError`s that name the config key as the user types it (`mixer.stages`, `optim.base_lr`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from metaformer_lab.data.datamodules import DATASETS, augments_on_device
from metaformer_lab.models import MetaFormer, create_model
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.module import OptimSettings

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


# the config groups that choose a layer per stage: `<group>.name` for all stages, or `<group>.stages` one per stage
AXIS_GROUPS = ("mixer", "norm", "act")


def per_stage_groups(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The command line's choice of an axis group is what trains, per stage or for all stages.

    - `mixer=[pooling,pooling,attention,attention]` means one mixer per stage, as it does for `profile`. Hydra reads
      a list given to a config group as several files to merge, the last one winning, so the run would silently
      build the last choice for every stage: the list goes to `<group>.stages` (and `<group>.name` is cleared).
    - `mixer=identity` (or `mixer.name=identity`) after an experiment that sets per-stage mixers (`t5_ppaa`) means
      identity in every stage: the experiment's `stages` would otherwise win over the name the directory carries.

    Applied before anything is built; `overrides`: the command line's, e.g. HydraConfig's overrides.task.
    """
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key, value = override.key_or_group.lstrip("+~"), override.value()
        group = key.removesuffix(".name")
        if group not in AXIS_GROUPS or override.is_delete():
            continue
        explicit = [o for o in overrides if o.lstrip("+").startswith(f"{group}.stages=")]
        with open_dict(cfg):
            if isinstance(value, list) and key == group:
                if explicit:
                    raise ConfigError(group, value, f"one per-stage list, not also {explicit[0]}")
                cfg[group].name, cfg[group].stages = None, [str(choice) for choice in value]
            elif not explicit:  # one choice for all stages, named on the command line
                cfg[group].stages = None
    return cfg


def _axis_choice(cfg: DictConfig, group: str) -> Any:
    stages = _plain(cfg[group].stages)
    return stages if stages is not None else cfg[group].name


def model_arguments(cfg: DictConfig, num_classes: int) -> tuple[str, dict[str, Any]]:
    """(preset, MetaFormer overrides) from the model, mixer, norm, act and data groups."""
    model = _plain(cfg.model)
    model.pop("name")
    preset = model.pop("preset")
    for key in (*AXIS_GROUPS, *_MIXER_KEYS):
        if key in model:
            raise ConfigError(f"model.{key}", model[key], f"set it with {_AXIS_KEYS.get(key, key)}=...")
    model.update(
        {group: _axis_choice(cfg, group) for group in AXIS_GROUPS},
        **{key: cfg.mixer[key] for key in _MIXER_KEYS}, img_size=cfg.data.image_size, num_classes=num_classes,
    )  # fmt: skip
    return preset, model


def build_model(cfg: DictConfig, num_classes: int, device: str | torch.device | None = None) -> MetaFormer:
    preset, args = model_arguments(cfg, num_classes)
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return create_model(preset, **args)
    except ConfigError as error:
        if error.key in AXIS_GROUPS:
            key = f"{error.key}.stages" if cfg[error.key].stages is not None else error.key
        else:
            key = _AXIS_KEYS.get(error.key, f"model.{error.key}")
        raise ConfigError(key, error.value, error.expected) from None


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    data = _plain(cfg.data)
    cls = DATASETS.get(data.pop("name"))
    return cls(**checked_arguments(cls, data, "data"), shuffle_seed=cfg.seed)


def build_optim(cfg: DictConfig) -> OptimSettings:
    return OptimSettings(**checked_arguments(OptimSettings, _plain(cfg.optim), "optim"))


# `trainer.channels_last: auto`: the memory format `python -m metaformer_lab.bench model` measured faster on each
# kind of device (the model's MLP wants NHWC; nn.GroupNorm's CUDA kernels convert to NCHW and back, its CPU one not)
CHANNELS_LAST_FASTER = {
    "cpu": True,  # bench model poolformer_s12, 2026-11-27, 2-core Xeon, torch 2.13: NHWC pooling a tenth of NCHW's
    "gpu": False,  # not yet measured on a GPU: python -m metaformer_lab.bench gpu
}


def _auto_or_bool(trainer: Mapping[str, Any], key: str, auto: bool) -> bool:
    value = trainer[key]
    if value == "auto":
        return auto
    if not isinstance(value, bool):
        raise ConfigError(f"trainer.{key}", value, "auto, true or false")
    return value


def gpu_capability() -> tuple[int, int]:
    """Compute capability of the GPU this process will train on: its local rank's (LOCAL_RANK from torchrun and
    Lightning's DDP launcher, SLURM_LOCALID under srun), else the first visible one. Read from the device's
    properties, which creates no CUDA context: Lightning has not yet set each rank's device, and anything that
    allocates here would open a context on cuda:0 in every rank."""
    index = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    properties = torch.cuda.get_device_properties(index if index < torch.cuda.device_count() else 0)
    return properties.major, properties.minor


def resolve_device(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """`trainer` with its `auto` choices decided for this machine. Explicit choices are kept.

    - accelerator: one GPU if there is one, else the CPU;
    - precision: on a GPU bf16-mixed from compute capability 8.0 (Ampere) on, 16-mixed before it (where bf16 is
      only emulated); 32 on the CPU;
    - channels_last: the layout measured faster on this kind of device (CHANNELS_LAST_FASTER);
    - tf32: fp32 matrix products and convolutions on TF32 tensor cores on a GPU (`tf32_enabled`), off on the CPU;
    - benchmark (Lightning's, cuDNN autotuning): on for a GPU, where every batch has the same size, unless the run
      is deterministic.
    """
    resolved = dict(trainer)
    if resolved["accelerator"] == "auto":
        resolved["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
    on_gpu = resolved["accelerator"] in ("gpu", "cuda")
    if resolved["precision"] == "auto":  # a GPU that torch cannot see is for Lightning's setup to report
        bf16 = on_gpu and torch.cuda.is_available() and gpu_capability() >= (8, 0)
        resolved["precision"] = "bf16-mixed" if bf16 else "16-mixed" if on_gpu else "32"
    resolved["precision"] = str(resolved["precision"])  # `trainer.precision=32` arrives as an int
    kind = "gpu" if on_gpu else resolved["accelerator"]
    resolved["channels_last"] = _auto_or_bool(resolved, "channels_last", CHANNELS_LAST_FASTER.get(kind, False))
    resolved["tf32"] = _auto_or_bool(resolved, "tf32", on_gpu)
    if resolved["benchmark"] is not None:  # None: Lightning leaves torch's setting as it is
        resolved["benchmark"] = _auto_or_bool(resolved, "benchmark", on_gpu and not resolved.get("deterministic"))
    return resolved


def comparable_config(config: dict) -> dict:
    """A resolved config as a re-run compares it with its record's: the trainer's `auto` choices and
    `data.augment_on` decided for this machine, and the trainer keys added since a run may have begun (tf32,
    benchmark) at their default, so that a run begun before they existed, or before a default became `auto`,
    resumes where nothing it computes has changed."""
    trainer = resolve_device({"tf32": "auto", "benchmark": "auto", **config.get("trainer", {})})
    comparable = {**config, "trainer": trainer}
    if "data" in config:  # a run begun before data.augment_on existed augmented in the loader
        on_device = augments_on_device(config["data"].get("augment_on", "loader"),
                                       "cuda" if trainer["accelerator"] in ("gpu", "cuda") else "cpu")  # fmt: skip
        comparable["data"] = {**config["data"], "augment_on": "device" if on_device else "loader"}
    return comparable


@contextlib.contextmanager
def tf32_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, fp32 matrix products and convolutions on TF32 tensor cores (Ampere and later: inputs
    rounded to 10 mantissa bits, fp32 sums), or both in strict fp32; the previous settings after it. torch's defaults
    split them (convolutions TF32, matrix products not): in fp32 the channel MLP's F.linear, most of S12's FLOPs,
    would be the slow path where the official 1x1 convolutions are fast."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def device_count(trainer: Mapping[str, Any]) -> int:
    """Devices per node as Lightning will use them (`devices` may be a count, a list, -1 or "auto")."""
    devices = trainer["devices"]
    if isinstance(devices, list | tuple):
        return len(devices)
    if devices in (-1, "-1", "auto"):
        return torch.cuda.device_count() if resolve_device(trainer)["accelerator"] in ("gpu", "cuda") else 1
    return int(devices)


def process_count(trainer: Mapping[str, Any]) -> int:
    """The run's processes (DDP ranks): devices per node x nodes."""
    return device_count(trainer) * trainer["num_nodes"]


def accumulation(cfg: DictConfig, optim: OptimSettings) -> int:
    """Micro-batches per optimizer step so that one step sees `optim.global_batch` images on any device count."""
    for key, value in (("data.batch_size", cfg.data.batch_size), ("trainer.num_nodes", cfg.trainer.num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(key, value, "a positive whole number")
    if device_count(cfg.trainer) < 1:
        raise ConfigError("trainer.devices", cfg.trainer.devices, "at least one device (a count, a list, -1 or auto)")
    per_step = cfg.data.batch_size * process_count(cfg.trainer)
    if optim.global_batch % per_step:
        raise ConfigError(
            "optim.global_batch", optim.global_batch,
            f"a multiple of data.batch_size x devices x num_nodes = {per_step}",
        )  # fmt: skip
    accumulate = optim.global_batch // per_step
    asked = cfg.trainer.get("accumulate_grad_batches")
    if asked is not None and asked != accumulate:
        raise ConfigError(
            "trainer.accumulate_grad_batches", asked,
            f"derived from optim.global_batch={optim.global_batch} / (data.batch_size x devices x num_nodes = "
            f"{per_step}) = {accumulate}; to accumulate {asked} batches set optim.global_batch={per_step * asked}",
        )  # fmt: skip
    return accumulate


# Trainer arguments a run sets itself, and the setting a user changes instead
_RUN_SETS = {
    "max_epochs": "optim.epochs (+ optim.cooldown_epochs)", "gradient_clip_val": "optim.grad_clip",
    "logger": "logger=wandb|csv", "callbacks": "the run (checkpoints, history, throughput)",
    "default_root_dir": "the run directory", "enable_checkpointing": "the run (last.ckpt, best.ckpt)",
    "use_distributed_sampler": "the data module (its sampler is seeded by `seed`)",
    "plugins": "the run (atomic checkpoint writes)",
}  # fmt: skip
# not Lightning's: applied by the run
_OUR_TRAINER_KEYS = ("compile", "channels_last", "tf32", "dist_bn", "save_every_minutes")
DIST_BN = ("reduce", "broadcast", "none")


def trainer_arguments(cfg: DictConfig, accumulate: int) -> dict[str, Any]:
    """`lightning.Trainer` keyword arguments from `trainer` (auto choices resolved for this machine).

    Every key is a Trainer argument or one of ours; one the run sets itself, or an unknown one, is a ConfigError.
    """
    trainer = resolve_device(_plain(cfg.trainer))
    valid = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key, value in trainer.items():
        if key in _RUN_SETS:
            raise ConfigError(f"trainer.{key}", value, f"set by the run from {_RUN_SETS[key]}")
        if key not in valid and key not in _OUR_TRAINER_KEYS:
            settable = [p for p in valid if p not in _RUN_SETS] + list(_OUR_TRAINER_KEYS)
            raise ConfigError(f"trainer.{key}", value, "not an argument of lightning.Trainer; valid: "
                              + ", ".join(settable))  # fmt: skip
    if trainer["dist_bn"] not in DIST_BN:
        raise ConfigError("trainer.dist_bn", trainer["dist_bn"], DIST_BN)
    minutes = trainer["save_every_minutes"]
    is_number = isinstance(minutes, int | float) and not isinstance(minutes, bool)
    if minutes is not None and not (is_number and minutes >= 0):
        raise ConfigError("trainer.save_every_minutes", minutes, "minutes between mid-epoch saves of last.ckpt (0: "
                          "every optimizer step), or null for epoch ends only")  # fmt: skip
    for key in _OUR_TRAINER_KEYS:
        trainer.pop(key)
    trainer["accumulate_grad_batches"] = accumulate
    return trainer


def limited_batches(batches: int, limit: int | float | None) -> int:
    """Batches Lightning runs of a loader of `batches` under `limit_*_batches`: a fraction, a count or None (all)."""
    if limit is None:
        return batches
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def train_batches_per_epoch(trainer: Mapping[str, Any], train_images: int, batch_size: int, world_size: int) -> int:
    """Training batches of an epoch on each device: floor(train_images / world) images (the sampler), in whole
    batches (drop_last), under `limit_train_batches`."""
    return limited_batches(train_images // world_size // batch_size, trainer.get("limit_train_batches"))


def optimizer_steps(trainer: L.Trainer, train_images: int, batch_size: int) -> tuple[int, int]:
    """(optimizer steps of the run, of one whole epoch): the steps its lr schedule is fitted into, and that its first
    lines count. Lightning's `estimated_stepping_batches`, known before `fit` (which loads the data to count them),
    from the Trainer's settings as resolved (fast_dev_run sets max_steps, max_epochs and limit_train_batches): a step
    per accumulated group of batches and at each epoch's end, up to max_steps."""
    batches = train_batches_per_epoch(
        {"limit_train_batches": trainer.limit_train_batches}, train_images, batch_size, trainer.world_size
    )
    per_epoch = -(-batches // trainer.accumulate_grad_batches)  # rounded up
    steps = per_epoch * trainer.max_epochs
    return max(1, steps if trainer.max_steps == -1 else min(steps, trainer.max_steps)), per_epoch


def check_validation_interval(trainer: Mapping[str, Any], train_images: int, batch_size: int, world_size: int) -> None:
    """Lightning checks an integer `val_check_interval` against the epoch's batches only inside `fit`, after the run
    has started; this is the same check before it, as a ConfigError."""
    interval = trainer.get("val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or trainer.get("fast_dev_run"):
        return
    if trainer.get("check_val_every_n_epoch", 1) is None:  # then the interval counts batches across epochs
        return
    batches = train_batches_per_epoch(trainer, train_images, batch_size, world_size)
    if interval > batches:
        raise ConfigError("trainer.val_check_interval", interval,
                          f"at most the {batches} training batches of an epoch, or a fraction of an epoch (0.5)")


def schedule_label(optim: OptimSettings, trainer: Mapping[str, Any]) -> str:
    """The schedule as the record and analysis name it: "12 ep", "300+10 ep" (cooldown), "12 ep, max 20 steps",
    "12 ep, 10% batches", "fast_dev_run". A shortened run is another protocol, and its label says so."""
    fast = trainer.get("fast_dev_run", False)
    if fast:
        return "fast_dev_run" if fast is True or fast == 1 else f"fast_dev_run {fast}"
    parts = [f"{optim.epochs}+{optim.cooldown_epochs} ep" if optim.cooldown_epochs else f"{optim.epochs} ep"]
    if trainer.get("max_steps", -1) not in (-1, None):
        parts.append(f"max {trainer['max_steps']} steps")
    for key, what in (("limit_train_batches", "batches"), ("limit_val_batches", "val batches")):
        limit = trainer.get(key, 1.0)
        if limit is not None and not (isinstance(limit, float) and limit == 1.0):  # the int 1 is one batch
            parts.append(f"{limit * 100:.3g}% {what}" if isinstance(limit, float) else f"{limit} {what}/ep")
    # the other Trainer arguments that change how much is trained (passed as +trainer.<arg>)
    for key, default in (("overfit_batches", 0), ("max_time", None), ("min_epochs", None), ("min_steps", None)):
        if trainer.get(key, default) not in (default, -1):
            parts.append(f"{key} {trainer[key]}")
    return ", ".join(parts)


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
