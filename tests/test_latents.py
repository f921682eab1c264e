"""The latent data path with real parts: an RGB class folder made here, a randomly initialised diffusers
AutoencoderKL written by ``save_pretrained`` and read back through robuq's loader, the streaming folder,
the sharded cache (resume, torchrun split) and the dataset reading it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from robuq.data.image_folder import adm_center_crop
from robuq.data import CorruptImageError, StreamingImageFolder
from robuq.data.latents import LatentDataset, read_index, shard_path
from robuq.data.vae import LATENT_SCALE, decode, encode, load_vae
from robuq.data.encode_latents import LatentsConfig, encode_latents

from conftest import CLASSES, make_image_folder, robuq_under_torchrun

diffusers = pytest.importorskip("diffusers")


def make_vae(path, latent_channels: int = 4, blocks: int = 4, **scaling):
    """A small AutoencoderKL of the SD-VAE class (by default 8× downsampling, 4 latent channels, the SD
    scaling factor), saved locally; ``blocks`` sets the downsampling (2^(blocks-1)), ``scaling`` the
    config's scaling_factor and shift_factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16)[:blocks],
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        **scaling,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet") / "train")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_vae(tmp_path_factory.mktemp("vae") / "sd-vae-tiny")


def test_center_crop_matches_adm_rule():
    image = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8))
    out = adm_center_crop(image, 64)
    assert out.shape == (64, 64, 3)
    # By hand: 200 ≥ 128 → BOX halve to (150, 100); 100 < 128 → BICUBIC to short side 64: (96, 64); crop 16 px each side.
    step = image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(step)[:, 16:80])


def test_streaming_folder_sorted_classes_flips_and_no_upfront_decode(image_dir):
    ds = StreamingImageFolder(image_dir, image_size=32)
    assert ds.class_names == CLASSES and len(ds) == 12 and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert not hasattr(ds, "images")  # only paths are held
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and int(y) == 1 and -1 <= x.min() and x.max() <= 1
    assert ds.has_mirrors and torch.equal(ds[12 + 5][0], x.flip(-1)) and int(ds[12 + 5][1]) == 1
    with pytest.raises(IndexError):
        ds[24]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs[5], x)


def test_corrupt_image_names_its_path(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=1)
    bad = root / CLASSES[1] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    ds = StreamingImageFolder(root, image_size=16)
    index = [p for p, _ in ds.files].index(str(bad))
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        ds[index]


