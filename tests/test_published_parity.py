"""Trajectory parity with the published elra 0.0.5 (the executable definition of the math)."""

from functools import partial

import numpy as np
import pytest
import torch

from conftest import digits_data, digits_model, rosenbrock, run_cubic, run_rosenbrock
import elra

ElraOptimizer = partial(elra.ElraOptimizer, preconditioner=None)  # P2M, the published method, not the default


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b) / np.maximum(np.abs(a), 1e-300)


def test_cubic_fit_float64_follows_published_for_1000_steps(published, quiet):
    with quiet():
        theirs, _ = run_cubic(lambda m: published.ElraOptimizer(m.parameters(), model=m, lr=1e-6), 1000, torch.float64)
    ours, _ = run_cubic(lambda m: ElraOptimizer(m.parameters(), model=m, lr=1e-6), 1000, torch.float64)
    assert _rel(theirs, ours).max() < 1e-3


def test_cubic_fit_float32_first_steps_equal_published(published, quiet):
    with quiet():
        theirs, _ = run_cubic(lambda m: published.ElraOptimizer(m.parameters(), model=m, lr=1e-6), 6)
    ours, _ = run_cubic(lambda m: ElraOptimizer(m.parameters(), model=m, lr=1e-6), 6)
    assert _rel(theirs, ours).max() < 1e-6


def test_rosenbrock_float64_follows_published_through_its_retraces(published, quiet):
    with quiet():
        theirs, _ = run_rosenbrock(lambda ps: published.ElraOptimizer(ps, lr=1e-5), 40)
    ours, _ = run_rosenbrock(lambda ps: ElraOptimizer(ps, lr=1e-5), 40)
    assert _rel(theirs, ours).max() < 1e-4
    assert max(theirs) > 100 * theirs[0]  # the run does contain failed (retraced) steps


def _digits_run(make_opt, steps, batch=4):
    x, y = digits_data()
    model = digits_model()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        value = loss.item()
        losses.append(value)
        if step > 10 and not value < 2.0:
            opt.step_retrace(value)
            continue
        opt.zero_grad()
        loss.backward()
        opt.step(value)
    return losses, opt


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.9999, "momentum": 0.5}], ids=["plain", "decay+momentum"])
def test_stochastic_regime_follows_published(published, quiet, options):
    """Mini-batch training: retraces, step_retrace, windows and batch-multiplier growth match."""
    steps = 3500
    with quiet() as out:
        theirs, _ = _digits_run(lambda ps: published.ElraOptimizer(ps, None, 768, 10, lr=1e-5, **options), steps)
    ours, opt = _digits_run(lambda ps: ElraOptimizer(ps, None, 768, 10, lr=1e-5, acceptance="published", **options), steps)
    assert _rel(theirs, ours).max() < 1e-6
    printed = out.getvalue()
    assert "NoGrad:" in printed  # step_retrace was exercised
    assert opt.stats["retraces"] == printed.count("Retrace(") > 0
    assert opt.stats["batch_multiplier"] > 1


def test_a_refused_first_step_is_undone_where_the_published_package_stays_there(published, quiet):
    """Stochastic regime, first step refused: the published retrace keeps the step length, so it never moves back.

    Rosenbrock at ``lr=1e-2`` (``classes=None`` takes it as stochastic: the overshoot misses the trapezoid's
    prediction): the first step goes from f 12.5 to 625. With ``acceptance="published"`` ELRA stays there with the
    package; by default each retrace halves the first step, back along it towards the start, and the run goes on.
    """
    with quiet():
        theirs, _ = run_rosenbrock(lambda ps: published.ElraOptimizer(ps, None, 8, 10, lr=1e-2), 30)
    same, _ = run_rosenbrock(lambda ps: ElraOptimizer(ps, None, 8, 10, lr=1e-2, acceptance="published"), 30)
    assert same == theirs and theirs[-1] == theirs[1] > 40 * theirs[0]  # the package never leaves the failed step

    losses, _ = run_rosenbrock(lambda ps: ElraOptimizer(ps, lr=1e-2), 300)
    start = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    rosenbrock(start).backward()
    along = [rosenbrock(start.detach() - 1e-2 * 0.5**k * start.grad).item() for k in range(3)]
    assert losses[1:4] == pytest.approx(along, rel=1e-12)  # back along the first step, half the length each time
    assert min(losses) < losses[0]  # and below the start


