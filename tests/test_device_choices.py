"""What a run chooses for its device before Lightning sets it up: precision from the GPU's compute capability (read
without touching cuda:0), TF32 and cuDNN autotuning, the memory format measured faster; and the benchmarks and the
plan timing as the run trains. A fake GPU stands in where there is none; tests marked `gpu` need a real one."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import QUICK, compose_config

from metaformer_lab import config, plan
from metaformer_lab.bench import loop
from metaformer_lab.bench.model import Variant, bench_model, fp32_differences
from metaformer_lab.bench.reference import straightforward
from metaformer_lab.config import resolve_device, tf32_enabled, trainer_arguments
from metaformer_lab.models import create_model
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import train

NO_GPU = not torch.cuda.is_available()
TINY = ["data.train_size=256", "data.batch_size=16", "optim.global_batch=16", "model.depths=[1,1,1,1]",
        "model.dims=[8,16,32,64]"]  # fmt: skip


@pytest.fixture
def fake_gpus(monkeypatch):
    """Four GPUs of a compute capability the test sets; records which device index each query asked about, and
    fails anything that would ask for the current device (cuda:0 before Lightning has set each rank's)."""
    gpus = SimpleNamespace(capability=(8, 0), queried=[])

    def properties(index):
        gpus.queried.append(index)
        return SimpleNamespace(major=gpus.capability[0], minor=gpus.capability[1])

    def current_device():
        raise AssertionError("asked for the current device: cuda:0 before Lightning has set this rank's")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # says yes for emulation too
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    return gpus


@pytest.mark.parametrize("capability, precision", [((7, 0), "16-mixed"), ((7, 5), "16-mixed"),
                                                   ((8, 0), "bf16-mixed"), ((9, 0), "bf16-mixed")])  # fmt: skip
def test_bf16_only_where_the_gpu_computes_in_it(fake_gpus, capability, precision):
    # V100 (7.0) and T4 (7.5) emulate bf16 (is_bf16_supported says yes by default): fp16 with a scaler there
    fake_gpus.capability = capability
    assert resolve_device(compose_config().trainer)["precision"] == precision
    assert resolve_device(compose_config("trainer=ddp").trainer)["precision"] == precision  # gpu.yaml too


def test_the_capability_is_read_from_this_ranks_gpu(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    resolve_device(compose_config().trainer)
    assert fake_gpus.queried == [3]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per task (CUDA_VISIBLE_DEVICES pinned)
    resolve_device(compose_config().trainer)
    assert fake_gpus.queried == [3, 0]


def test_tf32_and_cudnn_autotuning_on_for_a_gpu_unless_turned_off(fake_gpus):
    gpu = resolve_device(compose_config().trainer)
    assert (gpu["tf32"], gpu["benchmark"]) == (True, True)
    assert resolve_device(compose_config("trainer.tf32=false").trainer)["tf32"] is False
    assert resolve_device(compose_config("trainer.benchmark=false").trainer)["benchmark"] is False
    assert resolve_device(compose_config("trainer.deterministic=true").trainer)["benchmark"] is False
    cpu = resolve_device(compose_config("trainer=cpu").trainer)
    assert (cpu["tf32"], cpu["benchmark"]) == (False, False)
    cfg = compose_config()
    args = trainer_arguments(cfg, 1)
    assert args["benchmark"] is True and "tf32" not in args  # Lightning's key passed on, ours applied by the run
    with pytest.raises(ConfigError, match=r"trainer.tf32='yes': auto, true or false"):
        resolve_device(compose_config("trainer.tf32=yes").trainer)


def test_channels_last_auto_is_the_layout_measured_faster_on_each_kind_of_device(fake_gpus, monkeypatch):
    assert resolve_device(compose_config().trainer)["channels_last"] is False  # a GPU: NCHW until measured
    assert resolve_device(compose_config("trainer=cpu").trainer)["channels_last"] is True
    monkeypatch.setitem(config.CHANNELS_LAST_FASTER, "gpu", True)  # what a GPU measurement would change
    assert resolve_device(compose_config().trainer)["channels_last"] is True
    explicit = compose_config("trainer=cpu", "trainer.channels_last=false").trainer
    assert resolve_device(explicit)["channels_last"] is False


def test_tf32_enabled_sets_matrix_products_and_convolutions_and_restores_them():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with tf32_enabled(True):
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)
        with tf32_enabled(False):
            assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("highest", False)
        assert torch.get_float32_matmul_precision() == "high"
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


class _Precision(L.Callback):
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seen = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


def test_a_run_trains_with_its_tf32_setting_and_records_what_it_chose(tmp_path):
    looked = _Precision()
    record = train(compose_config(*QUICK, "trainer.tf32=true", "trainer.fast_dev_run=true"), tmp_path, [looked])
    assert record.status == "completed" and looked.seen == ("high", True)
    assert torch.get_float32_matmul_precision() == "highest"  # restored after the run
    assert (record.tf32, record.cudnn_benchmark, record.channels_last) == (True, False, True)


def _tiny_model() -> torch.nn.Module:
    return create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=10, img_size=32)


