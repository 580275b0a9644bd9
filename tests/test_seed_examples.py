"""The seed's examples reach their optima."""

from functools import partial

import numpy as np
import torch

from conftest import cubic_optimum, run_cubic, run_rosenbrock
import elra

ElraOptimizer = partial(elra.ElraOptimizer, preconditioner=None)  # P2M, the published method, not the default


def test_cubic_fit_reaches_least_squares_loss_within_2000_steps():
    losses, _ = run_cubic(lambda m: ElraOptimizer(m.parameters(), model=m, lr=1e-6), 2000)
    optimum = cubic_optimum()
    assert abs(optimum - 8.8172) < 1e-4
    reached = next(i for i, v in enumerate(losses) if v < optimum + 1e-4)
    assert reached < 2000
    # Trial points above the optimum are the method's probes; most accepted points sit on it.
    assert np.median(losses[-500:]) < optimum + 1e-4


def test_rosenbrock_reaches_minimum_and_stays_there():
    losses, xy = run_rosenbrock(lambda ps: ElraOptimizer(ps, lr=1e-5), 1000)
    reached = next(i for i, v in enumerate(losses) if v < 1e-6)
    assert reached < 300
    # Near the minimum a trial point may still overshoot and be retraced (a few
    # probes, depending on the last bits of the sums); then it stays.
    assert sum(v >= 1e-6 for v in losses[reached:]) <= 5
    assert max(losses[reached + 50 :]) < 1e-6
    assert torch.allclose(xy.detach(), torch.ones(2, dtype=torch.float64), atol=1e-4)


def test_rosenbrock_float32_reaches_minimum():
    losses, _ = run_rosenbrock(lambda ps: ElraOptimizer(ps, lr=1e-5), 400, dtype=torch.float32)
    assert min(losses[:300]) < 1e-6


def test_seed_positional_call_trains_a_classifier():
    from conftest import digits_data, digits_model

    x, y = digits_data(torch.float32)
    model = digits_model(torch.float32)
    optim = ElraOptimizer(model.parameters(), None, 32, 10, lr=1e-5, weight_decay=0.99999)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1500):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        optim.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optim.step(loss.item())
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95
    assert abs(optim.stats["weight_decay"] - 1e-5) < 1e-12
