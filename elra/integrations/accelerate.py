"""ELRA in an Accelerate loop: ``accumulate``, the micro-batch context.

Accelerate's own gradient accumulation (``Accelerator(gradient_accumulation_steps=N)``
with ``accelerator.accumulate``) divides each loss by N and skips
``optimizer.step`` on the micro-batches in between, so ELRA would see only
every N-th loss. ELRA accumulates by itself (``batch_multiplier``, which it
grows), so accumulate with ELRA instead::

    accelerator = Accelerator()                       # gradient_accumulation_steps=1
    optimizer = ElraOptimizer(model.parameters(), None, batch_size, classes, lr=1e-4, batch_multiplier=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        optimizer.zero_grad()                         # keeps the gradients ELRA is collecting
        with accumulate(accelerator, model, optimizer):
            loss = model(**batch).loss
            accelerator.backward(loss)
        optimizer.step(loss)                          # this process's loss; ELRA averages over processes

Before ``accelerator.save_state`` while ELRA collects under DDP, average the
partial sums on every process: ``elra_optimizer(optimizer).sync_pending_grads()``
(``state_dict()`` refuses otherwise; Accelerate's optimizer does not pass the
call on).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

try:
    from accelerate import Accelerator
except ImportError as error:
    raise ImportError("elra.integrations.accelerate needs accelerate: pip install 'elra[transformers]'") from error

from ..optimizer import ElraOptimizer
from ..sync import grad_sync


def elra_optimizer(optimizer) -> ElraOptimizer:
    """The ``ElraOptimizer`` behind an ``AcceleratedOptimizer`` (or itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, ElraOptimizer):
        raise TypeError(f"expected an ElraOptimizer (prepared by Accelerate or not), got {type(inner).__name__}")
    return inner


@contextmanager
def accumulate(accelerator: Accelerator, model: torch.nn.Module, optimizer) -> Iterator[None]:
    """Wrap forward and backward of one micro-batch: gradient sync only for ELRA's real steps.

    While ELRA only collects, the wrapper's gradient all-reduce is off (DDP
    ``no_sync``, FSDP ``set_requires_gradient_sync``; see ``elra.grad_sync``);
    DDP decides at forward time, so the forward belongs inside. Refuses
    Accelerate's own gradient accumulation and fp16 loss scaling, which both
    act on ``step()`` behind ELRA's back.
    """
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}) skips "
            "optimizer.step on the micro-batches ELRA needs: keep it at 1 and give "
            "ElraOptimizer(batch_multiplier=...) instead"
        )
    if accelerator.scaler is not None:
        raise ValueError(
            "Accelerate's fp16 GradScaler unscales the gradients ELRA is still summing and skips its steps: "
            "use mixed_precision='bf16' or 'no' (or elra.ElraGradScaler in a loop of your own)"
        )
    with grad_sync(model, elra_optimizer(optimizer)):
        yield
