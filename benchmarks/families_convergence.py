"""Quality at convergence on today's layouts: RobuQ QAT of the text-to-image miniature's teachers.

    python benchmarks/families_convergence.py --stage qat --teachers flux=DIR   # resumable, pinned to a commit
    python benchmarks/families_convergence.py --stage score --teachers flux=DIR
    python benchmarks/families_convergence.py --stage report --teachers flux=DIR

A teacher is a folder ``robuq.train.text_to_image.export_text_teacher`` wrote (``transformer/``, the prompt table,
``teacher.json``). Per teacher: RobuQ W1.58A4, RobuQ + AMPN W1.58A3 and W1.58A2, and the strong baseline
W1.58A2, each to ``--steps`` QAT steps with the low-rank branch at the paper's share of the width (16 of
1,152), the A4 and AMPN A2 rows again with a second training seed; the recipe is the DiT miniature's
(``convergence.FROZEN``). The runs, their library pins and resumption are the DiT convergence benchmark's own
(``convergence.train``); this module adds the layouts' sampling and scoring.

Every model is sampled ``--samples`` times on the held-out prompt templates (the same prompts and noise for
every row), with guidance ``--cfg-scale``. Scores: FID against Fashion-MNIST's test images in the shipped
classifier's and Inception's feature spaces, with paired half-sample intervals, each row's ratio to its
teacher's; FID against the teacher's own held-out samples (another seed); and prompt adherence, the
classifier's accuracy on the prompt's class, with a Wilson interval. Time it only on a quiet machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import convergence as base
from common import ROOT, invocation, parse_config, write_result
from convergence_stats import (
    TARGETS,
    FixedReferenceFID,
    half_sample_indices,
    interval_summary,
    paired_difference_interval,
    verdict_of,
    wilson_interval,
)
from robuq.core.options import option

ROWS = {  # name → (act bits, preset, AMPN)
    "RobuQ W1.58A4": (4, "robuq", False),
    "RobuQ + AMPN W1.58A3": (3, "robuq", True),
    "RobuQ + AMPN W1.58A2": (2, "robuq", True),
    "strong baseline W1.58A2": (2, "baseline", False),
}
SEEDED = ("RobuQ W1.58A4", "RobuQ + AMPN W1.58A2")
PAPER_SHARE = 16 / 1152
ADHERENCE_POINTS = {4: 5.0, 3: 5.0, 2: 10.0}  # largest drop in prompt accuracy (points) per activation width
TEACHER, HELDOUT_SEED = "full-precision teacher", 1


@dataclass
class FamiliesConvergenceConfig:
    stage: str = option("report", "qat, score, report, or all in order", choices=("qat", "score", "report", "all"))
    teachers: str = option("", "comma-separated NAME=FOLDER of exported miniature teachers (export_text_teacher)")
    work_dir: str = option(
        os.environ.get("ROBUQ_FAMILIES_CONVERGENCE_DIR", "/tmp/robuq-families-convergence"),
        "runs, samples and features (outside the checkout)",
    )
    commit: str | None = option(None, "library commit new runs use (default: HEAD); a run keeps its own")
    installed: bool = option(False, "use the installed robuq instead of a worktree per commit (tests)")
    results_dir: str = option(str(ROOT / "results"), "where families_convergence.{json,md} and the kept files go")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files (default: robuq's own search)")
    device: str = option("cpu", "device of every run")
    only: str = option("", "comma-separated run names (TEACHER: ROW): only these")
    steps: int = option(3000, "QAT steps of every row")
    ampn_warmup: int = option(500, "AMPN warm-up steps within the schedule")
    batch: int = option(32, "global batch")
    lr: float = option(2e-4, "peak learning rate")
    probe_every: int = option(100, "probe every N steps")
    probe_images: int = option(128, "held-out latents in the probe")
    calibration_images: int = option(128, "AMPN's calibration latents")
    ckpt_every: int = option(250, "checkpoint every N steps")
    samples: int = option(2000, "samples per scored model")
    shard_size: int = option(250, "samples per shard (the unit of resumption)")
    sample_steps: int = option(20, "sampling steps")
    cfg_scale: float = option(3.0, "classifier-free guidance scale of every sample")
    reference_images: int = option(10000, "Fashion-MNIST test images in the FID reference")
    resamples: int = option(200, "half-sample rounds of the classifier-space intervals (Inception: a fifth)")
    inception: bool = option(True, "score in Inception's feature space too")
    toy: bool = option(False, "tiny sizes, for the tests")


def teacher_folders(config: FamiliesConvergenceConfig) -> dict[str, Path]:
    pairs = [t.split("=", 1) for t in config.teachers.split(",") if t.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise SystemExit("--teachers NAME=FOLDER[,NAME=FOLDER]: the exported miniature teachers to quantize")
    return {name.strip(): Path(folder) for name, folder in pairs}


def runs(config: FamiliesConvergenceConfig, teacher: str, folder: Path) -> list[base.Run]:
    out = []
    for row, (bits, preset, ampn) in ROWS.items():
        flags = [
            "--teacher",
            str(folder / "transformer"),
            "--prompt-embeds",
            str(folder / "prompts.safetensors"),
            *(["--data-dir", config.data_dir] if config.data_dir else []),
            "--preset",
            preset,
            "--lowrank-share",
            repr(PAPER_SHARE),
            "--steps",
            str(config.steps),
            "--global-batch-size",
            str(config.batch),
            "--lr",
            str(config.lr),
            "--warmup-steps",
            str(max(1, min(50, config.steps // 10))),
            "--probe-every",
            str(config.probe_every),
            "--probe-images",
            str(config.probe_images),
            "--log-every",
            str(max(1, min(25, config.steps // 10))),
            "--ckpt-every",
            str(config.ckpt_every),
            "--keep-checkpoints",
            "2",
            "--device",
            config.device,
            "--no-progress",
            *base.recipe_flags(base.FROZEN),
        ]
        head = ["ampn", "run", "--budget", str(bits), "--warmup-qat-steps", str(config.ampn_warmup)] if ampn else None
        command = (
            [*head, "--calibration-images", str(config.calibration_images), *flags]
            if head
            else ["qat", "--act-bits", str(bits), *flags]
        )
        out.append(base.Run(f"{teacher}: {row}", command))
        if row in SEEDED:
            out.append(base.Run(f"{teacher}: {row} seed 1", [*command, "--seed", "1"]))
    return out


def row_of(name: str) -> str:
    return name.split(": ", 1)[1].removesuffix(" seed 1")


def final_model(work: Path, run: base.Run) -> Path:
    return base.checkpoint_at(work, run, int(run.command[run.command.index("--steps") + 1]))


# ------------------------------------------------------------------------------------------------ sampling


def prompts_file(work: Path) -> tuple[Path, list[int]]:
    """The held-out evaluation prompts, one per line, and each one's class."""
    from robuq.data.captions import prompt_set

    prompts, labels = prompt_set(held_out=True)
    path = work / "held-out-prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return path, labels


