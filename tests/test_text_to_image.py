"""The text-to-image miniature and QAT of the families that condition on text: captions, the text encoder,
the rectified-flow and DDPM objectives, teacher training and export, QAT and AMPN of a family teacher with
cached prompt embeddings, and the family sampler."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from robuq.core.errors import RobuqError  # noqa: E402
from robuq.data.captions import (  # noqa: E402
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    VOCABULARY,
    CaptionedFashionMNIST,
    caption_for,
    latents_to_pixels,
    pixel_latents,
    prompt_set,
    shade_of,
    tokenize,
)
from robuq.diffusion.flow import RectifiedFlow, shifted  # noqa: E402
from robuq.io.prompts import load_prompt_table, save_prompt_table  # noqa: E402
from robuq.models.families import family_of, load_family_folder, predict_latents  # noqa: E402
from robuq.models.families.flux import pack, unpack  # noqa: E402
from robuq.models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from robuq.train.family_objective import noisy_batch  # noqa: E402
from robuq.train.text_to_image import (  # noqa: E402
    TextTeacherConfig,
    TextToImage,
    export_text_teacher,
    load_text_to_image,
    teacher_prompts,
    text_objective,
)
from robuq.train.trainer import LoopConfig, train_loop  # noqa: E402

TEXT_DIM = 16


def tiny_teacher(layout: str, seed: int = 0) -> TextToImage:
    """A text-to-image model of the miniature's layouts at test size (4 × 14 × 14 latents, 16-wide text)."""
    import diffusers

    torch.manual_seed(seed)
    if layout == "flux":
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM,
            axes_dims_rope=(2, 2, 4),
        )
    else:
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=14,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            cross_attention_dim=16,
            caption_channels=TEXT_DIM,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        )
    text = TextEncoder(TextEncoderConfig(vocab_size=len(VOCABULARY), dim=TEXT_DIM, layers=1, heads=2))
    return TextToImage(transformer, text)


def train_tiny(layout: str, out_dir, fmnist_dir, steps: int = 4, until: int | None = None, resume: bool = False):
    config = LoopConfig(
        steps=steps, global_batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=2, out_dir=str(out_dir)
    )
    config.device = "cpu"
    dataset = CaptionedFashionMNIST("train", fmnist_dir)
    return train_loop(
        config, tiny_teacher(layout), text_objective(0.1), dataset, resume=resume, until=until, progress=False
    )


# ------------------------------------------------------------------------------------------------ captions


def test_captions_use_the_vocabulary_and_held_out_prompts_use_only_held_out_templates():
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, 5:20, 5:20] = 250
    images[1, 5:20, 5:20] = 100
    assert [shade_of(i) for i in images[:2]] == ["light", "dark"]
    caption = caption_for(7, 7, images[0])
    assert caption == caption_for(7, 7, images[0])  # fixed per image
    assert len({caption_for(i, 7, images[0]) for i in range(60)}) > 5  # templates and synonyms vary over images
    ids = tokenize([caption, ""])
    assert ids.shape == (2, 12) and (ids[1] == 0).all() and (ids[0] > 0).sum() == len(caption.split())
    prompts, labels = prompt_set(held_out=True)
    train_shapes = {t.format(thing="X", shade="Y") for t in TRAIN_TEMPLATES}
    assert not any(p in train_shapes for p in prompts)
    assert len(prompts) == len(labels) and set(labels) == set(range(10))
    assert all(len(p.split()) <= 12 for p in prompts) and tokenize(prompts).shape[0] == len(prompts)
    assert len(HELD_OUT_TEMPLATES) >= 2
    with pytest.raises(RobuqError, match="outside the captions' vocabulary"):
        tokenize("a photo of a zebra")


def test_pixel_latents_invert_exactly():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    latents = pixel_latents(images)
    assert latents.shape == (5, 4, 14, 14) and latents.abs().max() <= 1
    assert np.array_equal(latents_to_pixels(latents), images)


