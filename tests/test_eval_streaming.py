"""Evaluation at scale: sample files read a batch at a time, reference features cached under a key naming
every input that shapes them, memory bounded by the batch, Inception in true float32 on CUDA."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from robuq.core.runtime import precision_context
from robuq.eval.classifier import ClassifierTrainConfig, train_classifier
from robuq.eval.evaluate import EvalConfig, evaluate
from robuq.eval.npz_images import NpzImages


@pytest.fixture
def classifier(tmp_path, fmnist_dir):
    out = tmp_path / "clf.safetensors"
    train_classifier(
        ClassifierTrainConfig(epochs=1, batch_size=32, width=8, data_dir=str(fmnist_dir), out=str(out)), progress=False
    )
    return str(out)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_reads_the_rows_asked_for(tmp_path, save):
    images = np.random.default_rng(0).integers(0, 256, (23, 5, 4, 3), dtype=np.uint8)
    save(tmp_path / "s.npz", arr_0=images, labels=np.arange(23))
    with NpzImages(tmp_path / "s.npz") as lazy:
        assert len(lazy) == 23 and lazy.shape == images.shape
        assert np.array_equal(np.concatenate(list(lazy.batches(7))), images)
        assert np.array_equal(lazy[3:9], images[3:9]) and np.array_equal(lazy[0:2], images[0:2])  # backwards too
    with NpzImages(tmp_path / "s.npz", limit=10) as first:
        assert len(first) == 10 and np.array_equal(first[8:20], images[8:10])


def test_npz_images_names_what_is_wrong(tmp_path):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "flat.npz", arr_0=np.zeros((2, 48), np.uint8))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "whole.npz", arr_0=np.zeros((50, 8, 8, 3), np.uint8))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for name, message in (
        ("floats", "must be uint8 N×H×W×C"),
        ("flat", "must be uint8 N×H×W×C"),
        ("other", "it holds x, no arr_0"),
        ("text", "not an ADM-style sample file"),
        ("cut", "not an ADM-style sample file"),
    ):
        with pytest.raises(ValueError, match=message):
            NpzImages(tmp_path / f"{name}.npz")


def test_the_reference_cache_key_names_the_reference_count(tmp_path, fmnist_dir, classifier):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.random.default_rng(1).integers(0, 256, (16, 28, 28, 3), dtype=np.uint8))
    common = dict(
        samples=str(samples),
        classifier=classifier,
        data_dir=str(fmnist_dir),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    full, fewer = evaluate(EvalConfig(**common)), evaluate(EvalConfig(**common, max_reference=12))
    assert (full["num_reference"], fewer["num_reference"]) == (32, 12)  # not the first run's cached features
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 2


def test_fp32_turns_tf32_off_on_cuda_and_restores_the_settings():
    """The Inception's features run under precision_context("fp32"): PyTorch's default runs CUDA convolutions
    in TF32, TensorFlow's (ADM's) does not. The flags are plain settings, so this holds without a GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with precision_context("fp32", torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with precision_context("tf32", torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adm_features_on_cuda_run_without_tf32(monkeypatch):
    from robuq.eval.adm import adm_activations_of_batches
    from robuq.eval.inception import FIDInceptionV3

    seen = []
    model = FIDInceptionV3()
    monkeypatch.setattr(
        model, "adm_features", lambda x: seen.append(torch.backends.cudnn.allow_tf32) or {"pool": x.mean((2, 3))}
    )
    list(adm_activations_of_batches(model, [np.zeros((2, 8, 8, 3), np.uint8)], "cuda"))
    assert seen == [False]


@pytest.mark.slow
def test_evaluating_20k_samples_grows_memory_by_a_fraction_of_the_file(tmp_path, fmnist_dir, classifier):
    """20,000 samples at 64×64×3 (246 MB): a batch-at-a-time evaluation's peak memory grows by ≤ 25 % of that
    (the pool features and precision/recall's blocks, not the images)."""
    script = textwrap.dedent(f"""
        import json, resource
        import numpy as np
        from robuq.eval.evaluate import EvalConfig, evaluate
        common = dict(classifier={classifier!r}, data_dir={str(fmnist_dir)!r}, cache_dir={str(tmp_path / "cache")!r},
                      progress=False, batch_size=256)
        evaluate(EvalConfig(samples={str(tmp_path / "small.npz")!r}, **common))  # every import and cache made
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = evaluate(EvalConfig(samples={str(tmp_path / "big.npz")!r}, **common))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_bytes": (after - before) * 1024, "num_samples": result["num_samples"]}}))
    """)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20_000, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=images)
    np.savez(tmp_path / "small.npz", arr_0=images[:2000])
    size = images.nbytes
    del images
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["num_samples"] == 20_000
    assert measured["growth_bytes"] <= 0.25 * size, f"peak RSS grew {measured['growth_bytes'] / 2**20:.0f} MiB"
