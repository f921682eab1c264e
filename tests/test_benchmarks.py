"""The benchmark scripts' code paths on tiny configurations, so they cannot rot (no timing asserted)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

import pytest
import torch

from robuq.eval.classifier import ClassifierTrainConfig, train_classifier
from robuq.eval.inception import FIDInceptionV3
from robuq.io import save_tensors

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_reproduce_quick_path_on_a_tiny_teacher(tmp_path, tiny_dit, fmnist_dir):
    teacher = save_tensors(tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()})
    classifier = tmp_path / "clf.safetensors"
    train_classifier(ClassifierTrainConfig(epochs=1, batch_size=32, width=8, data_dir=str(fmnist_dir), out=str(classifier)), progress=False)
    reproduce = _load("reproduce")
    results = tmp_path / "results"
    for only in ("FP teacher", "RobuQ + AMPN W1.58A2", "RTN"):
        reproduce.main(["--quick", "--teacher", str(teacher), "--steps", "2", "--samples-per-class", "1", "--data-dir", str(fmnist_dir),
                        "--work-dir", str(tmp_path / "work"), "--only", only, "--classifier", str(classifier),
                        "--results-dir", str(results), "--no-inception"])
    rows = json.loads((results / "reproduce_quick.json").read_text())["rows"]
    # Each --only run joins the table, in the table's row order, guidance scales in order.
    assert [(r["method"], r["guidance"]) for r in rows] == [
        ("real training images (reference)", 0.0), ("FP teacher", 1.5), ("FP teacher", 4.0), ("RTN W1.58A4 (no training)", 1.5),
        ("RobuQ + AMPN W1.58A2", 1.5), ("RobuQ + AMPN W1.58A2", 4.0)]
    required = {"method", "w_bits", "a_bits", "ampn", "guidance", "fid", "sfid", "is", "precision", "recall", "psnr_vs_fp",
                "bops_ratio", "qat_seconds"}
    assert required <= set(rows[3]) and rows[3]["bops_ratio"] < 1
    assert (results / "reproduce_quick.md").read_text().count("|") > 10
    assert (results / "reproduce_quick.png").stat().st_size > 0
    assert any((results / "reproduce_quick_grids").glob("*.png"))  # a quick table never overwrites the full one's grids
    assert not (results / "reproduce_grids").exists()

    # --rescore recomputes the metrics from the samples left in the work folder and keeps the rest; with
    # Inception weights (here a random network in pytorch-fid's layout) it adds the Inception-FID column.
    before = rows[3]
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pth")
    (tmp_path / "work" / "fp-teacher" / "samples-cfg4.0.npz").rename(tmp_path / "moved.npz")
    reproduce.main(["--quick", "--rescore", "--data-dir", str(fmnist_dir), "--work-dir", str(tmp_path / "work"),
                    "--classifier", str(classifier), "--results-dir", str(results),
                    "--inception-weights", str(tmp_path / "inception.pth"), "--inception-reference", "4"])
    (tmp_path / "moved.npz").rename(tmp_path / "work" / "fp-teacher" / "samples-cfg4.0.npz")
    rescored = json.loads((results / "reproduce_quick.json").read_text())
    assert [r["method"] for r in rescored["rows"]] == [r["method"] for r in rows]
    assert rescored["rows"][3]["fid"] == before["fid"] and rescored["rows"][3]["qat_seconds"] == before["qat_seconds"]
    assert "command" in rescored["table_run"]
    assert rescored["rows"][3]["fid_inception"] > 0 and rescored["rows"][3]["inception_reference"] == 4
    assert rescored["not_rescored"] == ["FP teacher (cfg 4.0)"] and "fid_inception" not in rescored["rows"][2]
    table = (results / "reproduce_quick.md").read_text()
    assert "Inception-FID" in table and "Spearman" in table and "Not re-scored" in table

    # A restarted table reuses a finished row's samples and its recorded QAT time.
    (results / "reproduce_quick.json").unlink()
    reproduce.main(["--quick", "--teacher", str(teacher), "--steps", "2", "--samples-per-class", "1", "--data-dir", str(fmnist_dir),
                    "--work-dir", str(tmp_path / "work"), "--only", "RobuQ + AMPN W1.58A2", "--classifier", str(classifier),
                    "--results-dir", str(results)])
    again = json.loads((results / "reproduce_quick.json").read_text())["rows"]
    assert [(r["fid"], r["qat_seconds"]) for r in again[1:]] == [(r["fid"], r["qat_seconds"]) for r in rows[4:]]

    # The AMPN row's run folder is a complete `ampn run`: the collector reads it like scripts/ampn_teacher.sh's.
    summary = _load("ampn_runs").summarize(tmp_path / "work" / "robuq---ampn-w1-58a2", tmp_path / "collected")
    assert summary["budget"] == 2.0 and set(summary["role_averages"]) == {"qkv", "proj", "fc1", "fc2"}
    assert summary["plan_probe"] and summary["warmup_seconds"] > 0
    assert (tmp_path / "collected" / "robuq---ampn-w1-58a2" / "plan.png").stat().st_size > 0


def test_deploy_sizes_and_peak_memory_on_dit_s2(tmp_path):
    deploy = _load("deploy")
    rows = deploy.size_rows(["DiT-S/2"], "ternary-trits", tmp_path)
    assert [r["layout"] for r in rows] == ["paper (adaLN int4)", "ternary adaLN"]
    for r in rows:  # the file holds what the plan says, plus a small header
        assert 0 <= r["overhead_vs_information"] < 0.02 and r["size_ratio_fp32"] == 2 * r["size_ratio_fp16"]
    assert rows[1]["size_ratio_fp32"] > rows[0]["size_ratio_fp32"]
    memory = deploy.peak_memory_ratio("DiT-S/2", str(deploy.export_random("DiT-S/2", tmp_path / "s2.safetensors")), runs=1)
    assert 0 < memory["exported_peak_above_import_bytes"] < memory["exported_peak_bytes"]
    assert memory["peak_mem_ratio"] == memory["fp32_peak_bytes"] / memory["exported_peak_bytes"]


def test_export_fidelity_compares_every_sampling_path(tmp_path, tiny_dit):
    import robuq

    config = robuq.preset("robuq", act_bits=3)
    path = robuq.save_quantized(robuq.quantize_(tiny_dit, config), tmp_path / "q.safetensors", config)
    results = tmp_path / "results"
    _load("export_fidelity").main(["--model", str(path), "--per-class", "1", "--steps", "2", "--results-dir", str(results)])
    row = json.loads((results / "export_fidelity.json").read_text())["rows"][0]
    for way in ("training_model_c_kernels", "exported_fp32", "exported_fp16"):
        assert row[way]["psnr_db"] > 10 and 0 <= row[way]["within_2_levels"] <= 1
    assert (results / "export_fidelity_grids" / row["grid"]).stat().st_size > 0
    assert "floor" in (results / "export_fidelity.md").read_text()


def test_deploy_end_to_end_times_three_models(tmp_path):
    speed = _load("deploy").end_to_end("DiT-S/2", 1, tmp_path)
    assert speed["fp32_ms"] > 0 and speed["fp32_native_elementwise_ms"] > 0 and speed["exported_ms"] > 0
    assert speed["cpu_speedup"] == speed["fp32_ms"] / speed["exported_ms"]


def test_cpu_kernel_cases_run():
    cpu_kernels = _load("cpu_kernels")
    for _model, what, fn in cpu_kernels.cases(32, models=cpu_kernels.MODELS[:1]):
        assert fn() is not None, what


def test_rank_agreement_counts_the_pairs_ordered_apart():
    reproduce = _load("reproduce")
    rows = [{"method": m, "guidance": 1.5, "fid": f, "fid_inception": i} for m, f, i in
            [("a", 10.0, 1.0), ("b", 20.0, 3.0), ("c", 30.0, 2.0), ("d", 40.0, 4.0)]]
    agreement = reproduce.rank_agreement(rows + [{"method": "e", "guidance": 1.5, "fid": 50.0}])
    assert agreement["rows"] == 4 and agreement["pairs"] == 6
    assert agreement["flipped"] == [("b (cfg 1.5)", "c (cfg 1.5)")] and agreement["spearman"] == pytest.approx(0.8)
