"""Each benchmark script run end to end at toy size: the records it writes, not the figures it measures.

A benchmark's numbers need its real sizes and minutes of machine time (``python benchmarks/<name>.py``);
here each runs on a 2-block DiT or a few rows in seconds, and the tests check what the script writes:
results/<name>.json and .md with the machine, the command and the date, finite numbers, a table that
shows the JSON's figures, and the facts that hold at any size (shapes, file sizes, nested grids).
No timing is asserted.
"""

import dataclasses
import datetime
import importlib.util
import json
import math
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from robuq.eval.classifier import ClassifierTrainConfig, train_classifier
from robuq.core.files import save_tensors
from robuq.eval.inception import FIDInceptionV3

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


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # The scripts set torch's thread count for the process they think they own (the tests ask for conftest's one).
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _record(results: Path, name: str, script: str, argv: list[str]) -> tuple[dict, str]:
    """The JSON and Markdown a script wrote, after checking the provenance both carry."""
    data = json.loads((results / f"{name}.json").read_text())
    markdown = (results / f"{name}.md").read_text()
    assert data["command"].split(" ", 1)[1] == shlex.join([f"benchmarks/{script}.py", *argv])
    assert {"platform", "processor", "cpu_count", "torch_threads", "python", "torch"} <= set(data["machine"])
    assert data["machine"]["torch"] == torch.__version__
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(data["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=30)
    assert markdown.startswith(f"# {name}\n") and data["command"] in markdown and data["date"] in markdown
    return data, markdown


def _finite(data: dict, *skip: str) -> None:
    kept = {k: v for k, v in data.items() if k not in skip}
    assert all(math.isfinite(x) for x in _numbers(kept)), kept


def _fp32_bytes(model: torch.nn.Module, tmp_path: Path) -> int:
    """Tensor bytes of the model's fp32 checkpoint, written for real (the file less its length prefix and header)."""
    path = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


@pytest.fixture
def teacher_file(tmp_path, tiny_dit):
    return str(
        save_tensors(
            tmp_path / "teacher.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()}
        )
    )


@pytest.fixture
def classifier_file(tmp_path, fmnist_dir):
    out = tmp_path / "clf.safetensors"
    train_classifier(
        ClassifierTrainConfig(epochs=1, batch_size=32, width=8, data_dir=str(fmnist_dir), out=str(out)), progress=False
    )
    return str(out)


def test_hadamard(tmp_path):
    argv = ["--shapes", "64x48,16x192", "--repeats", "1", "--threads", "1", "--results-dir", str(tmp_path)]
    _load("hadamard").main(argv)
    data, markdown = _record(tmp_path, "hadamard", "hadamard", argv)
    _finite(data, "machine")
    cpu = [r for r in data["rows"] if r["device"] == "cpu"]
    assert [r["shape"] for r in cpu] == [[64, 48], [16, 192]]
    for r in data["rows"]:
        assert math.prod(r["factors"]) == r["shape"][1]
        assert r["max_abs_diff"] < 1e-4  # the fast transform is the dense matrix's
        assert min(r["fast_ms"], r["dense_ms"], r["copy_ms"]) > 0
        assert f"| {r['shape']} | {r['device']} | {r['factors']} | {r['fast_ms']:.1f} |" in markdown


def test_cpu_kernels(tmp_path):
    argv = ["--models", "toy", "--tokens", "16", "--repeats", "1", "--threads", "1", "--results-dir", str(tmp_path)]
    _load("cpu_kernels").main(argv)
    data, markdown = _record(tmp_path, "cpu_kernels", "cpu_kernels", argv)
    _finite(data, "machine")
    whats = [r["what"] for r in data["rows"]]
    # The toy is 48 wide with 2 heads: qkv 48→144, fc1 48→192, fc2 192→48; 16 tokens in batches of 8.
    assert whats == [
        "qkv input pass: Hadamard + A2 levels (16×48)",
        "qkv IntegerLinear, whole (16×48→144)",
        "fc1 IntegerLinear + GELU, whole (16×48→192)",
        "fc2 input pass: Hadamard + A2 levels (16×192)",
        "fc2 IntegerLinear, whole (16×192→48)",
        "8-bit attention core (8×2 heads, 2 tokens)",
        "tanh-GELU (16×192)",
        "block elementwise: 2× LayerNorm+modulate, 2× gated residual (8×2×48)",
    ]
    for r in data["rows"]:
        assert r["c_kernels_ms"] > 0 and r["pytorch_ms"] > 0
        assert (
            f"| toy | {r['what']} | {r['c_kernels_ms']:.2f} | {r['pytorch_ms']:.2f} | {r['speedup']:.2f}× |" in markdown
        )


def test_deploy(tmp_path):
    deploy = _load("deploy")
    results = tmp_path / "results"
    argv = [
        "--parts",
        "sizes,linears,speed,memory,breakdown",
        "--settings",
        "native",
        "--models",
        "toy",
        "--size-models",
        "toy",
        "--memory-models",
        "toy",
        "--memory-runs",
        "1",
        "--linear-width",
        "48",
        "--linear-tokens",
        "16",
        "--repeats",
        "1",
        "--rounds",
        "3",
        "--threads",
        "1",
        "--peers",
        "dynamic_int8,fp32_compiled,torchao_int8_compiled",
        "--batches",
        "2,8",
        "--results-dir",
        str(results),
    ]
    deploy.main(argv)
    data, markdown = _record(results, "deploy", "deploy", argv)
    _finite(data, "machine")
    sizes = {(r["layout"], r["packing"]): r for r in data["sizes"]}
    assert len(sizes) == 4 and {r["name"] for r in data["sizes"]} == {"toy"}
    fp32_bytes = _fp32_bytes(_load("common").create_model("toy"), tmp_path)
    for r in sizes.values():
        assert r["size_ratio_fp32"] * r["file_bytes"] == pytest.approx(fp32_bytes)
        assert r["file_bytes"] > r["information_bytes"]  # the plan's bits and a header
    for packing in ("ternary-trits", "ternary-2bit"):  # ternary adaLN (1.6 or 2 bits) is smaller than int4 adaLN
        assert sizes[("ternary adaLN", packing)]["file_bytes"] < sizes[("paper (adaLN int4)", packing)]["file_bytes"]
    for layout in ("paper (adaLN int4)", "ternary adaLN"):  # 5 trits a byte beat 4 codes a byte
        assert sizes[(layout, "ternary-trits")]["file_bytes"] < sizes[(layout, "ternary-2bit")]["file_bytes"]
    assert [(r["layer"], r["shape"]) for r in data["linears"]] == [
        ("qkv", [16, 48, 144]),
        ("proj", [16, 48, 48]),
        ("fc1", [16, 48, 192]),
        ("fc2", [16, 192, 48]),
    ]
    (setting,) = data["settings"]
    toy = setting["models"]["toy"]
    assert setting["setting"] == "native" and min(toy["fp32_ms"], toy["dynamic_int8_ms"], toy["exported_ms"]) > 0
    # speed-ups: the median over rounds of each round's ratio (a machine slowing down for a while slows both sides)
    rounds = toy["rounds_ms"]
    assert {len(v) for v in rounds.values()} == {3}
    ratios = [a / b for a, b in zip(rounds["fp32"], rounds["exported"])]
    assert toy["cpu_speedup_rounds"] == pytest.approx(ratios) and toy["cpu_speedup"] == pytest.approx(
        statistics.median(ratios)
    )
    assert toy["speedup_vs_dynamic_int8"] == pytest.approx(
        statistics.median([a / b for a, b in zip(rounds["dynamic_int8"], rounds["exported"])])
    )
    assert toy["fp32_ms"] == pytest.approx(statistics.median(rounds["fp32"]))
    # every peer either timed in the same rounds (its compilation apart) or reported with the reason it was not
    assert "fp32_compiled" in toy["peers"] and toy["peers"]["fp32_compiled"]["first_call_s"] > 0
    assert set(toy["peers"]) | set(toy["peers_missing"]) == {"dynamic_int8", "fp32_compiled", "torchao_int8_compiled"}
    for peer, entry in toy["peers"].items():
        assert len(rounds[peer]) == 3 and entry["speedup"] == pytest.approx(
            statistics.median([a / b for a, b in zip(rounds[peer], rounds["exported"])])
        )
        assert f"| {deploy.PEER_NAMES[peer]} | {toy[f'{peer}_ms']:.0f} |" in markdown
    for peer, why in toy["peers_missing"].items():
        assert f"| {deploy.PEER_NAMES[peer]} | not run: {why} |" in markdown
    assert f"**{toy['cpu_speedup']:.2f}×** ({min(ratios):.2f}–{max(ratios):.2f})" in markdown
    assert set(toy["gemm_path"].split(",")) <= {"int_mm", "avx2", "fp32"} and data["repeats"] == 1
    # batch 2 (one image with guidance) timed in its own rounds, shown as its own row
    pair = setting["models"]["toy at batch 2"]
    assert pair["batch"] == 2 and toy["batch"] == 8 and len(pair["rounds_ms"]["exported"]) == 3
    assert f"| native | toy at batch 2 | {pair['fp32_ms']:.0f} | {pair['exported_ms']:.0f} |" in markdown
    # peak memory of a short sampling run, each model in a fresh process, above what importing robuq takes
    for kind in ("fp32", "exported"):
        assert toy[f"{kind}_peak_bytes"] > toy[f"{kind}_peak_above_import_bytes"] > 0
    assert toy["peak_mem_ratio"] == pytest.approx(toy["fp32_peak_bytes"] / toy["exported_peak_bytes"])
    # the time of a forward by part: every role timed in both models, the parts adding up to the forward
    for kind in ("fp32", "exported"):
        parts = toy["breakdown"][kind]
        assert all(parts[role] > 0 for role in deploy.BREAKDOWN)
        assert sum(parts[role] for role in [*deploy.BREAKDOWN, "rest"]) == pytest.approx(parts["forward"])
    assert "| native | toy | attention core (QKᵀ, softmax, ·V) |" in markdown
    # the exported forward by kernel: groups and rest add up to the forward; every block linear runs an
    # integer GEMM or (AVX2 path) the fused ternary linear, and with the C kernels built the attention runs in
    # them, as do the unfused linears' input pass and epilogue
    kernels = toy["breakdown"]["exported_kernels"]
    fused = "ternary linear, fused (input pass, lookup GEMM, epilogue)"
    assert sum(kernels[group] for group in [*deploy.KERNELS, "rest"]) == pytest.approx(kernels["forward"])
    assert 0 < kernels["integer GEMM"] + kernels[fused] < kernels["forward"]
    if deploy.native.enabled():
        assert kernels["attention (8-bit, fused)"] > 0
        if kernels["integer GEMM"] > 0:
            assert (
                kernels["input pass (Hadamard, quantize, V·x)"] > 0
                and kernels["epilogue (rescale, U·branch, GELU)"] > 0
            )
    shown = "integer GEMM" if kernels["integer GEMM"] > 0 else fused
    assert f"| native | toy | {shown} | {kernels[shown]:.0f} |" in markdown


def test_qat_overhead(tmp_path):
    argv = ["--model", "toy", "--batch", "2", "--rounds", "1", "--threads", "1", "--results-dir", str(tmp_path)]
    _load("qat_overhead").main(argv)
    data, markdown = _record(tmp_path, "qat_overhead", "qat_overhead", argv)
    _finite(data, "machine")
    assert data["model"] == "toy" and data["input_size"] == 8 and data["batch"] == 2
    assert len(data["fp_ms_rounds"]) == len(data["quantized_ms_rounds"]) == 1
    assert data["fp_ms"] > 0 and data["quantized_ms"] > 0
    assert f"| {data['fp_ms']:.0f} | {data['quantized_ms']:.0f} | {data['ratio']:.2f} |" in markdown


@pytest.mark.slow  # six fresh interpreters that import torch: about fifteen seconds
def test_qat_memory(tmp_path):
    argv = [
        "--model",
        "toy",
        "--batches",
        "1,3",
        "--precisions",
        "fp32,bf16",
        "--checkpointing",
        "on",
        "--threads",
        "1",
        "--results-dir",
        str(tmp_path),
    ]
    _load("qat_memory").main(argv)
    data, markdown = _record(tmp_path, "qat_memory", "qat_memory", argv)
    _finite(data, "machine")
    assert data["model"] == "toy" and data["input_size"] == 8 and data["device"] == "cpu"
    rows = data["rows"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 3), ("bf16", 1), ("bf16", 3)]
    assert all(
        r["grad_checkpoint"] and r["peak_gib"] >= r["held_before_step_gib"] > r["baseline_gib"] > 0 for r in rows
    )
    assert len({r["student_params"] for r in rows}) == 1 and "work" not in rows[0]
    for f, pair in zip(data["fits"], (rows[:2], rows[2:])):  # two batches: the line through both points
        assert [f["fixed_gib"] + f["per_sample_gib"] * r["batch"] for r in pair] == pytest.approx(
            [r["peak_gib"] for r in pair]
        )
        assert f"| {f['precision']} | on | {f['fixed_gib']:.2f} | {f['per_sample_gib']:.3f} | 1, 3 |" in markdown
    assert f"| fp32 | on | 1 | {rows[0]['peak_gib']:.2f} |" in markdown and "not GPU figures" in markdown
    skip = [
        "--model",
        "toy",
        "--batches",
        "1",
        "--precisions",
        "fp32",
        "--checkpointing",
        "off",
        "--margin-gib",
        "1e6",
        "--results-dir",
        str(tmp_path / "skip"),
    ]
    _load("qat_memory").main(skip)
    data, markdown = _record(tmp_path / "skip", "qat_memory", "qat_memory", skip)
    assert "GiB available" in data["rows"][0]["skipped"] and data["fits"] == []
    assert "| fp32 | off | 1 | predicted" in markdown and "was not started" in markdown


def test_qat_memory_fit_and_bound():
    qat_memory = _load("qat_memory")
    rows = [
        {"batch": b, "peak_gib": 3.0 + 0.5 * b + noise, "held_before_step_gib": 2.5}
        for b, noise in ((1, 0.01), (2, -0.02), (4, 0.01))
    ]
    f = qat_memory.fit(rows)
    assert (
        f["batches"] == [1, 2, 4]
        and f["fixed_gib"] == pytest.approx(3.0, abs=0.05)
        and f["per_sample_gib"] == pytest.approx(0.5, abs=0.02)
    )
    assert qat_memory.fit(rows[:1]) is None and qat_memory.bound(rows) is None
    one = qat_memory.bound(rows[:1])  # the step's whole addition counted per sample: fixed 2.5, 1.01 per sample
    assert one["bound"] and one["fixed_gib"] == 2.5 and one["per_sample_gib"] == pytest.approx(1.01)
    assert qat_memory.predicted_gib(rows[:1], 2) == pytest.approx(2.5 + 2 * 1.01)
    assert qat_memory.predicted_gib(rows, 8) == pytest.approx(f["fixed_gib"] + 8 * f["per_sample_gib"])


def test_open_choices(tmp_path, teacher_file, fmnist_dir):
    open_choices = _load("open_choices")
    argv = [
        "--ckpt",
        teacher_file,
        "--images",
        "8",
        "--data-dir",
        str(fmnist_dir),
        "--results-dir",
        str(tmp_path / "results"),
    ]
    open_choices.main(argv)
    data, markdown = _record(tmp_path / "results", "open_choices", "open_choices", argv)
    _finite(data, "machine")
    assert [r["variant"] for r in data["rows"]] == list(open_choices.VARIANTS)
    for r in data["rows"]:
        assert all(r[f"a{b}"] > 0 for b in (4, 3, 2)), r
        assert f"| {r['variant']} | {r['a4']:.4f} | {r['a3']:.4f} | {r['a2']:.4f} |" in markdown


def test_activation_stats(tmp_path, teacher_file, fmnist_dir):
    stats = _load("activation_stats")
    argv = [
        "--ckpt",
        teacher_file,
        "--images",
        "4",
        "--timesteps",
        "100,900",
        "--data-dir",
        str(fmnist_dir),
        "--results-dir",
        str(tmp_path),
    ]
    stats.main(argv)
    data, markdown = _record(tmp_path, "activation_stats", "activation_stats", argv)
    _finite(data, "machine")
    assert sorted(data["per_layer"]) == sorted(f"blocks.{b}.{role}" for b in (0, 1) for role in stats.ROLES)
    for name, row in data["per_layer"].items():
        # 4 images × 2 timesteps × 16 tokens (8×8 latents in 2×2 patches); fc2 reads the 192-wide MLP.
        assert row["tokens"] == 4 * 2 * 16 and row["channels"] == (192 if name.endswith("fc2") else 48)
        for basis in ("before", "after", "after_signs"):
            # Min–max's 2-bit grid (3 steps) lies on its 4-bit grid (15 steps), so 4 bits never round worse.
            assert row[f"mse_a4_minmax_{basis}"] <= row[f"mse_a2_minmax_{basis}"], (name, basis)
    assert set(data["by_role"]) == set(stats.ROLES) and all(role in markdown for role in stats.ROLES)
    assert (tmp_path / data["figure"]).stat().st_size > 0


def test_ampn_runs(tmp_path, teacher_file, fmnist_dir):
    from robuq.ampn.pipeline import AMPNConfig, ampn_run
    from robuq.train.qat import QATConfig

    run = tmp_path / "runs" / "ampn-b2"
    config = QATConfig(
        teacher=teacher_file,
        data_dir=str(fmnist_dir),
        out_dir=str(run),
        steps=4,
        global_batch_size=8,
        log_every=1,
        ckpt_every=2,
        probe_every=1,
        probe_images=4,
        warmup_steps=1,
        device="cpu",
    )
    ampn_run(AMPNConfig(qat=config, budget=2.0, warmup_qat_steps=2, calibration_images=8), progress=False)
    argv = [str(run), "--results-dir", str(tmp_path / "results")]
    _load("ampn_runs").main(argv)
    data, markdown = _record(tmp_path / "results", "ampn", "ampn_runs", argv)
    _finite(data, "machine", "runs")
    (summary,) = data["runs"]
    assert summary["run"] == "ampn-b2" and summary["budget"] == 2.0 and summary["average_plain"] <= 2.0
    assert set(summary["role_averages"]) == {"qkv", "proj", "fc1", "fc2"}
    assert [step for step, _ in summary["start_bits_probe"]] == [1, 2] and [
        step for step, _ in summary["plan_probe"]
    ] == [3, 4]
    assert summary["warmup_seconds"] > 0 and summary["final_seconds"] > 0
    copied = tmp_path / "results" / "ampn" / "ampn-b2"
    for name in (
        "plan.json",
        "plan.png",
        "sensitivity.json",
        "warmup-log.jsonl",
        "final-log.jsonl",
        "final-config.json",
    ):
        assert (copied / name).stat().st_size > 0, name
    assert "[ampn-b2](ampn/ampn-b2/plan.png) | 2.0 |" in markdown


def test_export_fidelity(tmp_path, tiny_dit):
    import robuq

    config = robuq.preset("robuq", act_bits=3)
    path = robuq.save_quantized(robuq.quantize_(tiny_dit, config), tmp_path / "q.safetensors", config)
    results = tmp_path / "results"
    argv = ["--model", str(path), "--per-class", "1", "--steps", "2", "--threads", "1", "--results-dir", str(results)]
    _load("export_fidelity").main(argv)
    data, markdown = _record(results, "export_fidelity", "export_fidelity", argv)
    (row,) = data["rows"]
    assert row["samples"] == 10 and row["ddim_steps"] == 2
    for way in ("training_model_c_kernels", "exported_fp32", "exported_fp16"):
        assert (
            row[way]["psnr_db"] > 10 and 0 <= row[way]["within_2_levels"] <= 1 and 0 <= row[way]["max_abs_diff"] <= 255
        )
    assert f"| {row['exported_fp32']['psnr_db']:.1f} |" in markdown
    assert (results / "export_fidelity_grids" / row["grid"]).stat().st_size > 0
    assert "floor" in markdown


def _reproduce(reproduce, tmp_path, teacher, fmnist_dir, classifier, only, *extra):
    only = [only] if isinstance(only, str) else list(only)
    argv = [
        "--quick",
        "--teacher",
        teacher,
        "--steps",
        "2",
        "--samples-per-class",
        "1",
        "--data-dir",
        str(fmnist_dir),
        "--work-dir",
        str(tmp_path / "work"),
        "--only",
        "|".join(only),
        "--classifier",
        classifier,
        "--results-dir",
        str(tmp_path / "results"),
        "--no-inception",
        *extra,
    ]
    reproduce.main(argv)
    return argv


def test_reproduce_rows_without_training(tmp_path, teacher_file, fmnist_dir, classifier_file):
    reproduce = _load("reproduce")
    results = tmp_path / "results"
    with pytest.raises(SystemExit, match="no row's method contains"):
        _reproduce(reproduce, tmp_path, teacher_file, fmnist_dir, classifier_file, "W1.58A9")
    _reproduce(reproduce, tmp_path, teacher_file, fmnist_dir, classifier_file, "FP teacher")
    # several texts select the rows that hold any of them
    argv = _reproduce(reproduce, tmp_path, teacher_file, fmnist_dir, classifier_file, ("RTN", "no such row"))
    data, markdown = _record(results, "reproduce_quick", "reproduce", argv)
    rows = data["rows"]
    # The --only runs join one table in the table's row order, guidance scales in order.
    assert [(r["method"], r["guidance"]) for r in rows] == [
        ("real training images (reference)", 0.0),
        ("FP teacher", 1.5),
        ("FP teacher", 4.0),
        ("RTN W1.58A4 (no training)", 1.5),
    ]
    assert [run["only"] for run in data["only_runs"]] == [["RTN", "no such row"]]
    for r in rows[1:]:
        _finite(r, "psnr_vs_fp")
        assert r["qat_seconds"] == 0.0  # neither row trains
    assert rows[1]["psnr_vs_fp"] == float("inf")  # the teacher's samples are the paired reference
    rtn = rows[3]
    assert (
        (rtn["w_bits"], rtn["a_bits"]) == (1.58, 4) and 0 < rtn["bops_ratio"] < 1 and math.isfinite(rtn["psnr_vs_fp"])
    )
    assert (
        f"| {rtn['method']} | 1.5 | {rtn['fid']:.2f} | — | {rtn['sfid']:.2f} |" in markdown
    )  # no Inception-FID asked for
    assert (results / "reproduce_quick.png").stat().st_size > 0
    assert any((results / "reproduce_quick_grids").glob("*.png"))  # a quick table never overwrites the full one's grids
    assert not (results / "reproduce_grids").exists()


@pytest.mark.slow
def test_reproduce_quick_path_with_ampn_rescore_and_restart(tmp_path, teacher_file, fmnist_dir, classifier_file):
    reproduce = _load("reproduce")
    results = tmp_path / "results"
    for only in ("FP teacher", "RobuQ + AMPN W1.58A2", "RTN"):
        _reproduce(reproduce, tmp_path, teacher_file, fmnist_dir, classifier_file, only)
    rows = json.loads((results / "reproduce_quick.json").read_text())["rows"]
    assert [(r["method"], r["guidance"]) for r in rows] == [
        ("real training images (reference)", 0.0),
        ("FP teacher", 1.5),
        ("FP teacher", 4.0),
        ("RTN W1.58A4 (no training)", 1.5),
        ("RobuQ + AMPN W1.58A2", 1.5),
        ("RobuQ + AMPN W1.58A2", 4.0),
    ]
    required = {
        "method",
        "w_bits",
        "a_bits",
        "ampn",
        "guidance",
        "fid",
        "sfid",
        "is",
        "precision",
        "recall",
        "psnr_vs_fp",
        "bops_ratio",
        "qat_seconds",
    }
    assert required <= set(rows[4]) and rows[4]["ampn"] and rows[4]["qat_seconds"] > 0 and 0 < rows[4]["bops_ratio"] < 1

    # --rescore recomputes the metrics from the samples left in the work folder and keeps the rest; with
    # Inception weights (here a random network in pytorch-fid's layout) it adds the Inception-FID column.
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pth")
    (tmp_path / "work" / "fp-teacher" / "samples-cfg4.0.npz").rename(tmp_path / "moved.npz")
    argv = [
        "--quick",
        "--rescore",
        "--data-dir",
        str(fmnist_dir),
        "--work-dir",
        str(tmp_path / "work"),
        "--classifier",
        classifier_file,
        "--results-dir",
        str(results),
        "--inception-weights",
        str(tmp_path / "inception.pth"),
        "--inception-reference",
        "4",
    ]
    reproduce.main(argv)
    (tmp_path / "moved.npz").rename(tmp_path / "work" / "fp-teacher" / "samples-cfg4.0.npz")
    rescored, table = _record(results, "reproduce_quick", "reproduce", argv)
    assert [r["method"] for r in rescored["rows"]] == [r["method"] for r in rows]
    assert rescored["rows"][4]["fid"] == rows[4]["fid"] and rescored["rows"][4]["qat_seconds"] == rows[4]["qat_seconds"]
    assert rescored["table_run"]["command"].split(" ", 1)[1].startswith("benchmarks/reproduce.py --quick --teacher")
    assert rescored["rows"][3]["fid_inception"] > 0 and rescored["rows"][3]["inception_reference"] == 4
    assert rescored["not_rescored"] == ["FP teacher (cfg 4.0)"] and "fid_inception" not in rescored["rows"][2]
    assert "Inception-FID" in table and "Spearman" in table and "Not re-scored" in table
    # A second rescoring keeps the training run's provenance, not the first rescoring's.
    reproduce.main(argv)
    assert json.loads((results / "reproduce_quick.json").read_text())["table_run"] == rescored["table_run"]

    # A restarted table reuses a finished row's samples and its recorded QAT time.
    (results / "reproduce_quick.json").unlink()
    _reproduce(reproduce, tmp_path, teacher_file, fmnist_dir, classifier_file, "RobuQ + AMPN W1.58A2")
    again = json.loads((results / "reproduce_quick.json").read_text())["rows"]
    assert [(r["fid"], r["qat_seconds"]) for r in again[1:]] == [(r["fid"], r["qat_seconds"]) for r in rows[4:]]

    # The AMPN row's run folder is a complete `ampn run`: the collector reads it like scripts/ampn_teacher.sh's.
    summary = _load("ampn_runs").summarize(tmp_path / "work" / "robuq---ampn-w1-58a2", tmp_path / "collected")
    assert summary["budget"] == 2.0 and set(summary["role_averages"]) == {"qkv", "proj", "fc1", "fc2"}
    assert summary["plan_probe"] and summary["warmup_seconds"] > 0
    assert (tmp_path / "collected" / "robuq---ampn-w1-58a2" / "plan.png").stat().st_size > 0


def test_gpu_check_skips_cleanly_without_cuda(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load("gpu_check").main(["--out", str(tmp_path / "check")]) == 0
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "check").exists()


def test_gpu_check_keeps_every_other_section_when_one_fails(tmp_path, monkeypatch):
    """A CPU rehearsal of every section at tiny size, one made to fail: the others' results are on disk, the
    failure is recorded with its traceback, and the summary answers from what ran."""
    pytest.importorskip("diffusers")
    gpu_check = _load("gpu_check")

    def broken(config, device):
        raise RuntimeError("CUDA out of memory (injected)")

    sections = [(n, broken if n == "sampling" else f, limit) for n, f, limit in gpu_check.SECTIONS]
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    out = tmp_path / "check"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--no-tests", "--out", str(out)]) == 0
    failed = json.loads((out / "sampling.json").read_text())
    assert failed["status"] == "error" and "injected" in failed["traceback"]
    for name, _, _ in sections:
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
        if name != "sampling":
            assert json.loads((out / f"{name}.json").read_text())["status"] == "ok", name
    correct = json.loads((out / "kernels_correct.json").read_text())["result"]
    assert correct["pass"] and all(r["relative_error"] < 1e-5 for r in correct["rows"] if "relative_error" in r)
    qat = json.loads((out / "qat_step.json").read_text())["result"]["rows"]
    assert {r["grad_checkpoint"] for r in qat} == {False, True} and all(r["ema"] and r["loss"] == "mix" for r in qat)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdicts"]["correct"] == "yes" and summary["sections"]["sampling"] == "error"
    assert "gpu_check: sampling: error" in (out / "stdout.txt").read_text()


def test_gpu_check_stops_before_its_budget_and_limits_each_section(tmp_path, monkeypatch):
    import time

    gpu_check = _load("gpu_check")
    slow = lambda config, device: time.sleep(30)  # noqa: E731
    monkeypatch.setattr(
        gpu_check,
        "SECTIONS",
        [("stuck", slow, 1), ("next", lambda c, d: time.sleep(3) or {"rows": []}, 20), ("late", lambda c, d: {}, 20)],
    )
    out = tmp_path / "check"
    start = time.perf_counter()
    gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--budget-s", "22"])
    assert time.perf_counter() - start < 10
    assert "limit" in json.loads((out / "stuck.json").read_text())["error"]
    assert json.loads((out / "next.json").read_text())["status"] == "ok"
    assert json.loads((out / "late.json").read_text())["status"] == "skipped"  # under 20 s of budget were left


def test_gpu_check_errors_are_relative_to_the_reference_scale():
    gpu_check = _load("gpu_check")
    reference = torch.tensor([1e-6, -2e-6, 0.0])
    assert gpu_check.relative_error(reference * (1 + 1e-7), reference) < 1e-6  # tiny outputs: a tiny relative error
    assert gpu_check.relative_error(reference + 1e-6, reference) == pytest.approx(0.5)


def test_deploy_times_every_gemm_path_and_tabulates_them(tmp_path):
    import argparse

    deploy = _load("deploy")
    rows = deploy.path_rows(1, tokens=12, models=("DiT-S/2",))
    assert [r["layer"] for r in rows] == ["qkv", "proj", "fc1", "fc2"]
    for r in rows:
        assert {f"{p}_gemm_ms" for p in deploy.available_paths()} | {"fp32_matmul_ms", "dynamic_int8_linear_ms"} <= set(
            r
        )
    setting = {
        "setting": "native",
        "machine": deploy.machine(),
        "paths": rows,
        "models": {
            "DiT-S/2": {
                "fp32_ms": 2.0,
                "fp32_native_elementwise_ms": 2.0,
                "dynamic_int8_ms": 1.5,
                "exported_ms": 1.0,
                "gemm_path": "avx2",
                "cpu_speedup": 2.0,
                "speedup_vs_dynamic_int8": 1.5,
                "cpu_speedup_vs_fp32_native_elementwise": 2.0,
            }
        },
    }
    text = deploy.markdown([], [], [setting], argparse.Namespace(act_bits=3, threads=2, clock="wall"))
    assert "| native | DiT-S/2 | 2 | 1 | avx2 | — | **2.00×** | 2.00× |" in text
    # a result written before the compiled peers: its dynamic int8 model is still a row of the peers' table
    assert "| native | DiT-S/2 | PyTorch dynamic int8 (torch.ao, eager) | 2 | 1 | **1.50×** | — |" in text
    assert setting["machine"]["cpu_model"] in text and "int mm gemm" in text
    result = tmp_path / "deploy.json"  # --render rebuilds the table from the numbers a run wrote
    result.write_text(
        json.dumps(
            {
                "sizes": [],
                "linears": [],
                "settings": [setting],
                "act_bits": 3,
                "threads": 2,
                "command": "python deploy.py",
                "date": "today",
                "machine": setting["machine"],
            }
        )
    )
    deploy.render(result)
    assert text in result.with_suffix(".md").read_text()


def test_rank_agreement_counts_the_pairs_ordered_apart():
    reproduce = _load("reproduce")
    rows = [
        {"method": m, "guidance": 1.5, "fid": f, "fid_inception": i}
        for m, f, i in [("a", 10.0, 1.0), ("b", 20.0, 3.0), ("c", 30.0, 2.0), ("d", 40.0, 4.0)]
    ]
    agreement = reproduce.rank_agreement(rows + [{"method": "e", "guidance": 1.5, "fid": 50.0}])
    assert agreement["rows"] == 4 and agreement["pairs"] == 6
    assert agreement["flipped"] == [("b (cfg 1.5)", "c (cfg 1.5)")] and agreement["spearman"] == pytest.approx(0.8)


def test_convergence_fid_for_the_intervals_is_robuqs_fid():
    from robuq.eval.metrics import FeatureStats, fid

    convergence_stats = _load("convergence_stats")
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(400, 24, generator=g).double().numpy()
    for n in (10, 300):  # fewer samples than dimensions, and more
        samples = (1.3 * torch.randn(n, 24, generator=g) + 0.2).double().numpy()
        expected = fid(FeatureStats.of(reference), FeatureStats.of(samples))
        assert convergence_stats.FixedReferenceFID(reference)(samples) == pytest.approx(expected, rel=1e-6)


def test_convergence_intervals_cover_the_expected_fid_at_the_sample_count():
    """On Gaussian features, whose FID at n samples can be averaged over many fresh sample sets, the centred
    half-sample intervals cover that mean (and the ratio and difference of two such means) about as often as
    they claim; a bootstrap with replacement, as the report once used, mostly misses it."""
    convergence_stats = _load("convergence_stats")
    rng = np.random.default_rng(0)
    d, n, trials, rounds = 16, 200, 60, 100
    fid_of = convergence_stats.FixedReferenceFID(rng.standard_normal((2000, d)))
    draw_a = lambda: 1.15 * rng.standard_normal((n, d)) + 0.2  # noqa: E731
    draw_b = lambda: 1.05 * rng.standard_normal((n, d)) + 0.1  # noqa: E731
    mean_a = np.mean([fid_of(draw_a()) for _ in range(600)])
    mean_b = np.mean([fid_of(draw_b()) for _ in range(600)])
    halves = convergence_stats.half_sample_indices(n, rounds)
    covered = {"fid": 0, "ratio": 0, "difference": 0, "with replacement": 0}
    for _ in range(trials):
        a, b = draw_a(), draw_b()
        scores = {
            key: {"fid": fid_of(x), "replicates": [fid_of(x[i]) for i in halves], "rounds": rounds}
            for key, x in (("a", a), ("b", b))
        }
        ratio = convergence_stats.interval_summary(scores, "a", "b")
        difference = convergence_stats.interval_summary(scores, "a", "b", ratio=False)
        assert ratio["low"] <= ratio["fid"] <= ratio["high"]
        covered["fid"] += ratio["low"] <= mean_a <= ratio["high"]
        covered["ratio"] += ratio["ratio_low"] <= mean_a / mean_b <= ratio["ratio_high"]
        covered["difference"] += difference["difference_low"] <= mean_a - mean_b <= difference["difference_high"]
        with_replacement = [fid_of(a[rng.integers(0, n, n)]) for _ in range(rounds)]
        low, high = convergence_stats.percentile_interval(np.asarray(with_replacement))
        covered["with replacement"] += low <= mean_a <= high
    rates = {k: v / trials for k, v in covered.items()}
    # 95% nominal; with 60 trials a rate's standard error is about 0.03
    assert min(rates["fid"], rates["ratio"], rates["difference"]) >= 0.85, rates
    assert rates["with replacement"] < 0.5, rates


def test_convergence_shuffled_plans_keep_the_budget_and_intervals_read_ties(tmp_path):
    convergence = _load("convergence")
    convergence_stats = _load("convergence_stats")
    config = convergence.ConvergenceConfig(
        work_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "results"), control_seeds=3
    )
    work = Path(config.work_dir)
    plan = {
        f"blocks.{i}.{r}": b
        for i, (r, b) in enumerate(
            zip(["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] * 3, [1, 2, 3, 4, 2, 2, 1, 3, 2, 2, 4, 1])
        )
    }
    folder = convergence.run_dir(work, convergence.AMPN_A2)
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps({"bits": plan}))
    warm = {}
    for seed in range(3):  # as if the warm-ups had run
        warm[seed] = convergence.warmup_checkpoint(config, work, convergence.ampn_seed_name(seed))
        warm[seed].parent.mkdir(parents=True)
        warm[seed].write_bytes(b"")
    convergence.prepare_controls(config, work)
    shuffles = [json.loads((work / "plans" / f"shuffled-{k}.json").read_text())["bits"] for k in (1, 2, 3)]
    for shuffled in shuffles:
        assert set(shuffled) == set(plan) and sorted(shuffled.values()) == sorted(plan.values()) and shuffled != plan
    assert len({json.dumps(s, sort_keys=True) for s in shuffles}) == 3
    # Three runs a side: AMPN seeds 1 and 2 beside the headline row, a uniform plan continuing from the warm-up
    # of AMPN with the same seed, and three shuffles continuing from AMPN's own warm-up.
    runs = {r.name: r.command for r in convergence.control_runs(config, work)}
    assert list(runs) == [
        "control: AMPN seed 1",
        "control: AMPN seed 2",
        "control: uniform A2 seed 0",
        "control: uniform A2 seed 1",
        "control: uniform A2 seed 2",
        "control: shuffled AMPN plan 1",
        "control: shuffled AMPN plan 2",
        "control: shuffled AMPN plan 3",
    ]

    def flag(command, name):
        return command[command.index(name) + 1] if name in command else None

    for seed in range(3):
        uniform = runs[f"control: uniform A2 seed {seed}"]
        assert flag(uniform, "--continue-from") == str(warm[seed]) and flag(uniform, "--seed") == (
            str(seed) if seed else None
        )
    # Shuffles 1 and 2 train with seed 0 as in the first design; a third spreads to another seed.
    assert [flag(runs[f"control: shuffled AMPN plan {k}"], "--continue-from") for k in (1, 2, 3)] == [
        str(warm[0]),
        str(warm[0]),
        str(warm[2]),
    ]
    assert [flag(runs[f"control: shuffled AMPN plan {k}"], "--seed") for k in (1, 2, 3)] == [None, None, "2"]
    assert [
        convergence.run_seed(n)
        for n in (
            "control: AMPN seed 2",
            convergence.AMPN_A2,
            "control: shuffled AMPN plan 1",
            "control: shuffled AMPN plan 3",
        )
    ] == [2, 0, 0, 2]
    # A point wanted twice (the controls' sample count equal to the headline's) is scored once.
    same = dataclasses.replace(config, samples_control=config.samples_headline)
    keys = [p.key for p in convergence.score_points(same, work)]
    assert len(keys) == len(set(keys)) and f"{convergence.slug(convergence.AMPN_A2)}-step3000-n2000" in keys
    scores = {
        "a": {"fid": 10.0, "replicates": [9.0, 10.0, 11.0, 10.0] * 10, "rounds": 40},
        "b": {"fid": 10.2, "replicates": [8.9, 10.4, 11.1, 10.4] * 10, "rounds": 40},
        "c": {"fid": 20.0, "replicates": [19.0, 20.0, 21.0, 20.0] * 10, "rounds": 40},
    }
    tie = convergence_stats.interval_summary(scores, "a", "b", ratio=False)
    assert tie["difference_low"] <= 0 <= tie["difference_high"]
    ahead = convergence_stats.interval_summary(scores, "a", "c", ratio=False)
    assert ahead["difference_high"] < 0
    ratio = convergence_stats.interval_summary(scores, "c", "a")
    assert ratio["ratio"] == pytest.approx(2.0) and ratio["ratio_low"] <= 2.0 <= ratio["ratio_high"]


def test_convergence_claims_read_targets_and_both_noises():
    """A claim is met only by the measurements: a ratio over its target misses, and AMPN counts as ahead of the
    strong baseline only when the gap is outside the sample interval and larger than the gap between two seeds."""
    convergence_stats = _load("convergence_stats")

    def row(name, ratio):
        return {
            "name": name,
            "steps": 3000,
            "samples": 2000,
            "classifier": {"ratio": ratio, "ratio_low": ratio - 0.01, "ratio_high": ratio + 0.01},
        }

    def gap(name, kind, difference, step=1000, half_width=0.5):
        return {
            "comparison": f"{name} (step {step})",
            "label": name,
            "kind": kind,
            "step": step,
            "space": "classifier",
            "difference": difference,
            "difference_low": difference - half_width,
            "difference_high": difference + half_width,
        }

    teacher = {"classifier": {"fid": 80.0}}
    targets = {"RobuQ W1.58A4": 1.2, "RobuQ + AMPN W1.58A3": 1.5, "RobuQ + AMPN W1.58A2": 2.0}
    final = [row("RobuQ W1.58A4", 1.05), row("RobuQ + AMPN W1.58A3", 1.6), row("strong baseline W1.58A2", 2.5)]
    noise = [gap("uniform seeds", "training noise", 1.5), gap("AMPN seeds", "training noise", -3.0)]
    claims = {
        c["claim"].split(" within")[0].split(" ahead")[0]: c
        for c in convergence_stats.read_claims(
            final, [gap("vs baseline", "baseline", -6.0), *noise], teacher, 3000, targets
        )
    }
    assert claims["RobuQ W1.58A4"]["verdict"] == "met" and "1.05" in claims["RobuQ W1.58A4"]["evidence"]
    assert claims["RobuQ + AMPN W1.58A3"]["verdict"] == "missed"
    assert claims["RobuQ + AMPN W1.58A2"]["verdict"] == "not measured yet"
    assert claims["RobuQ + AMPN"]["verdict"] == "met"
    assert claims["AMPN's plan"]["verdict"] == "not measured yet"
    # −2.0 is outside its sample interval but inside the 3.0 two seeds put apart: a tie.
    (close,) = [
        c
        for c in convergence_stats.read_claims(
            final, [gap("vs baseline", "baseline", -2.0), *noise], teacher, 3000, targets
        )
        if "baseline" in c["claim"]
    ]
    assert close["verdict"] == "tie" and "inside the training noise, 3.00" in close["evidence"]
    behind = convergence_stats.read_claims(final, [gap("vs baseline", "baseline", 5.0), *noise], teacher, 3000, targets)
    assert [c["verdict"] for c in behind if "baseline" in c["claim"]] == ["missed"]
    assert convergence_stats.read_difference(gap("x", "chance", -4.0), {}) == "tie until the training noise is measured"
    assert (
        convergence_stats.read_difference(gap("x", "chance", 0.2), {"classifier": 0.1})
        == "tie (inside the sample noise)"
    )


def test_convergence_reads_ampn_against_chance_over_runs():
    """AMPN against chance is read on the mean FID of its runs against the controls' means, with a Welch
    interval over runs (the same as scipy's Welch test), at the step where both controls have the most runs."""
    from scipy import stats

    convergence = _load("convergence")
    convergence_stats = _load("convergence_stats")

    def rows(step, ampn, uniform, shuffled):
        names = (
            [(convergence.ampn_seed_name(i), True, f) for i, f in enumerate(ampn)]
            + [(f"control: uniform A2 seed {i}", "uniform", f) for i, f in enumerate(uniform)]
            + [(f"control: shuffled AMPN plan {i + 1}", "random", f) for i, f in enumerate(shuffled)]
        )
        return [
            {
                "name": n,
                "act_bits": 2,
                "ampn": kind,
                "steps": step,
                "samples": 1000,
                "classifier": {"fid": f, "ratio": f / 80, "ratio_low": f / 80, "ratio_high": f / 80},
            }
            for n, kind, f in names
        ]

    teacher = {"classifier": {"fid": 80.0}}
    targets = convergence.headline_targets()
    assert targets == {"RobuQ W1.58A4": 1.2, "RobuQ + AMPN W1.58A3": 1.5, "RobuQ + AMPN W1.58A2": 2.0}
    clear = rows(3000, [140.0, 141.5, 139.0], [150.0, 151.0, 148.5], [152.0, 149.0, 151.5])
    # A headline point of AMPN A2 at another sample count, and the A3 row and the strong baseline even at the
    # controls' sample count, must not enter the means.
    clear.insert(
        0,
        {
            "name": convergence.AMPN_A2,
            "act_bits": 2,
            "ampn": True,
            "steps": 3000,
            "samples": 2000,
            "classifier": {"fid": 240.0, "ratio": 3.0, "ratio_low": 2.9, "ratio_high": 3.1},
        },
    )
    clear += [
        {
            "name": "RobuQ + AMPN W1.58A3",
            "act_bits": 3,
            "ampn": True,
            "steps": 3000,
            "samples": 1000,
            "classifier": {"fid": 300.0, "ratio": 3.75, "ratio_low": 3.7, "ratio_high": 3.8},
        },
        {
            "name": "strong baseline W1.58A2",
            "act_bits": 2,
            "ampn": False,
            "steps": 3000,
            "samples": 1000,
            "classifier": {"fid": 10.0, "ratio": 0.125, "ratio_low": 0.12, "ratio_high": 0.13},
        },
    ]
    over = convergence_stats.chance_over_runs(clear, 1000)
    assert [(e["control"], e["ampn_runs"], e["control_runs"]) for e in over] == [
        ("uniform plan", 3, 3),
        ("shuffled AMPN plan", 3, 3),
    ]
    expected = stats.ttest_ind([140.0, 141.5, 139.0], [150.0, 151.0, 148.5], equal_var=False).confidence_interval(0.95)
    assert over[0]["difference"] == pytest.approx(140.1667 - 149.8333, abs=1e-3)
    assert (over[0]["difference_low"], over[0]["difference_high"]) == pytest.approx((expected.low, expected.high))
    # Resolved with three runs a side; the gap 8 points apart runs put inside their spread needs more of them.
    assert over[0]["runs_to_resolve"] == 2  # pooled sd 1.26: t(2 df) · 1.26 · √(2/2) = 5.4 < 9.7
    wide = convergence_stats.chance_over_runs(rows(3000, [136.0, 144.0], [150.0, 149.0], [151.0, 152.0]), 1000)
    assert wide[0]["runs_to_resolve"] > 2
    # Runs with no spread at all give nothing to read a gap against: no reading, rather than a certain one.
    assert convergence_stats.chance_over_runs(rows(3000, [140.0, 140.0], [150.0, 150.0], [150.0, 150.0]), 1000) == []

    def chance_claim(final):
        (claim,) = [
            c
            for c in convergence_stats.read_claims(
                final, [], teacher, 3000, targets, convergence_stats.chance_over_runs(final, 1000)
            )
            if "plan" in c["claim"]
        ]
        return claim

    assert chance_claim(clear)["verdict"] == "met" and "3 vs 3 runs" in chance_claim(clear)["evidence"]
    # The A2 target is read on the row's own 2,000 samples, not on the control's 1,000 at the same step.
    (a2,) = [
        c
        for c in convergence_stats.read_claims(clear, [], teacher, 3000, targets)
        if c["claim"].startswith(convergence.AMPN_A2)
    ]
    assert a2["verdict"] == "missed" and "3.00" in a2["evidence"]
    # Two runs a side 8 points apart: the same mean gap is inside the spread between runs.
    assert chance_claim(rows(3000, [136.0, 144.0], [150.0, 149.0], [151.0, 152.0]))["verdict"] == "tie"
    assert (
        chance_claim(rows(3000, [150.0, 151.0, 149.0], [140.0, 141.0, 139.5], [150.0, 151.0, 152.0]))["verdict"]
        == "missed"
    )
    assert chance_claim(rows(3000, [140.0], [150.0, 151.0], [150.0, 152.0]))["verdict"] == "not measured yet"

    # The held-out probe, read the same way over the A2 runs only (not the A3 row, not the strong baseline).
    def curve(value):
        return [{"step": 900, "probe_guided_rel_mse": 1.0}, {"step": 1000, "probe_guided_rel_mse": value}]

    curves = {
        convergence.AMPN_A2: curve(0.010),
        "control: AMPN seed 1": curve(0.011),
        "control: uniform A2 seed 0": curve(0.013),
        "control: uniform A2 seed 1": curve(0.012),
        "control: shuffled AMPN plan 1": curve(0.013),
        "control: shuffled AMPN plan 2": [{"step": 1000, "probe_guided_rel_mse": None}],
        "RobuQ + AMPN W1.58A3": curve(0.0),
        "strong baseline W1.58A2": curve(0.5),
    }
    (only,) = convergence.probe_over_runs(curves, [1000, 3000])  # a shuffle without a probe value: no shuffle reading
    assert (only["control"], only["step"], only["space"]) == ("uniform plan", 1000, "probe")
    assert (only["ampn_runs"], only["control_runs"]) == (2, 2)
    assert only["ampn_mean"] == pytest.approx(0.0105) and only["difference"] == pytest.approx(-0.002)
    # Read at the last step where both controls are measured: step 3000 lacks its shuffles, so step 1000 counts.
    partial = rows(1000, [140.0, 141.5, 139.0], [150.0, 151.0, 148.5], [152.0, 149.0, 151.5]) + rows(
        3000, [150.0, 151.0], [140.0, 141.0], []
    )
    assert chance_claim(partial)["verdict"] == "met" and "step 1000" in chance_claim(partial)["evidence"]
    # Three runs a side at step 1000 say more than two at step 3000; with as many runs, the later step counts.
    thinner = rows(1000, [140.0, 141.5, 139.0], [150.0, 151.0, 148.5], [152.0, 149.0, 151.5]) + rows(
        3000, [150.0, 151.0], [140.0, 141.0], [150.0, 152.0]
    )
    assert "step 1000" in chance_claim(thinner)["evidence"] and "step 3000" not in chance_claim(thinner)["evidence"]
    later = rows(1000, [140.0, 141.5], [150.0, 151.0], [152.0, 149.0]) + rows(
        3000, [150.0, 151.0], [140.0, 141.0], [150.0, 152.0]
    )
    assert "step 3000" in chance_claim(later)["evidence"]


def test_convergence_chance_plot_marks_each_arms_mean():
    """The chance panel draws every run with its interval and, per arm with two runs or more, a dashed line at
    the mean the claim reads."""
    from matplotlib.figure import Figure

    convergence = _load("convergence")
    fids = {
        convergence.AMPN_A2: (True, 140.0),
        "control: AMPN seed 1": (True, 136.0),
        "control: uniform A2 seed 0": ("uniform", 141.0),
        "control: uniform A2 seed 1": ("uniform", 139.0),
        "control: shuffled AMPN plan 1": ("random", 144.0),
        "control: shuffled AMPN plan 2": ("random", 146.0),
    }
    final = [
        {
            "name": name,
            "ampn": arm,
            "steps": 1000,
            "samples": 1000,
            **{
                space: {"fid": fid + shift, "low": fid + shift - 2, "high": fid + shift + 2}
                for space, shift in (("classifier", 0.0), ("inception", -40.0))
            },
        }
        for name, (arm, fid) in fids.items()
    ]
    ax = Figure().subplots()
    convergence.plot_chance({"final": final, "settings": {"control_steps": "1000,3000", "samples_control": 1000}}, ax)
    flat = sorted(
        round(float(seg[0][1]), 6)
        for c in ax.collections
        for seg in c.get_segments()
        if len(seg) == 2 and seg[0][1] == seg[1][1] and seg[0][0] != seg[1][0]
    )
    assert flat == sorted([138.0, 140.0, 145.0, 98.0, 100.0, 105.0])


def test_convergence_at_toy_size(tmp_path, teacher_file, fmnist_dir, monkeypatch):
    """The pilot, one headline row and the scoring, end to end through the `robuq` commands the benchmark
    runs: logs, kept samples (the same labels for every row), the exported model and the report's JSON."""
    convergence = _load("convergence")
    results, work = tmp_path / "results", tmp_path / "work"
    common = [
        "--toy",
        "--installed",
        "--no-inception",
        "--teacher",
        teacher_file,
        "--data-dir",
        str(fmnist_dir),
        "--work-dir",
        str(work),
        "--results-dir",
        str(results),
    ]
    convergence.main(["--stage", "pilot", "--only", "pilot: new recipe", *common])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as when two runs share the machine; the report says so
    convergence.main(["--stage", "headline", "--only", "RobuQ + AMPN W1.58A2", *common])
    convergence.main(["--stage", "rank", "--only", "RobuQ W1.58A4 rank 0", *common])
    convergence.main(["--stage", "seeds", "--only", "strong baseline W1.58A2 seed 1", *common])
    monkeypatch.delenv("OMP_NUM_THREADS")
    argv = ["--stage", "score", *common]
    convergence.main(argv)
    data, markdown = _record(results, "convergence", "convergence", argv)
    (pilot,) = data["pilot"]
    assert pilot["name"] == "pilot: new recipe" and pilot["finished"] and pilot["probe_guided_rel_mse"] > 0
    assert data["teacher"]["classifier"]["fid"] > 0 and "inception" not in data["teacher"]
    (second,) = [e for e in data["final"] if e["name"] == "strong baseline W1.58A2 seed 1"]
    assert second["seeds"] == [1] and second["act_bits"] == 2 and second["ampn"] is False and second["rank"] == 16
    row, rank0 = sorted((e for e in data["final"] if e["steps"] == 12 and e is not second), key=lambda e: -e["rank"])
    assert row["name"] == "RobuQ + AMPN W1.58A2" and row["ampn"] is True and row["samples"] == 20
    assert row["rank"] == 16 and row["seeds"] == [0] and row["seeds_fid"]["0"]["classifier"] == row["classifier"]["fid"]
    assert rank0["name"] == "RobuQ W1.58A4 rank 0" and rank0["rank"] == 0 and rank0["act_bits"] == 4
    assert data["teacher"]["commit"] == "installed"  # the library that sampled the teacher is recorded
    floor = data["teacher"]["vs_teacher_samples"]["classifier"]
    assert floor["low"] <= floor["fid"] <= floor["high"]
    assert row["vs_teacher_samples"]["classifier"]["fid"] > 0
    assert "## FID against the teacher's own samples" in markdown and "| RobuQ W1.58A4 rank 0 | 0 |" in markdown
    c = row["classifier"]
    assert c["low"] <= c["fid"] <= c["high"] and c["ratio_low"] <= c["ratio"] <= c["ratio_high"]
    assert row["model"] == "convergence/models/robuq---ampn-w1-58a2.robuq.safetensors"
    assert (results / row["model"]).stat().st_size > 0
    kept = results / "convergence"
    log = [json.loads(line) for line in (kept / "logs" / "robuq---ampn-w1-58a2.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"warm-up", "with plan"} and log[-1]["step"] == 12
    assert (kept / "logs" / "robuq---ampn-w1-58a2-plan.json").is_file()
    teacher = np.load(kept / "samples" / "full-precision-teacher-n20.npz")
    student = np.load(kept / "samples" / "robuq---ampn-w1-58a2-step12-n20.npz")
    assert torch.equal(torch.as_tensor(teacher["labels"]), torch.as_tensor(student["labels"]))
    assert student["images"].shape == (20, 8, 8) and student["images"].dtype == np.uint8
    assert "| RobuQ + AMPN W1.58A2 | True | 12 | 20 |" in markdown
    verdicts = {c["claim"].split(" within")[0]: c["verdict"] for c in data["claims"]}
    assert verdicts["RobuQ + AMPN W1.58A2"] in ("met", "missed") and verdicts["RobuQ W1.58A4"] == "not measured yet"
    assert "## Claims, read from the measurements" in markdown
    assert row["threads"] == ["1"] and "RobuQ + AMPN W1.58A2: 1" in markdown
    assert (results / "convergence.png").stat().st_size > 0
    next((work / "features").glob("robuq---ampn-w1-58a2-step12-*-classifier.npy")).unlink()  # a new machine's state
    before = (results / "convergence.json").read_text()
    convergence.main(["--stage", "report", *common])
    assert (results / "convergence.json").read_text() == before  # a report that would drop scored rows is not written
    convergence.main(["--stage", "score", *common])  # the features back
    data["final"][0]["inception"] = {"fid": 1.0}  # as the committed results, scored in both spaces
    (results / "convergence.json").write_text(json.dumps(data))
    before = (results / "convergence.json").read_text()
    convergence.main(["--stage", "report", *common])
    assert (results / "convergence.json").read_text() == before  # --no-inception would drop the Inception FIDs


def test_gpu_check_references_never_enter_a_kernel(monkeypatch):
    """gpu_check compares each Triton kernel with a reference: the references must not reach a robuq kernel or a
    registered back-end (it compared the Hadamard kernel with itself), and must compute robuq's numbers."""
    from robuq.kernels import triton_ops
    from robuq.quant import backends
    from robuq.quant.activation import activation_levels
    from robuq.quant.hadamard import hadamard_transform, random_signs

    gpu_check = _load("gpu_check")
    x, signs = torch.randn(6, 384), random_signs(384)
    expected = hadamard_transform(x, signs)

    def refuse(*args, **kwargs):
        raise AssertionError("a reference entered a kernel")

    for name in ("hadamard", "hadamard_quantize", "lowbit_matmul", "_launch_hadamard"):
        monkeypatch.setattr(triton_ops, name, refuse)
    monkeypatch.setattr(backends, "backend_for", refuse)
    rotated = gpu_check.hadamard_reference(x, signs)
    assert torch.allclose(rotated, expected, atol=1e-5)
    assert torch.equal(
        gpu_check.quantize_reference(rotated, 2, "gaussian").levels,
        activation_levels(rotated, 2, "token", "gaussian").levels,
    )
    levels = torch.randint(0, 4, (5, 8), dtype=torch.int8)
    weight = torch.randint(-1, 2, (8, 3), dtype=torch.int8)
    scale, offset, alpha, bias = torch.rand(5), torch.randn(5), torch.rand(3), torch.randn(3)
    sums = weight.float().sum(0) * alpha
    out = gpu_check.lowbit_reference(levels, weight, scale, offset, alpha, sums, bias)
    by_hand = scale[:, None] * (levels.float() @ weight.float()) * alpha + offset[:, None] * sums + bias
    assert torch.allclose(out, by_hand, atol=1e-5)


def test_gpu_check_trains_a_student_that_really_checkpoints(monkeypatch):
    """The student gpu_check times is in training mode, so its 'with gradient checkpointing' rows recompute blocks."""
    import torch.utils.checkpoint as checkpointing

    gpu_check = _load("gpu_check")
    _, student = gpu_check.qat_pair("DiT-S/8", torch.device("cpu"), input_size=16)
    assert student.training
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    student.grad_checkpoint = True
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 500]), torch.tensor([0, 3])
    student(x, t, y).pow(2).mean().backward()
    assert len(calls) == len(student.blocks)


def test_the_commands_default_to_the_recipe_the_pilot_froze():
    from robuq.ampn.pipeline import AMPNConfig
    from robuq.cli.quickstart import QuickstartConfig
    from robuq.train.qat import QATConfig

    frozen = _load("convergence").FROZEN
    for qat in (QATConfig(), AMPNConfig().qat, QuickstartConfig().ampn.qat):
        assert {k: getattr(qat, k) for k in frozen} == frozen


def test_code_ab_times_two_versions_on_one_export_at_toy_size(tmp_path):
    """HEAD against this checkout: both load the export the base wrote and give the same output bits; the
    worktree it checked out is gone afterwards."""
    import subprocess

    root = BENCHMARKS.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    code_ab = _load("code_ab")
    before = subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True).stdout
    code_ab.main(
        [
            "--base",
            "HEAD",
            "--model",
            "toy",
            "--rounds",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--settings",
            "native",
            "--results-dir",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "code_ab.json").read_text())
    (row,) = result["rows"]
    assert row["rounds"] == 2 and len(row["ratio_rounds"]) == 2 and all(r > 0 for r in row["ratio_rounds"])
    assert row["same_output"]  # HEAD's model code is this checkout's, but for uncommitted changes
    assert "new ÷ old" in (tmp_path / "code_ab.md").read_text()
    assert subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True).stdout == before


