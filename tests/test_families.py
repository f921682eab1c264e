"""Every family's map covers every linear: quantize_ swaps each block linear and modulation, keeps what
the map names, splits joined inputs exactly, refuses what it cannot account for, and the result exports,
reloads and runs on integers."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from tiny_families import TINY, tiny_family_model
import robuq
from robuq.models.families import FAMILIES, UnknownFamilyError, example_inputs, family_of, run_model
from robuq.models.reshape import JoinedInputLinear, PointwiseConv
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import QuantLinear
from robuq.precision.policy import CoverageError, quantize_, uncovered_linears

pytest.importorskip("diffusers")
FAMILY_NAMES = list(TINY)


def _run(model, inputs):
    with torch.no_grad():
        return run_model(model, inputs)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_linear_is_quantized_or_kept_by_name(family):
    model = tiny_family_model(family)
    fam = family_of(model)
    assert fam.name == family
    quantize_(model, robuq.preset("robuq", act_bits=3))
    for name, module in model.named_modules():
        linear_like = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
        if linear_like and not isinstance(module, QuantLinear):
            assert fam.role_of(name) == "kept", f"{name} is neither quantized nor kept by the {family} map"
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    roles = {fam.role_of(n) for n in quantized}
    assert "adaln" in roles and {"qkv", "proj"} <= {r.rsplit(".", 1)[-1] for r in roles}
    for name, layer in quantized.items():
        expected = 4 if fam.role_of(name) == "adaln" else 3
        assert layer.act_bits == expected and layer.config.weight == ("int4" if expected == 4 else "ternary"), name
    assert any(isinstance(m, QuantAttentionCore) for m in model.modules())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_precision_policy_is_bit_exact(family):
    model = tiny_family_model(family)
    inputs = example_inputs(model, 2)
    reference = _run(model, inputs)
    assert torch.equal(_run(quantize_(copy.deepcopy(model), robuq.preset("fp")), inputs), reference)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_with_fp_weights_and_8_bits_stays_close(family):
    """Each swapped piece (rotations, splits, routed attention) is exact up to its 8-bit rounding."""
    model = tiny_family_model(family)
    inputs = example_inputs(model, 2)
    reference = _run(model, inputs)
    config = robuq.preset("robuq", act_bits=8, adaln="fp", adaln_act_bits=8, weight="fp")
    for rule in config.rules:
        rule.linear.weight = "fp"
    out = _run(quantize_(copy.deepcopy(model), config), inputs)
    assert ((out - reference).norm() / reference.norm()).item() < 0.05


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_joined_inputs_are_split_exactly(family):
    model = tiny_family_model(family)
    fam = FAMILIES[family]
    pattern = next(iter(fam.joined_inputs))
    name = next(n for n, _ in model.named_modules() if __import__("fnmatch").fnmatchcase(n, pattern))
    linear = model.get_submodule(name)
    split = JoinedInputLinear.from_linear(linear, fam.joined_inputs[pattern](model, name))
    x = torch.randn(3, 5, linear.in_features)
    torch.testing.assert_close(split(x), linear(x), rtol=1e-5, atol=1e-6)
    quantize_(model, robuq.preset("robuq"))
    parts = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.startswith(name + ".")]
    assert [p.rsplit(".", 1)[1] for p in parts] == ["attn", "mlp"]


def test_pointwise_convs_are_linears():
    conv = nn.Conv2d(6, 10, 1)
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(PointwiseConv.from_conv(conv)(x), conv(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1×1"):
        PointwiseConv.from_conv(nn.Conv2d(6, 6, 3))


def test_unknown_model_is_refused_with_the_supported_families():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnknownFamilyError, match="flux: FLUX.1"):
        quantize_(model, robuq.preset("robuq"))


def test_uncovered_linear_is_refused_or_named():
    model = tiny_family_model("flux")
    model.extra_head = nn.Linear(32, 32)  # a linear the FLUX map does not know
    assert uncovered_linears(model, FAMILIES["flux"]) == ["extra_head"]
    before = copy.deepcopy(model)
    with pytest.raises(CoverageError, match="extra_head"):
        quantize_(model, robuq.preset("robuq"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before anything changed
    with pytest.warns(UserWarning, match="extra_head"):
        quantize_(before, robuq.preset("robuq"), allow_partial=True)
    assert isinstance(before.extra_head, nn.Linear)


def test_fused_projections_are_refused_on_a_quantized_model():
    model = tiny_family_model("flux")
    quantize_(model, robuq.preset("robuq"))
    with pytest.raises(ValueError, match="fusing them"):
        model.fuse_qkv_projections()
    fused = tiny_family_model("flux")
    fused.fuse_qkv_projections()
    with pytest.raises(CoverageError, match="unfuse_qkv_projections"):
        quantize_(fused, robuq.preset("robuq"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_reload_runs_on_integers(family, tmp_path):
    model = tiny_family_model(family)
    inputs = example_inputs(model, 2)
    config = robuq.preset("robuq", act_bits=3)
    quantize_(model, config)
    reference = _run(model, inputs)
    path = robuq.export_model(model, config, tmp_path / "model.safetensors", dtype="fp32")
    exported = robuq.load_exported(path)
    assert type(exported).__name__ == TINY[family][0]
    out = _run(exported, inputs)
    assert ((out - reference).norm() / reference.norm()).item() < 1e-3
    assert torch.equal(_run(robuq.load_exported(path, integer=False), inputs), reference)
    saved = robuq.save_quantized(model, tmp_path / "q.safetensors", config)
    reloaded, _ = robuq.load_quantized(saved)
    assert torch.equal(_run(reloaded.eval(), inputs), reference)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cost_summary_names_the_family_and_what_stays_full_precision(family):
    # At the paper's rank share: a rank-16 branch is wider than the tiny models' layers.
    model = quantize_(tiny_family_model(family), robuq.preset("robuq", act_bits=2, lowrank_share=16 / 1152))
    summary = robuq.cost_summary(model)
    assert summary.family == family and summary.kept
    kinds = {m.kind for m in summary.modules}
    assert {"QuantLinear", "QuantAttentionCore"} <= kinds
    assert f"family {family}" in summary.format(per_module=False)
    assert summary.to_dict()["bops_reduction"] > 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_diffusers_loading_path_quantizes_and_reloads(family, tmp_path):
    import diffusers

    from robuq.integrations.diffusers import DiffusersConfig

    model = tiny_family_model(family)
    model.save_pretrained(tmp_path / "fp")
    cls = type(model)
    quantized = cls.from_pretrained(tmp_path / "fp", quantization_config=DiffusersConfig(act_bits=3))
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    inputs = example_inputs(model, 1)
    direct = quantize_(tiny_family_model(family), robuq.preset("robuq", act_bits=3))
    out = _run(quantized.eval(), inputs)
    torch.testing.assert_close(out, _run(direct, inputs), rtol=1e-4, atol=1e-5)
    quantized.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "robuq"
    reloaded = cls.from_pretrained(tmp_path / "q")  # its policy from config.json; robuq registered itself above
    saved, loaded = quantized.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # Equal tensors, but in other memory layouts after loading: the kernels may sum in another order.
    torch.testing.assert_close(_run(reloaded.eval(), inputs), out, rtol=1e-5, atol=1e-6)
    assert diffusers.__version__ in robuq.integrations.diffusers.TESTED_DIFFUSERS


def test_an_untested_diffusers_is_refused_by_name(monkeypatch):
    import diffusers

    from robuq.integrations import diffusers as adapter

    monkeypatch.setattr(diffusers, "__version__", "0.1.0")
    with pytest.raises(RuntimeError, match="tested with diffusers .* not 0.1.0"):
        adapter._check_version(diffusers)