def test_boost_means_the_points_before_the_accepted_steps_where_the_package_holds_those_after(published, quiet):
    """One epoch of 150 steps (below the 240-point cycle) through ``get_boost_model``, as docs/method.md compares."""

    def run(make_opt, steps=150):
        x, y = digits_data()
        model = digits_model()
        opt = make_opt(model.parameters())
        gen = torch.Generator().manual_seed(1)
        flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
        assert opt.get_boost_model(True, model)[2] is None
        before, after, losses, refused = [], [], [], []
        for _ in range(steps):
            idx = torch.randint(0, len(x), (4,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            losses.append(loss.item())
            before.append(flat(model))
            opt.zero_grad()
            loss.backward()
            retraces = getattr(opt, "stats", {}).get("retraces")
            opt.step(loss.item())
            after.append(flat(model))
            refused.append(retraces is not None and opt.stats["retraces"] > retraces)
        count, mean_loss, boost = opt.get_boost_model(True)
        return losses, before, after, count, mean_loss, flat(boost), refused

    with quiet():
        theirs = run(lambda ps: published.ElraOptimizer(ps, None, 768, 10, lr=1e-5))
    ours = run(lambda ps: ElraOptimizer(ps, None, 768, 10, lr=1e-5, acceptance="published"))
    losses, before, after, count, mean_loss, boost, refused = ours
    assert _rel(theirs[0], losses).max() < 1e-12
    accepted = [i for i in range(len(losses)) if not refused[i]]
    assert 100 < len(accepted) < len(losses) - 2
    assert count == len(accepted) and theirs[3] == len(losses)  # the package counts every real step
    assert mean_loss == pytest.approx(np.mean([losses[i] for i in accepted]), rel=1e-12) and theirs[4] == 0.0
    assert torch.allclose(boost, torch.stack([before[i] for i in accepted]).mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(theirs[5], torch.stack([after[i] for i in accepted]).mean(0), rtol=0, atol=1e-12)


def test_the_comparisons_skip_where_the_published_package_cannot_be_installed(tmp_path, monkeypatch):
    import subprocess
    import sys

    from conftest import published_or_skip

    monkeypatch.delitem(sys.modules, "elra_published", raising=False)

    def offline(command, **kwargs):
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(pytest.skip.Exception, match="cannot be installed"):
        published_or_skip(tmp_path)


def test_weight_decay_steered_by_reported_losses_follows_published(published, quiet):
    """A run that trains (few retraces), with train/validation losses reported every 150 steps: the decay
    factor becomes ``sqrt(2*valid/train - 1)`` at each cycle's end, as in the package."""
    x, y = digits_data()

    def run(make_opt, steps=1000):
        model = digits_model()
        opt = make_opt(model.parameters())
        gen = torch.Generator().manual_seed(1)
        losses = []
        for step in range(steps):
            if step % 150 == 149:
                with torch.no_grad():
                    opt.set_train_loss(torch.nn.functional.cross_entropy(model(x[:1200]), y[:1200]).item())
                    opt.set_valid_loss(1.5 * torch.nn.functional.cross_entropy(model(x[1200:]), y[1200:]).item())
            idx = torch.randint(0, len(x), (4,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step(loss.item())
        return losses, opt

    options = {"weight_decay": 1e-4, "momentum": 0.5}
    with quiet():
        theirs, _ = run(lambda ps: published.ElraOptimizer(ps, None, 768, 10, lr=1e-5, **options))
    ours, opt = run(lambda ps: ElraOptimizer(ps, None, 768, 10, lr=1e-5, acceptance="published", **options))
    assert _rel(theirs, ours).max() < 1e-9
    assert opt.stats["weight_decay"] > 1.0 and np.mean(ours[-100:]) < 0.5 * np.mean(ours[:100])


def test_a_published_packages_state_dict_is_refused_naming_the_package(published, quiet):
    """A migrating user's checkpoint (the package's ``state_dict``: ``param_groups`` None) was refused with a
    message about torch.distributed.checkpoint's flattening, which they never used."""
    model = digits_model()
    x, y = digits_data()
    with quiet():
        theirs = published.ElraOptimizer(model.parameters(), None, 32, 10, lr=1e-5)
        for _ in range(3):
            theirs.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[:32]), y[:32])
            loss.backward()
            theirs.step(loss.item())
        saved = theirs.state_dict()
    ours = ElraOptimizer(digits_model().parameters(), None, 32, 10, lr=1e-5)
    with pytest.raises(ValueError, match="a state_dict of the published elra package .* start ElraOptimizer afresh"):
        ours.load_state_dict(saved)
