"""`ddpm eval` and `ddpm train-classifier`: the Fréchet distance, the classifier scores, the
feature extraction, the small CNN classifier, and both subcommands end to end on the CPU with a
tiny TorchScript stand-in for InceptionV3 (nothing is downloaded)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from ddpm.cli import main
from models import read_config
from training.classifier import (
    Classifier,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from training.data import ImageData, load_images
from training.evaluate import (
    classifier_scores,
    features,
    frechet_distance,
    load_feature_network,
)

CPU = torch.device("cpu")

# torch.jit is deprecated upstream, but TorchScript is the feature-network format eval reads.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


# -- helpers -------------------------------------------------------------------------------


class _PoolNet(nn.Module):
    """Stand-in feature network: per-channel mean and std, then the input's C, H, W."""

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        geometry = torch.tensor([float(x.shape[1]), float(x.shape[2]), float(x.shape[3])])
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)),
                          geometry.unsqueeze(0).expand(n, 3)], dim=1)


@pytest.fixture(scope="module")
def feature_net_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    file = tmp_path_factory.mktemp("fid") / "pool.pt"
    torch.jit.save(torch.jit.script(_PoolNet()), str(file))
    return file


def _patterns(per_class: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three clearly different grey textures (vertical stripes, horizontal stripes, a
    checkerboard), 4 pixels a period, with noise: `[N x size x size]` uint8 and labels."""
    rng = np.random.default_rng(seed)
    i = np.arange(size)
    vertical = np.broadcast_to((i // 2) % 2, (size, size))
    horizontal = vertical.T
    checker = ((i[:, None] // 2) + (i[None, :] // 2)) % 2
    base = np.stack([vertical, horizontal, checker]).astype(np.float64) * 180 + 40
    labels = np.repeat(np.arange(3), per_class)
    rng.shuffle(labels)
    images = base[labels] + rng.normal(0, 15, (len(labels), size, size))
    return images.round().clip(0, 255).astype(np.uint8), labels


def _image_data(per_class: int, size: int = 16, seed: int = 0) -> ImageData:
    images, labels = _patterns(per_class, size, seed)
    return ImageData(images=torch.from_numpy(images)[:, None], labels=torch.from_numpy(labels),
                     class_names=("vertical", "horizontal", "checker"), source="patterns")


@pytest.fixture(scope="module")
def trained() -> Classifier:
    return train_classifier(_image_data(100), epochs=3, batch_size=32, seed=0)


def _random_classifier(tmp: Path, channels: int, size: int, num_classes: int) -> Path:
    torch.manual_seed(0)
    file = tmp / f"classifier{channels}x{size}.safetensors"
    save_classifier(Classifier(channels, size, num_classes).eval(), file)
    return file


def _write_npz(file: Path, n: int, size: int, channels: int, labels: bool,
               seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {
        "images": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)}
    if labels:
        arrays["labels"] = rng.integers(0, 10, n)
    np.savez(file, **arrays)
    return file


# -- frechet_distance ----------------------------------------------------------------------


def _diagonal_gaussian(n: int, mu: np.ndarray, sigma: np.ndarray, seed: int) -> np.ndarray:
    """Samples whose *sample* covariance is exactly diag(σ²) and sample mean exactly μ."""
    x = np.random.default_rng(seed).normal(size=(n, len(mu)))
    q, _ = np.linalg.qr(x - x.mean(0))  # orthonormal, zero-mean columns
    return q * math.sqrt(n - 1) * sigma + mu


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    a = np.random.default_rng(0).normal(size=(200, 8)) @ np.random.default_rng(1).normal(
        size=(8, 8))
    assert abs(frechet_distance(a, a.copy())) < 1e-6


def test_frechet_distance_diagonal_closed_form() -> None:
    d = 6
    rng = np.random.default_rng(2)
    a = _diagonal_gaussian(500, rng.normal(size=d), rng.uniform(0.5, 2.0, d), seed=3)
    b = _diagonal_gaussian(400, rng.normal(size=d), rng.uniform(0.5, 2.0, d), seed=4)
    # The sample covariances are diagonal, so the closed form applies to the sample statistics.
    assert np.allclose(np.cov(a, rowvar=False), np.diag(np.var(a, 0, ddof=1)), atol=1e-9)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.sqrt(np.var(a, 0, ddof=1)), np.sqrt(np.var(b, 0, ddof=1))
    expected = float(((mu_a - mu_b) ** 2).sum() + (sa**2 + sb**2 - 2 * sa * sb).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_rotation_invariant() -> None:
    """The same orthogonal map applied to both sets (full covariances) keeps the distance."""
    rng = np.random.default_rng(5)
    a = _diagonal_gaussian(300, rng.normal(size=4), rng.uniform(0.5, 2.0, 4), seed=6)
    b = _diagonal_gaussian(300, rng.normal(size=4), rng.uniform(0.5, 2.0, 4), seed=7)
    rot, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    assert frechet_distance(a @ rot, b @ rot) == pytest.approx(frechet_distance(a, b), rel=1e-6)


def test_frechet_distance_is_symmetric() -> None:
    rng = np.random.default_rng(8)
    a = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(120, 5)) @ rng.normal(size=(5, 5)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0


def test_frechet_distance_grows_with_a_mean_shift() -> None:
    rng = np.random.default_rng(9)
    a = rng.normal(size=(300, 4))
    b = rng.normal(size=(300, 4))
    distances = [frechet_distance(a, b + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances)
    assert distances[-1] - distances[0] > 10  # ≈ 4 dims × 2² = 16 more
    # A pure mean shift of the very same set adds exactly ‖shift‖².
    assert frechet_distance(a, a + 1.5) == pytest.approx(4 * 1.5**2, rel=1e-6)


# -- classifier_scores ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 10])
def test_classifier_scores_perfect_balanced(k: int) -> None:
    labels = torch.arange(5 * k) % k
    probs = torch.nn.functional.one_hot(labels, k).float()
    scores = classifier_scores(probs, labels)
    assert scores["class_score"] == pytest.approx(k, rel=1e-6)
    assert scores["confidence"] == pytest.approx(1.0)
    assert scores["accuracy"] == 1.0
    assert classifier_scores(probs, (labels + 1) % k)["accuracy"] == 0.0


def test_classifier_scores_partial_accuracy() -> None:
    labels = torch.tensor([0, 1, 2, 0])
    probs = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0]), 3).float()
    assert classifier_scores(probs, labels)["accuracy"] == pytest.approx(0.75)


def test_classifier_scores_uniform_and_unlabelled() -> None:
    probs = torch.full((12, 4), 0.25)
    scores = classifier_scores(probs, None)
    assert scores["class_score"] == pytest.approx(1.0, abs=1e-9)
    assert scores["confidence"] == pytest.approx(0.25)
    assert "accuracy" not in scores
    assert set(scores) == {"class_score", "confidence"}


def test_classifier_scores_one_class_only_scores_one() -> None:
    """Confident but all the same class: no diversity, so the IS-style score is 1."""
    probs = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 5).float()
    scores = classifier_scores(probs, None)
    assert scores["class_score"] == pytest.approx(1.0, abs=1e-6)
    assert scores["confidence"] == pytest.approx(1.0)


# -- features and the feature network -------------------------------------------------------


def test_features_expand_grey_and_resize(feature_net_file: Path) -> None:
    net = load_feature_network(feature_net_file, CPU)
    white = torch.full((2, 1, 16, 16), 255, dtype=torch.uint8)
    half = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    half[..., 8:] = 255
    out = features(net, torch.cat([white, half]), CPU)
    assert out.shape == (3, 9)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[:, 6:], [[3, 299, 299]] * 3)  # 3 channels at 299×299
    np.testing.assert_allclose(out[:2, :3], 1.0, atol=1e-6)      # 255 → 1.0
    np.testing.assert_allclose(out[:2, 3:6], 0.0, atol=1e-6)     # constant
    np.testing.assert_allclose(out[2, :3], 0.0, atol=1e-6)       # half −1, half +1
    assert np.all(out[2, 3:6] > 0.9)                             # and far from constant


def test_features_batches_in_order(feature_net_file: Path) -> None:
    net = load_feature_network(feature_net_file, CPU)
    values = torch.tensor([0, 51, 102, 153, 204, 255, 127], dtype=torch.uint8)
    images = values.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    out = features(net, images, CPU, batch_size=3)
    assert out.shape == (7, 9)
    expected = values.double().numpy() / 127.5 - 1.0
    np.testing.assert_allclose(out[:, 0], expected, atol=1e-6)
    np.testing.assert_allclose(out[:, 2], expected, atol=1e-6)


def test_load_feature_network_rejects_garbage(tmp_path: Path) -> None:
    garbage = tmp_path / "inception.pt"
    garbage.write_bytes(b"this is not a TorchScript archive" * 10)
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        load_feature_network(garbage, CPU)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing.pt"))):
        load_feature_network(tmp_path / "missing.pt", CPU)


# -- the classifier ------------------------------------------------------------------------


def test_train_classifier_learns_the_patterns(trained: Classifier) -> None:
    test = _image_data(30, seed=1)
    probs = predict(trained, test.images)
    assert probs.shape == (90, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(90))
    assert test.labels is not None
    accuracy = float((probs.argmax(1) == test.labels).float().mean())
    assert accuracy >= 0.95
    assert (trained.channels, trained.size, trained.num_classes) == (1, 16, 3)
    assert not trained.training


def test_predict_batches_match_one_batch(trained: Classifier) -> None:
    images = _image_data(10, seed=2).images
    torch.testing.assert_close(predict(trained, images, batch_size=7),
                               predict(trained, images))


def test_classifier_save_load_round_trip(trained: Classifier, tmp_path: Path) -> None:
    file = tmp_path / "clf.safetensors"
    save_classifier(trained, file)
    loaded = load_classifier(file)
    assert (loaded.channels, loaded.size, loaded.num_classes) == (1, 16, 3)
    assert not loaded.training
    images = _image_data(10, seed=3).images
    assert torch.equal(predict(loaded, images), predict(trained, images))


def test_load_classifier_rejects_other_files(models_dir: Path, tmp_path: Path) -> None:
    weights = models_dir / "tiny" / "model.safetensors"
    assert weights.is_file()
    with pytest.raises(ValueError, match="not a classifier"):
        load_classifier(weights)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        load_classifier(garbage)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing.safetensors"))):
        load_classifier(tmp_path / "missing.safetensors")


def test_load_classifier_rejects_mismatched_config(trained: Classifier, tmp_path: Path) -> None:
    """Right format tag, but the stored size does not fit the weights."""
    file = tmp_path / "bad.safetensors"
    meta = {"format": "ddpm-serve-classifier/1",
            "config": json.dumps({"channels": 1, "size": 28, "num_classes": 3})}
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(file),
              metadata=meta)
    with pytest.raises(ValueError, match=re.escape(str(file))):
        load_classifier(file)


def test_train_classifier_needs_labels() -> None:
    data = _image_data(4)
    with pytest.raises(ValueError, match="labelled"):
        train_classifier(ImageData(images=data.images, labels=None, class_names=(),
                                   source="unlabelled"), epochs=1)
    one_class = ImageData(images=data.images, labels=torch.zeros(len(data), dtype=torch.long),
                          class_names=("only",), source="one class")
    with pytest.raises(ValueError, match="two classes"):
        train_classifier(one_class, epochs=1)


# -- ddpm eval -----------------------------------------------------------------------------


def _eval(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cond_setup(models_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """The conditional tiny checkpoint and data, feature net and classifier of its geometry."""
    ckpt = models_dir / "tinycond"
    u = read_config(ckpt).unet
    assert (u.image_size, u.in_channels, u.num_classes) == (16, 3, 10)
    return {
        "ckpt": ckpt,
        "reference": _write_npz(tmp_path / "ref.npz", 8, 16, 3, labels=False, seed=1),
        "real": _write_npz(tmp_path / "real.npz", 6, 16, 3, labels=True, seed=2),
        "classifier": _random_classifier(tmp_path, 3, 16, 10),
        "grey_classifier": _random_classifier(tmp_path, 1, 16, 10),
    }


def _check_classifier_figures(row: dict[str, object], k: int) -> None:
    confidence, score = row["classifier_confidence"], row["classifier_class_score"]
    assert isinstance(confidence, float) and isinstance(score, float)
    assert 1 / k - 1e-3 <= confidence <= 1.0
    assert 1.0 - 1e-3 <= score <= k + 1e-3


def test_eval_cli_conditional_checkpoint(capsys: pytest.CaptureFixture[str],
                                         cond_setup: dict[str, Path], feature_net_file: Path,
                                         tmp_path: Path) -> None:
    out_json = tmp_path / "figures.json"
    code, out, err = _eval(
        capsys, str(cond_setup["ckpt"]), "--reference", str(cond_setup["reference"]),
        "--fid-network", str(feature_net_file), "--classifier", str(cond_setup["classifier"]),
        "--num-samples", "8", "--steps", "2", "--sampler", "ddpm", "--batch-size", "3",
        "--device", "cpu", "--json", str(out_json))
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert row["source"] == str(cond_setup["ckpt"])
    assert row["num_samples"] == 8
    assert row["sampler"] == "ddpm" and row["steps"] == 2
    assert row["guidance_scale"] == 1.0
    assert math.isfinite(row["fid"]) and row["fid"] >= -1e-3
    assert "8 images" in row["fid_reference"]
    assert 0.0 <= row["classifier_accuracy"] <= 1.0
    _check_classifier_figures(row, 10)
    assert row["sampling_seconds"] >= 0
    # The table on stdout names the same figures.
    assert str(cond_setup["ckpt"]) in out
    for key in ("fid", "classifier_class_score", "num_samples"):
        assert key in out


def test_eval_cli_with_real_images(capsys: pytest.CaptureFixture[str],
                                   cond_setup: dict[str, Path], feature_net_file: Path,
                                   tmp_path: Path) -> None:
    out_json = tmp_path / "figures.json"
    code, _, err = _eval(
        capsys, str(cond_setup["ckpt"]), "--reference", str(cond_setup["reference"]),
        "--real", str(cond_setup["reference"]), "--fid-network", str(feature_net_file),
        "--classifier", str(cond_setup["classifier"]), "--num-samples", "8", "--steps", "2",
        "--guidance-scale", "2", "--batch-size", "8", "--device", "cpu",
        "--json", str(out_json))
    assert code == 0, err
    model_row, real_row = json.loads(out_json.read_text())
    assert model_row["sampler"] == "ddim" and model_row["guidance_scale"] == 2.0
    assert "real images" in real_row["source"]
    assert "ref.npz" in real_row["source"]
    assert real_row["num_samples"] == 8
    # The whole reference set scored against itself: the distance is 0.
    assert real_row["fid"] == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(model_row["fid"]) and model_row["fid"] > real_row["fid"]
    assert "sampler" not in real_row
    assert "classifier_accuracy" not in real_row  # this data has no labels
    _check_classifier_figures(real_row, 10)


def test_eval_cli_real_only_labelled(capsys: pytest.CaptureFixture[str],
                                     cond_setup: dict[str, Path], tmp_path: Path) -> None:
    """No checkpoint: real images only, read at the classifier's geometry."""
    out_json = tmp_path / "figures.json"
    code, _, err = _eval(
        capsys, "--reference", str(cond_setup["reference"]), "--real", str(cond_setup["real"]),
        "--classifier", str(cond_setup["classifier"]), "--num-samples", "8",
        "--device", "cpu", "--json", str(out_json))
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert len(rows) == 1
    assert "real images" in rows[0]["source"]
    assert rows[0]["num_samples"] == 6  # all of the 6 real images
    assert "fid" not in rows[0]
    assert 0.0 <= rows[0]["classifier_accuracy"] <= 1.0
    _check_classifier_figures(rows[0], 10)


def test_eval_cli_resizes_for_a_classifier_of_another_size(
        capsys: pytest.CaptureFixture[str], cond_setup: dict[str, Path],
        tmp_path: Path) -> None:
    clf = _random_classifier(tmp_path, 3, 8, 10)
    code, _, err = _eval(
        capsys, str(cond_setup["ckpt"]), "--reference", str(cond_setup["reference"]),
        "--classifier", str(clf), "--num-samples", "4", "--steps", "2", "--device", "cpu")
    assert code == 0, err


def test_eval_cli_needs_a_network(capsys: pytest.CaptureFixture[str],
                                  cond_setup: dict[str, Path]) -> None:
    code, _, err = _eval(capsys, str(cond_setup["ckpt"]), "--reference",
                         str(cond_setup["reference"]), "--num-samples", "4", "--steps", "2")
    assert code == 2
    assert "ddpm eval:" in err
    assert "--fid-network" in err and "--classifier" in err


def test_eval_cli_needs_a_checkpoint_or_real(capsys: pytest.CaptureFixture[str],
                                             cond_setup: dict[str, Path],
                                             feature_net_file: Path) -> None:
    code, _, err = _eval(capsys, "--reference", str(cond_setup["reference"]),
                         "--fid-network", str(feature_net_file))
    assert code == 2
    assert "checkpoint" in err and "--real" in err


def test_eval_cli_rejects_a_classifier_of_other_channels(capsys: pytest.CaptureFixture[str],
                                                         cond_setup: dict[str, Path]) -> None:
    code, _, err = _eval(capsys, str(cond_setup["ckpt"]), "--reference",
                         str(cond_setup["reference"]), "--classifier",
                         str(cond_setup["grey_classifier"]), "--num-samples", "4",
                         "--steps", "2", "--device", "cpu")
    assert code == 2
    assert "1-channel classifier" in err
    assert str(cond_setup["grey_classifier"]) in err


def test_eval_cli_guidance_needs_a_conditional_model(capsys: pytest.CaptureFixture[str],
                                                     models_dir: Path,
                                                     cond_setup: dict[str, Path],
                                                     feature_net_file: Path) -> None:
    assert read_config(models_dir / "tiny").unet.num_classes in (0, None)
    code, _, err = _eval(capsys, str(models_dir / "tiny"), "--reference",
                         str(cond_setup["reference"]), "--fid-network", str(feature_net_file),
                         "--guidance-scale", "3", "--num-samples", "4", "--steps", "2",
                         "--device", "cpu")
    assert code == 2
    assert "--guidance-scale" in err and "class-conditional" in err


def test_eval_cli_rejects_bad_networks_and_steps(capsys: pytest.CaptureFixture[str],
                                                 cond_setup: dict[str, Path],
                                                 feature_net_file: Path,
                                                 tmp_path: Path) -> None:
    garbage = tmp_path / "notanet.pt"
    garbage.write_bytes(b"nonsense" * 20)
    base = [str(cond_setup["ckpt"]), "--reference", str(cond_setup["reference"]),
            "--num-samples", "4", "--device", "cpu"]
    code, _, err = _eval(capsys, *base, "--fid-network", str(garbage), "--steps", "2")
    assert code == 2 and "notanet.pt" in err
    code, _, err = _eval(capsys, *base, "--classifier", str(garbage), "--steps", "2")
    assert code == 2 and "notanet.pt" in err
    code, _, err = _eval(capsys, *base, "--fid-network", str(feature_net_file),
                         "--steps", "5000")
    assert code == 2 and "--steps" in err
    code, _, err = _eval(capsys, *base, "--fid-network", str(feature_net_file),
                         "--steps", "2", "--eta", "1.5")
    assert code == 2 and "--eta" in err


# -- ddpm train-classifier -----------------------------------------------------------------


def _write_folder(root: Path, per_class: int, seed: int) -> None:
    images, labels = _patterns(per_class, size=16, seed=seed)
    names = ("vertical", "horizontal", "checker")
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{n}.png")


def test_train_classifier_cli_folder_with_test_split(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    data = tmp_path / "patterns"
    _write_folder(data / "train", 60, seed=0)
    _write_folder(data / "test", 10, seed=1)
    out = tmp_path / "clf.safetensors"
    code = main(["train-classifier", "--data", str(data), "--out", str(out),
                 "--image-size", "16", "--epochs", "2"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert out.is_file() and str(out) in stdout
    net = load_classifier(out)
    assert (net.channels, net.size, net.num_classes) == (1, 16, 3)
    assert "held-out accuracy" in stdout and "30 images" in stdout
    test = load_images(data, size=16, channels=1, split="test")
    assert test.labels is not None
    accuracy = float((predict(net, test.images).argmax(1) == test.labels).float().mean())
    assert f"{accuracy:.4f}" in stdout


def test_train_classifier_cli_npz_rgb(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    images, labels = _patterns(20, size=12, seed=4)
    data = tmp_path / "patterns.npz"
    np.savez(data, images=images, labels=labels)
    out = tmp_path / "rgb.safetensors"
    code = main(["train-classifier", "--data", str(data), "--out", str(out),
                 "--image-size", "16", "--channels", "3", "--epochs", "1"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    net = load_classifier(out)
    assert (net.channels, net.size, net.num_classes) == (3, 16, 3)
    assert "held-out" not in stdout  # no test split in one .npz


def test_train_classifier_cli_unlabelled_data(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    data = _write_npz(tmp_path / "plain.npz", 10, 16, 1, labels=False)
    out = tmp_path / "clf.safetensors"
    code = main(["train-classifier", "--data", str(data), "--out", str(out),
                 "--image-size", "16", "--epochs", "1"])
    _, stderr = capsys.readouterr()
    assert code == 2
    assert "ddpm train-classifier:" in stderr and "labelled" in stderr
    assert not out.exists()
