"""The ``robuq`` command: each subcommand parses its arguments and calls one library function.

Options come from the job's config dataclass (``robuq.cli.flags``), so the library and the command
line share one set of defaults and help texts. Errors robuq raises on purpose (bad input, a bad plan,
a missing file) print as one line; anything else is a bug and keeps its traceback (``--debug`` shows
the traceback of every error).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from robuq.cli.flags import add_config_arguments, config_from_args
from robuq.core.errors import RobuqError
from robuq.precision.cost import cost_summary


def _add_run_control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--until", type=int, default=None, help="stop at this step (the schedule still spans --steps)")
    _add_no_progress(p)


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")


def _job(
    sub: argparse._SubParsersAction, name: str, help: str, config: type, run, skip: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """A subcommand whose options are ``config``'s fields; ``run(config, args)`` does the work."""
    p = sub.add_parser(name, help=help, description=help)
    add_config_arguments(p, config, skip)
    p.set_defaults(func=lambda args: run(config_from_args(args, config), args))
    return p


# ---------------------------------------------------------------- training


def _run_train(config, args) -> int:
    from robuq.train.trainer import train

    _say(f"wrote {train(config, resume=args.resume, until=args.until, progress=not args.no_progress)}")
    return 0


def _run_train_t2i(config, args) -> int:
    from robuq.train.text_to_image import train_text_teacher

    _say(f"wrote {train_text_teacher(config, resume=args.resume, until=args.until, progress=not args.no_progress)}")
    return 0


def _run_qat(config, args) -> int:
    from robuq.train.qat import qat

    _say(f"wrote {qat(config, resume=args.resume, until=args.until, progress=not args.no_progress)}")
    return 0


def _run_latents(config, args) -> int:
    from robuq.data.encode_latents import encode_latents

    _say(f"wrote {encode_latents(config, progress=not args.no_progress)}")
    return 0


def _run_ampn_sensitivity(config, args) -> int:
    from robuq.ampn.pipeline import write_sensitivity

    result = write_sensitivity(config, progress=not args.no_progress)
    print(f"baseline relative error {result.baseline_error:.5f}; wrote {config.out}")
    return 0


def _run_ampn_allocate(config, args) -> int:
    from robuq.ampn.pipeline import allocate_from_file
    from robuq.ampn.plan_files import format_plan

    plan, path = allocate_from_file(config)
    print(format_plan(plan))
    _say(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def _run_ampn_run(config, args) -> int:
    from robuq.ampn.pipeline import ampn_run

    _say(f"wrote {ampn_run(config, progress=not args.no_progress, until=args.until)}")
    return 0


def _run_quickstart(config, args) -> int:
    from robuq.cli.quickstart import run_quickstart

    run_quickstart(config, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------- models and files


def _run_models(args: argparse.Namespace) -> int:
    from robuq.models.summary import model_table

    rows = model_table(args.input_size, args.num_classes, args.in_channels)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'model':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'tokens':>6} {'params':>14} {'GFLOPs':>9}"
    )
    for r in rows:
        print(
            f"{r['name']:<10} {r['depth']:>5} {r['hidden_size']:>6} {r['num_heads']:>5} {r['patch_size']:>5} "
            f"{r['tokens']:>6} {r['params']:>14,} {r['gflops']:>9.2f}"
        )
    print("GFLOPs are multiply-accumulates of one forward pass of one image, as in the DiT paper.")
    return 0


def _run_sample(config, args) -> int:
    from robuq.sample.to_files import sample_to_files

    for label, path in sample_to_files(config, progress=not args.no_progress).items():
        print(f"{label}: {path}")
    return 0


def _run_quantize(config, args) -> int:
    from robuq.io.quantized import quantize_checkpoint

    model, path = quantize_checkpoint(config)
    print(cost_summary(model).format(per_module=False))
    _say(f"wrote {path}")
    return 0


def _run_summary(args: argparse.Namespace) -> int:
    from robuq.core.runtime import default_teacher_path
    from robuq.io.model_files import KIND_TEXT, file_kind, load_any

    path = args.path or default_teacher_path()
    summary = cost_summary(load_any(path))
    kind = file_kind(path)
    if args.json:
        print(json.dumps({"file": str(path), "kind": kind, **summary.to_dict()}, indent=2))
    else:
        print(f"{path}: {KIND_TEXT[kind]}\n{summary.format()}")
    return 0


