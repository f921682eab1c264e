import json
from dataclasses import replace

import pytest
import torch

from robuq.ampn.pipeline import AMPNConfig, ampn_run
from robuq.ampn.plan_files import plan_from_sensitivity, role_averages, write_plan
from robuq.ampn.sensitivity import Sensitivity, block_layers, measure_sensitivity
from robuq.train.calibration import calibration_batch
from robuq.cli import main
from robuq.core.files import save_tensors
from robuq.precision import BitPlan, current_plan, load_plan, preset, quantize_
from robuq.io.quantized import load_quantized
from robuq.train.qat import QATConfig, build_student
from conftest import robuq_under_torchrun


@pytest.fixture
def student_and_batch(tiny_dit):
    torch.manual_seed(0)
    with torch.no_grad():  # open the adaLN-Zero gates wide, so quantization error is not lost in rounding
        for p in tiny_dit.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    images = torch.rand(12, 1, 8, 8) * 2 - 1
    labels = torch.arange(12) % 10
    batch = calibration_batch(tiny_dit, images, labels, seed=0)
    return build_student(tiny_dit, preset("robuq", act_bits=4)), batch


def test_sensitivity_covers_block_linears_and_leaves_no_change(student_and_batch):
    student, batch = student_and_batch
    result = measure_sensitivity(student, batch, progress=False)
    assert list(result.table) == block_layers(student) and len(result.table) == 8  # 2 blocks × 4 linears
    for name, row in result.table.items():
        assert sorted(row) == [1, 2, 3, 4], (name, row)
        assert abs(row[4]) < 1e-9  # the model already runs at 4 bits
    assert set(current_plan(student).values()) == {4}  # measured without leaving changes behind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fewer_bits_cost_more_when_activations_are_the_only_error(tiny_dit, seed):
    """With full-precision weights, adaLN and attention, a block linear's input bits are the model's only
    error, so every layer's sensitivity falls with its bits: s(1) > s(2) > s(4) = 0. This holds whatever
    weights and sign flips are drawn (20 draws when written, s(1)/s(2) ≥ 1.39). With ternary weights the
    tiny model's sensitivities lie within the noise of its weight error and their order is the draw's."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tiny_dit.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    config = preset("robuq", act_bits=4, attention_bits=None, adaln="fp", adaln_act_bits=None)
    for rule in config.rules:
        if rule.role != "adaln":
            rule.linear = replace(rule.linear, weight="fp", lowrank_rank=0)
    student = build_student(tiny_dit, config)
    batch = calibration_batch(tiny_dit, torch.rand(12, 1, 8, 8) * 2 - 1, torch.arange(12) % 10, seed=seed)
    result = measure_sensitivity(student, batch, progress=False)
    assert result.baseline_error > 0
    for name, row in result.table.items():
        assert row[1] > row[2] > 0 and abs(row[4]) < 1e-9, (name, row)
    totals = [sum(row[b] for row in result.table.values()) for b in (1, 2, 3, 4)]
    assert totals[0] > totals[1] > totals[2] > totals[3], totals


@pytest.mark.parametrize("chunk", [64, 5])
def test_sensitivity_is_deterministic_and_matches_a_full_forward(student_and_batch, chunk):
    student, batch = student_and_batch
    first = measure_sensitivity(student, batch, progress=False, metric="error-increase", chunk=chunk)
    assert (
        first.table == measure_sensitivity(student, batch, progress=False, metric="error-increase", chunk=chunk).table
    )
    moved = measure_sensitivity(student, batch, progress=False, chunk=chunk)
    # The cached-prefix shortcut must equal a plain full forward with that one layer changed.
    from robuq.train.calibration import batch_output, relative_error

    name = "blocks.1.attn.proj"
    as_is = batch_output(student, batch)
    student.get_submodule(name).set_act_bits(2)
    full = relative_error(student, batch)
    changed = batch_output(student, batch)
    student.get_submodule(name).set_act_bits(4)
    assert first.table[name][2] == pytest.approx(full - first.baseline_error, rel=1e-4, abs=1e-9)
    perturbation = float((changed - as_is).pow(2).mean() / batch.target.var())
    assert moved.table[name][2] == pytest.approx(perturbation, rel=1e-4, abs=1e-9)
    assert moved.baseline_error == pytest.approx(first.baseline_error) and moved.metric == "perturbation"


@pytest.mark.slow
def test_sensitivities_of_the_shipped_teacher_rank_alike_and_fall_with_bits():
    """On the shipped teacher quantized to W1.58A4 (the warm-up's bits), the perturbation metric gives the same
    ranking of layers from two calibration draws, and more bits score worse in at most 10 % of (layer, bits)
    pairs (the error-increase metric: a quarter of them, when written)."""
    from scipy.stats import spearmanr

    from robuq.core.runtime import default_teacher_path
    from robuq.data import FashionMNIST
    from robuq.models.checkpoint import load_dit
    from robuq.train.qat import calibration_images

    teacher = load_dit(default_teacher_path()).eval()
    student = build_student(teacher, preset("robuq", act_bits=4))
    images, labels = calibration_images(FashionMNIST("train", 28), 32, True)
    runs = [
        measure_sensitivity(student, calibration_batch(teacher, images, labels, seed, with_null=True), progress=False)
        for seed in (0, 1)
    ]
    names = list(runs[0].table)
    for bits in (1, 2, 3):
        rho = spearmanr([runs[0].table[n][bits] for n in names], [runs[1].table[n][bits] for n in names]).statistic
        assert rho >= 0.7, (bits, rho)
    worse = sum(run.table[n][b + 1] > run.table[n][b] for run in runs for n in names for b in (1, 2, 3))
    assert worse <= 0.1 * 2 * 3 * len(names), worse


def test_plan_round_trip_and_figure(tmp_path, student_and_batch, tiny_dit):
    student, batch = student_and_batch
    sensitivity = Sensitivity.from_dict(
        json.loads(json.dumps(measure_sensitivity(student, batch, progress=False).to_dict()))
    )
    for weighting in ("plain", "macs"):
        plan = plan_from_sensitivity(sensitivity, 2.5, weighting)
        assert (plan.average_plain if weighting == "plain" else plan.average_macs) <= 2.5 + 1e-9
        path = write_plan(plan, tmp_path / f"plan-{weighting}.json")
        assert path.with_suffix(".png").stat().st_size > 0
        assert BitPlan.load(path) == plan  # the typed plan survives its file
        model = quantize_(tiny_dit.__class__(tiny_dit.config), preset("robuq", act_bits=4), plan=load_plan(path))
        assert {n: b for n, b in current_plan(model).items() if n in plan.bits} == plan.bits
        assert set(role_averages(plan.bits)) == {"qkv", "proj", "fc1", "fc2"}


def test_cli_allocate(tmp_path, student_and_batch, capsys):
    student, batch = student_and_batch
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps(measure_sensitivity(student, batch, progress=False).to_dict()))
    assert (
        main(
            [
                "ampn",
                "allocate",
                "--sensitivity",
                str(sens),
                "--budget",
                "2",
                "--weighting",
                "macs",
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "MAC-weighted" in out and "fc2" in out
    assert main(["ampn", "allocate", "--sensitivity", str(sens), "--budget", "0.5"]) == 2
    assert "below the smallest choice" in capsys.readouterr().err


def test_ampn_run_end_to_end(tmp_path, tiny_dit, fmnist_dir):
    teacher = str(
        save_tensors(
            tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
        )
    )
    config = QATConfig(
        teacher=teacher,
        data_dir=str(fmnist_dir),
        out_dir=str(tmp_path / "ampn"),
        steps=4,
        global_batch_size=8,
        log_every=1,
        ckpt_every=2,
        probe_every=2,
        probe_images=4,
        warmup_steps=1,
        device="cpu",
    )
    final = ampn_run(AMPNConfig(qat=config, budget=2.0, warmup_qat_steps=2, calibration_images=8), progress=False)
    plan = json.loads((tmp_path / "ampn" / "plan.json").read_text())
    assert plan["average_plain"] <= 2.0 and (tmp_path / "ampn" / "plan.png").is_file()
    model, _ = load_quantized(final / "model.safetensors")
    assert {n: b for n, b in current_plan(model).items() if n in plan["bits"]} == plan["bits"]
    # One schedule: the warm-up is steps 1-2 at 4 bits, the final run continues at step 3 from its checkpoint.
    warm_log = [
        json.loads(line)["step"] for line in (tmp_path / "ampn" / "warmup" / "log.jsonl").read_text().splitlines()
    ]
    final_log = [json.loads(line)["step"] for line in (final / "log.jsonl").read_text().splitlines()]
    assert warm_log == [1, 2] and final_log == [3, 4]
    assert json.loads((final / "config.json").read_text())["continue_from"].endswith(
        "warmup/checkpoints/step-0000002.safetensors"
    )
    warm, _ = load_quantized(tmp_path / "ampn" / "warmup" / "checkpoints" / "step-0000002.safetensors")
    assert {b for n, b in current_plan(warm).items() if n in plan["bits"]} == {4}
    # The sensitivities are measured under the training's precision: bf16 autocast moves them, a little.
    from robuq.ampn.pipeline import SensitivityConfig, sensitivity_of

    def measured(precision: str) -> dict:
        config = SensitivityConfig(
            model=str(tmp_path / "ampn" / "warmup" / "checkpoints" / "step-0000002.safetensors"),
            teacher=teacher,
            data_dir=str(fmnist_dir),
            calibration_images=8,
            precision=precision,
            device="cpu",
        )
        return sensitivity_of(config, progress=False).table

    fp32, bf16 = measured("fp32"), measured("bf16")
    assert fp32.keys() == bf16.keys()
    moved = [abs(bf16[n][b] - fp32[n][b]) for n in fp32 for b in fp32[n] if fp32[n][b]]
    assert max(moved) > 0 and all(v >= 0 for row in bf16.values() for v in row.values())
    # A second call finds every stage done and changes nothing.
    before = (final / "model.safetensors").stat().st_mtime_ns
    ampn_run(AMPNConfig(qat=config, budget=2.0, warmup_qat_steps=2, calibration_images=8), progress=False)
    assert (final / "model.safetensors").stat().st_mtime_ns == before


def test_ampn_run_stops_where_asked_and_refuses_a_warmup_outside_the_schedule(tmp_path, tiny_dit, fmnist_dir):
    teacher = str(
        save_tensors(
            tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
        )
    )
    config = QATConfig(
        teacher=teacher,
        data_dir=str(fmnist_dir),
        out_dir=str(tmp_path / "ampn"),
        steps=6,
        global_batch_size=8,
        log_every=1,
        ckpt_every=1,
        probe_every=0,
        warmup_steps=1,
        device="cpu",
    )
    final = ampn_run(
        AMPNConfig(qat=config, budget=2.0, warmup_qat_steps=2, calibration_images=8), progress=False, until=4
    )
    assert [json.loads(line)["step"] for line in (final / "log.jsonl").read_text().splitlines()] == [3, 4]
    assert not (final / "model.safetensors").exists()
    with pytest.raises(ValueError, match="inside the schedule"):
        ampn_run(AMPNConfig(qat=config, budget=2.0, warmup_qat_steps=6), progress=False)


@pytest.mark.slow
def test_ampn_run_under_torchrun_uses_one_process_group(tmp_path, tiny_dit, fmnist_dir):
    """Two processes with gloo: the warm-up, the sensitivities (each process half of the layers), the plan and
    the final stage in one group (it hung after the plan when each QAT stage made and destroyed a group of its
    own)."""
    import os
    import subprocess

    teacher = str(
        save_tensors(
            tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
        )
    )
    out = tmp_path / "a"
    cmd = [
        *robuq_under_torchrun(2),
        "ampn",
        "run",
        "--teacher",
        teacher,
        "--data-dir",
        str(fmnist_dir),
        "--budget",
        "3",
        "--warmup-qat-steps",
        "2",
        "--steps",
        "4",
        "--global-batch-size",
        "4",
        "--calibration-images",
        "8",
        "--probe-images",
        "8",
        "--ckpt-every",
        "2",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        "--no-progress",
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("budget 3.0 bits") == 1  # the plan printed once, by rank 0
    model, _ = load_quantized(out / "final" / "model.safetensors")
    plan = json.loads((out / "plan.json").read_text())["bits"]
    assert {n: b for n, b in current_plan(model).items() if n in plan} == plan
    # Each process measured half of the layers; joined, they are what one process measures.
    halves = [json.loads((out / f"sensitivity-part-{k}-of-2.json").read_text())["layers"] for k in (0, 1)]
    assert halves[0] and halves[1] and not set(halves[0]) & set(halves[1])
    from robuq.ampn.pipeline import SensitivityConfig, sensitivity_of

    alone = sensitivity_of(
        SensitivityConfig(
            model=str(out / "warmup" / "checkpoints" / "step-0000002.safetensors"),
            teacher=teacher,
            data_dir=str(fmnist_dir),
            calibration_images=8,
            device="cpu",
        ),
        progress=False,
    ).to_dict()
    joined = json.loads((out / "sensitivity.json").read_text())
    assert joined["layers"].keys() == alone["layers"].keys()
    for name, row in alone["layers"].items():
        for bits, value in row.items():
            assert joined["layers"][name][bits] == pytest.approx(value, rel=1e-5, abs=1e-9), (name, bits)
