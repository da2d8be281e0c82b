"""python -m metaformer_lab.evaluate: our runs' checkpoints give their record's top-1; official, wrapped and timm-layout
files are recognized and evaluated alike; bad inputs are plain errors."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import QUICK, ROOT, compose_config

from metaformer_lab.data.jpeg_folder import write_jpeg_folder
from metaformer_lab.evaluate import evaluate, find_preset, load_checkpoint, main, official_state_dict
from metaformer_lab.models import PRESETS, create_model
from metaformer_lab.models.convert import convert_checkpoint, to_timm_checkpoint
from metaformer_lab.models.presets import EVAL_CROP_PCT
from metaformer_lab.record import read_record
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import train

SMALL_JPEGS = ["data.image_size=64", "data.num_workers=0", "data.batch_size=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run on the embedded data: 2 epochs, so best.ckpt and last.ckpt may differ."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    assert train(compose_config(*QUICK), run_dir).status == "completed"
    return run_dir


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """10 classes, 2 val images each and one unreadable val file."""
    return write_jpeg_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=1, val_per_class=2, corrupt=1)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, Path]:
    """One poolformer_s12 state dict (10 classes) saved the ways released and trained checkpoints come."""
    torch.manual_seed(0)
    state = create_model("poolformer_s12", num_classes=10).state_dict()
    folder = tmp_path_factory.mktemp("official")
    files = {
        "plain": ("poolformer_s12.pth.tar", state),
        # timm's train.py: under `state_dict`, with its argparse options, from a DataParallel model
        "state_dict": ("model_best.pth.tar", {"state_dict": {f"module.{k}": v for k, v in state.items()},
                                              "args": argparse.Namespace(model="poolformer_s12", lr=1e-3)}),
        "model": ("checkpoint.pth", {"model": state, "epoch": 300}),
        "timm": ("timm_poolformer_s12.pth", to_timm_checkpoint(state)),
    }  # fmt: skip
    for name, content in files.values():
        torch.save(content, folder / name)
    return {key: folder / name for key, (name, _) in files.items()}


def test_a_runs_best_checkpoint_gives_its_records_top1_exactly(run_dir):
    record = read_record(run_dir)
    best = evaluate(run_dir / "checkpoints" / "best.ckpt")
    assert (best.model, best.found_by, best.data, best.root) == ("small", "record", "shapes", None)
    assert best.top1 == record.best_val_top1 and best.top5 == record.best_val_top5  # the very same validation
    assert best.record_top1 == record.best_val_top1 and best.images == 128 and best.unreadable == 0
    assert (best.accelerator, best.device, best.precision) == ("cpu", "cpu", "32")
    last = evaluate(run_dir / "checkpoints" / "last.ckpt", ["data.batch_size=32"])  # other batches, same images
    assert last.top1 == record.final_val_top1 == last.record_top1


def test_a_run_stopped_between_validations_saves_the_weights_its_last_validation_measured(tmp_path):
    # max_steps stops mid-epoch: the run validates once more, and its checkpoints must hold those weights
    cfg = compose_config(*QUICK, "seed=4", "trainer.max_steps=7", "optim.base_lr=0.05")
    record = train(cfg, tmp_path)
    assert record.steps == 7 and record.status == "completed"
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 7
    history = next(state["history"] for name, state in last["callbacks"].items() if "ValidationHistory" in name)
    best_step = max(history, key=lambda h: h["top1"])["step"]
    assert torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == best_step
    assert evaluate(tmp_path / "checkpoints" / "last.ckpt").top1 == record.final_val_top1
    assert evaluate(tmp_path / "checkpoints" / "best.ckpt").top1 == record.best_val_top1


def test_the_command_writes_json_next_to_the_run_and_prints_one_line(run_dir, capsys):
    assert main([str(run_dir / "checkpoints" / "best.ckpt"), "trainer.accelerator=cpu"]) == 0
    line = capsys.readouterr().out.strip()
    expected = (r"small \(record\) on shapes val at 32 px: top-1 \d+\.\d\d% \(record: \d+\.\d\d%\), top-5 \d+\.\d\d% "
                r"of 128 images; cpu, precision 32, \d+ s; wrote .*evaluation.json")  # fmt: skip
    assert re.fullmatch(expected, line), line
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["top1"] == read_record(run_dir).best_val_top1 and saved["run_dir"] == str(run_dir.resolve())


def test_official_wrapped_and_timm_files_load_the_same_weights(official):
    converted = [official_state_dict(load_checkpoint(path), path) for path in official.values()]
    states = [c.state_dict for c in converted]
    assert all(list(other) == list(states[0]) for other in states[1:])
    assert all(torch.equal(other[key], states[0][key]) for other in states[1:] for key in states[0])
    # the same weights, but timm's PoolFormer normalises after the global mean: its file fixes the head
    sources = [(c.layout, c.model_overrides) for c in converted]
    assert sources == [("official", {})] * 3 + [("timm", {"head": "layernorm"})]
    # identity and pooling mixers have no weights: the file name decides, else the user
    assert find_preset(states[0], official["plain"]) == ("poolformer_s12", "file name")
    assert find_preset(states[3], official["timm"]) == ("poolformer_s12", "file name")
    for key in ("state_dict", "model"):
        with pytest.raises(ConfigError, match=r"fit metaformer_id_s12 and poolformer_s12 alike .* choose with "
                                              r"model=metaformer_id_s12 or model=poolformer_s12"):  # fmt: skip
            find_preset(states[0], official[key])


def test_a_preset_with_weights_of_its_own_is_found_by_keys_and_shapes():
    with torch.device("meta"):
        state = create_model("metaformer_ppaa_s12_224", num_classes=1000).state_dict()
    assert find_preset(state, Path("checkpoint.pth")) == ("metaformer_ppaa_s12_224", "keys and shapes")


def test_official_files_on_an_image_folder_give_one_result(official, jpegs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(official["plain"]), f"data.root={jpegs}", *SMALL_JPEGS]) == 0
    line = capsys.readouterr().out
    assert "poolformer_s12 (file name) on imagefolder val at 64 px, crop 0.9: " in line
    assert "of 20 images (1 unreadable skipped)" in line and "wrote evaluation-poolformer_s12.json" in line
    plain = json.loads((tmp_path / "evaluation-poolformer_s12.json").read_text())
    assert (plain["images"], plain["unreadable"], plain["crop_pct"], plain["image_size"]) == (20, 1, 0.9, 64)
    assert plain["root"] == str(jpegs.resolve()) and "val_corrupt_000.JPEG" in plain["unreadable_paths"][0]
    for key in ("state_dict", "model"):
        result = evaluate(official[key], [f"data.root={jpegs}", "model=poolformer_s12", *SMALL_JPEGS])
        assert result.found_by == "model=" and result.model == "poolformer_s12"
        assert (result.top1, result.top5, result.images, result.unreadable) == (
            plain["top1"], plain["top5"], 20, 1)  # fmt: skip
    assert (plain["layout"], plain["head"]) == ("official", "v1")
    assert main([str(official["timm"]), f"data.root={jpegs}", *SMALL_JPEGS]) == 0
    assert "poolformer_s12 (file name; timm layout, head=layernorm) on imagefolder" in capsys.readouterr().out


def test_bad_inputs_are_errors_that_name_the_key(official, jpegs, tmp_path):
    plain = official["plain"]
    cases = [
        (tmp_path / "missing.pth", [], r"checkpoint='.*missing.pth': no such file"),
        (plain, ["model=poolformer_s13"],
         r"model='poolformer_s13': did you mean poolformer_s\d\d\? valid choices: caformer_b36, .*poolformer_s"),
        (plain, ["model=poolformer_s24"], r"model='poolformer_s24': the checkpoint's weights do not fit this model "
                                          r"\(missing: network.0.2.layer_scale_1"),
        (plain, ["data.rot=/x"],
         r"data.rot='/x': not a setting of evaluation; did you mean data.root\? valid: model, data.name, "),
        (plain, ["optim.lr=1"], r"optim.lr='1': not a setting of evaluation"),
        (plain, ["data.root"], r"data.root=None: a setting is key=value"),
        (plain, [], r"data.root=None: required: an image folder"),
    ]  # fmt: skip
    for path, overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            evaluate(path, overrides)

    for head in (5, 1000):  # fewer or more outputs than the folder's classes: labels would not match
        torch.save(create_model("poolformer_s12", num_classes=head).state_dict(), tmp_path / "poolformer_s12_x.pth")
        with pytest.raises(ConfigError, match=rf"data.root='.*': 10 classes, but the checkpoint's head has {head} "):
            evaluate(tmp_path / "poolformer_s12_x.pth", [f"data.root={jpegs}", *SMALL_JPEGS])
    (tmp_path / "notes.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"checkpoint='.*notes.pth': torch.load\(weights_only=True\) cannot read"):
        evaluate(tmp_path / "notes.pth")
    torch.save(create_model("metaformer_pppf_s12_224", num_classes=10).state_dict(), tmp_path / "pppf.pth")
    with pytest.raises(ConfigError, match=r"data.image_size=64: 224, the input size that metaformer_pppf_s12_224's"):
        evaluate(tmp_path / "pppf.pth", [f"data.root={jpegs}", *SMALL_JPEGS])


def test_the_command_prints_an_error_without_a_traceback(official, capsys):
    assert main([str(official["model"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model=None: required: the weights in checkpoint.pth fit ") and "Traceback" not in err


def test_timm_layout_round_trips():
    state = create_model("poolformer_s24", num_classes=10).state_dict()
    timm = to_timm_checkpoint(state)
    assert "stages.1.downsample.conv.weight" in timm and "stages.3.blocks.3.layer_scale2.scale" in timm
    back = convert_checkpoint(timm).state_dict
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_every_experiment_evaluates_with_its_presets_official_crop():
    assert sorted(EVAL_CROP_PCT) == PRESETS.names()

    def per_stage(mixer: str | list[str]) -> list[str]:
        return [mixer] * 4 if isinstance(mixer, str) else list(mixer)

    hybrids = {tuple(per_stage(PRESETS.get(name)().get("mixer", "pooling"))): name
               for name in PRESETS.names() if name.startswith("metaformer_")}  # fmt: skip
    for path in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        cfg = compose_config(f"experiment={path.stem}")
        mixers = tuple(cfg.mixer.stages or per_stage(cfg.mixer.name))
        preset = hybrids.get(mixers, cfg.model.preset) if path.stem.startswith("t5_") else cfg.model.preset
        assert cfg.data.crop_pct == EVAL_CROP_PCT[preset], (path.stem, preset)
