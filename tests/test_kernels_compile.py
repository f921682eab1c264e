"""The Triton kernels compile for a real GPU (sm_90 cubin), without one: Triton's interpreter, which the
other kernel tests use on the CPU, accepts code that the compiler rejects."""

import importlib.util
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # Triton's compiler takes seconds per kernel
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from robuq.core.quantizer_spec import SCALE_RULES  # noqa: E402

KERNELS = Path(__file__).resolve().parents[1] / "src" / "robuq" / "kernels" / "_triton_kernels.py"


def kernels():
    spec = importlib.util.spec_from_file_location("robuq_kernels_compile_check", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_for_h100(fn, signature: dict, constexprs: dict) -> dict:
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)).asm


HADAMARD_QUANTIZE_SIGNATURE = {
    "x_ptr": "*fp32",
    "signs_ptr": "*fp32",
    "ha_ptr": "*fp32",
    "hb_t_ptr": "*fp32",
    "y_ptr": "*fp32",
    "levels_ptr": "*i8",
    "scale_ptr": "*fp32",
    "offset_ptr": "*fp32",
    "ratio_ptr": "*fp32",
    "A": "i32",
    "n": "i32",
    "stride_x": "i32",
    "stride_y": "i32",
    "stride_levels": "i32",
    "step_factor": "fp32",
    "top": "i32",
    "shift": "i32",
}


@pytest.mark.parametrize(
    "variant",
    [
        # the fused Hadamard + Gaussian quantizer
        dict(SIGNS=1, STORE_Y=False, QUANT=True, RULE=SCALE_RULES["gaussian"], HAS_RATIO=True),
        # the inverse transform of QAT's backward
        dict(SIGNS=2, STORE_Y=True, QUANT=False, RULE=SCALE_RULES["minmax"], HAS_RATIO=False),
    ],
)
def test_hadamard_quantize_kernel_compiles(variant):
    asm = compile_for_h100(
        kernels().hadamard_quantize_kernel, HADAMARD_QUANTIZE_SIGNATURE, {"AP": 64, "B": 128, **variant}
    )
    assert asm["cubin"]


def test_hadamard_quantize_kernel_refuses_a_rule_id_it_has_no_branch_for():
    unknown = max(SCALE_RULES.values()) + 1
    variant = dict(AP=64, B=128, SIGNS=0, STORE_Y=False, QUANT=True, RULE=unknown, HAS_RATIO=False)
    with pytest.raises(triton.compiler.errors.CompilationError, match="minmax and gaussian rules only"):
        compile_for_h100(kernels().hadamard_quantize_kernel, HADAMARD_QUANTIZE_SIGNATURE, variant)


def test_lowbit_matmul_kernel_compiles_for_packed_ternary_weights():
    f32 = "*fp32"
    signature = {
        "a_ptr": "*i8",
        "w_ptr": "*u8",
        "out_ptr": f32,
        "scale_ptr": f32,
        "offset_ptr": f32,
        "alpha_ptr": f32,
        "offset_row_ptr": f32,
        "bias_ptr": f32,
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_a": "i32",
        "stride_w": "i32",
        "stride_out": "i32",
    }
    asm = compile_for_h100(
        kernels().lowbit_matmul_kernel, signature, {"BM": 64, "BN": 64, "BK": 64, "PACKED": True, "HAS_BIAS": True}
    )
    assert asm["cubin"]
