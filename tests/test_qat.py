import importlib
import json
import os
import subprocess

import pytest
import torch

from robuq.core.files import load_tensors, save_tensors
from robuq.models.checkpoint import load_dit
from robuq.precision import current_plan
from robuq.io.quantized import load_quantized
from robuq.train.qat import QATConfig, build_student, qat
from robuq.train.state import list_checkpoints
from robuq.train.trainer import TrainingDivergedError
from conftest import robuq_under_torchrun


@pytest.fixture
def teacher_file(tmp_path, tiny_dit):
    return str(
        save_tensors(
            tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
        )
    )


def qat_config(out, teacher, data_dir, **overrides):
    base = dict(
        teacher=teacher,
        data_dir=str(data_dir),
        out_dir=str(out),
        steps=4,
        global_batch_size=8,
        log_every=1,
        ckpt_every=2,
        probe_every=2,
        probe_images=8,
        act_bits=3,
        warmup_steps=1,
        device="cpu",
    )
    base.update(overrides)
    return QATConfig(**base)


@pytest.mark.parametrize("loss", ["diffusion", "distill", "mix"])
def test_qat_trains_and_writes_a_loadable_quantized_model(tmp_path, teacher_file, fmnist_dir, loss):
    out = qat(qat_config(tmp_path / loss, teacher_file, fmnist_dir, loss=loss), progress=False)
    model, config = load_quantized(out / "model.safetensors")
    assert config.name == "robuq-a3" and set(current_plan(model).values()) >= {3}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all("probe_rel_mse" in r for r in log if r["step"] in (2, 4))
    assert ("distill" in log[0]) == (loss != "diffusion")


def test_qat_resume_is_exact(tmp_path, teacher_file, fmnist_dir):
    straight = qat(qat_config(tmp_path / "straight", teacher_file, fmnist_dir), progress=False)
    qat(qat_config(tmp_path / "split", teacher_file, fmnist_dir), until=2, progress=False)
    split = qat(qat_config(tmp_path / "split", teacher_file, fmnist_dir), resume=True, progress=False)
    a, _ = load_tensors(straight / "model.safetensors")
    b, _ = load_tensors(split / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_qat_with_plan_and_frozen_fp_parts(tmp_path, teacher_file, fmnist_dir):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"bits": {"blocks.0.attn.qkv": 1, "blocks.1.mlp.fc2": 2}}))
    config = qat_config(tmp_path / "plan", teacher_file, fmnist_dir, plan=str(plan), freeze_fp=True)
    out = qat(config, progress=False)
    model, _ = load_quantized(out / "model.safetensors")
    assert current_plan(model)["blocks.0.attn.qkv"] == 1 and current_plan(model)["blocks.1.mlp.fc2"] == 2
    teacher, _ = load_tensors(teacher_file)
    trained, _ = load_tensors(out / "model.safetensors")
    assert torch.equal(trained["x_embedder.proj.weight"], teacher["x_embedder.proj.weight"])  # frozen
    torch.manual_seed(config.seed)
    start = build_student(load_dit(teacher_file), config.quantization(), freeze_fp=True).state_dict()
    assert not torch.equal(trained["blocks.0.mlp.fc1.weight"], start["blocks.0.mlp.fc1.weight"])  # trained
    assert torch.equal(trained["final_layer.linear.weight"], start["final_layer.linear.weight"])  # frozen


def test_non_finite_teacher_stops_qat_and_keeps_the_checkpoint(tmp_path, teacher_file, fmnist_dir, tiny_dit):
    config = qat_config(tmp_path / "nan", teacher_file, fmnist_dir, loss="distill")
    qat(config, until=2, progress=False)
    poisoned = {k: v.clone() for k, v in tiny_dit.state_dict().items()}
    poisoned["final_layer.linear.bias"][0] = float("nan")
    save_tensors(teacher_file, poisoned, {"model_config": tiny_dit.config.to_dict()})
    with pytest.raises(TrainingDivergedError, match="step 2"):
        qat(config, resume=True, progress=False)
    step, path = list_checkpoints(tmp_path / "nan")[-1]
    assert step == 2 and load_quantized(path)[0] is not None


