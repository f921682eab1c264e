"""Bad input through the command line, as a user meets it: exit code 2, one line on stderr that names the
file or flag and the fix, no traceback, nothing written."""

import collections
import json
import pickle
from pathlib import Path

import pytest

import robuq
from robuq.cli import main
from robuq.core.files import save_tensors
from robuq.eval.classifier import ClassifierTrainConfig


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_dit):
    return str(
        save_tensors(tmp_path / "tiny.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()})
    )


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI expecting robuq's clean error; return stderr's first line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robuq {argv[0]}: error: ") and "Traceback" not in err, err
    return err.splitlines()[0]


def test_a_missing_data_dir_is_refused_before_anything_is_built_or_written(tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(
        capsys,
        ["qat", "--data-dir", str(tmp_path / "nonexistent"), "--out-dir", str(out), "--steps", "2", "--no-progress"],
    )
    assert f"--data-dir {tmp_path / 'nonexistent'} is not a folder" in line
    assert not out.exists()


def test_a_text_file_is_not_a_model_file(tmp_path, capsys):
    path = tmp_path / "notamodel.pt"
    path.write_text("hello\n")
    line = refused(capsys, ["summary", str(path)])
    assert "notamodel.pt is not a model file" in line and ": 101" not in line


def test_an_unsafe_pickle_is_refused_without_advice_to_load_it_unsafely(tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": collections.Counter(a=1)}, f, protocol=4)
    line = refused(capsys, ["summary", str(path)])
    assert "cannot be loaded safely" in line and "weights_only" not in line and "trusted source" not in line


def test_a_yaml_policy_with_a_python_tag_is_refused_in_one_line(tmp_path, tiny_ckpt, capsys):
    pytest.importorskip("yaml")
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: !!python/object/apply:os.system ['echo pwned']\nrules: []\n")
    out = tmp_path / "q.safetensors"
    line = refused(capsys, ["quantize", "--ckpt", tiny_ckpt, "--config", str(policy), "--out", str(out)])
    assert "policy.yaml is neither JSON nor plain YAML" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "must be an object"),
        (
            '{"rules": [{"pattern": "blocks.*", "linear": {"weight": "ternary", "wieght_bits": 2}}]}',
            "unknown linear quantization fields: wieght_bits",
        ),
        ('{"rules": [{"linear": {}}]}', "needs a name pattern"),
        ('{"nmae": "x"}', "unknown quantization policy fields: nmae"),
    ],
)
def test_a_malformed_policy_names_what_is_wrong(tmp_path, tiny_ckpt, capsys, content, message):
    policy = tmp_path / "policy.json"
    policy.write_text(content)
    line = refused(
        capsys, ["quantize", "--ckpt", tiny_ckpt, "--config", str(policy), "--out", str(tmp_path / "q.safetensors")]
    )
    assert "policy.json" in line and message in line


def test_a_binary_plan_or_policy_is_refused(tmp_path, tiny_ckpt, capsys):
    blob = tmp_path / "blob.json"
    blob.write_bytes(bytes(range(128, 256)))
    out = tmp_path / "q.safetensors"
    assert "is not text; a plan is a JSON file" in refused(
        capsys, ["quantize", "--ckpt", tiny_ckpt, "--plan", str(blob), "--out", str(out)]
    )
    assert "is not text" in refused(capsys, ["quantize", "--ckpt", tiny_ckpt, "--config", str(blob), "--out", str(out)])
    assert not out.exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith(f"robuq {robuq.__version__} (PyTorch ")


def test_the_classifier_is_not_trained_into_the_installed_package_by_default():
    out = Path(ClassifierTrainConfig().out).resolve()
    assert not out.is_relative_to(Path(robuq.__file__).resolve().parent)


