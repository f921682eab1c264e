"""Load DiT weights from files robuq did not write, without trusting them.

Accepted: robuq's safetensors files; facebookresearch/DiT checkpoints (a plain state_dict, or the
training dict with "model"/"ema"/"opt"/"args"); any safetensors state_dict with the reference keys.
Pickles are read with ``weights_only=True``: tensors and plain containers only, never arbitrary code.
"""

from __future__ import annotations

from robuq.core.errors import RobuqError

import argparse
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from robuq.core.files import load_tensors
from robuq.models.convert_diffusers import is_diffusers_folder, load_diffusers_dit
from robuq.models.skeleton import meta_skeleton
from robuq.models.dit import DIT_SIZES, DiT, DiTConfig

# Attention heads cannot be read off the weights; these are the registry's choices per width.
_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# What torch's weights-only unpickler raises on bytes that are not a pickle it accepts (garbage hits any
# of these, depending on the bytes); anything else — MemoryError, an interrupt — is not about the file.
_NOT_A_PICKLE = (
    RuntimeError,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    struct.error,
    OverflowError,
)


class CheckpointError(RobuqError):
    """A file that is not a usable DiT checkpoint; the message says why and what to do."""


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _check_zip_checksums(path: Path) -> None:
    """torch.load reads a zip checkpoint without checking its members' CRCs: a damaged byte would load as
    another weight. One pass over the file checks them all."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({exc}); download or copy it again") from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {damaged} fails its checksum; download or copy it again")


def _is_pickle(path: Path) -> bool:
    """Starts with a pickle's PROTO opcode (protocol 2 and later, what torch.save's legacy format writes)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _unpickler_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file unsafely."""
    text = str(exc).split("WeightsUnpickler error:")[-1]
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    kept = [
        " ".join(part.split()) for part in text.split("\n\n") if part.strip() and not part.strip().startswith(advice)
    ]
    return (
        kept[0].split(". ", 1)[0].rstrip(".") if kept else type(exc).__name__
    )  # its first sentence: the rest is advice


def read_state_dict(path: str | os.PathLike, prefer: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights in ``path`` and robuq's metadata ({} for foreign files).

    From a training checkpoint, ``prefer`` ("ema" or "model") picks which weights to use.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    if _is_safetensors(path):
        try:
            tensors, meta = load_tensors(path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        if meta.get("kind") == "training-state":
            prefix = f"{prefer}."
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        return _strip_wrappers(tensors), meta
    if _is_zip(path):
        _check_zip_checksums(path)
    try:
        # The reference trainer stores its argparse.Namespace beside the weights; that one class is
        # allowed, every other non-tensor object is refused by the weights-only unpickler.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle protocols mean nothing to a user
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:  # OSError: torch's zip reader on a corrupt archive
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({exc}); download or copy it again") from exc
    except _NOT_A_PICKLE as exc:  # long texts from torch
        if _is_zip(path) and "zip archive" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt (its zip archive is incomplete); download or copy it again"
            ) from exc
        if not (_is_zip(path) or _is_pickle(path)):
            with open(path, "rb") as f:
                head = f.read(16)
            raise CheckpointError(
                f"{path} is not a model file: neither safetensors nor a PyTorch checkpoint (it starts with {head!r})"
            ) from exc
        raise CheckpointError(
            f"{path} cannot be loaded safely: it holds more than tensors and plain containers "
            f"({_unpickler_reason(exc)}). robuq never runs code from a checkpoint; save the weights alone, "
            "e.g. as safetensors or torch.save(model.state_dict())"
        ) from exc
    if isinstance(obj, dict) and prefer in obj and isinstance(obj[prefer], dict):
        obj = obj[prefer]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (expected a dict of tensors, or one under 'ema'/'model')")
    return _strip_wrappers(obj), {}


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def infer_config(state: dict[str, torch.Tensor]) -> DiTConfig:
    """Read a DiTConfig off the shapes of a reference-layout state_dict."""
    required = ("pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"not a DiT state_dict: missing {', '.join(missing)}")
    num_tokens, hidden = state["pos_embed"].shape[-2:]
    _, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    out_features = state["final_layer.linear.weight"].shape[0]
    out_channels = out_features // (patch * patch)
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    table = state.get("y_embedder.embedding_table.weight")
    grid = int(round(num_tokens**0.5))
    # Heads are invisible in the weights: use the registry's choice, else the usual head size of 64.
    heads = _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    if hidden % heads:
        raise CheckpointError(f"cannot guess the attention heads of hidden size {hidden}; pass a DiTConfig")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    return DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=fc1.shape[0] / hidden if fc1 is not None else 4.0,
        num_classes=0 if table is None else table.shape[0] - 1,
        class_dropout_prob=0.0 if table is None else 0.1,
        learn_sigma=out_channels == 2 * in_channels,
    )


def check_compatible(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:6]) + (f" … ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit this model configuration:\n  " + "\n  ".join(problems) + "\n"
            "Check the model name, --input-size, the number of classes and learn_sigma, or let robuq infer "
            "them by leaving the model name out."
        )


def load_dit(
    path: str | os.PathLike, config: DiTConfig | None = None, prefer: str = "ema", map_location: str = "cpu"
) -> DiT:
    """A DiT with the weights of ``path``; the config comes from robuq's metadata or the tensor shapes
    unless given. A diffusers ``DiTTransformer2DModel.save_pretrained`` folder is converted exactly
    (robuq.models.convert_diffusers)."""
    if is_diffusers_folder(path):
        if config is not None:
            raise CheckpointError(f"{path} is a diffusers model folder: its config.json gives the configuration")
        return load_diffusers_dit(path).to(map_location)
    state, meta = read_state_dict(path, prefer=prefer)
    if "quant_config" in meta:
        raise CheckpointError(f"{path} is a quantized model; load it with robuq.load_quantized")
    if config is None:
        config = DiTConfig.from_dict(meta["model_config"]) if "model_config" in meta else infer_config(state)
    # Built as shapes only and given the file's tensors: no random initialisation thrown away (seconds per rank
    # at XL/2), and no second copy of the weights.
    with meta_skeleton():
        model = DiT(config)
    check_compatible(model, state, str(path))
    skeleton = model.state_dict()  # the file's tensors in the model's own dtypes (a half-precision file too)
    model.load_state_dict({k: v.to(skeleton[k].dtype) if k in skeleton else v for k, v in state.items()}, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a tensor the file does not hold
        model = DiT(config)
        model.load_state_dict(state)
    return model.to(map_location)
