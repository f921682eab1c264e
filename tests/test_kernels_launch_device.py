"""Every Triton launch runs with the tensor's GPU current: Triton launches on the current device, so a rank
whose tensors live on cuda:1 while cuda:0 is current would run its kernels on the wrong GPU."""

import ast
import inspect

import pytest
import torch

from robuq.kernels import triton_ops


def _launches(tree: ast.AST):
    """Calls of the form ``kernel[grid](...)`` (a Triton launch) with the ``with`` statements around them."""
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            enclosing, up = [], node
            while up in parents:
                up = parents[up]
                if isinstance(up, ast.With):
                    enclosing.append(up)
            yield node, enclosing


def test_every_launch_sits_inside_the_tensors_device_context():
    tree = ast.parse(inspect.getsource(triton_ops))
    launches = list(_launches(tree))
    assert len(launches) == 2  # hadamard_quantize_kernel and lowbit_matmul_kernel
    for call, withs in launches:
        contexts = [item.context_expr for w in withs for item in w.items]
        assert any(isinstance(c, ast.Call) and getattr(c.func, "id", None) == "on_device" for c in contexts), ast.dump(
            call
        )[:200]


def test_on_device_enters_the_tensors_gpu(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)

    class OnGpu1:
        is_cuda, device = True, torch.device("cuda", 1)

    with triton_ops.on_device(OnGpu1()):
        pass
    with triton_ops.on_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not triton_ops.available(),
    reason="needs two GPUs and Triton",
)
def test_a_kernel_launched_for_the_second_gpu_runs_there(monkeypatch):
    kernels = triton_ops._kernels()
    seen = []
    real = kernels.hadamard_quantize_kernel

    class Spy:
        def __getitem__(self, grid):
            seen.append(torch.cuda.current_device())
            return real[grid]

    monkeypatch.setattr(kernels, "hadamard_quantize_kernel", Spy())
    x = torch.randn(4, 384, device="cuda:1")
    with torch.cuda.device(0):
        triton_ops.hadamard(x)
    assert seen == [1]


def test_every_launch_keeps_multiply_adds_uncontracted():
    for call, _ in _launches(ast.parse(inspect.getsource(triton_ops))):
        fusion = [k.value for k in call.keywords if k.arg == "enable_fp_fusion"]
        assert fusion and isinstance(fusion[0], ast.Constant) and fusion[0].value is False, ast.dump(call)[:200]


SM_86_BYTES, SM_90_BYTES = 99 * 1024, 227 * 1024  # opt-in shared memory per block: RTX 30/40 and H100/H200


def test_the_hadamard_split_fits_the_devices_shared_memory():
    assert triton_ops.shared_memory_bytes(36, 128) == 114_688
    for n in (384, 768, 1152, 1536, 3072):
        for limit in (SM_86_BYTES, SM_90_BYTES):
            a, b = triton_ops.hadamard_split(n, limit)
            assert a * b == n and triton_ops.shared_memory_bytes(a, b) <= limit
    assert triton_ops.hadamard_split(4608, SM_90_BYTES) == (36, 128)
    assert triton_ops.hadamard_split(4608, SM_86_BYTES) is None  # no split fits: the PyTorch path
    assert triton_ops.hadamard_split(4608) == (36, 128)  # the interpreter has no limit
