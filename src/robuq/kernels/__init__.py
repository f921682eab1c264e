"""Hand-written kernels for the GPU (Triton); every one has a PyTorch fallback in the module that uses it."""
