"""The images of an ADM-style .npz (``arr_0``: uint8 N×H×W×C), read a batch at a time.

50,000 samples at 256² are 9.8 GB; reading them whole to compute features 64 at a time would cap
evaluation at the machine's memory. ``NpzImages`` reads the array's header, then only the rows asked for,
through the zip member (stored or compressed alike), as the ADM evaluator does.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

ARRAY = "arr_0.npy"


class NpzImages:
    """``len()``, ``shape`` and row slices ``images[a:b]`` of an .npz's ``arr_0``, from disk (the first
    ``limit`` images, if given). A ValueError naming the file when it is not such an npz."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise RobuqFileNotFoundError(f"{self.path} does not exist")
        what = f"{self.path} is not an ADM-style sample file (an .npz whose arr_0 is uint8 N×H×W×C)"
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise RobuqError(f"{what}: {exc}") from None
        names = [n.removesuffix(".npy") for n in self._zip.namelist()]
        if ARRAY not in self._zip.namelist():
            self.close()
            raise RobuqError(f"{what}: it holds {', '.join(names) or 'nothing'}, no arr_0")
        try:
            self._member = self._zip.open(ARRAY)
            version = np.lib.format.read_magic(self._member)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(self._member)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            self.close()
            raise RobuqError(f"{what}: its arr_0 cannot be read ({exc})") from None
        if dtype != np.uint8 or len(shape) != 4 or fortran_order:
            self.close()
            raise RobuqError(
                f"{self.path}: arr_0 must be uint8 N×H×W×C in C order, got {dtype} {shape}"
                + (" in Fortran order" if fortran_order else "")
            )
        self._start = self._member.tell()
        self.shape = (shape[0] if limit is None else min(shape[0], limit), *shape[1:])
        self._row = int(np.prod(shape[1:]))
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NpzImages reads contiguous row ranges: images[a:b]")
        start, stop, _ = rows.indices(len(self))
        count = max(0, stop - start)
        self._member.seek(self._start + start * self._row)  # forward from the last read: no re-reading
        data = self._member.read(count * self._row)
        if len(data) != count * self._row:
            raise RobuqError(f"{self.path} is truncated: arr_0 ends before image {start + len(data) // self._row}")
        return np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def close(self) -> None:
        for handle in (getattr(self, "_member", None), getattr(self, "_zip", None)):
            if handle is not None:
                handle.close()

    def __enter__(self) -> "NpzImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_fingerprint(path: str | os.PathLike, edge: int = 1 << 20) -> str:
    """A cheap identity of a large file: its size and the hash of its first and last ``edge`` bytes (a 2 GB
    reference batch is not read whole to name its cached features)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            digest.update(f.read())
    return digest.hexdigest()[:12]