def test_deploy_resumes_a_model_from_what_an_earlier_run_kept(tmp_path, capfd):
    """--resume-dir: a model's figures are kept when it finishes and a rerun with the same options takes them
    instead of measuring again (DiT-XL/2 takes hours on 2 cores); other options measure afresh."""
    deploy = _load("deploy")
    kept = tmp_path / "kept"
    argv = [
        "--parts",
        "speed",
        "--settings",
        "native",
        "--models",
        "toy",
        "--repeats",
        "1",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--peers",
        "dynamic_int8",
        "--resume-dir",
        str(kept),
        "--results-dir",
        str(tmp_path),
    ]
    deploy.main(argv)
    first = json.loads((tmp_path / "deploy.json").read_text())["settings"][0]["models"]["toy"]
    assert len(list(kept.glob("native-toy-*.json"))) == 1
    capfd.readouterr()
    deploy.main(argv)
    again = json.loads((tmp_path / "deploy.json").read_text())["settings"][0]["models"]["toy"]
    assert "kept from" in capfd.readouterr().out and again == first
    deploy.main([*argv[:-2], "--act-bits", "2", "--results-dir", str(tmp_path)])
    assert len(list(kept.glob("native-toy-*.json"))) == 2


def test_families_sizes_and_block_speed_at_toy_size(tmp_path):
    pytest.importorskip("diffusers")
    argv = ["--toy", "--peers", "", "--rounds", "1", "--repeats", "1", "--results-dir", str(tmp_path)]
    _load("families").main(argv)
    data, markdown = _record(tmp_path, "families", "families", argv)
    assert {r["family"] for r in data["sizes"]} == {"pixart", "sd3", "flux", "flux2", "sana"}
    for r in data["sizes"]:
        roles = r["params_by_role"]
        assert roles["block linears"] + roles["modulation"] + roles["full precision"] == r["fp_params"]
        assert r["export_bytes"] > 0 and r["kept"]  # at toy widths a rank-16 branch outweighs its layer
        assert f"| {r['model']} |" in markdown
    for r in data["speed"]:
        assert r["ms"]["robuq export"] > 0 and r["speedup_of_export"]["fp32 eager"] > 0
    assert len(data["speed"]) == 6 and "| FLUX.1 single block (3072) |" in markdown


