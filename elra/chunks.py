"""Cache blocking: chains of elementwise ``torch._foreach_*`` ops, run chunk by chunk.

A chain of elementwise passes over many tensors (``d = g``, ``d += c*x``,
``x -= s*d``) reads every tensor from memory once per pass when each pass
covers all tensors. Run on aligned runs of tensors that fit in a core's
cache, the second and later passes find their operands there. The results
are the same numbers: each element goes through the same operations.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

CHUNK = 1 << 16  # elements per tensor list in one run (about 256 KB of float32: a few lists fit in L2)


def runs(
    lists: Sequence[Sequence[torch.Tensor]], budget: int = CHUNK, split: bool = False
) -> Iterator[list[list[torch.Tensor]]]:
    """Aligned slices of ``lists`` (same length, same-shaped tensors at each index) of about ``budget`` elements.

    With ``split``, a tensor above ``budget`` elements whose aligned tensors
    are all contiguous comes as pieces (flat views) of ``budget`` elements,
    one run each; otherwise it is a run of its own.
    """
    start, size = 0, 0
    count = len(lists[0]) if lists else 0
    for i in range(count):
        numel = lists[0][i].numel()
        if numel > budget and split and all(t[i].is_contiguous() for t in lists):
            if start < i:
                yield [list(t[start:i]) for t in lists]
            pieces = [t[i].view(-1).split(budget) for t in lists]
            for k in range(len(pieces[0])):
                yield [[p[k]] for p in pieces]
            start, size = i + 1, 0
            continue
        size += numel
        if size >= budget:
            yield [list(t[start : i + 1]) for t in lists]
            start, size = i + 1, 0
    if start < count:
        yield [list(t[start:]) for t in lists]
