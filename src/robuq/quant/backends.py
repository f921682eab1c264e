"""Faster implementations of the primitives' inference maths, registered by whoever provides them.

The primitives define what is computed, in PyTorch; a back-end (robuq's C kernels, its Triton kernels,
or a user's own) computes the same numbers faster for the inputs it accepts. Back-ends register
themselves here, so this layer never imports them: ``robuq.kernels`` registers robuq's own when it is
imported (``import robuq`` does that).

``integer_linear`` is the exported model's linear (``robuq.deploy.integer_linear``, which registers its
paths): there ``accepts(layer)`` is asked when a layer is built, loaded or moved, not on every call, and
``run(layer)`` builds the path the layer then calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from robuq.core.errors import RobuqError

OPS = ("hadamard", "attention", "integer_linear")


@dataclass(frozen=True)
class Backend:
    """``run`` computes ``op`` for inputs ``accepts`` says yes to (checked before every call)."""

    name: str
    accepts: Callable[..., bool]
    run: Callable[..., torch.Tensor]


_registry: dict[str, list[Backend]] = {op: [] for op in OPS}


def register_backend(op: str, backend: Backend) -> None:
    """Add ``backend`` for ``op`` after those already there (the first that accepts an input wins);
    registering a name again replaces the earlier entry in place."""
    if op not in _registry:
        raise RobuqError(f"unknown operation {op!r}; back-ends exist for {', '.join(OPS)}")
    entries = _registry[op]
    for i, existing in enumerate(entries):
        if existing.name == backend.name:
            entries[i] = backend
            return
    entries.append(backend)


def backends(op: str) -> tuple[Backend, ...]:
    """The back-ends registered for ``op``, in the order they are tried."""
    return tuple(_registry[op])


def backend_for(op: str, *inputs: object) -> Backend | None:
    """The first registered back-end of ``op`` that accepts ``inputs``, or None (PyTorch's path)."""
    return next((b for b in _registry[op] if b.accepts(*inputs)), None)


def wants_grad(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether autograd would want a gradient through these (back-ends have no backward); the tensors
    are not looked at while gradients are off."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