def test_family_memory_divides_the_sharded_state_and_teacher(tmp_path):
    pytest.importorskip("diffusers")
    family_memory = _load("family_memory")
    argv = ["--families", "pixart,flux", "--batches", "1,2", "--results-dir", str(tmp_path)]
    family_memory.main(argv)
    data, markdown = _record(tmp_path, "family_memory", "family_memory", argv)
    flux = next(r for r in data["rows"] if r["family"] == "flux")
    assert 11e9 < flux["params"] < 13e9 and flux["lowrank"] > 0 and flux["blocks"] == 19 + 38
    one = {(r["gpus"], r["batch"]): r for r in flux["per_gpu"]}
    assert one[(8, 1)]["state_gb"] == pytest.approx(one[(1, 1)]["state_gb"] / 8)
    assert one[(1, 1)]["teacher_gb"] == pytest.approx(2 * flux["params"] / 1e9)
    assert one[(8, 1)]["teacher_gb"] == pytest.approx(one[(1, 1)]["teacher_gb"] / 8)
    assert one[(1, 2)]["activations_gb"] == pytest.approx(2 * one[(1, 1)]["activations_gb"])
    assert "| FLUX.1 [dev] | 11.90 B | 1 | none | 1 |" in markdown and "| no |" in markdown


@pytest.mark.slow  # trains, samples and scores in subprocesses
def test_the_paired_adherence_interval_covers_and_gains_from_pairing():
    """Newcombe's paired interval: it contains the observed difference, turns over when the pair is swapped,
    covers the true difference about 95% of the time, and is narrower than the unpaired one when the two
    arms succeed on the same items (as a teacher and its quantized student do on shared prompts and noise)."""
    stats = _load("convergence_stats")
    rng = np.random.default_rng(0)
    covered, paired_widths, unpaired_widths = 0, [], []
    trials, n, truth = 400, 300, 0.05
    for _ in range(trials):
        shared = rng.random(n)  # how easy each item is: both arms tend to get the same items right
        first, second = shared < 0.80, shared < 0.80 - truth
        flip = rng.random(n) < 0.1  # some items each arm gets right or wrong on its own
        second = np.where(flip, rng.random(n) < 0.75, second)
        first = np.where(rng.random(n) < 0.1, rng.random(n) < 0.80, first)
        d = stats.paired_difference_interval(first, second)
        assert d["low"] <= d["difference"] <= d["high"] and d["pairs"] == n
        swapped = stats.paired_difference_interval(second, first)
        assert swapped["difference"] == pytest.approx(-d["difference"])
        assert (swapped["low"], swapped["high"]) == pytest.approx((-d["high"], -d["low"]))
        expected = 0.80 - (0.9 * (0.80 - truth) + 0.1 * 0.75)
        covered += d["low"] <= expected <= d["high"]
        paired_widths.append(d["high"] - d["low"])
        (l1, u1), (l2, u2) = (stats.wilson_interval(int(a.sum()), n) for a in (first, second))
        unpaired_widths.append(np.hypot(u1 - l1, u2 - l2))
    assert 0.92 <= covered / trials <= 0.99
    assert np.median(paired_widths) < 0.8 * np.median(unpaired_widths)
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_difference_interval(np.ones(3, bool), np.ones(4, bool))


