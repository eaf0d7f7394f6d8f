"""Dataset loaders on tiny files written here in each set's real on-disk format.

Every set is loaded through the public entry point ``load_dataset(name, split, root=tmp_path, ...)`` with
``download=False``: nothing is fetched, and a missing set must be a :class:`DatasetNotFoundError` that
says where it looked and how to get the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder_guard.data import DATASETS, load_dataset, make_synthetic, subset_indices, take_subset
from encoder_guard.data import fashion_mnist as fm
from encoder_guard.errors import DatasetNotFoundError, EncoderGuardError


@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may pick up data from the machine: no env roots, no Debian package path."""
    monkeypatch.delenv("ENCODER_GUARD_DATA", raising=False)
    monkeypatch.delenv(fm.ENV, raising=False)


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torchvision accept our tiny stand-in files.

    torchvision checks every CIFAR-10 / STL-10 / SVHN file against the md5 of the real release, so a
    generated file never passes. CIFAR10 also calls the module-level ``check_integrity`` directly for
    ``batches.meta`` (in ``_load_meta``), so patching ``CIFAR10._check_integrity`` alone is not enough;
    we replace the module-level function each dataset module imported with a plain "file exists" check.
    That keeps the real loading code path and still fails when a file is missing.
    """
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10
    import torchvision.datasets.svhn as svhn

    def exists(fpath, md5=None) -> bool:
        return os.path.isfile(fpath)

    for module in (cifar, stl10, svhn):
        monkeypatch.setattr(module, "check_integrity", exists)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x00 0x00 0x08 ndim, big-endian int32 dims, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def fmnist_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_fmnist(folder: Path, split: str = "train", n: int = 5, gz: bool = True, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = fmnist_arrays(n, seed)
    img_stem, lbl_stem = fm._FILES[split]
    for stem, arr in ((img_stem, images), (lbl_stem, labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "uncompressed"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_fmnist_idx_files(tmp_path: Path, gz: bool, split: str) -> None:
    images, labels = write_fmnist(tmp_path, split, n=5, gz=gz)
    ds = load_dataset("fashion-mnist", split, root=tmp_path, download=False)
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))  # row-major, not transposed
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.classes == fm.CLASSES and ds.num_classes == 10 and ds.classes[9] == "Ankle boot"
    assert ds.name == "fashion-mnist" and ds.split == split
    assert ds.meta["path"] == str(tmp_path)


def test_fmnist_torchvision_layout_and_resize(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    images, _ = write_fmnist(raw, "train", n=3, gz=False)
    ds = load_dataset("fashion-mnist", "train", root=tmp_path, download=False)
    assert len(ds) == 3 and ds.meta["path"] == str(raw)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    small = load_dataset("fashion-mnist", "train", root=tmp_path, image_size=14, download=False)
    assert small.images.shape == (3, 1, 14, 14) and small.images.dtype == torch.uint8
    assert small.labels.tolist() == ds.labels.tolist()


def test_fmnist_env_var_is_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_fmnist(elsewhere, "train", n=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(fm.ENV, str(elsewhere))
    ds = load_dataset("fashion-mnist", "train", root=empty, download=False)
    assert len(ds) == 4 and ds.meta["path"] == str(elsewhere)
    # the root the user gave wins over the env var
    write_fmnist(empty, "train", n=2)
    assert len(load_dataset("fashion-mnist", "train", root=empty, download=False)) == 2


def test_fmnist_debian_path_only_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "debian"
    write_fmnist(debian, "train", n=6)
    monkeypatch.setattr(fm, "DEBIAN_PATH", debian)
    missing = tmp_path / "missing"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", "train", root=missing, download=False)
    assert str(debian) not in str(err.value)
    # without a root (and no env vars) the Debian package path is the default
    ds = load_dataset("fashion-mnist", "train", root=None, download=False)
    assert len(ds) == 6 and ds.meta["path"] == str(debian)


def test_fmnist_missing_folder_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_PATH", tmp_path / "no-debian")
    missing = tmp_path / "missing"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", "test", root=missing, download=False)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(missing) in msg and "ENCODER_GUARD_FMNIST" in msg and "--data-root" in msg


def test_fmnist_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="train and test"):
        load_dataset("fashion-mnist", "val", root=tmp_path, download=False)


def test_fmnist_truncated_idx(tmp_path: Path) -> None:
    write_fmnist(tmp_path, "train", n=5, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-100])
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path, download=False)
    msg = str(err.value)
    assert str(img) in msg and "truncated" in msg and "re-download" in msg


def test_fmnist_truncated_gzip_stream(tmp_path: Path) -> None:
    write_fmnist(tmp_path, "train", n=5, gz=True)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    img.write_bytes(img.read_bytes()[:40])  # an interrupted download
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path, download=False)
    assert str(img) in str(err.value) and "re-download" in str(err.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_fmnist_not_an_idx_file(tmp_path: Path, gz: bool) -> None:
    write_fmnist(tmp_path, "train", n=5, gz=gz)
    html = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    lbl = tmp_path / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))
    lbl.write_bytes(gzip.compress(html) if gz else html)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path, download=False)
    assert str(lbl) in str(err.value) and "not an unsigned-byte IDX file" in str(err.value)


def test_fmnist_gz_suffix_on_a_non_gzip_file(tmp_path: Path) -> None:
    write_fmnist(tmp_path, "train", n=5, gz=True)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    img.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetNotFoundError, match="cannot read IDX file"):
        load_dataset("fashion-mnist", "train", root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 (pickled python batches)
# --------------------------------------------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (opcodes ``U``/``T``), as in the real CIFAR-10 batches.

    The release was pickled by Python 2: loaded with ``encoding="bytes"`` its keys read ``b'data'``,
    ``b'labels'``; torchvision loads with ``encoding="latin1"`` and indexes ``entry["data"]``. A dict with
    Python 3 ``bytes`` keys would stay ``bytes`` under either encoding, so it would not be the real format.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        Py2Pickler(fh, protocol=2).dump(obj)


def write_cifar10(root: Path, per_batch: int = 2, pixels: dict | None = None) -> dict[str, list[int]]:
    """``cifar-10-batches-py`` as in the real python release: each row is 1024 R, 1024 G, 1024 B, row-major.

    Every batch is filled with its index (0..4 for data_batch_1..5, 5 for test_batch); ``pixels`` maps a
    batch name to ``(image, flat offset in the 3072-byte row, value)`` entries.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels_written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.full((per_batch, 3072), b, dtype=np.uint8)
        for i, offset, value in (pixels or {}).get(name, []):
            data[i, offset] = value
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        py2_pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                    b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]})
        labels_written[name] = labels
    py2_pickle(folder / "batches.meta", {b"num_cases_per_batch": per_batch,
                                         b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072})
    return labels_written


