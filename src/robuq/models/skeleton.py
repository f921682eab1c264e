"""Build modules as shapes only: on the meta device, with their initialisers skipped."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

# Everything a module's reset_parameters may call to fill a tensor: torch.nn.init's functions (each
# dispatches through __torch_function__) and the in-place random and fill methods they use.
_INITIALISERS = frozenset(
    getattr(torch.nn.init, n) for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")
)
_FILL_METHODS = frozenset(
    {
        "uniform_",
        "normal_",
        "zero_",
        "fill_",
        "erfinv_",
        "exponential_",
        "random_",
        "bernoulli_",
        "log_normal_",
        "cauchy_",
        "geometric_",
    }
)


class _SkipInitialisers(TorchFunctionMode):
    """Returns meta tensors unchanged instead of initialising them (other calls pass through)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if (
            isinstance(target, torch.Tensor)
            and target.is_meta
            and (func in _INITIALISERS or getattr(func, "__name__", None) in _FILL_METHODS)
        ):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_skeleton() -> Iterator[None]:
    """Modules created inside, on this thread, hold meta tensors and run no initialiser.

    Their values come from somewhere else (a file, or nowhere: counting parameters). Skipping the
    initialisers matters beyond time: on meta tensors ``normal_`` and friends go through ``torch._refs``,
    whose first call imports ``torch._dynamo`` — about 150 MB of resident memory for an inference process.
    Torch-function modes are per thread and leave ``torch.nn.init`` itself untouched, so other threads,
    and this one after the block, initialise as usual.
    """
    with _SkipInitialisers(), torch.device("meta"):
        yield
