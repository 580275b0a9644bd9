"""Accepted steps in torch's fused AdamW and SGD kernels (elra.fused) against the foreach chains."""

import math

import pytest
import torch

import elra.fused
import elra.geometry
import elra.optimizer
from elra import ElraOptimizer
from elra.fused import fusable, split_fusable


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
    for module in (elra.optimizer, elra.geometry):  # the twin takes the foreach chains everywhere
        monkeypatch.setattr(module, "split_fusable", lambda columns: ([[] for _ in columns], columns))
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


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
def test_channels_last_parameters_train_as_contiguous_ones(preconditioner):
    """``model.to(memory_format=torch.channels_last)``, the convolution recipe: the stacked sums of small
    tensors once viewed such a stack flat and failed at the first step."""
    shapes = [(4, 3, 3, 3), (4,), (2, 4, 1, 1), (16, 16, 5, 5)]  # the last above the stacked size: summed in place
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    last = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    plain, channels_last = [x.clone().requires_grad_() for x in start], [last(x.clone()).requires_grad_() for x in start]
    assert not channels_last[0].is_contiguous()
    grads = _grads(shapes)
    opt = _train(plain, grads, 40, 2, preconditioner)
    twin = _train(channels_last, lambda step: [last(g) for g in grads(step)], 40, 2, preconditioner)
    assert opt.stats["real_steps"] == twin.stats["real_steps"] == 20 and opt.stats["retraces"] == twin.stats["retraces"]
    assert math.isclose(opt.stats["lr"], twin.stats["lr"], rel_tol=1e-6)  # the sums add in another order
    for p, q, x in zip(plain, channels_last, start):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6) and not torch.equal(p, x)


def test_the_quick_check_of_whole_lists_agrees_with_the_per_parameter_rule():
    """:func:`split_fusable` checks whole lists at once where it can; it must choose what :func:`fusable` chooses."""
    shape = (4, 3)
    plain = lambda dtype=torch.float32: torch.zeros(shape, dtype=dtype)  # noqa: E731
    cases = [
        [[plain(), plain()], [plain(), plain()], [plain(), plain()]],
        [[plain(), torch.zeros(shape[::-1]).T], [plain(), plain()], [plain(), plain()]],  # a transposed parameter
        [[plain(), plain()], [plain(), plain().T.contiguous().T], [plain(), plain()]],  # a transposed gradient
        [[plain(), plain(torch.float64)], [plain(), plain(torch.float64)], [plain(), plain(torch.float64)]],
        [[plain(), plain()], [plain(), plain(torch.float64)], [plain(), plain()]],  # a gradient of another dtype
        [[plain(torch.float16)], [plain(torch.float16)], [plain(torch.float16)]],
        [[torch.zeros(shape, device="meta")], [torch.zeros(shape, device="meta")], [torch.zeros(shape, device="meta")]],
    ]
    for columns in cases:
        chosen = [fusable(*tensors) for tensors in zip(*columns)]
        fused, rest = split_fusable(columns)
        assert [[t for t, c in zip(column, chosen) if c] for column in columns] == fused
        assert [[t for t, c in zip(column, chosen) if not c] for column in columns] == rest


def test_float32_and_float64_parameters_share_a_step_through_one_kernel_each(monkeypatch):
    """Parameters of two dtypes: the fused kernel runs once per dtype, with the chains' numbers."""
    shapes = [(6, 5), (5,)]
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    mixed = lambda: [start[0].clone().requires_grad_(), start[1].double().requires_grad_()]  # noqa: E731
    grads_of = lambda step: [g.to(x.dtype) for g, x in zip(_grads(shapes)(step), mixed())]  # noqa: E731
    chained = mixed()
    monkeypatch.setattr(elra.optimizer, "split_fusable", lambda columns: ([[] for _ in columns], columns))
    _train(chained, grads_of, 20, preconditioner=None, momentum=0.5)
    monkeypatch.undo()
    launches = []
    kernel = torch._fused_sgd_

    def counted(params, *args, **kwargs):
        launches.append({p.dtype for p in params})
        return kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_sgd_", counted)
    fused = mixed()
    _train(fused, grads_of, 20, preconditioner=None, momentum=0.5)
    assert launches and all(len(dtypes) == 1 for dtypes in launches)
    assert {dtype for dtypes in launches for dtype in dtypes} == {torch.float32, torch.float64}
    for p, q, x in zip(fused, chained, start):
        assert p.dtype == q.dtype and torch.allclose(p, q, rtol=1e-5, atol=1e-6) and not torch.equal(p.float(), x)


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



@pytest.mark.parametrize("preconditioner, options", [("adam", {}), (None, {"momentum": 0.5})], ids=["adam", "p2m-momentum"])
def test_a_gradient_two_parameters_hold_is_unscaled_once_for_each(monkeypatch, preconditioner, options):
    """``q.grad = p.grad``: the kernels unscale a gradient in place, once per parameter that holds it, so the
    second parameter stepped with the gradient divided twice (P2M with momentum: -0.35 where -3.6 was right)."""

    def run(shares: bool):
        params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(4, 3))]
        opt = ElraOptimizer(params, None, 8, 3, lr=1e-4, batch_multiplier=2, preconditioner=preconditioner, **options)
        for step in range(4):
            opt.zero_grad()
            for micro in range(2):
                g = torch.full((4, 3), float(step + micro + 1))
                if params[0].grad is None:
                    params[0].grad = g.clone()
                    params[1].grad = params[0].grad if shares else g.clone()
                else:
                    params[0].grad.add_(g)
                    if not shares:
                        params[1].grad.add_(g)
                opt.step(1.0 / (1 + step))
        return params, opt

    shared, opt = run(True)
    apart, twin = run(False)  # the reference: each parameter with its own copy of the same gradient
    assert opt.stats["real_steps"] == twin.stats["real_steps"] == 4
    for p, q in zip(shared, apart):
        assert torch.equal(p, q) and not torch.equal(p, torch.ones(4, 3))
    for p, q in zip(shared, apart):
        assert all(torch.equal(a, b) for a, b in zip(opt.state[p].values(), twin.state[q].values()))
    assert shared[0].grad is shared[1].grad and torch.equal(shared[0].grad, torch.full((4, 3), 9.0))


