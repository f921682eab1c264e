"""robuq's own files: safetensors tensors with a JSON document in the header, written atomically."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open
from robuq.core.errors import RobuqError

META_KEY = "robuq"


def _writer_is_gone(tmp: Path, host: str) -> bool:
    """Whether the process that made temporary file ``tmp`` (its host and pid are in the name) has ended."""
    try:
        writer_host, pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[1].split("-")[:2]
        pid = int(pid)
    except ValueError:
        return False
    if writer_host != host:
        return False  # another machine's writer on a shared folder: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files robuq's writers left in ``folder`` when killed mid-write (a checkpoint's
    leftover among them, though the resumed run writes other names); a live writer's file stays. Returns
    what was removed."""
    host = _host()
    stale = [
        t
        for t in Path(folder).iterdir()
        if t.name.startswith(".") and t.name.endswith(".tmp") and _writer_is_gone(t, host)
    ]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _host() -> str:
    return "".join(c for c in os.uname().nodename if c.isalnum()) or "host"


def _new_temporary(path: Path) -> str:
    """An empty file beside ``path``, created with mode 0666 so the process's umask shapes it like any
    ordinary output (mkstemp's 0600 would need a chmod, and reading the umask means changing it). Its name
    carries this host and pid, so that a later writer can tell a dead writer's leftover from a live one's."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.{_host()}-{os.getpid()}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result over ``path`` only once it is complete on disk.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = _new_temporary(path)
    mode = (
        os.stat(tmp).st_mode & 0o777
    )  # 0666 less the umask: what `write` must leave, as some writers replace the file
    try:
        write(tmp)
        os.chmod(tmp, mode)  # safetensors writes a 0600 file of its own and renames it over ours
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """NumPy arrays in an .npz at ``path``, atomically (numpy adds ".npz" to a name without it: a file object
    keeps the temporary name as given)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _npy_header(archive, name: str) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of member ``name`` of an open .npz, read from its header alone."""
    import numpy as np

    with archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def merge_npz(path: str | os.PathLike, parts: list[Path], names: tuple[str, ...]) -> Path:
    """The arrays ``names`` of several .npz files concatenated along their first axis into one .npz (as
    ``np.savez`` writes it), atomically, holding one part's array in memory at a time: rank 0 merges 50,000
    samples at 256 px (10 GB) without a second copy of them."""
    import zipfile

    import numpy as np

    headers = {}
    for part in parts:
        with zipfile.ZipFile(part) as archive:
            for name in names:
                headers.setdefault(name, []).append(_npy_header(archive, name))

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as out:
            for name in names:
                shapes = [shape for shape, _ in headers[name]]
                dtype = headers[name][0][1]
                full = (sum(shape[0] for shape in shapes), *shapes[0][1:])
                if any(shape[1:] != full[1:] for shape in shapes) or any(d != dtype for _, d in headers[name]):
                    raise RobuqError(f"the parts' {name} arrays differ in shape or type; they cannot be joined")
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": full}
                with out.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, header)
                    for part in parts:
                        with np.load(part) as data:
                            member.write(np.ascontiguousarray(data[name]).tobytes())

    return atomic_write(path, write)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
    """Write tensors (made contiguous, on the CPU) and a JSON-serialisable ``meta`` dict, atomically."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta or {}, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=header))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON document robuq stored in a safetensors header ({} for a foreign safetensors file)."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return json.loads(header[META_KEY]) if META_KEY in header else {}


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (read straight onto ``device``) and the robuq JSON document of a safetensors file."""
    try:
        return load_file(str(path), device=str(device)), read_meta(path)
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise RobuqError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt") from exc
