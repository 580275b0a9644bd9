"""torch's fused AdamW and SGD kernels, where they compute ELRA's accept.

An accepted step over Adam's direction (moments take the gradient, then
``x <- decay*x - step*u_new``, :class:`elra.geometry.AdamDirection`) is term
for term an AdamW step with learning rate ``step`` and decoupled weight decay
``(1-decay)/step``; P2M's accept (``d <- keep*d + s*g + c*x``, then
``x <- x - step*d``) is an SGD step with momentum ``keep`` and coupled weight
decay ``c``. torch's fused kernels do each in one pass over the tensors where
the foreach chains take three to eight; the numbers agree to rounding.

The kernels index memory flat, so every tensor of a parameter must be
contiguous (a transposed parameter beside a contiguous gradient would be
updated wrongly, silently), of one floating dtype (no float32 moments beside
16-bit parameters), on a CPU or CUDA device. :func:`split_fusable` sorts the
parameters; the others take the foreach chains.
"""

from __future__ import annotations

import struct
from itertools import accumulate, chain, compress
from operator import add, attrgetter, gt
from typing import Callable

import torch

from .chunks import partitioned

_DTYPES = (torch.float32, torch.float64)
_DTYPE, _IS_CPU, _IS_CUDA, _NBYTES = attrgetter("dtype"), attrgetter("is_cpu"), attrgetter("is_cuda"), attrgetter("nbytes")


