"""``preconditioner="factored"``: the factored second moment against its formula, held state, refusals.

The step against the plain reference and the exact resume are parametrised in
``test_preconditioned.py``; one process against DDP, FSDP2, HSDP and DCP in
``test_distributed.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from elra import ElraOptimizer
from elra.factored import FactoredDirection
from elra.geometry import SLOTS
from elra.reduce import Reducer, ScalarBatch
from launch.models import Block

BETA2, EPS = 0.999, 1e-8


def _moment_updates(direction, params, grads_per_step):
    """Drive ``direction`` as the optimizer does on accepted steps (one process, every gradient taken)."""
    state = {p: direction.new_state(p) for p in params}
    group = {"params": params}
    for t, grads in enumerate(grads_per_step):
        for p, g in zip(params, grads):
            p.grad = g
        tensors = direction.gather(group, state, set(params), True, lambda p: 1)
        batch = ScalarBatch(SLOTS, torch.device("cpu"), Reducer(None))
        direction.add_sums(batch, tensors, t)
        batch.read([1.0])
        direction.update_moments(tensors, 1.0)
    tensors = direction.gather(group, state, set(params), False, lambda p: 1)
    return state, direction.direction(tensors.moved_ms, tensors.moved_vs, len(grads_per_step))


def test_factored_direction_is_adam_with_adafactors_second_moment():
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (4, 3, 2, 2), (5,), (1, 7)]  # a matrix, a conv kernel (4 rows of 12), a bias, a row
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    history = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(4)]
    state, directions = _moment_updates(FactoredDirection(), params, history)
    assert [set(state[p]) for p in params] == [
        {"exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"}, {"exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"},
        {"exp_avg", "exp_avg_sq"}, {"exp_avg", "exp_avg_sq"},
    ]
    t = len(history)
    for i, p in enumerate(params):
        m = sum(0.1 * 0.9 ** (t - 1 - k) * history[k][i] for k in range(t))
        squares = [history[k][i].reshape(p.shape[0], -1) ** 2 for k in range(t)]
        rows = sum((1 - BETA2) * BETA2 ** (t - 1 - k) * squares[k].sum(1) for k in range(t))
        cols = sum((1 - BETA2) * BETA2 ** (t - 1 - k) * squares[k].sum(0) for k in range(t))
        full = sum((1 - BETA2) * BETA2 ** (t - 1 - k) * squares[k] for k in range(t))
        # Adafactor: v = R C / (1^T R), from the row and column sums; Adam's full v where not factored
        v = (rows[:, None] * cols[None, :] / rows.sum() if i < 2 else full).reshape(p.shape)
        if i < 2:
            assert torch.allclose(state[p]["exp_avg_sq_row"], rows, rtol=1e-14, atol=0)
            assert torch.allclose(state[p]["exp_avg_sq_col"], cols, rtol=1e-14, atol=0)
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - BETA2**t)
        adam = m_hat / (v_hat.sqrt() + EPS)
        scale = FactoredDirection().scale(t)
        assert torch.allclose(scale * directions[i], adam, rtol=1e-12, atol=0), i


def test_factored_direction_of_a_parameter_never_seen_is_zero():
    """No gradient yet: R = C = 0, and v = 0 (not 0/0), as Adam's."""
    p, q = (torch.nn.Parameter(torch.zeros(3, 4)) for _ in range(2))
    state, directions = _moment_updates(FactoredDirection(), [p, q], [[torch.ones(3, 4), torch.zeros(3, 4)]])
    assert torch.all(directions[0] > 0) and torch.equal(directions[1], torch.zeros(3, 4))


def _transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    width, vocab = 64, 96
    return torch.nn.Sequential(
        torch.nn.Embedding(vocab, width), *(Block(width, 4) for _ in range(4)), torch.nn.LayerNorm(width),
        torch.nn.Linear(width, vocab),
    )


def _held_ratio(model: torch.nn.Module, opt: ElraOptimizer) -> float:
    held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return held / sum(p.numel() * p.element_size() for p in model.parameters())


def test_held_state_of_factored_is_at_most_1_1x_the_parameters_on_a_transformer():
    model = _transformer()
    ratios = {}
    for preconditioner in ("adam", "factored"):
        opt = ElraOptimizer(model.parameters(), None, 8, 96, preconditioner=preconditioner)
        x = torch.randint(0, 96, (2, 16))
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step(1.0)
        opt.step(1.0)  # an accepted step: the moments hold numbers
        ratios[preconditioner] = _held_ratio(model, opt)
    assert ratios["factored"] <= 1.1 < 2.0 <= ratios["adam"], ratios


@pytest.mark.parametrize("sharded_like", ["FSDP1 flat parameter", "FSDP1 original parameter view"])
def test_fsdp1_parameters_are_refused_not_silently_unfactored(sharded_like):
    """FSDP1 has flattened every parameter: a full v would silently differ from one process's factored v."""
    p = torch.nn.Parameter(torch.zeros(12))
    p._fsdp_flattened = True
    with pytest.raises(ValueError, match="FSDP1.*fully_shard.*preconditioner=\"adam\""):
        ElraOptimizer([p], preconditioner="factored")
    ElraOptimizer([p], preconditioner="adam")  # Adam's v needs no shape


@pytest.mark.parametrize("saved, claimed, missing", [("adam", "factored", "exp_avg_sq_row"), ("factored", "adam", "exp_avg_sq")])
def test_state_of_another_preconditioner_is_refused(saved, claimed, missing):
    model = torch.nn.Linear(4, 3)
    opt = ElraOptimizer(model.parameters(), preconditioner=saved)
    model(torch.ones(2, 4)).sum().backward()
    opt.step(1.0)
    sd = opt.state_dict()
    sd["param_groups"][0]["elra_config"]["preconditioner"] = claimed
    with pytest.raises(ValueError, match=f"lacks the '{missing}' state of parameter 0 .*'{claimed}'"):
        ElraOptimizer(model.parameters(), preconditioner=claimed).load_state_dict(sd)


def test_state_shapes_fit_the_checkpoint_check():
    """A saved factored state of another model's matrix is refused by its shape."""
    small, large = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
    sd = ElraOptimizer(small.parameters(), preconditioner="factored").state_dict()
    with pytest.raises(ValueError, match="another model"):
        ElraOptimizer(large.parameters(), preconditioner="factored").load_state_dict(sd)
    assert math.isclose(FactoredDirection().scale(3), math.sqrt(1 - BETA2**3) / (1 - 0.9**3))
