"""The MetaFormer model family. Pure PyTorch: nothing here knows about Hydra, Lightning or files."""

from metaformer_lab.models.activations import ACTIVATIONS
from metaformer_lab.models.convert import convert_checkpoint
from metaformer_lab.models.counting import ModelCost, count_macs, count_params, measure_cost
from metaformer_lab.models.heads import HEADS
from metaformer_lab.models.metaformer import MetaFormer
from metaformer_lab.models.mixers import MIXERS
from metaformer_lab.models.norms import NORMS
from metaformer_lab.models.presets import MODEL_ARGUMENTS, PRESETS, create_model, model_arguments

__all__ = [
    "ACTIVATIONS", "HEADS", "MIXERS", "MODEL_ARGUMENTS", "NORMS", "PRESETS", "MetaFormer", "ModelCost",
    "convert_checkpoint", "count_macs", "count_params", "create_model", "measure_cost", "model_arguments",
]  # fmt: skip
