"""Data sets as on-device tensors, seeded splits, and on-device minibatches with augmentation.

Every data set here is small enough to live on the device as one tensor (CIFAR-10 train is 600 MB in
float32), so there are no DataLoader workers: `batches` slices the tensors and, for the 32x32 colour
sets, applies random-crop(4) + horizontal flip as one vectorised gather driven by a seeded generator.

Files are read directly (idx, CIFAR pickles, SVHN .mat) in torchvision's on-disk layout; torchvision
itself is only used to download when `data.download` is true. Reading the files ourselves skips
torchvision's md5 checks, so a folder of hand-made or re-packed files (tests, mirrors) also works.
"""
from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from study.registry import Registry
from study.trial.safe_unpickle import load_batch

if TYPE_CHECKING:  # type hints only: config looks the registries up by name, and they never import it
    from study.trial.config import DataConfig

# Where Debian's `dataset-fashion-mnist` package puts the gz idx files (a module constant so tests can move it).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(ValueError):
    """A user-fixable data problem (missing files, failed download): one line, no traceback."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data set's files are not where they were looked for, and downloading was not allowed."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int  # square images: height = width = image_size pixels
    mean: tuple[float, ...]  # per channel, of [0, 1] pixels; the model normalizes with these
    std: tuple[float, ...]
    augment: bool  # random-crop(4) + flip applies (the 32x32 colour sets)


@dataclass
class Splits:
    """float32 NCHW images in [0, 1] and int64 labels, all on one device. Test is never used for selection."""

    info: DatasetInfo
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class _Raw:
    """Decoded arrays as stored: uint8 (or [0, 1] float32 for digits) NCHW images, int64 labels.

    A data set without an official test split (digits) leaves the test arrays None; `load_dataset`
    then carves `_Dataset.test_size` points with `split_seed`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


@dataclass(frozen=True)
class _Dataset:
    info: DatasetInfo
    read: Callable[[Path, bool], _Raw]  # (root, download) -> arrays
    test_size: int = 0  # only for data sets without an official test split


DATASETS: Registry[Callable[[], _Dataset]] = Registry("dataset")


# ---------------------------------------------------------------------------------------------------
# Public API


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)().info


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu") -> Splits:
    """Train/val/test tensors on `device`; val is carved from train with `cfg.split_seed`."""
    ds = DATASETS.get(cfg.name)()
    raw = _read_cached(cfg.name, str(Path(cfg.root).expanduser().resolve()), cfg.download)
    if raw.x_test is None:
        raw = _carve_test(raw, ds.test_size, cfg.split_seed)
    n = len(raw.y_train)
    order = np.random.default_rng([cfg.split_seed, 1]).permutation(n)
    n_val = int(round(cfg.val_fraction * n))
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
    if 0 < cfg.train_limit < len(train_idx):
        keep = np.random.default_rng([cfg.split_seed, 2]).permutation(len(train_idx))[: cfg.train_limit]
        train_idx = train_idx[keep]
    train_idx = np.sort(train_idx)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        return _to_float(x, device), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)

    x_tr, y_tr = tensors(raw.x_train[train_idx], raw.y_train[train_idx])
    x_va, y_va = tensors(raw.x_train[val_idx], raw.y_train[val_idx])
    x_te, y_te = tensors(raw.x_test, raw.y_test)
    return Splits(ds.info, x_tr, y_tr, x_va, y_va, x_te, y_te)


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Minibatches of on-device tensors; all randomness (order, crops, flips) comes from `generator`."""
    n = x.shape[0]
    order = _randperm(n, generator, x.device) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
        if augment:
            xb = crop_flip(xb, generator)
        yield xb, yb


def crop_flip(x: Tensor, generator: torch.Generator | None = None, pad: int = 4) -> Tensor:
    """Random crop after `pad` pixels of zero padding, and a random horizontal flip, per image.

    One gather for the whole batch: row/column index grids are shifted by each image's offset (and
    reversed for flipped images), so nothing loops over images in Python.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gen_device).to(x.device)
    flip = (torch.rand(n, generator=generator, device=gen_device) < 0.5).to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [n, h]
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + offsets[1, :, None]  # [n, w]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------------------------------
# Helpers


def _carve_test(raw: _Raw, test_size: int, seed: int) -> _Raw:
    order = np.random.default_rng([seed, 0]).permutation(len(raw.y_train))
    test, train = np.sort(order[:test_size]), np.sort(order[test_size:])
    return _Raw(raw.x_train[train], raw.y_train[train], raw.x_train[test], raw.y_train[test])


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def _to_float(x: np.ndarray, device: torch.device | str) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    scale = 255.0 if t.dtype == torch.uint8 else 1.0
    return t.to(device=device, dtype=torch.float32, copy=True).div_(scale)  # a copy: the cache stays untouched


@functools.lru_cache(maxsize=4)
def _read_cached(name: str, root: str, download: bool) -> _Raw:
    """Decoded arrays, cached per process so repeated trials do not decode again. Callers must not mutate."""
    return DATASETS.get(name)().read(Path(root), download)


def _missing(name: str, folder: Path, files: list[str], extra: str = "") -> DataNotFoundError:
    listed = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return DataNotFoundError(
        f"data set {name!r} not found: missing {listed} in {folder}{extra}; "
        "set data.download=true to fetch it, or put the files there"
    )


