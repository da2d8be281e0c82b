"""The MetaFormer Baselines family (arXiv 2210.13452) against the official code's vectors and key layout,
paper.md section 4's counts, and the new axis values' semantics."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA, ROOT, compose_config

from metaformer_lab.config import build_model
from metaformer_lab.models import (
    HEADS,
    PRESETS,
    MetaFormer,
    convert_checkpoint,
    create_model,
    measure_cost,
    model_arguments,
)
from metaformer_lab.registry import ConfigError

FAMILIES = {"identityformer": "s12", "randformer": "s12", "poolformerv2": "s12", "convformer": "s18", "caformer": "s18"}
# paper.md section 4, "code-verified params / fvcore MACs": (trainable M, frozen M, MACs G) at 224 px
PAPER_COSTS = {
    "identityformer_s12": (11.89, 0, 1.81), "identityformer_s24": (21.34, 0, 3.39),
    "identityformer_s36": (30.79, 0, 4.97), "identityformer_m36": (56.08, 0, 8.76),
    "identityformer_m48": (73.35, 0, 11.53),
    "randformer_s12": (11.89, 0.24, 1.89), "randformer_s24": (21.34, 0.47, 3.54),
    "randformer_s36": (30.79, 0.71, 5.20), "randformer_m36": (56.08, 0.71, 9.04),
    "randformer_m48": (73.35, 0.94, 11.90),
    "poolformerv2_s12": (11.89, 0, 1.81), "poolformerv2_s24": (21.34, 0, 3.39),
    "poolformerv2_s36": (30.79, 0, 4.97), "poolformerv2_m36": (56.08, 0, 8.76),
    "poolformerv2_m48": (73.35, 0, 11.53),
    "convformer_s18": (26.77, 0, 3.94), "convformer_s36": (40.01, 0, 7.64), "convformer_m36": (57.05, 0, 12.84),
    "convformer_b36": (99.88, 0, 22.63),
    "caformer_s18": (26.34, 0, 4.11), "caformer_s36": (39.30, 0, 7.97), "caformer_m36": (56.20, 0, 13.24),
    "caformer_b36": (98.75, 0, 23.16),
}  # fmt: skip


def tiny(family: str, **overrides) -> MetaFormer:
    """The family's preset at the size of the official vectors (tests/data/README.md)."""
    size = dict(depths=[1, 1, 1, 1], dims=[8, 16, 16, 32], num_classes=10, img_size=32)
    if family == "caformer":
        size["head_dim"] = 8
    return create_model(f"{family}_{FAMILIES[family]}", **{**size, **overrides})


@pytest.fixture(scope="module")
def official():
    return torch.load(DATA / "baselines_tiny.pt", weights_only=True)


def test_every_baselines_preset_counts_params_and_macs_as_the_paper():
    assert sorted(PAPER_COSTS) == sorted(n for n in PRESETS.names() if n.split("_")[0] in FAMILIES)
    for name, expected in PAPER_COSTS.items():
        with torch.device("meta"):
            cost = measure_cost(create_model(name))
        got = (round(cost.params / 1e6, 2), round(cost.frozen_params / 1e6, 2), round(cost.macs / 1e9, 2))
        assert got == pytest.approx(expected, abs=0.0051), name  # the paper's last digit, rounded either way


@pytest.mark.parametrize("name", sorted(f"{family}_{size}" for family, size in FAMILIES.items()))
def test_official_key_layout_converts_to_ours_key_for_key(name):
    lines = (DATA / "baselines_keys" / f"{name}.txt").read_text().splitlines()
    official = {key: torch.empty(eval(shape)) for key, shape in (line.split("\t") for line in lines)}
    converted = convert_checkpoint(official)
    assert converted.layout == "baselines" and converted.model_overrides == {}
    with torch.device("meta"):
        ours = create_model(name).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.state_dict.items()} == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_official_weights_load_strictly_and_reproduce_the_official_logits(family, official):
    vectors = official[family]
    model = tiny(family).eval()
    model.load_state_dict(convert_checkpoint(vectors["state_dict"]).state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(vectors["input"]), vectors["output"], atol=1e-5, rtol=1e-4)


def _timm_key(key: str) -> str:
    # timm's `checkpoint_filter_fn` (models/metaformer.py) for the official Baselines layout, as written there
    key = re.sub(r"downsample_layers.([0-9]+)", r"stages.\1.downsample", key)
    key = re.sub(r"([0-9]+).([0-9]+)", r"\1.blocks.\2", key)
    key = key.replace("stages.0.downsample", "stem").replace("post_norm", "norm").replace("pre_norm", "norm")
    return re.sub(r"^norm", "head.norm", re.sub(r"^head", "head.fc", key))


