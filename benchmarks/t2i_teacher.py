"""A text-to-image miniature teacher's evidence: its training log, prompt adherence on held-out prompts at a few
guidance scales, and a sample grid (a row per class), from a ``robuq train-t2i`` run folder or checkpoint.

    python benchmarks/t2i_teacher.py --run runs/flux-teacher --name t2i_teacher_flux

Writes results/NAME.{json,md}, results/NAME/grid.png, a copy of the run's log.jsonl and command, and (unless
``--no-keep-teacher``) the teacher as its users take it, in results/NAME/teacher/: ``transformer/`` (a diffusers
folder), the text encoder, the prompt table and ``teacher.json`` (``export_text_teacher``). Prompt
adherence: the shipped Fashion-MNIST classifier's accuracy on the class each sample's prompt names, over
``--samples`` samples on prompts drawn at random from the held-out templates, with a 95% Wilson interval.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import ROOT, invocation, parse_config, write_result
from convergence_stats import wilson_interval
from robuq.core.options import option


@dataclass
class TeacherEvalConfig:
    run: str = option("", "a robuq train-t2i output folder (its model.safetensors, else its newest checkpoint)")
    name: str = option("t2i_teacher", "results/NAME.{json,md} and results/NAME/")
    samples: int = option(500, "samples for prompt adherence")
    guidance: str = option("1,3", "guidance scales (comma-separated)")
    steps: int = option(20, "sampling steps")
    seed: int = option(0, "seed of the prompts and the noise")
    keep_teacher: bool = option(True, "keep the exported teacher in results/NAME/teacher (what QAT and sampling take)")
    results_dir: str = option(str(ROOT / "results"), "where the results go")


def newest_weights(run: Path) -> Path:
    if (run / "model.safetensors").is_file():
        return run / "model.safetensors"
    found = sorted((run / "checkpoints").glob("step-*.safetensors"))
    if not found:
        raise SystemExit(f"{run} holds no model.safetensors and no checkpoint yet")
    return found[-1]


def main(argv: list[str] | None = None) -> dict:
    from robuq.core.files import read_meta
    from robuq.data.captions import CLASS_WORDS, latents_to_pixels, prompt_set
    from robuq.eval.classifier import ASSET, extract, load_classifier
    from robuq.io.prompts import load_prompt_table
    from robuq.models.families import family_of, load_family_folder
    from robuq.sample.family_sampler import sample_latents
    from robuq.sample.generate import save_grid
    from robuq.train.text_to_image import export_text_teacher

    config = parse_config(TeacherEvalConfig, argv, __doc__)
    run = Path(config.run)
    weights = newest_weights(run)
    step = read_meta(weights).get("step")
    out = Path(config.results_dir) / config.name
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = out / "teacher" if config.keep_teacher else Path(tmp)
        if exported.exists():
            shutil.rmtree(exported)  # a teacher from an earlier step must not mix with this one
        export_text_teacher(weights, exported)
        model = load_family_folder(exported / "transformer")
        table = load_prompt_table(exported / "prompts.safetensors")
    channels = family_of(model).latent_channels(model)
    prompts, classes = prompt_set(held_out=True)
    pick = torch.randint(0, len(prompts), (config.samples,), generator=torch.Generator().manual_seed(config.seed))
    rows = table.index([prompts[i] for i in pick])
    wanted = np.asarray(classes)[pick.numpy()]
    classifier = load_classifier(ASSET)
    scales = [float(g) for g in config.guidance.split(",")]
    adherence = {}
    for scale in scales:
        latents = sample_latents(model, table, rows, (channels, 14, 14), config.steps, scale, config.seed, clip=True)
        grey = latents_to_pixels(latents)
        predicted = extract(classifier, np.repeat(grey[..., None], 3, axis=-1))["probs"].argmax(1)
        hits = int((predicted == wanted).sum())
        low, high = wilson_interval(hits, len(wanted))
        adherence[str(scale)] = {"value": hits / len(wanted), "low": low, "high": high}
    # The grid: a row per class, the first held-out prompt of each class, 8 noises each, at the largest scale.
    firsts = [next(p for p, c in zip(prompts, classes) if c == k) for k in range(len(CLASS_WORDS))]
    grid_rows = table.index([p for p in firsts for _ in range(8)])
    grid = latents_to_pixels(
        sample_latents(model, table, grid_rows, (channels, 14, 14), config.steps, max(scales), 1, clip=True)
    )
    save_grid(np.repeat(grid[..., None], 3, axis=-1), out / "grid.png", 8, row_labels=firsts)
    for name in ("log.jsonl", "config.json"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    payload = {
        "layout": family_of(model).name,
        "step": step,
        "weights": "ema",
        "samples": config.samples,
        "sampling_steps": config.steps,
        "prompt_accuracy": adherence,
        "grid_prompts": firsts,
    }
    lines = [
        f"{payload['layout']} layout teacher at step {step} (EMA weights): prompt adherence on {config.samples} "
        f"held-out prompts, {config.steps} sampling steps (95% Wilson intervals).",
        "",
        "| guidance | prompt accuracy |",
        "|---|---|",
        *(
            f"| {g} | {100 * a['value']:.1f} % [{100 * a['low']:.1f}, {100 * a['high']:.1f}] |"
            for g, a in adherence.items()
        ),
        "",
        f"![samples, a row per class at guidance {max(scales)}]({config.name}/grid.png)",
    ]
    write_result(config.name, payload, "\n".join(lines) + "\n", Path(config.results_dir), invocation(__file__, argv))
    return payload


if __name__ == "__main__":
    main()
