"""Training on latents and on any Dataset of (x, y); bf16 autocast and gradient checkpointing; the reference
DiT-XL/2 layout. Real parts throughout: a latent cache encoded by a random AutoencoderKL, tiny DiTs."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from torch.utils.data import TensorDataset

from robuq.ampn.pipeline import AMPNConfig, ampn_run
from robuq.core.files import load_tensors, save_tensors
from robuq.data.latents import LatentDataset
from robuq.io.quantized import load_quantized
from robuq.models.dit import DiT, create_dit, dit_config
from robuq.precision.presets import resolve_policy
from robuq.data.encode_latents import LatentsConfig, encode_latents
from robuq.train.qat import QATConfig, build_student, qat, qat_objective
from robuq.train.trainer import TrainConfig, train
from robuq.diffusion.gaussian import create_diffusion

from conftest import make_image_folder, perturbed, tiny_config
from test_image_training import assert_mirrors_redrawn_each_epoch, seen_samples, which_samples
from test_latents import make_vae

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """12 images of 3 classes at 64 px → 8×8×4 latents, with their mirrored copies."""
    root = tmp_path_factory.mktemp("latent-data")
    images, vae = make_image_folder(root / "train"), make_vae(root / "vae")
    return encode_latents(
        LatentsConfig(
            images=str(images),
            vae=str(vae),
            out=str(root / "cache"),
            image_size=64,
            shard_size=8,
            batch_size=6,
            num_workers=0,
            flip=True,
            device="cpu",
        ),
        progress=False,
    )


def latent_teacher(tmp_path) -> str:
    torch.manual_seed(0)
    model = perturbed(DiT(tiny_config(in_channels=4, num_classes=3)), 0.02)
    return str(
        save_tensors(tmp_path / "teacher.safetensors", model.state_dict(), {"model_config": model.config.to_dict()})
    )


def small_qat(tmp_path, teacher, **overrides) -> QATConfig:
    base = dict(
        teacher=teacher,
        out_dir=str(tmp_path / "qat"),
        steps=3,
        global_batch_size=6,
        log_every=1,
        ckpt_every=3,
        probe_every=3,
        probe_images=6,
        act_bits=3,
        warmup_steps=1,
        device="cpu",
    )
    return QATConfig(**{**base, **overrides})


def test_train_and_qat_on_a_latent_cache(tmp_path, cache):
    out = train(
        TrainConfig(
            latents=str(cache),
            model="DiT-T/4",
            input_size=8,
            steps=2,
            global_batch_size=6,
            ckpt_every=2,
            warmup_steps=1,
            device="cpu",
            out_dir=str(tmp_path / "fp"),
        ),
        progress=False,
    )
    trained, meta = load_tensors(out / "model.safetensors")
    assert meta["model_config"]["in_channels"] == 4 and meta["model_config"]["num_classes"] == 3
    teacher = latent_teacher(tmp_path)
    out = qat(small_qat(tmp_path, teacher, latents=str(cache)), progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert "probe_rel_mse" in log[-1]
    model, _ = load_quantized(out / "model.safetensors")
    assert model.in_channels == 4


def test_the_loop_picks_the_cached_mirror_per_sample_and_epoch(tmp_path, cache):
    dataset = LatentDataset(cache)
    config = TrainConfig(
        latents=str(cache),
        model="DiT-T/4",
        input_size=8,
        steps=4,
        global_batch_size=6,
        ckpt_every=4,
        warmup_steps=1,
        device="cpu",
        out_dir=str(tmp_path / "fp"),
    )
    assert_mirrors_redrawn_each_epoch([which_samples(b, dataset) for b in seen_samples(config, dataset)], 12)


@pytest.mark.slow
def test_latent_qat_resume_is_exact_with_workers(tmp_path, cache):
    teacher = latent_teacher(tmp_path)
    straight = qat(
        small_qat(tmp_path / "a", teacher, latents=str(cache), steps=4, ckpt_every=2, num_workers=2), progress=False
    )
    qat(small_qat(tmp_path / "b", teacher, latents=str(cache), steps=4, ckpt_every=2), until=2, progress=False)
    split = qat(
        small_qat(tmp_path / "b", teacher, latents=str(cache), steps=4, ckpt_every=2, num_workers=2),
        resume=True,
        progress=False,
    )
    a, _ = load_tensors(straight / "model.safetensors")
    b, _ = load_tensors(split / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_data_and_teacher_name_both(tmp_path, cache, fmnist_dir):
    teacher = latent_teacher(tmp_path)
    with pytest.raises(ValueError, match=r"fashion-mnist.*1×8×8.*4×8×8"):
        qat(small_qat(tmp_path, teacher, data_dir=str(fmnist_dir)), progress=False)
    gray = tmp_path / "gray.safetensors"
    model = DiT(tiny_config(in_channels=1, num_classes=3))
    save_tensors(gray, model.state_dict(), {"model_config": model.config.to_dict()})
    with pytest.raises(ValueError, match=rf"{cache.name}.*4×8×8.*1×8×8"):
        qat(small_qat(tmp_path, str(gray), latents=str(cache)), progress=False)


def test_any_dataset_flows_through_qat_and_ampn(tmp_path):
    """A plain TensorDataset (no images/labels attributes, no class count) drives QAT, calibration, the probe
    and the whole AMPN pipeline."""
    teacher = latent_teacher(tmp_path)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(12, 4, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g))
    final = ampn_run(
        AMPNConfig(
            qat=small_qat(tmp_path, teacher, steps=4, ckpt_every=2, probe_every=2, out_dir=str(tmp_path / "ampn")),
            budget=2.0,
            warmup_qat_steps=2,
            calibration_images=6,
        ),
        progress=False,
        dataset=data,
    )
    model, _ = load_quantized(final / "model.safetensors")
    assert (tmp_path / "ampn" / "plan.json").is_file() and model.in_channels == 4
    wrong = TensorDataset(torch.randn(12, 3, 8, 8), torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"TensorDataset.*3×8×8.*4×8×8"):
        qat(small_qat(tmp_path, teacher, out_dir=str(tmp_path / "w")), dataset=wrong, progress=False)


def fmnist_teacher(tmp_path) -> str:
    torch.manual_seed(0)
    teacher = perturbed(DiT(tiny_config()), 0.05)
    return str(
        save_tensors(tmp_path / "t.safetensors", teacher.state_dict(), {"model_config": teacher.config.to_dict()})
    )


def logged_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_bf16_qat_matches_fp32_closely(tmp_path, fmnist_dir):
    path = fmnist_teacher(tmp_path)
    losses = {}
    for precision in ("fp32", "bf16"):
        out = qat(
            small_qat(
                tmp_path / precision,
                path,
                data_dir=str(fmnist_dir),
                steps=4,
                ckpt_every=4,
                probe_every=0,
                global_batch_size=8,
                precision=precision,
                loss="mix",
            ),
            progress=False,
        )
        losses[precision] = logged_losses(out)
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert b == pytest.approx(a, rel=0.05)
    assert losses["fp32"] != losses["bf16"]  # bf16 did run in bf16


@pytest.mark.slow  # inductor compiles C++ for the CPU: about 20 s with a warm cache, a minute without
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile's inductor back-end needs a C++ compiler on the CPU, and this machine has none",
)
@pytest.mark.parametrize("kernels", [True, False], ids=["c-kernels", "pytorch-ops"])
def test_compiled_qat_step_matches_eager(tmp_path, fmnist_dir, kernels):
    from torch._dynamo.utils import counters

    from robuq.kernels import native

    path = fmnist_teacher(tmp_path)
    torch._dynamo.reset()
    counters.clear()
    try:
        losses = {}
        with native.use(kernels):  # off: the PyTorch ops dynamo traces into, as on a machine without a compiler
            for compile in (False, True):
                out = qat(
                    small_qat(
                        tmp_path / str(compile),
                        path,
                        data_dir=str(fmnist_dir),
                        steps=1,
                        ckpt_every=1,
                        probe_every=0,
                        global_batch_size=4,
                        compile=compile,
                    ),
                    progress=False,
                )
                losses[compile] = logged_losses(out)
                if not compile:
                    assert counters["stats"]["unique_graphs"] == 0
        assert counters["stats"]["unique_graphs"] > 0  # the student did go through dynamo and inductor
        assert losses[True] == pytest.approx(losses[False], rel=1e-4) and all(map(math.isfinite, losses[True]))
        compiled, _ = load_tensors(out / "model.safetensors")
        eager, _ = load_tensors(tmp_path / "False" / "qat" / "model.safetensors")
        if kernels:  # the C calls run outside the graphs, on the same numbers both ways
            assert all(torch.allclose(compiled[k], eager[k], atol=1e-5) for k in eager)
        else:
            # Inductor fuses and reorders the traced ops' float sums, and Adam's first step is lr·g/(|g|+ε): a
            # weight whose gradient is ~1e-8 can move by a whole step on rounding alone. So a few weights may
            # differ; a wrong gradient path would move most of them.
            for k in eager:
                off = (compiled[k] - eager[k]).abs().gt(1e-5)
                assert off.float().mean() <= 1e-3, (k, off.sum().item())
    finally:
        torch._dynamo.reset()  # the compiled graphs hold the student; later tests should not inherit them


def test_quantizer_levels_are_decided_in_fp32_under_autocast():
    torch.manual_seed(0)
    student = build_student(DiT(tiny_config()), resolve_policy("robuq", 2, None, None))
    layer = student.blocks[0].mlp.fc1
    x = torch.randn(2, 16, layer.in_features)
    with torch.no_grad():
        _, exact, _ = layer._quantized_operands(x, layer.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            from robuq.quant.primitives import in_fp32

            _, under, _ = in_fp32(layer._quantized_operands, x.bfloat16().float(), layer.weight)
            _, naive, _ = layer._quantized_operands(x.bfloat16(), layer.weight)
    assert under.dtype == torch.float32 and torch.equal(
        under, layer._quantized_operands(x.bfloat16().float(), layer.weight)[1]
    )
    assert naive.dtype == torch.bfloat16  # what in_fp32 prevents: quantizing in bf16


def test_grad_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DiT(tiny_config())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.grad_checkpoint = checkpointed
        model(x, t, y, force_drop_ids=torch.tensor([0, 1])).pow(2).mean().backward()  # fixed label dropout
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def _reference_layout(depth: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of facebookresearch/DiT's DiT-XL/2 (256 px: 32×32×4 latents, learned sigma), written
    out from its models.py rather than read off robuq."""
    h, shapes = (
        1152,
        {
            "pos_embed": (1, 256, 1152),
            "x_embedder.proj.weight": (1152, 4, 2, 2),
            "x_embedder.proj.bias": (1152,),
            "t_embedder.mlp.0.weight": (1152, 256),
            "t_embedder.mlp.0.bias": (1152,),
            "t_embedder.mlp.2.weight": (1152, 1152),
            "t_embedder.mlp.2.bias": (1152,),
            "y_embedder.embedding_table.weight": (1001, 1152),
            "final_layer.linear.weight": (32, 1152),
            "final_layer.linear.bias": (32,),
            "final_layer.adaLN_modulation.1.weight": (2304, 1152),
            "final_layer.adaLN_modulation.1.bias": (2304,),
        },
    )
    for b in range(depth):
        for name, shape in {
            "attn.qkv": (3 * h, h),
            "attn.proj": (h, h),
            "mlp.fc1": (4 * h, h),
            "mlp.fc2": (h, 4 * h),
            "adaLN_modulation.1": (6 * h, h),
        }.items():
            shapes[f"blocks.{b}.{name}.weight"], shapes[f"blocks.{b}.{name}.bias"] = shape, shape[:1]
    return shapes


