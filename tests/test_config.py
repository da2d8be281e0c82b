"""The Hydra config: every experiment composes and builds the paper's model; bad overrides fail clearly."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_config, run_cli, run_cli_many

from metaformer_lab.config import (
    accumulation,
    build_datamodule,
    build_model,
    build_optim,
    resolve_device,
    schedule_label,
    trainer_arguments,
)
from metaformer_lab.models import measure_cost
from metaformer_lab.overrides import check_command_line, run_name
from metaformer_lab.record import read_record
from metaformer_lab.registry import ConfigError

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
PAPER = pd.read_csv(ROOT / "metaformer_lab" / "analysis" / "paper_results.csv").set_index("experiment")
PRINTED = pd.read_csv(ROOT / "metaformer_lab" / "analysis" / "paper_results.csv", dtype=str).set_index("experiment")


def _as_printed(value: float, printed: str) -> float:
    """`value` rounded to the digits `printed` (a paper's number as it appears) has."""
    return round(value, len(printed.partition(".")[2]))


def test_every_paper_row_has_an_experiment_file():
    assert EXPERIMENTS == sorted(PAPER.index)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_the_papers_model(name):
    cfg = compose_config(f"experiment={name}", "data.root=/datasets/imagenet")
    row = PAPER.loc[name]
    assert cfg.experiment == name and cfg.optim.epochs == 300 and cfg.optim.cooldown_epochs == 10
    optim = build_optim(cfg)
    hybrid_attention = "attention" in (cfg.mixer.stages or [])
    assert optim.global_batch == (1024 if hybrid_attention else 4096)
    lamb = optim.optimizer == "lamb"
    assert lamb == name.startswith("baselines_caformer")  # CAFormer's recipe: LAMB at 8e-3
    # paper: 4e-3 at 4096; hybrids 1e-3
    assert optim.lr == pytest.approx(1e-3 if hybrid_attention else 8e-3 if lamb else 4e-3)
    assert cfg.norm.name == ("layernorm" if hybrid_attention or name == "t5_layernorm" else cfg.norm.name)
    datamodule = build_datamodule(cfg)
    assert datamodule.num_classes == 1000 and accumulation(cfg, optim) == optim.global_batch // 128
    cost = measure_cost(build_model(cfg, datamodule.num_classes, device="meta"), cfg.data.image_size)
    params = cost.params / 1e6
    printed = PRINTED.loc[name]
    assert row.params_m in (_as_printed(params, printed.params_m), math.floor(params * 10) / 10)
    assert _as_printed(params, printed.params_verified_m) == row.params_verified_m
    assert round(cost.macs / 1e9, 1) == row.macs_g
    digits = len(str(row.macs_fvcore_g).split(".")[1])  # the official code's fvcore count, to its printed digits
    assert round(cost.macs / 1e9, digits) == pytest.approx(row.macs_fvcore_g)
    assert _as_printed(cost.frozen_params / 1e6, printed.frozen_params_m) == row.frozen_params_m
    if not math.isnan(row.params_exact):
        assert cost.params == int(row.params_exact)


def test_the_default_config_builds():
    cfg = compose_config()
    assert (cfg.model.name, cfg.mixer.name, cfg.norm.name, cfg.act.name, cfg.data.name) == (
        "small", "pooling", "modified_layernorm", "gelu", "shapes",
    )  # fmt: skip
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule.num_classes)
    assert model.img_size == 32 and model.head.out_features == datamodule.num_classes


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("mixer.stages=[pooling,attention]", "mixer.stages", "4 entries"),
        ("mixer.stages=[pooling,pooling,poolng,attention]", "mixer.stages", "attention_nobias, dwconv, identity"),
        ("mixer.pool_size=4", "mixer.pool_size", "odd"),
        ("optim.base_lr=-0.1", "optim.base_lr", "positive"),
        ("optim.global_batch=100", "optim.global_batch", "multiple of data.batch_size"),
        ("+model.mixr=identity", "model.mixr", "not a model argument"),
        ("+data.sise=3", "data.sise", "not a setting here; valid: image_size"),
        ("optim.base_lr=abc", "optim.base_lr", "a number"),
        ("optim.betas=[0.9]", "optim.betas", "two numbers in [0, 1)"),
        ("optim.epochs=2.5", "optim.epochs", "a whole number"),
        ("data.batch_size=0", "data.batch_size", "a positive integer"),
        ("trainer.devices=0", "trainer.devices", "at least one device"),
        ("data.train_size=10", "data.train_size", "at least one batch"),
        ("data.image_size=36", "data.image_size", "a multiple of 8"),
    ],
)
def test_bad_settings_name_key_value_and_choices(override, key, words):
    cfg = compose_config(override)
    with pytest.raises(ConfigError) as error:
        optim = build_optim(cfg)
        model = build_model(cfg, build_datamodule(cfg).num_classes, device="meta")
        accumulation(cfg, optim)
        assert model is None
    assert error.value.key == key and words in str(error.value)


