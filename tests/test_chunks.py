"""Cache blocking: the runs cover every element once, aligned across the lists."""

import pytest
import torch

from elra.chunks import runs


@pytest.mark.parametrize("split", [False, True])
def test_runs_cover_every_element_once_and_stay_aligned(split):
    shapes = [(3,), (50, 40), (7,), (1000, 10), (5, 5), ()]
    a = [torch.zeros(s) for s in shapes]
    b = [torch.zeros(s) for s in shapes]
    b[3] = torch.zeros(10, 1000).t()  # not contiguous: never split
    seen = 0
    for part_a, part_b in runs([a, b], budget=1500, split=split):
        assert [t.shape for t in part_a] == [t.shape for t in part_b]
        torch._foreach_add_(part_a, 1.0)
        torch._foreach_add_(part_b, part_a)
        seen += len(part_a)
    assert all(torch.equal(t, torch.ones(t.shape)) for t in a + b)
    a[1] = torch.zeros(2000)
    b[1] = torch.zeros(2000)
    pieces = [len(part[0]) for part in runs([a, b], budget=1500, split=True)]
    assert len(pieces) > 3 and 1 in pieces  # the large contiguous tensor came in pieces
