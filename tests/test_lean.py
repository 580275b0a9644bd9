"""Lean by construction: state size, in-place updates, one host transfer per real step."""

from functools import partial

import torch

import elra

ElraOptimizer = partial(elra.ElraOptimizer, preconditioner=None)  # P2M, the published method, not the default


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))


def _train(model, opt, steps, loss_as_tensor=True):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 20, generator=gen)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss if loss_as_tensor else loss.item())


def test_optimizer_holds_one_tensor_per_parameter():
    model = _mlp()
    for options in ({}, {"momentum": 0.9, "weight_decay": 1e-3}):
        opt = ElraOptimizer(model.parameters(), None, 16, 5, lr=1e-4, **options)
        _train(model, opt, 30)
        held = [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        assert sum(t.nbytes for t in held) == sum(p.nbytes for p in model.parameters())


def test_parameters_are_updated_in_place():
    model = _mlp()
    before = [(p, p.data_ptr()) for p in model.parameters()]
    opt = ElraOptimizer(model.parameters(), None, 16, 5, lr=1e-4)
    _train(model, opt, 20)
    assert all(p is q and p.data_ptr() == ptr for (p, ptr), q in zip(before, model.parameters()))


def test_one_host_transfer_per_real_step(monkeypatch):
    model = _mlp()
    opt = ElraOptimizer(model.parameters(), None, 16, 5, lr=1e-4, weight_decay=1e-3, batch_multiplier=2)
    _train(model, opt, 4)
    calls = []
    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    x = torch.randn(16, 20)
    for expected in (0, 1):
        calls.clear()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss)
        assert calls == ["tolist"] * expected
