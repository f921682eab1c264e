"""Training on an image folder streamed from disk: DataLoader workers, random flips chosen per sample and
epoch by the loop's seed (exact on resume), corrupt files named by path. Real parts: a folder of RGB images
written here, the real loop, a tiny DiT."""

from __future__ import annotations

import pytest
import torch

from robuq.core.distributed import DistInfo
from robuq.data import CorruptImageError, StreamingImageFolder
from robuq.diffusion.gaussian import create_diffusion
from robuq.train.state import list_checkpoints
from robuq.core.files import load_tensors
from robuq.train.trainer import StepBatches, TrainConfig, diffusion_objective, train

from conftest import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "train")


def folder_config(out_dir, folder, **overrides) -> TrainConfig:
    base = dict(
        data=str(folder),
        model="DiT-T/4",
        input_size=16,
        steps=4,
        global_batch_size=6,
        warmup_steps=1,
        log_every=1,
        ckpt_every=2,
        out_dir=str(out_dir),
        device="cpu",
        num_workers=0,
    )
    return TrainConfig(**{**base, **overrides})


def test_step_batches_choose_mirrors_per_sample_and_epoch():
    plain = StepBatches(10, 5, seed=4, info=DistInfo())
    mirrored = StepBatches(10, 5, seed=4, info=DistInfo(), mirrors=True)
    epochs = [torch.cat([mirrored.indices(2 * e), mirrored.indices(2 * e + 1)]) for e in range(4)]
    for e, drawn in enumerate(epochs):
        # The same order of samples as without flips; each sample once per epoch, as itself or as its mirror.
        assert torch.equal(drawn % 10, torch.cat([plain.indices(2 * e), plain.indices(2 * e + 1)]))
    flips = [set((d[d >= 10] - 10).tolist()) for d in epochs]
    assert all(0 < len(f) < 10 for f in flips) and len({frozenset(f) for f in flips}) > 1  # redrawn each epoch
    again = StepBatches(10, 5, seed=4, info=DistInfo(), mirrors=True)
    assert torch.equal(again.indices(5), epochs[2][5:])  # a pure function of (seed, step): what resume relies on


def seen_samples(config: TrainConfig, dataset) -> list[torch.Tensor]:
    """The batches the loop fed the model, recorded by an objective that is otherwise DiT's own loss."""
    loss = diffusion_objective(create_diffusion(learn_sigma=True))
    batches = []

    def recording(model, x, y, generator):
        batches.append(x.detach().clone())
        return loss(model, x, y, generator)

    train(config, dataset=dataset, objective=recording, progress=False)
    return batches


def which_samples(batch: torch.Tensor, dataset) -> list[int]:
    """Index (mirrors from len(dataset) on) of each sample of ``batch``."""
    candidates = torch.stack([dataset[j][0] for j in range(2 * len(dataset))])
    return [int(torch.nonzero((candidates == x).flatten(1).all(1))[0]) for x in batch]


def assert_mirrors_redrawn_each_epoch(seen: list[list[int]], n: int) -> None:
    """Two epochs of two steps: every sample once per epoch, some as its mirror, not the same ones twice."""
    epochs = [seen[0] + seen[1], seen[2] + seen[3]]
    assert all(sorted(i % n for i in e) == list(range(n)) for e in epochs)
    mirrored = [{i % n for i in e if i >= n} for e in epochs]
    assert all(0 < len(m) < n for m in mirrored) and mirrored[0] != mirrored[1]


def test_the_loop_flips_folder_images_per_sample_and_epoch(tmp_path, folder):
    dataset = StreamingImageFolder(folder, 16)
    seen = [which_samples(b, dataset) for b in seen_samples(folder_config(tmp_path / "a", folder), dataset)]
    assert_mirrors_redrawn_each_epoch(seen, 12)
    unflipped = [
        which_samples(b, dataset) for b in seen_samples(folder_config(tmp_path / "b", folder, flip=False), dataset)
    ]
    assert [i % 12 for b in unflipped for i in b] == [i % 12 for b in seen for i in b] and max(map(max, unflipped)) < 12


def test_folder_training_with_workers_resumes_exactly(tmp_path, folder):
    straight = train(folder_config(tmp_path / "a", folder, num_workers=2), progress=False)
    train(folder_config(tmp_path / "b", folder), until=2, progress=False)
    split = train(folder_config(tmp_path / "b", folder, num_workers=2), resume=True, progress=False)
    (_, a), (_, b) = (list_checkpoints(d)[-1] for d in (straight, split))
    a, b = load_tensors(a)[0], load_tensors(b)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_image_stops_training_with_its_path(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    (root / "n002_bar" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(CorruptImageError, match="broken.png"):
        train(folder_config(tmp_path / "run", root, num_workers=1, steps=1, global_batch_size=7), progress=False)
