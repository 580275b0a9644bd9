"""Direction geometry: how the raw gradient becomes the step direction.

``preconditioner=None`` is P2M as published: the direction is the (momentum
of the) gradient, held in one ``direction`` tensor per parameter (see
:mod:`elra.optimizer`). ``"adam"`` divides the momentum by the root of a
second-moment EMA, per coordinate (Adam's direction, bias corrected):

    m <- b1*m + (1-b1)*g,   v <- b2*v + (1-b2)*g^2
    u  = m_hat / (sqrt(v_hat) + eps)

and lets :class:`elra.line_control.LineController` choose the step length
along ``u``. The state is ``m`` and ``v`` (two tensors per parameter, sharded
like the parameter); ``u`` is recomputed from them when needed, never stored:
a retrace goes back along ``u_old``, which the unchanged moments still give.
This module does the tensor work on local parts; the controller sees scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from . import compiled
from .line_control import BETA1, LineSums, first_moment_factor
from .chunks import add_, in_dtype_of, partitioned, run_scratch, runs
from .fused import adamw_accept, split_fusable
from .reduce import Products, ScalarBatch, local, products

PRECONDITIONERS = (None, "adam", "factored", "muon")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
# m, and muon's cached direction of a matrix (kept over scale(t), whose 1 - beta1^t scales like m_1)
FIRST_MOMENT_KEYS = frozenset({"exp_avg", "direction"})
# slots of the step's scalar vector
NEXT_DIR, MOM_DIR, DIR_SQ, PARAM_SQ, PRESENT, GRAD_SQ, MOM_SQ = range(7)
SLOTS = 7
SQUARE_SLOTS = [DIR_SQ, PARAM_SQ, GRAD_SQ, MOM_SQ]  # sums of squares: what the replicas must agree on
_FEW = 4  # at most this many tensors in a run go through a scratch buffer (more: one multi-tensor op each)


def moment_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit parameters: in float16 ``(1-b2)*g^2`` underflows to 0 (and ``u`` to inf),
    in bfloat16 ``0.999*v`` rounds back to ``v``; mixed-precision Adam keeps float32 moments too."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def moment_zeros(p: torch.Tensor) -> torch.Tensor:
    """A zero moment shaped (and sharded) like ``p``, in :func:`moment_dtype`."""
    return torch.zeros_like(p, dtype=moment_dtype(p), memory_format=torch.preserve_format)


def kept_finite(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``value`` cast to ``dtype`` is finite wherever ``value`` is: a float32 P2M direction cast to
    float16 with its parameter (``model.half()``, a float32 checkpoint loaded) may pass float16's range. Casts
    only to a narrower floating dtype, where that can happen."""
    if dtype.itemsize >= value.dtype.itemsize or not dtype.is_floating_point:
        return True
    value = local(value)
    return not bool((torch.isfinite(value) & ~torch.isfinite(value.to(dtype))).any())


@dataclass
class GroupTensors:
    """Local parts of one group: parameters with a gradient, and those the last step moved."""

    params: list[torch.Tensor] = field(default_factory=list)
    owners: list[torch.Tensor] = field(default_factory=list)
    held_ms: list[torch.Tensor] = field(default_factory=list)  # m of ``owners`` as held (DTensors under FSDP2)
    grads: list[torch.Tensor] = field(default_factory=list)
    ms: list[torch.Tensor] = field(default_factory=list)
    vs: list[torch.Tensor] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    moved: list[torch.Tensor] = field(default_factory=list)
    moved_ms: list[torch.Tensor] = field(default_factory=list)
    moved_vs: list[torch.Tensor] = field(default_factory=list)
    moved_grads: list[torch.Tensor | None] = field(default_factory=list)
    moved_weights: list[float] = field(default_factory=list)
    old_dirs: list[torch.Tensor] = field(default_factory=list)  # u_old/scale(t) of ``moved``, filled by ``add_sums``
    old_from_moments: bool = False  # ``add_sums`` kept no ``old_dirs``: a retrace recomputes them chunk by chunk


