"""robuq's C kernels (robuq/kernels/cpu_kernels.c) against the PyTorch code they replace."""

import os
import shutil
import subprocess
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robuq.core import quantizer_spec as spec
from robuq.kernels import native
from robuq.quant.activation import activation_levels
from robuq.quant.attention import QuantAttentionCore
from robuq.core.hadamard_matrices import hadamard_matrix, small_hadamard_orders
from robuq.quant.hadamard import hadamard_transform, random_signs
from robuq.quant.primitives import affine_levels

# Skipped only without a compiler: with one, a build that fails must fail these tests, not hide them.
pytestmark = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
    reason="no C compiler to build the kernels with",
)


def test_kernels_build_where_there_is_a_compiler():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build warns and falls back; here that is a failure
        native._library.cache_clear()
        assert native.enabled()


SIZES = [20, 24, 192, 384, 768, 1152, 1536, 4096, 4608]


def transform_matrix(n: int, signs: torch.Tensor, inverse: bool) -> torch.Tensor:
    """T = H·D/√n, or Tᵀ = D·H/√n, in float64."""
    # diag(signs) scales H's rows (D·H) or columns (H·D): a product with the dense diagonal took seconds at 4608.
    H, s = hadamard_matrix(n, torch.float64), signs.double()
    return s[:, None] * H if inverse else H * s[None, :]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("inverse", [False, True])
def test_hadamard_equals_the_dense_matrix(n, inverse):
    torch.manual_seed(n)
    x = torch.randn(37, n)  # 37 rows: two full tiles of 16 and a ragged one
    signs = random_signs(n, seed=4)
    expected = x.double() @ transform_matrix(n, signs, inverse).t()
    assert torch.allclose(native.hadamard(x, signs, inverse).double(), expected, atol=1e-5)
    assert torch.allclose(
        native.hadamard(x, None, inverse).double(), x.double() @ hadamard_matrix(n, torch.float64), atol=1e-5
    )


def test_mix12_plan_spells_out_the_order_12_hadamard_matrix():
    """cpu_kernels.c adds H_12 up from this plan (widths 12·2^k, DiT-S/2's and B/2's); it must be H_12's signs."""
    rows = []
    for i in range(12):
        row = []
        for code in native._mix12_plan()[4 * i : 4 * i + 4]:
            first = -1 if code & 4 else 1
            row += [first, first * (-1 if code & 2 else 1), first * (-1 if code & 1 else 1)]
        rows.append(row)
    assert torch.equal(torch.tensor(rows, dtype=torch.float64), hadamard_matrix(12, torch.float64).sign())


@settings(max_examples=20, deadline=None)
@given(m=st.sampled_from([1] + list(small_hadamard_orders())[:6]), k=st.integers(0, 7), rows=st.integers(1, 40))
def test_hadamard_any_supported_size(m, k, rows):
    n = m * 2**k
    x = torch.randn(rows, n)
    assert torch.allclose(
        native.hadamard(x, None, False).double(), x.double() @ hadamard_matrix(n, torch.float64), atol=1e-5
    )


def test_hadamard_transform_takes_the_kernel_for_float32_and_keeps_its_gradient():
    n = 384
    x = torch.randn(4, 5, n, requires_grad=True)
    signs = random_signs(n, 2)
    y = hadamard_transform(x, signs)
    g = torch.randn_like(y)
    y.backward(g)
    with native.use(False):  # the PyTorch path, for reference
        assert not native.enabled()
        assert torch.allclose(y.detach(), hadamard_transform(x.detach(), signs), atol=1e-5)
        assert torch.allclose(x.grad, hadamard_transform(g, signs, inverse=True), atol=1e-5)
    assert native.enabled()


