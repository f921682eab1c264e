"""Quantization primitives and modules (no model-specific code lives here)."""

from robuq.core.quantizer_spec import gaussian_optimal_step
from robuq.quant.activation import ActivationQuantizer, quantize_activation
from robuq.quant.attention import QuantAttentionCore
from robuq.core.hadamard_matrices import hadamard_factors, hadamard_matrix
from robuq.quant.hadamard import hadamard_transform
from robuq.quant.linear import LinearQuantConfig, QuantLinear
from robuq.quant.primitives import QuantizedTensor
from robuq.quant.weights import fake_quantize_weight, quantize_weight_int, ternarize_weight

__all__ = [
    "ActivationQuantizer",
    "LinearQuantConfig",
    "QuantAttentionCore",
    "QuantLinear",
    "QuantizedTensor",
    "fake_quantize_weight",
    "gaussian_optimal_step",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_transform",
    "quantize_activation",
    "quantize_weight_int",
    "ternarize_weight",
]