def test_families_convergence_at_toy_size(tmp_path, fmnist_dir):
    """A miniature text-to-image teacher quantized by two rows, sampled on the held-out prompts and scored: FID
    ratios to the teacher with intervals, prompt adherence with its interval, the claims read."""
    pytest.importorskip("diffusers")
    from test_text_to_image import train_tiny

    from robuq.data.captions import prompt_set
    from robuq.train.text_to_image import export_text_teacher

    teacher = export_text_teacher(
        train_tiny("flux", tmp_path / "t", fmnist_dir, steps=2) / "model.safetensors", tmp_path / "teacher"
    )
    families_convergence = _load("families_convergence")
    results = tmp_path / "results"
    common = ["--toy", "--installed", "--no-inception", "--teachers", f"tiny={teacher}", "--data-dir", str(fmnist_dir)]
    common += ["--work-dir", str(tmp_path / "work"), "--results-dir", str(results)]
    rows = "tiny: RobuQ + AMPN W1.58A2,tiny: strong baseline W1.58A2"
    families_convergence.main(["--stage", "qat", "--only", rows, *common])
    argv = ["--stage", "score", *common]
    families_convergence.main(argv)
    data, markdown = _record(results, "families_convergence", "families_convergence", argv)
    t = data["teachers"]["tiny"]
    assert t["layout"] == "flux" and t["steps"] == 2 and 0 <= t["prompt_accuracy"] <= 1 and t["classifier"]["fid"] > 0
    assert t["vs_teacher_samples"]["classifier"]["fid"] > 0
    names = {e["name"] for e in data["final"]}
    assert names == {"tiny: RobuQ + AMPN W1.58A2", "tiny: strong baseline W1.58A2"}
    for e in data["final"]:
        c, acc = e["classifier"], e["prompt_accuracy"]
        assert c["ratio_low"] <= c["ratio"] <= c["ratio_high"] and acc["low"] <= acc["value"] <= acc["high"]
        drop = acc["drop_from_teacher"]  # paired with the teacher's samples: the same prompts and noise
        assert drop["pairs"] == 8 and drop["low"] <= drop["difference"] <= drop["high"]
        assert drop["difference"] == pytest.approx(t["prompt_accuracy"] - acc["value"])
        assert e["steps"] == 4 and e["samples"] == 8 and e["commit"] == "installed" and "inception" not in e
    assert "classifier" in t["ampn_minus_baseline"]
    verdicts = {c["claim"]: c["verdict"] for c in data["claims"]}
    assert verdicts["tiny: RobuQ W1.58A4 within 1.2× the teacher's FID"] == "not measured yet"
    assert verdicts["tiny: RobuQ + AMPN W1.58A2 within 2.0× the teacher's FID"] in ("met", "missed", "tie")
    assert verdicts[
        "tiny: RobuQ + AMPN ahead of the strong baseline at A2, outside the sample and training noise"
    ].startswith("tie until the training noise is measured")  # no second seeds trained here
    kept = np.load(results / "families_convergence" / "samples" / "tiny-teacher.npz")
    assert kept["images"].shape == (8, 28, 28) and kept["labels"].max() < len(prompt_set()[0])
    assert "| tiny: strong baseline W1.58A2 | 2 | False | 0 |" in markdown


