"""Fashion-MNIST with captions: the data of robuq's text-to-image miniature.

Every training image gets one caption, drawn (fixed per image) from templates over its class's names and
synonyms and a word for its brightness ("a photo of a sneaker", "a dark trainer shoe, on a plain
background"). The evaluation prompts use templates no training caption used, built from the same words,
so that prompt adherence measures the model and not an unseen word's random embedding.

Words map to ids through a fixed vocabulary (id 0 pads); a caption is at most ``MAX_TOKENS`` words.
"""

from __future__ import annotations

import itertools
import os
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from robuq.core.errors import RobuqError
from robuq.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist

# Per class: the names a caption may use (the first is the canonical one the prompts use).
CLASS_WORDS = (
    ("t-shirt", "tee", "top"),
    ("trouser", "pair of trousers", "pair of pants"),
    ("pullover", "sweater", "jumper"),
    ("dress", "gown", "frock"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "summer sandal", "open shoe"),
    ("shirt", "blouse", "button shirt"),
    ("sneaker", "trainer shoe", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)
# Mean-intensity bands of the image (0..255): how dark or light the garment is.
# Bands at about the thirds of the training images' means, so that each word names a third of them.
BRIGHTNESS = ((0, 140, "dark"), (140, 180, "grey"), (180, 256, "light"))

TRAIN_TEMPLATES = (
    "{thing}",
    "a {thing}",
    "a photo of a {thing}",
    "a {shade} {thing}",
    "a photo of a {shade} {thing}",
    "a {thing} on a plain background",
    "a {shade} {thing} on a plain background",
    "{thing} , {shade}",
)
# Held out from training: new orders of the training words, for prompt-adherence evaluation.
HELD_OUT_TEMPLATES = (
    "a {shade} photo of a {thing}",
    "photo of a {thing} , {shade}",
    "a plain background with a {thing}",
)
MAX_TOKENS = 12
PAD = "<pad>"


def _words() -> list[str]:
    text = " ".join(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES) + " " + " ".join(" ".join(w) for w in CLASS_WORDS)
    words = {w for w in text.split() if not w.startswith("{")}
    words |= {shade for *_, shade in BRIGHTNESS}
    return [PAD, *sorted(words)]


VOCABULARY = tuple(_words())
_IDS = {w: i for i, w in enumerate(VOCABULARY)}


def tokenize(captions: list[str] | str, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """Word ids (long, N × ``max_tokens``, padded with 0) of captions written in the vocabulary's words."""
    if isinstance(captions, str):
        captions = [captions]
    ids = torch.zeros(len(captions), max_tokens, dtype=torch.long)
    for row, caption in enumerate(captions):
        words = caption.lower().split()
        unknown = [w for w in words if w not in _IDS]
        if unknown:
            raise RobuqError(
                f"caption {caption!r} uses words outside the captions' vocabulary ({', '.join(unknown)}); "
                f"the vocabulary is {', '.join(VOCABULARY[1:])}"
            )
        if len(words) > max_tokens:
            raise RobuqError(f"caption {caption!r} has {len(words)} words; at most {max_tokens} fit")
        ids[row, : len(words)] = torch.tensor([_IDS[w] for w in words])
    return ids


def shade_of(image: np.ndarray) -> str:
    """The brightness word of a uint8 image, from the mean intensity of its garment (pixels above 10)."""
    pixels = image[image > 10]
    mean = float(pixels.mean()) if pixels.size else 0.0
    return next(word for low, high, word in BRIGHTNESS if low <= mean < high)


def fill(template: str, label: int, shade: str, synonym: int = 0) -> str:
    names = CLASS_WORDS[label]
    return template.format(thing=names[synonym % len(names)], shade=shade)


def caption_for(index: int, label: int, image: np.ndarray, seed: int = 0) -> str:
    """The training caption of image ``index`` (fixed per image and seed): a training template, a synonym."""
    draw = zlib.crc32(f"{seed}:{index}".encode())
    template = TRAIN_TEMPLATES[draw % len(TRAIN_TEMPLATES)]
    return fill(template, label, shade_of(image), draw // len(TRAIN_TEMPLATES))


def prompt_set(held_out: bool = True) -> tuple[list[str], list[int]]:
    """Every evaluation prompt (held-out templates × classes × names × shades) and its class."""
    templates = HELD_OUT_TEMPLATES if held_out else TRAIN_TEMPLATES
    prompts, labels = [], []
    for template, label, shade in itertools.product(templates, range(len(CLASS_WORDS)), [b[2] for b in BRIGHTNESS]):
        for synonym in range(len(CLASS_WORDS[label]) if "{thing}" in template else 1):
            prompts.append(fill(template, label, shade, synonym))
            labels.append(label)
    return prompts, labels


def pixel_latents(images: np.ndarray) -> torch.Tensor:
    """uint8 N × 28 × 28 grey images as the miniature's latents: [-1, 1], space-to-depth 2 × 2 → N × 4 × 14 × 14.

    A lossless, parameter-free stand-in for a VAE: the transformers see a 4-channel latent at 1/2 the
    resolution, as they see a VAE's latents, and ``latents_to_pixels`` inverts it exactly."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)[:, None]
    return torch.nn.functional.pixel_unshuffle(x, 2)


def latents_to_pixels(latents: torch.Tensor) -> np.ndarray:
    """The inverse of ``pixel_latents``: uint8 N × 28 × 28."""
    x = torch.nn.functional.pixel_shuffle(latents.float(), 2)[:, 0]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


class CaptionedFashionMNIST(Dataset):
    """(latent 4 × 14 × 14, caption ids) per Fashion-MNIST image, with the image's class in ``labels``."""

    num_classes = len(CLASS_NAMES)
    text_conditioning = True  # the second item is the caption, which the training loop passes on

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None, seed: int = 0):
        images, labels = load_fashion_mnist(split, data_dir)
        self.labels = labels.astype(np.int64)
        self.captions = [caption_for(i, int(y), img, seed) for i, (img, y) in enumerate(zip(images, self.labels))]
        self.latents = pixel_latents(images)
        self.tokens = tokenize(self.captions)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[index], self.tokens[index]
