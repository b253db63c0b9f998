"""Training data: every supported format read into one uint8 tensor, fitted to the model.

The format is detected from the path, so `ddpm train --data PATH` needs no format flag:

- a folder (or a `.tar`/`.tar.gz` archive) of images, read recursively; when every image
  lies in a class sub-folder, the folder names are the labels;
- `.npz` / `.npy` uint8 arrays (`[N x H x W]`, `[N x H x W x C]` or `[N x C x H x W]`);
- CIFAR-10 python batches (`data_batch_*`, `test_batch`; a folder or one batch file);
- MNIST IDX files (`*-images-idx3-ubyte`, `.gz` or not; labels from the sibling file).

A data set with `train/` and `test/` parts gives the part named by `split`.
Everything is held in memory as `[N x C x H x W]` uint8, which is what small-image DDPM
training wants: indexing a batch is then a single gather, with no loader processes.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from contract.inputs import fit_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DataError(ValueError):
    """A data set that cannot be used, with what to do about it."""


@dataclass
class ImageData:
    """Images `[N x C x H x W]` uint8, optional labels `[N]` long, and where they came from."""

    images: Tensor
    labels: Tensor | None
    class_names: tuple[str, ...]
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_images(path: str | Path, *, size: int, channels: int, split: str = "train") -> ImageData:
    """Read the data set at `path` and fit every image to `channels` × `size` × `size`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    raw = _read(path, split)
    images = _fit_array(raw.images, size, channels) if isinstance(raw.images, np.ndarray) \
        else _fit_pil(raw.images, size, channels)
    labels = None if raw.labels is None else torch.tensor(np.asarray(raw.labels),
                                                          dtype=torch.long)
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {labels.shape[0]} labels for {images.shape[0]} images")
    names = raw.class_names
    if labels is not None and not names:
        if len(labels) and int(labels.min()) < 0:
            raise DataError(f"{path}: labels must be >= 0")
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))
    if raw.skipped:
        log.warning("%s: skipped %d unreadable files", path, raw.skipped)
    return ImageData(images=images, labels=labels, class_names=names, source=raw.source,
                     skipped=raw.skipped)


# Reading: each format to arrays or PIL images plus labels. ----------------------------------


@dataclass
class _Raw:
    images: np.ndarray | list[Image.Image]
    labels: np.ndarray | list[int] | None
    class_names: tuple[str, ...]
    source: str
    skipped: int = 0


