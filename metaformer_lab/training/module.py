"""The LightningModule: soft-target loss, AdamW or LAMB with the paper's weight-decay filter, warmup + cosine,
metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from metaformer_lab.registry import ConfigError
from metaformer_lab.training.lamb import Lamb
from metaformer_lab.training.mixing import mix_batch


class DivergedError(RuntimeError):
    """The loss became NaN or inf; the run stops and its record says `diverged`."""


# AdamW (PoolFormer, and the Baselines but CAFormer) and LAMB (CAFormer: timm's Lamb, training/lamb.py)
OPTIMIZERS = ("adamw", "lamb")


@dataclass(frozen=True)
class OptimSettings:
    """`optim` of the config. Ranges are checked here, before any training starts."""

    optimizer: str  # a key of OPTIMIZERS
    base_lr: float
    global_batch: int
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    epochs: int
    warmup_epochs: float
    warmup_lr: float
    min_lr: float
    cooldown_epochs: int
    label_smoothing: float
    mixup_alpha: float
    cutmix_alpha: float
    mix_prob: float
    mix_switch_prob: float
    grad_clip: float | None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optim.optimizer", self.optimizer, OPTIMIZERS)
        for name, value in vars(self).items():
            numeric = name not in ("optimizer", "betas", "grad_clip")
            if numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"optim.{name}", value, "a number")
        if len(self.betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.betas", list(self.betas), "two numbers in [0, 1), e.g. [0.9, 0.999]")
        for name in ("global_batch", "epochs", "cooldown_epochs"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"optim.{name}", getattr(self, name), "a whole number")
        positive = ("base_lr", "global_batch", "epochs", "eps")
        non_negative = ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "cooldown_epochs")
        non_negative += ("mixup_alpha", "cutmix_alpha")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"optim.{name}", getattr(self, name), "a positive number")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"optim.{name}", getattr(self, name), "a number >= 0")
        for name in ("label_smoothing", "mix_prob", "mix_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name}", getattr(self, name), "a probability in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError("optim.grad_clip", self.grad_clip, "a positive number or null")

    @property
    def warmup(self) -> float:
        """Warmup epochs as run: `warmup_epochs`, or a tenth of `epochs` where it would take the whole run
        (`optim.epochs=1` with the default warmup of 1), so that a short run still reaches its peak lr and decays
        from it; `describe` says so. A warmup shorter than the run is kept as given."""
        return self.warmup_epochs if self.warmup_epochs < self.epochs else self.epochs / 10

    @property
    def total_epochs(self) -> int:
        """Epochs the loop runs: the cosine's `epochs`, then `cooldown_epochs` at min_lr (timm's schedule)."""
        return self.epochs + self.cooldown_epochs

    def describe(self, steps: int, steps_per_epoch: int) -> str:
        """The schedule in words, for the start of a run: lr, warmup and decay in the optimizer steps the run takes
        (`steps`; `steps_per_epoch` in a whole epoch), and in epochs too unless the run stops short of its epochs
        (trainer.max_steps, fast_dev_run), which then fits the schedule into its steps."""
        whole_epochs = steps == steps_per_epoch * self.total_epochs

        def length(epochs: float) -> str:  # steps [0, n) come before `epochs`, as the scheduler counts them
            n = self.first_step_at(epochs, steps)
            in_steps = f"{n:,} step{'s' * (n != 1)}"
            return f"{epochs:g} ep ({in_steps})" if whole_epochs else in_steps

        text = f"{self.optimizer}, lr {_lr_text(self.lr)}, "
        if self.warmup:
            warmup = length(self.warmup)
            if self.warmup < self.warmup_epochs:
                capped = f"optim.warmup_epochs={self.warmup_epochs:g} would take all of optim.epochs={self.epochs}"
                warmup = f"{warmup[:-1]}; {capped})" if warmup.endswith(")") else f"{warmup} ({capped})"
            text += f"warmup {warmup} then "
        decay = f"cosine to {_lr_text(self.min_lr)}" if self.min_lr < self.lr else "constant"
        text += f"{decay} over {length(self.epochs)}"
        if self.cooldown_epochs:
            text += (f", then {self.cooldown_epochs} cooldown ep at min_lr = {self.total_epochs} ep ({steps:,} steps)"
                     if whole_epochs else f", then min_lr to step {steps:,} ({self.cooldown_epochs} cooldown ep)")
            text += " (optim.cooldown_epochs=0 drops them)"
        return text

    def epoch_at(self, step: int, steps: int) -> float:
        """The schedule's epoch at optimizer step `step` of a run of `steps`: all its epochs, cooldown included,
        fitted into the steps the run takes (whole epochs, unless the run stops short of them)."""
        return step * self.total_epochs / steps

    def first_step_at(self, epoch: float, steps: int) -> int:
        """The first of `steps` optimizer steps at or past `epoch` of the schedule, by `epoch_at` (as the scheduler
        counts): the number of steps before it, e.g. of the warmup."""
        step = min(steps, math.ceil(epoch * steps / self.total_epochs))
        while step > 0 and self.epoch_at(step - 1, steps) >= epoch:  # float rounding on either side of the estimate
            step -= 1
        while step < steps and self.epoch_at(step, steps) < epoch:
            step += 1
        return step

    @property
    def lr(self) -> float:
        """Peak learning rate by the paper's rule: base_lr x global_batch / 1024."""
        return self.base_lr * self.global_batch / 1024

    def lr_at(self, epoch: float) -> float:
        """timm's CosineLRScheduler as the paper used it: linear warmup from warmup_lr, then cosine over
        [0, epochs) counted from epoch 0, then min_lr through the cooldown. Evaluated per step (fractional epoch)."""
        if epoch < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * epoch / self.warmup
        if epoch >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * epoch / self.epochs))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D tensors and biases (norm weights, LayerScale), as timm's `filter_bias_and_bn`.
    Frozen tensors (the random mixer's matrices) are left out of the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ImageClassifier(L.LightningModule):
    """A classifier trained with soft targets: mixup / cutmix and label smoothing, then random erasing where
    `random_erasing` is given (after the mixing, as the official prefetcher). `optim` None: evaluation only. Training
    fits the lr schedule into `schedule_steps` optimizer steps (config.optimizer_steps: the steps the run takes)."""

    # micro-batches between checks of the loss: each check is a host sync (and under DDP a collective), so
    # the loss is watched on the device in between; a diverged run still reports its first non-finite step
    nonfinite_check_every = 50

    def __init__(
        self, model: nn.Module, optim: OptimSettings | None, num_classes: int, channels_last: bool = False,
        random_erasing: Callable[[torch.Tensor], torch.Tensor] | None = None, schedule_steps: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.schedule_steps = schedule_steps
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.optim = optim
        self.random_erasing = random_erasing
        self.num_classes = num_classes
        self.channels_last = channels_last
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self._nonfinite: torch.Tensor | None = None  # [step, epoch, loss] of the first non-finite loss; step -1: none

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def on_train_start(self) -> None:
        # on every rank before its first batch: a rank whose batches are all empty still joins each check's gather
        self._nonfinite = torch.full((3,), -1.0, device=self.device)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if len(labels):
            loss = self.training_loss(images, labels)
            self._watch(loss)
            self.log("train/loss", loss)  # not prog_bar=True: read every batch then (callbacks.ProgressBar shows it)
            # a tensor made on the device: a Python float would be copied there, a sync every step
            self.log("train/lr", loss.new_full((), self.trainer.optimizers[0].param_groups[0]["lr"]))
        else:
            # every image of the batch was unreadable (dropped by the data module): a zero loss with zero gradients,
            # so that this rank still joins the other ranks' all-reduces (DDP's gradients)
            loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        return loss

    def on_train_batch_end(self, outputs: torch.Tensor, batch: tuple, batch_idx: int) -> None:
        # after the callbacks' (SaveEvery checks for itself), before the epoch's end (validation, last.ckpt) and any
        # stop; the same batches on every rank
        trainer = self.trainer
        stops = trainer.should_stop or 0 < trainer.max_steps <= self.global_step
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if stops or last or (batch_idx + 1) % self.nonfinite_check_every == 0:
            self.raise_if_diverged()

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mixup / cutmix, random erasing, forward, and the soft-target loss of one batch (bench loop's bare loop
        takes it too)."""
        o = self.optim
        images, targets = mix_batch(
            images, labels, self.num_classes, o.label_smoothing, o.mixup_alpha, o.cutmix_alpha, o.mix_prob,
            o.mix_switch_prob,
        )  # fmt: skip
        if self.random_erasing is not None:
            images = self.random_erasing(images)
        logits = self(images)
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def _watch(self, loss: torch.Tensor) -> None:
        """Keep the step, epoch and value of the first non-finite loss, on the device: no sync."""
        loss = loss.detach().float()
        first = ~torch.isfinite(loss) & (self._nonfinite[0] < 0)
        now = torch.stack((loss.new_full((), self.global_step), loss.new_full((), self.current_epoch), loss))
        self._nonfinite = torch.where(first, now, self._nonfinite)

    def raise_if_diverged(self) -> None:
        """DivergedError if any rank's loss was non-finite since training started. One host sync, and under DDP one
        all-gather: every rank must call it at the same point, so that all of them stop together."""
        if self._nonfinite is None:
            return  # never trained: evaluation only
        seen = [row for row in self.all_gather(self._nonfinite).reshape(-1, 3).tolist() if row[0] >= 0]
        if seen:
            step, epoch, loss = min(seen)
            raise DivergedError(f"loss is {loss} at step {step:.0f} (epoch {epoch:.0f}); seen at step "
                                f"{self.global_step}")  # fmt: skip

    def on_validation_start(self) -> None:
        self.raise_if_diverged()  # a diverged model is neither validated nor saved as the best

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        if not len(labels):
            return
        logits = self(images)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/loss", F.cross_entropy(logits.float(), labels), sync_dist=True)
        self.log("val/top1", self.val_top1, prog_bar=True)
        self.log("val/top5", self.val_top5)

    def configure_optimizers(self) -> dict:
        o = self.optim
        groups = parameter_groups(self.model, o.weight_decay)
        if o.optimizer == "lamb":
            optimizer = Lamb(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        else:
            # fused: one kernel for all parameters (on CPU 8x faster than the default per-tensor loop, a sixth of a
            # small model's step). A fused AdamW unscales 16-mixed gradients itself: Lightning could not clip them.
            fused = not (o.grad_clip and str(self.trainer.precision).startswith("16"))
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
        # the whole schedule (warmup, cosine, cooldown) over the optimizer steps this run takes: per epoch as usual,
        # and fitted into them when the run stops short of its epochs (trainer.max_steps, fast_dev_run)
        steps = self.schedule_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: o.lr_at(o.epoch_at(step, steps)) / o.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _lr_text(lr: float) -> str:
    """A learning rate as the configs write it: 5e-4, 1.25e-3, 0.1."""
    if lr == 0 or lr >= 0.01:
        return f"{lr:.3g}"
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"