BAD_OVERRIDES = {
    "mixer=poolng": "error: mixer='poolng': no such mixer; did you mean pooling? valid choices: attention, ",
    "mixer=[pooling,identity,poolng,identity]": "error: mixer='poolng': no such mixer; did you mean pooling?",
    "mixer.stages=[pooling,attention]": "error: mixer.stages=['pooling', 'attention']: a per-stage list needs 4",
    "mixer.pool_size=4": "error: mixer.pool_size=4: an odd positive integer",
    "optim.base_lr=-1": "error: optim.base_lr=-1: a positive number",
    "+trainer.fast_dev_rn=true": "error: trainer.fast_dev_rn=True: not an argument of lightning.Trainer",
    "+trainer.fast_dev_run=true": "error: +trainer.fast_dev_run='true': trainer.fast_dev_run exists; set it without "
    "'+': trainer.fast_dev_run=true",
    # the form of earlier versions: said plainly, instead of Hydra's "Multiple values for experiment"
    "+experiment=t5_identity": "error: +experiment='t5_identity': choose it without '+': experiment=t5_identity",
    # a group choice that names no file: Hydra would skip it (the group is optional) and train the default
    "debug=quik": "error: debug='quik': no such debug; did you mean quick? valid choices: quick, null",
    "experiment=t5_identty trainer.fast_dev_run=true": "error: experiment='t5_identty': no such experiment; did you "
    "mean t5_identity? valid choices: baselines_caformer_b36,",
    "proxy=tabel5": "error: proxy='tabel5': no such proxy; did you mean table5? valid choices: table5, "
    "table5_fmnist, null",
    "-m sweep=tabel5 debug=quick": "error: sweep='tabel5': no such sweep; did you mean table5? valid choices: ",
    "-m experiment=t5_identity,t5_idenity": "error: experiment='t5_idenity': no such experiment; did you mean "
    "t5_identity?",
    # an unknown key: Hydra would say to add it with `+`, which only leads to another error
    "optim.lrr=1": "error: optim.lrr=1: optim has no key lrr; valid keys of optim: optimizer, base_lr,",
    "data.root=/nope": "error: data.root='/nope': data=shapes has no key root; data=idx, data=imagefolder, "
    "data=imagenet, data=shards take data.root; valid keys of data: name, image_size,",
    "model.dpeths=[1,1,1,1]": "error: model.dpeths=[1, 1, 1, 1]: model=small has no key dpeths; did you mean depths?",
    "trainer.max_step=20": "did you mean max_steps? valid keys of trainer: accelerator,",
    "-m data.root=/x": "data=shapes has no key root; data=idx, data=imagefolder, data=imagenet, data=shards take "
    "data.root",
    "-m sweep=table5_fmnist_proxy debug=quick data.root=/x": "data=shapes has no key root; data=idx, data=imagefolder"
    ", data=imagenet, data=shards take data.root (debug=quick chose data=shapes: name the data set on the command "
    "line, e.g. data=idx)",
    "debug_data=quick_idx": "error: debug_data='quick_idx': not a choice of its own: debug=quick chooses it from the "
    "data set",
}


@pytest.fixture(scope="module")
def bad_override_runs(tmp_path_factory):
    cases = {command: [*command.split(), "logger=csv"] for command in BAD_OVERRIDES}
    return run_cli_many(cases, tmp_path_factory.mktemp("bad_overrides"))


@pytest.mark.parametrize("command", BAD_OVERRIDES)
def test_bad_overrides_fail_before_training_without_a_traceback(bad_override_runs, command):
    result = bad_override_runs[command]
    assert result.returncode != 0 and BAD_OVERRIDES[command] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line: the error
    assert "Traceback" not in result.stderr and "Epoch" not in result.stderr + result.stdout
    # a run that never started leaves nothing behind: no record, no directory, no row in any table
    runs = result.cwd / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_a_sweep_file_choosing_a_missing_group_file_fails_when_composed():
    # not `optional` in the defaults list: a choice that names no file fails wherever the config is composed
    # (a sweep file's params, the compose API), not only where run.py checks the command line
    from hydra.errors import MissingConfigException

    for override in ("debug=quik", "experiment=t5_identty", "proxy=tabel5", "sweep=tabel5", "launcher=slrum"):
        with pytest.raises(MissingConfigException):
            compose_config(override)