def kept_samples(config: FamiliesConvergenceConfig, key: str) -> Path:
    return Path(config.results_dir) / "families_convergence" / "samples" / f"{key}.npz"


def sample(
    config: FamiliesConvergenceConfig, work: Path, key: str, model: Path, folder: Path, library_folder: Path, seed: int
) -> Path | None:
    """A model's samples on the held-out prompts, kept in the results as grey uint8 with their prompt indices;
    None while the model file does not exist."""
    kept = kept_samples(config, key)
    if kept.is_file():
        return kept
    if not model.exists():
        return None
    prompts, _ = prompts_file(work)
    out = work / "samples" / key
    if not (out / "samples.npz").is_file():
        library_folder.mkdir(parents=True, exist_ok=True)
        _, env = base.library(config, work, library_folder)
        command = [sys.executable, "-m", "robuq.cli", "sample", "--ckpt", str(model)]
        command += ["--prompt-embeds", str(folder / "prompts.safetensors"), "--latent-decode", "space-to-depth"]
        command += [
            "--prompts",
            str(prompts),
            "--num-samples",
            str(config.samples),
            "--steps",
            str(config.sample_steps),
        ]
        command += ["--cfg-scale", str(config.cfg_scale), "--seed", str(seed), "--shard-size", str(config.shard_size)]
        command += ["--device", config.device, "--out", str(out), "--no-progress"]
        print(f"[families-convergence] sample {key}", flush=True)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"][..., 0], data["labels"]
    kept.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(kept.with_suffix(".tmp.npz"), images=images, labels=labels)
    os.replace(kept.with_suffix(".tmp.npz"), kept)
    return kept