@pytest.mark.parametrize("rule", spec.RULES)
@pytest.mark.parametrize("bits", range(spec.MIN_BITS, spec.MAX_BITS + 1))
@pytest.mark.parametrize("rotate", [True, False])
def test_hadamard_quantize_matches_the_pytorch_quantizer(rule, bits, rotate):
    torch.manual_seed(bits)
    n = 1152
    x = torch.randn(21, n) * torch.rand(21, 1) * 3 + torch.randn(21, 1)
    x[3] = 0.25  # a constant row: the smallest scale, SCALE_EPS, decides its levels
    signs = random_signs(n, 5)
    ratio = torch.tensor(0.8)
    rotated, levels, scale, offset, _ = native.hadamard_quantize(x, signs, rotate, bits, rule, ratio, True)
    reference = x.double() @ transform_matrix(n, signs, False).t() if rotate else x.double()
    assert torch.allclose(rotated.double(), reference, atol=1e-5)
    # Given the same rotated rows, statistics are PyTorch's up to the order of float sums, and given the
    # statistics, levels are the definition's to the last bit.
    ref = activation_levels(rotated, bits, "token", rule, ratio)
    assert torch.allclose(scale, ref.scale, rtol=1e-6) and torch.allclose(offset, ref.offset, rtol=1e-5, atol=1e-6)
    if not rotate:
        assert scale[3].item() == torch.tensor(spec.SCALE_EPS, dtype=torch.float32).item()
    assert levels.dtype == torch.int8
    own = affine_levels(rotated, scale, offset, *spec.level_range(bits))
    assert torch.equal(levels.float(), own - spec.int8_level_shift(bits))
    assert (levels.float() != ref.levels - spec.int8_level_shift(bits)).float().mean() < 1e-4
    down = torch.randn(20, n)  # a low-rank branch's first matmul in the same pass: 16 outputs, then 4
    _, without_copy, _, _, branch = native.hadamard_quantize(x, signs, rotate, bits, rule, ratio, False, down)
    assert torch.equal(without_copy, levels)
    assert torch.allclose(branch, rotated @ down.t(), rtol=1e-4, atol=1e-3)


def test_kernels_refuse_rules_and_bit_widths_they_do_not_implement(monkeypatch):
    x = torch.randn(4, 192)
    with pytest.raises(ValueError, match=r"unknown activation scale rule 'max'.*minmax.*gaussian"):
        native.hadamard_quantize(x, None, True, 4, "max", None, False)
    # A rule added to the definition but not to cpu_kernels.c is refused, not computed as another rule.
    monkeypatch.setitem(spec.SCALE_RULES, "percentile", 2)
    with pytest.raises(ValueError, match=r"C kernels.*no activation scale rule 'percentile'.*minmax.*gaussian"):
        native.hadamard_quantize(x, None, True, 4, "percentile", None, False)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="1 to 8"):
            native.hadamard_quantize(x, None, True, bits, "minmax", None, False)
        with pytest.raises(ValueError, match="1 to 8"):
            native.attention(*torch.randn(3, 1, 2, 5, 8), bits, 8)


def test_the_c_code_itself_refuses_an_unknown_rule_id():
    """Past the Python checks, cpu_kernels.c answers an id it has no branch for with an error code."""
    rows, n = 2, 16
    x, levels, stats = torch.randn(rows, n), torch.empty(rows, n, dtype=torch.int8), torch.empty(2, rows)
    unknown = max(spec.SCALE_RULES.values()) + 1
    for rule, top in ((unknown, 15), (spec.SCALE_RULES["minmax"], 256)):
        status = native._library().robuq_hadamard_quantize(
            native._ptr(x),
            None,
            native._ptr(levels),
            native._ptr(stats[0]),
            native._ptr(stats[1]),
            rows,
            n,
            1,
            None,
            None,
            top,
            rule,
            1.0,
            1.0,
            0,
            None,
            0,
            None,
            1,
        )
        assert status == native._BAD_ARGUMENT


def test_the_build_takes_the_quantizer_constants_from_its_definition(monkeypatch, tmp_path):
    flags = native.definitions()
    assert {f"-DRULE_{name.upper()}={rule_id}" for name, rule_id in spec.SCALE_RULES.items()} <= set(flags)
    assert f"-DSCALE_EPS={spec.SCALE_EPS!r}f" in flags
    # Without them the source does not compile: cpu_kernels.c keeps no constants of its own.
    monkeypatch.setattr(native, "definitions", lambda: [])
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    with pytest.raises(subprocess.CalledProcessError) as failure:
        native._build(compiler)
    assert "quantizer_spec.py" in failure.value.stderr


