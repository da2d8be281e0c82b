"""On a CUDA GPU: training in each precision, compiled, in both layouts, DDP through torchrun, checkpoints across
devices, and BatchNorm statistics over NCCL. Marked `gpu` and skipped where there is none (`pytest -rs` shows why);
`python -m metaformer_lab.bench gpu` runs them with the GPU benchmarks. Each run is the embedded data's tiny run."""

import pytest
import torch
from conftest import QUICK, compose_config, only_record, run_cli

from metaformer_lab.config import build_model
from metaformer_lab.evaluate import evaluate
from metaformer_lab.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)"),
]
ON_GPU = [*(o for o in QUICK if not o.startswith("trainer=")), "trainer=gpu", "trainer.precision=auto"]


def _gpus_at_least(count: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} GPUs")


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.precision=bf16-mixed"],
        ["trainer.precision=16-mixed", "optim.grad_clip=1.0"],  # Lightning unscales before clipping: unfused AdamW
        ["trainer.compile=true"],
        ["trainer.channels_last=true"],  # NCHW is the GPU default until bench gpu measures otherwise
    ],
    ids=["bf16-mixed", "16-mixed+clip", "compile", "nhwc"],
)
def test_run_py_trains_on_one_gpu(tmp_path, overrides):
    result = run_cli(*ON_GPU, *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = only_record(tmp_path / "runs")
    assert record.status == "completed" and record.accelerator in ("gpu", "cuda") and record.world_size == 1
    assert record.device_name == torch.cuda.get_device_name(0) and record.train_throughput_img_s > 0


def test_channels_last_gives_the_same_logits_on_the_gpu():
    cfg = compose_config(*ON_GPU)
    torch.manual_seed(0)
    model = build_model(cfg, 10).cuda().eval()
    images = torch.randn(8, 3, cfg.data.image_size, cfg.data.image_size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        nchw = model(images).float()
    # another autocast block: autocast caches its bf16 copies of the weights, and .to() keeps the same tensors
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        nhwc = model.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc.float(), nchw, atol=3e-2, rtol=3e-2)  # bf16: 8 bits of mantissa


def test_a_gpu_checkpoint_evaluates_on_the_cpu_and_a_cpu_one_on_the_gpu(tmp_path):
    for device, overrides in (("gpu", ON_GPU), ("cpu", QUICK)):
        run_dir = tmp_path / device
        record = train(compose_config(*overrides, "optim.epochs=1"), run_dir)
        assert record.status == "completed"
        other = "cpu" if device == "gpu" else "gpu"
        result = evaluate(run_dir / "checkpoints" / "best.ckpt", [f"trainer.accelerator={other}"])
        assert result.accelerator == other
        # bf16 training, fp32 evaluation elsewhere: the same top-1 up to the few images near a decision boundary
        assert abs(result.top1 - record.best_val_top1) <= 0.05, (device, result.top1, record.best_val_top1)


def test_a_gpu_run_resumes_where_fewer_gpus_are_visible(tmp_path):
    # saved where every GPU is visible, resumed where one fewer is (on the CPU where there was one): each rank
    # restores its own device's random state, not the list of all of them by index
    first = train(compose_config(*ON_GPU, "optim.epochs=1"), tmp_path / "first")
    assert first.status == "completed"
    visible = torch.cuda.device_count() - 1
    on = ON_GPU if visible else QUICK
    resumed = run_cli(*on, "optim.epochs=2", f"resume={tmp_path}/first/checkpoints/last.ckpt", cwd=tmp_path,
                      env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(visible)))})  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    record = only_record(tmp_path / "runs")
    assert record.status == "completed" and record.epochs == 2


def test_ddp_through_the_torchrun_path_on_one_gpu(tmp_path):
    # launcher=gpus starts every job's ranks with torchrun, pinned to a GPU of its own
    result = run_cli("-m", *ON_GPU, "trainer=ddp", "trainer.devices=1", "launcher=gpus", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training in 1 fresh process (torchrun) on GPUs 0" in result.stdout + result.stderr
    assert only_record(tmp_path / "runs").status == "completed"


@_gpus_at_least(2)
def test_batchnorm_statistics_are_reduced_over_nccl(tmp_path):
    result = run_cli(*ON_GPU, "norm=batchnorm", "trainer=ddp", "trainer.devices=2", "trainer.dist_bn=reduce",
                     "data.batch_size=32", cwd=tmp_path)  # fmt: skip (2 x 32 = the global batch of 64)
    assert result.returncode == 0, result.stderr[-3000:]
    record = only_record(tmp_path / "runs")
    assert record.status == "completed" and record.world_size == 2
    state = torch.load(f"{record.run_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    means = [v for k, v in state["state_dict"].items() if k.endswith("running_mean")]
    assert means and all(torch.isfinite(m).all() for m in means)
