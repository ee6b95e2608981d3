"""A dataset resident on one device (decision 12): `DeviceData`, the uint8 tensors and normalization the
trainer and the unlearning methods read; `pipeline.data.stream.StreamedData` serves the same batches.
"""

from __future__ import annotations

import functools

import torch

from pipeline.batches import Member, block_order


# A normalized float32 copy of the training images is kept when it is at most this large (digits: 0.4 MB;
# CIFAR-10: 600 MB, not kept): a step then gathers floats in one pass instead of gathering bytes and
# converting, subtracting and dividing them (0.6 -> 0.06 ms a digits step of 64 models), same values.
NORMALIZED_COPY_BYTES = 64 << 20


class DeviceData:
    """A dataset resident on one device as uint8 (decision 12), with its normalization."""

    def __init__(self, train_x, train_y, val_x, val_y, mean, std, device="cpu"):
        self.device = torch.device(device)
        self.train_x = torch.as_tensor(train_x, device=self.device)
        self.val_x = torch.as_tensor(val_x, device=self.device)
        self._set_labels_and_stats(train_y, val_y, mean, std)

    def _set_labels_and_stats(self, train_y, val_y, mean, std) -> None:
        self.train_y = torch.as_tensor(train_y, device=self.device, dtype=torch.long)
        self.val_y = torch.as_tensor(val_y, device=self.device, dtype=torch.long)
        self.mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, device=self.device, dtype=torch.float32).view(-1, 1, 1)

    @property
    def shape(self):
        return tuple(self.train_x.shape[1:])

    @property
    def n_train(self) -> int:
        return self.train_y.shape[0]

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float() - self.mean) / self.std

    def train_inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images and labels of training indices idx (any shape, on the device):
        (idx.shape + image shape) float32, idx.shape long; the values `normalize(train_x[idx])` gives."""
        flat = idx.reshape(-1)
        table = self._normalized_train
        x = self.normalize(self.train_x.index_select(0, flat)) if table is None else table.index_select(0, flat)
        return x.view(*idx.shape, *self.shape), self.train_y.index_select(0, flat).view(idx.shape)

    @functools.cached_property
    def _normalized_train(self) -> torch.Tensor | None:
        small = self.train_x.numel() * 4 <= NORMALIZED_COPY_BYTES
        return self.normalize(self.train_x) if small else None

    def all_images(self) -> torch.Tensor:
        return torch.cat([self.train_x, self.val_x])

    def all_labels(self) -> torch.Tensor:
        return torch.cat([self.train_y, self.val_y])

    def image_chunks(self, batch: int):
        """Every image, train then val, in order, as uint8 chunks of at most `batch` on the device."""
        images = self.all_images()
        return (images[start : start + batch] for start in range(0, images.shape[0], batch))

    def training_steps(self, members: list[Member], epochs: int, batch_size: int):
        """Per step of training: (epoch, step, normalized images (M, B, ...), labels (M, B), active (M,) bool).
        An epoch's indices reach the device in one copy (a copy per step would make the host wait for the
        device at every step on a GPU)."""
        for epoch in range(epochs):
            order, lengths = block_order(members, epoch, batch_size)
            order = to_device(order, self.device)
            for step in range(order.shape[0]):
                yield epoch, step, *self.train_inputs(order[step]), step < lengths


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; from pinned memory without blocking the host where the device is a GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