@pytest.mark.parametrize("cols", [33, 48])  # a ragged tail, and whole vectors only
@pytest.mark.parametrize("rank, gelu", [(0, False), (5, False), (16, True)])
def test_rescale_is_the_integer_linear_epilogue(cols, rank, gelu):
    import torch.nn.functional as F

    rows = 19  # not a multiple of the kernel's row block
    acc = torch.randint(-1000, 1000, (rows, cols), dtype=torch.int32)
    s, o = torch.rand(rows, 1), torch.randn(rows, 1)
    alpha, w, b = torch.rand(cols), torch.randn(cols), torch.randn(cols)
    branch, up = torch.randn(rows, rank), torch.randn(cols, rank)
    expected = acc.float() * s * alpha + o * w + b + branch @ up.t()
    if gelu:
        expected = F.gelu(expected, approximate="tanh")
    out = native.rescale(
        acc,
        torch.empty(rows, cols),
        s,
        o,
        alpha,
        w,
        b,
        branch if rank else None,
        up.t().contiguous() if rank else None,
        gelu,
    )
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, k, n", [(7, 40, 72), (100, 96, 33), (130, 384, 64)])  # partial chunks, groups, columns
@pytest.mark.parametrize(
    "rule, bits, rotate, rank, gelu",
    [("gaussian", 3, True, 4, True), ("minmax", 4, False, 0, False), ("gaussian", 2, True, 16, False)],
)
def test_the_fused_ternary_linear_is_the_three_kernels_bit_for_bit(rows, k, n, rule, bits, rotate, rank, gelu):
    """linear_ternary runs hadamard_quantize, gemm_ternary and rescale per block of rows in one pass: the same
    float operations in the same order, so the same bits, whatever the chunking."""
    torch.manual_seed(rows + k + n + bits)
    x = torch.randn(rows, k) * 2 + 0.5
    signs = random_signs(k, seed=1)
    weights = torch.randint(-1, 2, (k, n), dtype=torch.int8)
    code, sums = native.pack_ternary_weights(weights), weights.sum(dim=0, dtype=torch.int32)
    alpha, w, b = torch.rand(n), torch.randn(n), torch.randn(n)
    down, up = (torch.randn(rank, k), torch.randn(rank, n)) if rank else (None, None)
    ratio = torch.tensor(0.9)
    _, levels, scale, offset, branch = native.hadamard_quantize(
        x, signs, rotate, bits, rule, ratio, keep_rotated=False, down=down
    )
    acc = native.gemm_ternary(levels, code, n, sums, 2**bits - 1)
    expected = native.rescale(acc, torch.empty(rows, n), scale, offset, alpha, w, b, branch, up, gelu)
    layer = native.ternary_linear_args(k, n, signs, rotate, bits, rule, ratio, down, code, sums, alpha, w, b, up, gelu)
    got = native.linear_ternary(x, layer, torch.empty(rows, n))
    assert torch.equal(got, expected)


def test_the_fused_ternary_linear_refuses_what_the_lookup_gemm_cannot_take():
    weights = torch.randint(-1, 2, (12, 40), dtype=torch.int8)
    code, sums, ones = native.pack_ternary_weights(weights), weights.sum(dim=0, dtype=torch.int32), torch.ones(40)
    with pytest.raises(ValueError, match="at most 4 bits"):  # 8-bit levels are shifted into int8
        native.ternary_linear_args(
            12, 40, None, False, 8, "minmax", None, None, code, sums, ones, ones, ones, None, False
        )
    with pytest.raises(ValueError, match="at most 4 bits"):  # weights packed for another shape
        native.ternary_linear_args(
            15, 40, None, False, 3, "minmax", None, None, code, sums, ones, ones, ones, None, False
        )
    layer = native.ternary_linear_args(
        12, 40, None, False, 3, "minmax", None, None, code, sums, ones, ones, ones, None, False
    )
    with pytest.raises(ValueError, match=r"contiguous float32 CPU tensor of shape \(5, 40\)"):
        native.linear_ternary(torch.randn(5, 12), layer, torch.empty(40, 5).t())
    with pytest.raises(ValueError, match=r"of shape \(5, 40\)"):
        native.linear_ternary(torch.randn(5, 12), layer, torch.empty(4, 40))


