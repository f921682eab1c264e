import json

import pytest
import torch
import torch.nn as nn

import robuq
from robuq.precision.cost import cost_summary
from robuq.models.dit import AttentionCore
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import QuantLinear
from robuq.precision import PRESETS, PlanError, QuantConfig, current_plan, load_plan, preset, quantize_
from robuq.io.quantized import load_quantized, save_quantized

from conftest import tiny_config


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_quantize_replaces_exactly_the_policy_modules_on_dit_s2():
    model = robuq.create_dit("DiT-S/2", input_size=32)
    before = {n: type(m) for n, m in model.named_modules()}
    quantize_(model, preset("robuq", act_bits=4), initialize=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sum(n.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")) for n in linears) == 48
    assert sum(n.endswith("adaLN_modulation.1") for n in linears) == 12
    assert len(linears) == 60
    assert _count(model, QuantAttentionCore) == 12 and _count(model, AttentionCore) == 0
    changed = {n for n, m in model.named_modules() if n in before and type(m) is not before[n]}
    assert changed == set(linears) | {f"blocks.{i}.attn.core" for i in range(12)}
    for name in (
        "x_embedder.proj",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    ):
        assert type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d), name


def _hadamard_signs(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.hadamard_signs.clone()
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.hadamard_signs is not None
    }


def test_hadamard_signs_follow_the_layer_name():
    """Each layer draws its sign flips from its name: equal-sized layers differ, the same layer of another
    model (other weights, depth and global RNG state) gets the same flips, and a policy that swaps fewer
    modules leaves the flips of the ones it swaps unchanged — so a plan or a partial policy never reshuffles them."""
    config = preset("robuq", act_bits=4)
    torch.manual_seed(0)
    full = _hadamard_signs(quantize_(robuq.DiT(tiny_config()), config, initialize=False))
    assert len(full) == 8  # the four block linears of two blocks
    square = [s for s in full.values() if s.numel() == 48]  # qkv, proj and fc1 all take the 48-wide tokens
    assert len(square) == 6
    assert all(set(s.tolist()) == {-1.0, 1.0} for s in full.values())
    for i, a in enumerate(square):
        for b in square[i + 1 :]:
            assert not torch.equal(a, b)

    torch.manual_seed(1)
    deeper = _hadamard_signs(quantize_(robuq.DiT(tiny_config(depth=3)), config, initialize=False))
    assert len(deeper) == 12 and all(torch.equal(deeper[n], s) for n, s in full.items())

    only_fc2 = preset("robuq", act_bits=4)
    only_fc2.rules = [r for r in only_fc2.rules if r.role == "fc2"]
    partial = _hadamard_signs(quantize_(robuq.DiT(tiny_config()), only_fc2, initialize=False))
    assert sorted(partial) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert all(torch.equal(partial[n], full[n]) for n in partial)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("bits", [4, 2])
def test_every_preset_runs_forward_and_backward(tiny_dit, name, bits):
    quantize_(tiny_dit, preset(name, act_bits=bits))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 4])
    out = tiny_dit(x, t, y)
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    silent = [n for n, p in tiny_dit.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []


def test_presets_differ_where_the_paper_says():
    bitnet, base, robust = (preset(n, act_bits=3) for n in ("bitnet-v2", "baseline", "robuq"))
    hadamard = {r.role.rsplit(".", 1)[-1]: r.linear.hadamard for r in bitnet.rules}  # "txt.qkv" is a qkv too
    assert hadamard == {"qkv": False, "proj": True, "fc1": False, "fc2": True, "adaln": False}
    assert len({(r.role.rsplit(".", 1)[-1], r.linear.hadamard) for r in bitnet.rules}) == 5
    assert all(r.linear.hadamard and r.linear.lowrank_rank == 16 for r in base.rules if r.role != "adaln")
    assert {r.linear.act_rule for r in robust.rules if r.role != "adaln"} == {"gaussian"}
    assert {r.linear.act_rule for r in base.rules} == {"minmax"}
    assert all(r.linear.weight == "int4" and r.linear.act_bits == 4 for r in robust.rules if r.role == "adaln")


def test_fp_preset_changes_nothing(tiny_dit):
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 4])
    expected = tiny_dit(x, t, y)
    quantize_(tiny_dit, preset("fp"))
    assert _count(tiny_dit, QuantLinear) == 0 and torch.equal(tiny_dit(x, t, y), expected)