@pytest.mark.slow  # trains, samples and scores in subprocesses
def test_t2i_teacher_evidence_at_toy_size(tmp_path, fmnist_dir):
    pytest.importorskip("diffusers")
    from test_text_to_image import train_tiny

    run = train_tiny("pixart", tmp_path / "run", fmnist_dir, steps=2)
    argv = ["--run", str(run), "--name", "teacher", "--samples", "20", "--guidance", "1,2", "--steps", "2"]
    argv += ["--results-dir", str(tmp_path / "results")]
    _load("t2i_teacher").main(argv)
    data, markdown = _record(tmp_path / "results", "teacher", "t2i_teacher", argv)
    assert data["layout"] == "pixart" and data["step"] == 2 and set(data["prompt_accuracy"]) == {"1.0", "2.0"}
    for a in data["prompt_accuracy"].values():
        assert 0 <= a["low"] <= a["value"] <= a["high"] <= 1
    assert (tmp_path / "results" / "teacher" / "grid.png").stat().st_size > 0
    assert (tmp_path / "results" / "teacher" / "log.jsonl").is_file() and "| 2.0 |" in markdown
    kept = tmp_path / "results" / "teacher" / "teacher"  # the exported teacher, as QAT and sampling take it
    assert json.loads((kept / "teacher.json").read_text())["step"] == 2
    assert (kept / "transformer" / "config.json").is_file() and (kept / "prompts.safetensors").is_file()


