"""The command line, run in-process through robuq.cli.main."""

import json

import numpy as np
import pytest
from PIL import Image

from robuq.cli import main
from robuq.core.files import save_tensors


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_dit):
    return str(
        save_tensors(tmp_path / "tiny.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()})
    )


def test_models_json_lists_every_config(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["DiT-XL/2"]["params"] == 675_129_632
    assert {f"DiT-{s}/{p}" for s in "SBLX" if s != "X" for p in (2, 4, 8)} <= set(rows)
    assert rows["DiT-XL/2"]["gflops"] == pytest.approx(118.6, rel=0.01)


def test_sample_writes_a_grid_row_per_class_and_an_npz(tmp_path, tiny_ckpt):
    out = tmp_path / "samples"
    assert (
        main(["sample", "--ckpt", tiny_ckpt, "--out", str(out), "--per-class", "3", "--steps", "4", "--device", "cpu"])
        == 0
    )
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (30, 8, 8, 3)
    grid = Image.open(out / "grid.png")
    assert grid.height > grid.width  # 10 rows (classes) of 3 columns


def test_quantize_summary_and_sample_from_a_quantized_file(tmp_path, tiny_ckpt, capsys):
    q = tmp_path / "q.safetensors"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks.0.mlp.fc2": 2}))
    assert (
        main(
            [
                "quantize",
                "--ckpt",
                tiny_ckpt,
                "--preset",
                "robuq",
                "--act-bits",
                "3",
                "--plan",
                str(plan),
                "--out",
                str(q),
            ]
        )
        == 0
    )
    assert "fewer than the fp32 model" in capsys.readouterr().out
    assert main(["summary", str(q), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bits = {m["name"]: m["act_bits"] for m in summary["modules"]}
    assert bits["blocks.0.mlp.fc2"] == 2 and bits["blocks.0.mlp.fc1"] == 3 and summary["bops_reduction"] > 1
    out = tmp_path / "qs"
    assert (
        main(["sample", "--ckpt", str(q), "--out", str(out), "--per-class", "1", "--steps", "2", "--device", "cpu"])
        == 0
    )
    assert np.load(out / "samples.npz")["arr_0"].shape == (10, 8, 8, 3)


def test_errors_are_one_readable_line(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_a_bad_plan_names_each_wrong_entry_and_writes_nothing(tmp_path, tiny_ckpt, capsys):
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text(json.dumps({"blocks.0.mlp.fc9": 2, "blocks.1.attn.proj": 12, "blocks.0.mlp.fc2": 3}))
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--ckpt", tiny_ckpt, "--plan", str(bad_plan), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # The checkpoint loaded, so the error is the plan's: both bad entries named, the good one not, real names suggested.
    assert "invalid bit plan" in err and "Traceback" not in err
    assert "'blocks.0.mlp.fc9' is not a quantized linear layer" in err and "blocks.0.attn.qkv" in err
    assert "'blocks.1.attn.proj': bits must be from 1 to 8, got 12" in err
    assert "blocks.0.mlp.fc2" not in err
    assert not out.exists()


def test_export_report_and_sample_from_the_export(tmp_path, tiny_ckpt, capsys):
    q = tmp_path / "q.safetensors"
    assert main(["quantize", "--ckpt", tiny_ckpt, "--out", str(q)]) == 0
    exported = tmp_path / "m.robuq.safetensors"
    assert main(["export", str(q), "--out", str(exported), "--packing", "ternary-trits", "--report"]) == 0
    out = capsys.readouterr().out
    assert "packed weights" in out and "smaller than the fp32 checkpoint" in out
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(exported),
                "--out",
                str(tmp_path / "s"),
                "--per-class",
                "1",
                "--steps",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (10, 8, 8, 3)
