"""A robuq-quantized, and an exported, transformer sampling inside diffusers' DiTPipeline with a tiny VAE."""

import numpy as np
import pytest
import torch

from conftest import tiny_diffusers_dit
from robuq.deploy.export import export_model, load_exported
from robuq.deploy.integer_linear import IntegerLinear
from robuq.quant.attention import QuantAttentionCore
from robuq.precision import preset, quantize_

diffusers = pytest.importorskip("diffusers")


# DiTPipeline's guidance feeds the null class as label 1000, so only 1000-class transformers can guide.
CLASSES = 1000


def _pipeline(tmp_path, transformer):
    """A DiTPipeline saved and reloaded from a local folder, its transformer then replaced by ``transformer``."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    )
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    pipe = diffusers.DiTPipeline(
        transformer=tiny_diffusers_dit(num_embeds_ada_norm=CLASSES), vae=vae, scheduler=scheduler
    )
    pipe.save_pretrained(tmp_path / "pipe")
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True, low_cpu_mem_usage=False)
    pipe.transformer = transformer
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe) -> np.ndarray:
    return pipe(
        class_labels=[1, 7],
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_quantized_and_exported_transformers_sample_in_dit_pipeline(tmp_path):
    transformer = tiny_diffusers_dit(num_embeds_ada_norm=CLASSES)
    config = preset("robuq", act_bits=4)
    quantized = quantize_(transformer, config).eval()
    assert sum(isinstance(m, QuantAttentionCore) for m in quantized.modules()) == 2
    pipe = _pipeline(tmp_path, quantized)
    images = _sample(pipe)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 0

    exported = load_exported(export_model(quantized, config, tmp_path / "t.safetensors", dtype="fp32"))
    assert any(isinstance(m, IntegerLinear) for m in exported.modules())
    pipe.transformer = exported
    np.testing.assert_allclose(_sample(pipe), images, atol=2e-3)  # the integer path samples the same images