def test_the_text_encoder_gives_finite_embeddings_for_the_empty_caption():
    encoder = TextEncoder(TextEncoderConfig(vocab_size=len(VOCABULARY), dim=16, layers=1, heads=2))
    tokens, pooled = encoder(tokenize(["", "a photo of a sneaker"]))
    assert tokens.shape == (2, 12, 16) and pooled.shape == (2, 16)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


# ------------------------------------------------------------------------------------------------ objectives


def test_euler_on_the_exact_velocity_of_one_point_lands_on_it():
    """For data that is one point x₀, the velocity at (x, σ) is (x − x₀)/σ and the path is straight: Euler
    steps on any (shifted) grid reach x₀ exactly."""
    x0 = torch.randn(3, 4, 2, 2)
    flow = RectifiedFlow(shift=3.0)
    out = flow.sample(lambda x, s: (x - x0) / s.view(-1, 1, 1, 1), torch.randn(3, 4, 2, 2), steps=7)
    assert torch.allclose(out, x0, atol=1e-5)
    grid = flow.sigmas(10)
    assert grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    assert shifted(torch.tensor(0.5), 3.0) == pytest.approx(0.75)


@pytest.mark.parametrize("layout", ["flux", "pixart"])
def test_the_family_objective_is_zero_for_the_exact_target(layout):
    model = tiny_teacher(layout)
    family = model.family
    x = torch.randn(4, 4, 14, 14)
    g = torch.Generator().manual_seed(0)
    batch = noisy_batch(family, model.transformer.config.out_channels or 4, x, g)
    if family.objective == "flow":
        # the inputs are (1 − σ) x + σ ε; recover ε and give the exact velocity
        sigma = batch.timesteps.view(-1, 1, 1, 1) / family.timestep_scale
        noise = (batch.inputs - (1 - sigma) * x) / sigma
        assert batch.losses(noise - x)["mse"].abs().max() < 1e-8
    else:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        exact = torch.cat([noise, torch.zeros_like(noise)], 1)
        assert batch.losses(exact)["mse"].abs().max() < 1e-10


def test_flux_packing_round_trips_and_the_prediction_reads_packed_tokens():
    x = torch.randn(2, 4, 6, 8)
    assert pack(x).shape == (2, 12, 16) and torch.equal(unpack(pack(x), 6, 8), x)
    model = tiny_teacher("flux")
    ids = tokenize(["a coat", "a bag"])
    text = model.conditioning(ids)
    out = predict_latents(model.transformer, torch.randn(2, 4, 14, 14), torch.tensor([0.3, 0.9]), text)
    assert out.shape == (2, 4, 14, 14) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ teachers


