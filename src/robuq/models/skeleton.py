"""Build modules as shapes only: on the meta device, with PyTorch's initialisers switched off."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def meta_skeleton() -> Iterator[None]:
    """Modules created inside hold meta tensors and run no initialiser.

    Their values come from somewhere else (a file, or nowhere: counting parameters). Skipping the
    initialisers matters beyond time: on meta tensors ``normal_`` and friends go through ``torch._refs``,
    whose first call imports ``torch._dynamo`` — about 150 MB of resident memory for an inference process.
    """
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)
