"""Hand-written kernels: C for the CPU (built at first use), Triton for the GPU.

Importing this package registers them as back-ends of the primitives (``robuq.quant.backends``), the
Triton ones first: they take CUDA tensors (and CPU tensors under Triton's interpreter), the C ones
float32 CPU tensors. Every primitive keeps its PyTorch path for everything else.
"""

from robuq.kernels import native, triton_ops
from robuq.quant.backends import Backend, register_backend

register_backend("hadamard", Backend("triton", triton_ops.can_hadamard, triton_ops.hadamard))
register_backend("hadamard", Backend("c", native.takes, native.hadamard))
register_backend("attention", Backend("c", native.takes, native.attention))
