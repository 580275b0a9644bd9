"""``ElraGradScaler``: loss scaling for float16/bfloat16 training with ELRA.

The same role and calls as ``torch.amp.GradScaler`` (``scale(loss).backward()``,
``step(optimizer)``, ``update()``), shaped for ELRA: it remembers the loss so
that ``step`` can hand it to the optimizer, and it learns about inf/nan
gradients from the optimizer's own all-reduce (a non-finite gradient on any
rank or shard makes the global sums non-finite), so it adds no collective and
no host sync of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import operator
import sys
import weakref
from typing import Any, Callable

import torch

from .config import check_int
from .optimizer import LOSS_KEEPERS, OPTIMIZERS, ElraOptimizer, _loss_value, _NoGradient

logger = logging.getLogger("elra")

MAX_SCALE = 2.0**16
# the smallest positive normal float: backoffs stop there, where 1/scale is still finite (below it a long run of
# overflows took the scale to 0 and the next step divided by it; load_state_dict refused such a state)
MIN_SCALE = sys.float_info.min


class ElraGradScaler:
    """Scale the loss, unscale inside ELRA's step, back off on overflow, grow when clean.

    Args:
        init_scale: initial scale factor.
        growth_factor: factor of a growth (after ``growth_interval`` clean steps); growths stop at 2^16, and a
            larger ``init_scale`` is kept until an overflow backs it off.
        backoff_factor: factor applied when the gradients overflow (down to :data:`MIN_SCALE` at most).
        growth_interval: clean ``update()`` calls between growths.
        loss_limit: a loss at or above this (or non-finite) retraces.
        enabled: ``False`` passes everything through unscaled: ``step`` is ``optimizer.step(loss)``
            (no loss limit), ``update`` does nothing.

    A step whose gradients hold inf/nan on any rank is skipped (the optimizer
    does not move and its controller does not change; micro-batches collected
    for it are dropped) and the scale is multiplied by ``backoff_factor``. The
    scale never changes while an optimizer it steps is collecting micro-batches
    (one scaler may step several, as torch's does), so the gradients summed in
    ``.grad`` always share one scale: a growth, or a backoff for another
    optimizer's overflow, waits until none is.
    """

    def __init__(
        self,
        init_scale: float = MAX_SCALE,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        loss_limit: float = 65000.0,
        enabled: bool = True,
    ) -> None:
        _check_settings(init_scale, growth_factor, backoff_factor, growth_interval, loss_limit)
        if not isinstance(enabled, bool):  # "false" from a config file would have scaled
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self.enabled = enabled
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.loss_limit = float(loss_limit)
        self._scale = float(init_scale)
        self._clean_steps = 0
        self._overflowed = False
        self._losses: list[_ScaledLoss] = []  # those scaled since the last step: their sum is the step's loss
        self._stepped: list[ElraOptimizer] = []  # those already handed that sum
        self._optimizers: list[ElraOptimizer] = []  # those this scaler stepped

    def get_scale(self) -> float:
        return self._scale if self.enabled else 1.0

    @torch._disable_dynamo  # inside a compiled training step: eager, as ElraOptimizer.step
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Remember ``loss`` for ``step`` and return it multiplied by the scale.

        Several losses scaled (and back-propagated) before one ``step``, torch's pattern for several losses, add
        up in ``.grad``: ``step`` hands ELRA their sum, the loss of that gradient, and so does every ``step`` of
        another optimizer until the next ``scale`` after a step starts a new sum. ``optimizer.step_retrace(loss)``
        in place of ``step`` (a skipped backward) ends the step without them, and it and ``optimizer.zero_grad()``
        drop those back-propagated into the gradients they clear (:meth:`_gradients_dropped`): a hook on the
        returned tensor notes when its backward starts.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"scale() needs the loss tensor, got {type(loss).__name__}")
        value = _loss_value(loss)
        if self._stepped:  # the next micro-batch's loss: the last one was handed over
            self._forget_loss()
        self._drop_abandoned()
        entry = _ScaledLoss(value, weakref.ref(loss))
        self._losses.append(entry)
        LOSS_KEEPERS.add(self)
        scaled = loss * self._scale if self.enabled else loss
        if scaled.requires_grad:
            scaled.register_hook(functools.partial(_back_propagated, entry))
        else:  # no backward can run (it would raise): nothing to wait for
            entry.back_propagated = True
        return scaled

    @torch._disable_dynamo
    def step(self, optimizer: ElraOptimizer) -> str:
        """Hand the remembered loss and the unscaled gradients to ELRA.

        Returns what the optimizer did: ``collect``, ``accept``, ``retrace``,
        ``skip`` or ``overflow``.
        """
        if not isinstance(optimizer, ElraOptimizer):
            raise TypeError(
                f"ElraGradScaler drives an ElraOptimizer, got {type(optimizer).__name__} (one prepared by Accelerate: "
                "pass elra.integrations.accelerate.elra_optimizer(optimizer))"
            )
        self._drop_abandoned()
        if not self._losses:
            raise RuntimeError("call scaler.scale(loss).backward() before scaler.step(optimizer)")
        if any(stepped is optimizer for stepped in self._stepped):
            raise RuntimeError(
                "scaler.step(optimizer) was called twice for one scaled loss: scale and back-propagate the next "
                "micro-batch's loss first"
            )
        loss = self._limited(functools.reduce(operator.add, (entry.value for entry in self._losses)))
        inv_scale = 1.0 / self._scale if self.enabled else 1.0
        try:  # through the optimizer's step hooks, as optimizer.step(loss) (torch's GradScaler too)
            outcome = optimizer._hooked_step(loss, inv_scale=inv_scale, skip_overflow=self.enabled)
        except _NoGradient:  # no gradient behind the loss: handed over, so the next scale() starts a new sum (kept,
            self._stepped.append(optimizer)  # the next micro-batch's loss was added to it); other optimizers take it
            raise
        # only a step that took the loss counts: one refused (inside boosted(), bad group options) may be retried
        self._stepped.append(optimizer)
        if not any(known is optimizer for known in self._optimizers):
            self._optimizers.append(optimizer)
        # the mark torch's LR schedulers put through their wrapper of optimizer.step: without it the first
        # scheduler.step() warned that it came before optimizer.step()
        optimizer._opt_called = True
        self._overflowed = self._overflowed or outcome == "overflow"
        return outcome

    @torch._disable_dynamo
    def update(self) -> None:
        """Back off after an overflow; grow after ``growth_interval`` clean steps. The loss handed to the
        optimizers stepped since the last ``scale`` is forgotten."""
        self._forget_loss()
        if not self.enabled:
            return
        collecting = any(optimizer.micro_batches for optimizer in self._optimizers)
        if self._overflowed and collecting:  # another optimizer's overflow: its own collected sums were dropped
            return
        if self._overflowed:
            self._scale = max(self._scale * self.backoff_factor, MIN_SCALE)
            self._clean_steps = 0
            self._overflowed = False
            return
        self._clean_steps += 1
        if self._clean_steps >= self.growth_interval and not collecting:
            self._scale = max(self._scale, min(self._scale * self.growth_factor, MAX_SCALE))  # a growth never cuts
            self._clean_steps = 0

    def _gradients_dropped(self, optimizer: ElraOptimizer, retrace: bool = False, loss: Any = None) -> None:
        """``optimizer.zero_grad()``, or ``optimizer.step_retrace(loss)`` (``retrace``), is about to drop its
        gradients, and with them the losses back-propagated into them.

        Only for an optimizer this scaler steps, or any before its first step
        (the first micro-batch skipped), or a retrace naming one of its losses
        (dropped too); and not once a step took their sum (the next ``scale``
        starts a new one). A loss whose backward went into another optimizer's
        gradients and not into these stays (an ensemble's loop); one whose
        backward wrote no optimizer's (an input gradient) goes. One whose
        backward has not run: a retrace ends its step without it (the skipped
        micro-batch's loss summed into the next step's, and a bad one made that
        step a retrace too); after a ``zero_grad()`` it is dropped at the next
        ``scale`` or ``step`` unless its backward still comes (``scaled =
        scaler.scale(loss)``, ``zero_grad()``, ``scaled.backward()``).
        """
        named = loss is not None and any(entry.tensor() is loss for entry in self._losses)
        if self._stepped or (not named and self._optimizers and not any(known is optimizer for known in self._optimizers)):
            return
        kept = []
        for entry in self._losses:
            if not entry.back_propagated and not retrace:
                entry.abandoned = True
            elif not entry.back_propagated or (named and entry.tensor() is loss) or not entry.went_elsewhere(optimizer):
                continue
            kept.append(entry)
        self._losses = kept

    def _drop_abandoned(self) -> None:
        self._losses = [entry for entry in self._losses if not entry.abandoned]

    def _forget_loss(self) -> None:
        self._losses, self._stepped = [], []

    def __getstate__(self) -> dict[str, Any]:
        # weak references do not pickle: a copy's losses name no tensor, and their backward's gradients are unknown
        losses = [dataclasses.replace(entry, tensor=_dead, written=None) for entry in self._losses]
        return {**self.__dict__, "_losses": losses}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_loss" in state:  # pickled by elra before session 35: one summed loss, back-propagated
            loss, _ = state.pop("_loss"), state.pop("_scaled", None)
            state["_losses"] = [] if loss is None else [_ScaledLoss(loss, _dead, back_propagated=True)]
        self.__dict__.update(state)
        LOSS_KEEPERS.add(self)  # a copy's remembered loss goes with a retrace of its optimizer too

    def _limited(self, loss: float | torch.Tensor) -> float | torch.Tensor:
        """The loss, or nan (a retrace) when it reaches the limit; no host sync for tensors. Disabled, the loss
        as it is: the limit is the scaled loss's (float16's range), and a float32 loss may well pass it."""
        if not self.enabled:
            return loss
        if isinstance(loss, torch.Tensor):
            return torch.where(loss < self.loss_limit, loss, torch.full_like(loss, math.nan))
        return loss if loss < self.loss_limit else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "loss_limit": self.loss_limit,
            "enabled": self.enabled,
            "clean_steps": self._clean_steps,
            "overflowed": self._overflowed,  # a backoff waiting for another optimizer's collection (update)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`. ``enabled`` stays as constructed, as torch's scaler
        keeps it: a job resumed in another precision (``enabled=use_fp16``) keeps its own settings, logged,
        where the checkpoint's flag would have turned scaling off under float16 or on under float32."""
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval", "loss_limit", "enabled", "clean_steps"} - state.keys()
        if missing:
            raise ValueError(f"not an ElraGradScaler state_dict: missing {sorted(missing)}")
        if bool(state["enabled"]) != self.enabled:
            logger.warning(
                "ElraGradScaler(enabled=%s) keeps its own settings: the state_dict is of a scaler with enabled=%s",
                self.enabled, bool(state["enabled"]),
            )
            return
        clean_steps = state["clean_steps"]
        if isinstance(clean_steps, bool) or not isinstance(clean_steps, int) or clean_steps < 0:
            raise ValueError(f"Invalid clean_steps: {clean_steps!r} (expected an integer >= 0)")
        # a nan or zero scale would skip or break every step
        _check_settings(state["scale"], state["growth_factor"], state["backoff_factor"], state["growth_interval"], state["loss_limit"])
        self._scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.loss_limit = float(state["loss_limit"])
        self._clean_steps = int(state["clean_steps"])
        self._overflowed = bool(state.get("overflowed", False))  # saved since session 27


def _check_settings(scale: float, growth_factor: float, backoff_factor: float, growth_interval: int, loss_limit: float) -> None:
    """Refuse settings (given, or loaded from a state_dict) under which the scaler cannot work."""
    for name, value in (("init_scale", scale), ("growth_factor", growth_factor), ("backoff_factor", backoff_factor),
                        ("loss_limit", loss_limit)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # "65536" from a config file, True
            raise ValueError(f"Invalid {name}: {value!r} (expected a number)")
    check_int("growth_interval", growth_interval, 1)
    if not MIN_SCALE <= scale < math.inf:
        raise ValueError(f"Invalid init_scale: {scale!r} (expected a positive number, at least {MIN_SCALE!r})")
    if not growth_factor > 1.0:
        raise ValueError(f"Invalid growth_factor: {growth_factor!r} (expected > 1)")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"Invalid backoff_factor: {backoff_factor!r} (expected in (0, 1))")
    if not loss_limit > 0.0:
        raise ValueError(f"Invalid loss_limit: {loss_limit!r} (expected a positive number)")


@dataclasses.dataclass
class _ScaledLoss:
    """One loss given to :meth:`ElraGradScaler.scale`: its value, the tensor (a retrace may name it), whether its
    backward ran, and then which live optimizers' gradients it wrote (ids; ``None`` where not known: with one
    optimizer alive no other's can have been written)."""

    value: float | torch.Tensor
    tensor: Callable[[], torch.Tensor | None]
    back_propagated: bool = False
    written: set[int] | None = None
    abandoned: bool = False  # a zero_grad() came before its backward

    def went_elsewhere(self, optimizer: ElraOptimizer) -> bool:
        """Whether the backward wrote into another optimizer's gradients and not ``optimizer``'s."""
        return bool(self.written) and id(optimizer) not in self.written


def _dead() -> None:
    return None


def _back_propagated(entry: _ScaledLoss, grad: torch.Tensor) -> None:
    """The hook on a scaled loss: its backward starts. With several optimizers alive their gradients are marked
    now and compared when the backward ends (a callback of the autograd engine): what it wrote, and nothing a
    later backward or an in-place unscale writes."""
    entry.back_propagated, entry.abandoned, entry.written = True, False, None
    if len(OPTIMIZERS) > 1:
        optimizers = list(OPTIMIZERS)
        before = [optimizer._gradient_marks() for optimizer in optimizers]
        done = functools.partial(_backward_done, entry, [weakref.ref(optimizer) for optimizer in optimizers], before)
        torch.autograd.Variable._execution_engine.queue_callback(done)


def _backward_done(entry: _ScaledLoss, optimizers: list[weakref.ref], before: list[list]) -> None:
    entry.written = {
        id(optimizer) for ref, marks in zip(optimizers, before) if (optimizer := ref()) is not None and optimizer._gradients_written_since(marks)
    }