def test_gradients_that_overlap_in_one_buffer_are_unscaled_once():
    """``q.grad = p.grad[1:]`` (set by hand): other addresses than ``p.grad``'s, so both went into one kernel
    launch, and the rows they share were divided twice before ``q`` read them (P2M with momentum 0.5 ended
    2.0 off; Adam's direction barely sees a gradient scaled alike at every step). The reference: each
    parameter with its own copy of the same gradient."""

    def run(overlaps: bool):
        params = [torch.nn.Parameter(torch.ones(5, 3)), torch.nn.Parameter(torch.ones(4, 3))]
        opt = ElraOptimizer(params, None, 8, 3, lr=1e-4, batch_multiplier=2, preconditioner=None, momentum=0.5)
        for step in range(4):
            opt.zero_grad()
            for micro in range(2):
                g = torch.arange(15.0).view(5, 3) / 15 + step + micro + 1
                if params[0].grad is None:
                    params[0].grad = g.clone()
                    params[1].grad = params[0].grad[1:] if overlaps else g[1:].clone()
                else:
                    params[0].grad.add_(g)
                    if not overlaps:
                        params[1].grad.add_(g[1:])
                opt.step(1.0 / (1 + step))
        return params, opt

    overlapping, opt = run(True)
    apart, twin = run(False)
    assert opt.stats == twin.stats and opt.stats["real_steps"] == 4
    for p, q in zip(overlapping, apart):
        assert torch.equal(p, q) and not torch.equal(p, torch.ones_like(p))


def test_views_of_one_buffer_stay_in_the_kernels_unless_they_overlap():
    """DDP's ``gradient_as_bucket_view`` makes every gradient a view of one bucket, side by side: they stay in the
    kernels; only the ranges that overlap another leave them (an empty gradient shares any address)."""
    bucket = torch.zeros(30)
    params = [torch.zeros(10), torch.zeros(2, 5), torch.zeros(10), torch.zeros(0)]
    grads = [bucket[:10], bucket[10:20].view(2, 5), bucket[20:], bucket[5:5]]
    fused, rest = split_fusable([params, grads])
    assert [len(column) for column in fused] == [4, 4] and not rest[0]
    grads[2] = bucket[15:25]  # overlaps the second
    fused, rest = split_fusable([params, grads])
    assert [p.shape for p in rest[0]] == [torch.Size([2, 5]), torch.Size([10])] and len(fused[0]) == 2


def test_float64_parameters_keep_float64_accuracy_where_float32_cannot_hold_the_gradient_scale(monkeypatch):
    """P2M with momentum 0.37 over three micro-batches scales the gradient by 0.63/3: the kernel takes its
    inverse in float32, and float64 parameters ended 8e-9 off the float64 chains after 30 steps."""
    shape = (50, 40)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run():
        p = torch.nn.Parameter(start.clone())
        opt = ElraOptimizer([p], None, 8, 3, lr=1e-4, batch_multiplier=3, preconditioner=None, momentum=0.37)
        for step in range(30):
            opt.zero_grad()
            for micro in range(3):
                gen = torch.Generator().manual_seed(10 * step + micro)
                g = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.1 * p.detach()
                p.grad = g if p.grad is None else p.grad.add_(g)
                opt.step(float(p.detach().square().mean()) + 0.01 * micro)
        return p, opt

    fused, opt = run()
    monkeypatch.setattr(elra.optimizer, "split_fusable", lambda columns: ([[] for _ in columns], columns))
    chained, twin = run()
    assert opt.stats["real_steps"] == twin.stats["real_steps"] == 30 and opt.stats["retraces"] == twin.stats["retraces"]
    assert torch.allclose(fused, chained, rtol=1e-13, atol=1e-13) and not torch.equal(fused, start)


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_a_scaled_step_leaves_the_version_of_gradients_sharing_its_buffer(preconditioner):
    """FSDP2 keeps a unit's gradients as views of one buffer, with one version counter: an ELRA over the weights
    dividing its gradients in place bumped the counter of the bias's gradient, which another ELRA was collecting,
    and that one's ``state_dict()`` was refused as "between backward() and step()". The weights' optimizer takes
    2 micro-batches a real step (its gradients scaled by 1/2), the bias's 3."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    buffer = torch.zeros(8, dtype=torch.float64)
    model.weight.grad, model.bias.grad = buffer[:6].view(2, 3), buffer[6:]
    weights = ElraOptimizer([model.weight], None, 4, 2, lr=1e-3, batch_multiplier=2, preconditioner=preconditioner)
    bias = ElraOptimizer([model.bias], None, 4, 2, lr=1e-3, batch_multiplier=3, preconditioner=preconditioner)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(2):
        loss = model(x).pow(2).mean()
        loss.backward()
        bias.step(loss)
        weights.step(loss)
    assert weights.stats["real_steps"] == 1 and bias.micro_batches == 2
    assert model.bias.grad._base is buffer  # still the view the collection kept
    bias.state_dict()