def test_cifar10_train_and_test(tmp_path: Path, skip_md5: None) -> None:
    # known pixels in data_batch_1: image 0, R at (row 2, col 5); image 1, B at (row 30, col 1)
    labels = write_cifar10(tmp_path, per_batch=2, pixels={
        "data_batch_1": [(0, 0 * 1024 + 2 * 32 + 5, 255), (1, 2 * 1024 + 30 * 32 + 1, 200)],
    })

    ds = load_dataset("cifar10", "train", root=tmp_path, download=False)
    assert ds.images.shape == (10, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous()
    assert ds.images[0, 0, 2, 5] == 255 and ds.images[0, 0, 5, 2] == 0 and ds.images[0, 1, 2, 5] == 0
    assert ds.images[1, 2, 30, 1] == 200 and ds.images[1, 2, 1, 30] == 0 and ds.images[1, 0, 30, 1] == 0
    assert int((ds.images[:2] != 0).sum()) == 2  # nothing else lit in batch 1
    # batches concatenated in order 1..5, each filled with its index
    assert [int(ds.images[i].max()) for i in range(2, 10, 2)] == [1, 2, 3, 4]
    assert ds.labels.tolist() == [i % 10 for i in range(10)]
    assert ds.classes == CIFAR_NAMES and ds.name == "cifar10"

    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert test.images.shape == (2, 3, 32, 32) and bool((test.images == 5).all())
    assert test.labels.tolist() == labels["test_batch"]

    big = load_dataset("cifar10", "test", root=tmp_path, image_size=64, download=False)
    assert big.images.shape == (2, 3, 64, 64) and bool((big.images == 5).all())


def test_cifar10_missing_batch_file(tmp_path: Path, skip_md5: None) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "train", root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------------
# STL-10 (binary, column-major)
# --------------------------------------------------------------------------------------------------

STL_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def stl_bytes(n: int, fill: int, pixels: list[tuple[int, int, int, int, int]] = ()) -> bytes:
    """``n`` images in STL-10's layout: per image 3 channels, each 96×96 stored column by column.

    ``pixels`` are ``(image, channel, row, col, value)`` set at the byte offset the real format uses.
    """
    flat = np.full(n * 3 * 96 * 96, fill, dtype=np.uint8)
    for i, c, row, col, value in pixels:
        flat[i * 3 * 9216 + c * 9216 + col * 96 + row] = value
    return flat.tobytes()


def write_stl10(root: Path, n_train: int = 4, n_test: int = 2, n_unlabeled: int = 3) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "train_X.bin").write_bytes(stl_bytes(n_train, 10, [(0, 1, 3, 70, 255), (2, 2, 90, 4, 77)]))
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 3, 5][:n_train]))  # 1-based, as in the release
    (folder / "test_X.bin").write_bytes(stl_bytes(n_test, 20))
    (folder / "test_y.bin").write_bytes(bytes([2, 7][:n_test]))
    (folder / "unlabeled_X.bin").write_bytes(stl_bytes(n_unlabeled, 30))
    (folder / "class_names.txt").write_text("\n".join(STL_NAMES) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(str(j) for j in range(n_train)) for _ in range(10)) + "\n")


