"""Data registry: every data set loads (digits for real, the others from tiny files written here in
torchvision's on-disk formats), splits are seeded and disjoint, missing data fails in one clear line,
and `batches` shuffles/augments reproducibly on the device."""
from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from study.trial import data as data_mod
from study.trial.config import DataConfig
from study.trial.data import DATASETS, DataError, DataNotFoundError, batches, crop_flip, load_dataset

N_TRAIN, N_TEST = 50, 20


# ---------------------------------------------------------------------------------------------------
# Writers of tiny files in the real formats


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, rng: np.random.Generator, gz: bool = False) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
        else:
            (folder / name).write_bytes(_idx_bytes(arr))
    return arrays


def write_cifar(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = N_TRAIN // 5 if name != "test_batch" else N_TEST
        x, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": [f"{i}.png" for i in range(n)]}, f)
        xs.append(x), ys.append(y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072, "num_cases_per_batch": 10}, f)
    return {"x_test": xs[-1].reshape(-1, 3, 32, 32), "y_test": np.array(ys[-1])}


def write_svhn(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # H x W x C x N, as the real .mat files
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 1..10, 10 meaning the digit 0
        y[0, 0] = 10
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


def write_files(name: str, root: Path, seed: int = 0) -> dict[str, np.ndarray] | None:
    rng = np.random.default_rng(seed)
    if name == "mnist":
        return write_idx_folder(root / "MNIST" / "raw", rng)
    if name == "fashion_mnist":
        return write_idx_folder(root / "FashionMNIST" / "raw", rng)
    if name == "cifar10":
        return write_cifar(root, rng)
    if name == "svhn":
        return write_svhn(root, rng)
    return None  # digits: embedded


@pytest.fixture(autouse=True)
def no_debian_fashion(monkeypatch, tmp_path):
    """Tests see only their own files, whether or not the Debian package is installed."""
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-here")


def _rows(*xs: torch.Tensor) -> list[bytes]:
    return sorted(r.numpy().tobytes() for x in xs for r in x.reshape(x.shape[0], -1))


# ---------------------------------------------------------------------------------------------------
# Every registered data set


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads(name, tmp_path):
    write_files(name, tmp_path)
    cfg = DataConfig(name=name, root=str(tmp_path), val_fraction=0.2)
    s = load_dataset(cfg)
    info = s.info
    assert info.name == name and info.num_classes == 10
    assert len(info.mean) == len(info.std) == info.in_channels
    for x, y in ((s.x_train, s.y_train), (s.x_val, s.y_val), (s.x_test, s.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (info.in_channels, info.image_size, info.image_size)
        assert x.shape[0] == y.shape[0] > 0
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert 0 <= y.min() and y.max() < info.num_classes
    n_train = s.x_train.shape[0] + s.x_val.shape[0]
    assert s.x_val.shape[0] == round(0.2 * n_train)
    assert info.augment == (info.in_channels == 3 and info.image_size == 32)
    if name != "digits":
        assert n_train == N_TRAIN and s.x_test.shape[0] == N_TEST


@pytest.mark.parametrize("name", [n for n in DATASETS.names() if n != "digits"])
def test_missing_data_is_one_clear_line(name, tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(DataConfig(name=name, root=str(root), download=False))
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)
    assert isinstance(err.value, ValueError)
    assert "\n" not in msg and repr(name) in msg and str(root) in msg and "data.download=true" in msg


def test_unknown_dataset_lists_choices():
    with pytest.raises(KeyError, match="cifar10"):
        load_dataset(DataConfig(name="imagenet"))


# ---------------------------------------------------------------------------------------------------
# Digits, for real


def test_digits_splits_are_a_seeded_partition():
    s = load_dataset(DataConfig(name="digits", val_fraction=0.1))
    assert s.x_test.shape == (360, 1, 8, 8)
    assert s.x_train.shape[0] + s.x_val.shape[0] == 1797 - 360
    assert s.x_val.shape[0] == round(0.1 * 1437)
    from sklearn.datasets import load_digits

    full = torch.from_numpy((load_digits().images / 16.0).astype(np.float32))
    labelled = lambda x, y: torch.cat([x.reshape(len(x), -1), y[:, None].float()], 1)  # noqa: E731
    got = _rows(labelled(s.x_train, s.y_train), labelled(s.x_val, s.y_val), labelled(s.x_test, s.y_test))
    assert got == _rows(labelled(full, torch.from_numpy(load_digits().target)))  # a partition of all 1797

    again = load_dataset(DataConfig(name="digits", val_fraction=0.1))
    assert torch.equal(again.x_val, s.x_val) and torch.equal(again.x_test, s.x_test)

    # val is carved from train: a different val_fraction moves points between train and val only
    wider = load_dataset(DataConfig(name="digits", val_fraction=0.3))
    assert torch.equal(wider.x_test, s.x_test)
    assert _rows(wider.x_train, wider.x_val) == _rows(s.x_train, s.x_val)

    other = load_dataset(DataConfig(name="digits", split_seed=1))
    assert not torch.equal(other.x_test, s.x_test)


def test_train_limit_keeps_val_and_test():
    full = load_dataset(DataConfig(name="digits"))
    small = load_dataset(DataConfig(name="digits", train_limit=100))
    assert small.x_train.shape[0] == 100
    assert torch.equal(small.x_val, full.x_val) and torch.equal(small.x_test, full.x_test)
    assert set(_rows(small.x_train)) <= set(_rows(full.x_train))


def test_raw_arrays_are_cached():
    load_dataset(DataConfig(name="digits"))
    hits = data_mod._read_cached.cache_info().hits
    load_dataset(DataConfig(name="digits", val_fraction=0.2))
    assert data_mod._read_cached.cache_info().hits == hits + 1


# ---------------------------------------------------------------------------------------------------
# File formats: the values written come back, in place


def test_mnist_matches_torchvision(tmp_path):
    import torchvision

    write_files("mnist", tmp_path)
    s = load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    tv = torchvision.datasets.MNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(s.x_test[:, 0], tv.data.float() / 255) and torch.equal(s.y_test, tv.targets)


def test_fashion_mnist_reads_debian_style_gz_folder(tmp_path, monkeypatch):
    arrays = write_idx_folder(tmp_path / "debian", np.random.default_rng(1), gz=True)
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    s = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "nothing")))
    assert torch.equal(s.x_test[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255)
    assert torch.equal(s.y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_installed_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", Path("/usr/share/datasets/fashion-mnist"))
    s = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), train_limit=1000))
    assert s.x_train.shape == (1000, 1, 28, 28) and s.x_val.shape[0] == 6000 and s.x_test.shape[0] == 10000
    assert torch.bincount(s.y_test).tolist() == [1000] * 10


