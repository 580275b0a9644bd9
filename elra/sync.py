"""Gradient synchronisation off while ELRA only collects micro-batch gradients.

While the optimizer is collecting, each rank may keep its micro-batch
gradients to itself; only the backward pass of the micro-batch that completes
a real step needs the gradient reduction. Results are the same either way
(the reduction is linear); skipping it saves the communication.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from .optimizer import ElraOptimizer


@contextmanager
def grad_sync(model: torch.nn.Module, optimizer: "ElraOptimizer") -> Iterator[None]:
    """Wrap ``loss.backward()``: gradient sync off while collecting, on for a real step.

    Handles DDP and FSDP1 (``no_sync()``) and FSDP2 (``set_requires_gradient_sync``);
    any other model is left alone.
    """
    sync = not optimizer.collecting
    if not sync:
        optimizer.unsynced_models.add(model)
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        yield
    elif hasattr(model, "no_sync") and not sync:
        with model.no_sync():
            yield
    else:
        yield


def drop_unsynced_grads(model: torch.nn.Module) -> None:
    """Free the gradients a wrapper accumulated with sync off, once ELRA discarded them.

    When a real step is abandoned mid-collection (``step_retrace`` on a skipped
    backward), DDP's local sums sit in ``.grad`` and ``zero_grad`` clears them,
    but FSDP keeps unsharded sums of its own that the next synchronised
    backward would add to fresh gradients. This clears them (FSDP2's unsharded
    parameters, FSDP1's flat parameters) and every ``.grad`` of the model.
    """
    for module in model.modules():
        fsdp2_state = getattr(module, "_get_fsdp_state", None)
        group = getattr(fsdp2_state(), "_fsdp_param_group", None) if fsdp2_state is not None else None
        for fsdp_param in getattr(group, "fsdp_params", ()):
            fsdp_param.unsharded_accumulated_grad = None
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
        flat_param = getattr(getattr(module, "_handle", None), "flat_param", None)
        if flat_param is not None:
            flat_param.grad = None
    for param in model.parameters():
        param.grad = None