def _run_export(config, args) -> int:
    from robuq.deploy.export import file_report
    from robuq.io.model_files import export_file

    path, model = export_file(config)
    _say(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    if config.report:
        report = file_report(path)
        for kind, size in report["groups"].items():
            print(f"  {kind:<22} {size / 2**20:9.3f} MiB")
        print(
            f"  {report['ratio_fp32']:.1f}× smaller than the fp32 checkpoint, {report['ratio_fp16']:.1f}× smaller than fp16"
        )
        print(cost_summary(model).format(per_module=False))
    return 0


# ---------------------------------------------------------------- evaluation


def _say(text: str) -> None:
    """Print once per job: under torchrun, only rank 0 reports what the job wrote."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)


def _run_eval_metrics(config, args) -> int:
    from robuq.core.files import atomic_write_text
    from robuq.eval.evaluate import evaluate

    result = evaluate(config)
    text = json.dumps(result, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    for warning in result["warnings"]:
        print(f"robuq eval metrics: {warning}", file=sys.stderr)
    return 0


def _run_eval_ref_stats(config, args) -> int:
    from robuq.eval.adm import write_reference_batch_from

    _say(f"wrote {write_reference_batch_from(config, progress=not args.no_progress)}")
    return 0


def _run_train_classifier(config, args) -> int:
    from robuq.eval.classifier import train_classifier

    result = train_classifier(config, progress=not args.no_progress)
    print(f"test accuracy {result['test_accuracy']:.4f} after {result['seconds']:.0f} s; wrote {config.out}")
    return 0


def _version() -> str:
    import platform

    import torch

    from robuq.core.version import __version__

    return f"robuq {__version__} (PyTorch {torch.__version__}, Python {platform.python_version()})"


@dataclass(frozen=True)
class _Job:
    """A command whose options are ``config``'s fields: ``words`` ("qat", "ampn run"), its help, the function
    that runs it, config fields the command line does not set, and what adds its options beyond the config's."""

    words: str
    help: str
    config: str  # "module:ConfigClass"
    run: Callable
    skip: str | None = None  # "module:NAMES", a tuple of field names
    extras: Callable[[argparse.ArgumentParser], None] | None = None


@dataclass(frozen=True)
class _Group:
    """A command with subcommands (``robuq ampn …``)."""

    name: str
    help: str


def _add_final_stage_control(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--until",
        type=int,
        default=None,
        help="stop the final stage at this step (the schedule still spans --steps; run again to go on)",
    )
    _add_no_progress(p)


def _add_json_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")


def _models_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list the DiT configurations with parameters and GFLOPs")
    m.add_argument("--input-size", type=int, default=32, help="latent (or image) side length (default: %(default)s)")
    m.add_argument(
        "--num-classes", type=int, default=1000, help="classes of a class-conditional model (default: %(default)s)"
    )
    m.add_argument(
        "--in-channels", type=int, default=4, help="input channels: 4 for SD-VAE latents (default: %(default)s)"
    )
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=_run_models)


