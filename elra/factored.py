"""Adam's direction with an Adafactor-style factored second moment (``preconditioner="factored"``).

A parameter of two or more dimensions is seen as a matrix of ``rows =
shape[0]`` by ``cols = numel / rows``; its second moment is kept as two EMAs,
of the row sums and of the column sums of ``g^2`` (Shazeer & Stern, 2018):

    R <- b2*R + (1-b2)*sum_j g_ij^2,   C <- b2*C + (1-b2)*sum_i g_ij^2
    v_ij = R_i * C_j / sum(C)          (sum(C) = sum(R): both are the EMA of |g|^2)

``v`` carries Adam's bias (``(1-b2^t)`` times the estimate, as the EMAs share
it and the quotient keeps one factor), so the direction is Adam's
``u = m_hat/(sqrt(v_hat) + eps)`` of :mod:`elra.geometry` with this ``v``, and
the full first moment ``exp_avg``. Tensors of fewer than two dimensions, and
those where ``rows + cols >= rows * cols`` (factoring would not save memory),
keep Adam's full ``exp_avg_sq``. Held state: one parameter's worth (``m``)
plus ``rows + cols`` numbers per matrix plus the vectors' full ``v``: about
1.0-1.05x the parameter bytes on transformer-like models, against Adam's 2x.

Sharding. FSDP2 shards dim 0 (``Shard(0)``): a rank holds whole rows, so its
row sums are complete and ``R`` is sharded like the parameter's rows (a
DTensor with the parameter's mesh and placements, saved and resharded by
``torch.distributed.checkpoint`` like the parameter); the column sums are
partial. They ride in the step's one all-reduce as a vector block
(:meth:`elra.reduce.ScalarBatch.add_vector`), weighted by ``1/replicas`` like
the scalars, so ``C`` (a plain tensor, the same on every rank) equals a single
process's; under DDP (replicas) the same weighted sum gives the full sums; a
single process issues no collective. FSDP1's flat parameters have lost their
shape: factoring them would give another ``v`` than one process, so they are
refused (use FSDP2's ``fully_shard``, or ``preconditioner="adam"``), as are
DTensors sharded along another dimension than 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .chunks import stacked, stacks
from .geometry import AdamDirection, GroupTensors, moment_dtype, moment_zeros
from .reduce import ScalarBatch, VectorBlock, local

ROW, COL = "exp_avg_sq_row", "exp_avg_sq_col"
_LOW_PRECISION = (torch.float16, torch.bfloat16)
STACK_ELEMENTS = 1 << 22  # factored matrices handled together: bounds the stacked copies (16 MB of float32)


@dataclass
class Factors:
    """The factored second moment of one parameter: its local rows' ``R``, all columns' ``C``."""

    row: torch.Tensor
    col: torch.Tensor
    row_sq: torch.Tensor | None = None  # this step's local row sums of g^2
    col_sq: VectorBlock | None = None  # this step's column sums of g^2, summed over ranks by the step's all-reduce

    @property
    def shape(self) -> tuple[int, int]:
        return self.row.numel(), self.col.numel()


def take(factors: list[Factors], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keep the row sums of each ``grad^2`` in its :class:`Factors`; return the (partial) column sums.

    Same-shaped gradients go in stacks: one square and two sums per stack.
    """
    matrices = [g.reshape(f.shape) for f, g in zip(factors, grads)]
    col_sqs: list[torch.Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for members in stacks(matrices, STACK_ELEMENTS):
        g = stacked([matrices[i] for i in members])
        square = (g.float() if g.dtype in _LOW_PRECISION else g).square()
        for i, row_sq, col_sq in zip(members, square.sum(2).unbind(), square.sum(1).unbind()):
            factors[i].row_sq, col_sqs[i] = row_sq, col_sq
    return col_sqs


def update(factors: list[Factors], beta2: float, value: float) -> None:
    """Every ``R``, ``C`` takes ``value`` times this step's sums (multi-tensor ops)."""
    rows = [f.row for f in factors], [f.row_sq for f in factors]
    cols = [f.col for f in factors], [f.col_sq.value for f in factors]
    for held, sums in (rows, cols):
        torch._foreach_mul_(held, beta2)
        torch._foreach_add_(held, sums, alpha=value)


def divided(ms: list[torch.Tensor], factors: list[Factors], eps: float) -> list[torch.Tensor]:
    """``m/(sqrt(v) + eps)`` of each factored parameter, ``v = R C^T / sum(C)`` (0 where nothing was seen).

    Same-shaped matrices go in stacks: ``sqrt(v)`` is built and applied once per stack.
    """
    matrices = [m.reshape(f.shape) for m, f in zip(ms, factors)]
    result: list[torch.Tensor] = [None] * len(ms)  # type: ignore[list-item]
    for members in stacks(matrices, STACK_ELEMENTS):
        rows = stacked([factors[i].row for i in members])
        cols = stacked([factors[i].col for i in members])
        total = cols.sum(1, keepdim=True).clamp_min(torch.finfo(cols.dtype).tiny)
        root = (rows.unsqueeze(2) * (cols / total).unsqueeze(1)).sqrt_().add_(eps)
        for i, u in zip(members, (stacked([matrices[i] for i in members]) / root).unbind()):
            result[i] = u.view(ms[i].shape)
    return result


@dataclass
class FactoredTensors(GroupTensors):
    """:class:`GroupTensors` plus every factored parameter of the group with its weight (1/replicas)."""

    factors: list[tuple[Factors, float | None]] = field(default_factory=list)  # None: this rank alone holds it


def _alone(p: torch.Tensor, replicas) -> bool:
    """Whether this rank alone holds ``p`` whole (a partition of ZeroRedundancyOptimizer or of a pipeline, told by
    ``replicas``): its column sums are complete here. A DTensor's local part is a shard (FSDP2) or a replica."""
    return replicas(p) == 1 and not hasattr(p, "placements")


def _matrix(p: torch.Tensor) -> tuple[int, int] | None:
    """``(rows, cols)`` of a parameter whose second moment is factored; ``None``: Adam's full ``v``.

    Raises for layouts where factoring the local part would not give a single process's ``v``.
    """
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(
            'preconditioner="factored" cannot factor the flat parameters of FSDP1 (FullyShardedDataParallel): '
            "they have lost their shape, and a full second moment instead would silently change the math. "
            'Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), or use preconditioner="adam"'
        )
    if p.dim() < 2:
        return None
    rows = p.shape[0]
    cols = p.numel() // rows if rows else 0
    if rows + cols >= rows * cols:
        return None
    placements = getattr(p, "placements", ())
    if placements and not _rows_sharded(p, placements):
        raise ValueError(
            f'preconditioner="factored" needs matrix parameters sharded along dim 0 only (FSDP2\'s default), '
            f"got a parameter of shape {tuple(p.shape)} with placements {placements}: "
            'shard along dim 0, or use preconditioner="adam"'
        )
    return rows, cols


def _rows_sharded(p: torch.Tensor, placements) -> bool:
    """Whether a DTensor is replicated or sharded along dim 0 only (whole rows on each rank)."""
    from torch.distributed.tensor import Shard

    along_rows = all(pl.is_replicate() or (type(pl) is Shard and pl.dim == 0) for pl in placements)
    return along_rows and tuple(local(p).shape[1:]) == tuple(p.shape[1:])


def _row_state(p: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeros for ``R``: sharded like the parameter's rows (a DTensor for a DTensor parameter)."""
    if not hasattr(p, "placements"):
        return torch.zeros(rows, dtype=moment_dtype(p), device=p.device)
    from torch.distributed.tensor import DTensor

    part = local(p)
    zeros = torch.zeros(part.shape[0], dtype=moment_dtype(p), device=part.device)
    return DTensor.from_local(zeros, p.device_mesh, p.placements, run_check=False, shape=torch.Size([rows]), stride=(1,))


class FactoredDirection(AdamDirection):
    """Adam's direction over a factored second moment (``preconditioner="factored"``)."""

    def new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = _matrix(p)
        if shape is None:
            return super().new_state(p)
        rows, cols = shape
        return {
            "exp_avg": moment_zeros(p),
            ROW: _row_state(p, rows),
            COL: torch.zeros(cols, dtype=moment_dtype(p), device=local(p).device),
        }

    def state_shapes(self, p: torch.Tensor) -> dict[str, torch.Size]:
        shape = _matrix(p)
        if shape is None:
            return super().state_shapes(p)
        return {"exp_avg": p.shape, ROW: torch.Size([shape[0]]), COL: torch.Size([shape[1]])}

    @staticmethod
    def moments(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        if ROW not in state:
            return AdamDirection.moments(state)
        return local(state["exp_avg"]), Factors(local(state[ROW]), local(state[COL]))

    def vector_length(self, params: list[torch.Tensor], replicas) -> int:
        """The column sums of every factored parameter that other ranks hold too, with a gradient or not (a fixed
        layout)."""
        shapes = zip(params, map(_matrix, params))
        return sum(shape[1] for p, shape in shapes if shape is not None and not _alone(p, replicas))

    def gather(self, group: dict[str, Any], state, moved: set, with_gradient: bool, replicas) -> FactoredTensors:
        tensors = FactoredTensors(**vars(super().gather(group, state, moved, with_gradient, replicas)))
        with_grad = {id(p): v for p, v in zip(tensors.owners, tensors.vs)}
        for p in group["params"]:
            if ROW in state[p]:
                factors = with_grad.get(id(p)) or self.moments(state[p])[1]
                tensors.factors.append((factors, None if _alone(p, replicas) else 1.0 / replicas(p)))
        return tensors

    def add_sums(self, batch: ScalarBatch, tensors: FactoredTensors, t: int) -> None:
        """Adam's terms, and the column sums of ``g^2`` of every factored parameter as vector blocks."""
        super().add_sums(batch, tensors, t)
        partial: dict[int, torch.Tensor] = {}
        with_grad = [(v, g) for g, v in zip(tensors.grads, tensors.vs) if isinstance(v, Factors)]
        if with_grad:
            factored, grads = map(list, zip(*with_grad))
            partial = {id(f): cols for f, cols in zip(factored, take(factored, grads))}
        for factors, weight in tensors.factors:
            cols = partial.get(id(factors))
            cols = torch.zeros_like(factors.col) if cols is None else cols
            if weight is None:  # complete here: summed with other ranks' column sums of other matrices, it mixed them
                factors.col_sq = VectorBlock(cols, 1.0)
                factors.col_sq.value = cols
            else:
                factors.col_sq = batch.add_vector(cols, weight)

    def update_moments(self, tensors: GroupTensors, grad_scale: float) -> None:
        full, factored = _split(tensors.vs)
        super().update_moments(_pick(tensors, full), grad_scale)
        if not factored:
            return
        self.update_momentum(_pick(tensors, factored), grad_scale)
        update([tensors.vs[i] for i in factored], self.beta2, (1.0 - self.beta2) * grad_scale**2)

    def start_second_moment(self, tensors: GroupTensors, t: int, grad_scale: float) -> None:
        """As :meth:`AdamDirection.start_second_moment`; a factored ``v`` from this step's row and column sums."""
        full, factored = _split(tensors.vs)
        super().start_second_moment(_pick(tensors, full), t, grad_scale)
        value = (1.0 - self.beta2**t) * grad_scale**2
        for factors in (tensors.vs[i] for i in factored):
            factors.row.copy_(factors.row_sq).mul_(value)
            factors.col.copy_(factors.col_sq.value).mul_(value)

    def direction(self, ms: list[torch.Tensor], vs: list[Any], t: int) -> list[torch.Tensor]:
        """As :meth:`AdamDirection.direction`, with ``sqrt(v)`` of a factored ``v`` built in stacks (:func:`divided`)."""
        full, factored = _split(vs)
        result: list[torch.Tensor] = [None] * len(ms)  # type: ignore[list-item]
        for i, u in zip(full, super().direction([ms[i] for i in full], [vs[i] for i in full], t)):
            result[i] = u
        factored_ms = [ms[i] for i in factored]
        us = divided(factored_ms, [vs[i] for i in factored], self._shift(t)) if t else map(torch.zeros_like, factored_ms)
        for i, u in zip(factored, us):
            result[i] = u
        return result


def _split(vs: list[Any]) -> tuple[list[int], list[int]]:
    """Indices of the full second moments and of the factored ones."""
    factored = [i for i, v in enumerate(vs) if isinstance(v, Factors)]
    return [i for i in range(len(vs)) if not isinstance(vs[i], Factors)], factored


def _pick(tensors: GroupTensors, indices: list[int]) -> GroupTensors:
    """The moments and gradients of ``indices`` (what :meth:`AdamDirection.update_moments` reads)."""
    return GroupTensors(
        ms=[tensors.ms[i] for i in indices], vs=[tensors.vs[i] for i in indices], grads=[tensors.grads[i] for i in indices]
    )
