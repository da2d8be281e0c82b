import json
import math

import pytest

from metaformer_lab.bench import STAGES, loader_plan, main
from metaformer_lab.data.jpeg_folder import write_jpeg_folder


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
          "--profile", str(profile)])  # fmt: skip
    assert profile.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "full / decode" in printed and "loader processes" in printed
    report = json.loads(out.read_text())
    assert report["generated"] and report["images"] == 4 and report["torch_threads"] == 1
    for pipeline in ("decode", "train", "eval"):
        rate = report[pipeline]
        assert rate["images_per_s"] > 0 and rate["repeats"] >= 3
        assert rate["images_per_s"] * rate["ms_per_image"] == pytest.approx(1000)
    ratio = report["train"]["ms_per_image"] / report["decode"]["ms_per_image"]
    assert report["full_over_decode"] == pytest.approx(ratio)
    assert report["workers_per_gpu"] == math.ceil(1000 / report["train"]["images_per_s"])
    assert report["gpus_fed"] == report["cpu_count"] // report["workers_per_gpu"]
    assert list(report["stages_ms_per_image"]) == list(STAGES)
    assert all(ms >= 0 for ms in report["stages_ms_per_image"].values())
    assert len(report["randaugment_op_ms"]) == 15 and report["randaugment_ops_per_image"] == 1.0
    # ImageNet-like sizes at 224 px: a crop at least twice the output size needs a short side >= 448
    assert 0 <= report["draft_applicable"]["train"] < 0.05 and report["draft_applicable"]["eval"] == 0


def test_loader_on_a_given_root_without_randaugment(tmp_path, capsys):
    root = write_jpeg_folder(tmp_path / "jpegs", train_per_class=1, val_per_class=1)
    out = tmp_path / "loader.json"
    main(["loader", "--root", str(root), "--images", "3", "--seconds", "0", "--rand-augment", "none",
          "--image-size", "64", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert not report["generated"] and report["rand_augment"] is None and report["randaugment_op_ms"] == {}
    assert report["draft_applicable"]["eval"] == 1.0  # every short side halved is still >= floor(64 / 0.9)
    assert "no RandAugment" in capsys.readouterr().out


def test_loader_rejects_a_folder_without_train(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["loader", "--root", str(tmp_path)])
    assert exit_info.value.code == 2 and "no train/ folder" in capsys.readouterr().err
