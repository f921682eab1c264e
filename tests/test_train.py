import json
import os
import subprocess
import sys

import pytest
import torch

from robuq.core.files import load_tensors
from robuq.models.checkpoint import load_dit
from robuq.models.dit import create_dit
from robuq.train.state import list_checkpoints
from robuq.train.trainer import TrainConfig, TrainingDivergedError, learning_rate, train


def small_config(out_dir, data_dir, **overrides) -> TrainConfig:
    base = dict(model="DiT-T/4", input_size=28, data_dir=str(data_dir), steps=4, global_batch_size=8,
                lr=1e-3, warmup_steps=2, log_every=1, ckpt_every=2, out_dir=str(out_dir), device="cpu", seed=3)
    base.update(overrides)
    return TrainConfig(**base)


def final_state(out_dir):
    step, path = list_checkpoints(out_dir)[-1]
    tensors, meta = load_tensors(path)
    return step, tensors


def test_resume_is_exact(tmp_path, fmnist_dir):
    train(small_config(tmp_path / "straight", fmnist_dir), progress=False)
    train(small_config(tmp_path / "split", fmnist_dir), until=2, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [2]
    assert not (tmp_path / "split" / "model.safetensors").exists()  # not finished yet
    train(small_config(tmp_path / "split", fmnist_dir), resume=True, progress=False)

    step_a, a = final_state(tmp_path / "straight")
    step_b, b = final_state(tmp_path / "split")
    assert step_a == step_b == 4 and a.keys() == b.keys()
    assert any(k.startswith("optim.") for k in a) and any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The weights moved: the test would be vacuous otherwise.
    first = load_dit(tmp_path / "straight" / "model.safetensors")
    assert first.blocks[0].adaLN_modulation[1].weight.abs().sum() > 0
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path, fmnist_dir):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small_config(tmp_path / "none", fmnist_dir), resume=True, progress=False)
    train(small_config(tmp_path / "r", fmnist_dir), until=2, progress=False)
    with pytest.raises(ValueError, match="lr: checkpoint 0.001 vs now 0.002"):
        train(small_config(tmp_path / "r", fmnist_dir, lr=2e-3), resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, fmnist_dir):
    config = small_config(tmp_path / "nan", fmnist_dir)
    train(config, until=2, progress=False)
    calls = {"n": 0}

    def poisoned(model, x, y, generator):
        calls["n"] += 1
        return {"loss": torch.full((x.shape[0],), float("nan"), requires_grad=True)}

    with pytest.raises(TrainingDivergedError, match="step 2"):
        train(config, resume=True, objective=poisoned, progress=False)
    assert calls["n"] == 2  # the failing step, then one re-run that looks for the module to blame
    assert load_dit(list_checkpoints(tmp_path / "nan")[-1][1]).config.hidden_size == 192


def test_non_finite_error_names_the_module(tmp_path, fmnist_dir):
    config = small_config(tmp_path / "blame", fmnist_dir)
    torch.manual_seed(0)
    model = create_dit(config.model, input_size=config.input_size, num_classes=10, in_channels=1)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 5] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"step 0, first in module 'blocks\.1\.mlp\.fc1'"):
        train(config, model=model, progress=False)


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=1e-3)
    assert learning_rate(TrainConfig(lr_schedule="constant", warmup_steps=0, lr=0.5), 50) == 0.5


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path, fmnist_dir):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "robuq.cli",
           "train", "--model", "DiT-T/4", "--input-size", "28", "--data-dir", str(fmnist_dir), "--steps", "3",
           "--global-batch-size", "8", "--ckpt-every", "3", "--log-every", "1", "--device", "cpu",
           "--out-dir", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_dit(out / "model.safetensors")
    assert model.config.hidden_size == 192
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # only rank 0 writes
