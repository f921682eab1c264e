import json
import tempfile
from pathlib import Path

from robuq.cli import main
from robuq.core.files import save_tensors


def test_main_job_runs_end_to_end_on_a_tiny_teacher(tmp_path, tiny_dit, fmnist_dir, capsys):
    teacher = save_tensors(
        tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
    )
    out = tmp_path / "quick"
    args = [
        "run",
        "--teacher",
        str(teacher),
        "--out-dir",
        str(out),
        "--data-dir",
        str(fmnist_dir),
        "--warmup-qat-steps",
        "2",
        "--steps",
        "4",
        "--global-batch-size",
        "8",
        "--per-class",
        "1",
        "--sample-steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fewer bit-operations than fp32" in printed and "PSNR vs teacher" in printed
    assert printed.count("layer type") == 1  # the plan's table, printed once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["average_bits_plain"] <= 3.0 and summary["bops_reduction"] > 1
    for name in ("teacher_grid.png", "quantized_grid.png", "compare.png", "summary.txt", "ampn/plan.png"):
        assert (out / name).stat().st_size > 0, name


def test_the_comparison_figure_heads_each_grid_with_its_model():
    import numpy as np
    from PIL import Image

    from robuq.sample.generate import save_comparison, tile

    images = np.full((6, 8, 8, 1), 128, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = save_comparison({"teacher": images, "W1.58": images}, Path(folder) / "compare.png", 3, "title")
        picture = np.asarray(Image.open(path))
    grid_height = tile(images, 3).shape[0] * 2
    header = picture[: picture.shape[0] - grid_height]
    assert header.shape[0] > 20 and (header < 128).any()  # text above the grids: the title and the models' names
    left, right = (
        header[header.shape[0] // 2 :, : picture.shape[1] // 2],
        header[header.shape[0] // 2 :, picture.shape[1] // 2 :],
    )
    assert (left < 128).any() and (right < 128).any()  # a name over each grid
