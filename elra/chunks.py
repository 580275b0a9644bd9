"""Batching tensor work: chains of elementwise ``torch._foreach_*`` ops run chunk by
chunk (cache blocking), stacks of same-shaped tensors for batched matrix ops, and
lists of one dtype for the multi-tensor kernels (on CUDA a list of mixed dtypes
falls back to one kernel per tensor).

A chain of elementwise passes over many tensors (``d = g``, ``d += c*x``,
``x -= s*d``) reads every tensor from memory once per pass when each pass
covers all tensors. Run on aligned runs of tensors that fit in a core's
cache, the second and later passes find their operands there. The results
are the same numbers: each element goes through the same operations.

On an accelerator every op of a run is a kernel launch and memory is fast:
there a run is as large as a bound on the temporaries allows.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

_SIXTEEN_BIT = {torch.float16, torch.bfloat16}
CHUNK = 1 << 19  # elements per tensor list in one run on CPU (2 MB of float32: the lists of a run fit in a large L3)
DEVICE_CHUNK = 1 << 24  # on an accelerator: few launches, temporaries of at most 64 MB of float32


def runs(lists: Sequence[Sequence], budget: int | None = None, split: bool = False) -> Iterator[list[list]]:
    """Aligned slices of ``lists`` (same length; same-shaped tensors at each index) of about ``budget`` elements.

    With ``split``, a tensor that does not fit in what is left of the current
    run and whose aligned tensors are all contiguous comes as pieces (flat
    views): the first fills the run, the next ones ``budget`` elements each,
    so that no run exceeds ``budget`` (one reused buffer of ``budget``
    elements holds a temporary of any run, :func:`run_scratch`). Otherwise a
    tensor goes into the current run whole, which may then exceed ``budget``.
    Entries that are not tensors (per-tensor weights, say) travel along,
    repeated for every piece. The first list must hold tensors. ``budget``
    defaults to ``CHUNK`` on CPU, ``DEVICE_CHUNK`` elsewhere.
    """
    count = len(lists[0]) if lists else 0
    if budget is None:
        budget = CHUNK if not count or lists[0][0].device.type == "cpu" else DEVICE_CHUNK
    current: list[list] = [[] for _ in lists]
    size = 0
    for i in range(count):
        numel = lists[0][i].numel()
        column = [t[i] for t in lists]
        tensors = [x for x in column if isinstance(x, torch.Tensor)]
        if split and numel > budget - size and all(x.is_contiguous() for x in tensors):
            first = budget - size
            sizes = [first] + [budget] * ((numel - first) // budget) + [(numel - first) % budget]
            sizes = [n for n in sizes if n]
            parts = [x.view(-1).split(sizes) if isinstance(x, torch.Tensor) else [x] * len(sizes) for x in column]
            items = list(zip(*parts))
        else:
            items = [column]
        for item in items:
            for run, x in zip(current, item):
                run.append(x)
            size += item[0].numel()
            if size >= budget:
                yield current
                current, size = [[] for _ in lists], 0
    if current and current[0]:
        yield current


def run_scratch(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A flat buffer of ``CHUNK`` elements in the dtype of ``tensors[0]``, reused run after run for a
    temporary (see :func:`runs`); ``None`` off the CPU, where the caching allocator hands freed blocks back."""
    if not tensors or tensors[0].device.type != "cpu":
        return None
    return torch.empty(CHUNK, dtype=tensors[0].dtype)


def partitioned(columns: list[list], chosen: list[bool]) -> tuple[list[list], list[list]]:
    """Aligned lists cut into the entries ``chosen`` marks and the rest (the lists themselves when all are chosen)."""
    if all(chosen):
        return columns, [[] for _ in columns]
    pick = lambda wanted: [[t for t, c in zip(column, chosen) if c == wanted] for column in columns]  # noqa: E731
    return pick(True), pick(False)


def stacks(tensors: Sequence[torch.Tensor], budget: int) -> list[list[int]]:
    """Indices of ``tensors`` in stacks of one shape, dtype and device, each of at most ``budget``
    elements (or one tensor): one batched op per stack does the work of one op per tensor."""
    classes: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        classes.setdefault((t.shape, t.dtype, t.device), []).append(i)
    result = []
    for (shape, _, _), members in classes.items():
        size = max(1, budget // max(1, shape.numel()))
        result += [members[start : start + size] for start in range(0, len(members), size)]
    return result


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``; a view, not a copy, of a single tensor (do not write into it)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def converted(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` in the dtypes of the aligned ``like``: themselves where they match, else copies
    made by one multi-tensor copy."""
    if _same_dtypes(tensors, like):
        return list(tensors)
    copies = [torch.empty_like(t, dtype=other.dtype) for t, other in zip(tensors, like)]
    torch._foreach_copy_(copies, list(tensors))
    return copies


def in_dtype_of(like: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], *others: Sequence) -> Iterator[list[list]]:
    """``[like, tensors, *others]`` with ``tensors`` in the dtypes of ``like``: the lists themselves
    where they match, else in runs (bounded temporaries) with converted copies."""
    if _same_dtypes(tensors, like):
        yield [list(like), list(tensors), *others]
        return
    for part in runs([like, tensors, *others]):
        yield [part[0], converted(part[1], part[0]), *part[2:]]


def add_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], alpha: float) -> None:
    """``targets += alpha * sources``, computed in the sources' dtype and rounded once into the
    targets' (16-bit parameters, float32 directions) with single-dtype multi-tensor ops.

    A 16-bit result beyond its dtype's range saturates at its largest value:
    rounded to inf it would stay inf through every retrace (``inf - s*u``), and
    the run would retrace for ever.
    """
    if _same_dtypes(targets, sources):
        torch._foreach_add_(list(targets), list(sources), alpha=alpha)
        return
    for xs, ds in runs([targets, sources]):
        wide = converted(xs, ds)
        torch._foreach_add_(wide, ds, alpha=alpha)
        if wide[0] is not xs[0]:  # a run whose dtypes all match was added in place
            _saturate(wide, xs)
            torch._foreach_copy_(xs, wide)


def _saturate(wide: list[torch.Tensor], like: Sequence[torch.Tensor]) -> None:
    """Clamps each of ``wide`` to the finite range of the aligned ``like``'s dtype, where that is 16-bit."""
    for dtype in {x.dtype for x in like} & _SIXTEEN_BIT:
        part = [w for w, x in zip(wide, like) if x.dtype == dtype]
        largest = torch.finfo(dtype).max
        torch._foreach_clamp_min_(part, -largest)
        torch._foreach_clamp_max_(part, largest)


def _same_dtypes(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> bool:
    return all(t.dtype == other.dtype for t, other in zip(tensors, like))
