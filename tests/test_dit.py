import pytest
import torch

from robuq.models.dit import DIT_MODELS, DIT_SIZES, DiT, count_parameters, create_dit, dit_config, forward_macs
from robuq.models.summary import model_table

from conftest import tiny_config


def expected_params(depth, hidden, patch, in_ch=4, classes=1000, learn_sigma=True, input_size=32, mlp_ratio=4):
    """Parameter count written out from the reference architecture, independently of the model code."""
    tokens = (input_size // patch) ** 2
    mlp = hidden * mlp_ratio
    block = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden)
    block += (hidden * mlp + mlp) + (mlp * hidden + hidden) + (hidden * 6 * hidden + 6 * hidden)
    out = in_ch * (2 if learn_sigma else 1)
    total = tokens * hidden  # pos_embed
    total += in_ch * patch * patch * hidden + hidden  # x_embedder
    total += (256 * hidden + hidden) + (hidden * hidden + hidden)  # t_embedder
    total += (classes + 1) * hidden  # y_embedder with the null class
    total += depth * block
    total += (hidden * patch * patch * out + patch * patch * out) + (hidden * 2 * hidden + 2 * hidden)
    return total


def test_dit_xl2_parameter_count_matches_reference():
    with torch.device("meta"):
        model = create_dit("DiT-XL/2", input_size=32, num_classes=1000, learn_sigma=True)
    assert count_parameters(model) == 675_129_632


@pytest.mark.parametrize("name", DIT_MODELS)
def test_every_config_parameter_count(name):
    config = dit_config(name)
    with torch.device("meta"):
        model = DiT(config)
    assert count_parameters(model) == expected_params(config.depth, config.hidden_size, config.patch_size)


@pytest.mark.parametrize(
    "name,gflops", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.71), ("DiT-XL/2", 118.64)]
)
def test_gflops_match_dit_paper(name, gflops):
    assert forward_macs(dit_config(name)) / 1e9 == pytest.approx(gflops, rel=0.005)


def test_reference_state_dict_keys_dit_s2():
    model = create_dit("DiT-S/2")
    keys = set(model.state_dict())
    expected = {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    for i in range(12):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    assert keys == expected
    assert model.state_dict()["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    assert model.state_dict()["y_embedder.embedding_table.weight"].shape == (1001, 384)


def test_forward_shapes_conditional_and_unconditional(tiny_dit):
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3])
    assert tiny_dit(x, t, y).shape == (3, 2, 8, 8)
    uncond = DiT(tiny_config(num_classes=0, learn_sigma=False))
    assert uncond.y_embedder is None
    assert uncond(x, t).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_dit(x, t)


def test_zero_init_output_and_fixed_pos_embed():
    model = DiT(tiny_config())
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0  # adaLN-Zero and a zero final layer
    assert not model.pos_embed.requires_grad
    assert model.pos_embed.abs().max() <= 1.0 and model.pos_embed.std() > 0.1


def test_cfg_scale_one_equals_conditional(tiny_dit):
    tiny_dit.eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 5]), torch.tensor([4, 7])
    null = torch.full_like(y, 10)
    guided = tiny_dit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.0)[:2]
    assert torch.allclose(guided, tiny_dit(x, t, y), atol=1e-6)
    strong = tiny_dit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0)[:2]
    cond, uncond = tiny_dit(x, t, y)[:, :1], tiny_dit(x, t, null)[:, :1]
    assert torch.allclose(strong[:, :1], uncond + 4.0 * (cond - uncond), atol=1e-5)


def test_label_dropout_only_in_training(tiny_dit):
    labels = torch.arange(10).repeat(50)
    emb = tiny_dit.y_embedder
    torch.manual_seed(0)
    dropped = emb.token_drop(labels)
    assert 0.03 < (dropped == 10).float().mean() < 0.2
    assert torch.equal(emb(labels, train=False), emb.embedding_table(labels))


def test_unknown_model_name_is_explained():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        create_dit("DiT-XXL/2")


def test_model_table_lists_every_config():
    rows = model_table(input_size=32)
    assert [r["name"] for r in rows] == list(DIT_MODELS)
    xl2 = next(r for r in rows if r["name"] == "DiT-XL/2")
    assert xl2["params"] == 675_129_632 and xl2["tokens"] == 256
    assert set(DIT_SIZES) >= {"S", "B", "L", "XL", "T"}


def test_meta_skeleton_builds_shapes_without_initialising_only_on_its_thread():
    import threading

    from robuq.models.skeleton import meta_skeleton

    outside = {}

    def build_elsewhere():
        outside["layer"] = torch.nn.Linear(300, 300)  # real weights, initialised, while the skeleton is open

    with pytest.raises(RuntimeError, match="boom"):
        with meta_skeleton():
            with meta_skeleton():  # nests
                layer = torch.nn.Embedding(10, 4)
            assert layer.weight.is_meta
            worker = threading.Thread(target=build_elsewhere)
            worker.start()
            worker.join()
            raise RuntimeError("boom")
    assert outside["layer"].weight.abs().sum() > 0 and not outside["layer"].weight.is_meta
    x = torch.zeros(1000)  # after the skeleton (left through an exception) initialisers work again
    torch.nn.init.normal_(x)
    assert x.std() > 0.5


def test_meta_skeleton_leaves_torch_nn_init_as_it_found_it_and_skips_the_costly_import():
    import subprocess
    import sys

    from robuq.models.skeleton import meta_skeleton

    before = {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)}
    with meta_skeleton():
        model = DiT(tiny_config())
    assert all(p.is_meta for p in model.parameters())
    assert {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)} == before
    # In a fresh process: building a skeleton must not pull in torch._dynamo through the meta initialisers.
    code = (
        "import sys, torch\nfrom robuq.models.skeleton import meta_skeleton\nfrom robuq.models.dit import DiT, DiTConfig\n"
        "loaded = 'torch._dynamo' in sys.modules\n"
        "with meta_skeleton():\n    DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=2, num_heads=2))\n"
        "print(loaded, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == out[0], f"torch._dynamo loaded by the skeleton: {out}"