def _summary_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("summary", help="per-module quantizers, bits, MACs and BOPs of a model file")
    s.add_argument("path", nargs="?", default=None, help="model file (default: the shipped teacher)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_run_summary)


# Every command in the order ``robuq --help`` lists them: jobs, groups, and functions that add a hand-built
# parser. Configs (and the fields a command does not set) are named "module:attribute" and imported when a
# parser is built, not when robuq.cli is.
COMMANDS = [
    _Job(
        "run",
        "the main job: RobuQ + AMPN on the shipped teacher, short QAT, grids and a summary",
        "robuq.cli.quickstart:QuickstartConfig",
        _run_quickstart,
        "robuq.cli.quickstart:DERIVED",
        _add_no_progress,
    ),
    _models_parser,
    _Job(
        "latents",
        "encode an image folder (a sub-folder per class) through a VAE into a latent cache for --latents "
        "(resumable; split over torchrun's processes)",
        "robuq.data.encode_latents:LatentsConfig",
        _run_latents,
        extras=_add_no_progress,
    ),
    _Job(
        "train",
        "train a full-precision DiT (single process or under torchrun)",
        "robuq.train.trainer:TrainConfig",
        _run_train,
        extras=_add_run_control,
    ),
    _Job(
        "train-t2i",
        "train a miniature text-to-image teacher (FLUX or PixArt layout, with its text encoder) on "
        "captioned Fashion-MNIST",
        "robuq.train.text_to_image:TextTeacherConfig",
        _run_train_t2i,
        extras=_add_run_control,
    ),
    _Job(
        "qat",
        "quantize a full-precision DiT (default: the shipped teacher) and train it",
        "robuq.train.qat:QATConfig",
        _run_qat,
        extras=_add_run_control,
    ),
    _Group("ampn", "activation mixed precision: sensitivities, bit allocation, the whole pipeline"),
    _Job(
        "ampn sensitivity",
        "per-layer sensitivity of a quantized model to its activation bits",
        "robuq.ampn.pipeline:SensitivityConfig",
        _run_ampn_sensitivity,
        extras=_add_no_progress,
    ),
    _Job(
        "ampn allocate",
        "exact DP allocation of per-layer bits under an average-bit budget",
        "robuq.ampn.pipeline:AllocateConfig",
        _run_ampn_allocate,
    ),
    _Job(
        "ampn run",
        "warm-up QAT, sensitivity, allocation, QAT with the plan (one schedule)",
        "robuq.ampn.pipeline:AMPNConfig",
        _run_ampn_run,
        "robuq.ampn.pipeline:SET_BY_AMPN",
        _add_final_stage_control,
    ),
    _Job(
        "sample",
        "generate images: a PNG grid and an ADM-style .npz (--num-samples: at scale, resumable, split over "
        "torchrun's processes)",
        "robuq.sample.to_files:SampleConfig",
        _run_sample,
        extras=_add_no_progress,
    ),
    _Job(
        "quantize",
        "apply a preset (and optional bit plan) to a checkpoint and save it",
        "robuq.io.quantized:QuantizeConfig",
        _run_quantize,
    ),
    _summary_parser,
    _Job(
        "export",
        "write a quantized model as a compact file (packed weights) for inference",
        "robuq.io.model_files:ExportConfig",
        _run_export,
    ),
    _Group("eval", "sample-quality metrics, and the Fashion-MNIST feature classifier"),
    _Job(
        "eval metrics",
        "FID, sFID, IS, precision/recall (and PSNR vs paired samples) of an .npz",
        "robuq.eval.evaluate:EvalConfig",
        _run_eval_metrics,
        extras=_add_json_out,
    ),
    _Job(
        "eval ref-stats",
        "an ADM-style reference batch (mu, sigma, mu_s, sigma_s and up to 10,000 images)",
        "robuq.eval.adm:RefStatsConfig",
        _run_eval_ref_stats,
        extras=_add_no_progress,
    ),
    _Job(
        "eval train-classifier",
        "train the Fashion-MNIST CNN whose features the metrics use",
        "robuq.eval.classifier:ClassifierTrainConfig",
        _run_train_classifier,
        extras=_add_no_progress,
    ),
]


def _imported(where: str):
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robuq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any error")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    groups = {"": sub}
    for entry in COMMANDS:
        if isinstance(entry, _Group):
            group = sub.add_parser(entry.name, help=entry.help)
            groups[entry.name] = group.add_subparsers(dest=f"{entry.name}_command", required=True)
        elif isinstance(entry, _Job):
            group, _, name = entry.words.rpartition(" ")
            skip = _imported(entry.skip) if entry.skip else ()
            p = _job(groups[group], name, entry.help, _imported(entry.config), entry.run, skip)
            if entry.extras is not None:
                entry.extras(p)
        else:
            entry(sub)
    return parser


def _raised_on_purpose(exc: BaseException) -> bool:
    """An error robuq raised for a person to read (``RobuqError``: its message says what to do). Everything
    else, robuq's bugs and errors raised inside PyTorch or NumPy included, keeps its traceback."""
    return isinstance(exc, RobuqError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if args.debug or not _raised_on_purpose(exc):
            raise
        print(f"robuq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
