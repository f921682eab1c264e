"""Every family through every verb on a diffusers model folder: quantize, summary, export, and sampling
in the family's own diffusers pipeline from cached prompt embeddings, on integers (no text encoder)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiny_families import TINY, tiny_family_model, tiny_pipeline, tiny_prompt_embeddings
import robuq
from robuq.cli.main import main
from robuq.sample.text_to_image import family_pipeline, read_prompt_embeddings, sample_text_to_image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' pipeline classes need it, though no text encoder is built


@pytest.fixture
def family_files(tmp_path):
    """(model folder, pipeline folder, prompt-embeddings file) of a family, as a user would have them."""

    def make(family):
        model = tiny_family_model(family)
        model.save_pretrained(tmp_path / "transformer")
        tiny_pipeline(family, tiny_family_model(family)).save_pretrained(tmp_path / "pipeline")
        save_file(
            {k: v.contiguous() for k, v in tiny_prompt_embeddings(family).items()}, tmp_path / "prompts.safetensors"
        )
        return tmp_path / "transformer", tmp_path / "pipeline", tmp_path / "prompts.safetensors"

    return make


@pytest.mark.parametrize("family", list(TINY))
def test_every_verb_on_a_family_folder(family, family_files, tmp_path, capsys):
    folder, pipeline, prompts = family_files(family)
    quantized, exported = tmp_path / "q.safetensors", tmp_path / "e.safetensors"
    assert main(["quantize", "--ckpt", str(folder), "--act-bits", "3", "--out", str(quantized)]) == 0
    capsys.readouterr()
    assert main(["summary", str(quantized), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == family and summary["kept_full_precision"]
    assert {m["kind"] for m in summary["modules"]} >= {"QuantLinear", "QuantAttentionCore"}
    assert main(["export", str(quantized), "--out", str(exported)]) == 0
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(exported),
                "--pipeline",
                str(pipeline),
                "--prompt-embeds",
                str(prompts),
                "--steps",
                "2",
                "--height",
                "32",
                "--width",
                "32",
                "--out",
                str(tmp_path / "samples"),
            ]
        )
        == 0
    )
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        assert data["arr_0"].shape == (2, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert (tmp_path / "samples" / "grid.png").is_file()
    model = robuq.load_exported(exported)
    assert type(model).__name__ == TINY[family][0]


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_pipeline_samples_of_the_export_match_the_quantized_model(family, family_files):
    folder, pipeline, prompts = family_files(family)
    config = robuq.preset("robuq", act_bits=3)
    quantized = robuq.quantize_(robuq.load_any(folder), config).eval()
    exported = robuq.load_exported(robuq.export_model(quantized, config, folder.parent / "e.safetensors", dtype="fp32"))
    a = sample_text_to_image(quantized, pipeline, prompts, steps=2, height=32, width=32)
    b = sample_text_to_image(exported, pipeline, prompts, steps=2, height=32, width=32)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # integer kernels against fake quantization: rounding


def test_unknown_embedding_names_and_missing_folders_are_named(family_files, tmp_path):
    folder, pipeline, prompts = family_files("flux")
    model = robuq.load_any(folder)
    pipe = family_pipeline(model, pipeline)
    save_file({"prompt_embeds": torch.zeros(1, 8, 32), "clip_embeds": torch.zeros(1, 4)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="takes no clip_embeds"):
        read_prompt_embeddings(tmp_path / "bad.safetensors", pipe)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        family_pipeline(model, tmp_path)
    with pytest.raises(ValueError, match="--pipeline FOLDER"):
        main(["--debug", "sample", "--ckpt", str(folder), "--out", str(tmp_path / "s")])


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_ampn_sensitivity_and_allocation_on_a_family(family, family_files, tmp_path):
    folder, _, prompts = family_files(family)
    quantized, sensitivity, plan = tmp_path / "q.safetensors", tmp_path / "s.json", tmp_path / "plan.json"
    assert main(["quantize", "--ckpt", str(folder), "--out", str(quantized)]) == 0
    assert (
        main(
            [
                "ampn",
                "sensitivity",
                "--model",
                str(quantized),
                "--prompt-embeds",
                str(prompts),
                "--calibration-images",
                "4",
                "--out",
                str(sensitivity),
                "--no-progress",
            ]
        )
        == 0
    )
    layers = json.loads(sensitivity.read_text())["layers"]
    model, _ = robuq.load_quantized(quantized)
    streams = {n.split(".")[0] for n in layers}
    assert any("add_q_proj" in n or "attn2.to_k" in n for n in layers)  # the text stream is measured on its own
    assert all(float(row["4"]) == 0 and float(row["1"]) >= 0 for row in layers.values())  # measured at 4 bits
    total = {b: sum(float(row[b]) for row in layers.values()) for b in ("1", "2", "3")}
    assert total["1"] > total["2"] > total["3"] > 0  # per layer, a negligible one may rank 1 and 3 bits by noise
    assert streams <= {"transformer_blocks", "single_transformer_blocks"}
    assert main(["ampn", "allocate", "--sensitivity", str(sensitivity), "--budget", "2", "--out", str(plan)]) == 0
    bits = json.loads(plan.read_text())["bits"]
    assert set(bits) == set(layers) and sum(bits.values()) <= 2 * len(bits)
    robuq.precision.apply_plan(model, bits)
