"""`robuq sample --num-samples`: shards, resumption, VAE decoding, label modes, guided channels, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from robuq.core.files import save_tensors
from robuq.models.dit import DiT
from robuq.sample.at_scale import shard_labels
from robuq.sample.to_files import SampleConfig, sample_to_files

from conftest import perturbed, tiny_config, robuq_under_torchrun
from test_latents import make_vae

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-parts")
    torch.manual_seed(0)
    model = perturbed(DiT(tiny_config(in_channels=4, num_classes=3)), 0.05)
    ckpt = save_tensors(root / "dit.safetensors", model.state_dict(), {"model_config": model.config.to_dict()})
    return str(ckpt), str(make_vae(root / "vae"))


def config(out, parts, **overrides) -> SampleConfig:
    ckpt, vae = parts
    base = dict(ckpt=ckpt, vae=vae, out=str(out), num_samples=7, shard_size=3, steps=3, batch_size=2, device="cpu")
    return SampleConfig(**{**base, **overrides})


@pytest.mark.slow
def test_sharded_sampling_decodes_and_resumes(tmp_path, parts):
    files = sample_to_files(config(tmp_path / "s", parts), progress=False)
    data = np.load(files["npz"])
    assert data["arr_0"].shape == (7, 64, 64, 3) and data["arr_0"].dtype == np.uint8
    assert set(data["labels"].tolist()) <= {0, 1, 2} and files["grid"].is_file()
    shards = sorted((tmp_path / "s" / "shards").glob("shard-*.npz"))
    assert len(shards) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # a run killed before shard 1 was written
    sample_to_files(config(tmp_path / "s", parts), progress=False)
    assert (
        shards[0].stat().st_mtime_ns == stamps[shards[0].name]
        and shards[2].stat().st_mtime_ns == stamps[shards[2].name]
    )
    again = np.load(files["npz"])
    assert np.array_equal(again["arr_0"], data["arr_0"]) and np.array_equal(again["labels"], data["labels"])
    guided3 = np.load(
        sample_to_files(config(tmp_path / "c3", parts, cfg_channels=3, cfg_scale=4.0), progress=False)["npz"]
    )
    guided4 = np.load(sample_to_files(config(tmp_path / "c4", parts, cfg_scale=4.0), progress=False)["npz"])
    assert np.array_equal(guided3["labels"], guided4["labels"]) and not np.array_equal(
        guided3["arr_0"], guided4["arr_0"]
    )


def test_label_modes():
    uniform = torch.cat([shard_labels(10, 95, k, 20, 0, balanced=False) for k in range(5)])
    balanced = torch.cat([shard_labels(10, 95, k, 20, 0, balanced=True) for k in range(5)])
    assert len(uniform) == len(balanced) == 95
    counts = torch.bincount(balanced, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.max() <= 10
    assert shard_labels(0, 95, 0, 20, 0, balanced=False) is None


@pytest.mark.slow
def test_sampling_under_torchrun_equals_one_process(tmp_path, parts):
    ckpt, vae = parts
    args = [
        "sample",
        "--ckpt",
        ckpt,
        "--vae",
        vae,
        "--num-samples",
        "7",
        "--shard-size",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "robuq.cli", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            *robuq_under_torchrun(2),
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (7, 64, 64, 3)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_bf16_sampling_stays_close_to_fp32():
    """bf16 autocast (quantizer statistics, scales and rounding in fp32) against fp32, same noise and labels, on
    the shipped teacher and its W1.58A4 student: images in [-1, 1] differ by ≤ 0.02 (teacher) and ≤ 0.05
    (student) on average — 0.005 and 0.025 when written — and the difference is real, not zero."""
    from robuq.core.runtime import default_teacher_path
    from robuq.models.checkpoint import load_dit
    from robuq.precision import preset
    from robuq.sample.generate import generate
    from robuq.train.qat import build_student

    teacher = load_dit(default_teacher_path())
    labels = torch.arange(8)
    for model, tolerance in ((teacher, 0.02), (build_student(teacher, preset("robuq", act_bits=4)), 0.05)):
        fp32 = generate(model, labels, 8, "ddim", 10, 1.5, 0, progress=False)
        bf16 = generate(model, labels, 8, "ddim", 10, 1.5, 0, progress=False, precision="bf16")
        gap = (fp32 - bf16).abs().mean().item()
        assert 0 < gap <= tolerance, gap


def test_rank_0_polls_for_the_other_ranks_shards(tmp_path):
    """Rank 0 waits for files another rank writes later, and names the first missing file when they never come."""
    import threading
    import time

    from robuq.core.distributed import wait_for_files

    late = tmp_path / "shard-00001.npz"
    threading.Timer(0.3, late.write_bytes, args=(b"x",)).start()
    t0 = time.monotonic()
    wait_for_files([late], timeout_hours=1 / 60, poll_seconds=0.05)
    assert late.is_file() and time.monotonic() - t0 >= 0.25
    with pytest.raises(TimeoutError, match="shard-00002.npz"):
        wait_for_files([tmp_path / "shard-00002.npz"], timeout_hours=0.2 / 3600, poll_seconds=0.05)