def test_stl10_splits_and_orientation(tmp_path: Path, skip_md5: None) -> None:
    write_stl10(tmp_path)
    ds = load_dataset("stl10", "train", root=tmp_path, download=False)
    assert ds.images.shape == (4, 3, 96, 96) and ds.images.dtype == torch.uint8
    assert ds.images[0, 1, 3, 70] == 255 and ds.images[0, 1, 70, 3] == 10
    assert ds.images[2, 2, 90, 4] == 77 and ds.images[2, 2, 4, 90] == 10
    assert ds.labels.tolist() == [0, 9, 2, 4]  # 1..10 on disk -> 0..9
    assert ds.classes == STL_NAMES and ds.name == "stl10"

    test = load_dataset("stl10", "test", root=tmp_path, download=False)
    assert test.images.shape == (2, 3, 96, 96) and test.labels.tolist() == [1, 6]
    assert bool((test.images == 20).all())

    unl = load_dataset("stl10", "unlabeled", root=tmp_path, download=False)
    assert unl.images.shape == (3, 3, 96, 96) and unl.labels.tolist() == [-1, -1, -1]
    assert unl.labels.dtype == torch.int64

    both = load_dataset("stl10", "train+unlabeled", root=tmp_path, image_size=32, download=False)
    assert both.images.shape == (7, 3, 32, 32) and both.labels.tolist() == [0, 9, 2, 4, -1, -1, -1]
    assert both.split == "train+unlabeled"


def test_stl10_without_class_names_file(tmp_path: Path, skip_md5: None) -> None:
    # some mirrors ship only the .bin files; torchvision then never sets ``.classes``
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "class_names.txt").unlink()
    ds = load_dataset("stl10", "test", root=tmp_path, download=False)
    assert ds.classes == STL_NAMES and len(ds) == 2


