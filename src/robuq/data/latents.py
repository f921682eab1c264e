"""A latent cache on disk: VAE latents of an image folder in safetensors shards, and a JSON index.

Layout of a cache folder::

    index.json                 what the cache holds (see ``LatentIndex``); written first, checked on resume
    shard-00000.safetensors    "latents" (n, C, h, w) float32, already shifted and scaled as the VAE's config says,
                               "labels" (n,) int64, and "latents_flip" when the mirrored copy was encoded
    ...

Shard k holds images [k·shard_size, (k+1)·shard_size) of the folder's sorted listing. A shard file
exists only once complete (written atomically), so a killed encoding run resumes by skipping the shards
already there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from robuq.core.files import atomic_write_text
from robuq.core.options import check_field_types, check_known_fields
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

FORMAT = "robuq-latent-cache"
INDEX = "index.json"


@dataclass(frozen=True)
class LatentIndex:
    """The cache's description; two runs may share a cache folder only if they agree on all of it."""

    num_images: int
    shard_size: int
    latent_shape: tuple[int, int, int]
    scale: float
    flip: bool
    image_size: int
    class_names: tuple[str, ...]
    vae: str
    downsample: int = 8  # the VAE's; caches written before these two were recorded came from the SD VAE
    shift: float = 0.0
    format: str = FORMAT
    version: int = 1

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.num_images, (shard + 1) * self.shard_size))

    def to_dict(self) -> dict:
        return {**asdict(self), "num_shards": self.num_shards}

    def __post_init__(self) -> None:
        check_field_types(self, "latent cache index")
        sizes = (self.num_images, self.shard_size, self.image_size, self.downsample, *self.latent_shape)
        if not all(isinstance(name, str) for name in self.class_names):
            raise RobuqError(f"latent cache index: class_names must be strings, got {self.class_names!r}")
        if (
            len(self.latent_shape) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in self.latent_shape)
            or min(sizes) < 1
        ):
            raise RobuqError(
                f"latent cache index: sizes must be positive integers and latent_shape (C, h, w), got "
                f"{self.num_images} images, shards of {self.shard_size}, latent_shape {self.latent_shape}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "LatentIndex":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RobuqError(
                f"not a robuq latent cache index (format {data.get('format') if isinstance(data, dict) else data!r})"
            )
        data = check_known_fields({k: v for k, v in data.items() if k != "num_shards"}, cls, "latent cache index")
        for key in ("latent_shape", "class_names"):
            if not isinstance(data.get(key), list):
                raise RobuqError(f"latent cache index: {key} must be a list, not {data.get(key)!r}")
        return cls(**{**data, "latent_shape": tuple(data["latent_shape"]), "class_names": tuple(data["class_names"])})


def shard_path(cache: str | os.PathLike, shard: int) -> Path:
    return Path(cache) / f"shard-{shard:05d}.safetensors"


def read_index(cache: str | os.PathLike) -> LatentIndex:
    """The index of a cache folder; a clear error when the folder is not (yet) a cache."""
    path = Path(cache) / INDEX
    if not path.is_file():
        raise RobuqFileNotFoundError(f"{cache} is not a latent cache (no {INDEX}); make one with `robuq latents`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobuqError(f"{path} is not a readable latent cache index ({exc}); encode the cache again") from None
    try:
        return LatentIndex.from_dict(data)
    except ValueError as exc:
        raise RobuqError(f"{path}: {exc}") from None


def write_index(cache: str | os.PathLike, index: LatentIndex) -> None:
    """Write the index, or check that the one already there describes the same cache."""
    path = Path(cache) / INDEX
    if path.is_file():
        old = read_index(cache)
        if old != index:
            diffs = [
                f"{k}: cache {v!r} vs now {getattr(index, k)!r}"
                for k, v in asdict(old).items()
                if getattr(index, k) != v
            ]
            raise RobuqError(f"{cache} already holds a different latent cache ({'; '.join(diffs)}); use another folder")
        return
    atomic_write_text(path, json.dumps(index.to_dict(), indent=2) + "\n")


def missing_shards(cache: str | os.PathLike, index: LatentIndex) -> list[int]:
    return [k for k in range(index.num_shards) if not shard_path(cache, k).is_file()]


def _shard_labels(cache: Path, index: LatentIndex, shard: int) -> torch.Tensor:
    """Shard ``shard``'s labels, once its header shows the rows and latent shape the index promises."""
    path = shard_path(cache, shard)
    redo = f"delete {path.name} and run the same `robuq latents` command to encode it again"
    rows = len(index.shard_range(shard))
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            wanted = {"latents", "labels"} | ({"latents_flip"} if index.flip else set())
            if not wanted <= keys:
                raise RobuqError(f"latent cache {cache}: {path.name} lacks {', '.join(sorted(wanted - keys))}; {redo}")
            for key in wanted - {"labels"}:
                shape = tuple(f.get_slice(key).get_shape())
                if shape != (rows, *index.latent_shape):
                    raise RobuqError(
                        f"latent cache {cache}: {path.name} holds {key} of shape {shape}, its index "
                        f"promises {(rows, *index.latent_shape)}; {redo}"
                    )
            labels = f.get_tensor("labels")
    except (SafetensorError, OSError) as exc:
        raise RobuqError(f"latent cache {cache}: {path.name} is unreadable ({exc}); {redo}") from None
    if labels.shape != (rows,):
        raise RobuqError(
            f"latent cache {cache}: {path.name} holds {tuple(labels.shape)} labels for {rows} images; {redo}"
        )
    return labels.long()


class LatentDataset(Dataset):
    """(latent, label) pairs of a finished cache, read from memory-mapped shards one sample at a time.

    When the cache holds the mirrored copies (``has_mirrors``), index ``len(self) + i`` is image i's mirror,
    as in ``StreamingImageFolder``: the training loop picks one of the two per sample and epoch.
    """

    def __init__(self, cache: str | os.PathLike):
        self.cache = Path(cache)
        self.index = read_index(cache)
        missing = missing_shards(cache, self.index)
        if missing:
            raise RobuqError(
                f"latent cache {cache} is incomplete: {len(missing)} of {self.index.num_shards} shards missing "
                f"(first: {shard_path(cache, missing[0]).name}); finish it with the same `robuq latents` command"
            )
        self.has_mirrors = self.index.flip
        self.in_channels, self.input_size = self.index.latent_shape[0], self.index.latent_shape[-1]
        self.num_classes = self.index.num_classes
        self.class_names = self.index.class_names
        self.labels = torch.cat([_shard_labels(self.cache, self.index, k) for k in range(self.index.num_shards)])
        self._handles: dict[int, object] = {}  # opened lazily in each DataLoader worker, never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        n = self.index.num_images
        if not 0 <= i < (2 * n if self.has_mirrors else n):
            raise IndexError(
                f"index {i} out of range for a cache of {n} images" + (" and their mirrors" if self.has_mirrors else "")
            )
        key, j = ("latents_flip", i - n) if i >= n else ("latents", i)
        shard, row = divmod(j, self.index.shard_size)
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard_path(self.cache, shard)), framework="pt")
        x = self._handles[shard].get_slice(key)[row : row + 1][0]
        return x, self.labels[j]
