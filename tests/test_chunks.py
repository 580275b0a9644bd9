"""Cache blocking: the runs cover every element once, aligned across the lists; converted copies."""

import pytest
import torch

from elra.chunks import CHUNK, converted, runs


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
    parts = list(runs([a, b, list(range(len(a)))], budget=1500, split=True))
    assert [t.numel() for t in parts[0][0]] == [3, 1497]  # the contiguous tensor filled the first run,
    assert [t.numel() for t in parts[1][0]][0] == 503  # and the rest of it began the next
    assert all(sum(t.numel() for t in part[0]) <= 1500 for part in parts if 3 not in part[2])  # all but the transposed one fit
    labels = [i for part in runs([a, b, list(range(len(a)))], budget=1500, split=True) for i in part[2]]
    assert labels == [0, 1, 1, 2, 3, 4, 5]  # non-tensor entries travel along, once per piece


@pytest.mark.parametrize("device, runs_expected", [("cpu", 8), ("meta", 1)])
def test_default_runs_are_cache_sized_on_cpu_and_launch_sized_elsewhere(device, runs_expected):
    """On an accelerator every op of a run is a kernel launch: 8 CPU runs' elements are one run there."""
    tensors = [torch.empty(4 * CHUNK, device=device) for _ in range(2)]
    assert len(list(runs([tensors, tensors], split=True))) == runs_expected


def test_converted_copies_hold_the_values_in_the_dtypes_asked_for():
    """Each copy shaped like its source, in the dtype of its ``like``; matching dtypes: the tensors themselves."""
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(shape, generator=gen).bfloat16() for shape in ((3, 4), (5, 2), (7,))]
    sources[1] = sources[1].T  # a transposed source
    for like in ([torch.zeros(1)] * 3, [torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(1)]):
        copies = converted(sources, like)
        assert [c.dtype for c in copies] == [t.dtype for t in like]
        assert all(c.shape == s.shape and torch.equal(c, s.to(c.dtype)) for c, s in zip(copies, sources))
    wide = converted(sources, [torch.zeros(1)] * 3)
    assert all(a is b for a, b in zip(converted(wide, [torch.zeros(1)] * 3), wide))


def test_a_16_bit_sum_beyond_its_range_saturates_at_the_largest_value():
    """x += alpha*d for float16/bfloat16 x and float32 d (beside a float32 x), against float64 clamped to the
    dtype's range: rounded to inf the parameter stayed inf through every retrace."""
    from elra.chunks import add_

    xs = [torch.tensor([60000.0, -60000.0, 1.0]).half(), torch.tensor([3e38, -3e38, 1.0]).bfloat16(), torch.tensor([3e38, 1.0, 2.0])]
    ds = [torch.tensor([1.0, -1.0, 0.5]), torch.tensor([1.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 1.0])]
    expected = [
        (x.double() + alpha * d.double()).clamp(-torch.finfo(x.dtype).max, torch.finfo(x.dtype).max).to(x.dtype)
        for x, d, alpha in zip(xs, ds, [1e4, 1e38, 1e4])
    ]
    for x, d, alpha in zip(xs, ds, [1e4, 1e38, 1e4]):
        add_([x], [d], alpha)
    mixed = [torch.tensor([60000.0]).half(), torch.tensor([1.0]), torch.tensor([3e38]).bfloat16()]
    add_(mixed, [torch.tensor([1.0])] * 3, 1e38)  # one run, three dtypes
    assert all(torch.equal(x, want) for x, want in zip(xs, expected))
    assert [m.item() for m in mixed] == [65504.0, torch.tensor(1e38).item(), torch.finfo(torch.bfloat16).max]
