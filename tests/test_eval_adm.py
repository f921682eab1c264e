"""Known answers for the ADM protocol: TF1 resize, Fréchet distance, IS splits, the sFID tap, reference batches."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from robuq.cli import main
from robuq.data.image_folder import adm_center_crop
from robuq.eval.adm import adm_activations, adm_inputs, reference_statistics
from robuq.eval.evaluate import EvalConfig, evaluate
from robuq.eval.inception import FIDInceptionV3
from robuq.eval.metrics import StatsAccumulator, frechet_distance, inception_score, inception_score_consecutive
from robuq.eval.tf_resize import resize_bilinear_tf1


def test_tf1_resize_by_hand():
    # TF1 (align_corners=False): output i reads input i·in/out, no half-pixel offset; the upper tap is clamped.
    # 2 → 3: x = 0, 2/3, 4/3 → [a, a + (b − a)·2/3, b]; rows alike.
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    expected = torch.tensor([[0.0, 20 / 3, 10.0], [40 / 3, 20.0, 70 / 3], [20.0, 80 / 3, 30.0]])
    torch.testing.assert_close(resize_bilinear_tf1(x, (3, 3))[0, 0], expected)
    # 4 → 2 reads input pixels 0 and 2 exactly (PyTorch's half-pixel bilinear would average 0,1 and 2,3).
    row = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 1, 1, 4)
    assert resize_bilinear_tf1(row, (1, 2)).flatten().tolist() == [1.0, 4.0]
    # 3 → 5: x = 0, 0.6, 1.2, 1.8, 2.4 (float32) → 0, 6, 12, 18, 20 (the last clamps to the edge).
    line = torch.tensor([0.0, 10.0, 20.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(resize_bilinear_tf1(line, (1, 5)).flatten(), torch.tensor([0.0, 6.0, 12.0, 18.0, 20.0]))


def _tf1_loop(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1's resize_bilinear written pixel by pixel in float32, from the kernel's description."""
    h, w = image.shape
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    out = np.empty((out_h, out_w), np.float32)
    for i in range(out_h):
        y = np.float32(i) * sy
        y0, y1, dy = int(np.floor(y)), min(int(np.ceil(y)), h - 1), y - np.floor(y)
        for j in range(out_w):
            x = np.float32(j) * sx
            x0, x1, dx = int(np.floor(x)), min(int(np.ceil(x)), w - 1), x - np.floor(x)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


def test_tf1_resize_matches_a_pixel_loop_on_a_real_size():
    image = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.float32)
    ours = resize_bilinear_tf1(torch.from_numpy(image)[None, None], (61, 45))[0, 0].numpy()
    np.testing.assert_allclose(ours, _tf1_loop(image, 61, 45), rtol=0, atol=1e-4)


def test_adm_inputs_scale_and_grey():
    images = np.array([[[[0], [255]]]], dtype=np.uint8)  # 1×1×2×1, grey
    x = adm_inputs(images)
    assert x.shape == (1, 3, 299, 299)
    assert x.min().item() == -1.0 and x.max().item() == 127 / 128  # (x − 128)/128, not x/127.5 − 1


