"""FFCV files: one `.beton` per split with an `image` field (uint8 array, C x H x W, lossless) and
a `label` field. Read once, in order, into device-resident tensors (decision 12), or through a Loader
with a given index order for data too large for device memory."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


_FFCV_IMPORT = threading.Lock()


def import_ffcv() -> None:
    """Import FFCV once per process without the ~6 s its `ffcv.fields.rgb_image` spends at import compiling
    numba's typed Dict for a two-entry table of JPEG/raw modes. That table is only read from Python, by RGB
    image fields (ours are NDArray fields), so a plain dict stands in while FFCV's modules load; numba's
    Dict is put back at once."""
    with _FFCV_IMPORT:  # a second thread must not take the stand-in for numba's Dict and put it back
        if "ffcv" in sys.modules:
            return
        import numba.typed

        typed_dict = numba.typed.Dict
        numba.typed.Dict = dict
        try:
            import ffcv  # noqa: F401
        finally:
            numba.typed.Dict = typed_dict


class _Indexed:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, workers: int = 1) -> None:
    """Write to `<path>.partial` and rename when complete: a half-written file is never taken as done."""
    import_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    fields = {"image": NDArrayField(dtype=np.dtype("uint8"), shape=tuple(images.shape[1:])), "label": IntField()}
    with _quiet_writer():
        DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(_Indexed(images, labels))
    os.replace(tmp, path)


@contextmanager
def _quiet_writer():
    """FFCV's DatasetWriter draws a tqdm bar per file on stderr: the prepare stage reports its own
    progress, so the writer's bar is switched off while it writes (its warnings and errors are not)."""
    import ffcv.writer  # write_beton has imported FFCV (import_ffcv)
    from tqdm import tqdm

    saved = ffcv.writer.tqdm
    ffcv.writer.tqdm = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        ffcv.writer.tqdm = saved


def ffcv_loader(path: Path, order: np.ndarray, batch_size: int, device: str = "cpu", workers: int = 1):
    """An FFCV Loader yielding (uint8 images, labels) for `order` (training indices, in this order).
    On a GPU, batches go to the device (ToDevice); the uint8->float conversion happens there."""
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    image_pipe = [NDArrayDecoder(), ToTensor()]
    label_pipe = [IntDecoder(), ToTensor(), Squeeze()]
    if device != "cpu":
        image_pipe.append(ToDevice(torch.device(device), non_blocking=True))
        label_pipe.append(ToDevice(torch.device(device), non_blocking=True))
    return Loader(str(path), batch_size=batch_size, num_workers=workers, order=OrderOption.SEQUENTIAL,
                  indices=np.asarray(order, dtype=np.int64), drop_last=False,
                  pipelines={"image": image_pipe, "label": label_pipe})


def read_beton(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The whole file in order: (images uint8 (N, C, H, W), labels int64 (N,)).

    FFCV's Reader parses the file (header, field descriptors, per-sample metadata); an NDArray field's
    sample is the bytes at its metadata pointer, which is all FFCV's NDArrayDecoder copies, and an int
    field's value is its metadata. Read that way, not through a Loader: a Loader compiles its pipeline
    first (about 1.8 s in every process that reads a file, for 1,797 digits). The test suite checks
    the two agree on every sample."""
    import_ffcv()
    from ffcv.reader import Reader

    reader = Reader(str(path))
    field = reader.handlers["image"]
    metadata = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}  # FFCV's naming
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(field.element_size)
    images = np.empty((int(reader.num_samples), size), dtype=np.uint8)
    for i, ptr in enumerate(metadata["image"].tolist()):
        images[i] = raw[ptr : ptr + size]
    labels = metadata["label"].astype(np.int64)
    return images.view(field.dtype).reshape(-1, *field.shape), labels