def _read(path: Path, split: str) -> _Raw:
    name = path.name.lower()
    if path.is_dir():
        for sub in (path / "cifar-10-batches-py", path):
            if (sub / "data_batch_1").is_file() or (sub / "test_batch").is_file():
                return _read_cifar_dir(sub, split)
        idx = _find_idx(path, split)
        if idx is not None:
            return _read_idx(idx)
        if (path / split).is_dir():
            path = path / split
        return _read_folder(path)
    if name.endswith(ARCHIVE_SUFFIXES):
        return _read_archive(path, split)
    if name.endswith(".npz") or name.endswith(".npy"):
        return _read_numpy(path)
    if "idx3-ubyte" in name:
        return _read_idx(path)
    if name.startswith(("data_batch", "test_batch")):
        images, labels = _read_cifar_batch(path)
        return _Raw(images, labels, _cifar_names(path.parent), f"CIFAR-10 batch {path.name}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"{path}: a single image; pass the folder that holds the images")
    raise DataError(
        f"{path}: unknown data format; use a folder or .tar(.gz) of images, .npz/.npy uint8 "
        "arrays, CIFAR-10 python batches, or MNIST IDX files"
    )


def _read_numpy(path: Path) -> _Raw:
    try:
        return _read_numpy_arrays(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable NumPy file ({e})") from None


def _read_numpy_arrays(path: Path) -> _Raw:
    loaded = np.load(path, allow_pickle=False)
    labels = None
    if isinstance(loaded, np.ndarray):
        images = loaded
    else:
        with loaded:
            keys = list(loaded.keys())
            img_key = next((k for k in ("images", "x", "x_train", "data", "arr_0") if k in keys),
                           None)
            if img_key is None:
                img_key = next((k for k in keys if loaded[k].ndim >= 3), None)
            if img_key is None:
                raise DataError(f"{path}: no image array (keys: {', '.join(keys) or 'none'})")
            images = loaded[img_key]
            lab_key = next((k for k in ("labels", "y", "y_train", "targets", "arr_1")
                            if k in keys and k != img_key), None)
            labels = loaded[lab_key] if lab_key else None
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: labels must be integers, not {labels.dtype}")
    return _Raw(images, labels, (), f"NumPy {path.name}")


def _find_idx(folder: Path, split: str) -> Path | None:
    prefix = "train" if split == "train" else "t10k"
    for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte",
                 f"{prefix}-images.idx3-ubyte"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*idx3-ubyte*"))
    marked = [f for f in found if ("train" in f.name) == (split == "train")]
    return (marked or found or [None])[0]


def _read_idx_file(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise DataError(f"{path}: not an IDX file with magic {magic}")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def _read_idx(path: Path) -> _Raw:
    images = _read_idx_file(path, 2051)
    label_name = path.name.replace("images", "labels").replace("idx3", "idx1")
    label_file = path.with_name(label_name)
    labels = _read_idx_file(label_file, 2049) if label_file.is_file() else None
    if labels is None:
        log.warning("%s: no labels file %s; training unconditionally", path, label_name)
    return _Raw(images, labels, (), f"MNIST IDX {path.name}")  # names: 0..max label


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what a dict of NumPy arrays needs."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            doc = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in doc.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    doc = _unpickle(path)
    data, labels = doc.get("data"), doc.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or labels is None:
        raise DataError(f"{path}: not a CIFAR-10 python batch (no 3072-wide data)")
    return data.reshape(-1, 3, 32, 32), list(labels)


def _cifar_names(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta).get("label_names")
        if isinstance(names, list):
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return tuple(str(i) for i in range(10))


def _read_cifar_dir(folder: Path, split: str) -> _Raw:
    files = [folder / "test_batch"] if split == "test" else sorted(folder.glob("data_batch_*"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError(f"{folder}: no CIFAR-10 {split} batches")
    parts = [_read_cifar_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = [label for p in parts for label in p[1]]
    return _Raw(images, labels, _cifar_names(folder), f"CIFAR-10 python ({split})")


def _decode(data: bytes | Path) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
            Image.DecompressionBombError):  # Pillow raises SyntaxError for broken PNG chunks
        return None


def _labelled(items: list[tuple[PurePosixPath, Image.Image | None]], source: str) -> _Raw:
    """Folder-style samples → images, labels from the first path part when all have one."""
    good = [(rel, im) for rel, im in items if im is not None]
    skipped = len(items) - len(good)
    if not good:
        raise DataError(f"{source}: no readable images" + (f" ({skipped} unreadable files)"
                                                           if skipped else ""))
    images = [im for _, im in good]
    if all(len(rel.parts) > 1 for rel, _ in good):
        names = tuple(sorted({rel.parts[0] for rel, _ in good}))
        if len(names) > 1:
            index = {n: i for i, n in enumerate(names)}
            return _Raw(images, [index[rel.parts[0]] for rel, _ in good], names, source, skipped)
    return _Raw(images, None, (), source, skipped)


def _read_folder(folder: Path) -> _Raw:
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"{folder}: no image files (looked for {kinds})")
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(_decode, files, chunksize=256))
    items = [(PurePosixPath(*f.relative_to(folder).parts), im)
             for f, im in zip(files, decoded, strict=True)]
    return _labelled(items, f"image folder {folder}")


def _archive_members(tar: tarfile.TarFile) -> Iterator[tuple[PurePosixPath, bytes | None]]:
    for m in tar:
        if m.isfile() and PurePosixPath(m.name).suffix.lower() in IMAGE_SUFFIXES:
            f = tar.extractfile(m)
            yield PurePosixPath(m.name), f.read() if f is not None else None


def _read_archive(path: Path, split: str) -> _Raw:
    try:
        with tarfile.open(path) as tar:
            members = list(_archive_members(tar))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None
    if not members:
        raise DataError(f"{path}: no image files in the archive")
    # Drop a common top folder, then pick the split if the archive has train/ and test/.
    while len({m[0].parts[0] for m in members}) == 1 and all(len(m[0].parts) > 2
                                                              for m in members):
        members = [(PurePosixPath(*rel.parts[1:]), data) for rel, data in members]
    tops = {rel.parts[0] for rel, _ in members if len(rel.parts) > 1}
    if split in tops and tops & {"train", "test"}:
        members = [(PurePosixPath(*rel.parts[1:]), data) for rel, data in members
                   if rel.parts[0] == split]
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(lambda d: None if d is None else _decode(d),
                                [d for _, d in members], chunksize=256))
    items = [(rel, im) for (rel, _), im in zip(members, decoded, strict=True)]
    return _labelled(items, f"image archive {path.name}" + (f" ({split})" if split in tops
                                                             else ""))


# Fitting: channels, then size (pad small images, resize and centre-crop large ones). ----------


def _check_size(h: int, w: int, size: int) -> None:
    if min(h, w) < size and max(h, w) * 2 < size:
        raise DataError(
            f"images of {h}×{w} are too small for a {size}×{size} model (they would be mostly "
            "padding); choose a smaller --image-size or a preset for smaller images"
        )


def _fit_array(a: np.ndarray, size: int, channels: int) -> Tensor:
    if a.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8 (0..255), not {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim != 4 or a.shape[1] not in (1, 3, 4):
        raise DataError(f"image array of shape {a.shape}: expected [N, H, W], [N, H, W, C] or "
                        "[N, C, H, W] with C in 1, 3, 4")
    if a.shape[0] == 0:
        raise DataError("the image array is empty")
    x = torch.from_numpy(np.array(a, order="C"))  # a copy: IDX buffers are read-only
    x = _channels(x, channels)
    h, w = x.shape[2], x.shape[3]
    if (h, w) == (size, size):
        return x.contiguous()
    _check_size(h, w, size)
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))
    pils = [Image.fromarray(img.permute(1, 2, 0).numpy().squeeze(-1) if channels == 1
                            else img.permute(1, 2, 0).numpy()) for img in x]
    return _fit_pil(pils, size, channels)


def _channels(x: Tensor, channels: int) -> Tensor:
    c = x.shape[1]
    if c == 4:
        x, c = x[:, :3], 3
    if c == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    grey = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    return grey.round().clamp(0, 255).to(torch.uint8)


def _fit_one(im: Image.Image, size: int, channels: int) -> np.ndarray:
    """One image `[C, H, W]`, fitted by contract.inputs.fit_image: the function that fits a
    served model's input images too. Alpha is dropped, as training always has."""
    arr = np.asarray(fit_image(im, size=size, channels=channels, alpha="drop"))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _fit_pil(images: list[Image.Image], size: int, channels: int) -> Tensor:
    for im in images:
        _check_size(im.size[1], im.size[0], size)
    return torch.from_numpy(np.stack([_fit_one(im, size, channels) for im in images]))
