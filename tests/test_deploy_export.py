import os

import pytest
import torch
from safetensors.torch import save_file

import robuq
from robuq.deploy.export import export_model, file_report, load_exported
from robuq.deploy.integer_linear import IntegerLinear
from robuq.quant.linear import QuantLinear

from conftest import tiny_config


@pytest.fixture
def quantized(tiny_dit):
    with torch.no_grad():
        for p in tiny_dit.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    config = robuq.preset("robuq", act_bits=3, hadamard_signs=True)
    return robuq.quantize_(tiny_dit, config, plan={"blocks.0.mlp.fc2": 8, "blocks.1.attn.qkv": 1}).eval(), config


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([2, 400, 990]), torch.tensor([1, 5, 10])


@pytest.mark.parametrize("packing", ["ternary-2bit", "ternary-trits"])
def test_float_reload_is_bit_exact(tmp_path, quantized, packing):
    model, config = quantized
    path = export_model(model, config, tmp_path / "m.safetensors", packing, dtype="fp32")
    reloaded = load_exported(path, integer=False)
    with torch.no_grad():
        assert torch.equal(reloaded(*_inputs()), model(*_inputs()))


def test_integer_layers_match_fake_quant_layers_on_real_inputs(tmp_path, quantized):
    model, config = quantized
    integer_model = load_exported(export_model(model, config, tmp_path / "m.safetensors", dtype="fp32"))
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0]))
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    ]
    with torch.no_grad():
        model(*_inputs())
    for h in hooks:
        h.remove()
    integer_layers = {n: m for n, m in integer_model.named_modules() if isinstance(m, IntegerLinear)}
    assert set(integer_layers) == set(inputs)  # every block linear and adaLN linear runs on integers
    for name, x in inputs.items():
        with torch.no_grad():
            expected, got = model.get_submodule(name)(x), integer_layers[name](x)
        if integer_layers[name].gelu:  # an Mlp's fc1 runs its GELU in its own epilogue
            expected = torch.nn.functional.gelu(expected, approximate="tanh")
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), name
    with torch.no_grad():  # end to end, rounding differences may flip a few low-bit levels downstream
        a, b = model(*_inputs()), integer_model(*_inputs())
    assert ((a - b).norm() / a.norm()) < 0.05


def test_an_exported_model_runs_the_model_code_with_kernels_in_its_seams(tmp_path, quantized, monkeypatch):
    from robuq.deploy.elementwise import NativeGatedResidual, NativeModulatedLayerNorm
    from robuq.models.dit import DiTBlock, FinalLayer

    model, config = quantized
    exported = load_exported(export_model(model, config, tmp_path / "m.safetensors", dtype="fp32"))
    assert all(type(b) is DiTBlock for b in exported.blocks) and type(exported.final_layer) is FinalLayer
    assert all(
        isinstance(b.norm1, NativeModulatedLayerNorm) and isinstance(b.residual, NativeGatedResidual)
        for b in exported.blocks
    )
    # An edit to the model's forward reaches the exported model: it has no copy of its own.
    ran = []
    original = DiTBlock.forward
    monkeypatch.setattr(DiTBlock, "forward", lambda self, x, c: ran.append(self) or original(self, x, c))
    with torch.no_grad():
        exported(*_inputs())
    assert ran == list(exported.blocks)


def test_exported_blocks_give_the_same_bits_at_any_thread_count(tmp_path, quantized):
    """robuq's kernels split rows between threads, never a row's sums, so the thread count cannot change a bit
    of a block's output (PyTorch's own embedders and final layer may differ in the last place)."""
    model, config = quantized
    exported = load_exported(export_model(model, config, tmp_path / "m.safetensors", dtype="fp32"))
    calls = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: calls.setdefault(n, (mod, args)) and None)
        for n, m in exported.named_modules()
        if n.startswith("blocks.")
    ]
    with torch.no_grad():
        exported(*_inputs())
    for h in hooks:
        h.remove()
    assert {"blocks.0", "blocks.1.attn.core", "blocks.1.mlp.fc2"} <= set(calls)
    threads = torch.get_num_threads()
    try:
        for name, (module, args) in calls.items():
            outputs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                with torch.no_grad():
                    outputs.append(module(*args))
            assert all(torch.equal(outputs[0], o) for o in outputs[1:]), name
    finally:
        torch.set_num_threads(threads)


def test_fp16_file_is_smaller_and_close(tmp_path, quantized):
    model, config = quantized
    full = export_model(model, config, tmp_path / "fp32.safetensors", dtype="fp32")
    half = export_model(model, config, tmp_path / "fp16.safetensors", "ternary-trits", dtype="fp16")
    assert half.stat().st_size < full.stat().st_size
    with torch.no_grad():
        a, b = model(*_inputs()), load_exported(half, integer=False)(*_inputs())
    # fp16 scales and embedders move some activations across low-bit (here 1-bit) thresholds.
    assert ((a - b).norm() / a.norm()) < 0.1


