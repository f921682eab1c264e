"""The paper's recipe as users run it — scripts/imagenet_dit_xl.sh: latents → AMPN (one schedule, warm-up,
sensitivities, plan, QAT) → export → sampling at scale → metrics — under torchrun with two processes and gloo,
at toy size on the CPU (a randomly initialised VAE, a 3-class latent DiT, a few images)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_latent_training import latent_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_paper_recipe_script_runs_under_torchrun(tmp_path):
    pytest.importorskip("diffusers")
    from robuq.eval.inception_weights import fid_helper_weights

    inputs = tmp_path / "in"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "latent_pipeline_inputs.py"), str(inputs), "8"],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    teacher = latent_teacher(tmp_path)
    weights = fid_helper_weights()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "STEPS": "4",
        "BATCH": "4",
        "SAMPLES": "6",
        "IMAGE_SIZE": "64",
        "WARMUP_QAT": "2",
        "LR_WARMUP": "1",
        "CKPT_EVERY": "2",
        "PROBE_EVERY": "2",
        "SAMPLE_STEPS": "2",
        "PRECISION": "bf16",
        "NUM_WORKERS": "0",
        "CALIBRATION": "4",
        "SHARD_SIZE": "4",
        "LATENT_SHARD_SIZE": "8",
        "REFERENCE_NPZ": str(inputs / "reference.npz"),
    }
    if weights is not None:
        env["INCEPTION_WEIGHTS"] = str(weights)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "imagenet_dit_xl.sh"),
            str(inputs / "images"),
            str(inputs / "vae"),
            teacher,
            str(out),
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert json.loads((out / "latents" / "index.json").read_text())["num_images"] == 24
    warm = [json.loads(line)["step"] for line in (out / "ampn" / "warmup" / "log.jsonl").read_text().splitlines()]
    final = [json.loads(line)["step"] for line in (out / "ampn" / "final" / "log.jsonl").read_text().splitlines()]
    assert warm[-1] == 2 and final[-1] == 4
    assert (out / "dit-xl2-w1.58a2.robuq.safetensors").stat().st_size > 0
    for cfg in ("1.5", "4.0"):
        with np.load(out / f"samples-cfg{cfg}" / "samples.npz") as data:
            assert data["arr_0"].shape == (6, 64, 64, 3)
        if weights is not None:
            metrics = json.loads((out / f"metrics-cfg{cfg}.json").read_text())
            assert np.isfinite(metrics["fid"]) and metrics["num_samples"] == 6
