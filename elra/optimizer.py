"""``ElraOptimizer``: the public API, parameter groups, state and tensor updates.

The optimizer turns the tensors of one real step into a few global sums
(:mod:`elra.reduce`), lets the controller (:mod:`elra.control`) decide, and
applies the decision with ``torch._foreach_*`` calls on the parameters as they
are. It holds one tensor per parameter: the last step direction (or the
momentum), from which a retrace recomputes the last good point.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.optim import Optimizer

from .boost import DEFAULT_CYCLE, Booster
from .control import MAX_MULTIPLIER, Controller, Decision, StepSums
from .geometry import PRESENT, SLOTS, make_direction
from .line_control import LineController
from .reduce import AUTO, Reducer, ScalarBatch, dot, local
from .sync import drop_unsynced_grads

logger = logging.getLogger("elra")

LossLike = float | torch.Tensor
_STATE_KEY = "elra_controller"
_BOOST_KEY = "elra_boost"
_PENDING_GRAD = "pending_grad"
_SUMS = ("grad_sq", "grad_dir", "dir_sq", "param_sq", "param_dir", "grad_param")


def _decay_rate(value: Any) -> float:
    """The seed's convention: a weight decay above 0.5 means ``1 - value``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid weight_decay: {value!r} (expected a number in [0, 1]; 0.9999 means 1e-4)")
    return 1.0 - float(value) if value > 0.5 else float(value)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer {bound})")
    return int(value)