def test_frechet_distance_against_an_eigenvalue_formula():
    # Tr((Σ₁Σ₂)^½) = Σ √λ(Σ₁^½ Σ₂ Σ₁^½): eigenvalues of a symmetric matrix instead of sqrtm of a product.
    rng = np.random.default_rng(3)
    a = rng.normal(size=(400, 10))
    b = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10)) * 0.4 + 0.2
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    w, v = linalg.eigh(s1)
    root = (v * np.sqrt(w)) @ v.T
    trace_sqrt = np.sqrt(np.clip(linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_streaming_statistics_equal_numpy():
    x = np.random.default_rng(4).normal(5.0, 2.0, size=(301, 7)).astype(np.float32)
    acc = StatsAccumulator()
    for start in range(0, len(x), 64):
        acc.add(x[start : start + 64])
    stats = acc.result()
    np.testing.assert_allclose(stats.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_inception_score_uses_consecutive_splits_of_5000():
    # 5,000 confident samples spread over 10 classes (IS 10), then 5,000 of one class (IS 1), then 2,000 of
    # two classes (IS 2): ADM's consecutive splits score each block on its own.
    classes = np.concatenate([np.arange(5000) % 10, np.zeros(5000, int), np.arange(2000) % 2])
    logits = np.zeros((len(classes), 1008))
    logits[np.arange(len(classes)), classes] = 60.0  # softmax ≈ one-hot (other classes ~1e-26)
    mean, std = inception_score_consecutive(logits)
    assert mean == pytest.approx((10 + 1 + 2) / 3, rel=1e-6) and std == pytest.approx(np.std([10, 1, 2]), rel=1e-6)
    # The shuffled 10 splits of the pytorch-fid protocol mix the blocks and score something else.
    assert inception_score(np.eye(1008)[classes])[0] != pytest.approx(mean, rel=0.05)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    with torch.no_grad():
        model.fc.bias.normal_(0, 1.0)  # a visible bias, which ADM's logits must leave out
    path = tmp_path_factory.mktemp("adm") / "pt_inception.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


def test_sfid_tap_is_mixed_6d_branch1x1_after_relu_nhwc(weights):
    from robuq.eval.inception_weights import load_fid_inception

    model = load_fid_inception(weights)
    seen = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("unit", o))
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        f = model.adm_features(x)
    unit = seen["unit"]  # BasicConv2d's output: conv → BN → ReLU, (N, 192, 17, 17)
    assert unit.shape == (2, 192, 17, 17) and f["spatial"].shape == (2, 17 * 17 * 7)
    c, h, w = 5, 3, 11  # NHWC flattening: index (h·17 + w)·7 + c
    assert f["spatial"][1, (h * 17 + w) * 7 + c] == unit[1, c, h, w]
    torch.testing.assert_close(f["spatial"], unit[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert (f["spatial"] >= 0).all()  # after the ReLU
    torch.testing.assert_close(f["logits"], f["pool"] @ model.fc.weight.T)  # no bias


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the pytorch-fid protocol's 10 IS splits of 6 samples
def test_adm_evaluation_reads_the_reference_statistics(tmp_path, weights):
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    reference_images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "plain_ref.npz", arr_0=reference_images)
    config = dict(
        samples=str(tmp_path / "samples.npz"),
        inception_weights=str(weights),
        cache_dir=str(tmp_path / "c"),
        progress=False,
        device="cpu",
    )
    plain = evaluate(EvalConfig(reference=str(tmp_path / "plain_ref.npz"), **config))
    assert plain["protocol"] == "adm" and plain["extractor"].startswith("inception-adm-")
    assert plain["fid"] > 0 and plain["reference_statistics"] == "from 6 reference images"
    # A reference batch that stores statistics other than its images' (the samples' own, shifted by 1 per
    # feature): FID and sFID are computed against those.
    from robuq.eval.inception_weights import load_fid_inception

    own = adm_activations(load_fid_inception(weights), samples)
    mu, sigma = own["pool"].astype(np.float64).mean(0), np.cov(own["pool"].astype(np.float64), rowvar=False)
    mu_s, sigma_s = own["spatial"].astype(np.float64).mean(0), np.cov(own["spatial"].astype(np.float64), rowvar=False)
    np.savez(tmp_path / "adm_ref.npz", arr_0=reference_images, mu=mu + 1, sigma=sigma, mu_s=mu_s + 1, sigma_s=sigma_s)
    stored = evaluate(EvalConfig(reference=str(tmp_path / "adm_ref.npz"), **config))
    assert stored["reference_statistics"] == "stored in the reference file"
    assert stored["fid"] == pytest.approx(frechet_distance(mu + 1, sigma, mu, sigma), rel=1e-6)
    assert stored["sfid"] == pytest.approx(frechet_distance(mu_s + 1, sigma_s, mu_s, sigma_s), rel=1e-6)
    assert stored["fid"] != pytest.approx(plain["fid"])
    assert stored["precision"] == plain["precision"]  # precision/recall still use the reference images
    legacy = evaluate(EvalConfig(reference=str(tmp_path / "adm_ref.npz"), protocol="pytorch-fid", **config))
    assert legacy["protocol"] == "pytorch-fid" and legacy["reference_statistics"] == "from 6 reference images"


def test_adm_center_crop():
    image = Image.new("RGB", (100, 50), (10, 20, 30))
    image.putpixel((50, 25), (255, 255, 255))
    crop = adm_center_crop(image, 20)  # box-halve to 50×25, bicubic to 40×20, centre 20×20
    assert crop.shape == (20, 20, 3) and (crop[0, 0] == (10, 20, 30)).all()
    assert np.unravel_index(crop[..., 0].argmax(), crop.shape[:2]) in {(9, 9), (9, 10), (10, 9), (10, 10)}


@pytest.mark.slow
def test_ref_stats_command_writes_an_adm_reference_batch(tmp_path, weights):
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(6)
    for i, size in enumerate([(40, 30), (30, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "ref.npz"
    assert (
        main(
            [
                "eval",
                "ref-stats",
                str(tmp_path / "images"),
                "--out",
                str(out),
                "--image-size",
                "16",
                "--max-images",
                "2",
                "--inception-weights",
                str(weights),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    with np.load(out) as data:
        assert data["arr_0"].shape == (2, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)
    pool, spatial = reference_statistics(out)
    assert pool.mu.dtype == np.float64 and np.isfinite(spatial.sigma).all()
    # The statistics cover all three images, the stored images only the first two.
    from robuq.eval.inception_weights import load_fid_inception

    images = np.stack([adm_center_crop(Image.open(folder / f"{i}.png").convert("RGB"), 16) for i in range(3)])
    np.testing.assert_allclose(
        pool.mu, adm_activations(load_fid_inception(weights), images)["pool"].mean(0), rtol=1e-5, atol=1e-6
    )
    assert main(["eval", "ref-stats", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    json.dumps(pool.mu.tolist()[:1])  # plain floats, as the npz promises
