"""The model family against the official code's vectors, key layouts and the paper's counts."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA, compose_config

from metaformer_lab.config import build_model
from metaformer_lab.models import (
    ACTIVATIONS,
    MIXERS,
    NORMS,
    PRESETS,
    MetaFormer,
    convert_checkpoint,
    count_params,
    create_model,
    measure_cost,
)
from metaformer_lab.models.metaformer import DropPath
from metaformer_lab.registry import ConfigError

SMALL = dict(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128], num_classes=10)
TINY = dict(depths=[1, 1, 1, 1], dims=[32, 32, 64, 64], num_classes=5, img_size=32)


def meta_model(name: str, **overrides) -> MetaFormer:
    with torch.device("meta"):  # shapes only: counting needs no real weights or compute
        return create_model(name, **overrides)


@pytest.mark.parametrize("name", [p.stem for p in (DATA / "official_keys").glob("*.txt")])
def test_state_dict_keys_and_shapes_match_official(name):
    ours = [f"{k}\t{tuple(v.shape)}" for k, v in meta_model(name).state_dict().items()]
    assert ours == (DATA / "official_keys" / f"{name}.txt").read_text().splitlines()


def test_official_small_checkpoint_loads_strictly_and_reproduces_logits():
    model = create_model("poolformer_s12", **SMALL).eval()
    model.load_state_dict(torch.load(DATA / "small_state_dict.pt", weights_only=True), strict=True)
    logits = model(torch.load(DATA / "small_input.pt", weights_only=True))
    torch.testing.assert_close(logits, torch.load(DATA / "small_output.pt", weights_only=True), atol=1e-5, rtol=1e-4)


def test_seeded_build_reproduces_official_initial_weights_to_float_rounding():
    # the same RNG draws as the official code; erfinv (trunc_normal_) rounds differently on different CPUs, by up to
    # a few 1e-9 here, so the comparison allows float rounding and nothing more
    torch.manual_seed(0)
    ours = create_model("poolformer_s12", **SMALL).state_dict()
    official = torch.load(DATA / "small_state_dict.pt", weights_only=True)
    assert ours.keys() == official.keys()
    for key in official:
        torch.testing.assert_close(ours[key], official[key], atol=1e-7, rtol=0, msg=key)


def test_cost_of_poolformer_s12_matches_the_official_code_exactly():
    cost = measure_cost(meta_model("poolformer_s12"), resolution=224)
    assert (cost.params, cost.frozen_params, round(cost.macs / 1e9, 4)) == (11_915_176, 0, 1.8227)


def _train_step(model: MetaFormer, size: int = 32) -> None:
    model.train()
    x = torch.randn(4, 3, size, size)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("mixer", MIXERS.names())
def test_every_mixer_trains(mixer):
    _train_step(MetaFormer(**TINY, mixer=mixer, drop_path_rate=0.1))


@pytest.mark.parametrize("norm", NORMS.names())
def test_every_norm_trains(norm):
    _train_step(MetaFormer(**TINY, norm=norm))


@pytest.mark.parametrize("act", ACTIVATIONS.names())
def test_every_activation_trains(act):
    _train_step(MetaFormer(**TINY, act=act))


def test_every_norm_declares_its_fvcore_cost():
    assert all(isinstance(NORMS.get(n).macs_per_element, int) for n in NORMS.names())


def test_random_matrix_is_frozen_row_stochastic_and_gets_no_gradient():
    model = MetaFormer(**TINY, mixer="random")
    _train_step(model)
    matrices = [m.random_matrix for m in model.modules() if hasattr(m, "random_matrix")]
    assert len(matrices) == 4 and [w.shape[0] for w in matrices] == [64, 16, 4, 1]
    for w in matrices:
        assert not w.requires_grad and w.grad is None
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
    assert count_params(model)[1] == sum(w.numel() for w in matrices)


def test_drop_path_rises_linearly_from_zero_to_the_rate_at_the_last_block():
    model = create_model("poolformer_s12", img_size=32)
    rates = [b.drop_path.rate if isinstance(b.drop_path, DropPath) else 0.0 for b in model.network.modules()
             if hasattr(b, "drop_path")]  # fmt: skip
    assert rates == pytest.approx([0.1 * g / 11 for g in range(12)])


def test_drop_path_drops_whole_samples_in_training_only():
    layer = DropPath(0.5)
    x = torch.ones(1000, 2, 3, 3)
    y = layer(x)
    kept = y.flatten(1).amax(1)
    assert set(kept.tolist()) <= {0.0, 2.0} and 400 < (kept > 0).sum() < 600
    assert torch.equal(layer.eval()(x), x)


def test_pooling_mixer_is_avgpool_without_padding_minus_input():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = MIXERS.get("pooling")(3)(x)
    assert out[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4 - 0)  # corner: mean of the 4 valid pixels
    assert out[0, 0, 1, 1].item() == pytest.approx(x[0, 0, :3, :3].mean().item() - 5)


def test_norm_semantics():
    x = torch.randn(2, 8, 5, 5)
    mln, ln = NORMS.get("modified_layernorm")(8), NORMS.get("layernorm")(8)
    flat = x.flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(mln(x), expected.view_as(x))
    u, s = x.mean(1, keepdim=True), (x - x.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True)
    torch.testing.assert_close(ln(x), (x - u) / torch.sqrt(s + 1e-5))


def test_attention_matches_the_official_formula():
    torch.manual_seed(0)
    attn = MIXERS.get("attention")(64, 32)
    x = torch.randn(2, 64, 3, 4)
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = attn.qkv(tokens).reshape(2, 12, 3, 2, 32).permute(2, 0, 3, 1, 4)
    weights = ((q * 32**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 12, 64)).transpose(1, 2).reshape(2, 64, 3, 4)
    torch.testing.assert_close(attn(x), expected)


def test_spatial_fc_and_random_mix_tokens_per_channel():
    x = torch.randn(2, 3, 4, 4)
    for mixer in (MIXERS.get("spatial_fc")(16), MIXERS.get("random")(16)):
        weight = next(mixer.parameters())
        torch.testing.assert_close(mixer(x), (x.flatten(2) @ weight.T).view_as(x))


def test_no_residual_and_no_mlp_change_the_block():
    plain = MetaFormer(**TINY, residual=False, mlp=False)
    block = plain.network[0][0]
    assert block.mlp is None and block.norm2 is None and block.layer_scale_2 is None
    assert not any(".mlp." in k or "norm2" in k or "layer_scale_2" in k for k in plain.state_dict())
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(block(x), block.layer_scale_1[:, None, None] * block.token_mixer(block.norm1(x)))


def test_without_residuals_layerscale_1e5_loses_the_input_to_underflow():
    # why Table 5's "Residual connection -> None" is at chance (0.1%): each sub-block scales its branch by 1e-5 and
    # the next norm divides by sqrt(var + eps) ~ sqrt(1e-5), a net factor of ~3e-3 per sub-block, until the signal
    # underflows float32 and every image gives the same features. With LayerScale at 1 (the CPU proxy) it does not.
    def features(layer_scale: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = MetaFormer([1, 1, 2, 1], [16, 32, 64, 128], residual=False, layer_scale_init_value=layer_scale,
                           img_size=32, stem=(2, 2, 0), downsampling=(2, 2, 0), num_classes=10).eval()  # fmt: skip
        with torch.no_grad():
            return model.norm(model.forward_features(torch.randn(2, 3, 32, 32))).mean((-2, -1))

    paper, proxy = features(1e-5), features(1.0)
    assert torch.equal(paper[0], paper[1])  # the input is gone: both images give the same features
    assert (proxy[0] - proxy[1]).abs().max() > 1e-2

def test_per_stage_lists_and_position_embedding_before_first_attention_stage():
    model = MetaFormer(**TINY, mixer=["pooling", "identity", "attention", "attention"], pool_size=[3, 5, 3, 3])
    assert [s.mixer for s in model.stage_specs] == ["pooling", "identity", "attention", "attention"]
    assert model.network[0][0].token_mixer.pool.kernel_size == 3
    assert [type(m).__name__ for m in model.network][4] == "PositionEmbedding"
    assert sum(type(m).__name__ == "PositionEmbedding" for m in model.network) == 1
    assert "position" not in str([type(m) for m in MetaFormer(**TINY, mixer="attention", position_embedding=False)
                                  .network]).lower()  # fmt: skip


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_any_input_size_divisible_by_32(size):
    model = MetaFormer(**TINY, mixer=["pooling", "dwconv", "identity", "attention"]).eval()
    assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


def test_unknown_mixer_lists_valid_names():
    valid = "attention, attention_nobias, dwconv, identity, pooling, random, sepconv, spatial_fc"
    with pytest.raises(ConfigError, match=rf"mixer='poolin': did you mean pooling\? valid choices: {valid}$"):
        MetaFormer(**TINY, mixer="poolin")


def test_per_stage_list_of_wrong_length():
    with pytest.raises(ConfigError, match=r"mixer=\['pooling', 'attention'\].*4 entries"):
        MetaFormer(**TINY, mixer=["pooling", "attention"])


def test_even_pool_size():
    with pytest.raises(ConfigError, match=r"pool_size=4.*odd"):
        MetaFormer(**TINY, pool_size=4)


def test_unknown_override_and_unknown_preset():
    with pytest.raises(ConfigError, match=r"mixr.*not a model argument.*mixer"):
        create_model("poolformer_s12", mixr="identity")
    with pytest.raises(ConfigError, match=r"model='poolformer_s13'.*poolformer_s12"):
        create_model("poolformer_s13")


@pytest.mark.parametrize("mixer", ["random", "spatial_fc"])
def test_size_bound_mixer_rejects_other_input_size(mixer):
    model = MetaFormer(**{**TINY, "img_size": 64}, mixer=mixer)
    model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=rf"{mixer} mixer was built for 64x64 inputs and got 32x32"):
        model(torch.randn(1, 3, 32, 32))


def test_presets_are_all_buildable():
    assert len(PRESETS.names()) == 10 + 23  # PoolFormer and Table 5's released models; the MetaFormer Baselines
    for name in PRESETS.names():
        head = meta_model(name).head
        assert (head.fc2 if hasattr(head, "fc2") else head).out_features == 1000


def _to_timm_key(key: str) -> str:
    # the forward direction of timm's `checkpoint_filter_fn` for PoolFormer v1 (paper.md section 5)
    key = re.sub(r"layer_scale_([12])", r"layer_scale\1.scale", key)
    key = re.sub(r"^network\.(\d+)\.proj", lambda m: f"stages.{(int(m[1]) + 1) // 2}.downsample.conv", key)
    key = re.sub(r"^network\.(\d+)\.(\d+)", lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}", key)
    return re.sub(r"^patch_embed\.proj", "stem.conv", re.sub(r"^norm", "head.norm", re.sub(r"^head", "head.fc", key)))


def test_timm_layout_checkpoint_converts_to_ours():
    official = torch.load(DATA / "small_state_dict.pt", weights_only=True)
    timm_layout = {_to_timm_key(k): v for k, v in official.items()}
    assert "stages.1.blocks.0.layer_scale1.scale" in timm_layout and "stages.3.downsample.conv.weight" in timm_layout
    converted = convert_checkpoint(timm_layout)
    assert converted.state_dict.keys() == official.keys() and converted.model_overrides == {"head": "layernorm"}
    create_model("poolformer_s12", **SMALL).load_state_dict(converted.state_dict, strict=True)
    with pytest.raises(ValueError, match="no counterpart here for these keys of timm: stages.2.blocks.0.gamma"):
        convert_checkpoint({**timm_layout, "stages.2.blocks.0.gamma": torch.ones(1)})


def test_stem_and_downsampling_footprints_are_model_arguments():
    # the paper's stem and downsampling by default; a 2x2 stride-2 footprint gives twice the tokens per side
    default = MetaFormer([1, 1, 1, 1], [16, 16, 32, 32], img_size=64, num_classes=10)
    assert [s.grid for s in default.stage_specs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert default.patch_embed.proj.kernel_size == (7, 7) and default.patch_embed.proj.stride == (4, 4)
    mixers = ["pooling", "spatial_fc", "attention", "random"]  # size-bound mixers are built for these grids
    small = MetaFormer([1, 1, 1, 1], [16, 16, 32, 32], img_size=32, stem=(2, 2, 0), downsampling=(2, 2, 0),
                       mixer=mixers, num_classes=10)  # fmt: skip
    assert [s.grid for s in small.stage_specs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"stem=\[3, 2, 0\]: \[kernel, stride, padding\] with 0 < kernel"):
        MetaFormer(img_size=32, stem=(3, 2, 0))
    with pytest.raises(ConfigError, match=r"img_size=40: a positive multiple of 16"):
        MetaFormer(img_size=40, stem=(2, 2, 0), downsampling=(2, 2, 0))
    model = build_model(compose_config("+model.stem=[2,2,0]", "+model.downsampling=[2,2,0]"), 10)
    assert model.patch_embed.proj.kernel_size == (2, 2) and model.stage_specs[0].grid == (16, 16)