def test_the_fp32_agreement_check_is_strict_fp32_for_both_variants():
    torch.manual_seed(0)
    model = _tiny_model()
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    baseline = Variant(straightforward(model), images, labels, "32", False, False, False)
    fast = Variant(model, images, labels, "32", True, False, True)
    seen = []
    for variant in (baseline, fast):
        variant.model.register_forward_hook(
            lambda *_: seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        )
    with tf32_enabled(True):  # as training runs on a GPU
        fp32_differences(baseline, fast)
        assert torch.get_float32_matmul_precision() == "high"
    assert seen and set(seen) == {("highest", False)}


def test_bench_loop_runs_in_the_precision_the_run_resolves(monkeypatch):
    # the bare loop places and casts as Lightning does: here bf16 autocast on the CPU
    outputs = []
    built = loop.build_model

    def build_and_watch(cfg, num_classes):
        model = built(cfg, num_classes)
        model.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
        return model

    monkeypatch.setattr(loop, "build_model", build_and_watch)
    report = loop.bench_loop([*TINY, "trainer=cpu", "trainer.precision=bf16-mixed"], steps=6, rounds=1)
    assert report["precision"] == "bf16-mixed" and report["device"] == "cpu"
    assert len(outputs) == 12 and set(outputs) == {torch.bfloat16}  # 6 Lightning steps, then 6 bare ones
    assert set(report["median_step_ms"]) == {"lightning", "bare"}


def test_plan_times_each_run_as_it_would_train(monkeypatch, tmp_path, fake_gpus):
    monkeypatch.chdir(tmp_path)
    on_a_gpu = plan.training_settings(compose_config("trainer=cpu"), torch.device("cuda"))
    assert (on_a_gpu["precision"], on_a_gpu["channels_last"], on_a_gpu["tf32"]) == ("bf16-mixed", False, True)
    monkeypatch.undo()  # the timing itself on this machine's CPU
    monkeypatch.chdir(tmp_path)
    timed = []

    class Watched(Variant):
        def __init__(self, model, images, labels, precision, channels_last, compiled, fused_optimizer):
            timed.append((precision, channels_last, fused_optimizer))
            super().__init__(model, images, labels, precision, channels_last, compiled, fused_optimizer)

    monkeypatch.setattr(plan, "Variant", Watched)
    rows = plan.plan([*TINY, "trainer=cpu", "trainer.precision=bf16-mixed"], torch.device("cpu"), measure_steps=1)
    assert timed == [("bf16-mixed", True, True)] and rows[0].images_per_s > 0


def test_plan_refuses_a_precision_it_cannot_time(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="trainer.precision='bf16-true': auto or one that plan can time"):
        plan.check_jobs([*TINY, "trainer.precision=bf16-true"])


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_what_a_run_does_before_lightning_sets_its_device_opens_no_cuda_context():
    # in a fresh process, as train.py before fit: resolve the device (the GPU's properties), seed, name the GPU
    code = ("import torch, lightning as L; from conftest import compose_config; "
            "from metaformer_lab.config import resolve_device; resolve_device(compose_config().trainer); "
            "L.seed_everything(0, verbose=False); torch.cuda.get_device_name(0); "
            "print(torch._C._cuda_hasPrimaryContext(0))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_bench_model_measures_each_variants_memory_alone():
    report = bench_model("poolformer_s12", {}, 32, 2, "bf16-mixed", False, False, 0.0, torch.device("cuda"), 1)
    weights_mb = report["params"] * 4 / 2**20  # fp32 weights; with gradients and AdamW's two moments 4x that
    peak = report["variants"]["this project"]["peak_allocated_mb"]
    # its own 4x and activations (and a cuDNN workspace), not the other variant's 4x as well
    assert 3.5 * weights_mb < peak < 6 * weights_mb + 64, (peak, weights_mb)
    assert report["tf32"] is True and report["max_logit_diff"] <= report["tolerance"]


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_bench_loop_on_the_gpu_trainer_auto_chooses():
    report = loop.bench_loop([*TINY], steps=6, rounds=1)
    assert report["device"] != "cpu" and report["precision"] in ("bf16-mixed", "16-mixed")
    assert report["images_per_s"]["bare"] > 0 and report["images_per_s"]["lightning"] > 0
