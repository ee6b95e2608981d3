"""Dataset registry: digits (embedded default), cifar10 (a local torchvision-format folder), synthetic.

A dataset is held as uint8 images (N, C, H, W) and int64 labels for train and validation; models see
them normalized per channel with the train split's mean and std.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig


class DataError(ValueError):
    """A dataset folder or file is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: np.ndarray  # uint8 (n_train, C, H, W)
    train_y: np.ndarray  # int64 (n_train,)
    val_x: np.ndarray  # uint8 (n_val, C, H, W)
    val_y: np.ndarray  # int64 (n_val,)
    classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        x = self.train_x.astype(np.float64)
        mean = x.mean(axis=(0, 2, 3))
        std = x.std(axis=(0, 2, 3)) + 1e-8
        return mean.tolist(), std.tolist()


def load_dataset(cfg: DataConfig, data_root: str | None = None) -> Dataset:
    loaders = {"digits": _digits, "cifar10": _cifar10, "synthetic": _synthetic}
    return loaders[cfg.dataset](cfg, data_root)


# ----------------------------------------------------------------------------------------- digits
def _digits(cfg: DataConfig, _root) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # values 0..16, (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        idx, test_size=cfg.val_fraction, random_state=cfg.split_seed, stratify=labels
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return Dataset("digits", images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], 10)


# ----------------------------------------------------------------------------------------- synthetic
def _synthetic(cfg: DataConfig, _root) -> Dataset:
    """Seeded, learnable images: each class has a random template; images are noisy copies of it."""
    spec = cfg.synthetic
    rng = np.random.default_rng(spec.seed)
    templates = rng.uniform(0, 255, size=(spec.classes, *spec.shape))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, spec.classes, size=n)
        x = 0.5 * templates[y] + rng.uniform(0, 127.5, size=(n, *spec.shape))
        return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)

    train_x, train_y = draw(spec.n_train)
    val_x, val_y = draw(spec.n_val)
    return Dataset("synthetic", train_x, train_y, val_x, val_y, spec.classes)


# ----------------------------------------------------------------------------------------- cifar10
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_FILES = CIFAR_TRAIN + ["test_batch", "batches.meta"]
CIFAR_MD5 = {  # published sums of the files in cifar-10-python.tar.gz
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR_LAYOUT = (
    f"expected <root>/{CIFAR_DIR}/ holding {', '.join(CIFAR_FILES)} "
    "(the python version of CIFAR-10, as torchvision's CIFAR10 reads it)"
)


class _Refused(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed list."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, strings, numbers and numpy arrays; anything else is refused,
    so a crafted file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"refused to load {module}.{name}: only plain data is allowed")


def restricted_load(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="latin1").load()
    except _Refused as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated, or not a pickle at all
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_load(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(f"{path}: missing key {key!r}; keys found: {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        raise DataError(f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10(cfg: DataConfig, data_root: str | None) -> Dataset:
    root = data_root or cfg.root
    if root is None:
        raise DataError(f"data.root: the cifar10 dataset needs a local folder; {CIFAR_LAYOUT}")
    folder = Path(root).expanduser() / CIFAR_DIR
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; {CIFAR_LAYOUT}")
    for name in CIFAR_FILES:
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: file missing; {CIFAR_LAYOUT}")
    if cfg.verify_md5:
        verify_cifar_md5(folder)
    meta = restricted_load(folder / "batches.meta")
    if len(meta.get("label_names", [])) != 10:
        raise DataError(f"{folder / 'batches.meta'}: expected 10 label_names")
    parts = [_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    val_x, val_y = _cifar_batch(folder / "test_batch")
    return Dataset("cifar10", train_x, train_y, val_x, val_y, 10)


def verify_cifar_md5(folder: Path) -> None:
    for name, expected in CIFAR_MD5.items():
        digest = hashlib.md5((folder / name).read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(f"{folder / name}: MD5 {digest} differs from the published {expected}")


def write_cifar_folder(root: Path, n_per_batch: int = 100, n_test: int = 100, seed: int = 0) -> Path:
    """Generate a small folder in exactly the CIFAR-10 python format (for tests and smoke configs):
    learnable images (a class template plus noise), pickled like the real files."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(10, 3072))
    folder = Path(root) / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, n: int) -> None:
        labels = rng.integers(0, 10, size=n)
        data = (0.5 * templates[labels] + rng.uniform(0, 127.5, size=(n, 3072))).clip(0, 255)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": data.astype(np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))

    for name in CIFAR_TRAIN:
        dump(name, n_per_batch)
    dump("test_batch", n_test)
    meta = {"num_cases_per_batch": n_per_batch, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return Path(root)
