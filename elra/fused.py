"""torch's fused AdamW kernel, where it computes the accept of Adam's direction.

An accepted step over Adam's direction (moments take the gradient, then
``x <- decay*x - step*u_new``, :class:`elra.geometry.AdamDirection`) is term
for term an AdamW step with learning rate ``step`` and decoupled weight decay
``(1-decay)/step``. torch's fused kernel does it in one pass over x, g, m and
v, where the foreach chain takes eight; the numbers agree to rounding.

The kernel indexes memory flat, so every tensor of a parameter must be
contiguous (a transposed parameter beside a contiguous gradient would be
updated wrongly, silently), of one floating dtype (no float32 moments beside
16-bit parameters), on a CPU or CUDA device. :func:`fusable` tells which
parameters qualify; the others take the foreach chain.
"""

from __future__ import annotations

import torch

_DEVICES = ("cpu", "cuda")
_DTYPES = (torch.float32, torch.float64)


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether one parameter's tensors (x, g, m, v) can go through the fused kernel together."""
    first = tensors[0]
    return (
        hasattr(torch, "_fused_adamw_")
        and first.device.type in _DEVICES
        and first.dtype in _DTYPES
        and all(x.dtype == first.dtype and x.device == first.device and x.is_contiguous() for x in tensors)
    )


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

    Every tensor must pass :func:`fusable`; ``step > 0`` or ``decay == 1``.
    The kernel divides the gradients by its scale in place: they are
    restored, so the caller's ``.grad`` is what it was (to rounding).
    """
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(params):
        groups.setdefault((x.device, x.dtype), []).append(i)
    weight_decay = (1.0 - decay) / step if decay != 1.0 else 0.0
    for (device, _), members in groups.items():
        pick = lambda tensors: [tensors[i] for i in members]  # noqa: E731
        count = torch.tensor(float(moment_steps), dtype=torch.float32, device=device)
        scale = None if grad_scale == 1.0 else torch.tensor(1.0 / grad_scale, dtype=torch.float32, device=device)
        torch._fused_adamw_(
            pick(params),
            pick(grads),
            pick(ms),
            pick(vs),
            [],
            [count] * len(members),
            lr=step,
            beta1=betas[0],
            beta2=betas[1],
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
            grad_scale=scale,
        )
        if scale is not None:
            torch._foreach_div_(pick(grads), grad_scale)
