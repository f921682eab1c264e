"""Build modules as shapes only: on the meta device, with PyTorch's initialisers switched off."""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch

_state = threading.local()
_install_lock = threading.Lock()
_installed = False


def _skippable(init: Callable) -> Callable:
    @functools.wraps(init)
    def wrapper(tensor, *args, **kwargs):
        if getattr(_state, "depth", 0):
            return tensor
        return init(tensor, *args, **kwargs)

    return wrapper


def _install() -> None:
    """Wrap every public ``torch.nn.init`` function once: the wrappers skip only inside a skeleton on the
    calling thread, so other threads building real modules meanwhile are initialised as usual."""
    global _installed
    with _install_lock:
        if not _installed:
            for name in [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]:
                setattr(torch.nn.init, name, _skippable(getattr(torch.nn.init, name)))
            _installed = True


@contextlib.contextmanager
def meta_skeleton() -> Iterator[None]:
    """Modules created inside, on this thread, hold meta tensors and run no initialiser.

    Their values come from somewhere else (a file, or nowhere: counting parameters). Skipping the
    initialisers matters beyond time: on meta tensors ``normal_`` and friends go through ``torch._refs``,
    whose first call imports ``torch._dynamo`` — about 150 MB of resident memory for an inference process.
    """
    _install()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with torch.device("meta"):
            yield
    finally:
        _state.depth -= 1
