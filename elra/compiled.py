"""Compiled sums (``ElraOptimizer(..., compiled=True)``): Adam's direction and its products in one pass.

Before each decision, Adam's direction needs ``u = m/(sqrt(v)+eps)`` of the
unchanged moments and six inner products per tensor: ``|x|^2``, ``<m,u>``,
``|u|^2``, ``<g,u>``, ``|g|^2`` and ``|m|^2``. Eager torch computes them in
nine ops per cache-sized chunk (:mod:`elra.chunks`), each a pass of its own
over the chunk; one kernel made by ``torch.compile`` reads x, g, m and v once.
On the 9.4M-parameter MLP of ``benchmarks/step_cost.py`` the sums take about
13 ms instead of 20 at one CPU thread.

The kernel is compiled at the second step, the first whose sums it computes
(seconds; it needs a C++ compiler).
It runs on CPU tensors of at least :data:`MIN_ELEMENTS` elements, one call
each: below that a call's overhead (about 25 us) outweighs what it saves, and
on a GPU the eager sums are a few large kernels already (on an H100 the
MLP's whole step took 1.0 ms eager, 2.3 ms compiled). When compiling
fails, ELRA logs why once and keeps the eager path, which computes the same
sums (to rounding: the kernel adds in its own order).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .chunks import partitioned
from .reduce import weighted_sum

logger = logging.getLogger("elra")

MIN_ELEMENTS = 1 << 16
_DTYPES = (torch.float32, torch.float64)
_kernel = None
_failed = False


def _adam_sums(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    u = m / (v.sqrt() + shift)
    return torch.stack([(x * x).sum(), (m * u).sum(), (u * u).sum(), (g * u).sum(), (g * g).sum(), (m * m).sum()])


def split_large(columns: list[list]) -> tuple[list[list], list[list]]:
    """Aligned lists (x, g, m, v, then anything that travels along) cut into the parameters the kernel
    takes (at least :data:`MIN_ELEMENTS` elements, x, g, m and v of one float32/float64 dtype on the
    CPU) and the rest."""

    def takes(x: torch.Tensor, *others) -> bool:
        return (
            x.numel() >= MIN_ELEMENTS
            and x.dtype in _DTYPES
            and x.is_cpu
            and all(t.dtype == x.dtype and t.is_cpu for t in others[:3])
        )

    return partitioned(columns, list(map(takes, *columns)))


def adam_sums(
    xs: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: Sequence[float],
    shift: float,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """``sum_i weights[i] * (|x|^2, <m,u>, |u|^2, <g,u>, |g|^2, |m|^2)`` of the tensors :func:`split_large`
    chose, with ``u = m/(sqrt(v)+shift)``, in ``dtype``; ``None`` when the kernel cannot be compiled."""
    global _kernel, _failed
    if _failed:
        return None
    if _kernel is None:
        if torch._dynamo.config.disable:  # TORCH_COMPILE_DISABLE: it would run uncompiled, with tensor-sized temporaries
            _failed = True
            logger.warning("ELRA's compiled=True has no effect: torch.compile is disabled; it computes its sums eagerly")
            return None
        _kernel = torch.compile(_adam_sums, dynamic=True, fullgraph=True)
    shifts = {x.dtype: torch.tensor(shift, dtype=x.dtype) for x in xs}
    try:
        rows = [_kernel(*(t.reshape(-1) for t in tensors), shifts[tensors[0].dtype]) for tensors in zip(xs, gs, ms, vs)]
    except Exception as error:  # noqa: BLE001 - a compiler's failure leaves the eager path, which is correct
        _failed = True
        logger.warning("ELRA could not compile its sums (%s: %s); it computes them eagerly", type(error).__name__, error)
        return None
    return weighted_sum(torch.stack(rows).to(dtype), weights)