def test_reference_dit_xl2_layout_loads_exactly():
    layout = _reference_layout(28)
    with torch.device("meta"):
        model = create_dit("DiT-XL/2", input_size=32)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == layout
    # A state_dict in that layout (made here, reduced depth to stay small) loads strictly and is used.
    small = DiT(replace(dit_config("DiT-XL/2", input_size=8), depth=1))
    state = {k: torch.randn(s if k != "pos_embed" else (1, 16, 1152)) * 0.01 for k, s in _reference_layout(1).items()}
    small.load_state_dict(state, strict=True)
    assert torch.equal(small.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_one_bf16_qat_step_of_a_reduced_depth_xl():
    """Width 1152, 16 heads, 2 blocks, 8×8 latents: one QAT step under bf16 autocast on the CPU."""
    torch.manual_seed(0)
    teacher = DiT(replace(dit_config("DiT-XL/2", input_size=8), depth=2)).eval().requires_grad_(False)
    with torch.no_grad():  # adaLN-Zero starts with closed gates and a zero head: no gradient would reach the blocks
        for layer in [b.adaLN_modulation[-1] for b in teacher.blocks] + [teacher.final_layer.linear]:
            layer.weight.normal_(std=0.02)
    student = build_student(teacher, resolve_policy("robuq", 2, None, None))
    student.grad_checkpoint = True
    objective = qat_objective(create_diffusion(learn_sigma=True), teacher, "mix", 1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective(student, x, y, torch.Generator().manual_seed(0))["loss"].float().mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0


def test_train_takes_any_dataset(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
    config = TrainConfig(
        model="DiT-T/4",
        input_size=8,
        steps=1,
        global_batch_size=4,
        warmup_steps=1,
        device="cpu",
        out_dir=str(tmp_path / "t"),
    )
    with pytest.raises(ValueError, match="num_classes"):
        train(config, dataset=data, progress=False)
    data.num_classes = 3
    out = train(config, dataset=data, progress=False)
    assert load_tensors(out / "model.safetensors")[1]["model_config"]["in_channels"] == 4
    with pytest.raises(ValueError, match="--input-size 8"):
        train(replace(config, input_size=16), dataset=data, progress=False)
