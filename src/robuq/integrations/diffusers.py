"""robuq as a diffusers quantizer: ``FooTransformer.from_pretrained(path, quantization_config=DiffusersConfig(...))``
quantizes on load, and ``save_pretrained`` of the result reloads quantized, its policy read from config.json.

A thin adapter over ``quantize_``: diffusers builds the model, robuq's family map decides what is quantized.
It joins diffusers' quantizer mappings (as "robuq") only when asked — ``register_diffusers()`` or
constructing a ``DiffusersConfig`` — never as a side effect of ``import robuq``. Pinned to the diffusers
versions it is tested with (``TESTED_DIFFUSERS``): the mapping and the quantizer hooks are internals.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from robuq.precision.plan import as_bits
from robuq.precision.policy import QuantConfig, quantize_
from robuq.precision.presets import preset

TESTED_DIFFUSERS = ("0.42.1",)
METHOD = "robuq"


class _Method(str, Enum):
    ROBUQ = METHOD  # diffusers reads ``quant_method.value``


@dataclass
class DiffusersConfig:
    """diffusers' ``quantization_config`` for robuq: a preset at ``act_bits`` (or a full ``policy`` dict, as
    ``QuantConfig.to_dict`` writes), an optional per-layer ``plan``, and the low-rank branch's rank."""

    preset: str = "robuq"
    act_bits: int = 4
    plan: dict[str, int] | None = None
    lowrank_rank: int = 16
    lowrank_share: float | None = None
    policy: dict[str, Any] | None = None  # the resolved policy; a saved model's config.json carries it
    allow_partial: bool = False
    quant_method: Any = field(default=_Method.ROBUQ)

    def __post_init__(self) -> None:
        self.quant_method = _Method.ROBUQ
        register_diffusers()

    def quant_config(self) -> QuantConfig:
        if self.policy is not None:
            config = QuantConfig.from_dict(self.policy)
        else:
            config = preset(
                self.preset, self.act_bits, lowrank_rank=self.lowrank_rank, lowrank_share=self.lowrank_share
            )
        if self.plan is not None:
            config.plan = as_bits(self.plan)
        return config

    # What diffusers calls on a quantization config.
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        known = {k: v for k, v in config_dict.items() if k in cls.__dataclass_fields__ and k != "quant_method"}
        config = cls(**known)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quant_method"] = METHOD
        return copy.deepcopy(data)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def update(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unused = {}
        for key, value in kwargs.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def __iter__(self):
        yield from self.to_dict().items()


def _check_version(diffusers) -> None:
    if diffusers.__version__ not in TESTED_DIFFUSERS:
        raise RuntimeError(
            f"robuq's diffusers quantizer is tested with diffusers {', '.join(TESTED_DIFFUSERS)}, not "
            f"{diffusers.__version__}: its quantizer hooks are internals that change between releases. "
            "Install a tested version, or quantize after loading with robuq.quantize_"
        )


_REGISTERED: list[type] = []


def register_diffusers() -> type:
    """Add robuq to diffusers' quantizer mappings (once); returns the quantizer class."""
    if _REGISTERED:
        return _REGISTERED[0]
    import diffusers
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer

    _check_version(diffusers)

    class RobuqQuantizer(DiffusersQuantizer):
        """Quantizes with ``robuq.quantize_``: after loading (fresh weights: the low-rank branches are the
        SVD of the loaded weights), or before loading a model saved quantized (its tensors fill the layers)."""

        use_keep_in_fp32_modules = False
        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            if self.pre_quantized:
                config = self.quantization_config
                quantize_(model, config.quant_config(), initialize=False, allow_partial=config.allow_partial)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            config = self.quantization_config
            if not self.pre_quantized:
                policy = config.quant_config()
                quantize_(model, policy, allow_partial=config.allow_partial)
                config.policy = policy.to_dict()  # what save_pretrained writes: the reload needs no preset
            model.register_to_config(quantization_config=config.to_dict())
            return model

        def update_torch_dtype(self, torch_dtype):
            return torch_dtype

        def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
            return False  # every tensor loads as it is: quantize_ has built its layer already

        @property
        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    auto.AUTO_QUANTIZER_MAPPING[METHOD] = RobuqQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = DiffusersConfig
    _REGISTERED.append(RobuqQuantizer)
    return RobuqQuantizer
