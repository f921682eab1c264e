"""Inference-only block linear computed in the integer domain.

    x' = T x                                   (the layer's Hadamard transform)
    x' ≈ s·q + o                               (per-token levels q, scale s, offset o)
    W  = α·L                                   (int8 levels L ∈ {−1,0,1} or int4, scale α per output channel)
    y  = s·(q Lᵀ)·α + o·(1·Lᵀ)·α + b + U(V x')

q Lᵀ is an int8 × int8 product with int32 accumulation; everything else is a per-row or per-column rescale.
It computes what the fake-quantized training layer computes, up to float rounding.

``IntegerLinear`` holds the numbers and the form state dicts give them. How it computes is one of these
paths, each in its own module, chosen when the layer is built or loaded: the first registered for
``"integer_linear"`` in ``robuq.quant.backends`` whose ``accepts(layer)`` says yes, else PyTorch's.

| path | takes | module |
|---|---|---|
| ``triton`` | per-token activations, tensors on a GPU (or the CPU under Triton's interpreter) | ``linear_triton`` |
| ``c-ternary`` | ternary weights packed for the AVX2 lookup GEMM, per-token activations of ≤ 4 bits, a rule the C kernels have | ``linear_c_ternary`` |
| ``c`` | float32 CPU tensors, robuq's C kernels built and on | ``linear_c`` |
| ``pytorch`` | everything | ``linear_pytorch`` |

The choice is made again whenever the layer's tensors are replaced: by ``load_state_dict``, by
``.to(device)``/``.cuda()``/``.cpu()`` (a layer moved to a GPU takes the Triton path, one moved back the C
path; weights packed for the AVX2 GEMM are unpacked on the way out and packed again on the way back), or
when the GELU is turned on. Whether robuq's C kernels are on (``ROBUQ_NATIVE``, ``native.use``) is read
then too, not on each call. A path computes in float32 whatever the input's dtype, except PyTorch's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robuq.core.quantizer_spec import int8_level_shift
from robuq.deploy import gemm as gemm_paths
from robuq.deploy.linear_c import CLinear
from robuq.deploy.linear_c_ternary import CTernaryLinear
from robuq.deploy.linear_pytorch import PyTorchLinear
from robuq.deploy.linear_triton import TritonLinear
from robuq.quant.backends import Backend, backend_for, register_backend
from robuq.quant.hadamard import hadamard_transform
from robuq.quant.linear import QuantLinear
from robuq.quant.primitives import QuantizedTensor
from robuq.core.errors import RobuqError

# Tried in this order; a path registered later (a user's own) comes after these unless it takes one's name.
for _path in (TritonLinear, CTernaryLinear, CLinear):
    register_backend("integer_linear", Backend(_path.name, _path.accepts, _path))


def choose_path(layer: "IntegerLinear"):
    """The execution path ``layer`` takes now: the first registered one that accepts it, else PyTorch's."""
    backend = backend_for("integer_linear", layer)
    return (PyTorchLinear if backend is None else backend.run)(layer)


def _derive_after_load(module: "IntegerLinear", _incompatible_keys) -> None:
    module._derive()


# On the AVX2 path the levels live only in that kernel's packing (one int8 copy of the weights, not two);
# state dicts carry them as weight_levels_t, whichever path wrote or reads them.
def _levels_into_state_dict(module: "IntegerLinear", state: dict, prefix: str, _metadata) -> None:
    if module.weight_levels_t is None:
        state[prefix + "weight_levels_t"] = module.levels_t()


def _levels_from_state_dict(module: "IntegerLinear", state: dict, prefix: str, *_args) -> None:
    key = prefix + "weight_levels_t"
    if module.weight_levels_t is None and key in state:
        module._store_levels(state[key].to(torch.int8))
        if module.weight_levels_t is None:  # packed: nothing left for the loader to copy
            del state[key]


