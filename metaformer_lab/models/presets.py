"""Named models: one short function per paper variant, returning its MetaFormer arguments.

Depths, dims, LayerScale init and drop-path rate follow the paper (Table 1, Table 6) and the official code.
`create_model(name, **overrides)` builds one; any MetaFormer argument can be overridden.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from metaformer_lab.models.metaformer import MetaFormer
from metaformer_lab.registry import ConfigError, Registry

PRESETS: Registry[Callable[[], dict[str, Any]]] = Registry("model")

S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
S12 = dict(depths=(2, 2, 6, 2), dims=S_DIMS, layer_scale_init_value=1e-5, drop_path_rate=0.1)


@PRESETS.register("poolformer_s12")
def poolformer_s12() -> dict[str, Any]:
    return dict(S12)


@PRESETS.register("poolformer_s24")
def poolformer_s24() -> dict[str, Any]:
    return dict(depths=(4, 4, 12, 4), dims=S_DIMS, layer_scale_init_value=1e-5, drop_path_rate=0.1)


@PRESETS.register("poolformer_s36")
def poolformer_s36() -> dict[str, Any]:
    return dict(depths=(6, 6, 18, 6), dims=S_DIMS, layer_scale_init_value=1e-6, drop_path_rate=0.2)


@PRESETS.register("poolformer_m36")
def poolformer_m36() -> dict[str, Any]:
    return dict(depths=(6, 6, 18, 6), dims=M_DIMS, layer_scale_init_value=1e-6, drop_path_rate=0.3)


@PRESETS.register("poolformer_m48")
def poolformer_m48() -> dict[str, Any]:
    return dict(depths=(8, 8, 24, 8), dims=M_DIMS, layer_scale_init_value=1e-6, drop_path_rate=0.4)


# Table 5 models released with the official code (models/metaformer.py). The pooling+attention hybrids use
# channel LayerNorm (Appendix A); the others keep the modified LayerNorm. `_224`: size-bound, built for 224.
@PRESETS.register("metaformer_id_s12")
def metaformer_id_s12() -> dict[str, Any]:
    return dict(S12, mixer="identity")


@PRESETS.register("metaformer_pppa_s12_224")
def metaformer_pppa_s12_224() -> dict[str, Any]:
    return dict(S12, mixer=["pooling", "pooling", "pooling", "attention"], norm="layernorm")


@PRESETS.register("metaformer_ppaa_s12_224")
def metaformer_ppaa_s12_224() -> dict[str, Any]:
    return dict(S12, mixer=["pooling", "pooling", "attention", "attention"], norm="layernorm")


@PRESETS.register("metaformer_pppf_s12_224")
def metaformer_pppf_s12_224() -> dict[str, Any]:
    return dict(S12, mixer=["pooling", "pooling", "pooling", "spatial_fc"])


@PRESETS.register("metaformer_ppff_s12_224")
def metaformer_ppff_s12_224() -> dict[str, Any]:
    return dict(S12, mixer=["pooling", "pooling", "spatial_fc", "spatial_fc"])


# MetaFormer Baselines (arXiv 2210.13452; the official sail-sg/metaformer `metaformer_baselines.py`; paper.md section
# 4): no LayerScale, ResScale in stages 3-4, StarReLU MLPs without biases, norms without bias (eps 1e-6) in the blocks,
# after the stem and before each downsampling, every convolution initialised as the linear layers.
BASELINES = dict(
    act="starrelu", mlp_bias=False, layer_scale_init_value=None, res_scale_init_value=[None, None, 1.0, 1.0],
    stem_norm="layernorm_nobias", downsampling_norm="layernorm_nobias", weight_init="trunc_normal",
)  # fmt: skip
S_DEPTHS = {"s12": (2, 2, 6, 2), "s24": (4, 4, 12, 4), "s36": (6, 6, 18, 6), "m36": (6, 6, 18, 6), "m48": (8, 8, 24, 8)}
# IdentityFormer, RandFormer, PoolFormerV2: PoolFormer's depths and dims, the modified LayerNorm, a LayerNorm head
V2_SIZES = {size: dict(depths=depths, dims=S_DIMS if size[0] == "s" else M_DIMS) for size, depths in S_DEPTHS.items()}
V2_DROP_PATH = {"s12": 0.1, "s24": 0.1, "s36": 0.2, "m36": 0.3, "m48": 0.4}
V2_MIXERS = {
    "identityformer": "identity", "randformer": ["identity", "identity", "random", "random"], "poolformerv2": "pooling",
}  # fmt: skip
# ConvFormer and CAFormer: their own depths and dims, channel LayerNorm, 7x7 separable convolutions, an MLP head
CONV_SIZES = {
    "s18": dict(depths=(3, 3, 9, 3), dims=S_DIMS),
    "s36": dict(depths=(3, 12, 18, 3), dims=S_DIMS),
    "m36": dict(depths=(3, 12, 18, 3), dims=(96, 192, 384, 576)),
    "b36": dict(depths=(3, 12, 18, 3), dims=(128, 256, 512, 768)),
}
CONV_REGULARISATION = {  # drop path and head dropout of the official training scripts
    "convformer": {"s18": (0.2, 0.0), "s36": (0.3, 0.0), "m36": (0.4, 0.0), "b36": (0.6, 0.0)},
    "caformer": {"s18": (0.15, 0.0), "s36": (0.3, 0.4), "m36": (0.4, 0.4), "b36": (0.6, 0.5)},
}
CONV_MIXERS = {"convformer": "sepconv", "caformer": ["sepconv", "sepconv", "attention_nobias", "attention_nobias"]}


def _register_baselines() -> None:
    for family, mixer in V2_MIXERS.items():
        for size, shape in V2_SIZES.items():
            drop_path = 0.3 if (family, size) == ("randformer", "m48") else V2_DROP_PATH[size]  # the official script
            args = dict(BASELINES, **shape, mixer=mixer, norm="modified_layernorm_nobias", head="layernorm",
                        drop_path_rate=drop_path)  # fmt: skip
            PRESETS.register(f"{family}_{size}")(lambda args=args: dict(args))
    for family, mixer in CONV_MIXERS.items():
        for size, shape in CONV_SIZES.items():
            drop_path, head_dropout = CONV_REGULARISATION[family][size]
            args = dict(BASELINES, **shape, mixer=mixer, kernel_size=7, norm="layernorm_nobias", head="mlp",
                        drop_path_rate=drop_path, head_dropout=head_dropout)  # fmt: skip
            PRESETS.register(f"{family}_{size}")(lambda args=args: dict(args))


_register_baselines()

# The official releases' eval crop: `crop_pct` of each model's default_cfg in sail-sg/poolformer (models/poolformer.py:
# 0.9 for S, 0.95 for M; models/metaformer.py: 0.95 unless set to 0.9); evaluation resizes to floor(size / crop_pct).
EVAL_CROP_PCT = {
    "poolformer_s12": 0.9, "poolformer_s24": 0.9, "poolformer_s36": 0.9, "poolformer_m36": 0.95, "poolformer_m48": 0.95,
    "metaformer_id_s12": 0.9, "metaformer_pppa_s12_224": 0.95, "metaformer_ppaa_s12_224": 0.95,
    "metaformer_pppf_s12_224": 0.9, "metaformer_ppff_s12_224": 0.95,
    # sail-sg/metaformer's `_cfg`: every Baselines model is evaluated at crop_pct 1.0
    **{f"{family}_{size}": 1.0 for family in V2_MIXERS for size in V2_SIZES},
    **{f"{family}_{size}": 1.0 for family in CONV_MIXERS for size in CONV_SIZES},
}  # fmt: skip

MODEL_ARGUMENTS = tuple(inspect.signature(MetaFormer).parameters)


def model_arguments(name: str, **overrides: Any) -> dict[str, Any]:
    """The full MetaFormer arguments of preset `name` with `overrides` applied; unknown names are an error."""
    unknown = sorted(set(overrides) - set(MODEL_ARGUMENTS))
    if unknown:
        valid = "not a model argument; valid: " + ", ".join(MODEL_ARGUMENTS)
        raise ConfigError(unknown[0], overrides[unknown[0]], valid)
    return {**PRESETS.get(name)(), **overrides}


def create_model(name: str, **overrides: Any) -> MetaFormer:
    """Build preset `name` (see `PRESETS.names()`), with any MetaFormer argument overridden."""
    return MetaFormer(**model_arguments(name, **overrides))