@pytest.mark.slow
def test_torchrun_two_process_qat(tmp_path, teacher_file, fmnist_dir):
    out = tmp_path / "ddp"
    cmd = [
        *robuq_under_torchrun(2),
        "qat",
        "--teacher",
        teacher_file,
        "--data-dir",
        str(fmnist_dir),
        "--steps",
        "3",
        "--global-batch-size",
        "8",
        "--ckpt-every",
        "3",
        "--log-every",
        "1",
        "--probe-every",
        "3",
        "--probe-images",
        "4",
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
    model, _ = load_quantized(out / "model.safetensors")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "probe_rel_mse" in log[-1]


def test_resume_refuses_a_changed_bit_plan(tmp_path, teacher_file, fmnist_dir):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks.0.attn.qkv": 2}))
    qat(qat_config(tmp_path / "p", teacher_file, fmnist_dir, plan=str(plan)), until=2, progress=False)
    plan.write_text(json.dumps({"blocks.0.attn.qkv": 1}))  # same path, different content
    with pytest.raises(ValueError, match="plan"):
        qat(qat_config(tmp_path / "p", teacher_file, fmnist_dir, plan=str(plan)), resume=True, progress=False)


def test_every_full_precision_parameter_but_the_positional_embedding_trains_unless_frozen(tiny_dit):
    teacher = tiny_dit.eval().requires_grad_(False)  # as qat() holds its teacher
    config = QATConfig(act_bits=3)
    student = build_student(teacher, config.quantization())
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed"}
    assert {
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
    } <= {n for n, p in student.named_parameters() if p.requires_grad}
    kept = build_student(teacher, config.quantization(), freeze_fp=True)
    trainable = {n for n, p in kept.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("blocks.") for n in trainable)


def test_qat_trains_the_full_precision_layers(tmp_path, teacher_file, fmnist_dir):
    out = qat(qat_config(tmp_path / "fp", teacher_file, fmnist_dir, lr=1e-2), progress=False)
    teacher, _ = load_tensors(teacher_file)
    trained, _ = load_tensors(out / "model.safetensors")
    for name in ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight"):
        assert not torch.equal(trained[name], teacher[name]), name
    assert torch.equal(trained["pos_embed"], teacher["pos_embed"])


def test_ternary_latent_weights_get_their_own_learning_rate(tmp_path, teacher_file, fmnist_dir):
    from robuq.core.files import read_meta
    from robuq.train.trainer import learning_rate

    config = qat_config(tmp_path / "lr", teacher_file, fmnist_dir, ternary_lr_scale=5.0, lr_schedule="constant")
    out = qat(config, progress=False)
    groups = read_meta(list_checkpoints(out)[-1][1])["optimizer"]["param_groups"]
    by_scale = {g["lr_scale"]: g for g in groups}
    assert set(by_scale) == {1.0, 5.0}
    assert by_scale[5.0]["lr"] == pytest.approx(5 * learning_rate(config, config.steps - 1))
    assert by_scale[1.0]["lr"] == pytest.approx(learning_rate(config, config.steps - 1))
    student = build_student(load_dit(teacher_file), config.quantization())
    ternary = sum(
        1
        for n, _ in student.named_parameters()
        if n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")) and n.startswith("blocks.")
    )
    assert len(by_scale[5.0]["params"]) == ternary


def test_continuing_another_run_is_the_same_schedule(tmp_path, teacher_file, fmnist_dir):
    straight = qat(qat_config(tmp_path / "straight", teacher_file, fmnist_dir), progress=False)
    first = qat(qat_config(tmp_path / "first", teacher_file, fmnist_dir), until=2, progress=False)
    ckpt = list_checkpoints(first)[-1][1]
    second = qat(qat_config(tmp_path / "second", teacher_file, fmnist_dir, continue_from=str(ckpt)), progress=False)
    a, _ = load_tensors(straight / "model.safetensors")
    b, _ = load_tensors(second / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line)["step"] for line in (second / "log.jsonl").read_text().splitlines()]
    assert log == [3, 4]


def test_continuing_with_other_bits_works_and_another_schedule_is_refused(tmp_path, teacher_file, fmnist_dir):
    first = qat(qat_config(tmp_path / "first", teacher_file, fmnist_dir, act_bits=4), until=2, progress=False)
    ckpt = str(list_checkpoints(first)[-1][1])
    out = qat(qat_config(tmp_path / "a2", teacher_file, fmnist_dir, act_bits=2, continue_from=ckpt), progress=False)
    model, _ = load_quantized(out / "model.safetensors")
    assert {b for n, b in current_plan(model).items() if "adaLN" not in n} == {2}
    with pytest.raises(ValueError, match="cannot continue.*lr"):
        qat(qat_config(tmp_path / "lr", teacher_file, fmnist_dir, continue_from=ckpt, lr=1e-3), progress=False)


def test_the_probe_scores_the_ema_on_held_out_images_and_both_branches(tmp_path, teacher_file, fmnist_dir):
    from robuq.core.files import read_meta

    out = qat(qat_config(tmp_path / "probe", teacher_file, fmnist_dir), progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = log[-1]
    assert last["probe_rel_mse"] > 0 and last["probe_guided_rel_mse"] > 0
    assert read_meta(out / "model.safetensors")["probe_images_from"] == "fashion-mnist test split"


def test_a_student_whose_weights_are_replaced_skips_the_svd(tmp_path, teacher_file, fmnist_dir, monkeypatch):
    first = qat(qat_config(tmp_path / "first", teacher_file, fmnist_dir), until=2, progress=False)
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    qat(qat_config(tmp_path / "first", teacher_file, fmnist_dir), resume=True, progress=False)
    ckpt = str(list_checkpoints(first)[0][1])
    qat(qat_config(tmp_path / "second", teacher_file, fmnist_dir, continue_from=ckpt), progress=False)
    assert calls == []
    qat(qat_config(tmp_path / "fresh", teacher_file, fmnist_dir), until=1, progress=False)
    assert len(calls) == 8  # 2 blocks × 4 linears with a low-rank branch


def test_the_probe_is_built_only_where_it_runs(tmp_path, teacher_file, fmnist_dir, monkeypatch):
    """The probe's batch (the teacher's outputs on it) is made at its first use: a run that never probes (every
    process but the main one, unsharded) pays nothing for it."""
    qat_module = importlib.import_module("robuq.train.qat")

    built = []
    real = qat_module.teacher_probe
    monkeypatch.setattr(qat_module, "teacher_probe", lambda *a, **k: built.append(1) or real(*a, **k))
    qat(qat_config(tmp_path / "never", teacher_file, fmnist_dir, steps=2, probe_every=0), progress=False)
    assert built == []
    qat(qat_config(tmp_path / "probed", teacher_file, fmnist_dir, steps=4, probe_every=2), progress=False)
    assert built == [1]  # once, however many probes