def fusable(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether parameter ``x`` and its tensors (gradient, state) can go through a fused kernel together.

    Runs once per parameter and step, so it reads the cheapest tensor properties.
    """
    dtype = x.dtype
    if dtype not in _DTYPES or not (x.is_cpu or x.is_cuda) or not x.is_contiguous():
        return False
    device = x.device
    for t in others:
        if t.dtype != dtype or not t.is_contiguous() or t.device != device:
            return False
    return True


def split_fusable(columns: list[list]) -> tuple[list[list], list[list]]:
    """Aligned lists (parameters, then their tensors) cut into the parameters :func:`fusable` takes and the rest.

    The common case, every tensor contiguous and of one float dtype on one device, is checked on the whole lists.
    A gradient (``columns[1]``) that several parameters hold (``q.grad = p.grad``) stays out: the kernels
    unscale it in place once per parameter, so the second would step with a gradient divided twice.
    """
    everything = list(chain.from_iterable(columns))
    grads = columns[1] if len(columns) > 1 else []
    shared = _shared(grads)
    if not shared and everything and everything[0].dtype in _DTYPES and _one_kind(everything):
        if all(map(torch.Tensor.is_contiguous, everything)):
            return columns, [[] for _ in columns]
    chosen = list(map(fusable, *columns))
    if shared:
        chosen = [c and not (g.numel() and g.data_ptr() in shared) for c, g in zip(chosen, grads)]
    return partitioned(columns, chosen)


def _shared(grads: list[torch.Tensor]) -> set[int]:
    """The addresses of the gradients (not empty) whose memory another parameter's gradient overlaps: one tensor
    that several parameters hold (``q.grad = p.grad``), or overlapping views of one buffer (``q.grad = p.grad[1:]``:
    its rows were divided twice, once for each parameter, before ``q``'s step read them).

    The kernels index memory flat (contiguous tensors: an address range each). Gradients that each begin a
    buffer of their own (autograd's) cannot overlap: two C-level passes tell. Others (DDP's bucket views) take
    C-level passes over the ranges sorted by address; empty gradients (FSDP shards) may share an address.
    """
    if not any(map(torch.Tensor.storage_offset, grads)) and len(set(map(torch.Tensor.data_ptr, grads))) == len(grads):
        return set()
    present = list(compress(grads, map(torch.Tensor.numel, grads)))
    starts = list(map(torch.Tensor.data_ptr, present))
    ends = list(map(add, starts, map(_NBYTES, present)))
    order = sorted(range(len(present)), key=starts.__getitem__)
    reach = accumulate(map(ends.__getitem__, order), max)  # the furthest end of the ranges before each
    if not any(map(gt, reach, map(starts.__getitem__, order[1:]))):
        return set()
    shared, furthest, owner = set(), -1, -1
    for i in order:
        if starts[i] < furthest:
            shared.update((starts[i], starts[owner]))
        if ends[i] > furthest:
            furthest, owner = ends[i], i
    return shared


def _one_kind(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` share one dtype and one device, checked by C-level passes over their
    attributes: a step's hundreds of tensors would cost a Python call each otherwise."""
    if len(set(map(_DTYPE, tensors))) != 1 or len(set(map(torch.Tensor.get_device, tensors))) != 1:
        return False
    return all(map(_IS_CPU, tensors)) or all(map(_IS_CUDA, tensors))  # get_device is -1 for every non-CUDA kind


def adamw_accept(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    moment_steps: int,
    betas: tuple[float, float],
    eps: float,
    step: float,
    decay: float,
    grad_scale: float,
) -> None:
    """Moments take ``grad_scale * g``, then ``x <- decay*x - step*u`` (``u`` after ``moment_steps`` updates).

    Every parameter must pass :func:`fusable`; ``step > 0`` or ``decay == 1``.
    """

    def launch(device: torch.device, columns: list[list[torch.Tensor]], scale: torch.Tensor | None) -> None:
        count = torch.tensor(float(moment_steps), dtype=torch.float32, device=device)
        torch._fused_adamw_(
            *columns, [], [count] * len(columns[0]),
            lr=step, beta1=betas[0], beta2=betas[1], weight_decay=(1.0 - decay) / step if decay != 1.0 else 0.0,
            eps=eps, amsgrad=False, maximize=False, grad_scale=scale,
        )  # fmt: skip

    _by_device([params, grads, ms, vs], grad_scale, launch)


def sgd_accept(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    dirs: list[torch.Tensor],
    keep: float,
    grad_scale: float,
    param_scale: float,
    step: float,
) -> None:
    """``d <- keep*d + grad_scale*g + param_scale*x`` (``keep == 0``: without the old ``d``), then ``x <- x - step*d``.

    Every parameter must pass :func:`fusable`.
    """

    def launch(device: torch.device, columns: list[list[torch.Tensor]], scale: torch.Tensor | None) -> None:
        torch._fused_sgd_(
            *columns, weight_decay=param_scale, momentum=keep or 1.0, lr=step,
            dampening=0.0, nesterov=False, maximize=False, is_first_step=keep == 0.0, grad_scale=scale, found_inf=None,
        )  # fmt: skip

    _by_device([params, grads, dirs], grad_scale, launch)


def _by_device(
    columns: list[list[torch.Tensor]],
    grad_scale: float,
    launch: Callable[[torch.device, list[list[torch.Tensor]], torch.Tensor | None], None],
) -> None:
    """One ``launch`` per (device, dtype) of the parameters (``columns[0]``; ``columns[1]`` their gradients),
    with the kernels' gradient scale (they divide by it).

    The kernels leave the divided gradients in place: they are restored, so
    the caller's ``.grad`` is what it was (to rounding, where the scale is no
    power of two: a bit-exact copy cost P2M's step with momentum 15% on the CPU).

    The kernels take their scale in float32. Where float32 cannot hold it
    (P2M's ``(1-momentum)/k``, momentum 0.37: 1/0.21), float64 parameters got
    a float32-rounded gradient term (1e-8 off the chains): there the
    gradients are scaled in float64 instead, the kernel given none.
    """
    params = columns[0]
    if _one_kind(params):
        parts = [(params[0].device, columns)]
    else:
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(params):
            groups.setdefault((x.device, x.dtype), []).append(i)
        parts = [(device, [[column[i] for i in members] for column in columns]) for (device, _), members in groups.items()]
    for device, part in parts:
        if grad_scale == 1.0:
            launch(device, part, None)
            continue
        if any(g._base is not None for g in part[1]):
            # views of one buffer share one version counter (FSDP2's gradients of a unit): scaled and restored in
            # place through aliases that leave it alone, or another optimizer's collected gradients beside these
            # read the bump as a new backward (its state_dict() refused as "between backward() and step()")
            part = [part[0], [g.data for g in part[1]], *part[2:]]
        if part[0][0].dtype == torch.float64 and not _in_float32(1.0 / grad_scale):
            torch._foreach_mul_(part[1], grad_scale)
            launch(device, part, None)
        else:
            launch(device, part, torch.tensor(1.0 / grad_scale, dtype=torch.float32, device=device))
        torch._foreach_div_(part[1], grad_scale)


def _in_float32(value: float) -> bool:
    """Whether float32 holds ``value`` exactly."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0] == value
    except OverflowError:
        return False