def test_stl10_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="unlabeled"):
        load_dataset("stl10", "extra", root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------------
# SVHN (.mat, label 10 = digit 0)
# --------------------------------------------------------------------------------------------------


def test_svhn_mat_file(tmp_path: Path, skip_md5: None) -> None:
    from scipy.io import savemat

    n = 4
    X = np.zeros((32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in the release
    X[4, 20, 2, 1] = 255  # image 1, blue, row 4, col 20
    X[31, 0, 0, 3] = 99
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": X, "y": y})

    ds = load_dataset("svhn", "train", root=tmp_path, download=False)
    assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images[1, 2, 4, 20] == 255 and ds.images[1, 2, 20, 4] == 0
    assert ds.images[3, 0, 31, 0] == 99 and int((ds.images != 0).sum()) == 2
    assert ds.labels.tolist() == [0, 1, 9, 0]  # 10 means the digit 0
    assert ds.classes == [str(i) for i in range(10)] and ds.name == "svhn"

    with pytest.raises(DatasetNotFoundError, match="test_32x32.mat"):
        load_dataset("svhn", "test", root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------------
# GTSRB (torchvision layout: ppm folders per class, test CSV)
# --------------------------------------------------------------------------------------------------


def write_ppm(path: Path, width: int, height: int, color: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (width, height), color).save(path)


def write_gtsrb(root: Path) -> None:
    base = root / "gtsrb"
    train = base / "GTSRB" / "Training"
    sizes = [(29, 30), (45, 52), (61, 40)]
    for cls in range(3):
        folder = train / f"{cls:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for k, (w, h) in enumerate(sizes[: cls + 1]):  # class c has c+1 images
            name = f"{k:05d}_{0:05d}.ppm"
            write_ppm(folder / name, w, h, (40 * (cls + 1), 0, 0))
            rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{cls}")
        (folder / f"GT-{cls:05d}.csv").write_text("\n".join(rows) + "\n")  # as in the release; not an image
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for k, (cls, (w, h)) in enumerate([(42, (33, 35)), (7, (70, 64))]):
        name = f"{k:05d}.ppm"
        write_ppm(test_dir / name, w, h, (0, 100 + k, 0))
        rows.append(f"{name};{w};{h};6;5;{w - 6};{h - 5};{cls}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def test_gtsrb_train_and_test(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    ds = load_dataset("gtsrb", "train", root=tmp_path, image_size=32, download=False)
    assert ds.images.shape == (6, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert [int(ds.images[i, 0, 16, 16]) for i in (0, 1, 3)] == [40, 80, 120]
    assert int(ds.images[:, 1:].max()) == 0
    assert ds.num_classes == 43 and ds.name == "gtsrb"

    test = load_dataset("gtsrb", "test", root=tmp_path, image_size=32, download=False)
    assert test.images.shape == (2, 3, 32, 32) and test.labels.tolist() == [42, 7]
    assert [int(test.images[i, 1, 0, 0]) for i in (0, 1)] == [100, 101]

    default = load_dataset("gtsrb", "test", root=tmp_path, download=False)  # default size 32
    assert default.images.shape == (2, 3, 32, 32)
    bigger = load_dataset("gtsrb", "test", root=tmp_path, image_size=48, download=False)
    assert bigger.images.shape == (2, 3, 48, 48)


def test_gtsrb_test_split_without_csv(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match="GTSRB"):
        load_dataset("gtsrb", "test", root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------------
# Missing torchvision-format sets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "split", "expected"),
    [
        ("cifar10", "train", "cifar-10-batches-py"),
        ("cifar10", "test", "cifar-10-batches-py"),
        ("stl10", "train", "stl10_binary"),
        ("svhn", "train", "train_32x32.mat"),
        ("gtsrb", "train", "gtsrb/GTSRB"),
        ("gtsrb", "test", "gtsrb/GTSRB"),
    ],
)
def test_missing_torchvision_set(tmp_path: Path, name: str, split: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, split, root=tmp_path, download=False)
    msg = str(err.value)
    assert f"{tmp_path}/{expected}" in msg
    assert "--download" in msg and "--data-root" in msg
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


# --------------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------------


def write_imagefolder(root: Path, split_dir: str, classes: dict[str, list[tuple[int, int]]]) -> None:
    from PIL import Image

    for c, (cls, sizes) in enumerate(classes.items()):
        folder = root / split_dir / cls
        folder.mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (10 + 50 * c, 0, 200)).save(folder / f"{k}.png")


def test_imagefolder_splits_and_resize(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, "train", {"cat": [(20, 20), (40, 30)], "dog": [(64, 64)], "emu": [(8, 12)]})
    write_imagefolder(tmp_path, "test", {"cat": [(16, 16)], "dog": [(50, 20)], "emu": [(32, 32)]})
    ds = load_dataset("imagefolder", "train", root=tmp_path, image_size=24, download=False)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.images.shape == (4, 3, 24, 24) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1, 2]
    assert [int(ds.images[i, 0, 12, 12]) for i in range(4)] == [10, 10, 60, 110]
    assert bool((ds.images[:, 2] == 200).all())
    assert ds.meta["path"] == str(tmp_path / "train")

    test = load_dataset("imagefolder", "test", root=tmp_path, download=False)  # default size 32
    assert test.images.shape == (3, 3, 32, 32) and test.labels.tolist() == [0, 1, 2]
    assert test.meta["path"] == str(tmp_path / "test")


def test_imagefolder_keeps_its_images_own_size_and_channels(tmp_path: Path) -> None:
    """A folder of 28-px grayscale images stays 28-px grayscale: an encoder of that input takes it unconverted."""
    from PIL import Image

    from encoder_guard.adapt import adapt_dataset
    from encoder_guard.encoders import make_spec

    for c, cls in enumerate(("shoe", "bag")):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for k in range(2):
            Image.new("L", (28, 28), 40 * c + k).save(tmp_path / "train" / cls / f"{k}.png")
    ds = load_dataset("imagefolder", "train", root=tmp_path, download=False)
    assert ds.images.shape == (4, 1, 28, 28) and not ds.meta["resized"]
    assert ds.images[:, 0, 0, 0].tolist() == [40, 41, 0, 1]  # classes in sorted order: bag, shoe
    assert adapt_dataset(ds, make_spec("resnet10-tiny"))[1] == []  # nothing to convert for a 28-px grayscale encoder
    rgb = load_dataset("imagefolder", "train", root=tmp_path, image_size=16, download=False)
    assert rgb.images.shape == (4, 1, 16, 16) and rgb.meta["resized"]  # resized when asked, still grayscale


def test_imagefolder_val_and_flat_layouts(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "a", "val", {"x": [(10, 10)], "y": [(10, 10)]})
    ds = load_dataset("imagefolder", "test", root=tmp_path / "a", download=False)
    assert ds.meta["path"] == str(tmp_path / "a" / "val") and ds.classes == ["x", "y"]
    # no split folder: the root itself holds the classes
    write_imagefolder(tmp_path, "b", {"p": [(5, 5)], "q": [(6, 6)], "r": [(7, 7)]})
    flat = load_dataset("imagefolder", "train", root=tmp_path / "b", image_size=8, download=False)
    assert flat.classes == ["p", "q", "r"] and flat.images.shape == (3, 3, 8, 8)


def test_imagefolder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("imagefolder", "train", root=tmp_path / "nope", download=False)
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_dataset("imagefolder", "train", root=None, download=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no class sub-folders"):
        load_dataset("imagefolder", "train", root=tmp_path / "empty", download=False)


# --------------------------------------------------------------------------------------------------
# synthetic and subsets
# --------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic() -> None:
    a, b = make_synthetic(size=64, seed=3), make_synthetic(size=64, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = make_synthetic(size=64, seed=4)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 1, 16, 16) and a.images.dtype == torch.uint8
    assert torch.bincount(a.labels).tolist() == [16, 16, 16, 16]
    rgb = make_synthetic(size=8, num_classes=2, channels=3, image_size=32)
    assert rgb.images.shape == (8, 3, 32, 32) and rgb.classes == ["class0", "class1"]


def test_synthetic_through_registry(tmp_path: Path) -> None:
    train = load_dataset("synthetic", "train", root=tmp_path, download=False)
    again = load_dataset("synthetic", "train", root=tmp_path, download=False)
    test = load_dataset("synthetic", "test", root=tmp_path, image_size=8, download=False)
    assert torch.equal(train.images, again.images)
    assert len(train) == 512 and train.image_size == 16 and train.name == "synthetic"
    assert len(test) == 256 and test.images.shape[-2:] == (8, 8) and test.split == "test"


def test_subset_fraction_and_count() -> None:
    labels = torch.arange(200) % 4
    idx = subset_indices(labels, fraction=0.1, seed=0)
    assert len(idx) == 20 and idx.dtype == torch.int64
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 20
    assert len(subset_indices(labels, count=7, seed=0)) == 7
    assert len(subset_indices(labels, fraction=1.0)) == 200
    assert len(subset_indices(labels, fraction=1e-6)) == 1  # never empty


def test_subset_balanced() -> None:
    labels = torch.cat([torch.zeros(100), torch.ones(20), torch.full((50,), 2)]).long()
    idx = subset_indices(labels, count=30, balanced=True, seed=1)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [10, 10, 10]
    uneven = subset_indices(labels, count=31, balanced=True, seed=1)
    assert sorted(torch.bincount(labels[uneven], minlength=3).tolist()) == [10, 10, 11]
    with pytest.raises(EncoderGuardError, match="balanced"):
        subset_indices(labels, count=90, balanced=True)  # class 1 has only 20


def test_subset_seeds() -> None:
    labels = torch.arange(500) % 10
    for balanced in (False, True):
        a = subset_indices(labels, fraction=0.05, balanced=balanced, seed=7)
        b = subset_indices(labels, fraction=0.05, balanced=balanced, seed=7)
        c = subset_indices(labels, fraction=0.05, balanced=balanced, seed=8)
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [
    {"fraction": 0.0}, {"fraction": -0.1}, {"fraction": 1.5}, {"count": 0}, {"count": 101},
    {}, {"fraction": 0.5, "count": 3},
])
def test_subset_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(EncoderGuardError):
        subset_indices(torch.arange(100) % 2, **kwargs)


def test_take_subset_keeps_parent_indices() -> None:
    ds = make_synthetic(size=40, seed=0)
    sub = take_subset(ds, count=8, balanced=True, seed=2)
    idx = subset_indices(ds.labels, count=8, balanced=True, seed=2)
    assert len(sub) == 8 and sub.meta["parent_indices"] == idx.tolist()
    assert torch.equal(sub.images, ds.images[idx]) and torch.equal(sub.labels, ds.labels[idx])
    assert torch.bincount(sub.labels).tolist() == [2, 2, 2, 2]
    assert sub.classes == ds.classes and sub.name == ds.name


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(EncoderGuardError) as err:
        load_dataset("nope")
    msg = str(err.value)
    assert "'nope'" in msg
    for name in ("cifar10", "fashion-mnist", "gtsrb", "imagefolder", "stl10", "svhn", "synthetic"):
        assert name in msg and name in DATASETS
