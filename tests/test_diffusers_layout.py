"""quantize_ finds the layout by structure, refuses a policy that matches nothing, and quantizes the
attention matmuls of diffusers models by routing their attention to robuq's core."""

import pytest
import torch

from conftest import run_diffusers, tiny_config, tiny_diffusers_dit
from robuq.models.convert_diffusers import dit_to_diffusers
from robuq.models.attention_routing import route_attention
from robuq.models.dit import AttentionCore
from robuq.models.dit import DiT
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import QuantLinear
from robuq.precision import LAYOUTS, QuantConfig, preset, quantize_
from robuq.precision.policy import detect_layout

pytest.importorskip("diffusers")


def test_layout_is_detected_by_structure():
    assert detect_layout(DiT(tiny_config())) == "dit"
    assert detect_layout(tiny_diffusers_dit()) == "diffusers"
    assert detect_layout(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


def test_default_preset_quantizes_either_layout():
    for model, layout in ((DiT(tiny_config()), "dit"), (tiny_diffusers_dit(), "diffusers")):
        quantize_(model, preset("robuq"))
        swapped = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        assert len(swapped) == 2 * (7 if layout == "diffusers" else 5)  # q, k, v split in diffusers
        cores = [n for n, m in model.named_modules() if isinstance(m, QuantAttentionCore)]
        assert len(cores) == 2 and all(c.startswith(LAYOUTS[layout]["attention"][0].split("*")[0]) for c in cores)


@pytest.mark.parametrize("layout, model", [("dit", tiny_diffusers_dit), ("diffusers", lambda: DiT(tiny_config()))])
def test_a_layout_the_model_does_not_have_is_an_error(layout, model):
    model = model()
    with pytest.raises(ValueError, match=f"layout {layout!r}.*{type(model).__name__}|{type(model).__name__}.*layout"):
        quantize_(model, preset("baseline", layout=layout))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    foreign = QuantConfig(
        name="foreign", rules=preset("baseline", layout=layout).rules
    )  # layout 'auto', rules of the other
    with pytest.raises(ValueError, match=f"matches no linear layer of {type(model).__name__}"):
        quantize_(model, foreign)


def test_routed_attention_in_full_precision_is_diffusers_attention():
    model = tiny_diffusers_dit()
    with torch.no_grad():
        reference = run_diffusers(model)
        for block in model.transformer_blocks:
            route_attention(block.attn1, AttentionCore())
        torch.testing.assert_close(run_diffusers(model), reference, rtol=1e-5, atol=1e-6)


def test_routing_ends_with_the_forward_even_when_it_raises():
    model = tiny_diffusers_dit()
    attn = model.transformer_blocks[0].attn1
    route_attention(attn, QuantAttentionCore(8))
    with pytest.raises(RuntimeError):
        attn(torch.randn(1, 4, 7))  # wrong width
    q = torch.randn(1, 1, 4, 8)
    # Outside the attention, SDPA is PyTorch's again.
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q), AttentionCore()(q, q, q))


def test_8bit_attention_matches_robuq_dit_attention():
    """Same weights, only the attention matmuls quantized: both layouts compute the same numbers."""
    torch.manual_seed(0)
    dit = DiT(tiny_config(in_channels=4)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn_like(p))
    transformer = dit_to_diffusers(dit).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([2, 7])
    with torch.no_grad():
        fp = transformer(x, timestep=t, class_labels=y).sample
    attention_only = preset("robuq")
    attention_only.rules = []
    quantize_(dit, attention_only)
    quantize_(transformer, attention_only)
    with torch.no_grad():
        out = transformer(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(out, dit(x, t, y), rtol=1e-4, atol=1e-5)
    assert not torch.equal(out, fp) and (out - fp).norm() < 0.05 * fp.norm()  # 8-bit: changed, not broken
