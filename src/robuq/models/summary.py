"""The table of DiT configurations users read before choosing one."""

from __future__ import annotations

from robuq.models.dit import DIT_MODELS, DiT, count_parameters, dit_config, forward_macs
from robuq.models.skeleton import meta_skeleton


def model_table(
    input_size: int = 32, num_classes: int = 1000, in_channels: int = 4, learn_sigma: bool = True
) -> list[dict]:
    """One row per registry model: shape, parameter count (pos_embed included) and forward GFLOPs."""
    rows = []
    for name in DIT_MODELS:
        config = dit_config(name, input_size, num_classes, learn_sigma, in_channels)
        if input_size % config.patch_size:
            continue
        with meta_skeleton():  # count parameters without allocating 675M floats
            params = count_parameters(DiT(config))
        rows.append(
            {
                "name": name,
                "depth": config.depth,
                "hidden_size": config.hidden_size,
                "num_heads": config.num_heads,
                "patch_size": config.patch_size,
                "tokens": (input_size // config.patch_size) ** 2,
                "params": params,
                "gflops": forward_macs(config) / 1e9,
            }
        )
    return rows