def test_null_chooses_no_config_as_the_default_does():
    # the keys are checked against the config Hydra composes with ~debug, not with debug=null (which it refuses)
    assert check_command_line(["debug=null", "optim.epochs=2"], multirun=True) == ["~debug", "optim.epochs=2"]
    assert check_command_line(["debug=null", "experiment=t5_identity", "seed=1"]) == [
        "~debug", "experiment=t5_identity", "seed=1"]  # fmt: skip
    assert compose_config("~debug") == compose_config()
    with pytest.raises(ConfigError, match="null cannot be one of a sweep's choices"):
        check_command_line(["debug=null,quick"], multirun=True)


def test_plan_refuses_a_mistyped_sweep(capsys):
    from metaformer_lab.plan import main as plan_main

    with pytest.raises(SystemExit) as stop:
        plan_main(["sweep=tabel5"])
    assert stop.value.code == 2
    assert "error: sweep='tabel5': no such sweep; did you mean table5?" in capsys.readouterr().err


def test_same_settings_give_the_same_directory_with_and_without_multirun(tmp_path):
    single = ["trainer.fast_dev_run=true", "optim.base_lr=1e-3", "mixer=[pooling, identity,pooling,identity]"]
    multi = ["-m", "trainer.fast_dev_run=True", "optim.base_lr=0.001", "mixer=[pooling,identity,pooling,identity]"]
    quick = ["data.train_size=128", "data.val_size=64", "model.depths=[1,1,1,1]", "logger=csv", "trainer=cpu"]
    runs = run_cli_many({"single": [*single, *quick], "multi": [*multi, *quick]}, tmp_path)
    names = {}
    for case, result in runs.items():
        assert result.returncode == 0, result.stderr[-2000:]
        names[case] = [p.parent.name for p in (result.cwd / "runs").rglob("result.json")]
    assert names["single"] == names["multi"] == [
        "data.train_size=128,data.val_size=64,mixer=[pooling,identity,pooling,identity],model.depths=[1,1,1,1],"
        "optim.base_lr=0.001,trainer.fast_dev_run=true,trainer=cpu"
    ]


