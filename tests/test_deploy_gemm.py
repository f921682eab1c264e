import json
import os
import subprocess
import sys

import pytest
import torch

import robuq
from robuq.deploy import gemm
from robuq.deploy.export import export_model, load_exported
from robuq.deploy.integer_linear import IntegerLinear
from robuq.kernels import native
from robuq.quant.linear import LinearQuantConfig, QuantLinear

PATHS = [p for p in gemm.PATHS if p != "avx2" or native.integer_isa() in ("avx2", "avx512_vnni")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "m, k, n, largest", [(7, 5, 3, 1), (13, 33, 70, 1), (50, 64, 96, 8), (100, 385, 200, 64), (9, 40, 64, 127)]
)
def test_every_path_gives_int_mm_exact_sums(path, m, k, n, largest):
    torch.manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)  # the whole int8 range, 8-bit levels' worst case
    b = torch.randint(-largest, largest + 1, (k, n), dtype=torch.int8)
    expected = (a.double() @ b.double()).to(torch.int32)
    got = gemm.matmul(path, a, b, b.sum(dim=0, dtype=torch.int32), largest)
    assert got.dtype == torch.int32 and torch.equal(got, expected)


@pytest.mark.skipif(native.integer_isa() == "none", reason="robuq's C kernels are not built here")
@pytest.mark.parametrize("top", [1, 7, 15, 127, 255])
@pytest.mark.parametrize("m, k, n", [(1, 4, 8), (3, 12, 9), (5, 384, 40), (50, 130, 17), (9, 1540, 24)])
def test_the_multiply_add_kernel_is_exact_for_unsigned_low_bit_levels(top, m, k, n):
    """Levels 0…top read in place (shift 0; copied where k is not whole quads), the int16 sums kept for as
    many quads as top allows: tails of rows (tiles of 4), of columns (blocks of 8) and of k (quads of 4).
    (The AVX2 path gives ternary weights with levels up to 15 to the lookup kernel; this one is called
    directly.)"""
    torch.manual_seed(top + m + k + n)
    a = torch.randint(0, top + 1, (m, k), dtype=torch.int8 if top < 128 else torch.uint8)
    a = a.to(torch.int8) if top < 128 else (a.int() - 128).to(torch.int8)
    shift = 0 if top < 128 else 128
    b = torch.randint(-1, 2, (k, n), dtype=torch.int8)
    b[0] = 1  # the largest sums: every level at its top meets +1
    a[0] = top - shift
    packed = native.pack_gemm_weights(b)
    assert packed.shape == (-(-n // 8), -(-k // 4), 8, 4)
    got = native.gemm_s8(a, packed, n, b.sum(dim=0, dtype=torch.int32), shift, gemm.avx2_flush(1, top))
    assert torch.equal(got, (a.double() @ b.double()).to(torch.int32))


@pytest.mark.skipif(native.integer_isa() == "none", reason="robuq's C kernels are not built here")
@pytest.mark.parametrize("top", [1, 2, 3, 7, 15])
@pytest.mark.parametrize(
    "m, k, n", [(1, 1, 1), (4, 3, 32), (37, 385, 33), (73, 130, 100), (5, 4610, 40), (41, 11, 130), (11, 6, 64)]
)
def test_the_ternary_lookup_kernel_is_exact(top, m, k, n):
    """Levels 0…top against ternary weights, through the AVX2 path as an exported layer calls it, in the
    built library's layout (32 columns a block for AVX2, 64 for AVX-512 VBMI): tails of rows (tiles of 3 or
    6, tasks of 36), of columns, of k (groups of 3, table pairs of two groups), every level at its top
    against +1 and against −1 (the int8 sums' extremes), and k = 4610 past one int16 span at 4 bits."""
    torch.manual_seed(top + m + k + n)
    a = torch.randint(0, top + 1, (m, k), dtype=torch.int8)
    b = torch.randint(-1, 2, (k, n), dtype=torch.int8)
    a[0] = top
    b[:, 0] = 1
    b[:, -1] = -1
    assert gemm.uses_ternary_lookup(1, 0, top)
    packed = gemm.pack_avx2(b, act_shift=0, act_top=top)
    columns = native.ternary_columns()
    per_group = (2, 32) if columns == 32 else (64,)
    assert packed.shape == (-(-n // columns), -(-k // 3), *per_group)
    assert torch.equal(gemm.unpack_avx2(packed, k, n), b)
    got = gemm.matmul("avx2", a, b, b.sum(dim=0, dtype=torch.int32), 1, packed=packed, act_shift=0, act_top=top)
    assert torch.equal(got, (a.double() @ b.double()).to(torch.int32))


def test_the_avx2_path_packs_for_the_lookup_kernel_only_ternary_weights_at_4_bits_or_fewer():
    ternary, int4 = torch.randint(-1, 2, (12, 40), dtype=torch.int8), torch.randint(-8, 8, (12, 40), dtype=torch.int8)
    ternary[0, 0], int4[0, 0] = 1, 7
    assert native.is_ternary_code(gemm.pack_avx2(ternary, act_shift=0, act_top=15))
    assert gemm.pack_avx2(ternary, act_shift=0, act_top=31).shape[2:] == (8, 4)  # 5-bit levels: vpmaddubsw
    assert gemm.pack_avx2(ternary, act_shift=128, act_top=255).shape[2:] == (8, 4)
    assert gemm.pack_avx2(int4, act_shift=0, act_top=7).shape[2:] == (8, 4)
    for b in (ternary, int4):
        assert torch.equal(gemm.unpack_avx2(gemm.pack_avx2(b, 0, 7), 12, 40), b)
    with pytest.raises(ValueError, match="levels in"):
        native.pack_ternary_weights(int4)
    if native.integer_isa() != "none":
        with pytest.raises(ValueError, match="top"):
            native.gemm_ternary(
                torch.zeros(2, 12, dtype=torch.int8),
                native.pack_ternary_weights(ternary),
                40,
                ternary.sum(dim=0, dtype=torch.int32),
                16,
            )


def test_the_ternary_packing_puts_each_weight_where_the_kernel_reads_it():
    """AVX2's layout: column c's weights k = 3g…3g + 2 sit at block c // 32, group g, lane c % 32 as the slot
    of their pattern up to sign (first nonzero made +1) and that sign; padding is zero."""
    torch.manual_seed(0)
    b = torch.randint(-1, 2, (7, 40), dtype=torch.int8)
    packed = native.pack_ternary_weights(b, columns=32)
    padded = torch.zeros(9, 64, dtype=torch.int8)
    padded[:7, :40] = b
    for g in range(3):
        for c in range(64):
            triple = padded[3 * g : 3 * g + 3, c].tolist()
            sign = next((v for v in triple if v), 0)
            slot, stored_sign = packed[c // 32, g, :, c % 32].tolist()
            assert stored_sign == sign and native.TERNARY_PATTERNS[slot] == tuple(sign * v for v in triple)
            assert (slot == 0) == (sign == 0)
    assert torch.equal(native.unpack_ternary_weights(packed, 7, 40), b)


def test_the_wide_ternary_packing_numbers_each_pattern_where_the_kernel_reads_it():
    """AVX-512's layout: column c's weights k = 3g…3g + 2 sit at block c // 64, group g, byte c % 64 as their
    pattern's base-3 number Σ (w_i + 1)·3^(2−i), plus 32 in odd groups (the upper half of a table pair);
    padding is the all-zero pattern, 13. Packed and unpacked on any CPU."""
    torch.manual_seed(1)
    b = torch.randint(-1, 2, (8, 70), dtype=torch.int8)
    packed = native.pack_ternary_weights(b, columns=64)
    assert packed.shape == (2, 3, 64)
    padded = torch.zeros(9, 128, dtype=torch.int8)
    padded[:8, :70] = b
    for g in range(3):
        for c in range(128):
            w = padded[3 * g : 3 * g + 3, c].tolist()
            number = (w[0] + 1) * 9 + (w[1] + 1) * 3 + (w[2] + 1)
            assert packed[c // 64, g, c % 64] == number + 32 * (g % 2)
    assert torch.equal(native.unpack_ternary_weights(packed, 8, 70), b)
    assert native.is_ternary_code(packed) and native.is_ternary_code(native.pack_ternary_weights(b, columns=32))


def test_the_packing_puts_each_weight_where_the_kernel_reads_it():
    """Column c's k-th weight sits at block c // 8, quad k // 4, lane c % 8, byte k % 4; padding is zero."""
    b = torch.arange(-60, 45, dtype=torch.int8).reshape(7, 15)
    packed = native.pack_gemm_weights(b)
    for k in range(7):
        for c in range(15):
            assert packed[c // 8, k // 4, c % 8, k % 4] == b[k, c]
    assert packed[1, :, 7].eq(0).all() and packed[:, 1, :, 3].eq(0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(act_bits=3, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=4),
        dict(act_bits=8, act_rule="minmax", lowrank_rank=0),
        dict(act_bits=4, weight="int4", lowrank_rank=3, lowrank_input="quantized"),
    ],
)
def test_integer_linear_on_every_path_matches_the_fake_quant_layer(path, options):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(40, 72), LinearQuantConfig(**options)).eval()
    integer = IntegerLinear(layer, gemm=path)
    assert integer.gemm == path
    x = torch.randn(3, 13, 40) * 2 + 0.5
    with torch.no_grad():
        expected, got = layer(x), integer(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_exported_model_runs_every_path_forced_by_the_switch_with_the_same_output(tmp_path, tiny_dit, monkeypatch):
    config = robuq.preset("robuq", act_bits=3)
    model = robuq.quantize_(tiny_dit, config, plan={"blocks.0.mlp.fc2": 8}).eval()
    path = export_model(model, config, tmp_path / "m.safetensors", dtype="fp32")
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([2, 400, 990]), torch.tensor([1, 5, 10])
    outputs = {}
    for name in PATHS:
        monkeypatch.setenv("ROBUQ_GEMM", name)
        loaded = load_exported(path)
        monkeypatch.delenv("ROBUQ_GEMM")
        layers = [m for m in loaded.modules() if isinstance(m, IntegerLinear)]
        assert layers and all(m.gemm == name for m in layers)
        with torch.no_grad():
            outputs[name] = loaded(x, t, y)
    with torch.no_grad():
        reference = model(x, t, y)
    for name, out in outputs.items():
        assert torch.equal(out, outputs[PATHS[0]]), name  # exact integer sums: the same model, bit for bit
    assert ((outputs[PATHS[0]] - reference).norm() / reference.norm()) < 0.05
    other = "fp32" if PATHS[0] != "fp32" else "int_mm"
    monkeypatch.setenv("ROBUQ_GEMM", PATHS[0])  # the argument wins over the switch
    assert all(m.gemm == other for m in load_exported(path, gemm=other).modules() if isinstance(m, IntegerLinear))


def test_unknown_paths_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown GEMM path 'vnni'"):
        gemm.resolve("vnni")
    monkeypatch.setenv("ROBUQ_GEMM", "fast")
    with pytest.raises(ValueError, match="ROBUQ_GEMM"):
        gemm.resolve(None)


def _capability(torch_capability, flags, kernels="avx2", lookup_columns=32):
    return gemm.CpuCapability(torch_capability, frozenset(flags), kernels, lookup_columns)


def test_the_chooser_takes_int_mm_only_with_vnni():
    never = lambda fallback: pytest.fail("no measurement expected")  # noqa: E731
    assert gemm.choose_path(_capability("AVX512", {"avx2", "avx512f", "avx512_vnni"}, "avx512_vnni"), never) == "int_mm"
    assert gemm.choose_path(_capability("AVX512", {"avx2", "avx512f", "amx_int8"}), never) == "int_mm"
    # the CPU: AVX2 and FMA only
    assert gemm.choose_path(_capability("AVX2", {"avx2"}), never) == "avx2"
    assert gemm.choose_path(_capability("AVX2", {"avx2"}, kernels="none"), never) == "fp32"
    assert gemm.choose_path(_capability("DEFAULT", set(), kernels="plain"), never) == "fp32"
    # AVX-512 without VNNI, or PyTorch held to AVX2 on a VNNI CPU: below VNNI
    assert gemm.choose_path(_capability("AVX512", {"avx2", "avx512f"}), never) == "avx2"
    assert gemm.choose_path(_capability("AVX2", {"avx2", "avx512f", "avx512_vnni"}), never) == "avx2"
    # AVX-VNNI alone: measured once against the fallback
    asked = []
    assert (
        gemm.choose_path(_capability("AVX2", {"avx2", "avx_vnni"}), lambda f: asked.append(f) or "int_mm") == "int_mm"
    )
    assert asked == ["avx2"]
    assert gemm.choose_path(_capability("AVX2", {"avx2", "avx_vnni"})) == "avx2"


def test_with_vnni_the_wide_lookup_takes_a_ternary_layer_only_where_measured_faster():
    never = lambda *_: pytest.fail("no measurement expected")  # noqa: E731
    vnni = ("AVX512", {"avx2", "avx512f", "avx512_vnni"}, "avx512_vnni")
    asked = []
    measure = lambda top: asked.append(top) or ("avx2" if top < 8 else "int_mm")  # noqa: E731
    wide = _capability(*vnni, lookup_columns=64)
    assert gemm.choose_path(wide, never, lookup_top=3, measure_lookup=measure) == "avx2"
    assert gemm.choose_path(wide, never, lookup_top=15, measure_lookup=measure) == "int_mm"
    assert asked == [3, 15]
    # not a lookup layer, no wide lookup (AVX2's is slower than int_mm with VNNI), or no measurement: int_mm
    assert gemm.choose_path(wide, never, lookup_top=None, measure_lookup=never) == "int_mm"
    assert gemm.choose_path(_capability(*vnni), never, lookup_top=3, measure_lookup=never) == "int_mm"
    assert gemm.choose_path(wide, never, lookup_top=3) == "int_mm"
    assert gemm.choose_path(_capability(*vnni[:2], "none", 64), never, lookup_top=3, measure_lookup=never) == "int_mm"
    # below VNNI nothing changes: robuq's kernels, whatever their width
    assert gemm.choose_path(_capability("AVX2", {"avx2"}, lookup_columns=64), never, 3, never) == "avx2"


def test_the_lookup_measurement_is_kept_per_cpu_build_and_level_range(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    gemm.lookup_beats_int_mm.cache_clear()
    times = {3: {"int_mm": 2.0, "avx2": 1.0}, 15: {"int_mm": 2.0, "avx2": 1.9}}  # the second inside the 10% margin
    monkeypatch.setattr(gemm, "time_lookup_against_int_mm", lambda top: times[top])
    try:
        assert gemm.lookup_beats_int_mm(3) == "avx2" and gemm.lookup_beats_int_mm(15) == "int_mm"
        gemm.lookup_beats_int_mm.cache_clear()
        monkeypatch.setattr(gemm, "time_lookup_against_int_mm", lambda top: pytest.fail("measured again"))
        assert gemm.lookup_beats_int_mm(3) == "avx2"  # read back from the file
        kept = json.loads((tmp_path / "kernels" / "gemm_choices.json").read_text())
        assert sorted(v["path"] for v in kept.values()) == ["avx2", "int_mm"]
        assert all(gemm.cpu_model() in key for key in kept)
    finally:
        gemm.lookup_beats_int_mm.cache_clear()


@pytest.mark.skipif("avx2" not in PATHS, reason="robuq's C kernels are not built for AVX2 here")
def test_auto_resolves_each_layer_by_its_kind(monkeypatch):
    """A ternary layer at 3 bits may take the lookup while an int4 one keeps int_mm: auto is asked per layer."""
    monkeypatch.setattr(gemm, "auto_path", lambda lookup_top=None: "avx2" if lookup_top == 7 else "int_mm")
    torch.manual_seed(0)
    ternary = QuantLinear.from_linear(torch.nn.Linear(40, 72), LinearQuantConfig(act_bits=3)).eval()
    int4 = QuantLinear.from_linear(torch.nn.Linear(40, 72), LinearQuantConfig(act_bits=4, weight="int4")).eval()
    assert IntegerLinear(ternary).gemm == "avx2" and IntegerLinear(int4).gemm == "int_mm"
    assert gemm.requested("auto") == "auto" and gemm.requested("fp32") == "fp32"
    monkeypatch.setenv("ROBUQ_GEMM", "int_mm")
    assert gemm.requested(None) == "int_mm" and IntegerLinear(ternary, gemm=None).gemm == "int_mm"


def test_the_running_cpu_does_not_take_int_mm_below_vnni():
    capability = gemm.cpu_capability()
    if not capability.vnni:
        assert gemm.auto_path() != "int_mm", capability


CHOICE = (
    "from robuq.deploy import gemm; import json; print(json.dumps([gemm.auto_path(), gemm.cpu_capability().to_dict()]))"
)


def test_pytorch_held_to_avx2_is_below_vnni_and_never_takes_int_mm():
    """This CPU may have VNNI; with PyTorch and oneDNN held to AVX2 it is an AVX2-only CPU to them."""
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(robuq.__file__)), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = subprocess.run([sys.executable, "-c", CHOICE], env=env, capture_output=True, text=True, check=True)
    path, capability = json.loads(out.stdout.strip().splitlines()[-1])
    assert capability["torch_capability"] == "AVX2"
    assert not set(capability["isa"]) & {"avx512_vnni", "avx_vnni", "amx_int8"}
    assert path in ("avx2", "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("march, isa", [("haswell", "avx2"), ("x86-64", "plain")])
def test_an_avx2_or_plain_build_gives_the_same_attention_and_gemm(monkeypatch, tmp_path, march, isa):
    """Built for AVX2 alone (ROBUQ_MARCH=haswell: 8-lane tiles, vpmaddwd dot products) or for no SIMD
    extension: the attention equals the native build's up to the order of its float sums, and the GEMM,
    for 8-bit and low-bit activations, is exact."""
    qkv = torch.randn(2, 37, 3, 3, 20).permute(2, 0, 3, 1, 4)
    a = torch.randint(-128, 128, (29, 77), dtype=torch.int8)
    low = torch.randint(0, 8, (29, 76), dtype=torch.int8)
    b = torch.randint(-1, 2, (77, 100), dtype=torch.int8)
    with torch.no_grad():
        fast = native.attention(qkv[0], qkv[1], qkv[2], 8, 8)
    monkeypatch.setenv("ROBUQ_MARCH", march)
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.integer_isa() == isa
        assert native.ternary_columns() == 32  # the wide lookup needs AVX-512 VBMI
        other = native.attention(qkv[0], qkv[1], qkv[2], 8, 8)
        product = gemm.matmul("avx2", a, b, b.sum(dim=0, dtype=torch.int32), 1)
        low_product = gemm.matmul("avx2", low, b[:76], b[:76].sum(dim=0, dtype=torch.int32), 1, act_shift=0, act_top=7)
    finally:
        native._library.cache_clear()
    assert torch.allclose(other, fast, rtol=1e-5, atol=1e-6)
    assert torch.equal(product, (a.double() @ b.double()).to(torch.int32))
    assert torch.equal(low_product, (low.double() @ b[:76].double()).to(torch.int32))


@pytest.mark.skipif("avx2" not in PATHS, reason="robuq's C kernels are not built for AVX2 here")
def test_the_avx2_path_keeps_one_int8_copy_of_the_weights_and_state_dicts_keep_their_layout():
    """Packed for the kernel, the levels are not also kept as (in, out): the memory of one int8 copy.
    State dicts still carry weight_levels_t, so they move between paths."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(40, 72), LinearQuantConfig(act_bits=3, lowrank_rank=4)).eval()
    packed, plain = IntegerLinear(layer, gemm="avx2"), IntegerLinear(layer, gemm="fp32")
    int8_bytes = lambda m: sum(b.numel() for b in m.buffers() if b.dtype == torch.int8)  # noqa: E731
    # ternary weights at 3 bits: AVX2's slots and signs, two bytes per three weights (padded), or the wide
    # layout's pattern numbers, one byte per three
    wide = native.ternary_columns() == 64
    assert packed._avx2_weight.shape == ((2, 14, 64) if wide else (3, 14, 2, 32))
    assert packed.weight_levels_t is None and int8_bytes(packed) <= int8_bytes(plain) == 40 * 72
    assert torch.equal(packed.levels_t(), plain.weight_levels_t)
    assert torch.equal(packed.state_dict()["weight_levels_t"], plain.weight_levels_t)
    x = torch.randn(6, 40)
    with torch.no_grad():
        expected = plain(x)
        other = QuantLinear.from_linear(torch.nn.Linear(40, 72), LinearQuantConfig(act_bits=3, lowrank_rank=4)).eval()
        into_avx2, into_fp32 = IntegerLinear(other, gemm="avx2"), IntegerLinear(other, gemm="fp32")
        into_avx2.load_state_dict(plain.state_dict())
        into_fp32.load_state_dict(packed.state_dict())
        assert torch.allclose(into_avx2(x), expected, rtol=1e-5, atol=1e-5) and torch.equal(into_fp32(x), expected)


@pytest.mark.skipif("avx2" not in PATHS, reason="robuq's C kernels are not built for AVX2 here")
def test_the_fused_avx2_layer_follows_its_gelu_and_reloaded_weights():
    """A ternary layer at 3 bits runs in one C pass (native.linear_ternary) with its arguments converted once;
    turning the GELU on or loading other weights must not leave it computing with the old ones."""
    torch.manual_seed(0)
    config = LinearQuantConfig(act_bits=3, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=4)
    layer = QuantLinear.from_linear(torch.nn.Linear(40, 72), config).eval()
    fused, reference = IntegerLinear(layer, gemm="avx2"), IntegerLinear(layer, gemm="fp32")
    x = torch.randn(2, 9, 40)
    assert fused.path.name == "c-ternary" and reference.path.name == "c"
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    with torch.no_grad():
        assert close(fused(x), reference(x))
        fused.gelu = reference.gelu = True
        assert close(fused(x), reference(x)) and (reference(x) != IntegerLinear(layer, gemm="fp32")(x)).any()
        other = QuantLinear.from_linear(torch.nn.Linear(40, 72), config).eval()
        state = IntegerLinear(other, gemm="fp32").state_dict()
        fused.load_state_dict(state)
        reference.load_state_dict(state)
        assert close(fused(x), reference(x))
