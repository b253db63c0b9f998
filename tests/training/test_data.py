"""Training data loading: every format read into `[N x C x H x W]` uint8, fitted to the model.

Every data set here is a few tiny images written by the test itself. Broken data must surface
as `DataError` (a `ValueError`, which the CLI reports as a one-line message), never as a raw
decoder, zip, gzip or struct exception, and a pickle must never run code.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import shlex
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DataError, ImageData, load_images

RNG = np.random.default_rng(1234)


def _rand(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(arr))
    return path


def _chw(arr: np.ndarray) -> torch.Tensor:
    """An `[H, W]` or `[H, W, C]` array as the loader's `[C, H, W]` tensor."""
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x800 + arr.ndim if magic is None else magic
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> Path:
    data = _idx_bytes(arr, magic)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _write_cifar_batch(path: Path, images: np.ndarray, labels: list[int],
                       protocol: int = 2) -> Path:
    """A batch as the CIFAR-10 python files hold it (protocol 2, byte-string keys)."""
    doc = {b"batch_label": b"batch", b"labels": labels,
           b"data": images.reshape(len(images), 3 * 32 * 32),
           b"filenames": [f"img{i}.png".encode() for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(doc, f, protocol=protocol)
    return path


def _write_cifar_meta(folder: Path, names: list[str]) -> None:
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f,
                    protocol=2)


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


# -- image folders -------------------------------------------------------------------------


def test_folder_with_class_subfolders_gives_sorted_labels(tmp_path: Path) -> None:
    want = {"dog/a.png": 10, "cat/b.png": 20, "cat/c.png": 30, "bird/d.png": 40,
            "cat/kittens/e.png": 50}  # a deeper folder still counts for its top class
    for rel, value in want.items():
        _write_png(tmp_path / rel, np.full((8, 8, 3), value, np.uint8))
    data = load_images(tmp_path, size=8, channels=3)
    assert isinstance(data, ImageData)
    assert data.class_names == ("bird", "cat", "dog")
    assert data.num_classes == 3
    assert len(data) == 5 and data.skipped == 0
    assert data.images.dtype == torch.uint8 and data.images.shape == (5, 3, 8, 8)
    assert data.labels is not None and data.labels.dtype == torch.long
    got = {int(img[0, 0, 0]): data.class_names[int(label)]
           for img, label in zip(data.images, data.labels, strict=True)}
    assert got == {value: rel.split("/")[0] for rel, value in want.items()}


def test_folder_without_subfolders_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", np.full((8, 8), i + 1, np.uint8))
    data = load_images(tmp_path, size=8, channels=1)
    assert data.labels is None
    assert data.class_names == () and data.num_classes == 0
    assert sorted(int(img.max()) for img in data.images) == [1, 2, 3]


def test_folder_with_one_class_subfolder_is_unlabelled(tmp_path: Path) -> None:
    """One class is no conditioning signal (and `images/` is a common wrapper folder)."""
    for i in range(2):
        _write_png(tmp_path / "images" / f"{i}.png", _rand(8, 8))
    data = load_images(tmp_path, size=8, channels=1)
    assert len(data) == 2
    assert data.labels is None and data.class_names == ()


def test_folder_with_train_and_test_parts_gives_the_split(tmp_path: Path) -> None:
    files = {"train/cat/1.png": 1, "train/dog/2.png": 2, "train/dog/3.png": 3,
             "test/cat/4.png": 4, "test/dog/5.png": 5}
    for rel, value in files.items():
        _write_png(tmp_path / rel, np.full((8, 8), value, np.uint8))
    parts = {"train": {1: "cat", 2: "dog", 3: "dog"}, "test": {4: "cat", 5: "dog"}}
    for split, values in parts.items():
        data = load_images(tmp_path, size=8, channels=1, split=split)
        assert data.class_names == ("cat", "dog")
        assert data.labels is not None
        got = {int(img.max()): data.class_names[int(label)]
               for img, label in zip(data.images, data.labels, strict=True)}
        assert got == values, split


def test_some_unreadable_files_are_skipped_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = {"cat/a.png": 11, "dog/b.png": 22}
    for rel, value in good.items():
        _write_png(tmp_path / rel, np.full((8, 8), value, np.uint8))
    (tmp_path / "cat" / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "dog" / "empty.jpg").write_bytes(b"")
    (tmp_path / "dog" / "notes.txt").write_text("not an image suffix: ignored, not counted")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        data = load_images(tmp_path, size=8, channels=1)
    assert data.skipped == 2
    assert len(data) == 2
    assert data.labels is not None
    got = {int(img.max()): data.class_names[int(label)]
           for img, label in zip(data.images, data.labels, strict=True)}
    assert got == {11: "cat", 22: "dog"}
    assert "skipped 2 unreadable files" in caplog.text


def test_png_with_corrupt_chunk_is_skipped(tmp_path: Path) -> None:
    """A PNG whose IDAT length is wrong makes Pillow raise SyntaxError("broken PNG file")."""
    arr = _rand(8, 8, 3)
    _write_png(tmp_path / "good.png", arr)
    broken = bytearray(_png_bytes(_rand(8, 8, 3)))
    assert broken[37:41] == b"IDAT"
    broken[33:37] = struct.pack(">I", 10)  # the chunk ends early: the rest reads as junk
    (tmp_path / "broken.png").write_bytes(bytes(broken))
    data = load_images(tmp_path, size=8, channels=3)
    assert data.skipped == 1
    assert torch.equal(data.images[0], _chw(arr))


# -- pixels: exact copies, padding, resizing, channels -------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 3)])
def test_pixels_survive_exactly_without_resize(tmp_path: Path, shape: tuple[int, ...]) -> None:
    arr = _rand(*shape)
    _write_png(tmp_path / "x.png", arr)
    data = load_images(tmp_path, size=8, channels=3 if len(shape) == 3 else 1)
    assert torch.equal(data.images[0], _chw(arr))


def _write_as(kind: str, folder: Path, arr: np.ndarray) -> Path:
    """One `[H, W]` / `[H, W, C]` image as a PNG folder or a one-image .npy."""
    if kind == "png":
        _write_png(folder / "img" / "x.png", arr)
        return folder / "img"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", arr[None])
    return folder / "x.npy"


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_small_image_is_padded_in_the_centre(tmp_path: Path, kind: str) -> None:
    arr = RNG.integers(1, 256, (5, 6), dtype=np.uint8)  # no zeros: padding is visible
    data = load_images(_write_as(kind, tmp_path, arr), size=8, channels=1)
    out = data.images[0, 0]
    assert out.shape == (8, 8)
    top, left = (8 - 5) // 2, (8 - 6) // 2
    assert torch.equal(out[top:top + 5, left:left + 6], torch.from_numpy(arr))
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[top:top + 5, left:left + 6] = False
    assert int(out[mask].abs().sum()) == 0


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_image_half_the_size_is_padded_not_refused(tmp_path: Path, kind: str) -> None:
    arr = np.full((4, 4), 200, np.uint8)  # grey: [1, 4, 4, 3] would read as [N, C, H, W]
    data = load_images(_write_as(kind, tmp_path, arr), size=8, channels=3)
    assert data.images.shape == (1, 3, 8, 8)
    assert int(data.images.sum()) == 200 * 3 * 16
    assert torch.equal(data.images[0, :, 2:6, 2:6], torch.full((3, 4, 4), 200, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_large_image_is_resized_and_centre_cropped(tmp_path: Path, kind: str) -> None:
    """A 16x32 horizontal ramp, shrunk by 2 to 8x16, keeps its middle 8 columns."""
    ramp = np.tile((np.arange(32) * 8).astype(np.uint8), (16, 1))
    data = load_images(_write_as(kind, tmp_path, ramp), size=8, channels=1)
    out = data.images[0, 0].int()
    assert out.shape == (8, 8)
    # Column j of the crop samples the ramp at x = 2 * (j + 4) + 0.5: 16 j + 68.
    want = torch.tensor([16 * j + 68 for j in range(8)]).expand(8, 8)
    assert (out - want).abs().max() <= 3, out


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_image_larger_on_one_side_only(tmp_path: Path, kind: str) -> None:
    arr = np.full((4, 16), 90, np.uint8)
    data = load_images(_write_as(kind, tmp_path, arr), size=8, channels=1)
    assert data.images.shape == (1, 1, 8, 8)
    assert (data.images.int() - 90).abs().max() <= 1  # scaled up to 8 rows and cropped


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_grey_to_rgb_replicates_the_channel(tmp_path: Path, kind: str) -> None:
    arr = _rand(8, 8)
    data = load_images(_write_as(kind, tmp_path, arr), size=8, channels=3)
    assert data.images.shape == (1, 3, 8, 8)
    for c in range(3):
        assert torch.equal(data.images[0, c], torch.from_numpy(arr))


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_grey_to_rgb_with_resize(tmp_path: Path, kind: str) -> None:
    arr = np.full((16, 16), 77, np.uint8)
    data = load_images(_write_as(kind, tmp_path, arr), size=8, channels=3)
    assert data.images.shape == (1, 3, 8, 8)
    assert (data.images.int() - 77).abs().max() <= 1


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_rgb_to_grey_uses_luma_weights(tmp_path: Path, kind: str) -> None:
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :, 0] = [255, 0, 0, 255, 10, 200, 0, 255]  # pure red, green, blue, white, ...
    arr[:, :, 1] = [0, 255, 0, 255, 20, 100, 0, 255]
    arr[:, :, 2] = [0, 0, 255, 255, 30, 50, 0, 0]
    data = load_images(_write_as(kind, tmp_path, arr), size=8, channels=1)
    assert data.images.shape == (1, 1, 8, 8)
    luma = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    diff = data.images[0, 0].int() - torch.from_numpy(np.rint(luma)).int()
    assert diff.abs().max() <= 1
    assert data.images[0, 0, 0, :4].tolist() == [76, 150, 29, 255]


@pytest.mark.parametrize("kind", ["png", "npy"])
@pytest.mark.parametrize("channels", [1, 3])
def test_rgba_is_accepted_and_alpha_dropped(tmp_path: Path, kind: str, channels: int) -> None:
    rgb = _rand(8, 8, 3)
    alpha = RNG.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    data = load_images(_write_as(kind, tmp_path, np.concatenate([rgb, alpha], axis=2)),
                       size=8, channels=channels)
    assert data.images.shape == (1, channels, 8, 8)
    if channels == 3:
        assert torch.equal(data.images[0], _chw(rgb))
    else:
        plain = load_images(_write_as(kind, tmp_path / "plain", rgb), size=8, channels=1)
        assert torch.equal(data.images, plain.images)


def test_16_bit_png_is_scaled_not_saturated(tmp_path: Path) -> None:
    """16-bit grey PNGs (`I;16`) exist in medical and scientific sets; 0..65535 → 0..255."""
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    (tmp_path / "img").mkdir()
    Image.fromarray(wide).save(tmp_path / "img" / "x.png")
    data = load_images(tmp_path / "img", size=8, channels=1)
    out = data.images[0, 0].int()
    want = torch.from_numpy(wide.astype(np.int64) // 257)
    worst = int((out - want).abs().max())
    assert worst <= 1, f"off by up to {worst}; first row {out[0].tolist()}"


# -- tar archives -------------------------------------------------------------------------


def test_tar_gz_archive_with_top_folder_and_split(tmp_path: Path) -> None:
    values = {"ds/train/cat/1.png": 1, "ds/train/dog/2.png": 2, "ds/train/dog/3.png": 3,
              "ds/test/cat/4.png": 4, "ds/test/dog/5.png": 5}
    path = _write_tar(tmp_path / "ds.tar.gz", {
        name: _png_bytes(np.full((8, 8, 3), v, np.uint8)) for name, v in values.items()})
    for split, want in (("train", {1: "cat", 2: "dog", 3: "dog"}), ("test", {4: "cat", 5: "dog"})):
        data = load_images(path, size=8, channels=3, split=split)
        assert data.class_names == ("cat", "dog")
        assert data.labels is not None
        got = {int(img.max()): data.class_names[int(label)]
               for img, label in zip(data.images, data.labels, strict=True)}
        assert got == want
        assert f"({split})" in data.source


def test_flat_tar_archive_is_unlabelled_and_skips_broken_members(tmp_path: Path) -> None:
    arrs = {"a.png": _rand(6, 6, 3), "b.png": _rand(6, 6, 3)}
    members = {name: _png_bytes(a) for name, a in arrs.items()}
    members["broken.png"] = b"\x89PNG garbage"
    members["README.txt"] = b"ignored"
    data = load_images(_write_tar(tmp_path / "flat.tar", members), size=6, channels=3)
    assert data.labels is None and data.class_names == ()
    assert data.skipped == 1
    got = sorted(data.images.flatten(1).tolist())
    assert got == sorted(_chw(a).flatten().tolist() for a in arrs.values())


def test_tar_archive_with_class_folders_under_a_top_folder(tmp_path: Path) -> None:
    members = {"pets/cat/1.png": _png_bytes(np.full((8, 8), 5, np.uint8)),
               "pets/dog/2.png": _png_bytes(np.full((8, 8), 6, np.uint8))}
    data = load_images(_write_tar(tmp_path / "pets.tgz", members), size=8, channels=1)
    assert data.class_names == ("cat", "dog")
    assert data.labels is not None
    assert {int(i.max()): int(lab) for i, lab in zip(data.images, data.labels, strict=True)} \
        == {5: 0, 6: 1}


def test_archive_without_images(tmp_path: Path) -> None:
    path = _write_tar(tmp_path / "docs.tar", {"a.txt": b"hello"})
    with pytest.raises(DataError, match="no image files in the archive"):
        load_images(path, size=8, channels=3)


def test_archive_that_is_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "data.tar.gz"
    path.write_bytes(b"this is not a tar file" * 10)
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_images(path, size=8, channels=3)


# -- NumPy arrays ---------------------------------------------------------------------------


@pytest.mark.parametrize(("image_key", "label_key"), [("images", "labels"), ("x", "y"),
                                                      ("x_train", "y_train")])
def test_npz_images_and_labels(tmp_path: Path, image_key: str, label_key: str) -> None:
    images = _rand(3, 6, 6, 3)
    labels = np.array([2, 0, 2])
    np.savez(tmp_path / "d.npz", **{image_key: images, label_key: labels})
    data = load_images(tmp_path / "d.npz", size=6, channels=3)
    assert torch.equal(data.images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    assert data.labels is not None and data.labels.tolist() == [2, 0, 2]
    assert data.class_names == ("0", "1", "2")
    assert data.source == "NumPy d.npz"


def test_npz_with_unnamed_arrays(tmp_path: Path) -> None:
    images = _rand(2, 6, 6)
    np.savez(tmp_path / "d.npz", images, np.array([1, 0]))  # arr_0, arr_1
    data = load_images(tmp_path / "d.npz", size=6, channels=1)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels is not None and data.labels.tolist() == [1, 0]


def test_npz_without_labels_is_unlabelled(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", pictures=_rand(2, 6, 6))  # found as the only >= 3-d array
    data = load_images(tmp_path / "d.npz", size=6, channels=1)
    assert len(data) == 2 and data.labels is None and data.class_names == ()


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW", "NHWC1", "NCHW1"])
def test_npy_layouts(tmp_path: Path, layout: str) -> None:
    channels = 1 if layout in ("NHW", "NHWC1", "NCHW1") else 3
    nchw = _rand(2, channels, 6, 7)
    arr = {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0],
           "NHWC1": nchw.transpose(0, 2, 3, 1), "NCHW1": nchw}[layout]
    np.save(tmp_path / "d.npy", arr)
    data = load_images(tmp_path / "d.npy", size=7, channels=channels)
    assert data.images.shape == (2, channels, 7, 7)
    # 6x7 pads one zero row at the bottom (top = (7 - 6) // 2 = 0).
    assert torch.equal(data.images[:, :, :6], torch.from_numpy(nchw))
    assert int(data.images[:, :, 6].sum()) == 0
    assert data.labels is None


def test_float_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", RNG.random((2, 6, 6, 3)).astype(np.float32))
    with pytest.raises(DataError, match="must be uint8"):
        load_images(tmp_path / "d.npy", size=6, channels=3)


@pytest.mark.parametrize("shape", [(6, 6), (2, 2, 6, 6), (1, 2, 3, 6, 6), (2, 6, 6, 5)])
def test_wrong_array_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "d.npy", np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=r"expected \[N, H, W\]"):
        load_images(tmp_path / "d.npy", size=6, channels=3)


def test_empty_array(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.zeros((0, 6, 6), np.uint8))
    with pytest.raises(DataError, match="empty"):
        load_images(tmp_path / "d.npy", size=6, channels=1)


def test_npz_label_count_must_match(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=_rand(2, 6, 6), labels=np.array([0, 1, 1]))
    with pytest.raises(DataError, match="3 labels for 2 images"):
        load_images(tmp_path / "d.npz", size=6, channels=1)


def test_npz_float_labels_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=_rand(2, 6, 6), labels=np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="labels must be integers"):
        load_images(tmp_path / "d.npz", size=6, channels=1)


def test_npz_negative_labels_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=_rand(2, 6, 6), labels=np.array([0, -1]))
    with pytest.raises(DataError, match="labels must be >= 0"):
        load_images(tmp_path / "d.npz", size=6, channels=1)


def test_npz_without_an_image_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", labels=np.array([0, 1]), weights=np.ones((2, 2)))
    with pytest.raises(DataError, match="no image array"):
        load_images(tmp_path / "d.npz", size=6, channels=1)


def test_npy_with_pickled_objects_is_not_unpickled(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable NumPy file"):
        load_images(tmp_path / "d.npy", size=6, channels=1)


def test_truncated_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", _rand(2, 6, 6))
    full = (tmp_path / "d.npy").read_bytes()
    (tmp_path / "d.npy").write_bytes(full[:-10])
    with pytest.raises(DataError, match="not a readable NumPy file"):
        load_images(tmp_path / "d.npy", size=6, channels=1)


def test_truncated_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=_rand(2, 6, 6), labels=np.array([0, 1]))
    full = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(full[: len(full) // 2])  # a download cut short
    with pytest.raises(DataError, match=r"d\.npz"):
        load_images(tmp_path / "d.npz", size=6, channels=1)


# -- CIFAR-10 python batches ----------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def _cifar_folder(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    batches = {"data_batch_1": (_rand(2, 3, 32, 32), [3, 9]),
               "data_batch_2": (_rand(1, 3, 32, 32), [0]),
               "test_batch": (_rand(2, 3, 32, 32), [5, 1])}
    for name, (images, labels) in batches.items():
        _write_cifar_batch(folder / name, images, labels)
    _write_cifar_meta(folder, CIFAR_NAMES)
    return batches


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_folder_train_and_test(tmp_path: Path, nested: bool) -> None:
    """The folder itself, or the one holding `cifar-10-batches-py` (the extracted tarball)."""
    batches = _cifar_folder(tmp_path / "cifar-10-batches-py" if nested else tmp_path / "c")
    root = tmp_path if nested else tmp_path / "c"
    train = load_images(root, size=32, channels=3)
    want = np.concatenate([batches["data_batch_1"][0], batches["data_batch_2"][0]])
    assert torch.equal(train.images, torch.from_numpy(want))
    assert train.labels is not None and train.labels.tolist() == [3, 9, 0]
    assert train.class_names == tuple(CIFAR_NAMES)
    test = load_images(root, size=32, channels=3, split="test")
    assert torch.equal(test.images, torch.from_numpy(batches["test_batch"][0]))
    assert test.labels is not None and test.labels.tolist() == [5, 1]
    assert test.source != train.source


def test_cifar_single_batch_file(tmp_path: Path) -> None:
    batches = _cifar_folder(tmp_path / "c")
    data = load_images(tmp_path / "c" / "data_batch_2", size=32, channels=1)
    images = batches["data_batch_2"][0]
    luma = np.rint(images.astype(np.float64).transpose(0, 2, 3, 1) @ [0.299, 0.587, 0.114])
    assert data.images.shape == (1, 1, 32, 32)
    assert (data.images[:, 0].int() - torch.from_numpy(luma).int()).abs().max() <= 1
    assert data.labels is not None and data.labels.tolist() == [0]
    assert data.class_names == tuple(CIFAR_NAMES)


def test_cifar_batch_without_meta_gets_numbered_classes(tmp_path: Path) -> None:
    images = _rand(2, 3, 32, 32)
    _write_cifar_batch(tmp_path / "test_batch", images, [7, 2])
    data = load_images(tmp_path / "test_batch", size=16, channels=3)  # resized 32 -> 16
    assert data.images.shape == (2, 3, 16, 16)
    assert data.labels is not None and data.labels.tolist() == [7, 2]
    assert data.class_names == tuple(str(i) for i in range(10))


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_batch_pickle_protocols(tmp_path: Path, protocol: int) -> None:
    images = _rand(1, 3, 32, 32)
    _write_cifar_batch(tmp_path / "data_batch_1", images, [4], protocol=protocol)
    data = load_images(tmp_path, size=32, channels=3)
    assert torch.equal(data.images, torch.from_numpy(images))


@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
def test_malicious_cifar_pickle_is_not_run(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    marker = tmp_path / "hacked"
    evil = {b"data": _Evil(f"echo hacked > {shlex.quote(str(marker))}"), b"labels": [0],
            b"label_names": _Evil(f"echo hacked > {shlex.quote(str(marker))}")}
    _write_cifar_batch(folder / "data_batch_1", _rand(1, 3, 32, 32), [0])
    with open(folder / where, "wb") as f:
        pickle.dump(evil, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        load_images(folder, size=32, channels=3)
    assert not marker.exists()


def test_cifar_batch_that_is_not_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(b"\x00garbage, not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_images(tmp_path, size=32, channels=3)


def test_cifar_batch_without_image_data(tmp_path: Path) -> None:
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="no 3072-wide data"):
        load_images(tmp_path, size=32, channels=3)


def test_cifar_folder_without_test_batch(tmp_path: Path) -> None:
    _write_cifar_batch(tmp_path / "data_batch_1", _rand(1, 3, 32, 32), [0])
    with pytest.raises(DataError, match="no CIFAR-10 test batches"):
        load_images(tmp_path, size=32, channels=3, split="test")


# -- MNIST IDX ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_images_with_sibling_labels(tmp_path: Path, suffix: str) -> None:
    images, labels = _rand(3, 6, 6), np.array([7, 0, 3], np.uint8)
    path = _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    for target in (tmp_path, path):  # the folder or the images file itself
        data = load_images(target, size=6, channels=1)
        assert torch.equal(data.images[:, 0], torch.from_numpy(images))
        assert data.labels is not None and data.labels.tolist() == [7, 0, 3]
        assert data.class_names == tuple(str(i) for i in range(8))  # 0..max label
        assert "MNIST IDX" in data.source


def test_idx_folder_gives_the_split(tmp_path: Path) -> None:
    train, test = _rand(2, 6, 6), _rand(1, 6, 6)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2]))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9]))
    data = load_images(tmp_path, size=6, channels=1, split="test")
    assert torch.equal(data.images[:, 0], torch.from_numpy(test))
    assert data.labels is not None and data.labels.tolist() == [9]
    data = load_images(tmp_path, size=6, channels=3, split="train")
    assert torch.equal(data.images[:, 1], torch.from_numpy(train))


