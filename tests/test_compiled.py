"""``compiled=True``: Adam's sums of large tensors in one compiled kernel, against the eager path."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from elra import ElraOptimizer, compiled


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 400), torch.nn.Tanh(), torch.nn.Linear(400, 200), torch.nn.Linear(200, 3))


def _train(use_compiled: bool, steps: int = 12) -> tuple[list[tuple[int, float]], list[torch.Tensor], ElraOptimizer]:
    net = _net()
    opt = ElraOptimizer(net.parameters(), None, 16, 3, preconditioner="adam", compiled=use_compiled)
    actions = []
    for step in range(steps):
        x = torch.randn(16, 20, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), x[:, :3].argmax(1))
        loss.backward()
        opt.step(math.nan if step == 7 else loss.item())  # a failed step: a retrace
        actions.append((opt.stats["retraces"], opt.stats["lr"]))
    return actions, [p.detach().clone() for p in net.parameters()], opt


def test_the_kernel_gives_the_weighted_eager_sums():
    gen = torch.Generator().manual_seed(0)
    xs, gs, ms = ([torch.randn(n, generator=gen) for n in (compiled.MIN_ELEMENTS, 300 * 300)] for _ in range(3))
    vs = [torch.rand(x.shape, generator=gen) ** 4 for x in xs]  # small entries: the shift matters
    shift, weights = 1e-3, [1.0, 0.5]
    got = compiled.adam_sums(xs, gs, ms, vs, weights, shift, torch.float64)
    expected = torch.zeros(6, dtype=torch.float64)
    for x, g, m, v, w in zip(xs, gs, ms, vs, weights):
        x, g, m, v = (t.double() for t in (x, g, m, v))
        u = m / (v.sqrt() + shift)
        expected += w * torch.stack([x @ x, m @ u, u @ u, g @ u, g @ g, m @ m])
    assert got is not None
    # float32 sums of 1.5e5 terms, in an order set by the machine's vector width: |u|^2 was 1.3e-5 off on an
    # AVX2 machine (the eager float32 sum 2.9e-6); a wrong term (weight, shift, pair) is off by far more
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_split_large_keeps_small_and_mixed_dtype_tensors_eager():
    big, small = torch.zeros(compiled.MIN_ELEMENTS), torch.zeros(10)
    half = big.bfloat16()
    columns = [[big, small, half], [big, small, half], [big, small, big], [big, small, big], [1.0, 0.5, 0.25]]
    large, rest = compiled.split_large(columns)
    assert [len(c) for c in large] == [1] * 5 and large[4] == [1.0]
    assert [len(c) for c in rest] == [2] * 5 and rest[4] == [0.5, 0.25]


def test_a_compiled_run_takes_the_eager_runs_decisions(monkeypatch):
    calls = []
    original = compiled.adam_sums
    monkeypatch.setattr(compiled, "adam_sums", lambda *a: calls.append(original(*a)) or calls[-1])
    eager_actions, eager_params, _ = _train(False)
    assert not calls
    actions, params, opt = _train(True)
    assert calls and all(c is not None for c in calls)  # the kernel, not the fallback, gave the sums
    assert [retraces for retraces, _ in actions] == [retraces for retraces, _ in eager_actions] and actions[-1][0] > 0
    torch.testing.assert_close([lr for _, lr in actions], [lr for _, lr in eager_actions], rtol=1e-4, atol=0)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert opt.geometry.compiled


def test_a_kernel_that_cannot_compile_leaves_the_eager_path(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "_kernel", broken)
    monkeypatch.setattr(compiled, "_failed", False)
    eager_actions, eager_params, _ = _train(False, steps=6)
    with caplog.at_level(logging.WARNING, logger="elra"):
        actions, params, _ = _train(True, steps=6)
    assert compiled._failed
    assert sum("could not compile" in r.getMessage() for r in caplog.records) == 1
    assert actions == eager_actions
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)


def test_compiled_is_an_option_of_this_job_not_of_the_checkpoint():
    _, _, saved = _train(False, steps=3)
    net = _net()
    opt = ElraOptimizer(net.parameters(), None, 16, 3, preconditioner="adam", compiled=True)
    opt.load_state_dict(saved.state_dict())
    assert opt.geometry.compiled


@pytest.mark.parametrize("preconditioner", [None, "factored"])
def test_compiled_is_refused_where_it_has_nothing_to_compile(preconditioner):
    with pytest.raises(ValueError, match="compiled=True"):
        ElraOptimizer(_net().parameters(), preconditioner=preconditioner, compiled=True)
    with pytest.raises(TypeError, match="compiled must be"):
        ElraOptimizer(_net().parameters(), preconditioner="adam", compiled=1)


@pytest.mark.parametrize("preconditioner", [None, "factored"])
def test_a_checkpoint_whose_direction_has_nothing_to_compile_says_so(preconditioner, caplog):
    """The checkpoint's preconditioner wins; where it has no sums to compile, compiled=True did nothing silently."""
    saved = ElraOptimizer(_net().parameters(), preconditioner=preconditioner)
    opt = ElraOptimizer(_net().parameters(), preconditioner="adam", compiled=True)
    with caplog.at_level(logging.WARNING, logger="elra"):
        opt.load_state_dict(saved.state_dict())
    assert sum("compiled=True does nothing" in r.getMessage() for r in caplog.records) == 1


def test_disabled_torch_compile_leaves_the_eager_path(monkeypatch, caplog):
    """Under TORCH_COMPILE_DISABLE the function would run uncompiled, with tensor-sized temporaries: refused."""
    monkeypatch.setattr(compiled, "_kernel", None)
    monkeypatch.setattr(compiled, "_failed", False)
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    big = [torch.ones(compiled.MIN_ELEMENTS)]
    with caplog.at_level(logging.WARNING, logger="elra"):
        assert compiled.adam_sums(big, big, big, big, [1.0], 1e-8, torch.float64) is None
    assert compiled._kernel is None and "disabled" in caplog.text
