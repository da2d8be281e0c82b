import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from metaformer_lab.bench import main
from metaformer_lab.bench.loader import STAGES, loader_plan
from metaformer_lab.bench.model import TOLERANCE, Variant, fp32_differences
from metaformer_lab.bench.reference import ConvMlp, straightforward
from metaformer_lab.data.jpeg_folder import write_jpeg_folder
from metaformer_lab.models import create_model
from metaformer_lab.models.activations import ACTIVATIONS
from metaformer_lab.models.metaformer import Mlp
from metaformer_lab.models.mixers import MIXERS
from metaformer_lab.models.norms import NORMS
from metaformer_lab.training import callbacks


def test_loader_plan_arithmetic():
    plan = loader_plan(train_throughput=2500, images_per_s_per_process=300, cpu_count=64)
    assert plan.workers_per_gpu == 9  # ceil(8.33)
    assert plan.gpus_fed == 7  # 64 // 9
    assert plan.gpus_fed_exact == pytest.approx(64 * 300 / 2500)
    exact = loader_plan(2400, 300, 16)  # 8 workers exactly, two GPUs' worth
    assert (exact.workers_per_gpu, exact.gpus_fed, exact.gpus_fed_exact) == (8, 2, 2.0)
    starved = loader_plan(2500, 100, 2)  # 25 workers per GPU: 2 cores feed no whole GPU
    assert (starved.workers_per_gpu, starved.gpus_fed) == (25, 0)
    with pytest.raises(ValueError):
        loader_plan(2500, 0, 8)


def test_loader_command_generates_a_folder_and_writes_json(tmp_path, capsys):
    out = tmp_path / "loader.json"  # in-process: `python -m` would spend most of its time importing lightning
    profile = tmp_path / "train.prof"
    main(["loader", "--images", "4", "--seconds", "0", "--train-throughput", "1000", "--json", str(out),
          "--profile", str(profile), "--batch", "4", "--image-size", "64"])  # fmt: skip
    assert profile.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "device path: " in printed and "augment_on=device" in printed and "loader processes" in printed
    report = json.loads(out.read_text())
    assert report["generated"] and report["images"] == 4 and report["torch_threads"] == 1
    for rate in (report["decode"], report["eval"], *report["paths"].values()):
        assert rate["images_per_s"] > 0 and rate["repeats"] >= 3
        assert rate["images_per_s"] * rate["ms_per_image"] == pytest.approx(1000)
    for path in report["paths"].values():  # the keys: {"paths": {"loader": {"x_decode": ...}, ...}}
        assert path["x_decode"] == pytest.approx(path["ms_per_image"] / report["decode"]["ms_per_image"])
        assert path["workers_per_gpu"] == math.ceil(1000 / path["images_per_s"])
        assert path["gpus_fed"] == report["cpu_count"] // path["workers_per_gpu"]
    assert report["paths"]["device"]["target_x_decode"] == 1.3
    augment = report["device_augment"]
    assert augment["device"] == "cpu" and augment["batch"] == 4 and augment["image_size"] == 64
    assert augment["images_per_s"] == pytest.approx(
        1000 / (augment["resize"]["ms_per_image"] + augment["randaugment"]["ms_per_image"]))
    assert set(report["transport_images_per_s"]) == {"flat buffer", "list of tensors"}
    assert list(report["stages_ms_per_image"]) == list(STAGES)
    assert all(ms >= 0 for ms in report["stages_ms_per_image"].values())
    assert len(report["randaugment_op_ms"]) == 15 and report["randaugment_ops_per_image"] == 1.0