class AdamDirection:
    """Adam's diagonal second-moment direction (``preconditioner="adam"``).

    The public methods (``direction``, ``update_moments``, ``old_directions``,
    ``new_directions`` ...) are what subclasses override. Where a subclass
    keeps Adam's own (``_own``), :meth:`add_sums`, :meth:`accept` and
    :meth:`retrace` run the whole chain of elementwise passes over
    cache-sized chunks (:func:`elra.chunks.runs`) instead of pass after pass
    over all tensors: the same operations per element, so the same numbers,
    with the data read from memory once per phase, and without a
    parameter-sized ``u`` at any time.
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.compiled = False  # the sums of large tensors in one compiled kernel (:mod:`elra.compiled`)

    def new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: moment_zeros(p) for key in self.state_shapes(p)}

    def state_shapes(self, p: torch.Tensor) -> dict[str, torch.Size]:
        """The state keys of parameter ``p`` and their (global) shapes: what a checkpoint must hold."""
        return {key: p.shape for key in MOMENT_KEYS}

    @staticmethod
    def moments(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """The local first and second moment in one parameter's state."""
        return local(state["exp_avg"]), local(state["exp_avg_sq"])

    def vector_length(self, params: list[torch.Tensor], replicas) -> int:
        """Numbers this direction adds to a step's all-reduce after the scalars (vector blocks): none."""
        return 0

    def gather(self, group: dict[str, Any], state, moved: set, with_gradient: bool, replicas) -> GroupTensors:
        tensors = GroupTensors()
        for p in group["params"]:
            m, v = self.moments(state[p])
            grad = p.grad if with_gradient else None
            weight = 1.0 / replicas(p)
            x = local(p)
            if grad is not None:
                if grad.is_sparse:
                    raise RuntimeError("ElraOptimizer does not support sparse gradients")
                grad = local(grad)
                tensors.params.append(x)
                tensors.owners.append(p)
                tensors.held_ms.append(state[p][MOMENT_KEYS[0]])
                tensors.grads.append(grad)
                tensors.ms.append(m)
                tensors.vs.append(v)
                tensors.weights.append(weight)
            if p in moved:
                tensors.moved.append(x)
                tensors.moved_ms.append(m)
                tensors.moved_vs.append(v)
                tensors.moved_grads.append(grad)
                tensors.moved_weights.append(weight)
        return tensors

    def scale(self, t: int) -> float:
        """``u = scale(t) * direction(...)``: the bias corrections, kept out of the tensor passes."""
        return math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t) if t else 0.0

    def direction(self, ms: list[torch.Tensor], vs: list[torch.Tensor], t: int) -> list[torch.Tensor]:
        """``m/(sqrt(v) + eps*sqrt(1-beta2^t))`` after ``t`` moment updates (new tensors).

        Times :meth:`scale` this is Adam's ``m_hat/(sqrt(v_hat)+eps)``; three passes.
        """
        if not ms or t == 0:
            return [torch.zeros_like(m) for m in ms]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, self._shift(t))
        return torch._foreach_div(ms, denom)

    def _run_direction(self, ms: list[torch.Tensor], vs: list[torch.Tensor], t: int, scratch: torch.Tensor | None):
        """:meth:`direction` of one run of :func:`elra.chunks.runs`, written into ``scratch`` when the run holds
        a few tensors that fit (the same operations, so the same numbers). On the CPU a fresh chunk-sized
        tensor per run costs about as much as the op that fills it (the step of a 9.4M MLP: 10% of it)."""
        if scratch is None or not t or len(ms) > _FEW or any(m.dtype != scratch.dtype for m in ms):
            return self.direction(ms, vs, t)
        sizes = [m.numel() for m in ms]
        if sum(sizes) > scratch.numel():
            return self.direction(ms, vs, t)
        shift, directions = self._shift(t), []
        for m, v, u in zip(ms, vs, scratch[: sum(sizes)].split(sizes)):
            u = torch.sqrt(v, out=u.view(m.shape))
            u.add_(shift)
            directions.append(torch.div(m, u, out=u))
        return directions

    def update_momentum(self, tensors: GroupTensors, grad_scale: float) -> None:
        """``m`` takes the gradient ``grad_scale * g`` (the micro-batch mean, unscaled); one pass when unscaled."""
        if not tensors.ms:
            return
        for ms, grads in in_dtype_of(tensors.ms, tensors.grads):
            self._momentum(ms, grads, grad_scale)

    def update_moments(self, tensors: GroupTensors, grad_scale: float) -> None:
        """``m`` and ``v`` take the gradient ``grad_scale * g``."""
        if not tensors.ms:
            return
        for ms, grads, vs in in_dtype_of(tensors.ms, tensors.grads, tensors.vs):  # 16-bit g, float32 moments
            self._momentum(ms, grads, grad_scale)
            torch._foreach_mul_(vs, self.beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=(1.0 - self.beta2) * grad_scale**2)

    def set_beta1(self, beta1: float) -> None:
        """The momentum of the coming moment updates (the controller's, by the regime)."""
        self.beta1 = beta1

    def set_regime(self, stochastic: bool) -> None:
        """Whether the loss is known to be noisy (the controller's regime): Adam's direction does not depend on it."""

    def switch_beta1(self, states: Iterable[dict[str, torch.Tensor]], beta1: float, groups: Iterable = ()) -> None:
        """After the first moment update only: ``m`` (and what is derived from it: the old directions this
        step's ``groups`` hold for a retrace) as if ``beta1`` had made it.

        ``m_1 = (1-beta1)*g_1``: a factor. Keeps the bias correction exact where
        the regime, detected at the second real step, changes the momentum.
        """
        factor = first_moment_factor(self.beta1, beta1)
        for state in states:
            for key in FIRST_MOMENT_KEYS & state.keys():
                state[key].mul_(factor)
        for tensors in groups:
            self.rescale_old_directions(tensors, factor)
        self.set_beta1(beta1)

    def rescale_old_directions(self, tensors: GroupTensors, factor: float) -> None:
        """``u_old/scale(t)`` kept by :meth:`add_sums`, made from ``m`` before it was rescaled by ``factor``."""
        if tensors.old_dirs:
            torch._foreach_mul_(tensors.old_dirs, factor)

    def restart(self, tensors: GroupTensors, t: int, grad_scale: float) -> None:
        """The momentum restarts from the gradient: see :meth:`start_first_moment`."""
        self.start_first_moment(tensors, t, grad_scale)

    def start_first_moment(self, tensors: GroupTensors, t: int, grad_scale: float) -> None:
        """``m`` such that after the coming update (the ``t+1``-th) ``m_hat`` is the gradient ``grad_scale * g``."""
        if not tensors.ms:
            return
        for ms, grads in in_dtype_of(tensors.ms, tensors.grads):
            torch._foreach_zero_(ms)
            torch._foreach_add_(ms, grads, alpha=(1.0 - self.beta1**t) * grad_scale)

    def start(self, tensors: GroupTensors, t: int, grad_scale: float, fresh: set) -> None:
        """Moments of the parameters in ``fresh`` (whose first gradient comes now, at update ``t+1``: added
        by ``add_param_group`` or unused until now) such that after the coming update ``m_hat = g`` and
        ``v_hat = g^2``, as Adam's first step of a parameter gives. Adam counts steps per parameter; here the
        bias correction is global, and from zero moments such a parameter's first ``u`` would be
        ``(1-b1)/sqrt(1-b2)``, about 3 times the gradient's sign, for hundreds of steps."""
        picked = [i for i, p in enumerate(tensors.owners) if p in fresh]
        if not t or not picked:
            return
        part = GroupTensors(
            ms=[tensors.ms[i] for i in picked], vs=[tensors.vs[i] for i in picked], grads=[tensors.grads[i] for i in picked]
        )
        self.start_first_moment(part, t, grad_scale)
        self.start_second_moment(part, t, grad_scale)

    def start_second_moment(self, tensors: GroupTensors, t: int, grad_scale: float) -> None:
        """``v`` such that after the coming (``t+1``-th) update ``v_hat = (grad_scale * g)^2``."""
        if not tensors.vs:
            return
        for vs, grads in in_dtype_of(tensors.vs, tensors.grads):
            torch._foreach_zero_(vs)
            torch._foreach_addcmul_(vs, grads, grads, value=(1.0 - self.beta2**t) * grad_scale**2)

    def _momentum(self, ms: list[torch.Tensor], grads: list[torch.Tensor], grad_scale: float) -> None:
        if grad_scale == 1.0:
            torch._foreach_lerp_(ms, grads, 1.0 - self.beta1)
        else:
            torch._foreach_mul_(ms, self.beta1)
            torch._foreach_add_(ms, grads, alpha=(1.0 - self.beta1) * grad_scale)

    def _own(self, *names: str) -> bool:
        """Whether this object uses AdamDirection's own methods ``names`` (the chunked chains assume them)."""
        return all(getattr(type(self), name) is getattr(AdamDirection, name) for name in names)

    def _shift(self, t: int) -> float:
        """The ``eps`` of :meth:`direction` after ``t`` moment updates."""
        return self.eps * math.sqrt(1.0 - self.beta2**t)

    def add_sums(self, batch: ScalarBatch, tensors: GroupTensors, t: int) -> None:
        """This rank's terms of N, D, |u_old|^2, |x|^2, |g|^2 and |m|^2; keeps ``u_old`` (or how to recompute
        it) for a retrace. The first step's are |x|^2 and |g|^2: a non-finite gradient must be seen there too."""
        aligned = len(tensors.moved) == len(tensors.params) and all(
            a is b and g is not None for a, b, g in zip(tensors.moved, tensors.params, tensors.moved_grads)
        )
        if t and aligned and self._own("old_directions", "direction"):
            return self._chained_sums(batch, tensors, t)
        batch.add_constant(PRESENT, len(tensors.params))
        pairs = [(0, 0, PARAM_SQ), (1, 1, GRAD_SQ), (2, 2, MOM_SQ)] if t else [(0, 0, PARAM_SQ), (1, 1, GRAD_SQ)]
        products(batch, (tensors.params, tensors.grads, tensors.ms), pairs, tensors.weights)
        if t == 0:
            return
        if self._own("old_directions", "direction"):
            return self._chained_old_sums(batch, tensors, t)
        tensors.old_dirs = self.old_directions(tensors, t)
        products(batch, (tensors.moved_ms, tensors.old_dirs), [(0, 1, MOM_DIR), (1, 1, DIR_SQ)], tensors.moved_weights)
        with_grad = [(g, u, w) for g, u, w in zip(tensors.moved_grads, tensors.old_dirs, tensors.moved_weights) if g is not None]
        if with_grad:
            grads, dirs, weights = zip(*with_grad)
            products(batch, (grads, dirs), [(0, 1, NEXT_DIR)], weights)

    def _chained_sums(self, batch: ScalarBatch, tensors: GroupTensors, t: int) -> None:
        """:meth:`add_sums` chunk by chunk, when the moved parameters are those with a gradient.

        ``u_old`` lives one chunk at a time; a retrace recomputes it from the
        unchanged moments (:meth:`retrace`).
        """
        batch.add_constant(PRESENT, len(tensors.params))
        x, g, m, u = range(4)
        pairs = [(x, x, PARAM_SQ), (m, u, MOM_DIR), (u, u, DIR_SQ), (g, u, NEXT_DIR), (g, g, GRAD_SQ), (m, m, MOM_SQ)]
        columns = [tensors.params, tensors.grads, tensors.ms, tensors.vs, tensors.weights]
        if self.compiled:
            large, rest = compiled.split_large(columns)
            values = compiled.adam_sums(*large, self._shift(t), batch.dtype) if large[0] else None
            if values is not None:  # the kernel's order is that of ``pairs``
                batch.add_values([slot for _, _, slot in pairs], values)
                columns = rest
        sums, scratch = Products(batch, pairs), run_scratch(tensors.ms)
        for xs, gs, ms, vs, weights in runs(columns, split=True):
            sums.add((xs, gs, ms, self._run_direction(ms, vs, t, scratch)), weights)
        sums.finish()
        tensors.old_dirs, tensors.old_from_moments = [], True

    def _chained_old_sums(self, batch: ScalarBatch, tensors: GroupTensors, t: int) -> None:
        """The terms of ``u_old`` in :meth:`add_sums` run by run, where the moved parameters are not those with a
        gradient (a parameter used on some steps only): whole, ``u_old`` and its denominator took twice the
        parameter bytes at once. A retrace recomputes it from the unchanged moments (:meth:`retrace`)."""
        m, u, g = range(3)
        columns = [tensors.moved_ms, tensors.moved_vs, tensors.moved_grads, tensors.moved_weights]
        with_grad, without = partitioned(columns, [grad is not None for grad in tensors.moved_grads])
        scratch = run_scratch(tensors.moved_ms)
        for part, pairs in ((with_grad, [(m, u, MOM_DIR), (u, u, DIR_SQ), (g, u, NEXT_DIR)]), (without, [(m, u, MOM_DIR), (u, u, DIR_SQ)])):
            sums = Products(batch, pairs)
            for ms, vs, gs, weights in runs(part, split=True):
                sums.add((ms, self._run_direction(ms, vs, t, scratch), gs), weights)
            sums.finish()
        tensors.old_dirs, tensors.old_from_moments = [], True

    def old_directions(self, tensors: GroupTensors, t: int) -> list[torch.Tensor]:
        """``u_old/scale(t)`` of the moved parameters, from their unchanged moments."""
        return self.direction(tensors.moved_ms, tensors.moved_vs, t)

    def new_directions(self, tensors: GroupTensors, t: int) -> list[torch.Tensor]:
        """``u_new/scale(t)`` of the parameters with a gradient, after the moment update."""
        return self.direction(tensors.ms, tensors.vs, t)

    def owners(self, tensors: GroupTensors) -> list[torch.Tensor]:
        """The parameters an accepted step moves."""
        return tensors.owners

    def accept(self, tensors: GroupTensors, t: int, step: float, decay: float, grad_scale: float) -> None:
        """Take the gradient into the moments, then ``x <- decay*x - step*u_new`` (``t``: updates before)."""
        tensors.old_dirs, tensors.old_from_moments = [], False
        if self._own("update_moments", "update_momentum", "new_directions", "direction"):
            return self._chained_accept(tensors, t, step, decay, grad_scale)
        self.update_moments(tensors, grad_scale)
        if not tensors.params:
            return
        directions = self.new_directions(tensors, t + 1)
        if decay != 1.0:
            torch._foreach_mul_(tensors.params, decay)
        add_(tensors.params, directions, alpha=-step * self.scale(t + 1))

    def _chained_accept(self, tensors: GroupTensors, t: int, step: float, decay: float, grad_scale: float) -> None:
        """:meth:`accept` in torch's fused AdamW kernel where :func:`elra.fused.fusable` allows, else chunk
        by chunk: moments, ``u_new`` and the step of one chunk, then the next."""
        fused, columns = split_fusable([tensors.params, tensors.grads, tensors.ms, tensors.vs])
        if fused[0]:  # the controller's step is > 0 (ETA_BOUNDS), as the kernel's decay needs
            adamw_accept(*fused, t + 1, (self.beta1, self.beta2), self.eps, step, decay, grad_scale)
        alpha, scratch = -step * self.scale(t + 1), run_scratch(columns[2])
        for xs, gs, ms, vs in runs(columns, split=True):
            self.update_moments(GroupTensors(ms=ms, vs=vs, grads=gs), grad_scale)
            directions = self._run_direction(ms, vs, t + 1, scratch)
            if decay != 1.0:
                torch._foreach_mul_(xs, decay)
            add_(xs, directions, alpha=alpha)

    def retrace(self, tensors: GroupTensors, t: int, shift: float) -> None:
        """``x <- x + shift*u_old`` for the parameters the last step moved."""
        if tensors.old_from_moments:
            alpha, scratch = shift * self.scale(t), run_scratch(tensors.moved_ms)
            for xs, ms, vs in runs([tensors.moved, tensors.moved_ms, tensors.moved_vs], split=True):
                add_(xs, self._run_direction(ms, vs, t, scratch), alpha=alpha)
        elif tensors.old_dirs:
            add_(tensors.moved, tensors.old_dirs, alpha=shift * self.scale(t))

    def sums(self, values: list[float], t: int, grad_scale: float) -> LineSums:
        """The controller's inputs from the global slot values (bias-corrected, g averaged)."""
        k = self.scale(t)
        m_hat = 1.0 / (1.0 - self.beta1**t) if t else 0.0
        return LineSums(
            values[NEXT_DIR] * k * grad_scale,
            values[MOM_DIR] * k * m_hat,
            values[DIR_SQ] * k * k,
            values[PARAM_SQ],
            values[GRAD_SQ] * grad_scale * grad_scale,
            values[MOM_SQ],
        )


