"""Global scalars: the dot products of one real step, in one small vector.

Each real step needs a few inner products per parameter group (``|g|^2``,
``<g, B>`` ...) and the losses of its micro-batches. They are computed tensor
by tensor on the tensors as they are (no flat copy), accumulated into one
float64 vector on the parameters' device and brought to the host with a
single transfer.
"""

from __future__ import annotations

from typing import Sequence

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner product of two same-shaped tensors, accumulated in at least float32."""
    if a.dtype in _LOW_PRECISION:
        a, b = a.float(), b.float()
    return torch.dot(a.reshape(-1), b.reshape(-1))


def accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class ScalarBatch:
    """Collects scalar terms into numbered slots, then reads them all at once."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.slots = slots
        self.device = device
        self.dtype = accumulation_dtype(device)
        self._terms: list[torch.Tensor] = []
        self._index: list[int] = []

    def add(self, slot: int, term: torch.Tensor) -> None:
        self._terms.append(term)
        self._index.append(slot)

    def read(self, losses: Sequence[float | torch.Tensor]) -> tuple[list[float], list[float]]:
        """Return (slot values, losses) with one device-to-host transfer."""
        vector = torch.zeros(self.slots, dtype=self.dtype, device=self.device)
        if self._terms:
            terms = torch.stack([t.to(self.dtype) for t in self._terms])
            index = torch.tensor(self._index, device=self.device)
            vector.index_add_(0, index, terms)
        values = torch.cat([vector, _loss_vector(losses, self.dtype, self.device)]).tolist()
        return values[: self.slots], values[self.slots :]


def _loss_vector(losses: Sequence[float | torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if all(not isinstance(v, torch.Tensor) for v in losses):
        return torch.tensor([float(v) for v in losses], dtype=dtype, device=device)
    return torch.stack(
        [
            v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=dtype, device=device)
            for v in losses
        ]
    )