def test_cifar_values_and_layout(tmp_path):
    written = write_files("cifar10", tmp_path)
    s = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert torch.equal(s.x_test, torch.from_numpy(written["x_test"]).float() / 255)
    assert torch.equal(s.y_test, torch.from_numpy(written["y_test"]))


class _Planted:
    """A pickled object whose unpickling runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.marker}'",))


def test_a_crafted_cifar_batch_is_refused_and_never_runs(tmp_path, capsys):
    """A CIFAR-shaped folder whose data_batch_1 carries a __reduce__ (here: touch a marker file): loading is
    refused in one line naming the file, the marker is never made; `study trial` exits 2, no traceback."""
    from study.cli import main

    write_files("cifar10", tmp_path)
    marker = tmp_path / "owned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10, b"x": _Planted(marker)}, f,
                    protocol=2)
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists(), "the planted pickle ran its command"
    msg = str(e.value)
    assert "\n" not in msg and str(batch) in msg and "refused" in msg and "system" in msg, msg
    trial = tmp_path / "trial.yaml"
    trial.write_text(f"data: {{name: cifar10, root: {tmp_path}}}\n")
    assert main(["trial", str(trial), "--set", "pretrain.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("study: error: ") and str(batch) in err[0], err
    assert not marker.exists()


def test_genuine_cifar_batches_in_the_real_pickle_format_load(tmp_path):
    """The real files: protocol 2, bytes keys (Python 2's cPickle), a uint8 array and lists of ints/bytes."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches_written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = rng.integers(0, 256, (8, 3072), dtype=np.uint8), rng.integers(0, 10, 8).tolist()
        entry = {b"batch_label": name.encode(), b"labels": y, b"data": x,
                 b"filenames": [f"{i}.png".encode() for i in range(8)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        batches_written[name] = (x, y)
    raw = DATASETS.get("cifar10")().read(tmp_path, False)
    x_test, y_test = batches_written["test_batch"]
    assert np.array_equal(raw.x_test, x_test.reshape(-1, 3, 32, 32)) and raw.y_test.tolist() == y_test
    assert raw.x_train.shape == (40, 3, 32, 32)
    assert np.array_equal(raw.x_train[:8], batches_written["data_batch_1"][0].reshape(-1, 3, 32, 32))


def test_svhn_values_layout_and_label_ten_is_zero(tmp_path):
    written = write_files("svhn", tmp_path)
    s = load_dataset(DataConfig(name="svhn", root=str(tmp_path)))
    x = torch.from_numpy(written["x_test"]).permute(3, 2, 0, 1).float() / 255  # HWCN -> NCHW
    y = torch.from_numpy(written["y_test"].astype(np.int64)).reshape(-1) % 10
    assert torch.equal(s.x_test, x) and torch.equal(s.y_test, y) and s.y_test[0] == 0


# ---------------------------------------------------------------------------------------------------
# batches


def test_batches_cover_every_point_once_and_are_seeded():
    n = 103
    x, y = torch.rand(n, 1, 4, 4), torch.arange(n)
    def epoch(seed):  # noqa: E306
        return [yb for _, yb in batches(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(seed))]

    first = epoch(0)
    assert [len(b) for b in first] == [16] * 6 + [7]
    assert sorted(torch.cat(first).tolist()) == list(range(n))
    assert torch.equal(torch.cat(first), torch.cat(epoch(0)))
    assert not torch.equal(torch.cat(first), torch.cat(epoch(1)))
    assert torch.equal(torch.cat([yb for _, yb in batches(x, y, 16, shuffle=False)]), y)
    for xb, yb in batches(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(xb, x[yb])  # images stay with their labels


def _is_crop_flip_of(out: torch.Tensor, img: torch.Tensor, pad: int = 4) -> bool:
    padded = torch.nn.functional.pad(img, (pad,) * 4)
    h, w = img.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(out, crop) or torch.equal(out, crop.flip(-1)):
                return True
    return False


def test_augmentation_is_a_reproducible_crop_and_flip():
    x, y = torch.rand(64, 3, 32, 32), torch.arange(64)
    def run(seed):  # noqa: E306
        g = torch.Generator().manual_seed(seed)
        return torch.cat([xb for xb, _ in batches(x, y, 32, shuffle=False, generator=g, augment=True)])

    out = run(0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0.0 <= out.min() and out.max() <= 1.0
    changed = (out != x).flatten(1).any(1)
    assert changed.float().mean() > 0.8  # 1/162 of images are left as they are
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))
    for i in range(8):
        assert _is_crop_flip_of(out[i], x[i])


def test_crop_flip_without_generator_and_on_grey_images():
    x = torch.rand(5, 1, 8, 8)
    out = crop_flip(x)
    assert out.shape == x.shape
    assert all(_is_crop_flip_of(out[i], x[i]) for i in range(5))


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def closed_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", closed_network)
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    msg = str(err.value)
    assert "\n" not in msg and "'cifar10'" in msg and str(tmp_path) in msg and "name resolution" in msg


def test_digits_are_read_as_scikit_learn_reads_them_without_importing_it(tmp_path):
    """The digits file is parsed directly (importing scikit-learn costs every worker process 1.2 s): the
    same arrays as sklearn.datasets.load_digits, and scikit-learn left unimported."""
    import subprocess

    from sklearn.datasets import load_digits

    from study.trial.data import _read_digits

    raw = _read_digits(tmp_path, False)
    ref = load_digits()
    assert np.array_equal(raw.x_train, (ref.images / 16.0).astype(np.float32)[:, None]) and raw.x_train.dtype == np.float32
    assert np.array_equal(raw.y_train, ref.target) and raw.y_train.dtype == np.int64
    code = ("import sys; from pathlib import Path; from study.trial.data import _read_digits; "
            "_read_digits(Path('.'), False); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