def direction_state(geometry, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """A parameter's direction state: P2M's last direction, or the preconditioner's moments."""
    if geometry is None:
        return {"direction": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return geometry.new_state(p)


def direction_beta1(momentum: float | None) -> float:
    """A preconditioned direction's first beta1: ``momentum``, ``BETA1`` when it is ``None`` (the controller
    may choose another by the regime, :attr:`elra.line_control.LineController.beta1`)."""
    return BETA1 if momentum is None else float(momentum)


def make_direction(preconditioner: str | None, momentum: float | None, compiled: bool = False) -> AdamDirection | None:
    """The direction for ``preconditioner`` (``None``: P2M's own, handled by the optimizer); ``compiled``:
    Adam's sums of large tensors in one compiled kernel (:mod:`elra.compiled`)."""
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"Invalid preconditioner: {preconditioner!r} (expected one of {PRECONDITIONERS})")
    if preconditioner is None:
        return None
    beta1 = direction_beta1(momentum)
    if preconditioner == "factored":
        from .factored import FactoredDirection

        direction = FactoredDirection(beta1=beta1)
    elif preconditioner == "muon":
        from .orthogonal import OrthogonalDirection

        direction = OrthogonalDirection(beta1=beta1)
    else:
        direction = AdamDirection(beta1=beta1)
    direction.compiled = compiled
    return direction