def test_plan_sets_per_layer_bits(tiny_dit):
    plan = {"blocks.0.attn.qkv": 1, "blocks.1.mlp.fc2": 3}
    quantize_(tiny_dit, preset("robuq", act_bits=2), plan=plan)
    bits = current_plan(tiny_dit)
    assert bits["blocks.0.attn.qkv"] == 1 and bits["blocks.1.mlp.fc2"] == 3 and bits["blocks.0.mlp.fc1"] == 2


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"blocks.0.attn.qvk": 2}, "not a quantized linear"),
        ({"blocks.9.attn.qkv": 2}, "not a quantized linear"),
        ({"blocks.0.attn.qkv": 0}, "from 1 to 8"),
        ({"blocks.0.attn.qkv": 9}, "from 1 to 8"),
        ({"blocks.0.attn.qkv": 2.5}, "must be an integer"),
        ({"blocks.0.attn.qkv": "2"}, "must be an integer"),
        ({"blocks.0.attn.qkv": True}, "must be an integer"),
        ([("blocks.0.attn.qkv", 2)], "must map module names"),
    ],
)
def test_bad_plans_fail_clearly(tiny_dit, plan, message):
    with pytest.raises(PlanError, match=message):
        quantize_(tiny_dit, preset("robuq", act_bits=2), plan=plan)


def test_plan_file_round_trip(tmp_path, tiny_dit):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"bits": {"blocks.1.attn.proj": 4}, "budget": 2}))
    config = preset("robuq", act_bits=2, plan=path)
    quantize_(tiny_dit, config)
    assert current_plan(tiny_dit)["blocks.1.attn.proj"] == 4
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "bad.json")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_serialises(tmp_path, suffix):
    config = preset("baseline", act_bits=3, plan={"blocks.0.mlp.fc1": 2})
    loaded = QuantConfig.load(config.save(tmp_path / f"policy{suffix}"))
    assert loaded == config
    with pytest.raises(ValueError, match="unknown quantization policy fields"):
        QuantConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="robuq"):
        preset("robuQ")


def test_save_and_load_quantized_model(tmp_path, tiny_dit):
    config = preset("robuq", act_bits=3)
    quantize_(tiny_dit, config, plan={"blocks.1.mlp.fc1": 1})
    path = save_quantized(tiny_dit, tmp_path / "q.safetensors", config)
    loaded, loaded_config = load_quantized(path)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 4])
    assert torch.equal(loaded.eval()(x, t, y), tiny_dit.eval()(x, t, y))
    assert loaded_config == config and current_plan(loaded)["blocks.1.mlp.fc1"] == 1
    with pytest.raises(robuq.CheckpointError, match="load_quantized"):
        robuq.load_dit(path)
    with pytest.raises(robuq.CheckpointError, match="not a quantized"):
        fp = robuq.DiT(tiny_config())
        load_quantized(
            robuq.core.files.save_tensors(
                tmp_path / "fp.safetensors", fp.state_dict(), {"model_config": fp.config.to_dict()}
            )
        )


def test_cost_summary_counts_bits_and_bops():
    model = robuq.create_dit("DiT-S/2", input_size=32)
    fp = cost_summary(model)
    assert fp.bops == fp.fp_bops and fp.to_dict()["compression"] == 1.0
    quantize_(model, preset("robuq", act_bits=4), initialize=False)
    a4 = cost_summary(model)
    rows = {m.name: m for m in a4.modules}
    qkv = rows["blocks.0.attn.qkv"]
    assert qkv.weight_bits == pytest.approx(1.585, abs=1e-3) and qkv.act_bits == 4
    assert qkv.macs == 256 * 384 * 1152
    assert rows["blocks.0.attn.core"].act_bits == 8 and rows["final_layer.linear"].weight_bits == 32
    assert a4.fp_bops == fp.bops  # the reference excludes the branches quantization adds
    for layer in model.modules():
        if isinstance(layer, QuantLinear) and layer.rank:
            layer.set_act_bits(2)
    assert cost_summary(model).bops < a4.bops < fp.bops
    assert "fewer than the fp32 model" in a4.format(per_module=False)


def test_every_preset_trains_on_the_shipped_teacher():
    from robuq.core.runtime import DEFAULT_TEACHER

    if not DEFAULT_TEACHER.is_file():
        pytest.skip("the shipped teacher is not in this checkout")
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([5, 250, 600, 990]), torch.tensor([0, 3, 7, 9])
    for name in PRESETS:
        model = quantize_(robuq.load_dit(DEFAULT_TEACHER), preset(name, act_bits=2))
        out = model(x, t, y)
        assert torch.isfinite(out).all(), name
        out.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name


def test_full_precision_inputs_survive_save_and_load(tmp_path, tiny_dit):
    config = preset("robuq", act_bits=3)
    quantize_(tiny_dit, config, plan={"blocks.0.attn.qkv": None})
    loaded, _ = load_quantized(save_quantized(tiny_dit, tmp_path / "q.safetensors", config))
    assert current_plan(loaded)["blocks.0.attn.qkv"] is None and current_plan(loaded)["blocks.0.mlp.fc1"] == 3
