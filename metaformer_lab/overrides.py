"""The command line, checked before Hydra composes it, and the run directory's name made from it.

Hydra skips an optional config group whose choice names no file and answers an unknown key with advice to add it
with `+`: a typo would train the default, or send the user to the wrong fix. Here every group choice must name a
file of `conf/<group>/` (or `null`), and every key must exist in the config it overrides, before anything runs;
an error names the key, the value, what is valid and the closest match.

A run directory's name comes from the overrides' parsed values, so that `python run.py` and `python run.py -m`
give the same settings the same directory (Hydra's own `override_dirname` keeps each spelling as typed on one and
rewrites it on the other: `true`/`True`, `1e-3`/`0.001`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from metaformer_lab.registry import ConfigError, did_you_mean

CONF = Path(__file__).parents[1] / "conf"
# groups chosen in the defaults list with `null` (none) by default; their files override what comes before them
NULL_DEFAULT_GROUPS = ("sweep", "experiment", "proxy", "debug", "launcher")
# groups the config chooses itself, from other choices: not a command-line choice
DERIVED_GROUPS = {"debug_data": "debug=quick chooses it from the data set (conf/config.yaml)"}
# nodes that take more keys than they list, with `+`: Lightning's Trainer arguments, the MetaFormer's arguments
OPEN_NODES = {"trainer": "any other lightning.Trainer argument", "model": "any other MetaFormer argument"}


def parse(args: Sequence[str]) -> list[Override]:
    """Hydra's parse of command-line overrides; its syntax errors as a ConfigError."""
    try:
        return OverridesParser.create().parse_overrides(list(args))
    except HydraException as error:
        raise ConfigError("command line", " ".join(args), str(error).splitlines()[0]) from None


@cache
def group_choices(group: str) -> tuple[str, ...]:
    """The choices of a config group: its YAML files (`conf/mixer/*.yaml` -> pooling, identity, ...)."""
    return tuple(sorted(p.stem for p in (CONF / group).glob("*.yaml")))


def is_group(key: str) -> bool:
    return not key.startswith("hydra") and "." not in key and (CONF / key).is_dir()


def check_group_syntax(overrides: Sequence[Override]) -> None:
    """`+experiment=x` was the way to pick a paper row before these groups joined the defaults list; Hydra now
    answers it with "Multiple values for experiment", which does not say what to type instead."""
    for override in overrides:
        if override.is_add() and override.key_or_group in NULL_DEFAULT_GROUPS:
            group, value = override.key_or_group, override.get_value_element_as_str()
            raise ConfigError(f"+{group}", value, f"choose it without '+': {group}={value}")


def _chosen(override: Override) -> list[Any]:
    """The choices an override of a group names: one, a per-stage list, or a sweep's (a glob names files that exist)."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if override.is_sweep_override():
        return []
    return list(value) if isinstance(value, list) else [value]


def check_group_choices(overrides: Sequence[Override]) -> None:
    """Every choice of a config group names one of its files; `null` only where the group's default is none."""
    for override in overrides:
        group = override.key_or_group
        if group in DERIVED_GROUPS:
            raise ConfigError(group, override.input_line.partition("=")[2] or None,
                              f"not a choice of its own: {DERIVED_GROUPS[group]}")  # fmt: skip
        if override.is_delete() or not is_group(group):
            continue
        valid = group_choices(group)
        for choice in _chosen(override):
            if choice is None and group in NULL_DEFAULT_GROUPS:
                if override.is_sweep_override():  # Hydra refuses a null choice, and a sweep cannot spell it ~group
                    raise ConfigError(group, override.input_line.partition("=")[2], "null cannot be one of a sweep's "
                                      f"choices: sweep the others, and run once more without {group}")  # fmt: skip
                continue
            if not isinstance(choice, str) or choice not in valid:
                raise ConfigError(group, choice, f"no such {group}; {did_you_mean(choice, valid)}valid choices: "
                                  + ", ".join(valid) + (", null" if group in NULL_DEFAULT_GROUPS else ""))  # fmt: skip


def _jobs_at_once(devices: int) -> int:
    from metaformer_lab.training.gpus import jobs_at_once  # imports torch: only a config that asks for it pays

    return jobs_at_once(devices)


def register_resolvers() -> None:
    """The resolvers conf/config.yaml and conf/launcher/ name: the run directory's name, jobs per machine."""
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("jobs_at_once", _jobs_at_once, replace=True)  # launcher=gpus: GPUs / devices


def compose_raw(overrides: Sequence[str]) -> DictConfig:
    """The config Hydra composes for `overrides`, its `hydra` node included (no run-time resolution)."""
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def sweep_jobs(args: Sequence[str]) -> list[list[str]]:
    """The jobs `python run.py -m <args>` launches, each as its list of overrides, the sweep file's params (e.g.
    `sweep=table5`'s experiments) included, as Hydra's basic sweeper expands them."""
    overrides = parse(args)
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    params = compose_raw(fixed).hydra.sweeper.params or {}
    jobs = BasicSweeper.split_arguments(parse([f"{key}={value}" for key, value in params.items()]) + overrides, None)
    return [list(job) for batch in jobs for job in batch]