@pytest.mark.parametrize("layout", ["flux", "pixart"])
def test_a_teacher_trains_resumes_exactly_and_exports(layout, tmp_path, fmnist_dir):
    straight = train_tiny(layout, tmp_path / "straight", fmnist_dir)
    train_tiny(layout, tmp_path / "parts", fmnist_dir, until=2)
    parts = train_tiny(layout, tmp_path / "parts", fmnist_dir, resume=True)
    a, b = load_text_to_image(straight / "model.safetensors"), load_text_to_image(parts / "model.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)

    out = export_text_teacher(straight / "model.safetensors", tmp_path / "export")
    transformer = load_family_folder(out / "transformer")
    assert family_of(transformer).name == layout
    for p, q in zip(transformer.state_dict().values(), a.transformer.state_dict().values()):
        assert torch.equal(p, q)
    table = load_prompt_table(out / "prompts.safetensors")
    assert table.prompts == teacher_prompts() and table.prompts[0] == ""
    tokens, pooled = a.text_encoder(tokenize(table.prompts[:5]))
    assert torch.allclose(table.embeddings["prompt_embeds"][:5], tokens, atol=1e-6)
    assert ("pooled_prompt_embeds" in table.embeddings) == (layout == "flux")
    assert ("prompt_attention_mask" in table.embeddings) == (layout == "pixart")


def test_the_teacher_command_refuses_other_data():
    with pytest.raises(RobuqError, match="captioned Fashion-MNIST only"):
        TextTeacherConfig(data="/some/folder").validate()


def test_a_prompt_table_puts_the_empty_prompt_first(tmp_path):
    with pytest.raises(RobuqError, match="empty one"):
        save_prompt_table(tmp_path / "t.safetensors", ["a coat"], {"prompt_embeds": torch.zeros(1, 2, 3)})
    save_prompt_table(tmp_path / "t.safetensors", ["", "a coat"], {"prompt_embeds": torch.zeros(2, 2, 3)})
    table = load_prompt_table(tmp_path / "t.safetensors")
    assert table.index(["a coat", ""]).tolist() == [1, 0]
    with pytest.raises(RobuqError, match="no embeddings for 'a bag'"):
        table.index(["a bag"])


# ------------------------------------------------------------------------------------------------ QAT


@pytest.fixture
def exported_teacher(tmp_path, fmnist_dir):
    def export(layout: str):
        run = train_tiny(layout, tmp_path / f"teacher-{layout}", fmnist_dir, steps=2)
        return export_text_teacher(run / "model.safetensors", tmp_path / f"export-{layout}")

    return export


@pytest.mark.parametrize("layout", ["flux", "pixart"])
def test_qat_of_a_family_teacher_trains_every_block_linear_and_loads(layout, tmp_path, fmnist_dir, exported_teacher):
    from robuq.io.quantized import load_quantized
    from robuq.quant.linear import QuantLinear
    from robuq.train.qat import qat

    teacher = exported_teacher(layout)
    config = _family_qat_config(
        teacher, fmnist_dir, tmp_path / "qat", probe_images=8, log_every=2, lowrank_share=16 / 1152
    )
    out = qat(config, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and 0 < log[-1]["probe_rel_mse"] < 1 and log[-1]["distill"] >= 0
    student, policy = load_quantized(out / "model.safetensors")
    assert family_of(student).name == layout and policy.name == "robuq-a4"
    ternary = [m for m in student.modules() if isinstance(m, QuantLinear) and m.config.weight == "ternary"]
    assert ternary and all(m.rank == m.config.rank_for(m.in_features, m.out_features) for m in ternary)
    assert {m.config.lowrank_share for m in ternary} == {16 / 1152}
    table = load_prompt_table(teacher / "prompts.safetensors")
    text = table.forward_arguments(
        table.index(["a coat", ""]),
        set(__import__("inspect").signature(student.forward).parameters),
        torch.device("cpu"),
    )
    out_latents = predict_latents(
        student.eval(),
        torch.randn(2, 4, 14, 14),
        torch.tensor([0.5, 0.5]) * (family_of(student).timestep_scale if layout == "flux" else 500),
        text,
    )
    assert out_latents.shape[0] == 2 and torch.isfinite(out_latents).all()


def test_qat_of_a_family_teacher_needs_its_prompt_table(tmp_path, fmnist_dir, exported_teacher):
    from robuq.train.qat import qat

    teacher = exported_teacher("flux")
    config = _family_qat_config(teacher, fmnist_dir, tmp_path / "q", prompt_embeds=None, steps=2)
    with pytest.raises(RobuqError, match="--prompt-embeds"):
        qat(config, progress=False)


def test_ampn_allocates_the_text_and_image_streams_of_a_flux_teacher(tmp_path, fmnist_dir, exported_teacher):
    from robuq.ampn.pipeline import AMPNConfig, ampn_run
    from robuq.precision.plan import BitPlan

    teacher = exported_teacher("flux")
    qat = _family_qat_config(teacher, fmnist_dir, tmp_path / "ampn", probe_images=8)
    final = ampn_run(
        AMPNConfig(qat=qat, budget=2, warmup_qat_steps=2, calibration_images=8), progress=False, announce_plan=False
    )
    plan = BitPlan.load(tmp_path / "ampn" / "plan.json")
    assert any(".add_q_proj" in name for name in plan.bits) and any(".to_q" in name for name in plan.bits)
    assert any("single_transformer_blocks" in name for name in plan.bits)
    assert sum(plan.bits.values()) / len(plan.bits) <= 2 + 1e-9
    # Every stream's layers are in the plan's summary (they were left out of it when it knew only DiT's four).
    assert {"qkv", "txt.qkv", "single.qkv", "single.fc2"} <= set(plan.role_averages)
    sensitivity = json.loads((tmp_path / "ampn" / "sensitivity.json").read_text())
    assert sensitivity and (final / "model.safetensors").is_file()


@pytest.mark.parametrize("layout", ["flux", "pixart"])
def test_the_family_sampler_is_deterministic_and_shards_nest(layout, exported_teacher):
    from robuq.sample.family_sampler import sample_latents

    teacher = exported_teacher(layout)
    model = load_family_folder(teacher / "transformer")
    table = load_prompt_table(teacher / "prompts.safetensors")
    rows = table.index(["a coat", "a bag", "a sneaker"])
    three = sample_latents(model, table, rows, (4, 14, 14), steps=3, guidance=2.0, shard_size=2)
    again = sample_latents(model, table, rows, (4, 14, 14), steps=3, guidance=2.0, shard_size=2)
    two = sample_latents(model, table, rows[:2], (4, 14, 14), steps=3, guidance=2.0, shard_size=2)
    assert three.shape == (3, 4, 14, 14) and torch.isfinite(three).all()
    assert torch.equal(three, again) and torch.allclose(three[:2], two, atol=1e-6)
    other = sample_latents(model, table, rows, (4, 14, 14), steps=3, guidance=2.0, shard_size=2, seed=1)
    assert not torch.allclose(three, other)


def test_robuq_sample_draws_a_family_model_from_its_prompt_table(tmp_path, exported_teacher):
    from robuq.cli.main import main

    teacher = exported_teacher("flux")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dark photo of a coat\na light photo of a sneaker\n")
    common = ["--ckpt", str(teacher / "transformer"), "--prompt-embeds", str(teacher / "prompts.safetensors")]
    common += [
        "--latent-decode",
        "space-to-depth",
        "--steps",
        "2",
        "--cfg-scale",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(["sample", *common, "--prompts", str(prompts), "--num-samples", "5", "--out", str(tmp_path / "a")]) == 0
    with np.load(tmp_path / "a" / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.shape == (5, 28, 28, 3) and images.dtype == np.uint8 and set(labels) <= {0, 1}
    assert (images == images[..., :1]).all()  # grey
    assert main(["sample", *common, "--out", str(tmp_path / "b")]) == 0  # every prompt of the table once
    with np.load(tmp_path / "b" / "samples.npz") as data:
        assert len(data["labels"]) == len(teacher_prompts()) - 1
    assert main(["sample", *common, "--pipeline", str(tmp_path), "--out", str(tmp_path / "c")]) == 2


def test_prompt_only_qat_trains_on_the_teachers_own_samples(tmp_path, exported_teacher):
    """No images at all: the teacher samples its prompts once (kept, and read again on resumption), and QAT
    trains the student on those samples."""
    from robuq.core.files import load_tensors
    from robuq.train.qat import qat

    teacher = exported_teacher("pixart")
    config = _family_qat_config(
        teacher, tmp_path / "no-data-here", tmp_path / "qat", prompt_only=6, prompt_only_steps=2, global_batch_size=4
    )
    qat(config, until=2, progress=False)
    samples, meta = load_tensors(tmp_path / "qat" / "teacher-samples.safetensors")
    assert samples["latents"].shape == (6, 4, 14, 14) and samples["rows"].min() >= 1 and meta["count"] == 6
    out = qat(config, resume=True, progress=False)
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 4
    again, _ = load_tensors(tmp_path / "qat" / "teacher-samples.safetensors")
    assert torch.equal(again["latents"], samples["latents"])
    with pytest.raises(RobuqError, match="other settings"):
        qat(dataclasses.replace(config, prompt_only=5), resume=True, progress=False)


def test_prompt_only_ampn_calibrates_on_the_teachers_samples(tmp_path, exported_teacher):
    from robuq.ampn.pipeline import AMPNConfig, ampn_run
    from robuq.core.files import load_tensors

    teacher = exported_teacher("flux")
    qat = _family_qat_config(
        teacher,
        tmp_path / "no-data-here",
        tmp_path / "ampn",
        prompt_only=6,
        prompt_only_steps=2,
        latent_size=14,
        global_batch_size=4,
    )
    final = ampn_run(
        AMPNConfig(qat=qat, budget=3, warmup_qat_steps=2, calibration_images=4), progress=False, announce_plan=False
    )
    warm, _ = load_tensors(tmp_path / "ampn" / "warmup" / "teacher-samples.safetensors")
    last, _ = load_tensors(final / "teacher-samples.safetensors")
    assert torch.equal(warm["latents"], last["latents"]) and (final / "model.safetensors").is_file()


def _family_qat_config(teacher, data_dir, out, **changes):
    """A small QAT run of an exported miniature teacher on captioned Fashion-MNIST, with ``changes``."""
    from robuq.train.qat import QATConfig

    base = dict(
        teacher=str(teacher / "transformer"),
        prompt_embeds=str(teacher / "prompts.safetensors"),
        data_dir=str(data_dir),
        steps=4,
        global_batch_size=8,
        probe_every=2,
        probe_images=4,
        ckpt_every=2,
        out_dir=str(out),
        device="cpu",
    )
    return QATConfig(**{**base, **changes})


def test_family_qat_resumes_exactly(tmp_path, fmnist_dir, exported_teacher):
    from robuq.models.checkpoint import read_state_dict
    from robuq.train.qat import qat

    teacher = exported_teacher("flux")
    straight = qat(_family_qat_config(teacher, fmnist_dir, tmp_path / "a"), progress=False)
    qat(_family_qat_config(teacher, fmnist_dir, tmp_path / "b"), until=2, progress=False)
    parts = qat(_family_qat_config(teacher, fmnist_dir, tmp_path / "b"), resume=True, progress=False)
    a, _ = read_state_dict(straight / "model.safetensors")
    b, _ = read_state_dict(parts / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_family_qat_in_bf16_recomputes_blocks_with_checkpointing(tmp_path, fmnist_dir, exported_teacher, monkeypatch):
    import torch.utils.checkpoint as checkpointing

    from robuq.train.qat import qat

    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    teacher = exported_teacher("pixart")
    config = _family_qat_config(teacher, fmnist_dir, tmp_path / "q", precision="bf16", grad_checkpoint=True, steps=2)
    out = qat(config, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert calls and all(np.isfinite(r["loss"]) for r in log)


@pytest.mark.slow  # torchrun: two fresh interpreters
@pytest.mark.parametrize("shard", ["none", "fsdp"])
def test_family_qat_under_torchrun(shard, tmp_path, fmnist_dir, exported_teacher):
    import os
    import subprocess
    import sys

    teacher = exported_teacher("flux")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "robuq.cli"]
    cmd += ["qat", "--teacher", str(teacher / "transformer"), "--prompt-embeds", str(teacher / "prompts.safetensors")]
    cmd += ["--data-dir", str(fmnist_dir), "--steps", "2", "--global-batch-size", "8", "--ckpt-every", "2"]
    cmd += ["--probe-every", "2", "--probe-images", "4", "--device", "cpu", "--no-progress", "--shard", shard]
    cmd += ["--out-dir", str(tmp_path / "q")]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("FSDP2: 3 units sharded over 2 processes, and 3 of frozen modules" in result.stderr) == (shard == "fsdp")
    log = [json.loads(line) for line in (tmp_path / "q" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and "probe_rel_mse" in log[-1]


@pytest.mark.slow  # torchrun: two fresh interpreters
def test_a_teacher_trains_under_torchrun(tmp_path, fmnist_dir):
    """DDP wraps the text-to-image model: the objective reaches its family and parts through the wrapper."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "robuq.cli"]
    cmd += [
        "train-t2i",
        "--layout",
        "pixart",
        "--data-dir",
        str(fmnist_dir),
        "--steps",
        "2",
        "--global-batch-size",
        "4",
    ]
    cmd += [
        "--log-every",
        "1",
        "--ckpt-every",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out-dir",
        str(tmp_path / "t"),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_text_to_image(tmp_path / "t" / "model.safetensors").family.name == "pixart"