def test_layer_norm_modulate_and_gated_residual_match_the_block_code():
    import torch.nn.functional as F

    from robuq.models.dit import modulate

    x, y = torch.randn(3, 10, 40) * 3 + 1, torch.randn(3, 10, 40)
    shift, scale, gate = torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 40)
    expected = modulate(F.layer_norm(x, (40,), eps=1e-6), shift, scale)
    assert torch.allclose(native.layer_norm_modulate(x, shift, scale, 1e-6), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(native.gated_residual(x, gate, y), x + gate.unsqueeze(1) * y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        native.layer_norm_modulate(x, shift[:2], scale[:2], 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        native.layer_norm_modulate(x, shift, scale[:, :20], 1e-6)


@pytest.mark.parametrize("bits, probs_bits", [(8, 8), (4, 8), (8, 4), (3, 2)])
@pytest.mark.parametrize("shape", [(2, 40, 3, 4, 16), (1, 7, 3, 2, 8)])
def test_integer_attention_equals_the_fake_quantized_core(bits, probs_bits, shape):
    torch.manual_seed(bits * 10 + probs_bits)
    core = QuantAttentionCore(bits=bits, probs_bits=probs_bits)
    qkv = torch.randn(*shape).permute(2, 0, 3, 1, 4) * 2  # the strided views Attention passes in
    with torch.no_grad():
        fast = core(qkv[0], qkv[1], qkv[2])
    assert fast.transpose(1, 2).is_contiguous()  # Attention's transpose back to tokens costs no copy
    leaf = qkv.clone().requires_grad_(True)
    slow = core(leaf[0], leaf[1], leaf[2]).detach()  # gradients wanted: PyTorch's float fake-quantizers
    assert fast.shape == slow.shape
    # Equal up to float rounding: integer sums are exact, so differences come from the order of float
    # operations, and at most a rare probability level lands one step over (≤ one grid step of p times |v|).
    step = qkv[2].abs().max().item() / (2**probs_bits - 1)
    diff = (fast - slow).abs()
    assert diff.max().item() <= 2 * step
    assert diff.mean().item() <= 1e-3 * step + 1e-6


def test_attention_packs_heads_per_thread_or_shared_with_the_same_output():
    """Heads that share out evenly among threads are packed by each thread before its query blocks; three
    heads on two threads are packed first and their blocks shared. Either way the same sums, bit for bit."""
    qkv = torch.randn(1, 37, 3, 3, 20).permute(2, 0, 3, 1, 4)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append(native.attention(qkv[0], qkv[1], qkv[2], 8, 8))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


def test_portable_build_gives_the_same_attention(monkeypatch, tmp_path):
    """The u8×s8 dot products without AVX-512 VNNI (plain C) sum the same integers: same output, bit for bit."""
    qkv = torch.randn(2, 37, 3, 3, 20).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        fast = native.attention(qkv[0], qkv[1], qkv[2], 8, 8)
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-DROBUQ_PORTABLE"])
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        portable = native.attention(qkv[0], qkv[1], qkv[2], 8, 8)
        assert list((tmp_path / "kernels").glob("cpu_kernels-*.so"))  # really a second build
    finally:
        native._library.cache_clear()
    assert torch.equal(portable, fast)


def test_missing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not native.enabled()
        assert any("falling back to PyTorch" in str(w.message) for w in caught)
        x = torch.randn(3, 192)
        assert torch.allclose(hadamard_transform(hadamard_transform(x), inverse=True), x, atol=1e-5)
    finally:
        native._library.cache_clear()


def test_build_is_cached_per_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.enabled()
        built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
        assert len(built) == 1
        native._library.cache_clear()
        assert native.enabled() and list((tmp_path / "kernels").glob("cpu_kernels-*.so")) == built
    finally:
        native._library.cache_clear()


@pytest.mark.slow  # two builds of the library
def test_a_change_to_any_kernel_family_file_builds_anew(monkeypatch, tmp_path):
    """cpu_kernels.c includes the families in c/: the build's cache key must cover them all."""
    import shutil

    source = tmp_path / "src"
    shutil.copytree(native.SOURCE.parent, source, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(native, "SOURCE", source / "cpu_kernels.c")
    monkeypatch.setattr(native, "FAMILIES", source / "c")
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path / "cache"))
    compiler = shutil.which("cc") or shutil.which("gcc")
    first = native._build(compiler)
    with open(source / "c" / "elementwise.c", "a") as f:
        f.write("\n/* an edit */\n")
    second = native._build(compiler)
    assert first != second and first.exists() and second.exists()


def test_gelu_matches_pytorch(tiny_dit):
    import torch.nn.functional as F

    from robuq.deploy.elementwise import NativeGELU

    x = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([0.0, -0.0, 1e-30, 88.0, -88.0])])
    assert torch.allclose(native.gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)
    assert torch.allclose(native.gelu_tanh(x[:7]), F.gelu(x[:7], approximate="tanh"), atol=1e-6)  # a ragged tail only
    leaf = torch.randn(3, 5, requires_grad=True)  # training keeps PyTorch's op, and its gradient
    out = NativeGELU()(leaf)
    assert torch.equal(out, F.gelu(leaf, approximate="tanh")) and out.requires_grad


