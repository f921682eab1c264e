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
    base = dict(
        model="DiT-T/4",
        input_size=28,
        data_dir=str(data_dir),
        steps=4,
        global_batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        log_every=1,
        ckpt_every=2,
        out_dir=str(out_dir),
        device="cpu",
        seed=3,
    )
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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "robuq.cli",
        "train",
        "--model",
        "DiT-T/4",
        "--input-size",
        "28",
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
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_dit(out / "model.safetensors")
    assert model.config.hidden_size == 192
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # only rank 0 writes


NAN_ON_RANK_1 = """
import sys
import torch
from torch.utils.data import TensorDataset
from robuq.models.dit import DiT, DiTConfig
from robuq.train.trainer import LoopConfig, TrainingDivergedError, train_loop

def objective(model, x, y, generator):
    loss = model(x, torch.zeros(len(x), dtype=torch.long), y).pow(2).flatten(1).mean(dim=1)
    rank = torch.distributed.get_rank()
    return {"loss": loss * (float("nan") if rank == 1 else 1.0)}

model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=1, num_heads=2, num_classes=4))
data = TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
config = LoopConfig(steps=2, global_batch_size=4, out_dir=sys.argv[1], device="cpu", dist_timeout_hours=0.05)
try:
    train_loop(config, model, objective, data, progress=False)
except TrainingDivergedError as exc:
    print(f"rank {torch.distributed.get_rank() if torch.distributed.is_initialized() else '?'}: {exc}", flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's loss is NaN: both ranks stop at step 0 with a message (rank 0 used to wait in the backward
    all-reduce until the watchdog)."""
    script = tmp_path / "nan_rank.py"
    script.write_text(NAN_ON_RANK_1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path / "out"),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode != 0
    assert "non-finite loss (nan) at step 0 on rank 1" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "non-finite loss on another rank at step 0" in result.stdout, result.stdout + result.stderr[-2000:]


def test_ema_update_is_the_per_tensor_formula_bit_for_bit():
    import copy

    from conftest import tiny_config
    from robuq.models.dit import DiT
    from robuq.train.trainer import update_ema

    torch.manual_seed(0)
    model = DiT(tiny_config())
    model.pos_embed.requires_grad_(False)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    expected = copy.deepcopy(ema)
    with torch.no_grad():
        for e, p in zip(expected.parameters(), model.parameters()):
            if p.requires_grad:
                e.mul_(0.999).add_(p, alpha=1 - 0.999)
            else:
                e.copy_(p)
    update_ema(ema, model, 0.999)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), expected.parameters()))
    assert torch.equal(ema.pos_embed, model.pos_embed)  # frozen: copied, not averaged