class IntegerLinear(nn.Module):
    """Built from a trained QuantLinear, or from the levels and scales an export file stores
    (``weight``: a QuantizedTensor; re-quantizing α·L would not give back α). ``gemm`` names the CPU's
    integer GEMM path (``robuq.deploy.gemm``; default ``"auto"``, chosen by the CPU's capability).
    ``path`` is the execution path it runs on (see the module's docstring)."""

    def __init__(self, layer: QuantLinear, weight: QuantizedTensor | None = None, gemm: str = "auto"):
        super().__init__()
        q = weight if weight is not None else layer.quantized_weight()
        if q is None or layer.act_bits is None:
            raise RobuqError("IntegerLinear needs quantized weights and quantized activations")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.config = layer.config  # what it was trained as: cost reports read it
        self.act_bits = layer.act_bits
        self.level_shift = int8_level_shift(self.act_bits)  # the int8 levels are u − shift, u in 0…act_top
        self.act_top = 2**self.act_bits - 1
        levels = q.levels.to(torch.int8).t().contiguous()  # (in, out): _int_mm's layout
        lookup = gemm_paths.uses_ternary_lookup(gemm_paths.largest_level(levels), self.level_shift, self.act_top)
        self.gemm = gemm_paths.resolve(gemm, lookup_top=self.act_top if lookup else None)
        self.act_granularity, self.act_rule = layer.config.act_granularity, layer.config.act_rule
        self.hadamard = layer.config.hadamard
        self.lowrank_input = layer.config.lowrank_input
        self.register_buffer("weight_levels_t", None)
        self.register_buffer("_avx2_weight", None, persistent=False)
        self._store_levels(levels)
        self.register_buffer("weight_scale", q.scale.reshape(-1).float())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        # Rows per block: ~16 MiB of fp32 temporaries, under glibc's 32 MiB mmap ceiling, few Python round trips.
        self.block_rows = max(64, 2**22 // max(self.in_features, self.out_features))
        self.register_buffer("hadamard_signs", layer.hadamard_signs)
        ratio = layer.act_quant.effective_clip_ratio()
        self.register_buffer("clip_ratio", None if ratio is None else ratio.detach().float())
        self.rank = layer.rank
        self._gelu = False  # tanh-GELU on the output, in the epilogue (use_native_kernels sets it for an Mlp's fc1)
        if self.rank:
            self.register_buffer("lowrank_down", layer.lowrank_down.detach().float())
            self.register_buffer("lowrank_up", layer.lowrank_up.detach().float())
        self._derive()
        # Derived tensors and the path follow the stored tensors when a state dict is loaded into this module.
        self.register_load_state_dict_post_hook(_derive_after_load)
        self.register_state_dict_post_hook(_levels_into_state_dict)
        self.register_load_state_dict_pre_hook(_levels_from_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.path(x)

    def input_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 levels, scale, offset) of the rotated input rows: what the integer GEMM multiplies."""
        return self.path.input_levels(x)

    @property
    def gelu(self) -> bool:
        return self._gelu

    @gelu.setter
    def gelu(self, on: bool) -> None:
        self._gelu = bool(on)
        self.path = choose_path(self)  # a fused path holds the GELU among its converted arguments

    def levels_t(self) -> torch.Tensor:
        """The weight levels as an int8 (in, out) tensor, unpacked from the AVX2 packing where that holds them."""
        if self.weight_levels_t is not None:
            return self.weight_levels_t
        return gemm_paths.unpack_avx2(self._avx2_weight, self.in_features, self.out_features)

    def _store_levels(self, levels: torch.Tensor) -> None:
        """Keep the (in, out) int8 levels as the layer's GEMM path wants them: packed once for robuq's AVX2
        kernels (on the CPU, for weights they take), else as they are."""
        packs = (
            self.gemm == "avx2"
            and levels.device.type == "cpu"
            and gemm_paths.largest_level(levels) <= gemm_paths.AVX2_MAX_WEIGHT
        )
        self.weight_levels_t = None if packs else levels
        self._avx2_weight = gemm_paths.pack_avx2(levels, self.level_shift, self.act_top) if packs else None

    def _derive(self) -> None:
        """Tensors computed from the stored ones (not saved): the offset/bias rows and the folded branch;
        then the path, built on them."""
        # Rows of the rank-2 update that adds the offset term (o·ΣL·α) and the bias in one pass.
        levels = self.levels_t()
        level_sums = levels.sum(dim=0, dtype=torch.int32)
        self.register_buffer("_level_sums", level_sums, persistent=False)  # the AVX2 GEMM's correction
        self._max_weight = gemm_paths.largest_level(levels)
        level_sums = level_sums.float()
        bias = self.bias if self.bias is not None else torch.zeros_like(self.weight_scale)
        self.register_buffer("_offset_rows", torch.stack([level_sums * self.weight_scale, bias]), persistent=False)
        if self.rank and self.lowrank_input == "fp":
            # V·(T x) = (V T) x: with the rotation folded into the branch, it reads the layer's input and no
            # float copy of the rotated input has to be written.
            down = self.lowrank_down
            self.register_buffer(
                "_lowrank_down_input",
                hadamard_transform(down, self.hadamard_signs, inverse=True) if self.hadamard else down,
                persistent=False,
            )
        if self.rank:  # the epilogue kernel's layout of U: one row of output columns per rank
            self.register_buffer("_lowrank_up_rows", self.lowrank_up.t().contiguous(), persistent=False)
        self.path = choose_path(self)

    def _apply(self, fn, recurse: bool = True):
        device = self.weight_scale.device
        super()._apply(fn, recurse)
        if self.weight_scale.is_meta:  # a skeleton without values: nothing to derive or run
            return self
        if self.weight_scale.device != device:  # the AVX2 packing lives on the CPU only: unpack it, or pack again
            packed = self._avx2_weight
            levels = (
                self.weight_levels_t
                if packed is None
                else gemm_paths.unpack_avx2(packed.cpu(), self.in_features, self.out_features)
            )
            self._store_levels(levels.to(self.weight_scale.device))
        self._derive()
        return self

    def __getstate__(self) -> dict:
        # A path may hold addresses of this layer's tensors: a copy builds its own (see __setstate__).
        return {k: v for k, v in self.__dict__.items() if k != "path"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.path = choose_path(self)

    def extra_repr(self) -> str:
        gelu = ", then tanh-GELU" if self.gelu else ""
        return (
            f"{self.in_features}→{self.out_features}, int8 weights, a={self.act_bits}, lowrank={self.rank}{gelu}, "
            f"path={self.path.name}, cpu gemm={self.gemm}"
        )


def convert_to_integer(
    model: nn.Module, weights: dict[str, QuantizedTensor] | None = None, only_given: bool = False, gemm: str = "auto"
) -> nn.Module:
    """Replace, in place, every QuantLinear with quantized weights and activations by an IntegerLinear
    (with the given levels and scales where ``weights`` has them, popped from it as they are used;
    ``only_given``: just those layers, whose float weights need not exist; ``gemm``: their CPU GEMM path)."""
    weights = weights or {}
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
        and m.act_bits is not None
        and (n in weights if only_given else m.quantized_weight() is not None)
    ]
    for name, layer in targets:
        # pop: the caller's levels are freed layer by layer once the integer copy exists (peak memory).
        model.set_submodule(name, IntegerLinear(layer, weights.pop(name, None), gemm))
    return model