def _loss_value(loss: Any) -> LossLike:
    """A scalar loss as a float or a detached 0-dim tensor (no host sync)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"ELRA needs a scalar loss, got a tensor of shape {tuple(loss.shape)}; reduce it first")
        if loss.is_complex():
            raise ValueError("ELRA needs a real loss, got a complex tensor")
        return loss.detach().reshape(())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"ELRA needs the loss as a float or a scalar tensor, got {type(loss).__name__}")


class ElraOptimizer(Optimizer):
    """ELRA (P2M): gradient descent that adapts its own step size and batch size.

    Args:
        params: parameters or parameter groups (a group may set ``weight_decay``).
        model: accepted for compatibility with the published API; unused.
        batch_size: samples per micro-batch (sets the statistics window).
        classes: number of classes; ``<= 1`` (default) is the deterministic
            regime for noise-free problems, ``>= 2`` the stochastic one.
        lr: initial step length, a tiny probe (1e-6..1e-4); ELRA grows it.
        weight_decay: decoupled decay rate; values above 0.5 mean ``1 - value``.
        warmup: real steps over which the rate may ramp up.
        momentum: momentum factor in [0, 1), ``None`` or 0 for none.
        batch_multiplier: initial and smallest number of micro-batches whose
            gradients are averaged per real step.
        process_group: data-parallel group to reduce over: ``"auto"`` (the
            default group when torch.distributed runs more than one rank),
            ``None`` (this process alone) or a process group.
        replicas: for unusual layouts, a function giving the number of ranks
            that hold an identical copy of a parameter's local part (see
            :class:`elra.reduce.Reducer` for the automatic rule).
        check_consistency: every this many real steps (0: never) verify that
            all ranks hold the same controller state; raises if not. Rides on
            the step's own all-reduce.
        preconditioner: ``None`` (P2M as published) or ``"adam"``: ELRA's
            step-length control over Adam's direction ``m_hat/(sqrt(v_hat)+eps)``
            (``momentum`` is its beta1, default 0.9; see :mod:`elra.geometry`).
        line_target: with a preconditioner, the gradient-pair ratio the step
            length aims at, in (-1, 1): 0 (default) the line minimum along the
            direction, -0.3 a step 1.3x past it (best on transformers, see
            :mod:`elra.line_control`).

    Call ``step(loss)`` after every ``backward()``; ELRA needs the loss value.
    Under data parallelism each rank passes its own local loss.
    """

    def __init__(
        self,
        params,
        model: torch.nn.Module | None = None,
        batch_size: int = 8,
        classes: int = 0,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup: int = 1,
        momentum: float | None = None,
        *,
        batch_multiplier: int = 1,
        process_group=AUTO,
        replicas: Callable[[torch.Tensor], int] | None = None,
        check_consistency: int = 0,
        preconditioner: str | None = None,
        line_target: float = 0.0,
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        batch_size = _check_int("batch_size", batch_size, 1)
        classes = _check_int("classes", classes, 0)
        warmup = _check_int("warmup", warmup, 0)
        batch_multiplier = _check_int("batch_multiplier", batch_multiplier, 1, MAX_MULTIPLIER)
        self._check_every = _check_int("check_consistency", check_consistency, 0)
        self.reducer = Reducer(process_group, replicas)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0.0 < lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr!r} (expected a positive number, e.g. 1e-5)")
        _decay_rate(weight_decay)
        if momentum is not None and (
            isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0
        ):
            raise ValueError(f"Invalid momentum: {momentum!r} (expected None or a number in [0, 1))")
        if lr >= 1e-3:
            logger.warning("ELRA starts best from a tiny lr (1e-6..1e-4), got %g", lr)
        self._device: torch.device | None = None
        self.booster = Booster()
        self.geometry = make_direction(preconditioner, momentum)
        super().__init__(params, dict(lr=float(lr), weight_decay=weight_decay))
        self.controller = Controller(
            lr=float(lr),
            classes=classes,
            batch_size=batch_size,
            warmup=warmup,
            momentum=float(momentum) if momentum else None,
            min_multiplier=batch_multiplier,
        )
        if self.geometry is not None:
            if isinstance(line_target, bool) or not isinstance(line_target, numbers.Real) or not -1.0 < line_target < 1.0:
                raise ValueError(f"Invalid line_target: {line_target!r} (expected a number in (-1, 1), e.g. 0 or -0.3)")
            self.controller = LineController(float(lr), classes, batch_multiplier, float(line_target))
        self._pending: list[LossLike] = []
        self._kept_grads: dict[torch.Tensor, torch.Tensor] = {}
        self.unsynced_models: set[torch.nn.Module] = set()  # filled by elra.grad_sync
        self._moved: set[torch.Tensor] = set()  # parameters the last accepted step updated
        self._boost_model: torch.nn.Module | None = None

    # ----------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its ``weight_decay`` (0: none) replaces the default for it.

        The direction state is created here, not lazily, so that checkpoint
        tools that initialise missing state by calling ``step()`` leave ELRA alone.
        """
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        _decay_rate(param_group.get("weight_decay", self.defaults["weight_decay"]))
        device = self._device
        for p in params:
            if not p.is_floating_point():
                raise ValueError(f"ELRA optimizes floating point parameters only, got {p.dtype}")
            device = p.device if device is None else device
            if p.device != device:
                raise ValueError(
                    f"all parameters must be on one device: found {p.device} and {device}; use one optimizer per device"
                )
        super().add_param_group({**param_group, "params": params})
        self._device = device
        for p in params:
            if self.geometry is None:
                self.state[p]["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                self.state[p].update(self.geometry.new_state(p))
            if self.booster.enabled:
                self.state[p]["boost"] = p.detach().clone()

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
    def stats(self) -> dict[str, float | int]:
        """Numbers for logs and dashboards."""
        s = self.controller.state
        decays = self.controller.weight_decays([_decay_rate(self.defaults["weight_decay"])])
        return {
            "real_steps": s.steps,
            "retraces": s.retraces,
            "batch_multiplier": s.multiplier,
            "micro_batches": self.micro_batches,
            "lr": self.controller.step_length,
            "rate": s.rate,
            "alpha": s.alpha,
            "weight_decay": decays[0],
            "schedule": s.schedule,
            "boost_count": self.booster.count,
        }

    def set_train_loss(self, loss: float, boost: float | None = None) -> None:
        """Report the training loss (e.g. per epoch); drives the weight-decay control."""
        self.controller.set_train_loss(self._reported(loss, "train"))

    def set_valid_loss(self, loss: float, boost: float | None = None, accu: float | None = None) -> None:
        """Report the validation loss (e.g. per epoch); drives the weight-decay control."""
        self.controller.set_valid_loss(self._reported(loss, "validation"))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, except while collecting: then micro-batch gradients must add up."""
        if self._pending:
            return
        super().zero_grad(set_to_none)

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
        if closure is not None:
            if loss is not None:
                raise TypeError("pass the loss or a closure to step(), not both")
            loss = closure
        if callable(loss):
            with torch.enable_grad():
                loss = loss()
        if loss is None:
            raise TypeError(
                "ElraOptimizer.step needs the loss: call optimizer.step(loss) after loss.backward(), "
                "or optimizer.step(closure) with a closure that returns it"
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
        self._check_kept_grads()
        losses = [*self._pending, value]
        if len(losses) < self.controller.state.multiplier:
            self._pending = losses
            self._kept_grads = {
                p: p.grad
                for group in self.param_groups
                for p in group["params"]
                # FSDP1 replaces its flat gradients itself between backward passes
                if p.grad is not None and not getattr(p, "_fsdp_flattened", False)
            }
            return "collect"
        outcome = self._real_step(losses, True, inv_scale, skip_overflow)
        self.unsynced_models.clear()  # the last backward was synchronised: wrappers hold nothing back
        return outcome

    @torch.no_grad()
    def step_retrace(self, loss: LossLike) -> None:
        """Revert the last step without a gradient (the caller skipped ``backward``)."""
        if loss is None:
            raise TypeError("step_retrace needs the loss value that made you skip backward()")
        self._real_step([*self._pending, _loss_value(loss)], with_gradient=False)
        for model in self.unsynced_models:
            drop_unsynced_grads(model)
        self.unsynced_models.clear()

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

        Not with FSDP1, which keeps the root's gathered weights from a forward
        until its backward: there run ``backward()`` and ``step`` with the loss
        (a non-finite loss retraces; pass ``float("nan")`` to force it).
        """
        value = _loss_value(loss)
        device = self._device or torch.device("cpu")
        value = torch.as_tensor(value, dtype=torch.float64).to(device)
        bad = ~torch.isfinite(value)
        if limit is not None:
            bad |= value > limit
        return bool(self.reducer.sum(bad.to(torch.float64).reshape(1)).item() > 0)

    # ------------------------------------------------------------ boost
    def enable_boost(self, cycle: int = DEFAULT_CYCLE) -> None:
        """Average the accepted points, ``cycle`` of them at most (then the mean is frozen)."""
        self.booster.enable(cycle)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].setdefault("boost", p.detach().clone())

    def disable_boost(self) -> None:
        self.booster.disable()
        self._boost_model = None
        for state in self.state.values():
            state.pop("boost", None)

    def restart_boost(self) -> None:
        """Start a new averaging cycle (the epoch boundary of the published package)."""
        self.booster.restart()

    @contextmanager
    def boosted(self) -> Iterator[int]:
        """Evaluate with the averaged weights: swapped into the parameters in place.

        Works for plain, DDP and sharded models (each rank swaps its shards;
        enter it on all ranks together, as for any forward of a sharded
        model). The parameters are bit-identical afterwards. Yields the number
        of averaged points (0: boosting off or nothing averaged yet, weights
        unchanged). BatchNorm running statistics belong to the current weights:
        recompute them for the boosted ones (``torch.optim.swa_utils.update_bn``).
        """
        count = self.booster.count if self.booster.enabled else 0
        params, means = self._boost_pairs() if count else ([], [])
        Booster.swap(params, means)
        try:
            yield count
        finally:
            Booster.swap(params, means)

    def get_boost_model(
        self, enable: bool, model: torch.nn.Module | None = None, device: torch.device | str | None = None
    ) -> tuple[int, float, torch.nn.Module | None]:
        """The published API: ``(count, mean_loss, model_at_boost_point)``, once per epoch.

        ``get_boost_model(True, model)`` turns boosting on; later calls return a
        copy of ``model`` (kept and refreshed, on ``device``) holding the mean of
        the points accepted since the previous call (or of the first full
        cycle), and start a new cycle. ``enable=False`` turns boosting off. For
        sharded models, which cannot be copied, use :meth:`boosted`.
        """
        if not enable:
            self.disable_boost()
            return 0, 0.0, None
        if not self.booster.enabled:
            self.enable_boost()
            return 0, 0.0, None
        count, loss = self.booster.count, self.booster.mean_loss
        if count < 2:
            self.booster.restart()
            return 0, loss, None
        if model is None and self._boost_model is None:
            raise TypeError("get_boost_model needs the model the first time it returns a boosted copy")
        if model is not None:
            if self._boost_model is None:
                self._boost_model = copy.deepcopy(model)
            with self.boosted():
                self._boost_model.load_state_dict(model.state_dict())
        if device is not None:
            self._boost_model.to(device)
        self.booster.restart()
        return count, loss, self._boost_model

    def _boost_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = [(local(p), local(self.state[p]["boost"])) for g in self.param_groups for p in g["params"]]
        return [p for p, _ in pairs], [m for _, m in pairs]

    # ------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The torch layout, plus the controller's numbers in ``param_groups[0]``.

        While collecting, the partial gradient sums are saved too, so a resumed
        run continues with the same micro-batches.
        """
        sd = super().state_dict()
        controller = self.controller.state_dict()
        controller["pending_losses"] = [float(v) for v in self._pending]
        sd["param_groups"][0][_STATE_KEY] = controller
        sd["param_groups"][0][_BOOST_KEY] = self.booster.state_dict()
        if self._pending:
            index = 0
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        sd["state"][index] = {**sd["state"].get(index, {}), _PENDING_GRAD: p.grad}
                    index += 1
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not groups or _STATE_KEY not in groups[0]:
            raise ValueError("not an ElraOptimizer state_dict (no controller state in param_groups[0])")
        controller = dict(groups[0][_STATE_KEY])
        pending = [float(v) for v in controller.pop("pending_losses", [])]
        super().load_state_dict(state_dict)
        self.param_groups[0].pop(_STATE_KEY, None)
        boost = self.param_groups[0].pop(_BOOST_KEY, None)
        self._check_state_shapes()
        self.controller.load_state_dict(controller)
        if boost is not None:
            self.booster.load_state_dict(boost)
        self._pending = pending
        self._moved = {p for g in self.param_groups for p in g["params"]}
        self._restore_pending_grads()

    # ------------------------------------------------------- internals
    def _reported(self, loss: Any, what: str) -> float:
        value = _loss_value(loss)
        value = float(value) if not isinstance(value, torch.Tensor) else value.item()
        if not math.isfinite(value):
            raise ValueError(f"the {what} loss must be finite, got {value}")
        return value

    def _check_kept_grads(self) -> None:
        for p, grad in self._kept_grads.items():
            if p.grad is not grad:
                raise RuntimeError(
                    f"gradients were reset while ELRA was collecting micro-batch {len(self._pending) + 1} of "
                    f"{self.controller.state.multiplier}: use optimizer.zero_grad() (it keeps them while "
                    "collecting), not model.zero_grad(); see `collecting` in the README"
                )

    def _check_state_shapes(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in self.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape != p.shape:
                        raise ValueError(
                            f"state '{key}' of shape {tuple(value.shape)} does not fit a parameter of shape "
                            f"{tuple(p.shape)}: the state_dict is from another model or parameter order"
                        )

    def _restore_pending_grads(self) -> None:
        self._kept_grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                grad = self.state.get(p, {}).pop(_PENDING_GRAD, None)
                if grad is not None:
                    p.grad = grad.to(device=p.device, dtype=p.dtype).clone()
                    self._kept_grads[p] = p.grad

    def _real_step(
        self, losses: list[LossLike], with_gradient: bool, inv_scale: float = 1.0, skip_overflow: bool = False
    ) -> str:
        if self.geometry is not None:
            return self._preconditioned_step(losses, with_gradient, inv_scale, skip_overflow)
        decays = [_decay_rate(group["weight_decay"]) for group in self.param_groups]
        groups = [self._group_tensors(group, with_gradient) for group in self.param_groups]
        half = any(tensors["half"] for tensors in groups)
        sums, values = self._global_sums(groups, decays, losses, with_gradient)
        self._pending = []
        self._kept_grads = {}
        if sums is not None and inv_scale != 1.0:
            sums = sums.scaled(inv_scale)
        if skip_overflow and sums is not None and not sums.is_finite() and all(map(math.isfinite, values)):
            return "overflow"
        decision = self.controller.real_step(values, sums, decays, half_precision=half)
        self._apply(decision, groups, inv_scale, sum(values) / len(values))
        length = self.controller.step_length
        for group in self.param_groups:
            group["lr"] = length
        return decision.action

    def _group_tensors(self, group: dict[str, Any], with_gradient: bool) -> dict[str, Any]:
        """Local parts of one group's tensors: those with gradients, and those the last step moved.

        ``owners`` are the parameters behind ``params``; ``half`` tells whether any
        parameter of the group (with a gradient or not, so all ranks agree) is 16-bit.
        """
        keys = ("params", "owners", "grads", "dirs", "weights", "stale", "moved", "moved_dirs")
        tensors: dict[str, Any] = {k: [] for k in keys}
        tensors["half"] = False
        for p in group["params"]:
            tensors["half"] = tensors["half"] or p.dtype in (torch.float16, torch.bfloat16)
            direction = local(self.state[p]["direction"])
            grad = p.grad if with_gradient else None
            if grad is not None:
                if grad.is_sparse:
                    raise RuntimeError("ElraOptimizer does not support sparse gradients")
                tensors["params"].append(local(p))
                tensors["owners"].append(p)
                tensors["grads"].append(local(grad))
                tensors["dirs"].append(direction)
                tensors["weights"].append(1.0 / self.reducer.replicas(p))
            elif p in self._moved:
                tensors["stale"].append(direction)
            if p in self._moved:
                tensors["moved"].append(local(p))
                tensors["moved_dirs"].append(direction)
        return tensors

    def _global_sums(
        self,
        groups: list[dict[str, Any]],
        decays: list[float],
        losses: list[LossLike],
        with_gradient: bool,
    ) -> tuple[StepSums | None, list[float]]:
        """The controller's inputs, summed over ranks: per-group inner products and mean losses."""
        n_groups = len(groups)
        started = self.controller.state.started
        momentum = self.controller.momentum is not None
        any_decay = any(decays)
        present = len(_SUMS) * n_groups
        check = present + 1
        batch = ScalarBatch(check + (2 if self._check_every else 0), self._device or torch.device("cpu"), self.reducer)
        for j, tensors in enumerate(groups) if with_gradient else ():
            slot = {name: k * n_groups + j for k, name in enumerate(_SUMS)}
            batch.add_constant(present, len(tensors["params"]))
            for x, g, d, w in zip(tensors["params"], tensors["grads"], tensors["dirs"], tensors["weights"]):
                batch.add(slot["grad_sq"], dot(g, g), w)
                if started:
                    batch.add(slot["grad_dir"], dot(g, d), w)
                    if momentum:
                        batch.add(slot["dir_sq"], dot(d, d), w)
                if any_decay:
                    batch.add(slot["param_sq"], dot(x, x), w)
                if decays[j]:
                    batch.add(slot["grad_param"], dot(g, x), w)
                    if started:
                        batch.add(slot["param_dir"], dot(x, d), w)
        fingerprint = self._fingerprint(decays) if self._check_every else 0
        if self._check_every:
            batch.add_constant(check, fingerprint)
            batch.add_constant(check + 1, fingerprint * fingerprint)
        values, loss_values = batch.read(losses)
        if self._check_every:
            self._verify_consistency(values[check], values[check + 1], fingerprint)
        if not with_gradient:
            return None, loss_values
        if values[present] == 0:
            raise RuntimeError(
                "no parameter has a gradient: call loss.backward() before optimizer.step(loss), "
                "or optimizer.step_retrace(loss) to skip backward()"
            )
        sums = StepSums(*(values[k * n_groups : (k + 1) * n_groups] for k in range(len(_SUMS))))
        return sums, loss_values

    def _fingerprint(self, decays: list[float]) -> int:
        """A 20-bit hash of the controller state (0 when no check is due at this step)."""
        if self.controller.state.steps % self._check_every:
            return 0
        text = repr((sorted(self.controller.state_dict().items()), decays, len(self._pending)))
        return zlib.crc32(text.encode()) % (1 << 20) + 1

    def _verify_consistency(self, total: float, total_sq: float, mine: int) -> None:
        ranks = self.reducer.world_size
        if total != ranks * mine or total_sq != ranks * mine * mine:
            raise RuntimeError(
                f"ranks disagree on the ELRA controller state at real step {self.controller.state.steps}: "
                "each rank must build the optimizer with the same arguments, load the same checkpoint "
                "and call step()/step_retrace() at the same points"
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
                if not params:
                    continue
                if decision.keep == 0.0:
                    torch._foreach_copy_(dirs, grads)
                    if grad_scale != 1.0:
                        torch._foreach_mul_(dirs, grad_scale)
                else:
                    torch._foreach_mul_(dirs, decision.keep)
                    torch._foreach_add_(dirs, grads, alpha=grad_scale)
                if decision.param_scale[j]:
                    torch._foreach_add_(dirs, params, alpha=decision.param_scale[j])
                torch._foreach_add_(params, dirs, alpha=-decision.step)
        elif decision.action == "retrace" and decision.shift:
            for tensors in groups:
                if tensors["moved"]:
                    torch._foreach_add_(tensors["moved"], tensors["moved_dirs"], alpha=decision.shift)

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
        decays = [_decay_rate(group["weight_decay"]) for group in self.param_groups]
        groups = [
            geometry.gather(group, self.state, self._moved, with_gradient, self.reducer.replicas)
            for group in self.param_groups
        ]
        check = SLOTS
        batch = ScalarBatch(check + (2 if self._check_every else 0), self._device or torch.device("cpu"), self.reducer)
        for tensors in groups:
            geometry.add_sums(batch, tensors, t)
        fingerprint = self._fingerprint(decays) if self._check_every else 0
        if self._check_every:
            batch.add_constant(check, fingerprint)
            batch.add_constant(check + 1, fingerprint * fingerprint)
        values, loss_values = batch.read(losses)
        if self._check_every:
            self._verify_consistency(values[check], values[check + 1], fingerprint)
        self._pending = []
        self._kept_grads = {}
        grad_scale = inv_scale / len(losses)
        sums = None
        if with_gradient:
            if values[PRESENT] == 0:
                raise RuntimeError(
                    "no parameter has a gradient: call loss.backward() before optimizer.step(loss), "
                    "or optimizer.step_retrace(loss) to skip backward()"
                )
            sums = geometry.sums(values, t, grad_scale)
            if skip_overflow and not sums.is_finite() and all(map(math.isfinite, loss_values)):
                return "overflow"
        decision = self.controller.real_step(loss_values, sums, decays)
        if decision.action == "accept":
            if self.booster.enabled:
                self.booster.record(*self._boost_pairs(), sum(loss_values) / len(loss_values))
            self._moved = set()
            for j, tensors in enumerate(groups):
                tensors.old_dirs = []
                self._moved.update(tensors.owners)
                geometry.update_moments(tensors, grad_scale)
                if not tensors.params:
                    continue
                directions = geometry.direction(tensors.ms, tensors.vs, t + 1)
                if decision.decay[j] != 1.0:
                    torch._foreach_mul_(tensors.params, decision.decay[j])
                torch._foreach_add_(tensors.params, directions, alpha=-decision.step * geometry.scale(t + 1))
        elif decision.action == "retrace":
            for tensors in groups:
                if tensors.old_dirs:
                    torch._foreach_add_(tensors.moved, tensors.old_dirs, alpha=decision.shift * geometry.scale(t))
        for group in self.param_groups:
            group["lr"] = self.controller.step_length
        return decision.action
