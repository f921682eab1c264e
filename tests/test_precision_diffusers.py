"""quantize_ works on any model whose linears match by name: diffusers' DiT, built offline from a config."""

import pytest
import torch

from robuq.quant.linear import QuantLinear
from robuq.precision import PRESETS, preset, quantize_

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def _run(model):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return model.eval()(x, timestep=torch.tensor([10, 700]), class_labels=torch.tensor([1, 3])).sample


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "fp"])
def test_presets_swap_the_diffusers_block_linears(transformer, name):
    reference = _run(transformer)
    quantize_(transformer, preset(name, act_bits=4, layout="diffusers"))
    swapped = sorted(n for n, m in transformer.named_modules() if isinstance(m, QuantLinear))
    expected = sorted(
        f"transformer_blocks.{i}.{suffix}"
        for i in range(2)
        for suffix in (
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "ff.net.0.proj",
            "ff.net.2",
            "norm1.linear",
        )
    )
    assert swapped == expected
    assert type(transformer.get_submodule("proj_out_2")) is torch.nn.Linear
    out = _run(transformer)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    out.square().mean().backward()


def test_high_precision_policy_reproduces_diffusers_output(transformer):
    reference = _run(transformer)
    config = preset("baseline", act_bits=8, layout="diffusers", adaln="int8", adaln_act_bits=8)
    for rule in config.rules:
        rule.linear.weight = "fp"
    quantize_(transformer, config)
    out = _run(transformer)
    assert ((out - reference).norm() / reference.norm()) < 0.02
