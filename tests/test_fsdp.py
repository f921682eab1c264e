"""QAT sharded with FSDP2 (``--shard fsdp``) under torchrun with two processes and gloo on the CPU: the same
losses as the unsharded (DDP) run, exact resume, and checkpoints that either kind of run continues."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from robuq.core.files import save_tensors
from robuq.models.checkpoint import read_state_dict
from conftest import robuq_under_torchrun


@pytest.fixture
def teacher_file(tmp_path, tiny_dit):
    return str(
        save_tensors(
            tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
        )
    )


def torchrun_qat(out, teacher, data_dir, *extra: str) -> str:
    cmd = [
        *robuq_under_torchrun(2),
        "qat",
        "--teacher",
        teacher,
        "--data-dir",
        str(data_dir),
        "--steps",
        "4",
        "--global-batch-size",
        "8",
        "--ckpt-every",
        "2",
        "--log-every",
        "1",
        "--probe-every",
        "3",  # not a checkpoint step: the EMA's probe must leave its root unit sharded again
        "--probe-images",
        "4",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        "--no-progress",
        *extra,
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def log_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_fsdp_qat_matches_ddp_and_resumes_exactly(tmp_path, teacher_file, fmnist_dir):
    torchrun_qat(tmp_path / "ddp", teacher_file, fmnist_dir)
    said = torchrun_qat(tmp_path / "fsdp", teacher_file, fmnist_dir, "--shard", "fsdp")
    assert "FSDP2: 3 units sharded over 2 processes, and 3 of frozen modules" in said  # blocks, root; the teacher
    ddp, fsdp = log_of(tmp_path / "ddp"), log_of(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(ddp, fsdp):
        for key in ("loss", "grad_norm", "distill"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert fsdp[-1]["probe_rel_mse"] == pytest.approx(ddp[-1]["probe_rel_mse"], rel=1e-4)
    ddp_weights, _ = read_state_dict(tmp_path / "ddp" / "model.safetensors")
    fsdp_weights, meta = read_state_dict(tmp_path / "fsdp" / "model.safetensors")
    assert ddp_weights.keys() == fsdp_weights.keys() and meta["kind"] == "model"
    for name, value in ddp_weights.items():
        assert torch.allclose(fsdp_weights[name], value, rtol=1e-4, atol=1e-6), name

    # Stopped at step 2 and resumed, sharded: the same computation as the run that never stopped.
    torchrun_qat(tmp_path / "parts", teacher_file, fmnist_dir, "--shard", "fsdp", "--until", "2")
    torchrun_qat(tmp_path / "parts", teacher_file, fmnist_dir, "--shard", "fsdp", "--resume")
    parts, _ = read_state_dict(tmp_path / "parts" / "model.safetensors")
    for name, value in fsdp_weights.items():
        assert torch.equal(parts[name], value), name
    assert [r["loss"] for r in log_of(tmp_path / "parts")] == [r["loss"] for r in fsdp]

    # A sharded run's checkpoint resumes unsharded: checkpoints are whole either way.
    torchrun_qat(tmp_path / "mixed", teacher_file, fmnist_dir, "--shard", "fsdp", "--until", "2")
    torchrun_qat(tmp_path / "mixed", teacher_file, fmnist_dir, "--resume")
    mixed, _ = read_state_dict(tmp_path / "mixed" / "model.safetensors")
    for name, value in ddp_weights.items():
        assert torch.allclose(mixed[name], value, rtol=1e-4, atol=1e-6), name


def test_fsdp_needs_more_than_one_process(tmp_path, teacher_file, fmnist_dir):
    from robuq.core.errors import RobuqError
    from robuq.train.qat import QATConfig, qat

    config = QATConfig(
        teacher=teacher_file,
        data_dir=str(fmnist_dir),
        steps=2,
        global_batch_size=4,
        shard="fsdp",
        device="cpu",
        out_dir=str(tmp_path / "q"),
    )
    with pytest.raises(RobuqError, match="run under torchrun"):
        qat(config, progress=False)
