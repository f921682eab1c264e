import json

from robuq.cli import main
from robuq.core.files import save_tensors


def test_main_job_runs_end_to_end_on_a_tiny_teacher(tmp_path, tiny_dit, fmnist_dir, capsys):
    teacher = save_tensors(tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()})
    out = tmp_path / "quick"
    args = ["run", "--teacher", str(teacher), "--out-dir", str(out), "--data-dir", str(fmnist_dir), "--warmup-qat-steps", "2",
            "--steps", "4", "--global-batch-size", "8", "--per-class", "1", "--sample-steps", "2", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fewer bit-operations than fp32" in printed and "PSNR vs teacher" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["average_bits_plain"] <= 3.0 and summary["bops_reduction"] > 1
    for name in ("teacher_grid.png", "quantized_grid.png", "compare.png", "summary.txt", "ampn/plan.png"):
        assert (out / name).stat().st_size > 0, name
