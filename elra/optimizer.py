"""``ElraOptimizer``: the public API, parameter groups, state and tensor updates.

The optimizer turns the tensors of one real step into a few global sums
(:mod:`elra.reduce`), lets the controller (:mod:`elra.control`) decide, and
applies the decision with ``torch._foreach_*`` calls on the parameters as they
are. It holds one tensor per parameter: the last step direction (or the
momentum), from which a retrace recomputes the last good point.
Hyperparameter checks live in :mod:`elra.config`, ``state_dict`` and
``load_state_dict`` in :mod:`elra.checkpoint`.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import weakref
import zlib
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from operator import attrgetter
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .boost import DEFAULT_CYCLE, Booster, new_mean
from .checkpoint import Checkpointing
from .chunks import runs
from .config import FOREIGN_GROUP_OPTIONS, check_int, checked_config, decay_rate, make_controller, normalized_momentum
from .control import Decision, RangeBounds, StepSums
from .fused import sgd_accept, split_fusable
from .geometry import PRESENT, SLOTS, SQUARE_SLOTS, direction_state, kept_finite, make_direction, moment_dtype
from .line_control import LINE_TARGET
from .reduce import AUTO, Reducer, ScalarBatch, copy_squares, local, products
from .sync import (
    drop_unsynced_grads, fsdp_wrapping, holds_gathered_weights, holds_unsynced_grads, reduce_partial_grads, reshard,
    sync_unsynced_grads, uncompiled,
)

logger = logging.getLogger("elra")

LossLike = float | torch.Tensor
# weight_decay=None along a preconditioned direction in the stochastic regime: decoupled, as AdamW's
# (x <- (1 - step*wd)*x); chosen by benchmarks/quality.py over all its tasks (docs/method.md)
AUTO_DECAY = 0.1
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_HALF_MAX = torch.finfo(torch.float16).max
_HALF_TINY = torch.finfo(torch.float16).tiny  # float16's smallest normal number
_SUMS = ("grad_sq", "grad_dir", "dir_sq", "param_sq", "param_dir", "grad_param")
_SQUARES = frozenset({"grad_sq", "dir_sq", "param_sq"})  # the sums of squares: the replicas' check (_read_checked)
# each real step's vector ends in the losses reported since the last one: train and validation, value and count
REPORT_SLOTS = 4
COPY_SLOTS = 2  # |x|^2 and |g|^2 of the whole copies beside shards (_replication_layout), after the reports
_REPORTED_FIELDS = frozenset({"train_loss", "valid_loss"})  # controller fields that those set
_GRADS = "_grads"  # a copy's (deepcopy, pickle) gradients of the parameters, by parameter
_GRAD_DTYPES = "_grad_dtypes"  # a copy's parameters' grad_dtype where it is not their dtype (copies of a parameter drop it)
_UNSTEPPED = "_unstepped"  # whether a copy's collected gradients hold a backward whose step(loss) has not come yet
# what remembers losses for a step (ElraGradScaler's scale): step_retrace and a zero_grad that clears the gradients
# tell them that the step they were for ended without them
LOSS_KEEPERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
# the live optimizers: which of them a scaled loss's backward wrote into (ElraGradScaler)
OPTIMIZERS: "weakref.WeakSet[ElraOptimizer]" = weakref.WeakSet()


def _same_layout(copied: torch.nn.Module | None, model: torch.nn.Module) -> bool:
    """Whether ``copied`` holds ``model``'s state entries in their shapes and dtypes (so a load refreshes it)."""
    if copied is None:
        return False
    kept, source = copied.state_dict(), model.state_dict()
    return kept.keys() == source.keys() and all(
        kept[k].shape == v.shape and kept[k].dtype == v.dtype for k, v in source.items()
    )


def _loss_value(loss: Any) -> LossLike:
    """A scalar loss as a float or a detached 0-dim tensor of its own (no host sync).

    Accepts Python and numpy numbers, tensors and numpy arrays of one element;
    refuses booleans in every form (a bool is no loss value). A tensor is
    copied: ELRA keeps the losses of the micro-batches it collects, and a
    view would follow the caller's later in-place writes (a reused loss
    buffer, as CUDA-graph training keeps) into every loss kept before.
    """
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    if not isinstance(loss, (torch.Tensor, bool, str, bytes)) and hasattr(loss, "__array__"):
        loss = torch.as_tensor(loss)  # numpy arrays and numpy booleans: the tensor rules below
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"ELRA needs a scalar loss, got a tensor of shape {tuple(loss.shape)}; reduce it first")
        if loss.is_complex():
            raise ValueError("ELRA needs a real loss, got a complex tensor")
        if loss.dtype == torch.bool:
            raise TypeError("ELRA needs the loss value, got a boolean tensor")
        return loss.detach().reshape(()).clone()
    raise TypeError(
        f"ELRA needs the loss as a float, a scalar tensor or a one-element array, got {type(loss).__name__}"
    )


def _add_scaled(targets: list[torch.Tensor], sources: list[torch.Tensor], alpha: float) -> None:
    """``targets += alpha * sources``, also for an ``alpha`` beyond float16's range.

    torch converts ``alpha`` to the tensors' dtype and raises if it does not fit;
    below float16's smallest normal number it rounds ``alpha`` to a few bits
    (1e-7 became 1.19e-7, 2e-8 became 0: a step or a gradient share silently
    lost). A product with a Python scalar is computed in float32 instead. The
    controller's range bounds keep the result itself finite.
    """
    if _scalar_fits(alpha, targets):
        torch._foreach_add_(targets, sources, alpha=alpha)
    else:
        torch._foreach_add_(targets, torch._foreach_mul(sources, alpha))


def _scale(targets: list[torch.Tensor], factor: float) -> None:
    """``targets *= factor``, also for a ``factor`` beyond float16's range: torch's in-place multi-tensor
    product rounds it as :func:`_add_scaled` says (a batch's ``1/scale`` of 2^-26 became 0, and P2M's
    direction without momentum with it: the parameters stopped moving), its out-of-place one does not."""
    if _scalar_fits(factor, targets):
        torch._foreach_mul_(targets, factor)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(targets, factor))


def _scalar_fits(scalar: float, targets: list[torch.Tensor]) -> bool:
    """Whether torch's in-place multi-tensor ops on ``targets`` take ``scalar`` as it is (see :func:`_add_scaled`)."""
    return _HALF_TINY <= abs(scalar) <= _HALF_MAX or scalar == 0.0 or all(t.dtype != torch.float16 for t in targets)


def _without_autocast(device: torch.device | None) -> AbstractContextManager:
    """Autocast off for ELRA's own arithmetic on ``device``'s kind.

    Inside a caller's ``torch.autocast`` region the inner products (the CPU's
    Gram matrices) and muon's Newton-Schulz products would run in bfloat16 or
    float16: other steps than the same run's outside it, and a retrace that
    recomputes the direction would not reach the last good point exactly.
    """
    kind = (device or torch.device("cpu")).type
    if not torch.amp.is_autocast_available(kind):
        return nullcontext()
    return torch.autocast(kind, enabled=False)


def _layout(n_groups: int, sixteen_bit: bool) -> tuple[int, int, int]:
    """Slots of a real step's vector: the gradient count, the range bounds, the consistency check.

    Before the count come ``len(_SUMS)`` sums per group; the three range bounds
    exist only with 16-bit parameters; after the check's two slots (with
    ``check_consistency``) come the losses of the micro-batches.
    """
    present = len(_SUMS) * n_groups
    return present, present + 1, present + (4 if sixteen_bit else 1)


class _NoGradient(RuntimeError):
    """A ``step(loss)`` refused because its micro-batch added no gradient: the call counts as not made, and
    :class:`elra.ElraGradScaler` counts the loss it scaled as handed to that optimizer (the next ``scale`` starts
    a new sum)."""


