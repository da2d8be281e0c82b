"""`python -m metaformer_lab.bench gpu`: one line without CUDA; with CUDA (faked here), every configuration and
layout measured, the faster layout named, the GPU tests counted, and all of it printed and written as JSON."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from metaformer_lab.bench import gpu
from metaformer_lab.bench import main as bench_main


def test_without_cuda_it_stops_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "-m", "metaformer_lab.bench", "gpu"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and "bench gpu needs a CUDA GPU" in done.stderr


def test_help_says_what_it_measures(capsys):
    with pytest.raises(SystemExit) as stop:
        bench_main(["gpu", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "pytest -m gpu" in text and "channels_last" in text and "--json" in text


def _fake_model_report(preset, overrides, image_size, batch_size, precision, channels_last, compiled, seconds, device):
    speed = {"32": 1000.0, "bf16-mixed": 2000.0}[precision] * (1.5 if compiled else 1) * (0.9 if channels_last else 1)
    variant = {"train": {"images_per_s": speed}, "inference": {"images_per_s": 3 * speed},
               "train_gflop_s": speed * 10.0, "peak_allocated_mb": 5000.0}  # fmt: skip
    return {"variants": {"this project": variant}, "matmul_peak_gflop_s": 400_000.0,
            "train_fraction_of_peak": speed * 10 / 400_000, "max_logit_diff": 1e-6}  # fmt: skip


def test_every_configuration_and_layout_is_measured_and_reported(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_bench_model(*args):
        calls.append(args[4:7])  # precision, channels_last, compiled
        return _fake_model_report(*args)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu, "bench_model", fake_bench_model)
    monkeypatch.setattr(gpu, "bench_loop", lambda overrides, steps, rounds: {
        "lightning_over_bare": 0.97, "images_per_s": {"lightning": 9000.0}, "model": "small", "image_size": 64})
    tests = {"ran": True, "exit_code": 0, "seconds": 100.0, "passed": 8, "skipped": 1, "tail": ""}
    monkeypatch.setattr(gpu, "run_gpu_tests", lambda timeout_s: tests)
    timed = []
    real_time_device_augment = gpu.time_device_augment

    def on_the_cpu(crops, image_size, augment, device, batch, seconds):  # the real timing, small, where torch is
        timed.append((device.type, image_size, batch))
        return real_time_device_augment(crops[:4], 32, augment, torch.device("cpu"), 4, 0)

    monkeypatch.setattr(gpu, "time_device_augment", on_the_cpu)
    out = tmp_path / "gpu.json"
    bench_main(["gpu", "--json", str(out)])
    assert timed == [("cuda", 224, 256)]
    assert sorted(calls) == sorted([(p, cl, c) for p, c in gpu.CONFIGURATIONS for cl in (True, False)])
    report = json.loads(out.read_text())
    assert report["model"]["channels_last_faster"] == {"32": False, "bf16-mixed": False, "bf16-mixed compiled": False}
    assert report["tests"]["passed"] == 8 and report["loop"]["lightning_over_bare"] == 0.97
    text = capsys.readouterr().out
    assert "gpu tests: 8 passed, 1 skipped" in text and "faster layout: 32: NCHW" in text
    assert "bf16-mixed + compile" in text and "Fake H200" in text
    assert "device augmentation (data.augment_on=device), 4 crops to 32 px:" in text
    assert report["device_augment"]["randaugment"]["images_per_s"] > 0


def test_a_failing_configuration_is_a_row_with_its_error_and_compiling_waits_for_time(monkeypatch):
    def fake_bench_model(*args):
        if args[4] == "32" and not args[5]:
            raise RuntimeError("no kernel for this\nmore")
        return _fake_model_report(*args)

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu, "bench_model", fake_bench_model)
    rows = gpu.measure_models(128, 1.0, deadline=0.0)  # the budget already spent: no compiled row
    assert [r.get("error") for r in rows] == [None, "RuntimeError: no kernel for this", None, None,
                                              *["left out: the time budget was spent"] * 2]  # fmt: skip
    assert gpu.faster_layouts(rows) == {"bf16-mixed": False}  # only where both layouts were measured


def test_the_gpu_tests_are_stopped_whole_at_their_time_limit(monkeypatch, tmp_path):
    # a stand-in pytest that starts a child and outlives the limit: both are gone afterwards
    child_pid = tmp_path / "child.pid"
    script = tmp_path / "slow.py"
    script.write_text(f"import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', "
                      f"'import time; time.sleep(60)'])\nopen({str(child_pid)!r}, 'w').write(str(p.pid))\n"
                      "print('started', flush=True)\ntime.sleep(60)\n")  # fmt: skip
    real_popen = subprocess.Popen
    monkeypatch.setattr(gpu.subprocess, "Popen", lambda command, **kw: real_popen([sys.executable, str(script)], **kw))
    began = time.perf_counter()
    result = gpu.run_gpu_tests(timeout_s=3)
    assert time.perf_counter() - began < 30 and result["exit_code"] is None and "stopped after 3 s" in result["why"]
    pid = int(child_pid.read_text())
    for _ in range(50):  # killed: gone, or a zombie until whoever adopted it reaps it
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the child of the stopped tests still runs")