def test_native_kernels_fill_the_dit_seams_and_keep_its_outputs_and_gradients(tiny_dit, monkeypatch):
    import copy

    from robuq.deploy.elementwise import NativeGatedResidual, NativeGELU, NativeModulatedLayerNorm, use_native_kernels
    from robuq.models.dit import DiTBlock, FinalLayer

    tiny_dit.eval()  # no random label dropout: both models must see the same labels
    native_dit = use_native_kernels(copy.deepcopy(tiny_dit))
    # The seams are filled with modules; the blocks stay the model's, so an edit to dit.py reaches them.
    assert all(type(b) is DiTBlock and type(b).forward is DiTBlock.forward for b in native_dit.blocks)
    assert type(native_dit.final_layer) is FinalLayer
    kinds = [type(m) for m in native_dit.modules()]
    depth = len(tiny_dit.blocks)
    assert kinds.count(NativeModulatedLayerNorm) == 2 * depth + 1 and kinds.count(NativeGatedResidual) == depth
    assert kinds.count(NativeGELU) == depth  # float fc1: no fusion
    assert native_dit.state_dict().keys() == tiny_dit.state_dict().keys()
    calls = []
    for name in ("layer_norm_modulate", "gated_residual", "gelu_tanh"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, name=name, original=original: calls.append(name) or original(*a))
    x, t, y = torch.randn(2, tiny_dit.in_channels, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        expected, got = tiny_dit(x, t, y), native_dit(x, t, y)
    assert sorted(set(calls)) == ["gated_residual", "gelu_tanh", "layer_norm_modulate"]
    assert len(calls) == (2 + 2 + 1) * depth + 1
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # With gradients wanted, every seam takes the model's own PyTorch code: the same gradients, bit for bit.
    calls.clear()
    for model in (tiny_dit, native_dit):
        model(x, t, y).square().mean().backward()
    assert not calls
    for (name, p), q in zip(tiny_dit.named_parameters(), native_dit.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def test_use_switches_the_kernels_for_its_block_only_and_leaves_the_environment_alone():
    import os
    import threading

    before = dict(os.environ)
    seen_elsewhere = []
    with native.use(False):
        assert not native.enabled()
        worker = threading.Thread(target=lambda: seen_elsewhere.append(native.enabled()))
        worker.start()
        worker.join()
    assert native.enabled()
    assert seen_elsewhere == [True]  # another thread is not switched off behind its back
    assert dict(os.environ) == before


def test_the_declared_signatures_are_the_c_prototypes():
    """native._SIGNATURES is where ctypes learns each argument's position and type: it must say what the C
    functions take, parameter by parameter, names included (calls pass their arguments by these names)."""
    import re

    c_types = {
        "const float *": "f32*",
        "float *": "f32*",
        "const int8_t *": "i8*",
        "int8_t *": "i8*",
        "const int32_t *": "i32*",
        "int32_t *": "i32*",
        "int64_t": "i64",
        "int32_t": "i32",
        "int": "int",
        "float": "float",
        "strides_t": "strides",
    }
    sources = "\n".join(f.read_text() for f in sorted(native.FAMILIES.glob("*.c")))
    prototypes = {
        m.group(1): m.group(2) for m in re.finditer(r"^(?:int|void) (robuq_\w+)\(([^)]*)\)\s*\{", sources, re.M)
    }
    assert set(prototypes) == set(native._SIGNATURES)
    for name, text in prototypes.items():
        parameters = [] if text.strip() == "void" else [" ".join(p.split()) for p in text.split(",")]
        declared = []
        for parameter in parameters:
            kind, parameter_name = re.match(r"(.*?\*?)\s*(\w+)$", parameter).groups()
            declared.append((parameter_name, c_types[kind.strip()]))
        assert native._parameters(name) == declared, name


def test_a_kernel_call_with_a_wrong_argument_name_fails_before_c():
    if native._library() is None:
        pytest.skip("robuq's C kernels are not built here")
    with pytest.raises(TypeError, match=r"missing \['n'\], unknown \['count'\]"):
        native._call("robuq_gelu_tanh", x=0, y=0, count=4)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile's inductor back-end needs a C++ compiler on the CPU",
)
def test_compiled_code_calls_the_kernels_with_real_tensors():
    """Under torch.compile a kernel call must run outside the traced graph, on the real tensors: traced, it
    would be handed fake tensors' addresses (this once gave NaN losses in compiled QAT)."""
    if native._library() is None:
        pytest.skip("robuq's C kernels are not built here")
    torch.manual_seed(0)
    x, signs = torch.randn(6, 48, requires_grad=True), torch.randint(0, 2, (48,)).float() * 2 - 1
    from robuq.quant.hadamard import hadamard_transform

    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda v: hadamard_transform(v, signs).square().sum())
        loss = compiled(x)
        loss.backward()
        grad, x.grad = x.grad.clone(), None
        hadamard_transform(x, signs).square().sum().backward()
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(loss) and torch.allclose(loss, x.detach().square().sum(), rtol=1e-5)  # orthogonal
    assert torch.allclose(grad, x.grad, atol=1e-5)