def test_idx_folder_with_prefixed_names_gives_the_split(tmp_path: Path) -> None:
    """EMNIST names its files `emnist-digits-train-images-idx3-ubyte` and so on."""
    train, test = np.full((3, 6, 6), 1, np.uint8), np.full((2, 6, 6), 2, np.uint8)
    _write_idx(tmp_path / "emnist-digits-train-images-idx3-ubyte", train)
    _write_idx(tmp_path / "emnist-digits-test-images-idx3-ubyte", test)
    assert len(load_images(tmp_path, size=6, channels=1, split="train")) == 3
    assert len(load_images(tmp_path, size=6, channels=1, split="test")) == 2


def test_idx_without_labels_file_is_unlabelled(tmp_path: Path) -> None:
    images = _rand(2, 6, 6)
    path = _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    data = load_images(path, size=6, channels=1)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels is None and data.class_names == ()


def test_idx_labels_above_nine_get_class_names(tmp_path: Path) -> None:
    """IDX labels are not always digits (EMNIST letters: 1..26, balanced: 0..46)."""
    _write_idx(tmp_path / "train-images-idx3-ubyte", _rand(3, 6, 6))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 12, 46]))
    data = load_images(tmp_path, size=6, channels=1)
    assert data.labels is not None
    assert data.num_classes > int(data.labels.max())


