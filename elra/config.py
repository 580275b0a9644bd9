"""The optimizer's hyperparameters: validation, and the controller they make.

Constructor arguments and a checkpoint's saved hyperparameters go through
the same checks (:func:`checked_config`), so a resumed run is configured
exactly as a fresh one would be.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .control import ACCEPTANCE_RULES, MAX_MULTIPLIER, Controller
from .geometry import make_direction
from .line_control import LineController

# other optimizers' per-group options: ELRA refuses them in a group (it would keep and ignore them), and a state_dict
# whose groups hold them is another optimizer's
FOREIGN_GROUP_OPTIONS = frozenset({"betas", "eps", "nesterov", "dampening", "amsgrad", "maximize"})


def decay_rate(value: Any) -> float | None:
    """The seed's convention: a weight decay above 0.5 means ``1 - value``; ``None``: automatic."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid weight_decay: {value!r} (expected a number in [0, 1]; 0.9999 means 1e-4)")
    return 1.0 - float(value) if value > 0.5 else float(value)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer {bound})")
    return int(value)


def checked_config(config: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's hyperparameters, validated (constructor arguments or a checkpoint's)."""
    lr, momentum = config["lr"], config["momentum"]
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.dtype.is_floating_point:  # as torch's optimizers take it
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0.0 < lr < math.inf:
        raise ValueError(f"Invalid lr (learning rate): {lr!r} (expected a positive number, e.g. 1e-5)")
    decay_rate(config["weight_decay"])
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0
    ):
        raise ValueError(f"Invalid momentum: {momentum!r} (expected None or a number in [0, 1))")
    if config["acceptance"] not in ACCEPTANCE_RULES:
        raise ValueError(f"Invalid acceptance: {config['acceptance']!r} (expected one of {ACCEPTANCE_RULES})")
    make_direction(config["preconditioner"], momentum)  # validates the name
    target = config["line_target"]
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not -1.0 < target < 1.0:
        raise ValueError(f"Invalid line_target: {target!r} (expected a number in (-1, 1), e.g. 0 or -0.3)")
    total_steps = config["total_steps"]
    if total_steps is not None:
        total_steps = check_int("total_steps", total_steps, 1)
        if config["preconditioner"] is None:
            raise ValueError("total_steps (a step budget's cooldown) needs a preconditioner: P2M has its own schedule")
    return {
        **config,
        "total_steps": total_steps,
        "lr": float(lr),
        "weight_decay": None if config["weight_decay"] is None else float(config["weight_decay"]),
        "batch_size": check_int("batch_size", config["batch_size"], 1),
        "classes": None if config["classes"] is None else check_int("classes", config["classes"], 0),
        "warmup": check_int("warmup", config["warmup"], 0),
        "momentum": normalized_momentum(momentum, config["preconditioner"]),
        "batch_multiplier": check_int("batch_multiplier", config["batch_multiplier"], 1, MAX_MULTIPLIER),
        "line_target": float(target),
    }


def normalized_momentum(momentum: Any, preconditioner: str | None) -> float | None:
    """P2M: 0 is no momentum (``None``); along a preconditioned direction 0 is beta1 = 0 and ``None`` its default."""
    if preconditioner is None:
        return float(momentum) if momentum else None
    return None if momentum is None else float(momentum)


def make_controller(config: dict[str, Any]) -> Controller | LineController:
    """P2M's controller, or the line controller of a preconditioned direction."""
    if config["preconditioner"] is not None:
        return LineController(
            config["lr"],
            config["classes"],
            config["batch_size"],
            config["batch_multiplier"],
            config["line_target"],
            config["momentum"],
            config["total_steps"],
        )
    return Controller(
        lr=config["lr"],
        classes=config["classes"],
        batch_size=config["batch_size"],
        warmup=config["warmup"],
        momentum=config["momentum"],
        min_multiplier=config["batch_multiplier"],
        acceptance=config["acceptance"],
    )
