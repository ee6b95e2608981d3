"""The second data path of decision 12: a dataset too large for device memory is read through FFCV's
`Loader`, with each model's own indices in its own seeded order, so a block gets exactly the batches
`DeviceData` would give it. Only labels (small) stay resident."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.batches import Member, block_steps
from pipeline.data.beton import ffcv_loader
from pipeline.data.device import DeviceData, to_device


class StreamedData(DeviceData):
    """The interface of `DeviceData` without resident images: batches come from `.beton` files."""

    def __init__(self, train_path: Path, val_path: Path, shape, train_y, val_y, mean, std, device="cpu",
                 workers: int = 1):
        self.device = torch.device(device)
        self.paths = {"train": Path(train_path), "val": Path(val_path)}
        self._shape, self.workers = tuple(shape), workers
        self._set_labels_and_stats(train_y, val_y, mean, std)

    @property
    def shape(self):
        return self._shape

    def all_images(self) -> torch.Tensor:
        raise TypeError("a streamed dataset is not resident: read it with image_chunks")

    def _loader(self, split: str, order: np.ndarray, batch: int):
        return ffcv_loader(self.paths[split], order, batch, str(self.device), self.workers)

    def image_chunks(self, batch: int):
        for split, labels in (("train", self.train_y), ("val", self.val_y)):
            for images, _ in self._loader(split, np.arange(len(labels)), batch):
                yield images.to(self.device)

    def training_steps(self, members: list[Member], epochs: int, batch_size: int):
        """As `DeviceData.training_steps`, through one Loader whose order is every step's (M, B) indices
        of every epoch, one step per Loader batch: building a Loader compiles its pipeline (about a
        second), so a block builds one."""
        plan = [(epoch, step, idx, active) for epoch in range(epochs)
                for step, idx, active in block_steps(members, epoch, batch_size)]
        order = torch.stack([idx for _, _, idx, _ in plan]).reshape(-1).numpy()
        m = len(members)
        for (epoch, step, idx, active), (images, _) in zip(plan, self._loader("train", order, m * batch_size),
                                                          strict=True):
            images = images.to(self.device).view(m, batch_size, *self.shape)
            yield epoch, step, self.normalize(images), self.train_y[to_device(idx, self.device)], active


def resident_fits(meta: dict, device: str, fraction: float = 0.5) -> bool:
    """Whether the prepared dataset (uint8) takes at most `fraction` of the device's free memory."""
    size = (meta["n_train"] + meta["n_val"]) * int(np.prod(meta["shape"]))
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return size <= fraction * free