def _timm_shape(key: str, value: torch.Tensor, attention_stages: set[int]) -> torch.Tensor:
    # timm runs convolution stages NCHW, with 1x1 convolutions where the official code has nn.Linear
    stage = re.match(r"stages\.(\d+)\.blocks", key)
    pointwise = re.search(r"(mlp\.fc[12]|token_mixer\.pwconv[12])\.weight$", key)
    if stage and pointwise and int(stage[1]) not in attention_stages:
        return value.reshape(*value.shape, 1, 1)
    return value


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_layout_of_the_baselines_converts_to_the_same_weights(family, official):
    state = official[family]["state_dict"]
    attention = {2, 3} if family == "caformer" else set()
    timm = {_timm_key(k): _timm_shape(_timm_key(k), v, attention) for k, v in state.items()}
    assert "stem.norm.weight" in timm and "stages.3.downsample.norm.weight" in timm
    converted, expected = convert_checkpoint(timm), convert_checkpoint(state).state_dict
    assert converted.layout == "timm"
    # timm's heads all normalise after the mean: the MLP head is the preset's, a linear one is head=layernorm
    assert converted.model_overrides == ({} if family in ("convformer", "caformer") else {"head": "layernorm"})
    assert list(converted.state_dict) == list(expected)
    for key, value in expected.items():
        assert torch.equal(converted.state_dict[key], value), key


def test_timm_poolformer_v1_checkpoint_is_built_with_timms_head():
    # timm's port of PoolFormer v1 applies LayerNorm (eps 1e-6) after the global mean, the official GroupNorm before
    torch.manual_seed(0)
    official = create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[16, 16, 32, 32], num_classes=10).eval()
    with torch.no_grad():
        official.norm.weight.add_(torch.randn(32)), official.norm.bias.add_(torch.randn(32))
    timm = {
        "stem.conv.weight": official.patch_embed.proj.weight, "stem.conv.bias": official.patch_embed.proj.bias,
        **{f"head.norm.{k}": v for k, v in official.norm.state_dict().items()},
        **{f"head.fc.{k}": v for k, v in official.head.state_dict().items()},
    }  # fmt: skip
    converted = convert_checkpoint(timm)
    assert converted.layout == "timm" and converted.model_overrides == {"head": "layernorm"}
    model = create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[16, 16, 32, 32], num_classes=10,
                         **converted.model_overrides).eval()  # fmt: skip
    model.load_state_dict(official.state_dict())  # same keys and shapes: only the head's computation differs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_features(x).mean((-2, -1))
        timm_logits = official.head(F.layer_norm(pooled, (32,), official.norm.weight, official.norm.bias, 1e-6))
        torch.testing.assert_close(model(x), timm_logits)
        assert (official(x) - timm_logits).abs().max() > 1e-3  # the two heads are not interchangeable


@pytest.mark.parametrize("head", HEADS.names())
def test_heads_against_hand_computation(head):
    torch.manual_seed(0)
    model = MetaFormer([1, 1, 1, 1], [8, 8, 16, 16], num_classes=3, img_size=32, head=head).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("norm.", "head.")):
                p.add_(torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        norm, fc = model.norm, model.head
        if head == "v1":  # GroupNorm(1, C) on the map (the last stage's norm), then the mean
            normed = F.group_norm(features, 1, norm.weight, norm.bias, 1e-5)
            expected = F.linear(normed.mean((-2, -1)), fc.weight, fc.bias)
        else:  # the mean, then LayerNorm(C, eps 1e-6)
            pooled = F.layer_norm(features.mean((-2, -1)), (16,), norm.weight, norm.bias, 1e-6)
            if head == "layernorm":
                expected = F.linear(pooled, fc.weight, fc.bias)
            else:  # fc 4x, squared ReLU, LayerNorm(4C, eps 1e-5), (dropout), fc
                hidden = F.relu(F.linear(pooled, fc.fc1.weight, fc.fc1.bias)).square()
                hidden = F.layer_norm(hidden, (64,), fc.norm.weight, fc.norm.bias, 1e-5)
                expected = F.linear(hidden, fc.fc2.weight, fc.fc2.bias)
        torch.testing.assert_close(model(x), expected)


def test_res_scale_scales_the_shortcut_and_needs_one():
    # no norm, identity mixer, no MLP, no LayerScale: a block is rs * x + x
    block_args = dict(mixer="identity", norm="none", mlp=False, layer_scale_init_value=None, num_classes=0)
    model = MetaFormer([1], [8], stem=(4, 4, 0), img_size=8, res_scale_init_value=2.5, **block_args)
    x = torch.randn(2, 8, 2, 2)
    torch.testing.assert_close(model.network[0](x), 3.5 * x)
    assert model.network[0][0].res_scale_1.shape == (8,) and model.network[0][0].res_scale_2 is None
    with pytest.raises(ConfigError, match="res_scale_init_value=1.0: null in stages without residual"):
        MetaFormer([1, 1], [8, 8], img_size=32, residual=[True, False], res_scale_init_value=1.0)


def test_sepconv_is_an_inverted_separable_convolution():
    model = MetaFormer([1], [4], mixer="sepconv", kernel_size=7, img_size=16, num_classes=0)
    mixer = model.network[0][0].token_mixer
    assert (mixer.pwconv1.weight.shape, mixer.dwconv.weight.shape, mixer.pwconv2.weight.shape) == ((8, 4), (8, 1, 7, 7),
                                                                                                  (4, 8))  # fmt: skip
    assert mixer.pwconv1.bias is None and mixer.dwconv.bias is None and mixer.pwconv2.bias is None
    x = torch.randn(2, 4, 5, 5)
    hidden = torch.einsum("oc,bchw->bohw", mixer.pwconv1.weight, x)
    hidden = mixer.act1.scale * F.relu(hidden).square() + mixer.act1.bias  # StarReLU
    hidden = F.conv2d(hidden, mixer.dwconv.weight, padding=3, groups=8)
    torch.testing.assert_close(mixer(x), torch.einsum("oc,bchw->bohw", mixer.pwconv2.weight, hidden))


def test_the_baselines_norms_have_no_bias_and_eps_1e6():
    x = torch.randn(2, 8, 3, 3) * 1e-3  # small: eps matters
    model = tiny("identityformer")
    norm = model.network[0][0].norm1
    assert not hasattr(norm, "bias") or norm.bias is None
    var = x.var((1, 2, 3), unbiased=False, keepdim=True)
    expected = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(var + 1e-6) * norm.weight[:, None, None]
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-4)
    channel = tiny("convformer").patch_embed.post_norm
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(var + 1e-6) * channel.weight[:, None, None]
    torch.testing.assert_close(channel(x), expected, atol=1e-5, rtol=1e-4)


