"""A NaN or an infinity reaching a kernel is never hidden: the rows PyTorch's fake-quantized path makes NaN
come out NaN, and every other row is what it is without the bad value. Checked on each kernel the
back-end registry lists and on each C entry point an exported model runs."""

import pytest
import torch

from robuq.kernels import native
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.backends import backends
from robuq.quant.hadamard import random_signs

pytestmark = pytest.mark.skipif(not native.enabled(), reason="the C kernels need a compiler")
BAD = [float("nan"), float("inf"), float("-inf")]


def _rows_ok(clean: torch.Tensor, damaged: torch.Tensor, bad_rows: torch.Tensor) -> None:
    """Rows in ``bad_rows`` entirely non-finite; the other rows bit for bit the clean run's."""
    bad_rows = bad_rows.reshape(-1)
    flat_clean, flat = clean.reshape(len(bad_rows), -1), damaged.reshape(len(bad_rows), -1)
    assert (~torch.isfinite(flat[bad_rows])).all(), "a row with a NaN or infinity came out (partly) finite"
    assert torch.equal(flat[~bad_rows], flat_clean[~bad_rows]), "a bad value changed other rows"


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("rule", ["minmax", "gaussian"])
@pytest.mark.parametrize("rotate", [True, False])
def test_quantization_gives_a_bad_row_a_nan_scale_and_leaves_the_others(value, rule, rotate):
    torch.manual_seed(0)
    x = torch.randn(19, 96)
    signs = random_signs(96, 1)
    ratio = torch.tensor(0.9)
    clean = native.hadamard_quantize(x, signs, rotate, 3, rule, ratio, True)
    x[5, 7] = value
    x[12, 0] = value  # the first entry of a row: the statistics start from it
    damaged = native.hadamard_quantize(x, signs, rotate, 3, rule, ratio, True)
    bad = torch.zeros(19, dtype=torch.bool)
    bad[[5, 12]] = True
    _rows_ok(clean[2].unsqueeze(1), damaged[2].unsqueeze(1), bad)  # the scale
    assert torch.equal(damaged[1][~bad], clean[1][~bad])  # the levels of the other rows


@pytest.mark.parametrize("value", BAD)
def test_the_fused_ternary_linear_leaves_a_bad_row_non_finite(value):
    torch.manual_seed(1)
    rows, k, n = 37, 96, 40
    x = torch.randn(rows, k)
    weights = torch.randint(-1, 2, (k, n), dtype=torch.int8)
    code, sums = native.pack_ternary_weights(weights), weights.sum(dim=0, dtype=torch.int32)
    layer = native.ternary_linear_args(
        k,
        n,
        random_signs(k, 2),
        True,
        3,
        "gaussian",
        torch.tensor(0.9),
        torch.randn(4, k),
        code,
        sums,
        torch.rand(n),
        torch.randn(n),
        torch.randn(n),
        torch.randn(4, n),
        True,
    )
    clean = native.linear_ternary(x, layer, torch.empty(rows, n))
    x[9, 50] = value
    bad = torch.zeros(rows, dtype=torch.bool)
    bad[9] = True
    _rows_ok(clean, native.linear_ternary(x, layer, torch.empty(rows, n)), bad)


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_integer_attention_is_non_finite_where_the_fake_quantized_core_is(value, where):
    torch.manual_seed(2)
    core = QuantAttentionCore(bits=8, probs_bits=8)
    q, k, v = (torch.randn(2, 3, 24, 16) for _ in range(3))
    with torch.no_grad():
        clean = core(q, k, v)
        {"query": q, "key": k, "value": v}[where][1, 2, 5, 3] = value
        fast = core(q, k, v)
        with native.use(False):
            reference = core(q, k, v)
    expected_bad = ~torch.isfinite(reference)
    assert expected_bad.any()
    # The same outputs non-finite as PyTorch's path (a bad query spoils its row, a key every row of its head, a
    # value its channel in every row); every other output as without the bad value.
    assert torch.equal(~torch.isfinite(fast), expected_bad)
    assert torch.equal(fast[~expected_bad], clean[~expected_bad])


@pytest.mark.parametrize("backend", [b for op in ("hadamard", "attention") for b in backends(op)], ids=lambda b: b.name)
def test_every_registered_backend_keeps_non_finite_rows_non_finite(backend):
    torch.manual_seed(3)
    if backend.run is native.attention:
        q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
        q[0, 1, 4, 2] = float("nan")
        tensors, options = (q, k, v), (8, 8)
    else:
        x = torch.randn(6, 32)
        x[2, 5] = float("nan")
        tensors, options = (x,), (random_signs(32, 0), False)
    if not backend.accepts(*tensors):
        pytest.skip(f"{backend.name} takes no CPU tensors here")
    out = backend.run(*tensors, *options)
    bad_rows = torch.zeros(out.shape[:-1], dtype=torch.bool)
    bad_rows[(0, 1, 4) if out.dim() == 4 else (2,)] = True
    assert (~torch.isfinite(out[bad_rows])).all() and torch.isfinite(out[~bad_rows]).all()


def test_an_exported_model_gives_a_nan_only_to_the_sample_with_a_nan(tmp_path):
    from conftest import perturbed, tiny_config

    from robuq.deploy.export import export_model, load_exported
    from robuq.models.dit import DiT
    from robuq.precision import preset, quantize_

    torch.manual_seed(4)
    policy = preset("robuq", 4)
    model = perturbed(quantize_(DiT(tiny_config()), policy), 0.05)
    exported = load_exported(export_model(model, policy, tmp_path / "m.robuq.safetensors"))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        clean = exported(x, t, y)
        x[1, 0, 3, 3] = float("nan")
        damaged = exported(x, t, y)
    assert torch.isnan(damaged[1]).any()
    assert torch.equal(damaged[[0, 2]], clean[[0, 2]])
