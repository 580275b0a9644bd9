"""Datasets of the launcher as tensors, split into per-rank batches deterministically.

Each epoch's order comes from a generator seeded with the epoch, so every rank
(and a resumed job) sees the same global batches; rank r takes every world-th
sample of each global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class TensorSet:
    """Inputs and labels in memory, with a per-batch transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def loader(self, epoch: int | None, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches of epoch ``epoch`` (equal on all ranks), or all samples once (``None``)."""
        n = len(self)
        if epoch is None:
            mine = torch.arange(rank, n, world)
            for idx in mine.split(batch_size):
                yield self.transform(self.x[idx]), self.y[idx]
            return
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))
        per_step = batch_size * world
        for start in range(0, n - per_step + 1, per_step):
            idx = order[start : start + per_step][rank::world]
            yield self.transform(self.x[idx]), self.y[idx]


def _digits(seed: int) -> tuple[TensorSet, TensorSet, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    train, valid = order[:split], order[split:]
    return TensorSet(x[train], y[train], _identity), TensorSet(x[valid], y[valid], _identity), 10


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _images(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - CIFAR_MEAN) / CIFAR_STD


def _cifar(data_dir: Path, fake_size: int) -> tuple[TensorSet, TensorSet, int]:
    """CIFAR-10 from ``data_dir`` if its files are there, else torchvision's FakeData of the same shape."""
    import torchvision

    try:
        sets = [torchvision.datasets.CIFAR10(str(data_dir), train=train, download=False) for train in (True, False)]
        tensors = [(torch.tensor(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets]
    except RuntimeError:
        tensors = []
        for size, offset in ((fake_size, 0), (max(fake_size // 4, 1), fake_size)):
            fake = torchvision.datasets.FakeData(size, (3, 32, 32), 10, random_offset=offset)
            images = [torch.tensor(list(img.tobytes()), dtype=torch.uint8).view(32, 32, 3) for img, _ in fake]
            tensors.append((torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([int(t) for _, t in fake])))
    (x_train, y_train), (x_valid, y_valid) = tensors
    return TensorSet(x_train, y_train, _images), TensorSet(x_valid, y_valid, _images), 10


def build_data(args) -> tuple[TensorSet, TensorSet, int]:
    if args.model == "mlp":
        return _digits(args.seed)
    return _cifar(args.data_dir, args.fake_size)