def _download(name: str, folder: Path, fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError, ... for a closed network
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data set {name!r}: download into {folder} failed ({msg}); put the files there and set data.download=false"
        ) from None


# ---------------------------------------------------------------------------------------------------
# File formats


def _read_idx(path: Path) -> np.ndarray:
    """An idx (MNIST) file, plain or gzipped: big-endian header, then uint8 data."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)  # writable


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path) -> list[Path] | None:
    """The four idx files in `folder`, each plain or .gz; None if any is missing."""
    found = []
    for stem in _IDX_FILES:
        options = [folder / stem, folder / f"{stem}.gz"]
        hit = next((p for p in options if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _idx_raw(paths: list[Path]) -> _Raw:
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
    return _Raw(xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64))


def _read_mnist_like(name: str, tv_class: str, fallbacks: tuple[Path, ...] = ()) -> Callable[[Path, bool], _Raw]:
    def read(root: Path, download: bool) -> _Raw:
        folder = root / tv_class / "raw"  # torchvision's layout: <root>/MNIST/raw, <root>/FashionMNIST/raw
        for candidate in (folder, *fallbacks):
            paths = _find_idx(candidate)
            if paths:
                return _idx_raw(paths)
        if not download:
            extra = "".join(f" (nor in {f})" for f in fallbacks)
            raise _missing(name, folder, list(_IDX_FILES), extra)
        import torchvision.datasets as tvd

        _download(name, folder, lambda: getattr(tvd, tv_class)(str(root), train=True, download=True))
        paths = _find_idx(folder)
        if not paths:
            raise _missing(name, folder, list(_IDX_FILES), " after download")
        return _idx_raw(paths)

    return read


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _read_cifar10(root: Path, download: bool) -> _Raw:
    folder = root / "cifar-10-batches-py"
    if download and not all((folder / f).is_file() for f in _CIFAR_FILES):
        import torchvision.datasets as tvd

        _download("cifar10", folder, lambda: tvd.CIFAR10(str(root), train=True, download=True))
    missing = [f for f in _CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        raise _missing("cifar10", folder, missing)

    def load(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            try:
                entry = load_batch(folder / f)  # never plain pickle.load: a crafted file would run code
                if "data" not in entry or "labels" not in entry:
                    raise ValueError(f"{folder / f}: not a CIFAR-10 batch file (no 'data' and 'labels')")
            except ValueError as e:
                raise DataError(str(e)) from None
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry["labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    (xtr, ytr), (xte, yte) = load(_CIFAR_FILES[:5]), load(_CIFAR_FILES[5:])
    return _Raw(xtr, ytr, xte, yte)


def _read_svhn(root: Path, download: bool) -> _Raw:
    files = ["train_32x32.mat", "test_32x32.mat"]  # torchvision's layout: directly in root
    if download:
        import torchvision.datasets as tvd

        for split, f in zip(("train", "test"), files):
            if not (root / f).is_file():
                _download("svhn", root, lambda split=split: tvd.SVHN(str(root), split=split, download=True))
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise _missing("svhn", root, missing)
    import scipy.io

    def load(f: str) -> tuple[np.ndarray, np.ndarray]:
        mat = scipy.io.loadmat(str(root / f))
        x = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))  # HWCN -> NCHW
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        return x, np.where(y == 10, 0, y)  # SVHN labels the digit 0 as 10

    (xtr, ytr), (xte, yte) = load(files[0]), load(files[1])
    return _Raw(xtr, ytr, xte, yte)


def _read_digits(root: Path, download: bool) -> _Raw:
    """scikit-learn's embedded 8x8 digits (values 0..16); no official test split (see `_carve_test`).

    Read from the package's data file as sklearn.datasets.load_digits reads it, without importing
    scikit-learn (1.2 s in every process that loads the data: the driver's check, the pretraining task,
    each trial's Ray worker); load_digits itself where the file is not where it has always been."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits data set ships with scikit-learn: pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        data = np.loadtxt(path, delimiter=",")
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    return _Raw((images / 16.0).astype(np.float32)[:, None], target.astype(np.int64))


# ---------------------------------------------------------------------------------------------------
# Registry


def _grey(name: str, size: int, mean: float, std: float) -> DatasetInfo:
    return DatasetInfo(name, 10, 1, size, (mean,), (std,), augment=False)


@DATASETS.register("digits")
def _digits() -> _Dataset:
    # mean/std of all 1797 images / 16 (computed once; hard-coded so the model does not depend on the split)
    return _Dataset(_grey("digits", 8, 0.3053, 0.3760), _read_digits, test_size=360)


@DATASETS.register("mnist")
def _mnist() -> _Dataset:
    return _Dataset(_grey("mnist", 28, 0.1307, 0.3081), _read_mnist_like("mnist", "MNIST"))


@DATASETS.register("fashion_mnist")
def _fashion_mnist() -> _Dataset:
    read = _read_mnist_like("fashion_mnist", "FashionMNIST", fallbacks=(DEBIAN_FASHION_MNIST,))
    return _Dataset(_grey("fashion_mnist", 28, 0.2860, 0.3530), read)


@DATASETS.register("cifar10")
def _cifar10() -> _Dataset:
    info = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), augment=True)
    return _Dataset(info, _read_cifar10)


@DATASETS.register("svhn")
def _svhn() -> _Dataset:
    info = DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), augment=True)
    return _Dataset(info, _read_svhn)