def test_loader_on_a_given_root_without_randaugment(tmp_path, capsys, monkeypatch):
    root = write_jpeg_folder(tmp_path / "jpegs", train_per_class=1, val_per_class=1)
    # the CPUs this process may use (a SLURM task's, a container's), not the machine's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    out = tmp_path / "loader.json"
    main(["loader", "--root", str(root), "--images", "3", "--seconds", "0", "--rand-augment", "none",
          "--image-size", "64", "--batch", "2", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert not report["generated"] and report["rand_augment"] is None and report["randaugment_op_ms"] == {}
    assert "randaugment" not in report["device_augment"]
    assert report["cpu_count"] == 3 and report["paths"]["loader"]["gpus_fed"] == 3 // report["paths"]["loader"][
        "workers_per_gpu"]  # fmt: skip
    assert report["draft_applicable"]["eval"] == 1.0  # every short side halved is still >= floor(64 / 0.9)
    assert "no RandAugment" in capsys.readouterr().out
    # ImageNet-like sizes at 64 px: crops twice the output size are common
    assert report["draft_applicable"]["train"] > 0.3


def test_loader_rejects_a_folder_without_train(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["loader", "--root", str(tmp_path)])
    assert exit_info.value.code == 2 and "no train/ folder" in capsys.readouterr().err


def _tiny(**axes):
    return create_model("poolformer_s12", img_size=32, num_classes=10, depths=[1, 1, 1, 1], dims=[32, 32, 64, 64],
                        stem=[2, 2, 0], downsampling=[2, 2, 0], layer_scale_init_value=1.0, drop_path_rate=0.1,
                        **axes)  # fmt: skip


AXES = [("mixer", name) for name in MIXERS.names()] + [("norm", name) for name in NORMS.names()] + [
    ("act", name) for name in ACTIVATIONS.names()
]


@pytest.mark.parametrize("key, value", AXES, ids=[f"{k}={v}" for k, v in AXES])
def test_the_fast_path_computes_what_the_straightforward_baseline_does(key, value):
    # every mixer, norm and activation: NHWC with the MLP as matrix products (training's default) against the
    # official computation (1x1 convolutions, NCHW), logits and every gradient, drop path on
    torch.manual_seed(0)
    model = _tiny(**{key: value})
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    baseline = Variant(straightforward(model), images, labels, "32", False, False, False)
    fast = Variant(model, images, labels, "32", True, False, True)
    assert fast.images.is_contiguous(memory_format=torch.channels_last)
    differences = fp32_differences(baseline, fast)
    assert differences["max_logit_diff"] <= TOLERANCE and differences["max_grad_diff"] <= TOLERANCE, differences
    assert differences["max_grad_diff"] > 0 or key == "act"  # the kernels differ: exact equality would be suspicious
    assert {type(m) for m in baseline.model.modules() if isinstance(m, Mlp)} == {ConvMlp}
    assert {type(m) for m in fast.model.modules() if isinstance(m, Mlp)} == {Mlp}


def test_the_baseline_keeps_the_models_keys_and_weights():
    model = _tiny()
    baseline = straightforward(model)
    assert baseline.state_dict().keys() == model.state_dict().keys()
    pairs = zip(baseline.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert baseline.network[0][0].mlp.fc1.weight is not model.network[0][0].mlp.fc1.weight  # a copy


def test_model_command_prints_and_writes_both_variants(tmp_path, capsys):
    out = tmp_path / "model.json"
    main(["model", "poolformer_s12", "depths=[1,1,1,1]", "dims=[8,16,32,64]", "num_classes=10", "--image-size", "32",
          "--batch-size", "4", "--seconds", "0", "--rounds", "2", "--threads", "1", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "baseline (32, NCHW)" in printed and "this project (32, NHWC)" in printed and "within 1e-05" in printed
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"baseline", "this project"}
    for variant in report["variants"].values():
        train = variant["train"]
        assert train["repeats"] >= 2 and train["slowest_images_per_s"] <= train["images_per_s"]
        assert train["images_per_s"] <= train["fastest_images_per_s"]
        assert variant["train_gflop_s"] == pytest.approx(train["images_per_s"] * 6 * report["macs"] / 1e9)
        assert variant["saved_for_backward_mb"] > 0 and variant["peak_allocated_mb"] is None
    fast, base = report["variants"]["this project"], report["variants"]["baseline"]
    assert report["train_speedup"] == pytest.approx(fast["train"]["images_per_s"] / base["train"]["images_per_s"])
    assert report["max_logit_diff"] <= 1e-5 and report["matmul_peak_gflop_s"] > 0
    assert report["device"] == "cpu (1 threads)"


def test_model_command_refuses_an_unknown_axis_value(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["model", "poolformer_s12", "mixer=poolin", "--image-size", "32"])
    assert stop.value.code == 2 and "poolin" in capsys.readouterr().err


def test_loop_command_times_lightning_and_the_bare_loop(tmp_path, capsys):
    out = tmp_path / "loop.json"
    main(["loop", "data.train_size=256", "data.batch_size=16", "optim.global_batch=16", "model.depths=[1,1,1,1]",
          "model.dims=[8,16,32,64]", "--steps", "8", "--rounds", "1", "--json", str(out)])  # fmt: skip
    assert "Lightning runs at" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["median_step_ms"]) == {"lightning", "bare"} and report["batch_size"] == 16
    assert report["lightning_over_bare"] == pytest.approx(
        report["median_step_ms"]["bare"] / report["median_step_ms"]["lightning"]
    )
    assert 0 <= report["bare_data_wait_fraction"] < 1


def test_throughput_counts_the_time_between_batches_within_an_epoch(monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 2.5, 3.0, 4.0, 4.5, 5.5, 10.0, 11.0])  # starts and ends of 5 batches
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    speed, batch = callbacks.TrainThroughput(began=-2.0), (torch.zeros(8, 3, 4, 4), torch.zeros(8))
    on_cpu = SimpleNamespace(device=torch.device("cpu"))  # the module: where it runs decides the clock
    for index in range(5):
        if index == 4:
            speed.on_validation_start(None, on_cpu)  # a validation between batches 4 and 5: not waiting on data
        speed.on_train_batch_start(None, on_cpu, batch, index)
        speed.on_train_batch_end(None, on_cpu, None, batch, index)
    # timed: batches 3-5 (1 s each); between: only before batch 4 (0.5 s)
    assert speed.images_per_second == pytest.approx(24 / 3.0)
    assert speed.data_wait_fraction == pytest.approx(0.5 / 3.5)
    assert speed.first_step_s == 2.0  # from `began` to the first batch's start


def test_a_sweeps_later_runs_in_one_process_begin_when_they_start(monkeypatch):
    monkeypatch.setattr(callbacks, "_runs_begun", 0)
    monkeypatch.setattr(callbacks, "process_age_s", lambda: 3.0)
    assert callbacks.run_began(10.0) == 7.0  # the process's first run: from the command
    assert callbacks.run_began(50.0) == 50.0  # a later job of the same worker process: from its own start


def test_loader_measures_a_shards_folder_as_it_measures_a_folder(tmp_path, capsys):
    from metaformer_lab.data.shards import main as shards

    folder = write_jpeg_folder(tmp_path / "jpegs", train_per_class=1, val_per_class=1, corrupt=1)
    assert shards([str(folder), str(tmp_path / "shards"), "--processes", "1"]) == 0
    out = tmp_path / "loader.json"
    main(["loader", "--root", str(tmp_path / "shards"), "--images", "11", "--seconds", "0", "--image-size", "64",
          "--batch", "2", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["root"] == str(tmp_path / "shards") and report["images"] == 11  # the unreadable one among them
    assert all(path["images_per_s"] > 0 for path in report["paths"].values())
    assert f"{tmp_path / 'shards'}/train" in capsys.readouterr().out