def test_damaged_files_fail_clearly(tmp_path, quantized):
    model, config = quantized
    path = export_model(model, config, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_exported(tmp_path / "cut.safetensors")
    plain = robuq.core.files.save_tensors(tmp_path / "plain.safetensors", robuq.DiT(tiny_config()).state_dict(), {})
    with pytest.raises(robuq.CheckpointError, match="not a usable robuq export"):
        load_exported(plain)
    tensors, meta = robuq.core.files.load_tensors(path)
    tensors["blocks.0.mlp.fc1.weight_packed"] = tensors["blocks.0.mlp.fc1.weight_packed"][:-3]
    robuq.core.files.save_tensors(tmp_path / "short.safetensors", tensors, meta)
    with pytest.raises(robuq.CheckpointError, match="packed bytes"):
        load_exported(tmp_path / "short.safetensors")


def _safetensors_data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: the file less its 8-byte length prefix and JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header


def test_report_matches_the_files_and_the_layer_shapes(tmp_path, quantized):
    model, config = quantized
    path = export_model(model, config, tmp_path / "m.safetensors", "ternary-trits")
    report = file_report(path)
    # The fp32 and fp16 checkpoints the ratios refer to, written for real.
    plain = robuq.DiT(model.config).state_dict()
    save_file({k: v.contiguous() for k, v in plain.items()}, tmp_path / "fp32.safetensors")
    save_file({k: v.half().contiguous() for k, v in plain.items()}, tmp_path / "fp16.safetensors")
    assert report["fp32_bytes"] == _safetensors_data_bytes(tmp_path / "fp32.safetensors")
    assert report["fp16_bytes"] == _safetensors_data_bytes(tmp_path / "fp16.safetensors")
    assert report["ratio_fp32"] == pytest.approx(report["fp32_bytes"] / path.stat().st_size)
    assert report["file_bytes"] == path.stat().st_size
    assert sum(report["groups"].values()) == _safetensors_data_bytes(path)
    # Per block of the tiny DiT (width 48, MLP 192): ternary qkv 48→144, proj 48→48, fc1 48→192, fc2 192→48 at five
    # trits a byte, adaLN 48→288 at two int4 levels a byte; rank-16 branches and one scale per output, in fp16.
    ternary = (48 * 144, 48 * 48, 48 * 192, 192 * 48)
    assert report["groups"]["packed weights"] == 2 * (sum(-(-n // 5) for n in ternary) + 48 * 288 // 2)
    assert report["groups"]["low-rank branches"] == 2 * 2 * 16 * (144 + 48 + 48 + 48 + 192 + 48 + 48 + 192)
    assert report["groups"]["scales"] == 2 * 2 * (144 + 48 + 192 + 48 + 288)


def test_cost_summary_of_an_exported_model_matches_its_training_model(tmp_path, quantized):
    from robuq.precision.cost import cost_summary

    model, config = quantized
    path = export_model(model, config, tmp_path / "m.safetensors")
    a = cost_summary(model)
    for integer in (True, False):
        b = cost_summary(load_exported(path, integer=integer))
        assert b.bops == pytest.approx(a.bops) and b.macs == a.macs
        weights = {
            m.name: m.weight
            for m in b.modules
            if m.name.startswith("blocks.") and m.name.endswith(("qkv", "proj", "fc1", "fc2"))
        }
        assert weights and set(weights.values()) == {"ternary"}, weights
    assert cost_summary(load_exported(path, integer=False)).weight_storage_bits == pytest.approx(a.weight_storage_bits)


def test_a_plan_updates_the_layer_configs_it_changes(quantized):
    model, _ = quantized
    layer = model.get_submodule("blocks.1.attn.qkv")
    assert layer.act_bits == layer.config.act_bits == 1
    robuq.precision.apply_plan(model, {"blocks.1.attn.qkv": 3})
    assert layer.act_bits == layer.config.act_bits == 3


def test_layers_with_full_precision_inputs_stay_float_in_an_integer_model(tmp_path, tiny_dit):
    config = robuq.preset("robuq", act_bits=3)
    model = robuq.quantize_(tiny_dit, config, plan={"blocks.0.mlp.fc1": None}).eval()
    path = export_model(model, config, tmp_path / "m.safetensors", dtype="fp32")
    integer_model = load_exported(path)
    assert isinstance(integer_model.get_submodule("blocks.0.mlp.fc1"), QuantLinear)
    assert isinstance(integer_model.get_submodule("blocks.0.mlp.fc2"), IntegerLinear)
    assert not any(t.is_meta for t in [*integer_model.parameters(), *integer_model.buffers()])
    with torch.no_grad():
        a, b = load_exported(path, integer=False)(*_inputs()), integer_model(*_inputs())
    assert ((a - b).norm() / a.norm()) < 0.05


def test_retain_freed_memory_is_taken_by_glibc():
    import platform
    import subprocess
    import sys

    # In a child process: the setting lasts for the life of the process that takes it.
    code = "from robuq.deploy.allocator import retain_freed_memory; print(retain_freed_memory())"
    taken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert taken in ("True", "False")
    if platform.libc_ver()[0] == "glibc":
        assert taken == "True"


def test_load_exported_changes_the_allocator_only_when_asked(tmp_path, quantized, monkeypatch):
    import robuq.deploy.export as export

    calls = []
    monkeypatch.setattr(export, "retain_freed_memory", lambda: calls.append(1))
    path = export_model(*quantized, tmp_path / "m.safetensors")
    load_exported(path)
    robuq.load_any(path)
    assert calls == []
    load_exported(path, retain_memory=True)
    assert calls == [1]