def test_stem_and_downsampling_norms_and_attention_without_bias_or_position_embedding():
    model = tiny("caformer")
    assert model.patch_embed.post_norm is not None and model.patch_embed.pre_norm is None
    assert all(layer.pre_norm is not None for layer in model.network[1::2])
    attention = model.network[4][0].token_mixer
    assert attention.proj.bias is None and attention.qkv.bias is None
    assert not any("pos_embed" in key for key in model.state_dict())


def test_bad_baselines_settings_name_the_key():
    with pytest.raises(ConfigError, match="head_dropout=0.2: 0 for this head; only head=mlp"):
        MetaFormer(head="layernorm", head_dropout=0.2)
    with pytest.raises(ConfigError, match="head='avg': valid choices: layernorm, mlp, v1"):
        MetaFormer(head="avg")
    with pytest.raises(ConfigError, match="weight_init='xavier': valid choices: poolformer, trunc_normal"):
        MetaFormer(weight_init="xavier")
    with pytest.raises(ConfigError, match="stem_norm='ln'"):
        MetaFormer(stem_norm="ln")


def test_trunc_normal_init_covers_every_convolution():
    torch.manual_seed(0)
    stem = tiny("convformer", dims=[64, 64, 64, 64]).patch_embed.proj
    assert abs(stem.weight.std().item() - 0.02) < 0.002 and stem.bias.abs().max() == 0
    torch.manual_seed(0)
    # PyTorch's default, kept by the official PoolFormer: uniform with std 1 / sqrt(3 x 3 x 7 x 7) = 0.048
    assert create_model("poolformer_s12", depths=[1, 1, 1, 1]).patch_embed.proj.weight.std() > 0.04


@pytest.mark.parametrize("name", sorted(PAPER_COSTS))
def test_every_baselines_preset_trains_a_few_steps(name):
    # every axis of the preset at a small size (the full sizes are counted above)
    args = model_arguments(name, depths=[1, 1, 1, 1], dims=[32, 32, 64, 64], num_classes=4, img_size=64)
    model = MetaFormer(**args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    frozen = [k for k, v in model.named_parameters() if not v.requires_grad]
    assert sorted(changed) == sorted(k for k in before if k not in frozen), name


MODEL_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", [name for name in MODEL_CONFIGS if name in PRESETS.names()])
def test_every_preset_model_config_builds_exactly_its_preset(name):
    # the axis groups (mixer, norm, act) always reach the model: a model config must choose its preset's, or
    # `model=caformer_s18` would silently train CAFormer's shape with pooling and GELU
    cfg = compose_config(f"model={name}", "data.image_size=224")
    with torch.device("meta"):
        assert repr(build_model(cfg, 1000)) == repr(create_model(name))
    swapped = compose_config(f"model={name}", "mixer=identity", "act=relu", "data.image_size=224")
    with torch.device("meta"):
        specs = build_model(swapped, 1000).stage_specs
    assert {(s.mixer, s.act) for s in specs} == {("identity", "relu")}