def _missing_key(cfg: DictConfig, key: str) -> tuple[str, str] | None:
    """(the part of `key` that exists, the first part that does not) where `key` is not in `cfg`; None if it is."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node.keys():  # `in node` is False for a mandatory `???`
            node = OmegaConf.select(node, part, throw_on_missing=False)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif node is None or not isinstance(node, DictConfig | ListConfig):
            return None  # below a value (a null a dict may replace): Hydra's and the run's checks apply
        else:
            return ".".join(parts[:depth]), part
    return None


def _unknown_key_message(cfg: DictConfig, key: str, parent: str, part: str, choices: dict[str, str]) -> str:
    node = OmegaConf.select(cfg, parent) if parent else cfg
    valid = [str(k) for k in node.keys() if parent or k != "hydra"]
    where = f"{parent} has no key {part}" if parent else f"no top-level key {part}"
    if parent in choices:  # a group's node: its keys depend on the choice (data=imagefolder has data.root)
        where = f"{parent}={choices[parent]} has no key {part}"
        takers = [f"{parent}={c}" for c in _may_have(parent, part) if _missing_key(compose_raw([f"{parent}={c}"]), key)
                  is None]  # fmt: skip
        if takers:
            where += f"; {', '.join(takers)} take{'s' * (len(takers) == 1)} {key}"
            if parent == "data" and choices.get("debug") == "quick":  # over a proxy's or a sweep's data set too
                where += " (debug=quick chose data=shapes: name the data set on the command line, e.g. data=idx)"
    message = f"{where}; {did_you_mean(part, valid)}valid keys of {parent or 'the config'}: {', '.join(valid)}"
    if parent in OPEN_NODES:
        message += f" ({OPEN_NODES[parent]}: +{parent}.<name>=...)"
    return message


def _may_have(group: str, key: str) -> tuple[str, ...]:
    """The group's choices to compose in search of `key`: all of them if one of its files names it, else none (a
    file may take it from another through its defaults)."""
    named = any(re.search(rf"^\s*{re.escape(key)}\s*:", p.read_text(), re.M) for p in (CONF / group).glob("*.yaml"))
    return group_choices(group) if named else ()


def check_keys(overrides: Sequence[Override], jobs: Sequence[Sequence[str]]) -> None:
    """Every key an override changes (not adds with `+`) exists in the config of every job it applies to. `jobs`:
    each job's group overrides, which decide the keys there are (`data=imagefolder` has `data.root`)."""
    keys = [o for o in overrides if o.type.name in ("CHANGE", "ADD") and not is_group(o.key_or_group)
            and not o.key_or_group.startswith("hydra")]  # fmt: skip
    if not keys:
        return
    for job in dict.fromkeys(tuple(job) for job in jobs):
        cfg = compose_raw(job)
        choices = {group: str(choice) for group, choice in cfg.hydra.runtime.choices.items() if is_group(group)}
        for override in keys:
            key, missing = override.key_or_group, _missing_key(cfg, override.key_or_group)
            if missing and not override.is_add():
                raise ConfigError(key, override.value(), _unknown_key_message(cfg, key, *missing, choices))
            if override.is_add() and not missing and OmegaConf.select(cfg, key, default=None) is not None:
                value = override.input_line.partition("=")[2]  # as typed; Hydra would refuse it in its own words
                raise ConfigError(f"+{key}", value, f"{key} exists; set it without '+': {key}={value}")


def _without_null_groups(overrides: Sequence[Override]) -> list[str]:
    """`debug=null` (no debug config, as by default) as Hydra spells it, `~debug`: Hydra refuses a null choice."""
    return [f"~{o.key_or_group}" if o.key_or_group in NULL_DEFAULT_GROUPS and not o.is_delete()
            and not o.is_sweep_override() and o.value() is None else o.input_line for o in overrides]  # fmt: skip


def check_command_line(args: Sequence[str], multirun: bool = False) -> list[str]:
    """Every group choice and key of `run.py [-m] <args>` exists, or a ConfigError for the first that does not;
    returns `args` as Hydra is to be given them (`debug=null` as `~debug`), one for one."""
    overrides = parse(args)
    check_group_syntax(overrides)
    check_group_choices(overrides)
    hydra_args = _without_null_groups(overrides)
    groups = [line for line, o in zip(hydra_args, overrides, strict=True) if is_group(o.key_or_group)]
    if multirun:  # a sweep file may choose groups per job (sweep=table5: its experiments)
        jobs = [[o.input_line for o in parse(job) if is_group(o.key_or_group)] for job in sweep_jobs(groups)]
    else:
        jobs = [groups]
    check_keys(overrides, jobs)
    return hydra_args


def _canonical(value: Any) -> str:
    """One spelling per value: `true` for True and true, `0.001` for 1e-3 and 0.001, `[a,b]` for [a, b]."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(map(_canonical, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_canonical(k)}:{_canonical(v)}" for k, v in value.items()) + "}"
    return str(value)


def run_name(task_overrides: Sequence[str], exclude_keys: Sequence[str] = ()) -> str:
    """A run directory's name from its overrides (Hydra's `hydra.overrides.task`, as typed or as a sweep made them),
    without the keys that change no result: one directory per configuration, found again on a re-run."""
    lines = []
    for override in parse([str(o) for o in task_overrides]):
        if override.key_or_group in exclude_keys or (override.is_delete() and override.key_or_group in
                                                      NULL_DEFAULT_GROUPS):  # ~debug: the default, no config
            continue
        prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(override.type.name, "")
        key = override.key_or_group + (f"@{override.package}" if override.package is not None else "")
        value = "" if override.is_delete() and override.value() is None else "=" + _canonical(override.value())
        lines.append(prefix + key + value)
    name = ",".join(sorted(lines)).replace("/", "_") or "default"
    if len(name) > 200:  # file systems cap names at 255 bytes
        name = name[:180] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name