def points(config: FamiliesConvergenceConfig, work: Path) -> list[dict]:
    """Everything scored: per teacher its samples (seed 0), its held-out samples (seed 1) and each row's model."""
    out = []
    for teacher, folder in teacher_folders(config).items():
        t = base.slug(teacher)
        model = folder / "transformer"
        out.append({"teacher": teacher, "name": TEACHER, "key": f"{t}-teacher", "model": model, "seed": 0})
        out.append(
            {
                "teacher": teacher,
                "name": "held-out",
                "key": f"{t}-teacher-held-out",
                "model": model,
                "seed": HELDOUT_SEED,
            }
        )
        for run in runs(config, teacher, folder):
            key = f"{base.slug(run.name)}-step{config.steps}"
            out.append(
                {
                    "teacher": teacher,
                    "name": run.name,
                    "key": key,
                    "model": final_model(work, run),
                    "seed": 0,
                    "run": run,
                }
            )
    return out


def score(config: FamiliesConvergenceConfig, work: Path) -> None:
    """Sample every point whose model exists and cache its features in each space."""
    spaces = base.feature_extractors(config)
    for _, (extract, ident) in spaces.items():
        base.cached_features(
            work, f"reference-{ident}-{config.reference_images}", lambda: base.reference_images(config), extract
        )
    folders = teacher_folders(config)
    for p in points(config, work):
        library_folder = base.run_dir(work, p["run"].name) if "run" in p else work / "teacher"
        npz = sample(config, work, p["key"], p["model"], folders[p["teacher"]], library_folder, p["seed"])
        if npz is None:
            print(f"[families-convergence] {p['key']}: no model yet", flush=True)
            continue
        for _, (extract, ident) in spaces.items():
            base.cached_features(work, f"{p['key']}-{ident}", lambda: base.kept_images(npz), extract)


# ------------------------------------------------------------------------------------------------ report