def test_help_explains_this_project(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for words in ("train one MetaFormer ablation", "result.json", "mixer: attention, attention_nobias, dwconv",
                  "debug: quick", "trainer: auto, cpu, ddp, gpu", "trainer.max_steps",
                  "mixer=[pooling,pooling,attention,attention]", "python -m metaformer_lab.analysis"):  # fmt: skip
        assert words in result.stdout, words


def test_full_error_shows_the_traceback_when_asked(tmp_path):
    result = run_cli("optim.base_lr=-1", "logger=csv", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_run_directory_is_derived_from_the_overrides():
    assert run_name([]) == "default"
    assert run_name(["norm=layernorm", "mixer=identity"]) == "mixer=identity,norm=layernorm"
    assert run_name(["data.root=/a/b"]) == "data.root=_a_b"
    assert run_name(["seed=1", "logger=csv", "~debug"], exclude_keys=["logger"]) == "seed=1"  # ~debug: the default
    assert run_name(["trainer.compile=True", "optim.lr=1e-3", "x=[a, 1.0e-2]"]) == run_name(
        ["trainer.compile=true", "optim.lr=0.001", "x=[a,0.01]"]) == "optim.lr=0.001,trainer.compile=true,x=[a,0.01]"
    assert run_name(["+model.x=1"]) == "+model.x=1"
    long = run_name(["x=" + "y" * 300])
    assert len(long) < 200 and long != run_name(["x=" + "y" * 299])


def test_lightning_setup_errors_are_config_errors_that_leave_no_record(tmp_path):
    from metaformer_lab.train import train

    with pytest.raises(ConfigError, match=r"trainer=.*accelerator=gpu.*Lightning cannot set this up"):
        train(compose_config("trainer=gpu", "logger=csv"), tmp_path)
    assert not (tmp_path / "result.json").exists()


@pytest.mark.parametrize("group, choices", [
    ("mixer", ["pooling", "pooling", "attention", "attention"]),
    ("norm", ["batchnorm", "batchnorm", "layernorm", "layernorm"]),
    ("act", ["relu", "gelu", "gelu", "silu"]),
])  # fmt: skip
def test_a_list_given_to_an_axis_group_means_one_choice_per_stage(group, choices):
    # Hydra alone would merge the listed files and build the last choice for every stage
    cfg = compose_config(f"{group}=[{','.join(choices)}]")
    assert list(cfg[group].stages) == choices and cfg[group].name is None
    model = build_model(cfg, build_datamodule(cfg).num_classes, device="meta")
    assert [getattr(spec, group) for spec in model.stage_specs] == choices


@pytest.mark.parametrize("override", ["mixer=identity", "mixer.name=identity"])
def test_an_axis_named_on_the_command_line_wins_over_the_experiments_stages(override):
    # t5_ppaa sets mixer.stages; a run named `...mixer=identity...` must train identity in every stage
    cfg = compose_config("experiment=t5_ppaa", "data.root=/x", override)
    model = build_model(cfg, 1000, device="meta")
    assert [spec.mixer for spec in model.stage_specs] == ["identity"] * 4
    kept = compose_config("experiment=t5_ppaa", "data.root=/x", "norm=batchnorm")  # another axis: stages stay
    assert list(kept.mixer.stages) == ["pooling", "pooling", "attention", "attention"]


def test_a_per_stage_list_given_twice_is_refused():
    with pytest.raises(ConfigError, match=r"mixer=.*one per-stage list, not also mixer.stages="):
        compose_config("mixer=[pooling,pooling,attention,attention]", "mixer.stages=[identity,pooling,pooling,pooling]")


def test_run_py_trains_the_per_stage_list_its_directory_names(tmp_path):
    from conftest import QUICK

    result = run_cli(*QUICK, "optim.epochs=1", "mixer=[pooling,identity,attention,attention]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(next((tmp_path / "runs").glob("*mixer=[[]pooling,identity,attention,attention]*")))
    assert record.mixer_stages == ["pooling", "identity", "attention", "attention"]


def test_every_trainer_key_is_used_or_rejected_naming_the_valid_ones():
    cfg = compose_config("+trainer.gradient_clip_algorithm=value", "trainer.max_steps=20", "trainer.fast_dev_run=true",
                         "trainer.limit_train_batches=0.1", "trainer.check_val_every_n_epoch=2")  # fmt: skip
    args = trainer_arguments(cfg, accumulation(cfg, build_optim(cfg)))
    assert args["gradient_clip_algorithm"] == "value" and args["max_steps"] == 20 and args["fast_dev_run"] is True
    assert args["limit_train_batches"] == 0.1 and args["check_val_every_n_epoch"] == 2
    assert "compile" not in args and "channels_last" not in args  # ours, applied to the model
    with pytest.raises(ConfigError, match=r"trainer.fast_dev_rn=True: not an argument of lightning.Trainer; valid: .*"
                                          r"fast_dev_run.*max_steps"):  # fmt: skip
        trainer_arguments(compose_config("+trainer.fast_dev_rn=true"), 1)
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=3: set by the run from optim.epochs"):
        trainer_arguments(compose_config("+trainer.max_epochs=3"), 1)


def test_accumulation_is_derived_from_the_global_batch_and_says_how_to_change_it():
    cfg = compose_config("trainer.accumulate_grad_batches=1")  # global 128 = 128 x 1 device x 1: consistent
    assert trainer_arguments(cfg, accumulation(cfg, build_optim(cfg)))["accumulate_grad_batches"] == 1
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=4: derived from optim.global_batch=128 .* "
                                          r"= 1; to accumulate 4 batches set optim.global_batch=512"):  # fmt: skip
        cfg = compose_config("trainer.accumulate_grad_batches=4")
        accumulation(cfg, build_optim(cfg))


def test_the_accelerator_is_found_not_assumed(monkeypatch):
    chosen = ("accelerator", "precision", "channels_last", "tf32", "benchmark")
    auto = compose_config().trainer
    assert tuple(resolve_device(auto)[key] for key in chosen) == ("cpu", "32", True, False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(major=9, minor=0))
    assert tuple(resolve_device(auto)[key] for key in chosen) == ("gpu", "bf16-mixed", False, True, True)
    forced = resolve_device(compose_config("trainer=cpu").trainer)  # a forced choice stays, GPU or not
    assert tuple(forced[key] for key in chosen) == ("cpu", "32", True, False, False)


@pytest.mark.parametrize("overrides, label", [
    ([], "12 ep"),
    (["experiment=t5_identity", "data.root=/x"], "300+10 ep"),
    (["trainer.max_steps=20"], "12 ep, max 20 steps"),
    (["trainer.limit_train_batches=0.1"], "12 ep, 10% batches"),
    (["trainer.limit_train_batches=5"], "12 ep, 5 batches/ep"),
    (["trainer.limit_train_batches=1"], "12 ep, 1 batches/ep"),
    (["trainer.limit_train_batches=0.125"], "12 ep, 12.5% batches"),
    (["+trainer.overfit_batches=2"], "12 ep, overfit_batches 2"),
    (["+trainer.max_time=00:00:10:00"], "12 ep, max_time 00:00:10:00"),
    (["trainer.fast_dev_run=true"], "fast_dev_run"),
    (["debug=quick"], "4 ep"),
])  # fmt: skip
def test_a_shortened_run_is_labelled_as_another_protocol(overrides, label):
    cfg = compose_config(*overrides)
    optim = build_optim(cfg)
    assert schedule_label(optim, trainer_arguments(cfg, accumulation(cfg, optim))) == label


def test_a_validation_interval_longer_than_an_epoch_is_refused_before_the_run():
    from metaformer_lab.config import check_validation_interval

    args = {"val_check_interval": 5, "limit_train_batches": 2, "check_val_every_n_epoch": 1}
    with pytest.raises(ConfigError, match=r"trainer.val_check_interval=5: at most the 2 training batches"):
        check_validation_interval(args, 20000, 128, 1)
    check_validation_interval({**args, "val_check_interval": 2}, 20000, 128, 1)
    check_validation_interval({**args, "check_val_every_n_epoch": None}, 20000, 128, 1)  # counts across epochs


def test_one_epoch_alone_works_and_the_warmup_cap_is_said():
    optim = build_optim(compose_config("optim.epochs=1"))
    assert optim.warmup == 0.1 and optim.lr_at(0.1 - 1e-9) == pytest.approx(optim.lr)
    assert optim.lr_at(0.1) == pytest.approx(optim.lr, rel=0.03) and optim.lr_at(1) == optim.min_lr
    assert "optim.warmup_epochs=1 would take all of optim.epochs=1" in optim.describe(156, 156)
    assert build_optim(compose_config("optim.epochs=4")).warmup == 1  # a warmup shorter than the run is kept
    paper = build_optim(compose_config("experiment=t5_identity", "data.root=/x", "optim.epochs=30"))
    assert paper.total_epochs == 40 and "then 10 cooldown ep at min_lr = 40 ep" in paper.describe(400, 10)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_mode_turns_every_experiment_into_a_small_check_with_its_axes(name):
    full = compose_config(f"experiment={name}", "data.root=/datasets/imagenet")
    quick = compose_config(f"experiment={name}", "debug=quick")
    assert (quick.data.name, quick.model.name, quick.optim.cooldown_epochs, quick.optim.global_batch) == (
        "shapes", "small", 0, 128)  # fmt: skip
    for group in ("mixer", "norm", "act"):  # the row's own choices survive
        assert quick[group] == full[group]
    assert (quick.model.residual, quick.model.mlp) == (full.model.residual, full.model.mlp)
    optim = build_optim(quick)
    assert accumulation(quick, optim) == 1 and optim.total_epochs * quick.data.train_size <= 40_000
    build_model(quick, build_datamodule(quick).num_classes, device="meta")


DATA_SETS = sorted(path.stem for path in (ROOT / "conf" / "data").glob("*.yaml"))


@pytest.mark.parametrize("data", DATA_SETS)
def test_quick_mode_shortens_the_data_set_the_command_names(data):
    # debug=quick keeps a data set named on the command line and sets only keys that data set has
    # (conf/debug_data/quick_<data>.yaml, which each data set needs: a missing one would leave the run long)
    assert (ROOT / "conf" / "debug_data" / f"quick_{data}.yaml").is_file()
    cfg = compose_config("debug=quick", f"data={data}")
    if "root" in cfg.data:
        cfg.data.root = "/data/somewhere"
    assert cfg.data.name == data and cfg.debug == "quick"
    build_datamodule(cfg)  # every data key is one the data module takes
    if "train_size" in cfg.data:
        assert cfg.data.train_size <= 8000 and cfg.data.val_size <= 1000
    else:
        assert cfg.trainer.limit_train_batches * cfg.data.batch_size <= 8000 and cfg.data.image_size <= 64
    assert compose_config(f"data={data}").trainer.limit_train_batches is None


def test_quick_cpu_version_of_every_sweep_row_builds(tmp_path):
    for name in EXPERIMENTS:  # the documented `data=shapes model=small` shortcut works for every paper row
        cfg = compose_config(f"experiment={name}", "data=shapes", "model=small")
        build_model(cfg, build_datamodule(cfg).num_classes, device="meta")
