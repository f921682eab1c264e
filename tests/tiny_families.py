"""The families' diffusers models at tiny configs (the sizes diffusers' own tests use), random weights."""

from __future__ import annotations

import torch

# family → (diffusers class, keyword arguments)
TINY = {
    "pixart": (
        "PixArtTransformer2DModel",
        dict(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
    ),
    "sd3": (
        "SD3Transformer2DModel",
        dict(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
    ),
    "flux": (
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        ),
    ),
    "flux2": (
        "Flux2Transformer2DModel",
        dict(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            timestep_guidance_channels=256,
            axes_dims_rope=[4, 4, 4, 4],
        ),
    ),
    "sana": (
        "SanaTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=4,
            num_attention_heads=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=4,
            cross_attention_dim=8,
            caption_channels=8,
            sample_size=32,
        ),
    ),
}


def tiny_family_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's diffusers model at its tiny config, weights drawn with ``seed`` and perturbed so that
    zero-initialised gates and outputs do not hide the blocks."""
    import diffusers

    name, kwargs = TINY[family]
    torch.manual_seed(seed)
    model = getattr(diffusers, name)(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=32,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _tiny_dc_vae():
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def tiny_pipeline(family: str, transformer: torch.nn.Module):
    """The family's diffusers pipeline around ``transformer`` with a tiny random VAE and no text encoders."""
    import diffusers
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    no_text = dict(text_encoder=None, tokenizer=None)
    if family == "flux":
        return diffusers.FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(1),
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
            **no_text,
        )
    if family == "flux2":
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKLFlux2(
            block_out_channels=(4,),
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=1,
            norm_num_groups=1,
            sample_size=32,
        )
        return diffusers.Flux2Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer, **no_text
        )
    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(4),
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
            **no_text,
        )
    if family == "pixart":
        return diffusers.PixArtSigmaPipeline(
            vae=_tiny_vae(4), transformer=transformer, scheduler=DDPMScheduler(), **no_text
        )
    if family == "sana":
        return diffusers.SanaPipeline(
            vae=_tiny_dc_vae(), transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **no_text
        )
    raise KeyError(family)


def tiny_prompt_embeddings(family: str, prompts: int = 2) -> dict[str, torch.Tensor]:
    """Cached prompt embeddings of the shapes the family's tiny pipeline takes (random: no text encoder)."""
    g = torch.Generator().manual_seed(3)
    width = {"pixart": 32, "sd3": 32, "flux": 32, "flux2": 32, "sana": 8}[family]
    embeds = {"prompt_embeds": torch.randn(prompts, 8, width, generator=g)}
    if family in ("flux", "sd3"):
        embeds["pooled_prompt_embeds"] = torch.randn(prompts, {"flux": 32, "sd3": 64}[family], generator=g)
    if family in ("pixart", "sana"):
        embeds["prompt_attention_mask"] = torch.ones(prompts, 8)
        embeds["negative_prompt_embeds"] = torch.randn(prompts, 8, width, generator=g)
        embeds["negative_prompt_attention_mask"] = torch.ones(prompts, 8)
    if family == "sd3":
        embeds["negative_prompt_embeds"] = torch.randn(prompts, 8, width, generator=g)
        embeds["negative_pooled_prompt_embeds"] = torch.randn(prompts, 64, generator=g)
    return embeds
