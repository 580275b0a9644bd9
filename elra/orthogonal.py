"""Orthogonalised momentum for matrices (``preconditioner="muon"``).

Muon's direction: a 2-D parameter steps along the semi-orthogonal matrix
nearest to its momentum (a Newton-Schulz iteration: the singular values
become about 1, the singular vectors stay), scaled to an RMS of 0.2 per
entry, about that of Adam's direction; every other parameter (vectors,
scalars, convolution kernels, matrices of one row or column) keeps Adam's direction
(:class:`elra.geometry.AdamDirection`). ELRA's line controller sets the one
step length along the combined direction, so Muon's learning rate is gone.

The orthogonalisation needs the whole matrix: under FSDP2 and HSDP an
accepted step gathers each matrix's momentum (``DTensor.full_tensor``), every
rank orthogonalises the same matrix and keeps its own rows. The result is
kept in a ``direction`` tensor beside the momentum (state 2x the matrix, as
Adam's), so the next step's sums and a retrace need no second iteration.
FSDP1 flattens parameters and loses their shapes: refused.

Orthogonalisation drops the momentum's size: a matrix whose gradients have
faded (a fine-tune near its optimum, a layer that has settled) would keep
stepping as far as one still learning. So each matrix keeps an EMA of its
momentum's mean square (``m_hat``'s, one number per matrix, the same on every
rank: it is taken of the whole matrix), and in the stochastic regime, where
``m_hat``'s RMS falls below ``SHRINK_BELOW`` times the EMA's root, its
direction shrinks in proportion. Without noise the line controller's exact
pairs set the step, and the shrink only slowed the full-batch runs (docs/method.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .chunks import stacked, stacks
from .geometry import AdamDirection, GroupTensors, moment_dtype, moment_zeros
from .reduce import ScalarBatch, local

MATRIX_KEYS = ("exp_avg", "direction")
MEAN_SQUARE_KEY = "momentum_mean_square"  # a matrix's EMA of mean(m_hat^2): one number, replicated
MEAN_SQUARE_KEEP = 0.99
SHRINK_BELOW = 0.3  # a direction shrinks where RMS(m_hat) < SHRINK_BELOW * sqrt(EMA): measured in docs/method.md
NEWTON_SCHULZ_STEPS = 5
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # a quintic that pushes singular values toward 1 fast
RMS = 0.2  # per-entry size of a matrix's direction
STACK_ELEMENTS = 1 << 22  # matrices orthogonalised together: bounds the stacked copies (16 MB of float32)


def is_matrix(p: torch.Tensor) -> bool:
    """Whether ``p`` (its global shape) steps along orthogonalised momentum."""
    return p.ndim == 2 and min(p.shape) > 1


def orthogonalize(matrix: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """About ``U V^T`` of ``matrix = U S V^T``, its RMS ``1/sqrt(max(rows, cols))``.

    Computed in ``dtype`` (default: the input's, float32 for 16-bit input). The
    optimizer keeps the default: Muon's bfloat16 iteration is about 11x faster
    on an H100 but gave ELRA worse held-out losses (benchmarks/orthogonalize.py,
    docs/benchmarks.md).
    ``matrix`` may be a stack of matrices (``(stack, rows, cols)``): each is
    orthogonalised on its own. Each term is one fused product
    (``baddbmm``: ``B = b*G + c*G@G``, ``X = a*X + B@X``), no separate scaling passes.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    if dtype is None:
        dtype = torch.float32 if matrix.dtype in (torch.float16, torch.bfloat16) else matrix.dtype
    x = matrix.to(dtype)
    single = x.ndim == 2
    x = x.unsqueeze(0) if single else x
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.mT
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x if wide else x.mT
    return x.squeeze(0) if single else x


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def _part_like(whole: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """The piece of ``whole`` that this rank holds of ``held`` (a DTensor's local shard; no communication)."""
    if not hasattr(held, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, held.device_mesh, held.placements, src_data_rank=None).to_local()


@dataclass
class MatrixTensors(GroupTensors):
    """A group's matrices, and the mean-square EMA of each one with a gradient (aligned with ``owners``)."""

    mean_squares: list[torch.Tensor] = field(default_factory=list)


class _MatrixDirection(AdamDirection):
    """The matrices' part: momentum, and the orthogonalised direction in the state's second tensor."""

    shrinking = False  # whether faded momenta shrink their directions: in the stochastic regime only (docs/method.md)

    def set_regime(self, stochastic: bool) -> None:
        self.shrinking = stochastic

    def new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        mean_square = torch.zeros((), dtype=moment_dtype(p), device=local(p).device)
        return {**{key: moment_zeros(p) for key in MATRIX_KEYS}, MEAN_SQUARE_KEY: mean_square}

    def state_shapes(self, p: torch.Tensor) -> dict[str, torch.Size]:
        return {**{key: p.shape for key in MATRIX_KEYS}, MEAN_SQUARE_KEY: torch.Size()}

    @staticmethod
    def moments(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The momentum, and the cached direction in place of a second moment."""
        return local(state["exp_avg"]), local(state["direction"])

    def gather(self, group: dict[str, Any], state, moved: set, with_gradient: bool, replicas) -> MatrixTensors:
        tensors = MatrixTensors(**vars(super().gather(group, state, moved, with_gradient, replicas)))
        tensors.mean_squares = [state[p][MEAN_SQUARE_KEY] for p in tensors.owners]
        return tensors

    def update_moments(self, tensors: GroupTensors, grad_scale: float) -> None:
        self.update_momentum(tensors, grad_scale)

    def start_second_moment(self, tensors: GroupTensors, t: int, grad_scale: float) -> None:
        """Nothing: the second tensor is the cached direction, made from ``m`` at the accept."""

    def rescale_old_directions(self, tensors: GroupTensors, factor: float) -> None:
        """Nothing: the old directions are the cached ones in the state, rescaled with ``m``."""

    def old_directions(self, tensors: GroupTensors, t: int) -> list[torch.Tensor]:
        return list(tensors.moved_vs)

    def new_directions(self, tensors: MatrixTensors, t: int) -> list[torch.Tensor]:
        """Orthogonalises the momenta in stacks of same-shaped matrices: one matrix product per
        Newton-Schulz term and stack, where one per matrix would cost a dispatch (a launch) each."""
        inverse_scale = 1.0 / self.scale(t)
        for members in stacks(tensors.held_ms, STACK_ELEMENTS):
            helds = [tensors.held_ms[i] for i in members]
            momenta = stacked([_whole(held) for held in helds])
            wholes = orthogonalize(momenta)
            lengths = self._lengths(momenta, [tensors.mean_squares[i] for i in members], t)
            wholes.mul_(lengths.mul_(RMS * math.sqrt(max(wholes.shape[-2:])) * inverse_scale).view(-1, 1, 1))
            parts = [_part_like(whole, held) for whole, held in zip(wholes.unbind(), helds)]
            torch._foreach_copy_([tensors.vs[i] for i in members], parts)
        return tensors.vs

    def _lengths(self, momenta: torch.Tensor, mean_squares: list[torch.Tensor], t: int) -> torch.Tensor:
        """Each stacked matrix's direction length (1 unless its momentum faded), after its EMA takes this step's
        ``mean(m_hat^2)`` (the first nonzero one starts it). On the device: no wait for the host."""
        rms = torch.linalg.vector_norm(momenta, dim=(-2, -1)) / (math.sqrt(momenta[0].numel()) * (1.0 - self.beta1**t))
        square, old = rms.square(), torch.stack(mean_squares)
        new = torch.where(old == 0, square, torch.lerp(old, square, 1.0 - MEAN_SQUARE_KEEP))
        torch._foreach_copy_(mean_squares, list(new.unbind()))
        if not self.shrinking:
            return torch.ones_like(rms)
        return torch.where(new > 0, rms / (SHRINK_BELOW * new.sqrt()), 1.0).clamp_(max=1.0)


@dataclass
class SplitTensors:
    """One group's local parts, matrices apart from the rest."""

    others: GroupTensors
    matrices: GroupTensors


class OrthogonalDirection(AdamDirection):
    """Orthogonalised momentum for matrices, Adam's direction for the rest (``preconditioner="muon"``)."""

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(beta1, beta2, eps)
        self.matrices = _MatrixDirection(beta1, beta2, eps)

    def state_shapes(self, p: torch.Tensor) -> dict[str, torch.Size]:
        if getattr(p, "_fsdp_flattened", False):
            raise ValueError(
                'preconditioner="muon" needs each matrix whole, but FSDP1 (FullyShardedDataParallel) flattens '
                'parameters: use FSDP2 (fully_shard), DDP, or preconditioner="adam"'
            )
        return self.matrices.state_shapes(p) if is_matrix(p) else super().state_shapes(p)

    def new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.matrices.new_state(p) if is_matrix(p) else super().new_state(p)

    def gather(self, group: dict[str, Any], state, moved: set, with_gradient: bool, replicas) -> SplitTensors:
        params = group["params"]
        return SplitTensors(
            super().gather({"params": [p for p in params if not is_matrix(p)]}, state, moved, with_gradient, replicas),
            self.matrices.gather({"params": [p for p in params if is_matrix(p)]}, state, moved, with_gradient, replicas),
        )

    def add_sums(self, batch: ScalarBatch, tensors: SplitTensors, t: int) -> None:
        super().add_sums(batch, tensors.others, t)
        self.matrices.add_sums(batch, tensors.matrices, t)

    def owners(self, tensors: SplitTensors) -> list[torch.Tensor]:
        return tensors.others.owners + tensors.matrices.owners

    def accept(self, tensors: SplitTensors, t: int, step: float, decay: float, grad_scale: float) -> None:
        super().accept(tensors.others, t, step, decay, grad_scale)
        self.matrices.accept(tensors.matrices, t, step, decay, grad_scale)

    def set_beta1(self, beta1: float) -> None:
        super().set_beta1(beta1)
        self.matrices.set_beta1(beta1)

    def set_regime(self, stochastic: bool) -> None:
        self.matrices.set_regime(stochastic)

    def rescale_old_directions(self, tensors: SplitTensors, factor: float) -> None:
        super().rescale_old_directions(tensors.others, factor)
        self.matrices.rescale_old_directions(tensors.matrices, factor)

    def start(self, tensors: SplitTensors, t: int, grad_scale: float, fresh: set) -> None:
        super().start(tensors.others, t, grad_scale, fresh)
        self.matrices.start(tensors.matrices, t, grad_scale, fresh)

    def restart(self, tensors: SplitTensors, t: int, grad_scale: float) -> None:
        super().restart(tensors.others, t, grad_scale)
        self.matrices.restart(tensors.matrices, t, grad_scale)

    def retrace(self, tensors: SplitTensors, t: int, shift: float) -> None:
        super().retrace(tensors.others, t, shift)
        self.matrices.retrace(tensors.matrices, t, shift)