def test_truncated_idx(tmp_path: Path) -> None:
    full = _idx_bytes(_rand(3, 6, 6))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(full[:-7])
    with pytest.raises(DataError, match="truncated"):
        load_images(tmp_path, size=6, channels=1)


def test_idx_header_cut_short(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(_rand(3, 6, 6))[:10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_images(tmp_path, size=6, channels=1)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", _rand(3, 6, 6), magic=2049)
    with pytest.raises(DataError, match="not an IDX file with magic 2051"):
        load_images(tmp_path, size=6, channels=1)


def test_idx_labels_file_with_wrong_magic(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", _rand(3, 6, 6))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2]), magic=2051)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: not an IDX file with magic 2049"):
        load_images(tmp_path, size=6, channels=1)


def test_idx_label_count_must_match(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", _rand(3, 6, 6))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1]))
    with pytest.raises(DataError, match="2 labels for 3 images"):
        load_images(tmp_path, size=6, channels=1)


def test_idx_gzip_cut_short(tmp_path: Path) -> None:
    data = gzip.compress(_idx_bytes(_rand(3, 6, 6)))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(data[:-12])
    with pytest.raises(DataError, match="unreadable"):
        load_images(tmp_path, size=6, channels=1)


def test_idx_gzip_corrupt(tmp_path: Path) -> None:
    """Damaged deflate data makes gzip raise zlib.error, which is not an OSError."""
    data = bytearray(gzip.compress(_idx_bytes(_rand(3, 6, 6))))
    data[10:30] = b"\xff" * 20  # the deflate stream, just after the 10-byte gzip header
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_images(tmp_path, size=6, channels=1)


# -- unusable paths ------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_images(tmp_path / "nope", size=8, channels=3)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no image files"):
        load_images(tmp_path, size=8, channels=3)


def test_folder_of_only_unreadable_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff more garbage")
    with pytest.raises(DataError, match=r"no readable images \(2 unreadable files\)"):
        load_images(tmp_path, size=8, channels=3)


@pytest.mark.parametrize("kind", ["png", "npy"])
def test_images_far_too_small(tmp_path: Path, kind: str) -> None:
    with pytest.raises(DataError, match=r"images of 3×3 are too small for a 8×8 model"):
        load_images(_write_as(kind, tmp_path, _rand(3, 3)), size=8, channels=1)


def test_single_image_file(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "x.png", _rand(8, 8))
    with pytest.raises(DataError, match="a single image; pass the folder"):
        load_images(path, size=8, channels=1)


@pytest.mark.parametrize("name", ["data.csv", "weights.pt", "images.tar.bz2"])
def test_unknown_file_type(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"1,2,3\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_images(tmp_path / name, size=8, channels=1)


def test_data_error_is_a_value_error() -> None:
    """The CLI turns ValueErrors into one-line messages."""
    assert issubclass(DataError, ValueError)
