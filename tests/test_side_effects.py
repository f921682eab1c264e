"""robuq's library calls leave the process as they found it: global RNG, process groups, matplotlib,
the environment (kernels, allocator, torch.nn.init and the umask have tests beside their modules)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from robuq.core.distributed import init_distributed, shutdown
from robuq.train.trainer import train

from test_train import small_config


def test_training_leaves_the_global_rng_and_environment_as_it_found_them(tmp_path, fmnist_dir):
    torch.manual_seed(1234)
    state, environ = torch.get_rng_state(), dict(os.environ)
    train(small_config(tmp_path / "run", fmnist_dir, steps=2, ckpt_every=2), progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    # PyTorch's own lazily imported parts may note their cache folders (TORCHINDUCTOR_CACHE_DIR); robuq sets nothing.
    changed = {k for k in set(os.environ) ^ set(environ) | {k for k in environ if os.environ.get(k) != environ[k]}}
    assert {k for k in changed if not k.startswith("TORCH")} == set()


def test_a_process_group_the_caller_made_is_used_and_left_alone(tmp_path, monkeypatch):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: robuq must look for a group
        info = init_distributed(torch.device("cpu"))
        assert not info.owns_group
        shutdown(info)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_plan_figures_leave_pyplot_alone(tmp_path):
    import sys

    matplotlib = pytest.importorskip("matplotlib")
    from robuq.ampn.plan_files import plot_plan

    backend = matplotlib.rcParams["backend"]
    had_pyplot = "matplotlib.pyplot" in sys.modules
    from robuq.precision import BitPlan

    plan = BitPlan(
        {"blocks.0.attn.qkv": 2, "blocks.0.mlp.fc2": 3},
        budget=2.5,
        weighting="plain",
        average_plain=2.5,
        average_macs=2.5,
    )
    path = plot_plan(plan, tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.rcParams["backend"] == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_the_suite_leaves_no_temporary_files_of_passing_tests(tmp_path):
    """A default run wrote gigabytes of checkpoints and samples under the system's temp folder, which pytest
    keeps for three runs; the project's settings drop a passing test's folders, module-scoped ones included."""
    import subprocess
    import sys
    from pathlib import Path

    project = Path(__file__).resolve().parents[1] / "pyproject.toml"
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "test_case.py").write_text(
        "import pytest\n"
        "@pytest.fixture(scope='module')\n"
        "def shared(tmp_path_factory):\n"
        "    folder = tmp_path_factory.mktemp('shared')\n"
        "    (folder / 'cache.bin').write_bytes(bytes(1000))\n"
        "    return folder\n"
        "def test_writes(tmp_path, shared):\n"
        "    (tmp_path / 'checkpoint.bin').write_bytes(bytes(1000))\n"
    )
    root = tmp_path / "temproot"
    root.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-c",
            str(project),
            "--rootdir",
            str(tmp_path / "case"),
            "-p",
            "no:cacheprovider",
            str(tmp_path / "case" / "test_case.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)},
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_merge_npz_joins_parts_as_np_savez_would(tmp_path):
    import numpy as np

    from robuq.core.errors import RobuqError
    from robuq.core.files import merge_npz, save_npz

    rng = np.random.default_rng(0)
    parts = []
    for k, n in enumerate((3, 5, 1)):
        parts.append(tmp_path / f"p{k}.npz")
        save_npz(parts[-1], arr_0=rng.integers(0, 255, (n, 4, 4, 3)).astype(np.uint8), labels=np.arange(n) + 10 * k)
    merge_npz(tmp_path / "all.npz", parts, ("arr_0", "labels"))
    with np.load(tmp_path / "all.npz") as merged:
        expected = [np.load(p) for p in parts]
        assert np.array_equal(merged["arr_0"], np.concatenate([e["arr_0"] for e in expected]))
        assert np.array_equal(merged["labels"], np.concatenate([e["labels"] for e in expected]))
    save_npz(tmp_path / "odd.npz", arr_0=np.zeros((2, 5, 4, 3), np.uint8), labels=np.arange(2))
    with pytest.raises(RobuqError, match="differ in shape"):
        merge_npz(tmp_path / "bad.npz", [parts[0], tmp_path / "odd.npz"], ("arr_0", "labels"))
    assert not (tmp_path / "bad.npz").exists()
