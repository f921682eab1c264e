"""Every robuq verb on a diffusers DiTTransformer2DModel: cost, save/load, export with the integer path,
AMPN sensitivity and allocation, and QAT from a save_pretrained folder."""

import json

import pytest
import torch

from conftest import run_diffusers, tiny_diffusers_dit
from robuq.ampn.plan_files import plan_from_sensitivity, role_averages
from robuq.ampn.sensitivity import block_index, block_layers, layer_role, measure_sensitivity
from robuq.cli.main import main
from robuq.deploy.export import export_model, file_report, load_exported
from robuq.deploy.integer_linear import IntegerLinear
from robuq.io.quantized import load_quantized, save_quantized
from robuq.models.checkpoint import load_dit
from robuq.precision import cost_summary, current_plan, preset, quantize_
from robuq.train.calibration import calibration_batch

pytest.importorskip("diffusers")


@pytest.fixture
def quantized():
    model = tiny_diffusers_dit()
    config = preset("robuq", act_bits=4)
    return quantize_(model, config).eval(), config


def test_cost_summary_counts_every_matmul(quantized):
    fp = cost_summary(tiny_diffusers_dit())
    model, _ = quantized
    cost = cost_summary(model)
    attention = [m for m in cost.modules if m.kind in ("Attention", "QuantAttentionCore")]
    assert [m.kind for m in attention] == ["QuantAttentionCore"] * 2
    assert [m.kind for m in fp.modules if m.kind == "Attention"] == ["Attention"] * 2
    assert sum(m.macs for m in fp.modules if m.kind == "Attention") == sum(m.macs for m in attention)
    assert sum(m.kind == "QuantLinear" for m in cost.modules) == 14
    assert cost.bops < fp.bops and cost.weight_storage_bits < fp.weight_storage_bits


def test_save_and_load_quantized_round_trip(tmp_path, quantized):
    model, config = quantized
    model.get_submodule("transformer_blocks.1.ff.net.2").set_act_bits(3)
    path = save_quantized(model, tmp_path / "q.safetensors", config)
    loaded, loaded_config = load_quantized(path)
    assert type(loaded).__name__ == "DiTTransformer2DModel" and loaded_config.to_dict() == config.to_dict()
    assert current_plan(loaded) == current_plan(model)
    with torch.no_grad():
        assert torch.equal(run_diffusers(loaded.eval()), run_diffusers(model))


def test_export_and_integer_inference(tmp_path, quantized):
    model, config = quantized
    path = export_model(model, config, tmp_path / "e.safetensors", dtype="fp32")
    integer = load_exported(path)
    assert type(integer).__name__ == "DiTTransformer2DModel"
    assert sum(isinstance(m, IntegerLinear) for m in integer.modules()) == 14
    with torch.no_grad():
        reference = run_diffusers(model)
        got = run_diffusers(integer)
        # end to end, the C Hadamard's rounding (not PyTorch's) may flip a few low-bit levels downstream; a
        # wrong layer would be far off (each layer is held to float rounding in test_deploy_export)
        assert ((got - reference).norm() / reference.norm()) < 0.01
        assert (got - reference).abs().le(1e-4 + 1e-4 * reference.abs()).float().mean() > 0.9
        assert torch.equal(run_diffusers(load_exported(path, integer=False)), reference)
    assert file_report(path)["params"] == sum(p.numel() for p in tiny_diffusers_dit().parameters())


def test_sensitivity_and_allocation_by_layer_role(quantized):
    model, _ = quantized
    teacher = tiny_diffusers_dit()
    g = torch.Generator().manual_seed(0)
    batch = calibration_batch(teacher, torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 3, 5, 9]))
    layers = block_layers(model)
    assert len(layers) == 12 and {layer_role(n) for n in layers} == {"qkv", "proj", "fc1", "fc2"}
    assert [block_index(n) for n in layers] == [0] * 6 + [1] * 6
    sensitivity = measure_sensitivity(model, batch, choices=(2, 4, 8), progress=False)
    assert set(sensitivity.table) == set(layers) and sensitivity.baseline_error > 0
    assert all(row[2] >= row[8] - 1e-3 for row in sensitivity.table.values())  # fewer bits do not help
    plan = plan_from_sensitivity(sensitivity, budget=4.0)
    assert set(plan.bits) == set(layers) and set(role_averages(plan.bits)) == {"qkv", "proj", "fc1", "fc2"}
    quantize_(tiny_diffusers_dit(), preset("robuq"), plan=plan.bits)  # the plan applies to the diffusers model


def test_layer_role_knows_both_layouts():
    assert layer_role("blocks.3.attn.qkv") == layer_role("transformer_blocks.3.attn1.to_v") == "qkv"
    assert layer_role("transformer_blocks.0.ff.net.2") == "fc2"
    with pytest.raises(ValueError, match="not a block linear"):
        layer_role("proj_out_2")


@pytest.mark.slow
def test_qat_teacher_from_a_save_pretrained_folder(tmp_path, fmnist_dir):
    """`robuq qat --teacher FOLDER`: the diffusers teacher is converted exactly to robuq's DiT, which trains."""
    teacher = tiny_diffusers_dit(shared_embedders=True, in_channels=1, out_channels=2)
    teacher.save_pretrained(tmp_path / "teacher")
    converted = load_dit(tmp_path / "teacher").eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 600]), torch.tensor([4, 9])
    with torch.no_grad():
        torch.testing.assert_close(
            converted(x, t, y), teacher(x, timestep=t, class_labels=y).sample, rtol=1e-5, atol=1e-5
        )
    out = tmp_path / "qat"
    assert (
        main(
            [
                "qat",
                "--teacher",
                str(tmp_path / "teacher"),
                "--data-dir",
                str(fmnist_dir),
                "--out-dir",
                str(out),
                "--steps",
                "2",
                "--global-batch-size",
                "8",
                "--probe-images",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    student, _ = load_quantized(out / "model.safetensors")
    assert student.config.timestep_freq_shift == 1.0
    assert json.loads((out / "config.json").read_text())["teacher"] == str(tmp_path / "teacher")
