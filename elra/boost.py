"""Boost: the running mean of ELRA's accepted points, for evaluation only.

ELRA's large steps make the path oscillate; the mean of the points it accepted
over a cycle (240 accepted steps by default, or up to the epoch boundary)
often evaluates better long before the path itself settles (Polyak-Ruppert
averaging, SWA). The mean lives in the optimizer state as one tensor per
parameter (a local shard under FSDP), updated in place on accepted steps; it
never changes the optimizer's path. The mean of a 16-bit parameter is kept in
float32: in bfloat16 a running mean's update ``(x - mean)/count`` mostly
rounds away once ``count`` is a few dozen, and the mean stays near the early
points.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .chunks import in_dtype_of
from .geometry import moment_dtype

DEFAULT_CYCLE = 240


def new_mean(p: torch.Tensor) -> torch.Tensor:
    """A boost mean for parameter ``p``, holding its values: in ``p``'s dtype, float32 for 16-bit parameters."""
    return p.detach().to(dtype=moment_dtype(p), copy=True)


class Booster:
    """Counters of the boost cycle and the in-place tensor work on local shards."""

    def __init__(self) -> None:
        self.enabled = False
        self.cycle = DEFAULT_CYCLE
        self.count = 0
        self.loss_sum = 0.0

    @property
    def complete(self) -> bool:
        """A full cycle was averaged: the mean is frozen until the next restart."""
        return self.count >= self.cycle

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.count if self.count else 0.0

    def enable(self, cycle: int) -> None:
        """Turn averaging on, from the next accepted point; where it is on already, only the cycle changes.

        A cycle shorter than the points the mean already holds is refused: the mean cannot drop points, and a
        count above the cycle would make the state unloadable."""
        cycle = _check_cycle(cycle)
        if self.enabled and self.count > cycle:
            raise ValueError(
                f"boost cycle {cycle} is shorter than the {self.count} points the mean already holds: give "
                f"cycle >= {self.count}, or call restart_boost() first to start a new mean"
            )
        if not self.enabled:
            self.restart()
        self.enabled = True
        self.cycle = cycle

    def disable(self) -> None:
        self.enabled = False
        self.restart()

    def restart(self) -> None:
        """Start a new cycle: the next accepted point replaces the mean."""
        self.count = 0
        self.loss_sum = 0.0

    def record(self, params: Sequence[torch.Tensor], means: Sequence[torch.Tensor], loss: float) -> None:
        """Add an accepted point (the parameters before its update) to the running mean."""
        if not self.enabled or self.complete or not params:
            return
        self.count += 1
        self.loss_sum += loss
        if self.count == 1:
            torch._foreach_copy_(list(means), list(params))
        else:
            for held, points in in_dtype_of(means, params):  # 16-bit points into float32 means
                torch._foreach_lerp_(held, points, 1.0 / self.count)

    @staticmethod
    @torch.no_grad()
    def swap_in(params: Sequence[torch.Tensor], means: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Put the means into the parameters; returns what :meth:`swap_out` needs to restore them exactly.

        A mean of the parameter's dtype changes places with it (one tensor at a
        time: no copy of the model is held). A float32 mean of a 16-bit
        parameter stays as it is (the parameter holds it rounded; an exchange
        would leave the mean rounded too) and the parameter's values are kept aside.
        """
        kept: list[torch.Tensor | None] = []
        for param, mean in zip(params, means):
            saved = param.clone()
            param.copy_(mean)
            if mean.dtype == param.dtype:
                mean.copy_(saved)
                saved = None
            kept.append(saved)
        return kept

    @staticmethod
    @torch.no_grad()
    def swap_out(params: Sequence[torch.Tensor], means: Sequence[torch.Tensor], kept: Sequence[torch.Tensor | None]) -> None:
        """Undo :meth:`swap_in`: the parameters and the means bit-identical to before it."""
        for param, mean, saved in zip(params, means, kept):
            if saved is None:
                saved = param.clone()
                param.copy_(mean)
                mean.copy_(saved)
            else:
                param.copy_(saved)

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "cycle": self.cycle, "count": self.count, "loss_sum": self.loss_sum}

    def load_state_dict(self, state: dict) -> None:
        _check_cycle(state["cycle"])
        count = state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= state["cycle"]:
            raise ValueError(f"Invalid boost count: {count!r} (expected an integer in [0, cycle])")
        self.enabled = bool(state["enabled"])
        self.cycle = int(state["cycle"])
        self.count = int(state["count"])
        self.loss_sum = float(state["loss_sum"])


def _check_cycle(cycle: int) -> int:
    """``cycle`` as a Python int (numpy integers too, as the constructor takes them), or ``ValueError``."""
    if isinstance(cycle, bool) or not isinstance(cycle, numbers.Integral) or cycle < 2:
        raise ValueError(f"Invalid boost cycle: {cycle!r} (expected an integer >= 2)")
    return int(cycle)
