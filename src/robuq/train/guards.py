"""Finding where a training step stopped being finite, so the error names a module, not just a step."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def _nonfinite(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not torch.isfinite(value).all().item()
    if isinstance(value, (tuple, list)):
        return any(_nonfinite(v) for v in value)
    return False


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, run: Callable[[], object]) -> str | None:
    """Re-run a forward pass and return the first module, in execution order, whose output is not finite.

    Leaf-most modules are reported: a block whose submodule produced the NaN is not blamed itself.
    """
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, out, name=name):
            if not found and _nonfinite(out):
                found.append(name)

        hooks.append(module.register_forward_hook(hook))
    try:
        run()
    except Exception:  # the diagnosis must never hide the original error
        pass
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def first_nonfinite_grad(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None
