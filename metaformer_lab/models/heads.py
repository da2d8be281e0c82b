"""Classifier-head axis: how the last stage's feature map becomes logits.

A head kind builds the model's two top-level modules, `norm` and `head` (the official layouts' keys), and says
whether `norm` applies to the feature map before the global mean (PoolFormer v1) or to the mean (the MetaFormer
Baselines, and timm's port of PoolFormer v1).
"""

from __future__ import annotations

import torch
from torch import nn

from metaformer_lab.models.activations import SquaredReLU
from metaformer_lab.models.norms import NORMS
from metaformer_lab.registry import ConfigError, Registry


class HeadKind:
    norm_before_mean = False
    takes_dropout = False

    @classmethod
    def build(cls, dim: int, num_classes: int, stage_norm: str, dropout: float) -> tuple[nn.Module, nn.Module]:
        """(norm, head) for `dim` features; `stage_norm` is the last stage's block norm."""
        if dropout and not cls.takes_dropout:
            raise ConfigError("head_dropout", dropout, "0 for this head; only head=mlp has dropout")
        return cls._norm(dim, stage_norm), cls._classifier(dim, num_classes, dropout)

    @staticmethod
    def _norm(dim: int, stage_norm: str) -> nn.Module:
        return nn.LayerNorm(dim, eps=1e-6)

    @staticmethod
    def _classifier(dim: int, num_classes: int, dropout: float) -> nn.Module:
        return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


HEADS: Registry[type[HeadKind]] = Registry("head")


@HEADS.register("v1")
class PoolFormerHead(HeadKind):
    """PoolFormer v1 (official): the last stage's norm on the feature map, the global mean, a linear layer."""

    norm_before_mean = True

    @staticmethod
    def _norm(dim: int, stage_norm: str) -> nn.Module:
        return NORMS.get(stage_norm)(dim)


@HEADS.register("layernorm")
class LayerNormHead(HeadKind):
    """The global mean, LayerNorm (eps 1e-6, with bias), a linear layer: IdentityFormer, RandFormer, PoolFormerV2,
    and timm's port of PoolFormer v1."""


class MlpClassifier(nn.Module):
    """The official `MlpHead`: fc to 4x, squared ReLU, LayerNorm (torch's default eps 1e-5), dropout, fc."""

    def __init__(self, dim: int, num_classes: int, dropout: float, mlp_ratio: int = 4) -> None:
        super().__init__()
        hidden = mlp_ratio * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = SquaredReLU()
        self.norm = nn.LayerNorm(hidden)
        self.head_dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.head_dropout(self.norm(self.act(self.fc1(x)))))


@HEADS.register("mlp")
class MlpHead(HeadKind):
    """The global mean, LayerNorm (eps 1e-6), then an MLP classifier with dropout: ConvFormer, CAFormer."""

    takes_dropout = True

    @staticmethod
    def _classifier(dim: int, num_classes: int, dropout: float) -> nn.Module:
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("head_dropout", dropout, "a rate in [0, 1)")
        return MlpClassifier(dim, num_classes, dropout) if num_classes > 0 else nn.Identity()
