"""Datasets of the launcher as tensors, split into per-rank batches deterministically.

Each epoch's order comes from a generator seeded with the epoch, so every rank
(and a resumed job) sees the same global batches; rank r takes every world-th
sample of each global batch. Held-out data (``epoch=None``) is a fixed list
of samples, each rank taking every world-th one, padded to one count on every
rank with samples whose targets are ``IGNORED``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from launch.text import CharCorpus, TextTooShort

IGNORED = -100  # cross_entropy's ignore_index: the target of a held-out sample that only pads a rank's share
CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def held_out_share(count: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's indices of ``count`` held-out samples (every ``world``-th) and which of them only pad: every
    rank evaluates as many, so that sharded models run the same forwards on every rank (one more batch on some
    ranks left the others waiting in FSDP's gathers), and every sample once (before, the remainder beyond a
    multiple of the ranks was left out, and the held-out numbers depended on the number of ranks)."""
    index = torch.arange(rank, -(-count // world) * world, world)
    return index.clamp(max=count - 1), index >= count


def _ignoring(targets: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """``targets`` with those of the padding samples (``padding``, one flag per sample) ``IGNORED``."""
    return targets.masked_fill(padding.view(-1, *[1] * (targets.dim() - 1)), IGNORED)


class TensorSet:
    """Inputs and labels in memory, with a per-batch transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def fewest_training_samples(self) -> int:
        """Samples every epoch draws its training batches from (all of them)."""
        return len(self)

    def training_samples(self, epoch: int) -> int:
        """Samples epoch ``epoch`` draws its training batches from (all of them)."""
        return len(self)

    def loader(self, epoch: int | None, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches of epoch ``epoch`` (equal on all ranks), or the held-out samples once (``None``,
        :func:`held_out_share`)."""
        n = len(self)
        if epoch is None:
            mine, padding = held_out_share(n, rank, world)
            for idx, pad in zip(mine.split(batch_size), padding.split(batch_size)):
                yield self.transform(self.x[idx]), _ignoring(self.y[idx], pad)
            return
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))
        per_step = batch_size * world
        for start in range(0, n - per_step + 1, per_step):
            idx = order[start : start + per_step][rank::world]
            yield self.transform(self.x[idx]), self.y[idx]


class TextWindows:
    """Windows of ``context`` characters of a text and their next-character targets.

    Training windows start at a per-epoch random offset in ``[0, context)`` plus
    multiples of ``context``, shuffled per epoch; held-out windows are the
    non-overlapping ones from the start, the same for every run, strategy and
    number of ranks (:func:`held_out_share`).
    """

    def __init__(self, ids: torch.Tensor, context: int, part: str = "the text") -> None:
        """``part`` names the characters in the error: at least ``2 * context`` are needed, so that
        every epoch's offset leaves one whole window (and its next-character target)."""
        if len(ids) < 2 * context:
            raise TextTooShort(
                f"{part} has {len(ids)} characters, too few for windows of --context {context}: it needs at least "
                f"{2 * context}; give a longer --text or a smaller --context"
            )
        self.ids, self.context = ids, context

    def _starts(self, shift: int) -> torch.Tensor:
        return torch.arange(shift, len(self.ids) - self.context, self.context)

    def __len__(self) -> int:
        return len(self._starts(0))

    def fewest_training_samples(self) -> int:
        """Windows every epoch draws its training batches from: an epoch's offset can cost the last one."""
        return len(self._starts(self.context - 1))

    def training_samples(self, epoch: int) -> int:
        """Windows epoch ``epoch`` draws its training batches from (at its offset)."""
        return len(self._epoch_starts(epoch)[0])

    def _epoch_starts(self, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        """Epoch ``epoch``'s window starts, at its random offset, and the generator that shuffles them."""
        generator = torch.Generator().manual_seed(1000 + epoch)
        shift = int(torch.randint(self.context, (), generator=generator))
        return self._starts(shift), generator

    def loader(self, epoch: int | None, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches of epoch ``epoch`` (equal on all ranks), or the held-out windows once (``None``)."""
        if epoch is None:
            starts = self._starts(0)
            mine, padding = held_out_share(len(starts), rank, world)
            for part, pad in zip(starts[mine].split(batch_size), padding.split(batch_size)):
                inputs, targets = CharCorpus.windows(self.ids, self.context, part)
                yield inputs, _ignoring(targets, pad)
            return
        starts, generator = self._epoch_starts(epoch)
        starts = starts[torch.randperm(len(starts), generator=generator)]
        per_step = batch_size * world
        for first in range(0, len(starts) - per_step + 1, per_step):
            yield CharCorpus.windows(self.ids, self.context, starts[first : first + per_step][rank::world])


class Data(NamedTuple):
    """A job's training and held-out sets, its number of classes (the vocabulary size for ``gpt``),
    ``source``: what its inputs mean where the options do not say it, and ``text_sha256`` (``gpt``): which
    text, since one edited at the same path splits anew (both recorded with checkpoints)."""

    train: TensorSet | TextWindows
    valid: TensorSet | TextWindows
    classes: int
    source: str = ""
    text_sha256: str = ""


def _text(path: Path | None, context: int) -> Data:
    """The characters of ``path`` (the standard library's source when ``None``); its source names the
    vocabulary: a text of another one gives the same ids to other characters."""
    corpus = CharCorpus.load(path)
    train = TextWindows(corpus.train, context, "the training part of the text (its first 90%)")
    valid = TextWindows(corpus.valid, context, "the held-out part of the text (its last 10%)")
    vocab = "".join(corpus.vocab).encode("utf-8")
    digest = hashlib.sha256(vocab).hexdigest()[:12]
    ids = torch.cat([corpus.train, corpus.valid]).numpy().tobytes()  # with the vocabulary: the text itself
    text = hashlib.sha256(vocab + ids).hexdigest()[:12]
    return Data(train, valid, len(corpus.vocab), f"a vocabulary of {len(corpus.vocab)} characters (sha256 {digest})", text)


def _digits(seed: int) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    train, valid = order[:split], order[split:]
    return Data(TensorSet(x[train], y[train], _identity), TensorSet(x[valid], y[valid], _identity), 10)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _images(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - CIFAR_MEAN) / CIFAR_STD


def _cifar(data_dir: Path, fake_size: int) -> Data:
    """CIFAR-10 from ``data_dir`` if its files are there, else torchvision's FakeData of the same shape."""
    import torchvision

    try:
        sets = [torchvision.datasets.CIFAR10(str(data_dir), train=train, download=False) for train in (True, False)]
        tensors = [(torch.tensor(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets]
        source = "CIFAR-10"
    except RuntimeError:
        source = f"FakeData of {fake_size} training images (no CIFAR-10 files)"
        tensors = []
        for size, offset in ((fake_size, 0), (max(fake_size // 4, 1), fake_size)):
            fake = torchvision.datasets.FakeData(size, (3, 32, 32), 10, random_offset=offset)
            images = [torch.tensor(list(img.tobytes()), dtype=torch.uint8).view(32, 32, 3) for img, _ in fake]
            tensors.append((torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([int(t) for _, t in fake])))
    (x_train, y_train), (x_valid, y_valid) = tensors
    return Data(TensorSet(x_train, y_train, _images), TensorSet(x_valid, y_valid, _images), 10, source)


def build_data(args) -> Data:
    """The data of ``--model`` and its options."""
    if args.model == "mlp":
        return _digits(args.seed)
    if args.model == "gpt":
        return _text(args.text, args.context)
    return _cifar(args.data_dir, args.fake_size)
