"""Every file robuq reads, damaged at random (truncated, bytes changed in the header or anywhere): each
load either gives robuq's one-line error (what the CLI prints without a traceback) or loads; never another
exception, never a hang, and a damaged header never loads as other weights."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from robuq.cli.main import _raised_on_purpose
from robuq.core.files import save_tensors
from robuq.data.latents import LatentIndex, read_index, write_index
from robuq.deploy.export import export_model, load_exported
from robuq.io.quantized import load_quantized, save_quantized
from robuq.models.checkpoint import load_dit
from robuq.models.dit import DiT
from robuq.precision import BitPlan, QuantConfig, preset, quantize_

from conftest import perturbed, tiny_config

CASES = 60  # per kind of file: 480 in all, a few seconds each kind
TIMEOUT_S = 20


def _state(loaded) -> dict:
    """What a load gave, comparable across loads: a model's tensors, or a plan's/policy's/index's fields."""
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    if isinstance(loaded, torch.nn.Module):
        return {k: v.clone() for k, v in loaded.state_dict().items()}
    return {"value": loaded}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    model = perturbed(DiT(tiny_config()))
    policy = preset("robuq", 3)
    quantized = quantize_(DiT(tiny_config()), policy)
    torch.save(model.state_dict(), folder / "ckpt.pt")
    write_index(folder / "cache", LatentIndex(10, 5, (4, 4, 4), 0.18215, False, 32, ("a", "b"), "vae"))
    return {  # kind → (file, loader, how many leading bytes are header)
        "checkpoint (safetensors)": (
            save_tensors(folder / "ckpt.safetensors", model.state_dict(), {"model_config": model.config.to_dict()}),
            load_dit,
            "safetensors",
        ),
        "checkpoint (PyTorch)": (folder / "ckpt.pt", load_dit, "whole"),
        "quantized model": (save_quantized(quantized, folder / "q.safetensors", policy), load_quantized, "safetensors"),
        "export (2-bit)": (
            export_model(quantized, policy, folder / "e2.safetensors", "ternary-2bit"),
            load_exported,
            "safetensors",
        ),
        "export (trits)": (
            export_model(quantized, policy, folder / "e3.safetensors", "ternary-trits"),
            load_exported,
            "safetensors",
        ),
        "bit plan": (BitPlan({"blocks.0.mlp.fc2": 2}, budget=2.0).save(folder / "plan.json"), BitPlan.load, "whole"),
        "policy": (policy.save(folder / "policy.json"), QuantConfig.load, "whole"),
        "latent index": (folder / "cache" / "index.json", lambda p: read_index(Path(p).parent), "whole"),
    }


def _mutations(data: bytes, header: int, rng: np.random.Generator):
    """(damaged bytes, whether only the header changed) for CASES mutations of ``data``."""
    for _ in range(CASES):
        buf, r = bytearray(data), rng.random()
        if r < 0.3:
            yield bytes(buf[: rng.integers(0, len(buf))]), False
            continue
        region = header if r < 0.75 else len(buf)
        for _ in range(rng.integers(1, 5)):
            buf[rng.integers(0, region)] = rng.integers(0, 256)
        yield bytes(buf), region == header


def _timeout(*_):
    raise TimeoutError(f"a load took over {TIMEOUT_S} s")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "checkpoint (safetensors)",
        "checkpoint (PyTorch)",
        "quantized model",
        "export (2-bit)",
        "export (trits)",
        "bit plan",
        "policy",
        "latent index",
    ],
)
def test_damaged_files_give_robuqs_error_or_load_unchanged(valid_files, tmp_path, kind):
    path, load, header_kind = valid_files[kind]
    data = Path(path).read_bytes()
    header = 8 + int.from_bytes(data[:8], "little") if header_kind == "safetensors" else len(data)
    original = _state(load(path))
    target = tmp_path / "cache" / "index.json" if kind == "latent index" else tmp_path / Path(path).name
    target.parent.mkdir(exist_ok=True)
    rng = np.random.default_rng(sorted(valid_files).index(kind))
    wrong, outcomes = [], {"refused": 0, "loaded": 0}
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        for damaged, header_only in _mutations(data, header, rng):
            target.write_bytes(damaged)
            signal.alarm(TIMEOUT_S)
            try:
                loaded = load(target)
            except Exception as exc:  # noqa: BLE001 — the point: which exceptions a reader lets out
                signal.alarm(0)
                outcomes["refused"] += 1
                if not _raised_on_purpose(exc):
                    wrong.append(f"{type(exc).__name__}: {str(exc)[:120]}")
                continue
            signal.alarm(0)
            outcomes["loaded"] += 1
            if (
                header_only
                and kind not in ("bit plan", "policy", "latent index")
                and not _same(_state(loaded), original)
            ):
                wrong.append("a damaged header loaded as other weights")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not wrong, f"{kind}: {len(wrong)} of {CASES} damaged files gave no robuq error: {wrong[:5]}"
    assert outcomes["refused"] > CASES // 3  # the mutations do damage: most are refused