def _aliased(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two of ``tensors`` that share memory (a Parameter made from another's data or a view of it), or ``None``.

    Tensors whose byte spans overlap, in chains, are looked at together: two
    that fill their span (contiguous, or a transpose of it) share memory; else
    each marks its elements in a flag per piece of the window they span and
    finds none marked before, so that views side by side or interleaved apart
    (column blocks, ``w[0::2]`` and ``w[1::2]``, in any dtypes) pass. Runs once
    after the parameters changed. Tensors without storage of their own (meta,
    wrapper subclasses: ``data_ptr()`` 0) are skipped.
    """
    spans = []
    for p in tensors:
        x = local(p)
        if x.numel() and x.layout == torch.strided and not x.is_meta and x.data_ptr():
            spans.append((str(x.device), x.data_ptr(), x.data_ptr() + _extent(x) * x.element_size(), p, x))
    spans.sort(key=lambda span: span[:3])
    cluster: list[tuple] = []
    end = 0  # of the cluster's spans
    for span in [*spans, None]:
        if span is not None and cluster and span[0] == cluster[0][0] and span[1] < end:
            cluster.append(span)
            end = max(end, span[2])
            continue
        shared = _sharing(cluster) if len(cluster) > 1 else None
        if shared is not None:
            return shared
        cluster, end = [span], span[2] if span is not None else 0
    return None


def _sharing(cluster: list[tuple]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two tensors of ``cluster`` (spans of one device, sorted, overlapping in a chain) that share memory."""
    filling = [span for span in cluster if _extent(span[4]) == span[4].numel()]
    for first, second in zip(filling, filling[1:]):
        if second[1] < first[2]:
            return first[3], second[3]
    start = cluster[0][1]
    piece = math.gcd(*(span[4].element_size() for span in cluster), *(span[1] - start for span in cluster))
    marks = torch.zeros((max(span[2] for span in cluster) - start) // piece, dtype=torch.bool)
    for i, span in enumerate(cluster):
        view = _pieces(marks, span[4], (span[1] - start) // piece, piece)
        if bool(view.any()):  # which of those before: each alone, on this rare path
            return next(other for other in cluster[:i] if i == 1 or _sharing([other, span]) is not None)[3], span[3]
        view.fill_(True)
    return None


def _pieces(marks: torch.Tensor, x: torch.Tensor, offset: int, piece: int) -> torch.Tensor:
    """The flags of ``marks`` (one per ``piece`` bytes, from ``offset``) that the elements of ``x`` cover."""
    per_element = x.element_size() // piece
    strides = [stride * per_element for stride in x.stride()]
    return marks.as_strided((*x.shape, per_element), (*strides, 1), offset)


def _extent(x: torch.Tensor) -> int:
    """Elements from ``x``'s first to its last in memory."""
    return 1 + sum((n - 1) * stride for n, stride in zip(x.shape, x.stride()))


def _steppable(p: torch.Tensor) -> bool:
    """Whether ELRA can step ``p``: a real floating point dtype torch's arithmetic covers (float8 has no lerp,
    pow or add: its first step failed deep in torch, NotImplementedError)."""
    return p.is_floating_point() and p.dtype.itemsize >= 2


class ElraOptimizer(Checkpointing, Optimizer):
    """ELRA: gradient descent that adapts its own step length, batch size and weight decay.

    By default it steps along orthogonalised momentum for matrices and Adam's
    direction for the rest (``preconditioner="muon"``); ``preconditioner=None``
    is the published method, P2M.

    Args:
        params: parameters or parameter groups (a group may set ``weight_decay``).
        model: the (wrapped) model. Needed under FSDP, where the optimizer must
            make FSDP drop its gathered weights after changing the shards
            outside the backward -> step path (``step_retrace``,
            ``boosted()``); ``elra.grad_sync(model, optimizer)`` also tells it.
        batch_size: samples per micro-batch (sets the statistics window).
        classes: ``None`` (default) detects the regime at the second real
            step (mini-batch noise: stochastic, else deterministic; see
            ``stats["regime"]``; along a preconditioned direction a detected
            deterministic regime turns stochastic where the steps after
            momentum restarts show noise); ``0`` or ``1`` forces the deterministic regime
            for noise-free problems, ``>= 2`` (the number of classes) the
            stochastic one.
        lr: initial step length, a tiny probe (1e-6..1e-4); ELRA grows it.
        weight_decay: decoupled decay rate; values above 0.5 mean ``1 - value``.
            ``None`` (default): 0 for P2M and in the deterministic regime,
            ``AUTO_DECAY`` (0.1) along a preconditioned direction in the
            stochastic regime.
        warmup: P2M (``preconditioner=None``) only: real steps over which the
            rate may ramp up (a preconditioned direction ignores it and logs a warning).
        momentum: momentum factor in [0, 1). P2M: ``None`` or 0 for none. Along
            a preconditioned direction it is beta1: ``None`` for 0.9 (0.95 in
            the deterministic regime, where uphill steps restart it), 0 for
            no averaging (the direction of the gradient itself).
        batch_multiplier: initial and smallest number of micro-batches whose
            gradients are averaged per real step.
        process_group: data-parallel group to reduce over: ``"auto"`` (the
            default group when torch.distributed runs more than one rank),
            ``None`` (this process alone) or a process group.
        replicas: for unusual layouts, a function giving the number of ranks
            that hold an identical copy of a parameter's local part (see
            :class:`elra.reduce.Reducer` for the automatic rule).
        check_consistency: any positive value (0: never) verifies at every
            real step and ``skip_backward`` that all ranks hold the same
            controller state and make the same call; raises the same
            ``RuntimeError`` on every rank if not. Rides on the step's own
            all-reduce (a handshake of three numbers precedes the first one).
        acceptance: how the stochastic regime refuses a step: ``"noise"``
            (default) allows the loss to exceed the first loss by 10% plus three
            units of the observed mini-batch loss noise, and keeps the loss
            statistics robust to an outlier; ``"published"`` is the published
            package's rule (``1.1 * max(first loss, log(classes))``). P2M
            (``preconditioner=None``) only: a preconditioned direction has its own
            rule (see :mod:`elra.line_control`) and ignores it, logging a warning.
        preconditioner: ``"muon"`` (default): ELRA's step-length control over
            orthogonalised momentum for matrices and Adam's direction for the
            rest (see :mod:`elra.orthogonal`; not under FSDP1); ``"adam"``: over
            Adam's direction ``m_hat/(sqrt(v_hat)+eps)`` (``momentum`` is its
            beta1, by default 0.9, 0.95 without noise; see :mod:`elra.geometry`);
            ``"factored"``: the same with an Adafactor-style factored second
            moment for matrices, about half of Adam's state (not under FSDP1;
            see :mod:`elra.factored`); ``None``: P2M as published.
        line_target: with a preconditioner, the gradient-pair ratio the step
            length aims at where the gradient has no noise, in (-1, 1): 0 the
            line minimum along the direction, below 0 a step past it (default
            -0.1); scaled by the measured signal share, so mini-batch noise
            pulls it toward 0, and raised where noise dominates (see
            :meth:`elra.line_control.LineController.settling_ratio`).
        total_steps: the number of ``step`` calls (micro-batches) the run will
            make, if known: in the mini-batch regime the last 20% of them take
            a step length falling linearly to 2% of the one reached (a
            cooldown, as tuned learning-rate schedules end with), from the
            first step there whose gradients are mostly noise. ``None``
            (default): no budget, the step length follows the gradient pairs
            to the end. Needs a preconditioner. Settable later
            (:attr:`total_steps`), e.g. to run longer after a resume.
        compiled: with Adam's direction (``"adam"``, and muon's non-matrix
            parameters) on the CPU, compute the inner products of large tensors
            before each decision in one kernel made by ``torch.compile`` (it
            compiles at the second step, the first whose sums it computes, and
            needs a C++ compiler; on failure ELRA logs why and stays eager).
            See :mod:`elra.compiled`.

    Call ``step(loss)`` after every ``backward()``; ELRA needs the loss value.
    Under data parallelism each rank passes its own local loss.
    """

    _boost_swapped = False  # inside boosted(): the parameters hold the boost mean, the state the current point
    _matched: tuple | None = None  # the parameters' ids, dtypes and devices when the state last matched them
    _boost_source: torch.nn.Module | None = None  # the model get_boost_model copies (the published API needs it once)
    # while collecting: the parameters that held no gradient at the last step(loss) (a backward may give them one)
    _gradless: frozenset[torch.Tensor] | set[torch.Tensor] = frozenset()
    _backward_seen = False  # whether a backward shows in the kept gradients (_keep_grads)
    _unstepped_warned = False  # whether zero_grad warned of a gradient no step(loss) counted
    # torch's GradScaler then hands step() its scale and inf flag (found_inf) instead of unscaling .grad in place,
    # which would mix scales in collected micro-batch sums: step() refuses it (ElraGradScaler does this right)
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        model: torch.nn.Module | None = None,
        batch_size: int = 8,
        classes: int | None = None,
        lr: float = 1e-5,
        weight_decay: float | None = None,
        warmup: int = 1,
        momentum: float | None = None,
        *,
        batch_multiplier: int = 1,
        process_group=AUTO,
        replicas: Callable[[torch.Tensor], int] | None = None,
        check_consistency: int = 0,
        acceptance: str = "noise",
        preconditioner: str | None = "muon",
        line_target: float = LINE_TARGET,
        total_steps: int | None = None,
        compiled: bool = False,
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            # torch's optimizers take lr second: ElraOptimizer(params, 1e-4) meant the lr
            number = isinstance(model, numbers.Real)
            hint = ": ELRA's second argument is the model, pass lr=... by name" if number else ""
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}{hint}")
        config = checked_config(
            dict(
                lr=lr,
                weight_decay=weight_decay,
                batch_size=batch_size,
                classes=classes,
                warmup=warmup,
                momentum=momentum,
                batch_multiplier=batch_multiplier,
                acceptance=acceptance,
                preconditioner=preconditioner,
                line_target=line_target,
                total_steps=total_steps,
            )
        )
        self._check_every = check_int("check_consistency", check_consistency, 0)
        if not isinstance(compiled, bool):
            raise TypeError(f"compiled must be True or False, got {compiled!r}")
        if compiled and preconditioner not in ("adam", "muon"):
            raise ValueError(
                f"compiled=True computes Adam's direction's sums (preconditioner='adam', and muon's non-matrix "
                f"parameters); it has nothing to do with preconditioner={preconditioner!r}"
            )
        self._compiled = compiled
        self.reducer = Reducer(process_group, replicas)
        if config["lr"] >= 1e-3:
            logger.warning("ELRA starts best from a tiny lr (1e-6..1e-4), got %g", config["lr"])
        p2m_only = [f"warmup={warmup!r}"] if config["warmup"] > 1 else []  # the line controller has neither
        p2m_only += [f"acceptance={acceptance!r}"] if acceptance != "noise" else []
        if preconditioner is not None and p2m_only:
            logger.warning(
                "ELRA: %s apply to P2M (preconditioner=None) only: preconditioner=%r ignores them",
                " and ".join(p2m_only), preconditioner,
            )
        self._device: torch.device | None = None
        self._config = config
        # (layout, every parameter replicated on every rank, else those that are beside others that are not,
        # the DTensor parameters replicated over a mesh dimension: where gradients may hold partial sums)
        self._replication: tuple[tuple, bool, list[torch.Tensor], list[torch.Tensor]] = ((), False, [], [])
        self._flattened: list[torch.Tensor] = []  # FSDP1's parameters (add_param_group): _refuse_unsharded_gradients
        self.booster = Booster()
        self.geometry = make_direction(config["preconditioner"], config["momentum"], compiled)
        self._waiting: set[torch.Tensor] = set()  # parameters whose moments have not taken a gradient yet
        self._pending: list[LossLike] = []
        self._pending_as_averaged: list[LossLike] | None = None  # ``_pending`` when it last held the ranks' means
        if isinstance(params, (set, frozenset)):  # torch takes one: a resume would give the saved state to other tensors
            raise TypeError("ElraOptimizer's params must be an ordered collection: a set's order changes between runs "
                            "(use a list, or model.parameters())")
        super().__init__(params, dict(lr=config["lr"], weight_decay=config["weight_decay"]))
        OPTIMIZERS.add(self)
        self.controller = make_controller(config)
        self._reports = [0.0] * REPORT_SLOTS  # this rank's train and validation loss since the last real step
        self._unusable_gradient = False  # whether the last real step's gradient sums were not finite (its loss was)
        self._param_versions: list[int] | None = None  # after the last real step (_edited_between_steps)
        self._edit_warned = False
        self._kept_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._kept_versions: dict[torch.Tensor, int] = {}  # their version counters: a backward since bumps them
        self.unsynced_models: set[torch.nn.Module] = set()  # filled by elra.grad_sync
        self._held_sums_logged = False  # whether a real step reduced a wrapper's held sums itself (_reduce_held_sums)
        self.models: list[torch.nn.Module] = [uncompiled(model)] if model is not None else []  # to reshard after in-place changes
        self._moved: set[torch.Tensor] = set()  # parameters the last accepted step updated
        self._boost_model: torch.nn.Module | None = None

    # ----------------------------------------------------------- groups
    def _params(self) -> list[torch.Tensor]:
        """Every parameter, group by group: the order of the state's indices in a checkpoint."""
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its ``weight_decay`` (0: none) replaces the default for it.

        The direction state is created here, not lazily, so that checkpoint
        tools that initialise missing state by calling ``step()`` leave ELRA alone.
        """
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("a parameter group's 'params' must be an ordered collection: a set's order changes "
                            "between runs (use a list)")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        named = [p for p in params if isinstance(p, tuple)]  # model.named_parameters(): torch keeps the names
        tensors = [p[1] for p in named] if len(named) == len(params) else params
        decay_rate(param_group.get("weight_decay", self.defaults["weight_decay"]))
        self._check_group_options(param_group)
        if len({id(p) for p in tensors}) != len(tensors):  # torch only warns
            raise ValueError("a parameter appears twice in a parameter group: ELRA would count it twice in every sum")
        device = self._device
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"ELRA optimizes tensors, got {type(p).__name__} (named and unnamed parameters mixed?)")
            if not _steppable(p):
                raise ValueError(f"ELRA optimizes floating point parameters of 16 bits or more, got {p.dtype}")
            device = p.device if device is None else device
            if p.device != device:
                raise ValueError(
                    f"all parameters must be on one device: found {p.device} and {device}; use one optimizer per device"
                )
        super().add_param_group({**param_group, "params": params})
        if hasattr(self, "controller"):  # added mid-run: it shows the step length in force, as the others do
            self.param_groups[-1]["lr"] = self.controller.step_length
        self._device = device
        self._waiting.update(tensors)
        self._flattened += [p for p in tensors if getattr(p, "_fsdp_flattened", False)]
        if self._pending:  # added while collecting: a backward that reaches them alone is seen too (state_dict)
            fresh = (p for p in tensors if p.grad is None and not getattr(p, "_fsdp_flattened", False))
            self._gradless = {*self._gradless, *fresh}
        for p in tensors:
            self.state[p].update(direction_state(self.geometry, p))
            if self.booster.enabled:
                self.state[p]["boost"] = new_mean(p)

    def _follow_parameter_casts(self) -> None:
        """Convert the state to the parameters' dtype and device after a ``model.to(...)``, ``.double()``,
        ``.half()`` since the last call (``nn.Module.to`` keeps the Parameter objects and replaces their data).

        The state becomes what a fresh optimizer on the cast model holds after loading this one's
        ``state_dict``: moments and boost mean in :func:`elra.geometry.moment_dtype` (float32 for 16-bit
        parameters), P2M's direction in the parameter's dtype. Collected micro-batch sums are the ``.grad``,
        which ``Module.to`` casts too. Left alone, old-dtype state would run on silently: float32 moments of a
        float64 model, a bfloat16 P2M direction of a float32 one. Sharded (DTensor) state is converted as a
        DTensor, keeping its mesh and placements (FSDP2 allows a cast before its first forward). One read of
        the parameters' dtypes and devices per step finds a cast or a move, also of some parameters alone.
        A parameter put into ``param_groups`` directly, not by ``add_param_group``, has no state: refused.
        """
        params = self._params()
        kinds = (list(map(id, params)), list(map(_DTYPE, params)), list(map(_DEVICE, params)))
        if kinds == self._matched:
            return
        if not all(map(self.state.get, params)) or len(set(kinds[0])) != len(params):
            raise ValueError(
                "a parameter was put into optimizer.param_groups directly (a list's append or an assignment): "
                "ELRA has no state for it, or would count it twice; add parameters with add_param_group"
            )
        shared = _aliased(params)  # here, once the parameters changed: not at every add_param_group
        if shared is not None:
            raise ValueError(
                "two parameters share memory (shapes {} and {}: a Parameter made from another's data, "
                "nn.Parameter(w) or a view of it): ELRA would count it twice in every sum and step it twice. Tie "
                "weights by assigning the same Parameter (head.weight = embed.weight)".format(
                    *(tuple(p.shape) for p in shared)
                )
            )
        unfit = sorted({str(p.dtype) for p in params if not _steppable(p)})
        if unfit:  # Module.to(torch.complex64) casts floating point parameters: real steps on them would be wrong
            raise ValueError(
                f"ELRA optimizes floating point parameters of 16 bits or more, but parameters were cast to {', '.join(unfit)} "
                "after the optimizer was built; cast them back (the state is unchanged)"
            )
        moment = moment_dtype if self.geometry is not None else (lambda p: p.dtype)
        devices, converted = set(), []
        for p in params:
            devices.add(p.device)
            for key, value in self.state[p].items():
                dtype = moment_dtype(p) if key == "boost" else moment(p)
                if value.dtype != dtype or value.device != p.device:
                    converted.append((p, key, value, value.to(dtype=dtype, device=p.device)))
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must be on one device: found {sorted(map(str, devices))}; use one optimizer per device"
            )
        for p, key, value, cast in converted:
            if not kept_finite(value, cast.dtype):  # P2M's direction, which follows its parameter's dtype
                raise ValueError(
                    f"the parameters were cast to {cast.dtype}, whose range P2M's direction exceeds (a retrace along "
                    f"it would write inf into them); cast them back (the state is unchanged), or cast before "
                    "building the optimizer"
                )
        for p, key, _, cast in converted:
            self.state[p][key] = cast
        if converted:
            logger.info("ELRA: the parameters were cast or moved; %d state tensors follow them", len(converted))
        self._device = devices.pop() if devices else self._device
        self._matched = kinds

    def _check_group_options(self, group: dict[str, Any]) -> None:
        """Refuse per-group options ELRA cannot honour: it has one step length and one momentum, and no
        per-group form of other optimizers' options (a group copied from AdamW or SGD would lose them silently)."""
        self._refuse_ignored_options(group)
        current = {self.defaults["lr"], *(g["lr"] for g in self.param_groups)}
        if "lr" in group and group["lr"] not in current:
            raise ValueError(
                f"a parameter group sets lr={group['lr']!r}: ELRA adapts one step length for all groups, "
                "so per-group learning rates are not supported (leave 'lr' out of the group)"
            )

    def _refuse_ignored_options(self, group: dict[str, Any]) -> None:
        """The options of :meth:`_check_group_options` that ELRA would keep and ignore, refused also where they
        were written into ``param_groups`` after construction (checked at every ``step``): a ``maximize`` or
        ``momentum`` set there would otherwise be saved and shown while the run went on without it. ``lr`` is
        not among them: ELRA writes its step length there, and a scheduler's writes are documented as ignored."""
        foreign = sorted(FOREIGN_GROUP_OPTIONS & group.keys())
        if foreign:
            raise ValueError(
                f"a parameter group sets {', '.join(map(repr, foreign))}: ELRA has no such per-group options "
                "(its direction's betas and eps are fixed, its momentum is the constructor's); leave them out "
                "(or delete them from optimizer.param_groups)"
            )
        if group.get("lr_scale", 1.0) != 1.0:  # timm's layer-wise decay: its schedulers multiply lr by it
            raise ValueError(
                f"a parameter group sets lr_scale={group['lr_scale']!r} (timm's layer-wise lr decay): ELRA adapts one "
                "step length for all groups and no scheduler steers it, so the scale would be ignored (leave it out)"
            )
        preconditioner = self._config["preconditioner"]
        if "momentum" in group and normalized_momentum(group["momentum"], preconditioner) != self._config["momentum"]:
            raise ValueError(
                f"a parameter group sets momentum={group['momentum']!r}: ELRA uses one momentum for all groups "
                f"(the constructor's, {self._config['momentum']}); leave 'momentum' out of the group "
                "(or delete it from optimizer.param_groups)"
            )

    # ------------------------------------------------------------ public
    @property
    def collecting(self) -> bool:
        """True when the next ``step`` only collects a micro-batch gradient."""
        return len(self._pending) + 1 < self.controller.state.multiplier

    @property
    def micro_batches(self) -> int:
        """Micro-batches collected so far toward the next real step."""
        return len(self._pending)

    @property
    def micro_batches_taken(self) -> int:
        """Micro-batches passed to ``step`` so far, those of the real steps and those collected toward the next
        (restored by a checkpoint): the clock a step budget counts, so a run meant to go ``n`` micro-batches
        further sets ``total_steps = micro_batches_taken + n``."""
        return self.controller.state.micro_steps + self.micro_batches

    @property
    def preconditioner(self) -> str | None:
        """The direction's preconditioner (``None``: P2M), as constructed or loaded from a checkpoint."""
        return self._config["preconditioner"]

    @property
    def total_steps(self) -> int | None:
        """The step budget in micro-batches (``None``: none), as constructed or loaded from a checkpoint."""
        return self._config["total_steps"]

    @total_steps.setter
    def total_steps(self, total_steps: int | None) -> None:
        """Change the budget, e.g. after loading a checkpoint of a job now meant to run longer; set the same on
        every rank. Extended past a cooldown begun, the step length returns to where the cooldown fell from."""
        config = checked_config({**self._config, "total_steps": total_steps})
        self._config = config
        self.controller.total_steps = config["total_steps"]

    @property
    def stats(self) -> dict[str, float | int | str]:
        """Numbers for logs and dashboards; ``regime`` is ``"auto"`` until detected; ``weight_decay``: the first
        group's in force (as edited in ``param_groups``, times the validation lag; under P2M the lag replaces it,
        as in the published package)."""
        s = self.controller.state
        decays = self.controller.weight_decays(self._decay_rates(self.param_groups[:1]))
        return {
            "real_steps": s.steps,
            "retraces": s.retraces,
            "restarts": s.restarts,
            "batch_multiplier": s.multiplier,
            "micro_batches": self.micro_batches,
            "lr": self.controller.step_length,
            "rate": s.rate,
            "alpha": s.alpha,
            "weight_decay": decays[0],
            "schedule": s.schedule,
            "boost_count": self.booster.count,
            "regime": self.controller.regime,
        }

    def set_train_loss(self, loss: float, boost: float | None = None) -> None:
        """Report the training loss (e.g. per epoch); drives the weight-decay control. Under data parallelism the
        next real step sets every rank's to the mean of the values the ranks reported since the last one (until
        then ``stats`` shows the decay of the last real step, alike on every rank); one process takes it at once.
        A non-finite value raises ``ValueError``."""
        value = self._reported(loss, "train")
        self._reports[0:2] = [value, 1.0]
        if self.reducer.world_size == 1:
            self.controller.set_train_loss(value)

    def set_valid_loss(self, loss: float, boost: float | None = None, accu: float | None = None) -> None:
        """Report the validation loss (e.g. per epoch); drives the weight-decay control (see ``set_train_loss``)."""
        value = self._reported(loss, "validation")
        self._reports[2:4] = [value, 1.0]
        if self.reducer.world_size == 1:
            self.controller.set_valid_loss(value)

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, except while collecting: then micro-batch gradients must add up, and a gradient no
        ``step(loss)`` counted (a backward meant for another optimizer) stays among them: warned of, once."""
        if self._pending:
            if self._backward_seen and not self._unstepped_warned and self._grads_changed_since_step():
                self._unstepped_warned = True
                logger.warning(
                    "ELRA: optimizer.zero_grad() while collecting micro-batch %d of %d, and the gradients changed "
                    "since the last step(loss). If a backward meant for another optimizer reached these parameters "
                    "(a GAN's generator loss, an input gradient), it stays in the collected sums: torch would "
                    "discard it, but ELRA sums the micro-batches in .grad. Keep such a backward off them: "
                    "loss.backward(inputs=...), torch.autograd.grad, or requires_grad_(False) meanwhile. (An "
                    "in-place edit of .grad, such as clip_grad_norm_ after step() to log the norm, reads the same "
                    "and is harmless.) Said once",
                    len(self._pending) + 1, self.controller.state.multiplier,
                )
            return
        for keeper in list(LOSS_KEEPERS):  # a loss back-propagated into these gradients goes with them
            keeper._gradients_dropped(self)
        super().zero_grad(set_to_none)

    @torch._disable_dynamo  # a compiled training step breaks its graph here and runs ELRA's host decisions eagerly
    @torch.no_grad()
    def step(
        self,
        loss: LossLike | Callable[[], LossLike] | None = None,
        closure: Callable[[], LossLike] | None = None,
    ) -> Any:
        """Collect a micro-batch or take a real step.

        ``loss`` is the loss of the micro-batch just back-propagated (a float
        or a scalar tensor). A closure that runs forward and backward and
        returns the loss works too, as ``step(closure)`` or ``step(closure=...)``
        (the torch convention frameworks use).
        """
        if "found_inf" in self.__dict__:  # set by torch.amp.GradScaler.step for the call it makes
            self.__dict__.pop("found_inf")
            self.__dict__.pop("grad_scale", None)
            raise TypeError(
                "torch.amp.GradScaler cannot drive ELRA: it would unscale .grad at every step(), also the "
                "micro-batches ELRA is still summing, and change the scale between them; use elra.ElraGradScaler "
                "(the same calls: scale(loss).backward(), step(optimizer), update())"
            )
        if closure is not None:
            if not callable(closure) and loss is None:  # a wrapper's step(loss) handing it on as closure=loss
                raise TypeError(
                    f"step(closure=...) needs a callable, got {type(closure).__name__}: pass the loss as step(loss); "
                    "a wrapper that hands its step's argument on as the closure (ZeroRedundancyOptimizer) takes "
                    "step(loss=loss)"
                )
            if not callable(closure):  # the published package's step(loss, scale)
                raise TypeError(
                    f"step()'s second argument is a closure (torch's convention), got {type(closure).__name__}: "
                    "for loss scaling, the published package's step(loss, scale), use elra.ElraGradScaler"
                )
            if loss is not None:
                raise TypeError(
                    "pass the loss or a closure to step(), not both (a wrapper may add a closure of its own: "
                    "Lightning's self.optimizers().step(loss=...) in manual optimization does; there hand the loss "
                    "back from the closure, step(closure=lambda: loss))"
                )
            loss = closure
        if callable(loss):
            with torch.enable_grad():
                loss = loss()
            if loss is None:
                raise TypeError(
                    "the closure given to ElraOptimizer.step returned None: it must return the loss, which ELRA "
                    "needs at every step (a Lightning training_step that returns None to skip a batch cannot be "
                    "followed: ELRA would not know whether a gradient was added)"
                )
        if loss is None:
            raise TypeError(
                "ElraOptimizer.step needs the loss: call optimizer.step(loss) after loss.backward(), "
                "or optimizer.step(closure) with a closure that returns it (under transformers' Trainer, use "
                "elra.integrations.transformers.ElraTrainer, which passes it)"
            )
        self._step(_loss_value(loss))
        return loss

    @torch.no_grad()
    def _step(self, value: LossLike, inv_scale: float = 1.0, skip_overflow: bool = False) -> str:
        """Collect or take a real step; gradients are ``inv_scale`` times too small.

        Returns what happened: ``collect``, ``accept``, ``retrace``, ``skip``,
        or ``overflow`` (non-finite gradients with ``skip_overflow``: the real
        step is dropped without touching the controller).
        """
        self._refuse_inside_boosted("a step")
        for group in self.param_groups:
            self._refuse_ignored_options(group)
        self._check_kept_grads()
        self._follow_parameter_casts()
        self._refuse_state_loaded_around_it()
        if self._pending and self._backward_seen and not self._grads_changed_since_step():
            raise _NoGradient(
                f"step(loss) without a backward() since the last step(loss), while ELRA collects micro-batch "
                f"{len(self._pending) + 1} of {self.controller.state.multiplier}: no gradient changed, so this "
                "micro-batch would count with no gradient of its own. Call loss.backward() before optimizer.step(loss)"
            )
        losses = [*self._pending, value]
        if len(losses) < self.controller.state.multiplier:
            self._keep_grads()
            if self._backward_seen and not self._kept_grads:  # as a real step without any would
                raise self._no_gradient()
            self._pending = losses
            self._note_ddp_sync_off()
            return "collect"
        self._reduce_held_sums()
        reduce_partial_grads(self._replication_layout()[2])
        self._refuse_unsharded_gradients()
        outcome = self._real_step(losses, True, inv_scale, skip_overflow)
        self.unsynced_models.clear()  # the last backward was synchronised: wrappers hold nothing back
        if outcome in ("accept", "retrace") and any(map(holds_gathered_weights, self.models)):
            reshard(self.models)  # gathered weights left by a backward or an evaluation: the next forward must not use them
        return outcome

    # ``_step`` through the step pre/post hooks and the profiler label, as ``step`` runs: ElraGradScaler's entry
    _hooked_step = Optimizer.profile_hook_step(_step)

    @torch._disable_dynamo
    @torch.no_grad()
    def step_retrace(self, loss: LossLike) -> None:
        """Revert the last step without a gradient (the caller skipped ``backward``)."""
        if loss is None:
            raise TypeError("step_retrace needs the loss value that made you skip backward()")
        self._refuse_inside_boosted("step_retrace")
        for group in self.param_groups:
            self._refuse_ignored_options(group)
        self._check_models_known("step_retrace")
        self._follow_parameter_casts()
        self._real_step([*self._pending, _loss_value(loss)], with_gradient=False)
        reshard(self.models)  # the skipped backward left gathered weights behind
        for keeper in list(LOSS_KEEPERS):  # a loss scaled for the abandoned step is no loss of the next one
            keeper._gradients_dropped(self, retrace=True, loss=loss)
        params = self._params()
        for model in {*self.models, *self.unsynced_models}:  # the abandoned sums, wherever a wrapper keeps them
            drop_unsynced_grads(model, params)
        self.unsynced_models.clear()
        # and in .grad where no model was given: a loop that calls zero_grad() after step() skips it after the
        # retrace, and the next backward would add the abandoned micro-batches to the next real step's gradient
        for p in params:
            p.grad = None

    @torch.no_grad()
    def skip_backward(self, loss: LossLike, limit: float | None = None) -> bool:
        """True on every rank when any rank's loss is non-finite (or above ``limit``).

        The collective form of the seed's "skip backward on a bad loss": all
        ranks must skip ``backward()`` together, or the others would wait in
        the gradient reduction. One tiny all-reduce under data parallelism::

            if optimizer.skip_backward(loss, limit):
                optimizer.step_retrace(loss)
            else:
                loss.backward()
                optimizer.step(loss)

        Under FSDP the optimizer needs the model (see ``model``) so that the
        retrace reaches the weights FSDP kept gathered from the forward.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Real) or math.isnan(limit)):
            raise TypeError(f"skip_backward's limit must be a number or None, got {limit!r}")
        value = _loss_value(loss)
        device = self._device or torch.device("cpu")
        value = torch.as_tensor(value, dtype=torch.float64).to(device)
        bad = ~torch.isfinite(value)
        if limit is not None:
            bad |= value > limit
        if not self._check_every:
            return bool(self.reducer.sum(bad.to(torch.float64).reshape(1)).item() > 0)
        return self._checked_exchange(("skip_backward", limit), bad.to(torch.float64))[0] > 0

    # ------------------------------------------------------------ boost
    def enable_boost(self, cycle: int = DEFAULT_CYCLE) -> None:
        """Average the accepted points, ``cycle`` of them at most (then the mean is frozen).

        Where boosting is on already (also from a loaded checkpoint), the mean and its count stay: a resumed
        script that turned it on after loading lost the saved mean. :meth:`restart_boost` starts afresh.
        """
        self.booster.enable(cycle)
        for p in self._params():
            self.state[p].setdefault("boost", new_mean(p))

    def disable_boost(self) -> None:
        self.booster.disable()
        self._boost_model = self._boost_source = None
        for state in self.state.values():
            state.pop("boost", None)

    def restart_boost(self) -> None:
        """Start a new averaging cycle (the epoch boundary of the published package); on every rank together."""
        self.booster.restart()

    @contextmanager
    def boosted(self) -> Iterator[int]:
        """Evaluate with the averaged weights: swapped into the parameters in place.

        Works for plain, DDP and sharded models (each rank swaps its shards;
        enter it on all ranks together, as for any forward of a sharded
        model). The parameters are bit-identical afterwards. Yields the number
        of averaged points (0: boosting off or nothing averaged yet, weights
        unchanged). BatchNorm running statistics belong to the current weights:
        recompute them for the boosted ones (``torch.optim.swa_utils.update_bn``),
        keeping the model's aside: the block swaps back the parameters, not the buffers.
        """
        self._refuse_inside_boosted("boosted()")
        self._follow_parameter_casts()
        count = self.booster.count if self.booster.enabled else 0
        params, means = self._boost_pairs() if count else ([], [])
        if count:
            self._check_models_known("boosted()")
        kept = Booster.swap_in(params, means)
        reshard(self.models if count else ())
        self._boost_swapped = bool(count)
        try:
            yield count
        finally:
            self._boost_swapped = False
            # first: a forward that raised midway left FSDP1's unit gathered, its parameters the full flat tensor
            reshard(self.models if count else ())
            Booster.swap_out(params, means, kept)
            if count and self._param_versions is not None:  # the swaps are ELRA's: the point is the one stepped to
                self._param_versions = self._current_param_versions()

    def _refuse_inside_boosted(self, what: str) -> None:
        if self._boost_swapped:
            raise RuntimeError(
                f"{what} inside optimizer.boosted(): the parameters hold the boost mean until the block ends, "
                "and the optimizer's state belongs to the current point. Evaluate (or save the model's boosted "
                "weights) inside it; train, copy and save the optimizer after it"
            )

    def get_boost_model(
        self, enable: bool, model: torch.nn.Module | None = None, device: torch.device | str | None = None
    ) -> tuple[int, float, torch.nn.Module | None]:
        """The published API: ``(count, mean_loss, model_at_boost_point)``, once per epoch.

        ``get_boost_model(True, model)`` turns boosting on; later calls return a
        copy of ``model`` (kept and refreshed, on ``device``) holding the mean of
        the points accepted since the previous call (or of the first full
        cycle), and start a new cycle. As in the published package, the model
        is needed once: later calls may leave it out. ``enable=False`` turns
        boosting off. For sharded models, which cannot be copied, use :meth:`boosted`.
        """
        if not enable:
            self.disable_boost()
            return 0, 0.0, None
        wrapping = fsdp_wrapping(self._params())
        if wrapping is not None:  # refused now, not an epoch later at the first copy (in torch's words)
            raise TypeError(
                f"get_boost_model copies the model, which {wrapping} cannot (each rank holds shards): evaluate "
                "the boost mean in place, `with optimizer.boosted():` on every rank, after optimizer.enable_boost()"
            )
        if model is not None and not isinstance(model, torch.nn.Module):  # refused now, not an epoch later at the copy
            raise TypeError(f"get_boost_model's model must be a torch.nn.Module, got {type(model).__name__}")
        wrapper = uncompiled(model) if model is not None else None
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) and wrapper.process_group is not dist.group.WORLD:
            raise TypeError(  # torch's refusal to copy such a DDP came an epoch later, at the first copy
                "get_boost_model copies the model, which torch cannot for DDP over a process group of its own: pass "
                "the module it wraps (model.module), or evaluate the boost mean in place, `with optimizer.boosted():`"
            )
        if model is not None:
            self._boost_source = model
        if not self.booster.enabled:
            self.enable_boost()
            return 0, 0.0, None
        count, loss = self.booster.count, self.booster.mean_loss
        if count < 2:
            self.booster.restart()
            return 0, loss, None
        model = self._boost_source
        if model is None:
            raise TypeError(
                "get_boost_model needs the model before it returns a boosted copy: pass it once in this process, "
                "get_boost_model(True, model) (an optimizer built here, also one loaded from a checkpoint, has "
                "not seen it)"
            )
        if not _same_layout(self._boost_model, model):  # the first call, or a model cast or grown since the copy
            self._boost_model = copy.deepcopy(model)
        with self.boosted():
            self._boost_model.load_state_dict(model.state_dict())
        if device is not None:
            self._boost_model.to(device)
        self.booster.restart()
        return count, loss, self._boost_model

    def _boost_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = [(local(p), local(self.state[p]["boost"])) for p in self._params()]
        return [p for p, _ in pairs], [m for _, m in pairs]

    # ------------------------------------- copies (checkpoints: elra.checkpoint)
    def __getstate__(self) -> dict[str, Any]:
        """Everything needed to continue the same trajectory (``copy.deepcopy``, pickle, ``torch.save``).

        torch's optimizers keep only ``defaults``, ``state`` and ``param_groups``;
        ELRA also needs its controller, collected micro-batches and boost
        counters. The models it knows (``model``, ``grad_sync``) come along, so
        that a copy reshards its own; not copied: hooks (as in torch), which
        models hold sums not yet synced (that belongs to the original's
        training loop), and methods patched onto this object (an LR scheduler
        wraps ``step`` with a reference to this optimizer: a copy would step
        the original).
        """
        self._refuse_inside_boosted("a copy of the optimizer")
        patched = {k for k, v in self.__dict__.items() if callable(v) and callable(getattr(type(self), k, None))}
        state = {
            k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k not in patched | {"_opt_called"}
        }
        state["unsynced_models"] = set()
        # deepcopy and pickle drop the .grad of parameters: a step counts a zero one (zero_grad(set_to_none=False)) too
        params = self._params()
        state[_GRADS] = {p: p.grad for p in params if p.grad is not None}
        state[_GRAD_DTYPES] = {p: p.grad_dtype for p in params if getattr(p, "grad_dtype", p.dtype) != p.dtype}
        # the copy's gradients count their versions afresh: it must still tell a backward not yet stepped (state_dict)
        state[_UNSTEPPED] = bool(self._pending) and self._grads_changed_since_step()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        grads = state.pop(_GRADS, state.get("_kept_grads", {}))  # copies by older elra kept only collected sums
        grad_dtypes = state.pop(_GRAD_DTYPES, {})
        unstepped = state.pop(_UNSTEPPED, False)
        super().__setstate__(state)
        OPTIMIZERS.add(self)
        self._param_versions = None  # the copy's parameters count their versions afresh
        for p, dtype in grad_dtypes.items():  # float32 gradients of a bfloat16 parameter stay float32
            p.grad_dtype = dtype
        for p, grad in grads.items():
            p.grad = grad
        self._note_kept_versions()  # the copied gradients count their versions afresh
        if unstepped:  # a backward since the original's last step: its micro-batch is in the copied sums too
            self._kept_versions.clear()

    # ------------------------------------------------------- internals
    def _decay_rates(self, groups: list[dict[str, Any]]) -> list[float]:
        """Each group's decoupled decay rate; ``None`` (automatic) is AUTO_DECAY along a
        preconditioned direction once the regime is known to be stochastic, else 0."""
        stochastic = self.geometry is not None and self.controller.regime == "stochastic"
        automatic = AUTO_DECAY if stochastic else 0.0
        return [automatic if decay_rate(g["weight_decay"]) is None else decay_rate(g["weight_decay"]) for g in groups]

    def _reported(self, loss: Any, what: str) -> float:
        value = _loss_value(loss)
        value = float(value) if not isinstance(value, torch.Tensor) else value.item()
        if not math.isfinite(value):
            raise ValueError(f"the {what} loss must be finite, got {value}")
        return value

    def _check_models_known(self, change: str) -> None:
        """Refuse an in-place change that FSDP's gathered weights would hide from the next forward."""
        wrapping = fsdp_wrapping(self._params())
        if wrapping is not None and not reshard(self.models):
            raise RuntimeError(
                f"{change} changes the parameters in place, but under {wrapping} the model keeps gathered "
                "copies of them after a forward (the root's), which the next forward would use unchanged: "
                "give the optimizer the wrapped model, ElraOptimizer(model.parameters(), model, ...), "
                "or use `with elra.grad_sync(model, optimizer):` around forward and backward"
            )

    def _note_unsynced_models(self) -> None:
        """While collecting: add the known models whose FSDP2 units hold unreduced sums though :func:`grad_sync`
        did not turn their sync off (the caller did, ``set_requires_gradient_sync``) to ``unsynced_models``."""
        if self._pending:
            self.unsynced_models.update(model for model in self.models if holds_unsynced_grads(model))

    def _reduce_held_sums(self) -> None:
        """Before a real step: reduce the sums a known FSDP model still holds because the caller's sync switch was
        off for the micro-batch completing the step (an accumulation count of the caller's own, say). Without
        this the step would go along the gradients reduced before (or find none), and the held sums would join
        the next step's. (53 us a real step for 576 FSDP2 parameters, on one core.)

        One gradient reduction outside the backward, as :meth:`sync_pending_grads` does; logged once, since
        :func:`elra.grad_sync` saves it. Every rank decides alike: the reductions its backward skipped are
        collectives, skipped on all ranks or hanging. (DDP keeps nothing back: ``.grad`` left unreduced by its
        ``no_sync()`` is refused by the sums' agreement, :meth:`_read_checked`.)
        """
        held = [model for model in self.models if holds_unsynced_grads(model)]
        if held and not self._held_sums_logged:
            logger.warning(
                "ELRA real step %d: %s's gradient sync was off for the backward of the micro-batch completing it "
                "(set_requires_gradient_sync(False) or no_sync()); its sums are reduced now, outside the backward. "
                "`with elra.grad_sync(model, optimizer):` around forward and backward turns the sync on exactly "
                "for those micro-batches. Logged once",
                self.controller.state.steps + 1,
                type(held[0]).__name__,
            )
            self._held_sums_logged = True
        for model in held:
            sync_unsynced_grads(model)

    def _refuse_unsharded_gradients(self) -> None:
        """Before a real step, with nothing moved: refuse a gradient shaped unlike its FSDP1 parameter. torch's
        ``.grad`` setter refuses such a gradient, but FSDP1's ``no_sync()`` leaves one (the unsharded sum on the
        sharded parameter), which an optimizer that does not know the model cannot reduce: P2M's fused accept
        read it as flat memory of the parameter's length (a silent wrong step), the other sums failed on its
        size. Only FSDP1's parameters are looked at (noted by :meth:`add_param_group`): every rank alike."""
        odd = next((p for p in self._flattened if p.grad is not None and p.grad.shape != p.shape), None)
        if odd is not None:
            raise RuntimeError(
                f"a gradient of shape {tuple(odd.grad.shape)} sits on a parameter of shape {tuple(odd.shape)}: under "
                "FSDP1 a backward inside no_sync() leaves the unsharded sum on the sharded parameter. Nothing moved. "
                "Keep the micro-batch that completes a real step out of no_sync() (`with elra.grad_sync(model, "
                "optimizer):` decides per micro-batch), or give the optimizer the wrapped model, "
                "ElraOptimizer(model.parameters(), model, ...), which reduces such sums at a real step"
            )

    def _no_gradient(self) -> _NoGradient:
        """The error of a real step without any gradient on any rank; under FSDP a backward with the wrapper's
        sync off leaves none where an optimizer that does not know the model can see it."""
        message = (
            "no parameter has a gradient: call loss.backward() before optimizer.step(loss), "
            "or optimizer.step_retrace(loss) to skip backward()"
        )
        wrapping = None if self.models else fsdp_wrapping(self._params())
        if wrapping is not None:
            message += (
                f". Under {wrapping} a backward with the wrapper's gradient sync off keeps its sums unreduced, "
                "where the optimizer sees none: give it the wrapped model, ElraOptimizer(model.parameters(), model, "
                "...), which reduces them at a real step, or use `with elra.grad_sync(model, optimizer):` around "
                "forward and backward"
            )
        return _NoGradient(message)

    def _note_ddp_sync_off(self) -> None:
        """After a collected micro-batch: add the known DDP models whose forward ran with gradient sync off though
        :func:`grad_sync` did not turn it off (the caller's ``no_sync()``; DDP's forward then leaves
        ``require_forward_param_sync`` False) to ``unsynced_models``: their ``.grad`` hold this rank's sums. Read
        here, not at ``state_dict()`` as :func:`holds_unsynced_grads` is: any later forward rewrites the flag (an
        evaluation under ``no_grad`` sets it False with the sums synchronised)."""
        self.unsynced_models.update(
            model
            for model in self.models
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not model.require_forward_param_sync
        )

    def _keep_grads(self) -> None:
        """Remember the collected gradients, to catch a reset (``model.zero_grad()``) while collecting."""
        moving = {p for model in self.models if getattr(model, "gradient_as_bucket_view", False) for p in model.parameters()}
        params = self._params()
        kept = [
            p
            for p in params
            # FSDP1 replaces its flat gradients itself between backward passes, DDP with bucket views too
            if not getattr(p, "_fsdp_flattened", False) and p not in moving
        ]
        self._kept_grads = {p: p.grad for p in kept if p.grad is not None}
        self._gradless = {p for p in kept if p.grad is None}
        # in one process, where every parameter's .grad shows a backward: FSDP keeps a micro-batch's sums outside
        # .grad where its sync is off (and FSDP1 and DDP's bucket views move them), and beside other ranks a rank
        # may hold none of this micro-batch's (ZeroRedundancyOptimizer's share): raised alone, the others hung
        self._backward_seen = (
            self.reducer.world_size == 1 and len(kept) == len(params) and not any(hasattr(p, "placements") for p in kept)
        )
        self._note_kept_versions()

    def _note_kept_versions(self) -> None:
        """Note the version counters of the collected gradients: a backward adds to them in place, which bumps
        them, so :meth:`_grads_changed_since_step` can tell a checkpoint taken before the loss came."""
        self._kept_versions = {p: local(grad)._version for p, grad in self._kept_grads.items()}

    def _grads_changed_since_step(self) -> bool:
        """Whether a collected gradient was replaced or changed in place since it was noted, or a parameter
        that had none got one (a backward whose micro-batch ``step`` has not counted yet)."""
        return any(
            p.grad is not grad or local(grad)._version != self._kept_versions.get(p)
            for p, grad in self._kept_grads.items()
        ) or any(p.grad is not None for p in self._gradless)  # routed elsewhere before (an expert), or unfrozen

    def _gradient_marks(self) -> list[tuple[weakref.ref, int] | None]:
        """Each parameter's gradient as it is, object and version (a backward makes a new one or adds into it in
        place; under FSDP2 into a DTensor's local part): what :meth:`_gradients_written_since` compares with."""
        return [None if p.grad is None else (weakref.ref(p.grad), local(p.grad)._version) for p in self._params()]

    def _gradients_written_since(self, marks: list[tuple[weakref.ref, int] | None]) -> bool:
        """Whether a gradient changed since :meth:`_gradient_marks` gave ``marks`` (ElraGradScaler: which
        optimizers a scaled loss's backward wrote into)."""
        grads = [p.grad for p in self._params()]
        if len(marks) != len(grads):
            return any(grad is not None for grad in grads)
        return any(
            grad is not None and (mark is None or mark[0]() is not grad or mark[1] != local(grad)._version)
            for grad, mark in zip(grads, marks)
        )

    def _check_kept_grads(self) -> None:
        """Raise if the collected gradients were reset; the collection is then dropped (its sums are gone), so
        that the next micro-batch starts a new real step instead of meeting the same error for ever."""
        for p, grad in self._kept_grads.items():
            if p.grad is not grad:
                collected = len(self._pending)
                self._pending, self._kept_grads = [], {}
                raise RuntimeError(
                    f"gradients were reset or replaced while ELRA was collecting micro-batch {collected + 1} of "
                    f"{self.controller.state.multiplier}: use optimizer.zero_grad() (it keeps them while "
                    "collecting), not model.zero_grad(); see `collecting` in the README. Edit gradients in place "
                    "(p.grad.mul_(c), torch.nan_to_num(p.grad, out=p.grad)): a new tensor assigned to p.grad "
                    "looks like a reset, ELRA sums the micro-batches in the tensor it kept. (Under "
                    "DDP(gradient_as_bucket_view=True), which moves gradients into its buckets, give the "
                    "optimizer the model. torch's ZeroRedundancyOptimizer.zero_grad() is torch's and clears "
                    "every gradient: call it only when zero.optim.micro_batches is 0.) The "
                    f"{collected} micro-batch(es) collected so far are dropped: "
                    "after optimizer.zero_grad() the next step starts a new collection"
                )

    def _real_step(
        self, losses: list[LossLike], with_gradient: bool, inv_scale: float = 1.0, skip_overflow: bool = False
    ) -> str:
        edited = self._edited_between_steps()
        with _without_autocast(self._device):  # a step called inside the caller's autocast region
            outcome = self._decided_step(losses, with_gradient, inv_scale, skip_overflow)
        if outcome == "overflow":  # dropped, but passed to step: a step budget's clock counts them (micro_batches_taken)
            self.controller.state.micro_steps += len(losses)
        if outcome == "retrace" and edited and not self._edit_warned:
            self._edit_warned = True
            logger.warning(
                "ELRA retraced real step %d after the parameters were changed in place since the step before (a "
                "projection, clamp or weight load between steps?): a retrace moves back along the last step from where "
                "they are, not to the last good point. Constrain through the model (torch.nn.utils.parametrize), or "
                "build the optimizer afresh after loading weights. Logged once",
                self.controller.state.steps,
            )
        self._param_versions = self._current_param_versions()
        return outcome

    def _current_param_versions(self) -> list[int] | None:
        """The parameters' in-place version counters; ``None`` under FSDP, whose wrappers swap their storage."""
        params = self._params()
        return None if fsdp_wrapping(params) is not None else [p._version for p in params]

    def _edited_between_steps(self) -> bool:
        """Whether a parameter was changed in place since the last real step (by anything but ELRA)."""
        return self._param_versions is not None and self._param_versions != self._current_param_versions()

    def _decided_step(self, losses: list[LossLike], with_gradient: bool, inv_scale: float, skip_overflow: bool) -> str:
        self.reducer.learn_shards(self.models)
        if self.geometry is not None:
            return self._preconditioned_step(losses, with_gradient, inv_scale, skip_overflow)
        decays = self._decay_rates(self.param_groups)
        groups = [self._group_tensors(group, with_gradient) for group in self.param_groups]
        half = any(tensors["half"] for tensors in groups)
        sums, values, bounds = self._global_sums(groups, decays, losses, with_gradient, (inv_scale, skip_overflow))
        self._pending = []
        self._kept_grads = {}
        if sums is not None and inv_scale != 1.0:
            sums = sums.scaled(inv_scale)
            bounds = replace(bounds, grads=bounds.grads * inv_scale) if bounds is not None else None
        if skip_overflow and sums is not None and not sums.is_finite() and all(map(math.isfinite, values)):
            return "overflow"
        self._note_unusable_gradient(sums, values)
        decision = self.controller.real_step(values, sums, decays, half_precision=half, bounds=bounds)
        self._apply(decision, groups, inv_scale, sum(values) / len(values))
        length = self.controller.step_length
        for group in self.param_groups:
            group["lr"] = length
        return decision.action

    def _note_unusable_gradient(self, sums: Any, losses: list[float]) -> None:
        """Warn at the first of a run of real steps whose gradient sums are not finite though their losses are.

        The controller retraces each as a fault, logged at debug only (before the first step it warns itself): a
        gradient that stayed so (float32 elements above about 1.8e19, whose squares pass float32's range, or an
        inf/nan in it) stalled the run with every step retraced and no word why.
        """
        unusable = sums is not None and not sums.is_finite() and all(map(math.isfinite, losses))
        if unusable and not getattr(self, "_unusable_gradient", False) and self.controller.state.started:
            logger.warning(
                "ELRA real step %d retraced: its loss is finite but the sums of its gradient (|g|^2 and inner "
                "products) are not: an inf/nan in a gradient, or float32 gradients or parameters with elements above "
                "about 1.8e19, whose squares pass float32's range. Each such step is retraced; a run of them is "
                "logged once",
                self.controller.state.steps + 1,
            )
        self._unusable_gradient = unusable

    def _group_tensors(self, group: dict[str, Any], with_gradient: bool) -> dict[str, Any]:
        """Local parts of one group's tensors: those with gradients, and those the last step moved.

        ``owners`` are the parameters behind ``params``; ``half`` tells whether any
        parameter of the group (with a gradient or not, so all ranks agree) is 16-bit.
        ``ranged`` lists (parameter, direction, gradient or None, weight / largest
        value**2) of the 16-bit ones, whose range a step must respect.
        """
        keys = ("params", "owners", "grads", "dirs", "stale", "moved", "moved_dirs", "ranged")
        tensors: dict[str, Any] = {k: [] for k in keys}
        params, owners, grads, dirs, stale, moved_params, moved_dirs, ranged = (tensors[k] for k in keys)
        state, last_moved = self.state, self._moved
        for p in group["params"]:  # one pass, local names: a step may hold hundreds of parameters
            x, direction, moved = local(p), local(state[p]["direction"]), p in last_moved
            grad = p.grad if with_gradient else None
            if grad is not None:
                if grad.is_sparse:
                    raise RuntimeError("ElraOptimizer does not support sparse gradients")
                params.append(x)
                owners.append(p)
                grads.append(local(grad))
                dirs.append(direction)
            elif moved:
                stale.append(direction)
            if moved:
                moved_params.append(x)
                moved_dirs.append(direction)
            if p.dtype in _SIXTEEN_BIT:
                weight = 1.0 / self.reducer.replicas(p) / torch.finfo(p.dtype).max ** 2
                ranged.append((x, direction, grad if grad is None else local(grad), weight))
        tensors["half"] = bool(ranged)
        tensors["weights"] = self.reducer.weights(owners)
        return tensors

    def _global_sums(
        self,
        groups: list[dict[str, Any]],
        decays: list[float],
        losses: list[LossLike],
        with_gradient: bool,
        scaling: tuple = (),
    ) -> tuple[StepSums | None, list[float], RangeBounds | None]:
        """The controller's inputs, summed over ranks: per-group inner products, mean losses, range bounds."""
        n_groups = len(groups)
        started = self.controller.state.started
        momentum = self.controller.momentum is not None
        any_decay = any(decays)
        half = any(tensors["half"] for tensors in groups)
        present, ranged, check = _layout(n_groups, half)
        batch = self._scalar_batch(check)
        for j, tensors in enumerate(groups) if with_gradient else ():
            slot = {name: k * n_groups + j for k, name in enumerate(_SUMS)}
            batch.add_constant(present, len(tensors["params"]))
            if not tensors["params"]:
                continue
            grad, param, direction = 0, 1, 2  # positions in the vectors below
            pairs = [(grad, grad, slot["grad_sq"])]
            if started:
                pairs.append((grad, direction, slot["grad_dir"]))
                if momentum:
                    pairs.append((direction, direction, slot["dir_sq"]))
            if any_decay:
                pairs.append((param, param, slot["param_sq"]))
            if decays[j]:
                pairs.append((grad, param, slot["grad_param"]))
                if started:
                    pairs.append((param, direction, slot["param_dir"]))
            products(batch, (tensors["grads"], tensors["params"], tensors["dirs"]), pairs, tensors["weights"])
        ranged_tensors = [entry for tensors in groups for entry in tensors["ranged"]]
        if ranged_tensors:
            params, dirs, grads, weights = zip(*ranged_tensors)
            products(batch, (params, dirs), [(0, 0, ranged), (1, 1, ranged + 1)], weights)
            with_grad = [(g, w) for g, w in zip(grads, weights) if g is not None]
            if with_grad:
                grads, weights = zip(*with_grad)
                products(batch, (grads,), [(0, 0, ranged + 2)], weights)
        squares = [k * n_groups + j for k, name in enumerate(_SUMS) if name in _SQUARES for j in range(n_groups)]
        squares += list(range(ranged, check))
        values, loss_values = self._read_checked(batch, squares, losses, with_gradient, *scaling)
        bounds = RangeBounds(*(math.sqrt(v) if v >= 0.0 else math.nan for v in values[ranged:check])) if half else None
        if not with_gradient:
            return None, loss_values, bounds
        if values[present] == 0:
            raise self._no_gradient()
        sums = StepSums(*(values[k * n_groups : (k + 1) * n_groups] for k in range(len(_SUMS))))
        return sums, loss_values, bounds

    def _scalar_batch(self, check: int) -> ScalarBatch:
        """A real step's vector: ``check`` slots of sums, then the reported losses' (:meth:`_apply_reports`), then
        the whole copies' sums of squares where a model holds them beside shards (:meth:`_replication_layout`)."""
        copies = COPY_SLOTS if self._replication_layout()[1] else 0
        return ScalarBatch(check + REPORT_SLOTS + copies, self._device or torch.device("cpu"), self.reducer)

    def _read_checked(
        self, batch: ScalarBatch, squares: list[int], losses: list[LossLike], with_gradient: bool, *scaling: Any
    ) -> tuple[list[float], list[float]]:
        """The step's one collective, under ``check_consistency`` after the handshake (:meth:`_handshake`) of the
        call ``("step", with_gradient, *scaling)``.
        It carries the losses reported since the last real step too (:meth:`_apply_reports`). What every rank
        holds a whole copy of must agree (:meth:`ScalarBatch.read`): under DDP every rank's terms of the sums of
        squares (``squares``, slots); beside shards, the copies' own |x|^2 and |g|^2."""
        everywhere, copies, _ = self._replication_layout()
        check = batch.slots - REPORT_SLOTS - (COPY_SLOTS if copies else 0)
        for slot, value in enumerate(self._reports, start=check):
            batch.add_constant(slot, value)
        agree = squares if everywhere else []
        if copies:
            agree = copy_squares(batch, check + REPORT_SLOTS, copies, with_gradient, self.reducer.world_size)
        if self._check_every:
            self._handshake(("step", with_gradient, *scaling))
        values, loss_values = batch.read(losses, agree=agree)
        if batch.disagreeing:
            step, world = self.controller.state.steps, self.reducer.world_size
            if everywhere:
                raise RuntimeError(
                    f"the ranks hold different gradients or parameters at ELRA's real step {step}, though every "
                    f"parameter is a replica on all {world} ranks (DDP): each rank would step along its own gradient "
                    "and the replicas drift apart. The micro-batch that completes a real step must all-reduce its "
                    "gradients: keep it out of DDP's no_sync() (elra.grad_sync(model, optimizer) decides per "
                    "micro-batch). DDP never reduces a parameter that required no gradient when it was built: unfreeze "
                    "before wrapping. If each process trains a model of its own, pass process_group=None"
                )
            raise RuntimeError(
                f"the ranks hold different gradients or parameters at ELRA's real step {step} for the {len(copies)} "
                f"parameters each of the {world} ranks holds whole (plain tensors beside sharded ones): no wrapper "
                "reduces their gradients, so each rank would step along its own and the copies drift apart. "
                "Wrapping submodules alone (fully_shard, FSDP) leaves the root's own parameters out: wrap the root "
                "module too (it takes the parameters no inner unit holds), all-reduce their gradients yourself, or "
                "tell ELRA how many ranks hold each parameter with replicas="
            )
        self._apply_reports(values[check : check + REPORT_SLOTS])
        return values, loss_values

    def _replication_layout(self) -> tuple[bool, list[torch.Tensor], list[torch.Tensor]]:
        """Whether every parameter is a replica on every rank (DDP), so that the ranks' local sums must agree;
        if not, the parameters that are (whole copies on every rank beside shards, e.g. those of a model
        fully_shard wraps in part), whose own sums must; and the DTensor parameters replicated over a mesh
        dimension, whose gradients tensor parallelism may leave as partial sums (:func:`reduce_partial_grads`).
        Looked up again when the groups or the models ELRA reads shards from change."""
        key = (self.reducer.world_size, self.reducer.shards_key, tuple(len(g["params"]) for g in self.param_groups))
        if key != self._replication[0]:
            world, replicas = key[0], self.reducer.replicas_counter()
            params = self._params()
            copies = [p for p in params if replicas(p) == world] if world > 1 else []
            everywhere = bool(copies) and len(copies) == len(params)
            replicated = [p for p in params if any(pl.is_replicate() for pl in getattr(p, "placements", ()))]
            self._replication = (key, everywhere, [] if everywhere else copies, replicated)
        return self._replication[1:]

    def _apply_reports(self, sums: list[float]) -> None:
        """Every rank's train and validation loss: the mean of those reported (on any rank) since the last real
        step, before this step's decision; ranks that report different values, or only one rank, agree so."""
        train, trains, valid, valids = sums
        if trains:
            self.controller.set_train_loss(train / trains)
        if valids:
            self.controller.set_valid_loss(valid / valids)
        self._reports = [0.0] * REPORT_SLOTS

    def _fingerprint(self, call: tuple) -> int:
        """A 20-bit hash of everything that decides this collective's layout and the next decision.

        The call (``step`` with its inputs, or ``skip_backward``), the group
        count, batch multiplier, collected micro-batches, 16-bit parameters and
        the direction's vector blocks (the vector's length: a rank of bfloat16
        parameters among float32 ones met the others' real step with a longer
        vector, which gloo aborts on), the parameters' dtypes (along a
        preconditioned direction the vector is as long either way, and such a
        rank trained on silently in another precision), the hyperparameters,
        the controller state and the boost counters (a rank that restarted its
        cycle alone averaged other points: its shards of the mean did not fit
        the others').
        """
        decays = self._decay_rates(self.param_groups)
        # the reported losses are reconciled by this collective, before they decide anything
        state = sorted((k, v) for k, v in self.controller.state_dict().items() if k not in _REPORTED_FIELDS)
        dtypes = sorted({str(p.dtype) for p in self._params()})
        layout = (len(self.param_groups), len(self._pending), self._vector_layout(), dtypes)
        boost = (self.booster.enabled, self.booster.cycle, self.booster.count)
        text = repr((call, layout, decays, sorted(self._config.items()), state, boost))
        return zlib.crc32(text.encode()) % (1 << 20) + 1

    def _handshake(self, call: tuple) -> None:
        """Under ``check_consistency``, before a real step's vector: every rank's fingerprint agrees, or raises.

        The step's vector has a length of this rank's own (groups, micro-batches, 16-bit parameters...): the
        handshake, three numbers as a ``skip_backward``'s, lets a rank built, loaded or grouped differently
        meet the same clear error as the others instead of a collective of another size, which gloo aborts the
        processes on. Every step: a rank may change alone at any point (``load_state_dict`` or
        ``add_param_group`` on one rank; before session 25 ranks that agreed once skipped it, and such a rank's
        handshake met the others' step).
        """
        self._checked_exchange(call)

    def _checked_exchange(self, call: tuple, payload: torch.Tensor | None = None) -> list[float]:
        """All-reduce ``payload`` and this rank's fingerprint (three numbers); raises if ranks differ."""
        fingerprint = self._fingerprint(call)
        vector = torch.tensor([0.0, fingerprint, fingerprint * fingerprint], dtype=torch.float64,
                              device=self._device or torch.device("cpu"))
        if payload is not None:
            vector[0] = payload
        values = self.reducer.sum(vector).tolist()
        self._verify_consistency(values[1], values[2], fingerprint)
        return values

    def _vector_layout(self) -> tuple[int, int]:
        """A real step's vector beyond the groups and micro-batches: the fingerprint's slot (after the sums and,
        with 16-bit parameters, P2M's range bounds) and the numbers of the direction's vector blocks."""
        params = self._params()
        if self.geometry is None:
            _, _, check = _layout(len(self.param_groups), any(p.dtype in _SIXTEEN_BIT for p in params))
            return check, 0
        return SLOTS, self.geometry.vector_length(params, self.reducer.replicas_counter())  # blocks after the losses

    def _verify_consistency(self, total: float, total_sq: float, mine: int) -> None:
        ranks = self.reducer.world_size
        if total != ranks * mine or total_sq != ranks * mine * mine:
            raise RuntimeError(
                f"ranks disagree on the ELRA controller state at real step {self.controller.state.steps}: "
                "each rank must build the optimizer with the same arguments over parameters of the same dtypes, load "
                "the same checkpoint and call step()/step_retrace()/skip_backward() at the same points"
            )

    def _apply(self, decision: Decision, groups: list[dict[str, Any]], inv_scale: float, loss: float) -> None:
        """Carry out the controller's decision on the local tensors."""
        if decision.action == "accept":
            if self.booster.enabled:
                self.booster.record(*self._boost_pairs(), loss)
            self._moved = set()
            grad_scale = decision.grad_scale * inv_scale
            for j, tensors in enumerate(groups):
                self._moved.update(tensors["owners"])
                params, grads, dirs = tensors["params"], tensors["grads"], tensors["dirs"]
                if tensors["stale"]:
                    torch._foreach_zero_(tensors["stale"])
                fused, columns = split_fusable([params, grads, dirs])
                if fused[0]:
                    sgd_accept(*fused, decision.keep, grad_scale, decision.param_scale[j], decision.step)
                for params, grads, dirs in runs(columns):  # each run's passes hit the cache
                    if decision.keep == 0.0:
                        torch._foreach_copy_(dirs, grads)
                        if grad_scale != 1.0:
                            _scale(dirs, grad_scale)
                    else:
                        torch._foreach_mul_(dirs, decision.keep)
                        _add_scaled(dirs, grads, grad_scale)
                    if decision.param_scale[j]:
                        _add_scaled(dirs, params, decision.param_scale[j])
                    _add_scaled(params, dirs, -decision.step)
        elif decision.action == "retrace" and decision.shift:
            for tensors in groups:
                if tensors["moved"]:
                    _add_scaled(tensors["moved"], tensors["moved_dirs"], decision.shift)

    # ------------------------------------------- preconditioned direction
    def _preconditioned_step(
        self, losses: list[LossLike], with_gradient: bool, inv_scale: float, skip_overflow: bool
    ) -> str:
        """A real step over :mod:`elra.geometry`'s direction, decided by :class:`LineController`.

        One all-reduce of N = <g, u_old>, D = <m_hat, u_old>, |u_old|^2, |x|^2
        and the losses; then accept (moments, then ``x <- decay*x - eta*u_new``)
        or retrace along ``u_old``, recomputed from the unchanged moments.
        """
        geometry, t = self.geometry, self.controller.state.moment_steps
        geometry.set_beta1(self.controller.beta1)  # the regime's (given, or restored with the controller)
        decays = self._decay_rates(self.param_groups)
        replicas = self.reducer.replicas_counter()
        groups = [geometry.gather(group, self.state, self._moved, with_gradient, replicas) for group in self.param_groups]
        check = SLOTS
        batch = self._scalar_batch(check)
        for tensors in groups:
            geometry.add_sums(batch, tensors, t)
        values, loss_values = self._read_checked(batch, SQUARE_SLOTS, losses, with_gradient, inv_scale, skip_overflow)
        self._pending = []
        self._kept_grads = {}
        grad_scale = inv_scale / len(losses)
        sums = None
        if with_gradient:
            if values[PRESENT] == 0:
                raise self._no_gradient()
            sums = geometry.sums(values, t, grad_scale)
            if skip_overflow and not sums.is_finite() and all(map(math.isfinite, loss_values)):
                return "overflow"
        self._note_unusable_gradient(sums, loss_values)
        decision = self.controller.real_step(loss_values, sums, decays)
        geometry.set_regime(self.controller.regime == "stochastic")
        if self.controller.beta1 != geometry.beta1:  # the regime's momentum, detected now or revised later
            if t == 1:  # m holds one gradient: as if this beta1 had made it
                geometry.switch_beta1(self.state.values(), self.controller.beta1, groups)
            else:  # the moments keep their past
                geometry.set_beta1(self.controller.beta1)
        if decision.action == "accept":
            # a restart is back at the last accepted point: recorded, unless a new cycle began since (count 0)
            if self.booster.enabled and not (decision.restart and self.booster.count):
                self.booster.record(*self._boost_pairs(), sum(loss_values) / len(loss_values))
            self._moved = set()
            for j, tensors in enumerate(groups):
                owners = geometry.owners(tensors)
                self._moved.update(owners)
                fresh = self._waiting.intersection(owners) if self._waiting else None
                if fresh:
                    geometry.start(tensors, t, grad_scale, fresh)
                    self._waiting -= fresh
                if decision.restart:
                    geometry.restart(tensors, t, grad_scale)
                geometry.accept(tensors, t, decision.step, decision.decay[j], grad_scale)
        elif decision.action == "retrace":
            for tensors in groups:
                geometry.retrace(tensors, t, decision.shift)
        for group in self.param_groups:
            group["lr"] = self.controller.step_length
        return decision.action
