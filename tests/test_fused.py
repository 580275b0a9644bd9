"""Accepted steps in torch's fused AdamW and SGD kernels (elra.fused) against the foreach chains."""

import pytest
import torch

import elra.fused
from elra import ElraOptimizer
from elra.fused import fusable


def _train(params, grads_of, steps: int, multiplier: int = 1, preconditioner: str | None = "adam", **options):
    options = {"weight_decay": 1e-2, **options}
    opt = ElraOptimizer(params, None, 8, 3, lr=1e-4, batch_multiplier=multiplier, preconditioner=preconditioner, **options)
    for step in range(steps):
        opt.zero_grad()
        for p, g in zip(params, grads_of(step)):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        opt.step(1.0 / (1 + step))
    return opt


def _grads(shapes):
    def grads_of(step):
        gen = torch.Generator().manual_seed(step)
        return [torch.randn(shape, generator=gen) for shape in shapes]

    return grads_of


@pytest.mark.parametrize(
    "preconditioner, options",
    [("adam", {}), ("muon", {}), (None, {}), (None, {"momentum": 0.5, "weight_decay": 0.999})],
    ids=["adam", "muon", "p2m", "p2m-momentum-decay"],
)
def test_the_fused_kernels_give_the_foreach_chains_numbers(monkeypatch, preconditioner, options):
    shapes = [(6, 5), (5,), (3, 6), (3,)]
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    fused = [x.clone().requires_grad_() for x in start]
    opt = _train(fused, _grads(shapes), 40, 2, preconditioner, **options)
    monkeypatch.setattr(elra.fused, "fusable", lambda *tensors: False)
    chained = [x.clone().requires_grad_() for x in start]
    twin = _train(chained, _grads(shapes), 40, 2, preconditioner, **options)
    assert opt.stats["real_steps"] == twin.stats["real_steps"] == 20
    for p, q, x in zip(fused, chained, start):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6) and not torch.equal(p, x)


def test_layouts_the_kernel_would_misread_take_the_foreach_chain():
    """The kernel indexes memory flat: a transposed parameter beside a contiguous gradient must not go in."""
    shape = (5, 7)
    transposed = torch.randn(shape[::-1]).T.requires_grad_()
    contiguous = transposed.detach().contiguous().requires_grad_()
    assert not fusable(transposed, torch.zeros(shape), torch.zeros(shape), torch.zeros(shape))
    assert fusable(contiguous, torch.zeros(shape), torch.zeros(shape), torch.zeros(shape))
    assert not fusable(contiguous, torch.zeros(shape, dtype=torch.float64), torch.zeros(shape), torch.zeros(shape))
    assert not fusable(contiguous, torch.zeros(shape).T.contiguous().T, torch.zeros(shape))  # a transposed gradient
    assert not fusable(torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16))
    assert not fusable(torch.zeros(shape, device="meta"), torch.zeros(shape, device="meta"))  # no kernel there
    assert not fusable(contiguous, torch.zeros(shape, device="meta"))
    _train([transposed], _grads([shape]), 30)
    _train([contiguous], _grads([shape]), 30)
    assert torch.allclose(transposed, contiguous, rtol=1e-5, atol=1e-6)


def test_an_accepted_step_leaves_the_collected_gradients_as_they_were():
    """The kernel unscales gradients in place (here: averages two micro-batches); ``.grad`` is restored."""
    p = torch.zeros(4, 3, requires_grad=True)
    opt = ElraOptimizer([p], None, 8, 3, lr=1e-4, batch_multiplier=2, preconditioner="adam")
    for step in range(2):
        g = torch.full((4, 3), 3.0 + step)
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        opt.step(1.0)
    assert opt.stats["real_steps"] == 1 and p.abs().sum() > 0
    assert torch.equal(p.grad, torch.full((4, 3), 7.0))
