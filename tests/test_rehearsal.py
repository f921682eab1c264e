"""The multi-GPU recipe rehearsed at 8 processes on the CPU (gloo): AMPN's whole pipeline under torchrun with
8 ranks, and the same run with one rank killed mid-training — torchrun stops the others and names the rank,
and running the same command again resumes from the last checkpoint to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from robuq.core.files import save_tensors
from conftest import robuq_under_torchrun


def command(teacher: str, data_dir, out: Path) -> list[str]:
    return [
        *robuq_under_torchrun(8),
        "ampn",
        "run",
        "--teacher",
        teacher,
        "--data-dir",
        str(data_dir),
        "--budget",
        "3",
        "--warmup-qat-steps",
        "4",
        "--steps",
        "60",  # a final stage long enough that the kill lands inside it on a fast machine too
        "--global-batch-size",
        "8",
        "--calibration-images",
        "8",
        "--probe-images",
        "8",
        "--ckpt-every",
        "2",
        "--log-every",
        "1",
        "--dist-timeout-hours",
        "0.05",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        "--no-progress",
    ]


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e for e in environ if e.startswith(b"RANK=")]
    return int(found[0][5:]) if found else None


def workers(parent: int) -> dict[int, int]:
    """rank → pid of torchrun's worker processes."""
    out = {}
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text().split()
        except OSError:
            continue
        if int(stat[3]) == parent and (rank := rank_of(int(child.name))) is not None:
            out[rank] = int(child.name)
    return out


@pytest.mark.slow
def test_eight_ranks_run_ampn_and_a_killed_rank_stops_all_then_resumes(tmp_path, tiny_dit, fmnist_dir):
    if not Path("/proc").is_dir():
        pytest.skip("finding torchrun's workers needs /proc")
    teacher = str(
        save_tensors(
            tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(teacher, fmnist_dir, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = out / "final" / "log.jsonl"
    deadline = time.monotonic() + 900
    while not (log.is_file() and log.read_text().strip()):  # into the final stage: warm-up, sensitivities, plan done
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach its final stage"
        time.sleep(0.5)
    ranks = workers(proc.pid)
    assert len(ranks) == 8, ranks
    os.kill(ranks[3], signal.SIGKILL)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0 and time.monotonic() - t0 < 300
    assert "local_rank: 3" in stderr or "rank: 3" in stderr, stderr[-3000:]
    assert not (out / "final" / "model.safetensors").exists()

    again = subprocess.run(command(teacher, fmnist_dir, out), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps[-1] == 60 and steps == sorted(set(steps))  # one continuous log: resumed, not restarted
    assert (out / "final" / "model.safetensors").is_file()
    parts = sorted(p.name for p in out.glob("sensitivity-part-*-of-8.json"))
    assert len(parts) == 8  # every rank measured its share