def test_vae_loads_from_folder_and_round_trips_shapes(vae_dir):
    vae = load_vae(vae_dir)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encode(vae, x, torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 4, 4) and torch.isfinite(z).all()
    assert torch.equal(z, encode(vae, x, torch.Generator().manual_seed(0)))
    mode = vae.encode(x).latent_dist.mode()
    assert torch.allclose(encode(vae, x), mode * LATENT_SCALE)
    assert decode(vae, z).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="--vae-config"):
        load_vae(vae_dir / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(vae_dir.parent)


@pytest.mark.parametrize(
    "blocks, scaling", [(3, {"scaling_factor": 0.5, "shift_factor": 0.1}), (4, {"scaling_factor": 0.3})]
)
def test_the_cache_takes_its_geometry_from_the_vae(tmp_path, image_dir, blocks, scaling):
    """A VAE of another downsampling factor or scaling: the index records what the shards hold, the latents
    are shifted and scaled as its config says, decoding undoes exactly that, and training accepts the cache."""
    vae_dir = make_vae(tmp_path / "vae", blocks=blocks, **scaling)
    vae, factor = load_vae(vae_dir), 2 ** (blocks - 1)
    size = 6 * factor  # a multiple of the factor only: 24 for a 4× VAE, which the old 8× assumption refused
    out = encode_latents(
        LatentsConfig(
            images=str(image_dir),
            vae=str(vae_dir),
            out=str(tmp_path / "cache"),
            image_size=size,
            shard_size=6,
            num_workers=0,
            device="cpu",
        ),
        progress=False,
    )
    index = read_index(out)
    scale, shift = scaling["scaling_factor"], scaling.get("shift_factor", 0.0)
    assert (index.downsample, index.latent_shape, index.scale, index.shift) == (factor, (4, 6, 6), scale, shift)
    ds = LatentDataset(out)
    assert ds[0][0].shape == (4, 6, 6) and ds.input_size == 6
    x = StreamingImageFolder(image_dir, size)[0][0][None]
    mode = vae.encode(x).latent_dist.mode()
    assert torch.allclose(encode(vae, x), (mode - shift) * scale)
    z = encode(vae, x)
    assert torch.allclose(decode(vae, z), vae.decode(z / scale + shift).sample.clamp(-1, 1), atol=1e-6)
    from robuq.cli import main

    assert (
        main(
            [
                "train",
                "--latents",
                str(out),
                "--model",
                "DiT-S/2",
                "--input-size",
                "6",
                "--steps",
                "1",
                "--global-batch-size",
                "4",
                "--out-dir",
                str(tmp_path / "run"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )


def ldm_layout(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state_dict in the original LDM layout, the one single-file SD VAEs ship in
    (vae-ft-ema-560000-ema-pruned.safetensors): numbered down/up blocks, up blocks in reverse order, and
    the mid-block attention as 1×1 convolutions."""
    out = {}
    for name, value in state.items():
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", name
        )
        name = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.",
            name,
        )
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        name = name.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        name = name.replace("conv_norm_out", "norm_out")
        if ".attn_1." in name:
            for new, old in (
                ("norm.", "group_norm."),
                ("q.", "to_q."),
                ("k.", "to_k."),
                ("v.", "to_v."),
                ("proj_out.", "to_out.0."),
            ):
                name = name.replace(old, new)
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[name] = value.contiguous()
    return out


def test_vae_loads_from_a_single_file_with_its_config(tmp_path, vae_dir, image_dir):
    from safetensors.torch import save_file

    reference = load_vae(vae_dir)
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.json").write_text((vae_dir / "config.json").read_text())  # the config alone, no weights
    state = reference.state_dict()
    save_file(ldm_layout(state, len(reference.config.block_out_channels)), tmp_path / "vae-ldm.safetensors")
    save_file(state, tmp_path / "vae-diffusers.safetensors")
    for file, given in (("vae-ldm.safetensors", config), ("vae-diffusers.safetensors", config / "config.json")):
        loaded = load_vae(tmp_path / file, given)
        assert not loaded.training and loaded.state_dict().keys() == state.keys()
        assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state), file
    # Through `robuq latents`: the same cache as from the folder.
    common = dict(images=str(image_dir), image_size=32, shard_size=12, num_workers=0, device="cpu")
    one = encode_latents(LatentsConfig(vae=str(vae_dir), out=str(tmp_path / "a"), **common), progress=False)
    two = encode_latents(
        LatentsConfig(
            vae=str(tmp_path / "vae-ldm.safetensors"), vae_config=str(config), out=str(tmp_path / "b"), **common
        ),
        progress=False,
    )
    assert torch.equal(LatentDataset(one)[11][0], LatentDataset(two)[11][0])
    with pytest.raises(ValueError, match="--vae-config"):
        load_vae(tmp_path / "vae-ldm.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no config.json"):
        load_vae(tmp_path / "vae-ldm.safetensors", tmp_path / "empty")


def test_latent_cache_resumes_and_reads_back(tmp_path, image_dir, vae_dir):
    config = LatentsConfig(
        images=str(image_dir),
        vae=str(vae_dir),
        out=str(tmp_path / "cache"),
        image_size=32,
        shard_size=5,
        batch_size=4,
        num_workers=0,
        flip=True,
        device="cpu",
    )
    out = encode_latents(config, progress=False)
    index = read_index(out)
    assert index.num_shards == 3 and index.latent_shape == (4, 4, 4) and index.class_names == CLASSES
    first = {k: shard_path(out, k).read_bytes() for k in range(3)}
    # A killed run: shard 1 never written. The rerun writes only it, and identically.
    shard_path(out, 1).unlink()
    stamp = shard_path(out, 0).stat().st_mtime_ns
    encode_latents(config, progress=False)
    assert shard_path(out, 0).stat().st_mtime_ns == stamp
    assert {k: shard_path(out, k).read_bytes() for k in range(3)} == first

    ds = LatentDataset(out)
    assert len(ds) == 12 and ds.has_mirrors and ds.in_channels == 4 and ds.input_size == 4 and ds.num_classes == 3
    vae = load_vae(vae_dir)
    images = StreamingImageFolder(image_dir, 32)
    x, y = ds[7]
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + 2 * 1)  # shard 1's stream; image 7 is its 3rd
    z = encode(vae, torch.stack([images[i][0] for i in range(5, 9)]), g)
    assert int(y) == 1 and torch.allclose(x, z[2], atol=1e-5)
    xf, yf = ds[12 + 7]
    assert int(yf) == 1 and not torch.allclose(xf, x)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    assert sum(len(b[1]) for b in loader) == 12

    with pytest.raises(ValueError, match="shard_size"):
        encode_latents(LatentsConfig(**{**config.__dict__, "shard_size": 4}), progress=False)
    shard_path(out, 2).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(out)


@pytest.mark.slow
def test_latent_cache_under_torchrun_equals_one_process(tmp_path, image_dir, vae_dir):
    args = [
        "latents",
        str(image_dir),
        "--vae",
        str(vae_dir),
        "--image-size",
        "32",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "robuq.cli", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            *robuq_under_torchrun(2),
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    assert index == json.loads((tmp_path / "two" / "index.json").read_text()) and index["num_shards"] == 4
    a, b = LatentDataset(tmp_path / "one"), LatentDataset(tmp_path / "two")
    assert torch.equal(a.labels, b.labels) and all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_sampling_through_a_vae_of_other_latent_channels_is_refused(tmp_path, tiny_dit, vae_dir, capsys):
    from robuq.cli import main
    from robuq.core.files import save_tensors

    ckpt = save_tensors(tmp_path / "m.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()})
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(ckpt),
                "--vae",
                str(vae_dir),
                "--out",
                str(out),
                "--per-class",
                "1",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "makes 4-channel latents but the model denoises 1 channels" in err and "Traceback" not in err
    assert not out.exists()


def test_a_broken_vae_folder_or_cache_shard_is_one_line_naming_the_file(tmp_path, image_dir, vae_dir, capsys):
    from robuq.cli import main

    broken = tmp_path / "vae"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert (
        main(
            [
                "latents",
                str(image_dir),
                "--vae",
                str(broken),
                "--out",
                str(tmp_path / "none"),
                "--image-size",
                "32",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"--vae {broken} cannot be loaded as an AutoencoderKL" in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()

    cache = encode_latents(
        LatentsConfig(
            images=str(image_dir),
            vae=str(vae_dir),
            out=str(tmp_path / "cache"),
            image_size=32,
            shard_size=5,
            num_workers=0,
            device="cpu",
        ),
        progress=False,
    )
    train = [
        "train",
        "--latents",
        str(cache),
        "--model",
        "DiT-S/2",
        "--input-size",
        "4",
        "--steps",
        "1",
        "--global-batch-size",
        "4",
        "--out-dir",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    shard = shard_path(cache, 1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "shard-00001.safetensors is unreadable" in err and "encode it again" in err and "Traceback" not in err
    from robuq.core.files import save_tensors

    save_tensors(shard, {"latents": torch.zeros(5, 4, 8, 8), "labels": torch.zeros(5, dtype=torch.long)})
    assert main(train) == 2
    assert "holds latents of shape (5, 4, 8, 8), its index promises (5, 4, 4, 4)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