def test_roofline_reads_each_kernel_against_measured_peaks(tmp_path):
    """The roofline script compiles its peak loops, measures the copy bandwidth and times every kernel at every
    shape; each row's fractions are its rate over the peak and bandwidth it names (a check, not a measurement)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    roofline = _load("roofline")
    argv = ["--quick", "--results-dir", str(tmp_path)]
    payload = roofline.main(argv)
    data, markdown = _record(tmp_path, "roofline", "roofline", argv)
    assert data["peaks"] == payload["peaks"] and data["bandwidth_bytes_per_s"] > 0
    assert data["peaks"]["lookup, AVX2 (vpshufb + vpsignb + vpaddb)"] > 0  # every x86-64 CI machine has AVX2
    assert {(r["kernel"], r["shape"]) for r in data["kernels"]} == {
        (kernel, shape)
        for kernel in ("lookup GEMM", "torch._int_mm", "fused ternary linear")
        for shape in roofline.SHAPES
    }
    for r in data["kernels"]:
        assert r["products_per_s"] == pytest.approx(roofline.ROWS * r["k"] * r["n"] / (r["ms"] / 1e3))
        assert r["of_bandwidth"] == pytest.approx(r["bytes_per_s"] / data["bandwidth_bytes_per_s"])
        if r["of_instruction_peak"] is not None:
            assert r["of_instruction_peak"] > 0
    assert "| lookup GEMM | DiT-S/2 fc1 (384→1536) |" in markdown
