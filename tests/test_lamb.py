"""LAMB (CAFormer's optimizer, as timm's) against the update rule written out, and its choice in the config."""

import pytest
import torch
from conftest import QUICK, compose_config

from metaformer_lab.config import build_optim
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import train
from metaformer_lab.training.lamb import Lamb


def reference_steps(weights, grads_per_step, lr, wd, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0):
    """LAMB by hand: global gradient clipping, bias-corrected Adam moments, decay added to the update, the trust
    ratio ||w|| / ||update|| on decayed tensors only (the second one here is a bias: no decay, no ratio)."""
    weights = [w.clone() for w in weights]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    for t, grads in enumerate(grads_per_step, start=1):
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        grads = [g / max(1.0, float(norm) / max_grad_norm) for g in grads]
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            update = (m[i] / (1 - betas[0] ** t)) / (torch.sqrt(v[i] / (1 - betas[1] ** t)) + eps)
            if i == 0:
                update = update + wd * w
                update = update * (w.norm() / update.norm())
            weights[i] = w - lr * update
    return weights


@pytest.mark.parametrize("scale", [0.01, 10.0])  # a global gradient norm below and above max_grad_norm = 1
def test_lamb_follows_the_update_rule(scale):
    torch.manual_seed(0)
    weight, bias = torch.randn(4, 3), torch.randn(4)
    grads = [[torch.randn(4, 3) * scale, torch.randn(4) * scale] for _ in range(3)]
    params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    optimizer = Lamb([{"params": [params[0]], "weight_decay": 0.05}, {"params": [params[1]], "weight_decay": 0.0}],
                     lr=8e-3)  # fmt: skip
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    expected = reference_steps([weight, bias], grads, lr=8e-3, wd=0.05)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach(), want)


def test_the_optimizer_is_a_config_choice():
    assert build_optim(compose_config()).optimizer == "adamw"
    lamb = build_optim(compose_config("experiment=baselines_caformer_s18"))
    assert (lamb.optimizer, lamb.lr, lamb.eps, lamb.warmup_epochs) == ("lamb", 8e-3, 1e-6, 20)
    with pytest.raises(ConfigError, match=r"optim.optimizer='sgd': valid choices: adamw, lamb"):
        build_optim(compose_config("optim.optimizer=sgd"))


def test_a_run_trains_with_lamb(tmp_path):
    # CAFormer's shape at QUICK's depths and dims (added: the preset's model config does not list them)
    quick = [f"+{o}" if o.startswith("model.") else o for o in QUICK]
    record = train(compose_config(*quick, "optim.optimizer=lamb", "model=caformer_s18"), tmp_path)
    assert record.status == "completed" and record.config["optim"]["optimizer"] == "lamb"
    assert record.model == "caformer_s18"
    assert record.mixer_stages == ["sepconv", "sepconv", "attention_nobias", "attention_nobias"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert "exp_avg" in next(iter(state["optimizer_states"][0]["state"].values()))
