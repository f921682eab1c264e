"""Reference DiT ⇄ diffusers DiTTransformer2DModel: exact both ways, through files on disk."""

import pytest
import torch

from conftest import run_diffusers, tiny_config, tiny_diffusers_dit
from robuq.models.checkpoint import load_dit
from robuq.models.convert_diffusers import (
    dit_config_from_diffusers,
    diffusers_to_dit,
    dit_to_diffusers,
    is_diffusers_folder,
)
from robuq.models.dit import DiT

diffusers = pytest.importorskip("diffusers")

SIZES = [  # (hidden, heads, depth, patch, input, learn_sigma, classes)
    (48, 2, 2, 2, 8, True, 10),
    (64, 4, 3, 4, 16, False, 7),
    (96, 3, 1, 2, 4, True, 1000),
]


def _random_dit(hidden, heads, depth, patch, size, learn_sigma, classes, **extra) -> DiT:
    torch.manual_seed(hidden + depth)
    model = DiT(
        tiny_config(
            hidden_size=hidden,
            num_heads=heads,
            depth=depth,
            patch_size=patch,
            input_size=size,
            learn_sigma=learn_sigma,
            num_classes=classes,
            in_channels=4,
            **extra,
        )
    )
    with torch.no_grad():  # adaLN-Zero starts at zero: give every weight a random value
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs(model: DiT, batch: int = 3):
    g = torch.Generator().manual_seed(5)
    size = model.config.input_size
    x = torch.randn(batch, model.in_channels, size, size, generator=g)
    t = torch.tensor([0, 417, 999][:batch])
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)  # the null class too
    return x, t, y


@pytest.mark.parametrize("size", SIZES)
def test_reference_checkpoint_to_diffusers_and_back_is_exact(tmp_path, size):
    model = _random_dit(*size)
    torch.save(model.state_dict(), tmp_path / "reference.pt")  # a facebookresearch/DiT-style state_dict
    x, t, y = _inputs(model)
    with torch.no_grad():
        reference = model(x, t, y)
        # heads cannot be read off the weights: pass the config, as for any reference checkpoint
        transformer = dit_to_diffusers(load_dit(tmp_path / "reference.pt", config=model.config)).eval()
        converted = transformer(x, timestep=t, class_labels=y).sample
        back = diffusers_to_dit(transformer).eval()
        torch.testing.assert_close(converted, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x, t, y), reference, rtol=1e-5, atol=1e-5)
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items() if k != "pos_embed")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "num_attention_heads": 4,
            "attention_head_dim": 16,
            "out_channels": 4,
            "num_layers": 3,
            "patch_size": 4,
            "sample_size": 16,
            "norm_eps": 1e-6,
        },
    ],
)
def test_diffusers_folder_to_dit_is_exact(tmp_path, overrides):
    transformer = tiny_diffusers_dit(shared_embedders=True, **overrides)
    transformer.save_pretrained(tmp_path / "transformer")
    assert is_diffusers_folder(tmp_path / "transformer") and not is_diffusers_folder(tmp_path)
    model = load_dit(tmp_path / "transformer").eval()  # the route `robuq qat --teacher FOLDER` takes
    assert model.config.timestep_freq_shift == 1.0 and model.config.mlp_norm_eps == transformer.config.norm_eps
    size = transformer.config.sample_size
    x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([3, 811]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, y), transformer(x, timestep=t, class_labels=y).sample, rtol=1e-5, atol=1e-5
        )
        # and back into diffusers, saved and reloaded: diffusers' own convention is kept
        dit_to_diffusers(model).save_pretrained(tmp_path / "again")
        again = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "again", local_files_only=True)
        torch.testing.assert_close(run_diffusers(again), run_diffusers(transformer), rtol=1e-5, atol=1e-5)


def test_per_block_embedders_have_no_exact_dit_form():
    with pytest.raises(ValueError, match="shares one timestep/class embedder"):
        diffusers_to_dit(tiny_diffusers_dit(shared_embedders=False))


def test_what_diffusers_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="unconditional"):
        dit_to_diffusers(DiT(tiny_config(num_classes=0)))
    with pytest.raises(ValueError, match="mlp_ratio"):
        dit_to_diffusers(DiT(tiny_config(mlp_ratio=2.0)))
    with pytest.raises(ValueError, match="norm_type"):
        dit_config_from_diffusers({"norm_type": "ada_norm", "num_embeds_ada_norm": 10})
