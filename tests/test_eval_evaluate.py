import json

import numpy as np
import pytest

from robuq.cli import main
from robuq.eval.classifier import ClassifierTrainConfig, train_classifier
from robuq.eval.evaluate import EvalConfig, evaluate


@pytest.fixture
def classifier(tmp_path, fmnist_dir):
    out = tmp_path / "clf.safetensors"
    train_classifier(
        ClassifierTrainConfig(epochs=2, batch_size=32, width=8, data_dir=str(fmnist_dir), out=str(out)), progress=False
    )
    return str(out)


def _test_split_as_samples(fmnist_dir, path):
    from robuq.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test", fmnist_dir)
    np.savez(path, arr_0=np.repeat(images[..., None], 3, axis=-1))
    return path


def test_reference_against_itself(tmp_path, fmnist_dir, classifier):
    samples = _test_split_as_samples(fmnist_dir, tmp_path / "same.npz")
    config = EvalConfig(
        samples=str(samples),
        classifier=classifier,
        data_dir=str(fmnist_dir),
        cache_dir=str(tmp_path / "cache"),
        paired=str(samples),
    )
    result = evaluate(config)
    assert result["fid"] == pytest.approx(0, abs=1e-6) and result["sfid"] == pytest.approx(0, abs=1e-6)
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and result["psnr_vs_paired"] == float("inf")
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 1  # cached for the next call
    noise = tmp_path / "noise.npz"
    np.savez(noise, arr_0=np.random.default_rng(0).integers(0, 256, (32, 28, 28, 3), dtype=np.uint8))
    worse = evaluate(
        EvalConfig(
            samples=str(noise), classifier=classifier, data_dir=str(fmnist_dir), cache_dir=str(tmp_path / "cache")
        )
    )
    assert worse["fid"] > 1.0


def test_cli_and_clear_errors(tmp_path, fmnist_dir, classifier, capsys):
    samples = _test_split_as_samples(fmnist_dir, tmp_path / "s.npz")
    out = tmp_path / "metrics.json"
    args = [
        "eval",
        "metrics",
        "--samples",
        str(samples),
        "--classifier",
        classifier,
        "--data-dir",
        str(fmnist_dir),
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(out),
    ]
    assert main(args) == 0 and "fid" in json.loads(out.read_text())
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    assert main(["eval", "metrics", "--samples", str(tmp_path / "bad.npz"), "--classifier", classifier]) == 2
    assert "not an ADM-style sample file" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "metrics",
                "--samples",
                str(samples),
                "--extractor",
                "inception",
                "--inception-weights",
                str(tmp_path / "absent.pth"),
            ]
        )
        == 2
    )
    assert "absent.pth not found" in capsys.readouterr().err
    assert main(["eval", "metrics", "--samples", str(samples), "--protocol", "adm"]) == 2
    assert "--extractor inception" in capsys.readouterr().err


def test_too_few_samples_are_named_instead_of_scipys_warnings(tmp_path, fmnist_dir, classifier, capsys):
    import warnings

    samples = _test_split_as_samples(fmnist_dir, tmp_path / "s.npz")
    with np.load(samples) as data:
        np.savez(tmp_path / "ten.npz", arr_0=data["arr_0"][:10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither SciPy's "Matrix is singular" nor PyTorch's read-only array warning
        assert (
            main(
                [
                    "eval",
                    "metrics",
                    "--samples",
                    str(tmp_path / "ten.npz"),
                    "--classifier",
                    classifier,
                    "--data-dir",
                    str(fmnist_dir),
                    "--cache-dir",
                    str(tmp_path / "c"),
                    "--no-progress",
                ]
            )
            == 0
        )
    err = capsys.readouterr().err
    assert "10 samples are no more than the" in err and "Inception Score" in err
