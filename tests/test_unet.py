"""The SR3 U-Net: architecture identity (parameter counts, key names), options, shapes."""

import math

import pytest
import torch
import torch.nn as nn

import sr3_engine as sr3
from sr3_engine import ops
from sr3_engine.unet import GroupNormSiLU, NoiseLevelEncoding, SelfAttention


def _count_on_meta(config: sr3.UNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in sr3.SR3UNet(config).parameters())


def test_parameter_count_sr3_16_128():
    config = sr3.UNetConfig(inner_channels=64, channel_mults=(1, 2, 4, 8, 8), res_blocks=2,
                            attn_resolutions=(16,), norm_groups=32, image_size=128)
    assert _count_on_meta(config) == 97_807_491


def test_parameter_count_sr3_64_512():
    config = sr3.UNetConfig(inner_channels=64, channel_mults=(1, 2, 4, 8, 16), res_blocks=1,
                            attn_resolutions=(), norm_groups=16, image_size=512)
    assert _count_on_meta(config) == 155_334_339


def test_named_configs_match_the_benchmark_definitions():
    assert _count_on_meta(sr3.UNetConfig.named("sr3-16-128")) == 97_807_491
    assert _count_on_meta(sr3.UNetConfig.named("sr3-64-512")) == 155_334_339


def test_state_dict_uses_the_reference_implementation_keys():
    with torch.device("meta"):
        keys = set(sr3.SR3UNet(sr3.UNetConfig.named("sr3-16-128")).state_dict())
    for key in (
        "noise_level_mlp.1.weight", "noise_level_mlp.3.bias", "downs.0.weight",
        "downs.1.res_block.block1.block.0.weight", "downs.1.res_block.block1.block.3.weight",
        "downs.1.res_block.block2.block.3.bias", "downs.1.res_block.noise_func.noise_func.0.weight",
        "downs.3.conv.weight", "downs.4.res_block.res_conv.weight", "mid.0.attn.qkv.weight",
        "mid.0.attn.norm.weight", "mid.0.attn.out.bias", "ups.0.res_block.res_conv.weight",
        "final_conv.block.0.weight", "final_conv.block.3.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("mid.1.attn") for k in keys)


def test_config_json_round_trip():
    config = sr3.UNetConfig(inner_channels=32, channel_mults=(1, 3), res_blocks=1, attn_resolutions=(8, 4),
                            dropout=0.1, norm_groups=8, image_size=16, num_heads=2, skip_rescale=True,
                            film=True, noise_level_input="gamma")
    again = sr3.UNetConfig.from_json(config.to_json())
    assert again == config and isinstance(again.channel_mults, tuple)
    with pytest.raises(ValueError, match="unknown keys"):
        sr3.UNetConfig.from_dict({"inner_channel": 64})


@pytest.mark.parametrize("kwargs, message", [
    ({"inner_channels": 48, "norm_groups": 32}, "divisible by norm_groups"),
    ({"num_heads": 3}, "divisible by num_heads"),
    ({"noise_level_input": "t"}, "noise_level_input"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sr3.UNetConfig(**kwargs)


@pytest.mark.parametrize("options", [
    {},
    {"skip_rescale": True},
    {"film": True},
    {"num_heads": 4},
    {"noise_level_input": "gamma"},
    {"dropout": 0.2},
])
@pytest.mark.parametrize("size", [(16, 16), (8, 24), (32, 12)])
def test_forward_shapes_and_gradients(options, size):
    torch.manual_seed(0)
    config = sr3.UNetConfig(inner_channels=16, channel_mults=(1, 2, 2), res_blocks=1, attn_resolutions=(8,),
                            norm_groups=8, image_size=16, **options)
    model = sr3.SR3UNet(config)
    x_up = torch.rand(2, 3, *size) * 2 - 1
    y_t = torch.randn(2, 3, *size)
    eps = model(x_up, y_t, torch.tensor([0.3, 0.9]))
    assert eps.shape == (2, 3, *size)
    eps.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sizes_that_do_not_divide_are_rejected(tiny_model):
    x = torch.zeros(1, 3, 10, 12)
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_model(x, x, torch.ones(1))


def test_noise_level_changes_the_output(tiny_model):
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        a = tiny_model(x, x, torch.tensor([0.2]))
        b = tiny_model(x, x, torch.tensor([0.8]))
    assert not torch.allclose(a, b)


def test_gamma_conditioning_embeds_the_square_of_the_level():
    torch.manual_seed(0)
    base = sr3.UNetConfig.named("tiny")
    on_sqrt = sr3.SR3UNet(base).eval()
    on_gamma = sr3.SR3UNet(sr3.UNetConfig.from_dict({**base.to_dict(), "noise_level_input": "gamma"})).eval()
    on_gamma.load_state_dict(on_sqrt.state_dict())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(on_gamma(x, x, torch.tensor([0.5, 0.7])),
                                   on_sqrt(x, x, torch.tensor([0.25, 0.49])))


def test_noise_level_encoding_formula():
    level = torch.tensor([0.0, 0.37, 1.0])
    enc = NoiseLevelEncoding(8)(level)
    freqs = [math.exp(-math.log(1e4) * k / 4) for k in range(4)]
    expected = [[math.sin(v * f) for f in freqs] + [math.cos(v * f) for f in freqs] for v in level.tolist()]
    torch.testing.assert_close(enc, torch.tensor(expected))


def test_self_attention_matches_the_einsum_formulation():
    torch.manual_seed(0)
    attention = SelfAttention(16, num_heads=1, norm_groups=4).eval()
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        q, k, v = attention.qkv(attention.norm(x)).chunk(3, dim=1)
        logits = torch.einsum("bchw,bcyx->bhwyx", q, k) / math.sqrt(16)
        weights = torch.softmax(logits.reshape(2, 5, 7, -1), dim=-1).reshape(2, 5, 7, 5, 7)
        expected = attention.out(torch.einsum("bhwyx,bcyx->bchw", weights, v)) + x
        torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


def test_every_groupnorm_followed_by_silu_goes_through_ops(monkeypatch):
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    calls = []
    original = ops.group_norm_silu

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "group_norm_silu", counting)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        model(x, x, torch.ones(1))
    fused = sum(isinstance(m, GroupNormSiLU) for m in model.modules())
    plain = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    attention_blocks = sum(isinstance(m, SelfAttention) for m in model.modules())
    assert len(calls) == fused > 0
    assert plain == attention_blocks


def test_fused_block_equals_groupnorm_then_silu():
    torch.manual_seed(0)
    fused = GroupNormSiLU(4, 12)
    nn.init.normal_(fused.weight)
    nn.init.normal_(fused.bias)
    reference = nn.GroupNorm(4, 12)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(3, 12, 5, 6)
    torch.testing.assert_close(fused(x), torch.nn.functional.silu(reference(x)))


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny")).eval()
    sr3.set_op_backend(model, "native")
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    level = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(x, x, level), model(x, x, level), rtol=1e-5, atol=1e-5)
