"""Two versions of robuq side by side: the exported forward's speed and output, old code against new.

    python benchmarks/code_ab.py --base 7ab5d20                    # this checkout against that commit
    python benchmarks/code_ab.py --base 7ab5d20 --rounds 9 --threads 1,2 --settings native,avx2-forced
    python benchmarks/code_ab.py --base 7ab5d20 --export results/convergence/models/robuq-w1-58a4.robuq.safetensors

A refactor must not change what an exported model computes or how fast. One export is written by the base
commit's code; then, for each CPU setting and thread count, processes alternate between the base code and
this checkout's (the base checked out as a worktree in a temporary folder, each process importing one of
the two), each loading that same file and timing the forward of batch 8 at 32×32 latents. A round is one
process of each, in alternating order; the ratio new ÷ old is taken per round and its median reported with
the spread, so that a machine that slows for a while slows both sides of a ratio. Every process also
hashes its output: both versions must give the same bits.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import CPU_SETTINGS, ROOT, invocation, parse_config, setting_environment, write_result
from robuq.core.options import option

# Run in a fresh process with one version of robuq on its path: write the export, or time and hash it.
WORKER = """
import hashlib, json, sys, time, statistics, torch
sys.path.insert(0, sys.argv[5])  # benchmarks/, for common
from common import create_model, time_ms
import robuq
from robuq.deploy.export import export_model, load_exported
job, path, model_name, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
if job == "export":
    torch.manual_seed(0)
    config = robuq.preset("robuq", act_bits=int(sys.argv[6]))
    export_model(robuq.quantize_(create_model(model_name), config, initialize=False), config, path, "ternary-2bit", "fp16")
    sys.exit(0)
repeats = int(sys.argv[6])
model = load_exported(path)
c = model.config
g = torch.Generator().manual_seed(0)
x = torch.randn(8, c.in_channels, c.input_size, c.input_size, generator=g)
t, y = torch.randint(0, 1000, (8,), generator=g), torch.randint(0, c.num_classes, (8,), generator=g)
with torch.no_grad():
    out = model(x, t, y)
    ms = time_ms(lambda: model(x, t, y), repeats)
print(json.dumps({"ms": ms, "output_sha256": hashlib.sha256(out.numpy().tobytes()).hexdigest(),
                  "robuq": robuq.__file__}))
"""


@dataclass
class CodeABConfig:
    """Options of this benchmark."""

    base: str = option("HEAD~1", "the commit to compare this checkout against")
    model: str = option("DiT-S/2", "the DiT timed (random weights, the robuq preset)")
    export: str | None = option(None, "an exported file to load instead of writing one (a shipped model, say)")
    act_bits: int = option(2, "activation bits of the export")
    rounds: int = option(9, "rounds per setting and thread count (one process of each version per round)")
    repeats: int = option(5, "timed forwards per process (their median is the process's time)")
    threads: str = option("1,2", "thread counts, comma-separated")
    settings: str = option("native,avx2-forced", "CPU settings, comma-separated: native, avx2-forced")
    name: str = option("code_ab", "results/<name>.json and .md")
    results_dir: str | None = option(None, "where the JSON and Markdown go (default: results/)")


def run_worker(source: Path, job: str, path: Path, config: CodeABConfig, threads: int, setting: str) -> dict | None:
    env = setting_environment(setting)
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    last = str(config.act_bits if job == "export" else config.repeats)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, job, str(path), config.model, str(threads), str(Path(__file__).parent), last],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"the {job} worker failed under {source}:\n{out.stderr[-3000:]}")
    if job == "export":
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result.pop("robuq")).is_relative_to(source):  # an installed robuq would shadow the version asked for
        raise SystemExit(f"the worker imported robuq from outside {source}")
    return result


def compare(config: CodeABConfig, base_src: Path, new_src: Path, path: Path) -> list[dict]:
    rows = []
    for setting in config.settings.split(","):
        if setting not in CPU_SETTINGS:
            raise SystemExit(f"unknown --settings entry {setting!r}; use {', '.join(CPU_SETTINGS)}")
        for threads in (int(t) for t in config.threads.split(",")):
            runs = {"old": [], "new": []}
            for r in range(config.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for version in order:
                    runs[version].append(
                        run_worker(base_src if version == "old" else new_src, "time", path, config, threads, setting)
                    )
            ratios = [n["ms"] / o["ms"] for n, o in zip(runs["new"], runs["old"])]
            hashes = {v: sorted({r["output_sha256"] for r in runs[v]}) for v in runs}
            rows.append(
                {
                    "setting": setting,
                    "threads": threads,
                    "rounds": config.rounds,
                    "old_ms": [r["ms"] for r in runs["old"]],
                    "new_ms": [r["ms"] for r in runs["new"]],
                    "ratio_rounds": ratios,
                    "ratio_median": statistics.median(ratios),
                    "same_output": hashes["old"] == hashes["new"] and len(hashes["old"]) == 1,
                    "output_sha256": hashes,
                }
            )
            print(
                f"[code_ab] {setting}, {threads} threads: new ÷ old {rows[-1]['ratio_median']:.3f} "
                f"({min(ratios):.3f}–{max(ratios):.3f}), same output: {rows[-1]['same_output']}",
                flush=True,
            )
    return rows


def markdown(rows: list[dict], config: CodeABConfig, base: str, head: str) -> str:
    what = (
        f"`{config.export}`"
        if config.export
        else f"Exported {config.model} (robuq preset, A{config.act_bits}), written by the base's code"
    )
    lines = [
        f"{what}, loaded by both versions; forward of batch 8. old = `{base[:12]}`, new = `{head[:12]}` (uncommitted changes "
        f"included where there were any). Per process: median of {config.repeats} forwards; ratio: new ÷ old per "
        "round, median (lowest–highest round).",
        "",
        "| setting | threads | old ms (median) | new ms (median) | new ÷ old | same output bits |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['threads']} | {statistics.median(r['old_ms']):.1f} | "
            f"{statistics.median(r['new_ms']):.1f} | **{r['ratio_median']:.3f}** ({min(r['ratio_rounds']):.3f}–"
            f"{max(r['ratio_rounds']):.3f}) | {'yes' if r['same_output'] else 'NO'} |"
        )
    return "\n".join(lines)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(CodeABConfig, argv, __doc__)
    base = git("rev-parse", config.base)
    with tempfile.TemporaryDirectory(prefix="robuq-code-ab-") as tmp:
        tree = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(tree), base)
        try:
            path = Path(config.export).resolve() if config.export else Path(tmp) / "model.robuq.safetensors"
            if not config.export:
                run_worker(tree / "src", "export", path, config, 2, "native")
            rows = compare(config, tree / "src", ROOT / "src", path)
        finally:
            git("worktree", "remove", "--force", str(tree))
    payload = {
        "base": base,
        "head": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "src")),
        "rows": rows,
        "settings": {k: getattr(config, k) for k in config.__dataclass_fields__},
    }
    write_result(
        config.name,
        payload,
        markdown(rows, config, base, payload["head"]),
        Path(config.results_dir) if config.results_dir else None,
        invocation(__file__, argv),
    )


if __name__ == "__main__":
    main()