def scores_in(config: FamiliesConvergenceConfig, work: Path, keys: list[str], ident: str, reference: Path) -> dict:
    """Per key: FID against ``reference`` features and its FIDs on paired half-samples."""
    if not reference.is_file():
        return {}
    fid_of = FixedReferenceFID(np.load(reference))
    rounds = config.resamples if ident == "classifier" else max(20, config.resamples // 5)
    out = {}
    for key in keys:
        path = work / "features" / f"{key}-{ident}.npy"
        if path.is_file():
            f = np.load(path)
            out[key] = {"fid": fid_of(f), "replicates": [fid_of(f[i]) for i in half_sample_indices(len(f), rounds)]}
    return out


def prompt_hits(
    config: FamiliesConvergenceConfig, key: str, classes: list[int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Whether the classifier reads each kept sample as its prompt's class, and the samples' prompt indices."""
    from robuq.eval.classifier import ASSET, extract, load_classifier

    kept = kept_samples(config, key)
    if not kept.is_file():
        return None
    predicted = extract(load_classifier(ASSET), base.kept_images(kept))["probs"].argmax(1)
    with np.load(kept) as data:
        prompts = data["labels"]
    return predicted == np.asarray(classes)[prompts], prompts


def adherence(
    config: FamiliesConvergenceConfig, key: str, classes: list[int], teacher_key: str | None = None
) -> dict | None:
    """The classifier's accuracy on each sample's prompt class, with its Wilson interval; with ``teacher_key``,
    also the teacher's accuracy minus this one on the same prompts and noise, with its paired interval."""
    found = prompt_hits(config, key, classes)
    if found is None:
        return None
    hits, prompts = found
    low, high = wilson_interval(int(hits.sum()), len(hits))
    result = {"value": float(hits.mean()), "low": low, "high": high}
    teacher = prompt_hits(config, teacher_key, classes) if teacher_key else None
    if teacher is not None:
        if not np.array_equal(teacher[1], prompts):
            raise SystemExit(f"{key}: its samples' prompts differ from the teacher's, so they cannot be paired")
        result["drop_from_teacher"] = paired_difference_interval(teacher[0], hits)
    return result


def teacher_steps(folder: Path) -> int | None:
    record = folder / "teacher.json"
    return json.loads(record.read_text()).get("step") if record.is_file() else None


def report(config: FamiliesConvergenceConfig, work: Path, argv: list[str]) -> None:
    _, classes = prompts_file(work)
    spaces = (
        {"classifier": "classifier", "inception": "inception-adm"} if config.inception else {"classifier": "classifier"}
    )
    all_points = points(config, work)
    teachers, final = {}, []
    for teacher, folder in teacher_folders(config).items():
        mine = [p for p in all_points if p["teacher"] == teacher]
        keys = [p["key"] for p in mine]
        teacher_key, heldout_key = keys[0], keys[1]
        by_space = {}
        for space, ident in spaces.items():
            reference = work / "features" / f"reference-{ident}-{config.reference_images}.npy"
            by_space[space] = (
                scores_in(config, work, keys, ident, reference),
                scores_in(config, work, keys, ident, work / "features" / f"{heldout_key}-{ident}.npy"),
            )
        entry = {
            "layout": json.loads((folder / "teacher.json").read_text())["layout"]
            if (folder / "teacher.json").is_file()
            else None,
            "steps": teacher_steps(folder),
            "prompt_accuracy": None,
        }
        accuracy = adherence(config, teacher_key, classes)
        entry["prompt_accuracy"] = accuracy["value"] if accuracy else None
        entry["prompt_accuracy_interval"] = accuracy
        for space, (data_scores, _) in by_space.items():
            if teacher_key in data_scores:
                entry[space] = {"fid": data_scores[teacher_key]["fid"]}
        floor = {}
        for space, (_, own) in by_space.items():
            s = interval_summary(own, teacher_key)
            if s:
                floor[space] = s
        entry["vs_teacher_samples"] = floor
        teachers[teacher] = entry
        for p in mine[2:]:
            row = row_of(p["name"])
            bits, _, ampn = ROWS[row]
            e = {
                "teacher": teacher,
                "name": p["name"],
                "act_bits": bits,
                "ampn": ampn,
                "steps": config.steps,
                "samples": config.samples,
                "seeds": [1 if p["name"].endswith(" seed 1") else 0],
                "commit": base.library_commit(base.run_dir(work, p["name"])),
            }
            for space, (data_scores, own) in by_space.items():
                s = interval_summary(data_scores, p["key"], teacher_key)
                if s:
                    e[space] = s
                t = interval_summary(own, p["key"])
                if t:
                    e.setdefault("vs_teacher_samples", {})[space] = t
            accuracy = adherence(config, p["key"], classes, teacher_key)
            if accuracy:
                e["prompt_accuracy"] = accuracy
            if any(space in e for space in spaces):
                final.append(e)
        for space, (data_scores, _) in by_space.items():
            a = f"{base.slug(f'{teacher}: RobuQ + AMPN W1.58A2')}-step{config.steps}"
            b = f"{base.slug(f'{teacher}: strong baseline W1.58A2')}-step{config.steps}"
            d = interval_summary(data_scores, a, b, ratio=False)
            if d:
                entry.setdefault("ampn_minus_baseline", {})[space] = d
    payload = {
        "teachers": teachers,
        "final": final,
        "claims": claims(teachers, final, list(spaces)),
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("stage", "only")},
    }
    write_result("families_convergence", payload, markdown(payload), Path(config.results_dir), argv)


def claims(teachers: dict, final: list[dict], spaces: list[str]) -> list[dict]:
    out = []
    for teacher, t in teachers.items():
        rows = {e["name"].split(": ", 1)[1]: e for e in final if e["teacher"] == teacher}
        gaps = seed_gaps(rows, spaces)
        for row, (bits, preset, _) in ROWS.items():
            e = rows.get(row)
            if preset == "baseline":
                continue
            target = TARGETS[bits]
            claim = f"{teacher}: {row} within {target}× the teacher's FID"
            if e is None or any(s not in e for s in spaces):
                out.append({"claim": claim, "verdict": "not measured yet"})
                continue
            # The sample interval widened by half the largest gap between two training seeds, each side.
            widen = {sp: gaps.get(sp, 0.0) / 2 / t[sp]["fid"] for sp in spaces}
            readings = [
                "met"
                if e[sp]["ratio_high"] + widen[sp] <= target
                else "missed"
                if e[sp]["ratio_low"] - widen[sp] > target
                else "tie"
                for sp in spaces
            ]
            noise = "sample and training" if all(sp in gaps for sp in spaces) else "sample only (no second seed yet)"
            out.append({"claim": claim, "verdict": verdict_of(readings, "met", "missed"), "noise": noise})
            drop = ADHERENCE_POINTS[bits]
            claim = f"{teacher}: {row} prompt adherence within {drop:.0f} points of the teacher's"
            paired = e.get("prompt_accuracy", {}).get("drop_from_teacher")
            if paired is None:
                out.append({"claim": claim, "verdict": "not measured yet"})
                continue
            # The drop's paired interval (same prompts, same noise) against the allowed drop.
            gap_low, gap_high = 100 * paired["low"], 100 * paired["high"]
            verdict = "met" if gap_high <= drop else "missed" if gap_low > drop else "tie"
            out.append({"claim": claim, "verdict": verdict, "noise": "sample, paired by prompt and noise"})
        claim = f"{teacher}: RobuQ + AMPN ahead of the strong baseline at A2, outside the sample and training noise"
        d = t.get("ampn_minus_baseline", {})
        if any(s not in d for s in spaces):
            out.append({"claim": claim, "verdict": "not measured yet"})
            continue
        noise = seed_gaps(rows, spaces)
        if any(s not in noise for s in spaces):
            out.append({"claim": claim, "verdict": "tie until the training noise is measured (second seeds)"})
            continue
        readings = []
        for s in spaces:
            inside = d[s]["difference_low"] <= 0 <= d[s]["difference_high"] or abs(d[s]["difference"]) <= noise[s]
            readings.append("tie" if inside else "met" if d[s]["difference"] < 0 else "missed")
        out.append({"claim": claim, "verdict": verdict_of(readings, "met", "missed")})
    return out


def seed_gaps(rows: dict[str, dict], spaces: list[str]) -> dict[str, float]:
    """Per space, the largest FID gap between the two training seeds of a seeded row: the training noise."""
    gaps: dict[str, float] = {}
    for row in SEEDED:
        a, b = rows.get(row), rows.get(f"{row} seed 1")
        for s in spaces:
            if a and b and s in a and s in b:
                gaps[s] = max(gaps.get(s, 0.0), abs(a[s]["fid"] - b[s]["fid"]))
    return gaps


def markdown(payload: dict) -> str:
    lines = [
        "## Teachers",
        "",
        "| teacher | layout | steps | prompt accuracy | classifier FID | Inception FID |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in payload["teachers"].items():
        acc = f"{100 * t['prompt_accuracy']:.1f} %" if t.get("prompt_accuracy") is not None else "—"
        lines.append(
            f"| {name} | {t.get('layout')} | {t.get('steps')} | {acc} | "
            f"{t.get('classifier', {}).get('fid', float('nan')):.2f} | {t.get('inception', {}).get('fid', float('nan')):.2f} |"
        )
    lines += [
        "",
        "## Rows at the end of the schedule",
        "",
        "FID with its 95% paired half-sample interval; ratio to the "
        "teacher's FID; prompt accuracy with a 95% Wilson interval, and its drop from the teacher's on the same "
        "prompts and noise with a 95% paired interval (Newcombe's hybrid score).",
        "",
        "| row | act bits | AMPN | seed | classifier FID (× teacher) | Inception FID (× teacher) | prompt accuracy "
        "| drop from the teacher (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in payload["final"]:
        cells = []
        for space in ("classifier", "inception"):
            s = e.get(space)
            cells.append(
                f"{s['fid']:.2f} ({s['ratio']:.2f}× [{s['ratio_low']:.2f}, {s['ratio_high']:.2f}])" if s else "—"
            )
        acc = e.get("prompt_accuracy")
        acc_text = f"{100 * acc['value']:.1f} % [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}]" if acc else "—"
        drop = (acc or {}).get("drop_from_teacher")
        drop_text = (
            f"{100 * drop['difference']:+.1f} [{100 * drop['low']:+.1f}, {100 * drop['high']:+.1f}]" if drop else "—"
        )
        lines.append(
            f"| {e['name']} | {e['act_bits']} | {e['ampn']} | {e['seeds'][0]} | {cells[0]} | {cells[1]} | {acc_text} "
            f"| {drop_text} |"
        )
    lines += ["", "## Claims", "", "| claim | verdict | noise read against |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['verdict']} | {c.get('noise', 'sample')} |" for c in payload["claims"]]
    return "\n".join(lines) + "\n"


def toy_sizes(config: FamiliesConvergenceConfig) -> FamiliesConvergenceConfig:
    return dataclasses.replace(
        config,
        steps=4,
        ampn_warmup=2,
        batch=8,
        probe_every=2,
        probe_images=8,
        calibration_images=8,
        ckpt_every=2,
        samples=8,
        shard_size=4,
        sample_steps=2,
        reference_images=32,
        resamples=4,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_config(FamiliesConvergenceConfig, argv, __doc__)
    if config.toy:
        config = toy_sizes(config)
    work = Path(config.work_dir)
    if work.resolve().is_relative_to(ROOT.resolve()):
        raise SystemExit(f"--work-dir {work} lies inside the checkout; give a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    stages = ("qat", "score", "report") if config.stage == "all" else (config.stage,)
    wanted = {s.strip() for s in config.only.split(",") if s.strip()} or None
    for stage in stages:
        if stage == "qat":
            for teacher, folder in teacher_folders(config).items():
                for run in runs(config, teacher, folder):
                    if (wanted is None or run.name in wanted) and not final_model(work, run).is_file():
                        base.train(config, work, run)
        elif stage == "score":
            score(config, work)
    report(config, work, invocation(__file__, argv))


if __name__ == "__main__":
    main()