def test_summary_counts_an_exports_packed_weights_and_names_the_kind(tmp_path, tiny_ckpt, capsys):
    quantized, exported = tmp_path / "q.safetensors", tmp_path / "m.robuq.safetensors"
    assert main(["quantize", "--ckpt", tiny_ckpt, "--out", str(quantized)]) == 0
    assert main(["export", str(quantized), "--out", str(exported)]) == 0
    capsys.readouterr()
    summaries = {}
    for path in (tiny_ckpt, quantized, exported):
        assert main(["summary", str(path), "--json"]) == 0
        summaries[Path(path).name] = json.loads(capsys.readouterr().out)
    fp, q, e = summaries["tiny.safetensors"], summaries["q.safetensors"], summaries["m.robuq.safetensors"]
    assert (fp["kind"], q["kind"], e["kind"]) == ("full-precision", "quantized", "exported")
    assert e["params"] == q["params"] > fp["params"]  # the low-rank branches exist only once quantized
    assert e["weight_storage_bits"] == q["weight_storage_bits"] and e["compression"] > 1.5
    assert main(["summary", str(exported)]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == f"{exported}: an exported model (packed integer weights, for inference)"
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_image_in_the_training_folder_is_named_and_no_run_is_left(tmp_path, capsys, workers, damage):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "images" / cls / f"{i}.png"
            )
    bad = tmp_path / "images" / "b" / "2.png"
    # Cut into the image data's checksum only: PIL decodes every pixel of this file without complaint.
    bad.write_bytes(bad.read_bytes()[:-16] if damage == "truncated" else b"not an image\n")
    out = tmp_path / "run"
    line = refused(
        capsys,
        [
            "train",
            "--data",
            str(tmp_path / "images"),
            "--model",
            "DiT-S/8",
            "--input-size",
            "16",
            "--steps",
            "2",
            "--global-batch-size",
            "6",
            "--num-workers",
            str(workers),
            "--out-dir",
            str(out),
            "--no-progress",
        ],
    )
    assert f"cannot read image {bad}" in line and "remove or replace it" in line
    assert not out.exists()


@pytest.mark.parametrize("layout, message", [("empty", "has no sub-folders"), ("empty classes", "no images")])
def test_an_empty_image_folder_is_refused(tmp_path, capsys, layout, message):
    folder = tmp_path / "images"
    folder.mkdir()
    if layout == "empty classes":
        (folder / "cats").mkdir()
    line = refused(capsys, ["train", "--data", str(folder), "--out-dir", str(tmp_path / "run"), "--no-progress"])
    assert str(folder) in line and message in line
    assert not (tmp_path / "run").exists()


def test_a_sample_file_of_the_wrong_dtype_is_refused(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    line = refused(capsys, ["eval", "metrics", "--samples", str(tmp_path / "floats.npz")])
    assert "floats.npz: arr_0 must be uint8 N×H×W×C" in line


@pytest.mark.parametrize(
    "damage, message",
    [
        ("text", "is not a model file"),
        ("truncated", "is not a readable safetensors file"),
        ("changed byte", "fails its checksum"),
        ("wrong shapes", "does not fit this model configuration"),
    ],
)
def test_a_damaged_checkpoint_is_refused_and_nothing_is_sampled(tmp_path, tiny_dit, capsys, damage, message):
    import torch

    from conftest import tensor_byte_offset, tiny_config
    from robuq.models.dit import DiT

    path = tmp_path / ("model.pt" if damage in ("text", "changed byte") else "model.safetensors")
    if damage == "text":
        path.write_text("not a model\n")
    elif damage == "truncated":
        save_tensors(path, tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()})
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "changed byte":
        torch.save(tiny_dit.state_dict(), path)
        data = bytearray(path.read_bytes())
        data[tensor_byte_offset(path)] ^= 0x40
        path.write_bytes(bytes(data))
    else:  # a deeper model's tensors under a header that promises the tiny one
        save_tensors(path, DiT(tiny_config(depth=3)).state_dict(), {"model_config": tiny_dit.config.to_dict()})
    out = tmp_path / "samples"
    line = refused(
        capsys,
        [
            "sample",
            "--ckpt",
            str(path),
            "--out",
            str(out),
            "--per-class",
            "1",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert path.name in line and message in line
    assert not out.exists()


def test_a_sample_file_of_the_wrong_shape_is_refused(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "flat.npz", arr_0=np.zeros((4, 192), np.uint8))
    assert "flat.npz: arr_0 must be uint8 N×H×W×C" in refused(
        capsys, ["eval", "metrics", "--samples", str(tmp_path / "flat.npz")]
    )
