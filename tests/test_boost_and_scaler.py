"""Boost (parameter averaging) and ElraGradScaler in one process."""

import copy
import logging
import math
import sys
import warnings

import pytest
import torch

from conftest import backward_and_step, digits_data, digits_model
from elra import ElraGradScaler, ElraOptimizer


def _batches(x, y, steps, size=16):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (size,), generator=gen)
        yield x[idx], y[idx]


def _step_noting_the_point(opt, model, xb, yb):
    """One step on a batch; the parameters it started from if it was accepted (not retraced), else None."""
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    point = [p.detach().clone() for p in model.parameters()]
    before = opt.stats["retraces"]
    opt.step(loss)
    return point if opt.stats["retraces"] == before else None


def test_boost_is_the_mean_of_the_accepted_points():
    x, y = digits_data()
    model = digits_model()
    opt = ElraOptimizer(model.parameters(), None, 16, 10, lr=1e-5)
    opt.enable_boost(cycle=50)
    accepted = []
    for xb, yb in _batches(x, y, 80):
        point = _step_noting_the_point(opt, model, xb, yb)
        if point is not None and len(accepted) < 50:
            accepted.append(point)
    assert opt.stats["boost_count"] == 50  # the cycle is full: the mean is frozen
    expected = [torch.stack(ps).mean(0) for ps in zip(*accepted)]
    weights = [p.detach().clone() for p in model.parameters()]
    with opt.boosted() as count:
        assert count == 50
        assert all(torch.allclose(p, e, atol=1e-12) for p, e in zip(model.parameters(), expected))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_the_boost_mean_of_16_bit_parameters_is_the_mean_to_their_rounding(dtype, preconditioner):
    """The mean of 16-bit parameters is kept in float32: in bfloat16 each point's share ``(x - mean)/count``
    rounded away and the mean stayed near the early points (off by 0.09 after 240 points, as far as the
    last point is from it, where its rounding is 0.001). Entering ``boosted()`` twice shows the same mean
    and leaves the parameters bit-identical."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).to(dtype)
    opt = ElraOptimizer(model.parameters(), None, 32, 3, lr=1e-4, preconditioner=preconditioner)
    opt.enable_boost(cycle=240)
    accepted = []
    for step in range(300):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        loss.backward()
        point = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        before = opt.stats["retraces"]
        opt.step(loss)
        if opt.stats["retraces"] == before and len(accepted) < 240:
            accepted.append(point)
    assert opt.stats["boost_count"] == 240 == len(accepted)
    expected = torch.stack(accepted).mean(0)
    rounding = (expected.to(dtype).double() - expected).abs().max()
    weights = [p.detach().clone() for p in model.parameters()]
    shown = []
    for _ in range(2):
        with opt.boosted():
            shown.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert torch.equal(shown[0], shown[1])
    assert (shown[0] - expected).abs().max() <= rounding


def test_get_boost_model_returns_a_boosted_copy_per_epoch_and_never_changes_the_path():
    x, y = digits_data()

    def train(boost):
        model = digits_model()
        opt = ElraOptimizer(model.parameters(), None, 16, 10, lr=1e-5)
        if boost:
            assert opt.get_boost_model(True, model) == (0, 0.0, None)
        results = []
        for epoch in range(3):
            for xb, yb in _batches(x, y, 60):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step(loss)
            if boost:
                results.append(opt.get_boost_model(True, model))
        return model, results

    plain, _ = train(False)
    boosted, results = train(True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), boosted.parameters()))
    count, loss, copy = results[-1]
    assert 2 <= count <= 60 and loss > 0 and copy is not boosted
    with torch.no_grad():
        boost_loss = torch.nn.functional.cross_entropy(copy(x), y).item()
        model_loss = torch.nn.functional.cross_entropy(boosted(x), y).item()
    assert math.isfinite(boost_loss) and boost_loss < 2 * model_loss
    assert not all(torch.equal(a, b) for a, b in zip(copy.parameters(), boosted.parameters()))


def test_get_boost_model_copies_the_model_again_once_it_was_cast_or_grew():
    """The copy was made at the first call and only refreshed by loads: after ``model.float()`` (a cast ELRA's
    state follows) the boosted model stayed float64 and failed on the model's inputs; after a layer added with
    ``add_param_group`` the load raised torch's "Unexpected key(s)". The copy follows the model's layout now,
    and is kept while that stays."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    opt = ElraOptimizer(model.parameters(), None, 8, 0, preconditioner="adam")
    opt.get_boost_model(True, model)

    def epoch(steps=6):
        for _ in range(steps):
            opt.zero_grad()
            x = torch.randn(8, 4, dtype=model[0].weight.dtype)
            loss = (model(x) ** 2).mean()
            loss.backward()
            opt.step(loss)
        return opt.get_boost_model(True)[2]

    first = epoch()
    assert epoch() is first and first[0].weight.dtype == torch.float64
    model.float()
    cast = epoch()
    assert cast[0].weight.dtype == torch.float32 and cast(torch.ones(1, 4)).dtype == torch.float32
    model.append(torch.nn.Linear(2, 1).float())
    opt.add_param_group({"params": model[3].parameters()})
    grown = epoch()
    assert len(grown) == 4 and grown(torch.ones(1, 4)).shape == (1, 1)


def test_get_boost_model_needs_the_model_only_once_as_in_the_published_package():
    """The published package copies the model at the first activation and later refreshes that copy from
    the mean: ``get_boost_model(True, model)`` once, then ``get_boost_model(True)``. Here the second call
    raised TypeError, and after a call with the model a call without it returned the stale copy."""
    x, y = digits_data()
    model = digits_model()
    opt = ElraOptimizer(model.parameters(), None, 16, 10, lr=1e-5)
    assert opt.get_boost_model(True, model) == (0, 0.0, None)
    batches = _batches(x, y, 80)
    for epoch in range(2):
        accepted = []
        for _ in range(40):
            point = _step_noting_the_point(opt, model, *next(batches))
            if point is not None:
                accepted.append(point)
        count, _, boosted = opt.get_boost_model(True)
        assert count == len(accepted) >= 2
        expected = [torch.stack(ps).mean(0) for ps in zip(*accepted)]
        assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(boosted.parameters(), expected))


def test_get_boost_model_after_a_resume_names_the_model_it_needs_and_then_continues_the_run():
    """A fresh optimizer loaded from a checkpoint has not seen the model the published loop gave once, in the
    other process: the call without it said "the first time", which the run was past. The error now says to
    pass it once in this process, changes nothing, and with the model the resumed epochs return the
    uninterrupted run's boosts."""
    x, y = digits_data()
    batches = list(_batches(x, y, 90))

    def epoch(model, opt, index, with_model=False):
        for xb, yb in batches[30 * index: 30 * index + 30]:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step(loss)
        count, mean_loss, boosted = opt.get_boost_model(True, model if with_model else None)
        return count, mean_loss, [p.detach().clone() for p in boosted.parameters()]

    model = digits_model()
    opt = ElraOptimizer(model.parameters(), None, 16, 10, lr=1e-5)
    opt.get_boost_model(True, model)
    epoch(model, opt, 0)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    whole = [epoch(model, opt, 1), epoch(model, opt, 2)]

    resumed_model = digits_model()
    resumed_model.load_state_dict(saved[0])
    resumed = ElraOptimizer(resumed_model.parameters(), None, 16, 10, lr=1e-5)
    resumed.load_state_dict(saved[1])
    with pytest.raises(TypeError, match="pass it once in this process"):
        epoch(resumed_model, resumed, 1)
    count, mean_loss, params = resumed.get_boost_model(True, resumed_model)
    again = [(count, mean_loss, [p.detach().clone() for p in params.parameters()]), epoch(resumed_model, resumed, 2)]
    for (count, loss, params), (count_again, loss_again, params_again) in zip(whole, again):
        assert count >= 2 and (count, loss) == (count_again, loss_again)
        assert all(torch.equal(a, b) for a, b in zip(params, params_again))


def _boosted_linear(steps: int = 4):
    """A small linear model trained a few steps with boosting on (cycle 10), and the last loss."""
    model = torch.nn.Linear(3, 2)
    opt = ElraOptimizer(model.parameters(), model)
    opt.enable_boost(cycle=10)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.ones(1, 3)).pow(2).sum()
        loss.backward()
        opt.step(loss)
    return model, opt, loss


def test_boost_state_is_checkpointed():
    model, opt, _ = _boosted_linear()
    other = ElraOptimizer(model.parameters())
    other.load_state_dict(opt.state_dict())
    assert other.booster.state_dict() == opt.booster.state_dict()
    assert torch.equal(other.state[model.weight]["boost"], opt.state[model.weight]["boost"])


def test_what_would_mix_the_boost_mean_with_the_run_is_refused_inside_boosted():
    """Inside ``boosted()`` the parameters hold the mean: a step, a checkpoint or a copy there would mix it with
    the run (a model saved there holds the mean, the optimizer the current point). Evaluating is what it is for."""
    model, opt, loss = _boosted_linear()
    saved, before = opt.state_dict(), [p.detach().clone() for p in model.parameters()]
    with opt.boosted() as count:
        assert count >= 2 and not torch.equal(model.weight, before[0])
        for refused in (lambda: opt.step(loss), lambda: opt.step_retrace(1.0), opt.state_dict,
                        lambda: opt.load_state_dict(saved), lambda: copy.deepcopy(opt), opt.boosted().__enter__):
            with pytest.raises(RuntimeError, match="inside optimizer.boosted"):
                refused()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and opt.state_dict()["state"]
    copy.deepcopy(opt)


def _half_training(dtype, steps, scaler, inject_inf_at=(), preconditioner="muon"):
    torch.manual_seed(0)
    x, y = digits_data(torch.float32)
    model = digits_model(torch.float32).to(dtype)
    opt = ElraOptimizer(model.parameters(), None, 16, 10, lr=1e-4, warmup=10, preconditioner=preconditioner)
    scales, outcomes = [], []
    for step, (xb, yb) in enumerate(_batches(x, y, steps)):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb.to(dtype)).float(), yb)
        scaler.scale(loss).backward()
        if step in inject_inf_at:
            next(model.parameters()).grad[0, 0] = math.inf
        outcomes.append(scaler.step(opt))
        scaler.update()
        scales.append(scaler.get_scale())
    with torch.no_grad():
        accuracy = (model(x.to(dtype)).argmax(1) == y).float().mean().item()
    return model, scales, outcomes, accuracy, opt


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scaler_backs_off_on_overflow_grows_when_clean_and_trains(dtype, preconditioner):
    """16-bit parameters; along a preconditioned direction their moments are float32 (in float16
    (1-b2)*g^2 underflows and the direction becomes inf; in bfloat16 0.999*v rounds back to v)."""
    scaler = ElraGradScaler(init_scale=2.0**10, growth_interval=20)
    model, scales, outcomes, accuracy, opt = _half_training(
        dtype, 300, scaler, inject_inf_at=(0, 30, 31), preconditioner=preconditioner
    )
    assert outcomes[0] == outcomes[30] == outcomes[31] == "overflow"
    assert scales[29] / 4 == scales[31]  # halved twice
    assert max(scales[32:]) > scales[31]  # and grew back
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.stats["real_steps"] == 300 - 3 and accuracy > 0.8
    # the dropped steps' micro-batches were passed to step: a step budget's clock counts them (it lagged by 3)
    assert opt.micro_batches_taken == 300


def test_a_growth_never_cuts_an_initial_scale_above_the_cap():
    """Growths stop at 2^16; an ``init_scale`` above it stays until an overflow (a growth set it to 2^16)."""
    scaler = ElraGradScaler(init_scale=2.0**20, growth_interval=1)
    for _ in range(3):
        scaler.update()
    assert scaler.get_scale() == 2.0**20
    below = ElraGradScaler(init_scale=2.0**15, growth_interval=1)
    for _ in range(3):
        below.update()
    assert below.get_scale() == 2.0**16


def test_p2m_momentum_takes_the_unscaled_float16_gradient_at_its_share():
    """P2M with momentum: ``d <- 0.9*d + (0.1/3)*g/2^16`` (3 micro-batches, loss scale 2^16), against float64.

    torch rounded the factor, 5.1e-7, to float16's subnormals (9 units of 6e-8: 5% more gradient; at 64
    micro-batches it became 0 and the gradient was lost); the product is now formed in float32.
    """
    torch.manual_seed(0)
    x, y = torch.randn(24, 8).half(), torch.randn(24, 4)
    model = torch.nn.Linear(8, 4).half()
    opt = ElraOptimizer(model.parameters(), lr=1e-4, preconditioner=None, classes=0, momentum=0.9, batch_multiplier=3)
    scaler = ElraGradScaler(init_scale=2.0**16)
    outcomes = []
    for i in range(6):
        opt.zero_grad()
        loss = ((model(x[4 * i : 4 * i + 4]).float() - y[4 * i : 4 * i + 4]) ** 2).mean() * 1e-3
        scaler.scale(loss).backward()
        if i == 5:
            before, summed = opt.state[model.weight]["direction"].double(), model.weight.grad.double()
        outcomes.append(scaler.step(opt))
        scaler.update()
    assert outcomes == ["collect", "collect", "accept"] * 2
    expected = 0.9 * before + (0.1 / 3) * summed / 2.0**16
    error = (opt.state[model.weight]["direction"].double() - expected).norm() / expected.norm()
    assert error < 1e-3  # float16's rounding (4.8e-3 before)


@pytest.mark.parametrize("preconditioner", [None, "adam", "muon"])
def test_scaler_matches_unscaled_training_in_float32(preconditioner):
    """Full-precision parameters: the fused kernels take the scaler's gradient scale."""

    def run(scaler):
        torch.manual_seed(0)
        x, y = digits_data(torch.float64)
        model = digits_model()
        opt = ElraOptimizer(model.parameters(), None, 16, 10, lr=1e-5, preconditioner=preconditioner)
        for xb, yb in _batches(x, y, 100):
            opt.zero_grad()
            backward_and_step(opt, torch.nn.functional.cross_entropy(model(xb), yb), scaler)
        return [p.detach() for p in model.parameters()]

    plain = run(None)
    scaled = run(ElraGradScaler(init_scale=2.0**8))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(plain, scaled))


def test_scaler_retraces_on_a_loss_over_the_limit_and_round_trips_its_state():
    scaler = ElraGradScaler(loss_limit=10.0, init_scale=4.0)
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ElraOptimizer([p], lr=1e-3)
    for value in (1.0, 20.0):
        opt.zero_grad()
        loss = (p**2).sum() * value
        scaler.scale(loss).backward()
        outcome = scaler.step(opt)
        scaler.update()
    assert outcome == "retrace" and opt.stats["retraces"] == 1
    other = ElraGradScaler()
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == scaler.state_dict() and other.get_scale() == 4.0


@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_a_disabled_scaler_steps_as_the_optimizer_alone_also_with_losses_above_the_limit(preconditioner):
    """``ElraGradScaler(enabled=use_amp)`` with AMP off (float32): a disabled scaler still turned every loss at or
    above ``loss_limit`` (65000, float16's range, which a sum-reduced float32 loss passes) into nan, so ELRA
    retraced every step and the model never moved, silently. Disabled, it now passes the loss through as
    ``enabled`` says: the run is ``optimizer.step(loss)``'s, step for step."""

    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        x, y = torch.randn(32, 6), torch.randn(32, 3)
        opt = ElraOptimizer(model.parameters(), None, 32, 0, lr=1e-4, preconditioner=preconditioner)
        outcomes = []
        for _ in range(20):
            opt.zero_grad()
            outcomes.append(backward_and_step(opt, ((model(x) - y) ** 2).sum() * 1e4, scaler))  # a loss of about 1e6
        return [p.detach() for p in model.parameters()], opt.stats, outcomes

    plain, stats, _ = run(None)
    disabled, disabled_stats, outcomes = run(ElraGradScaler(enabled=False))
    assert stats["retraces"] < 10 and disabled_stats == stats and outcomes.count("accept") == 20 - stats["retraces"]
    assert all(torch.equal(a, b) for a, b in zip(plain, disabled))


@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_two_losses_scaled_and_back_propagated_before_one_step_are_their_sum(preconditioner):
    """torch's pattern for several losses, ``scaler.scale(loss0).backward(); scaler.scale(loss1).backward();
    scaler.step(optimizer)``: the gradients add up, but the scaler remembered only the last loss, so ELRA judged
    the sum's gradient by ``loss1`` alone and took other steps, silently. It now hands ELRA the sum of the losses
    scaled since the last step: the run is that of ``(loss0 + loss1).backward(); optimizer.step(loss0 + loss1)``
    (to rounding)."""

    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
        opt = ElraOptimizer(model.parameters(), None, 32, 0, lr=1e-4, preconditioner=preconditioner)
        for _ in range(25):
            opt.zero_grad()
            out = model(x)
            losses = [((out - y) ** 2).mean(), 0.1 * out.abs().mean()]  # a fit and a penalty
            if scaler is None:
                total = losses[0] + losses[1]
                total.backward()
                opt.step(total)
            else:
                scaler.scale(losses[0]).backward(retain_graph=True)
                scaler.scale(losses[1]).backward()
                scaler.step(opt)
                scaler.update()
        return [p.detach() for p in model.parameters()], opt.stats

    (summed, stats), (scaled, scaled_stats) = run(None), run(ElraGradScaler(init_scale=2.0**8))
    # two backward passes add the parameters' gradients in another order than one of the sum: rounding apart
    assert scaled_stats["retraces"] == stats["retraces"] and math.isclose(scaled_stats["lr"], stats["lr"], rel_tol=1e-9)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(summed, scaled))


def _skipping_scaled_losses(skip: str, scale_the_skipped_loss: bool):
    """A noise-free fit through ``ElraGradScaler`` whose micro-batches 0, 3 and 7 are skipped after
    ``scaler.scale``: ended by ``optimizer.step_retrace`` (``skip="retrace"``: naming the scaled tensor at 0,
    before the scaler's first step, later its value; ``"retrace-value"``: its value throughout) or left behind by
    a ``continue`` (``skip="continue"``). Parameters, stats and ``scaler.step``'s outcomes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    opt = ElraOptimizer(model.parameters(), None, 32, 0, lr=1e-4)
    scaler = ElraGradScaler(init_scale=2.0**8)
    outcomes = []
    for i in range(12):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if i in (0, 3, 7):
            loss = loss * 1e6  # a bad batch
            if scale_the_skipped_loss:
                scaler.scale(loss)
            if skip != "continue":
                opt.step_retrace(loss if i == 0 and skip == "retrace" else loss.item())
            continue
        scaler.scale(loss).backward()
        outcomes.append(scaler.step(opt))
        scaler.update()
    return [p.detach() for p in model.parameters()], opt.stats, outcomes


@pytest.mark.parametrize("skip", ["retrace", "retrace-value", "continue"])
def test_a_loss_scaled_for_a_skipped_micro_batch_does_not_reach_the_next_step(skip):
    """``scaler.scale(loss)``, then the micro-batch skipped: by ``optimizer.step_retrace(loss)`` (its backward
    not run), or by a ``continue`` before the next ``optimizer.zero_grad()`` clears what it left. The scaler kept
    that loss and handed ``bad + next`` to the next ``scaler.step``, which retraced a good step. The retrace (naming
    the scaled tensor, or an optimizer the scaler steps, or any before its first step) and a zero_grad that clears
    the gradients now drop it: the run is that of a loop that never scaled it. (Skipped first, by value or by a
    ``continue``, the loss was kept until session 25: the scaler had stepped no optimizer yet.)"""
    plain, stats, outcomes = _skipping_scaled_losses(skip, False)
    scaled, scaled_stats, scaled_outcomes = _skipping_scaled_losses(skip, True)
    assert scaled_outcomes == outcomes and scaled_stats == stats and "retrace" not in outcomes
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))


@pytest.mark.parametrize("skip", ["retrace", "continue"])
def test_a_back_propagated_loss_whose_step_is_skipped_does_not_reach_the_next_step(skip):
    """``scaler.scale(loss).backward()``, then the step skipped (``step_retrace``, or a ``continue`` whose next
    ``zero_grad()`` clears the gradients), also before the scaler's first step: the next step's loss is that
    of its own gradient, as in a loop that never ran the skipped micro-batch."""

    def run(skipped: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
        opt, scaler = ElraOptimizer(model.parameters(), None, 32, 0, lr=1e-4), ElraGradScaler(init_scale=2.0**8)
        for i in range(12):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            if i in (0, 3, 7):
                if skipped:
                    scaler.scale(loss * 1e6).backward()
                if skip == "retrace":
                    opt.step_retrace(loss.item())
                continue
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return [p.detach() for p in model.parameters()], opt.stats

    (plain, stats), (skipped, skipped_stats) = run(False), run(True)
    assert skipped_stats == stats and all(torch.equal(a, b) for a, b in zip(plain, skipped))


def _two_models_with_scalers(order: str, shared: bool, retraces: tuple[int, ...] = ()):
    """Two models, an optimizer each, one scaler each (or one ``shared``), in float64 with scale 16 (exact).
    ``order``: "interleaved" (zero_grad, scale(loss).backward(), step per model), "grouped" (every backward,
    then every step: an ensemble's loop; "grouped_zero_grad_after_step": each step followed by its ``zero_grad()``)
    or "zero_grad_after_scale" (``scaled = scale(loss)``, ``zero_grad()``, ``scaled.backward()``). Without scalers (``order="plain"``) each optimizer is stepped with the loss a
    scaler should hand it: its own, or with a shared scaler and every backward first, both models' sum. At the
    iterations ``retraces`` the second model's loss is scaled and its step skipped, ``step_retrace(value)``."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double() for _ in range(2)]
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    opts = [ElraOptimizer(m.parameters(), None, 8, None, preconditioner="adam") for m in models]
    scalers = [ElraGradScaler(init_scale=16.0, growth_interval=1000)] * 2 if shared else [ElraGradScaler(init_scale=16.0) for _ in models]
    handed = []  # the loss each step is given
    for opt in opts:
        opt.register_step_pre_hook(lambda opt, args, kwargs: handed.append(float(args[1].detach())))
    for i in range(20):
        batch = slice(i % 8 * 8, i % 8 * 8 + 8)
        losses = []
        for k, (model, opt, scaler) in enumerate(zip(models, opts, scalers)):
            loss = ((model(x[batch]) - y[batch]) ** 2).mean()
            if k == 1 and i in retraces:
                opt.zero_grad()
                if order != "plain":
                    scaler.scale(loss)
                opt.step_retrace(loss.item())
                continue
            losses.append((opt, scaler, loss))
            if order == "zero_grad_after_scale":
                scaled = scaler.scale(loss)
                opt.zero_grad()
                scaled.backward()
            else:
                opt.zero_grad()
                (loss if order == "plain" else scaler.scale(loss)).backward()
            if order == "interleaved":
                scaler.step(opt)
                scaler.update()
        for opt, scaler, loss in losses if order != "interleaved" else ():
            if order == "plain":
                opt.step(sum(loss for _, _, loss in losses) if shared else loss)
            else:
                scaler.step(opt)
                if not shared:
                    scaler.update()
                if order == "grouped_zero_grad_after_step":
                    opt.zero_grad()
        if shared and order != "plain":
            scalers[0].update()
    return [p.detach() for m in models for p in m.parameters()], [o.stats for o in opts], handed


@pytest.mark.parametrize("retraces", [(), (0, 5)])
@pytest.mark.parametrize(
    "order, shared",
    [("grouped", False), ("grouped_zero_grad_after_step", False), ("zero_grad_after_scale", False),
     ("grouped", True), ("grouped_zero_grad_after_step", True), ("zero_grad_after_scale", True)],
)
def test_a_zero_grad_or_a_retrace_keeps_the_losses_it_does_not_clear(order, shared, retraces):
    """``zero_grad()`` and ``step_retrace()`` dropped every loss a scaler remembered (any optimizer's before the
    scaler's first step): an ensemble's loop (every model back-propagated, then every model stepped; torch's
    GradScaler runs it), or a ``zero_grad()`` between ``scale(loss)`` and its ``backward()``, raised "call
    scaler.scale(loss).backward() before scaler.step(optimizer)", also where another model's step was retraced,
    and one scaler stepping both models handed the first only the second's loss. Now they drop the losses
    back-propagated into the gradients they clear (and a retrace the losses of its skipped backward): each run
    is that of plain ``step(loss)`` calls, with each optimizer's own loss, or with a shared scaler the sum of
    the losses back-propagated (the losses scaled since the last step, as documented)."""
    plain, plain_stats, plain_losses = _two_models_with_scalers("plain", shared, retraces)
    scaled, stats, losses = _two_models_with_scalers(order, shared, retraces)
    assert losses == plain_losses and stats == plain_stats and all(torch.equal(a, b) for a, b in zip(plain, scaled))
    assert stats[1]["retraces"] >= len(retraces)
    if not shared:
        interleaved, interleaved_stats, _ = _two_models_with_scalers("interleaved", shared, retraces)
        assert interleaved_stats == stats and all(torch.equal(a, b) for a, b in zip(interleaved, scaled))


@pytest.mark.parametrize("another_optimizer", [False, True])
def test_a_loss_back_propagated_into_no_optimizers_gradients_goes_with_the_next_zero_grad(another_optimizer):
    """An input gradient through the scaler (an adversarial example: ``torch.autograd.grad(scaler.scale(attack),
    x)``), then ``zero_grad()`` and the training loss: the step is handed the training loss alone, as
    ``step(loss)`` would be, also with another model trained in between (its gradients written after the attack's
    backward began were taken for the attack's: the loss stayed and doubled what the step was handed)."""

    def run(scaled: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
        opt = ElraOptimizer(model.parameters(), None, 8, 3, preconditioner="adam")
        other = torch.nn.Linear(2, 1).double()
        others = ElraOptimizer(other.parameters(), None, 8, 0, lr=1e-3) if another_optimizer else None
        scaler, other_scaler, handed = ElraGradScaler(init_scale=16.0), ElraGradScaler(init_scale=16.0), []
        opt.register_step_pre_hook(lambda opt, args, kwargs: handed.append(float(args[1])))
        data = torch.Generator().manual_seed(1)
        for _ in range(12):
            x = torch.randn(8, 4, generator=data, dtype=torch.float64).requires_grad_()
            y = torch.randint(0, 3, (8,), generator=data)
            attack = torch.nn.functional.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(scaler.scale(attack) if scaled else attack, x)
            if others is not None:  # another model trained meanwhile, its gradients written and unscaled
                others.zero_grad()
                other_scaler.scale((other(torch.ones(4, 2, dtype=torch.float64)) ** 2).mean()).backward()
                other_scaler.step(others)
                other_scaler.update()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model((x + 0.01 * grad.sign()).detach()), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step(loss.detach())
        del others
        return handed, [p.detach() for p in model.parameters()]

    (plain, plain_params), (scaled, params) = run(False), run(True)
    assert scaled == plain and all(torch.equal(a, b) for a, b in zip(plain_params, params))


def test_a_scaler_pickled_by_an_earlier_elra_keeps_its_loss():
    """A scaler pickled before session 35 holds one summed loss (``_loss``): unpickled, its first ``scale``
    raised ``AttributeError``. Its loss is now the one remembered loss, back-propagated."""
    scaler = ElraGradScaler(init_scale=16.0)
    state = {key: value for key, value in scaler.__dict__.items() if key != "_losses"}
    earlier = ElraGradScaler.__new__(ElraGradScaler)
    earlier.__setstate__({**state, "_loss": 2.5, "_scaled": []})
    model = torch.nn.Linear(2, 1).double()
    opt = ElraOptimizer(model.parameters(), None, 8, 0)
    handed = []
    opt.register_step_pre_hook(lambda opt, args, kwargs: handed.append(float(args[1])))
    model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    earlier.step(opt)
    earlier.update()
    earlier.scale(model(torch.ones(1, 2, dtype=torch.float64)).sum() ** 2).backward()
    assert handed == [2.5]


def test_a_scaler_step_refused_for_a_missing_backward_forgets_its_loss():
    """``scaler.scale(loss)`` without its backward, then ``scaler.step`` while collecting: ELRA refuses the step
    (no gradient changed). The scaler kept the loss for a retry, and when the loop went on (the refused call's
    ``update()`` skipped with it) the next micro-batch's loss was added to it: a good step read twice its loss
    and retraced (P2M 6.9e-2 off after 20 micro-batches). The refusal now counts as the loss handed over: the next
    ``scale`` starts a new sum."""

    def run(refused: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
        opt = ElraOptimizer(model.parameters(), model, 8, 3, lr=1e-4, batch_multiplier=2, preconditioner=None)
        scaler, outcomes = ElraGradScaler(init_scale=2.0**8), []
        data = torch.Generator().manual_seed(1)
        for step in range(20):
            x, y = torch.randn(8, 5, generator=data, dtype=torch.float64), torch.randint(0, 3, (8,), generator=data)
            opt.zero_grad()
            if refused and step == 5:  # micro-batch 2 of a pair: the backward forgotten
                scaler.scale(torch.nn.functional.cross_entropy(model(x), y))
                with pytest.raises(RuntimeError, match="without a backward"):
                    scaler.step(opt)
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
            outcomes.append(scaler.step(opt))
            scaler.update()
        return [p.detach() for p in model.parameters()], opt.stats, outcomes

    plain, stats, outcomes = run(False)
    params, refused_stats, refused_outcomes = run(True)
    assert refused_outcomes == outcomes and refused_stats == stats
    assert all(torch.equal(a, b) for a, b in zip(plain, params))


def test_one_optimizers_refusal_for_a_missing_backward_leaves_the_loss_to_the_other():
    """One scaler, two optimizers; a micro-batch whose backward reaches only b's parameters. a refuses, and b
    must still take the loss (the first version of the fix above forgot it for both: b then raised, kept its
    gradient, and went 7.7e-3 off): as the loop that steps b alone there."""

    def run(try_both: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
        params = list(model.parameters())
        a, b = (ElraOptimizer(group, model, 8, 3, lr=1e-4, batch_multiplier=2, preconditioner=None)
                for group in (params[:2], params[2:]))
        scaler, data = ElraGradScaler(init_scale=2.0**8), torch.Generator().manual_seed(1)
        for step in range(16):
            x, y = torch.randn(8, 5, generator=data, dtype=torch.float64), torch.randint(0, 3, (8,), generator=data)
            a.zero_grad()
            b.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if step == 11:  # micro-batch 2 of a pair: the backward reaches b's parameters alone
                scaler.scale(loss).backward(inputs=params[2:])
                if try_both:
                    with pytest.raises(RuntimeError, match="without a backward"):
                        scaler.step(a)
                scaler.step(b)
            else:
                scaler.scale(loss).backward()
                scaler.step(a)
                scaler.step(b)
            scaler.update()
        return params, a.stats, b.stats

    reference, a_stats, b_stats = run(False)
    params, tried_a, tried_b = run(True)
    assert (tried_a, tried_b) == (a_stats, b_stats) and b_stats["real_steps"] == 8
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_one_scaler_stepping_two_optimizers_keeps_the_scale_while_either_collects(preconditioner):
    """torch's pattern for several optimizers: ``scaler.step(a); scaler.step(b); scaler.update()``. Only the last
    stepped optimizer's collecting held the scale back: ``a`` (multiplier 2) summed a micro-batch scaled by 16
    with one scaled by 32 and unscaled both by 1/32, its first micro-batch at half weight (P2M ended 0.049 off).
    The scale now waits while either collects; the float32 runs equal those with a scaler each (the scales are
    powers of two), and an overflow of ``b`` backs it off only once ``a`` is done collecting."""

    def run(shared: bool, overflow_at: int | None = None):
        torch.manual_seed(0)
        models = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]
        x, y = torch.randn(64, 4), torch.randn(64, 2)
        opts = [
            ElraOptimizer(m.parameters(), None, 8, 2, preconditioner=preconditioner, batch_multiplier=k)
            for m, k in zip(models, (2, 1))
        ]
        scalers = [ElraGradScaler(init_scale=16.0, growth_interval=1)] * 2 if shared else [
            ElraGradScaler(init_scale=16.0, growth_interval=1) for _ in opts
        ]
        scales = []  # the scale of each of a's micro-batches, in pairs: a real step's two
        for i in range(24):
            for j, (model, opt, scaler) in enumerate(zip(models, opts, scalers)):
                opt.zero_grad()
                loss = ((model(x[i % 8 * 8: i % 8 * 8 + 8]) - y[i % 8 * 8: i % 8 * 8 + 8]) ** 2).mean()
                if j == 1 and i == overflow_at:
                    loss = loss + torch.sqrt(model.bias[0] - model.bias[0].detach())  # value finite, gradient inf
                scaler.scale(loss).backward()
                if j == 0:
                    scales.append(scaler.get_scale())
                scaler.step(opt)
            for scaler in {id(s): s for s in scalers}.values():
                scaler.update()
        return [p.detach().clone() for m in models for p in m.parameters()], scales

    separate, _ = run(False)
    shared, scales = run(True)
    assert all(torch.equal(a, b) for a, b in zip(separate, shared))
    assert scales[0::2] == scales[1::2] and len(set(scales)) > 1  # it grew, between a's real steps only
    _, scales = run(True, overflow_at=4)  # b overflows while a holds one micro-batch
    assert scales[0::2] == scales[1::2] and min(scales) < scales[4]  # backed off after a's real step


def test_a_backoff_waiting_for_another_optimizers_collection_survives_a_checkpoint():
    """One scaler, two optimizers: ``b``'s overflow while ``a`` collects backs the scale off only after ``a``'s
    real step. A checkpoint taken while the backoff waits must keep it: the resumed scaler stepped on with the
    scale of a clean step (twice the uninterrupted run's from there on)."""
    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.randn(64, 2)

    def build():
        torch.manual_seed(0)
        models = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]
        opts = [ElraOptimizer(m.parameters(), None, 8, 2, preconditioner="adam", batch_multiplier=k) for m, k in zip(models, (2, 1))]
        return models, opts, ElraGradScaler(init_scale=16.0, growth_interval=3)

    def iterate(i, models, opts, scaler):
        for opt in opts:
            opt.zero_grad()
        losses = [((m(x[i % 8 * 8 : i % 8 * 8 + 8]) - y[i % 8 * 8 : i % 8 * 8 + 8]) ** 2).mean() for m in models]
        if i == 4:  # a holds one micro-batch of two
            losses[1] = losses[1] + torch.sqrt(models[1].bias[0] - models[1].bias[0].detach())  # gradient inf
        scaler.scale(sum(losses)).backward()
        for opt in opts:
            scaler.step(opt)
        scaler.update()
        return scaler.get_scale()

    models, opts, scaler = build()
    scales = [iterate(i, models, opts, scaler) for i in range(5)]
    saved = copy.deepcopy([[m.state_dict() for m in models], [o.state_dict() for o in opts], scaler.state_dict()])
    scales += [iterate(i, models, opts, scaler) for i in range(5, 12)]
    resumed_models, resumed_opts, resumed_scaler = build()
    for target, state in zip([*resumed_models, *resumed_opts, resumed_scaler], [*saved[0], *saved[1], saved[2]]):
        target.load_state_dict(state)
    resumed = [iterate(i, resumed_models, resumed_opts, resumed_scaler) for i in range(5, 12)]
    assert resumed == scales[5:] and min(scales[5:]) < scales[4]
    after = [p for m in models for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, [p for m in resumed_models for p in m.parameters()]))


@pytest.mark.parametrize("losses", [1, 2])
def test_one_scaled_loss_steps_every_optimizer_of_the_model(losses):
    """torch's patterns for one model split over two optimizers: ``scaler.scale(loss).backward()`` (or two losses
    scaled and back-propagated, torch's AMP example), then ``scaler.step(a); scaler.step(b); scaler.update()``.
    The first step took the remembered loss away and the second raised "call scaler.scale(loss).backward()
    first". Each is now handed the loss: the run equals the loop without a scaler (scale 16: exact in float64),
    and a second ``step`` of one optimizer for the same loss is refused."""

    def run(scaled: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
        x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
        opts = [ElraOptimizer(model[i].parameters(), None, 8, 0, preconditioner=p) for i, p in ((0, None), (2, "adam"))]
        scaler = ElraGradScaler(init_scale=16.0, growth_interval=3)
        for i in range(20):
            for opt in opts:
                opt.zero_grad()
            out = model(x[i % 8 * 8 : i % 8 * 8 + 8])
            parts = [((out - y[i % 8 * 8 : i % 8 * 8 + 8]) ** 2).mean(), 0.01 * out.abs().mean()][:losses]
            if scaled:
                for part in parts:
                    scaler.scale(part).backward(retain_graph=True)
                for opt in opts:
                    scaler.step(opt)
                scaler.update()
            else:
                for part in parts:
                    part.backward(retain_graph=True)
                for opt in opts:
                    opt.step(sum(parts))
        return [p.detach().clone() for p in model.parameters()], opts, scaler

    plain, opts, _ = run(False)
    scaled, scaled_opts, scaler = run(True)
    assert scaler.get_scale() > 16.0 and all(o.stats["real_steps"] == 20 for o in opts)
    assert [o.stats for o in scaled_opts] == [o.stats for o in opts]
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))
    model = torch.nn.Linear(2, 1)
    opt = ElraOptimizer(model.parameters(), None, 8, 0)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="twice for one scaled loss"):
        scaler.step(opt)


def test_a_scaler_keeps_its_own_enabled_when_it_loads_another_ones_state(caplog):
    """``ElraGradScaler(enabled=use_fp16)`` then ``load_state_dict``: the checkpoint's flag won, so a float16
    resume of a float32 run lost its loss scaling (an inf gradient was retraced, not skipped and backed off), and
    a float32 resume of a float16 run scaled again. torch's scaler keeps the constructor's flag; so does this one
    now, with its own settings, and says so."""
    saved_disabled = ElraGradScaler(enabled=False).state_dict()
    saved_enabled = ElraGradScaler(init_scale=8.0).state_dict()
    enabled, disabled = ElraGradScaler(init_scale=1024.0), ElraGradScaler(enabled=False)
    with caplog.at_level(logging.WARNING, logger="elra"):
        enabled.load_state_dict(saved_disabled)
        disabled.load_state_dict(saved_enabled)
    assert enabled.enabled and enabled.get_scale() == 1024.0
    assert not disabled.enabled and disabled.get_scale() == 1.0
    assert sum("keeps its own settings" in r.getMessage() for r in caplog.records) == 2
    again = ElraGradScaler(init_scale=2.0)
    again.load_state_dict(saved_enabled)
    assert again.get_scale() == 8.0


def test_a_long_run_of_overflows_backs_the_scale_off_to_a_floor_and_its_state_still_loads():
    """Gradients inf at every step (a sqrt at 0) with a finite loss: each step backs the scale off. After about
    1090 such steps (here 56 from a tiny ``init_scale``) it reached 0.0, the next ``scaler.step`` raised
    ZeroDivisionError and the scaler's own ``load_state_dict`` refused its ``state_dict``. It stops at
    the smallest positive normal float, the steps are skipped as overflows, and a scaler loaded from its state
    goes on the same."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = ElraOptimizer([p], None, 4, 0)
    scaler = ElraGradScaler(init_scale=2.0**-1019)

    def overflowing_step(scaler):
        opt.zero_grad()
        loss = ((p - 0.5) ** 2).sum() + torch.sqrt(p[0] - p[0].detach())  # value finite, gradient inf
        scaler.scale(loss).backward()
        outcome = scaler.step(opt)
        scaler.update()
        return outcome

    assert [overflowing_step(scaler) for _ in range(60)] == ["overflow"] * 60
    assert scaler.get_scale() == sys.float_info.min and math.isfinite(1.0 / scaler.get_scale())
    resumed = ElraGradScaler()
    resumed.load_state_dict(scaler.state_dict())
    assert overflowing_step(resumed) == overflowing_step(scaler) == "overflow"
    assert resumed.state_dict() == scaler.state_dict()
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs",
    [{"init_scale": 0}, {"init_scale": 5e-324}, {"growth_factor": 1.0}, {"backoff_factor": 1.0}, {"growth_interval": 0},
     {"init_scale": "65536"}, {"init_scale": True}, {"loss_limit": "1e4"}, {"growth_interval": 2.0}],
)
def test_scaler_rejects_bad_arguments(kwargs):
    """Strings (a config file's) raised torch-free comparison errors, ``True`` was a scale of 1: each is named."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ElraGradScaler(**kwargs)


def test_scaler_takes_numpy_integers_and_refuses_an_enabled_flag_that_is_not_a_bool():
    """``growth_interval=np.int64(2000)`` was refused as not an integer (ElraOptimizer takes numpy integers), and
    ``enabled="false"`` was taken as true: scaling stayed on."""
    import numpy as np

    assert type(ElraGradScaler(growth_interval=np.int64(2000)).state_dict()["growth_interval"]) is int
    with pytest.raises(TypeError, match="enabled"):
        ElraGradScaler(enabled="false")


@pytest.mark.parametrize(
    "field, value", [("scale", math.nan), ("scale", 0.0), ("backoff_factor", 2.0), ("growth_interval", 0), ("clean_steps", -1)]
)
def test_scaler_state_with_bad_numbers_is_refused_before_anything_changes(field, value):
    """A corrupted scaler state loaded as it was: a nan scale made every step an overflow for good, a zero one
    raised ZeroDivisionError at the next step. It raises ``ValueError`` and keeps the scaler's state."""
    scaler = ElraGradScaler(init_scale=8.0)
    before = scaler.state_dict()
    with pytest.raises(ValueError, match=field):
        scaler.load_state_dict({**before, field: value})
    assert scaler.state_dict() == before


def test_torch_grad_scaler_is_refused_before_it_mixes_scales_in_collected_micro_batches():
    """``torch.amp.GradScaler`` unscaled ``.grad`` in place at each ``scaler.step(optimizer, loss)``: while ELRA
    collected micro-batches, the first one's sum was divided again after the second's scaled gradient joined it,
    and training went on silently with wrong gradients (exact only while the batch multiplier stayed at 1).
    It now raises at the first step, naming ElraGradScaler, before anything changed."""
    model = torch.nn.Linear(4, 1)
    opt = ElraOptimizer(model.parameters(), None, 8, 1, lr=1e-4, batch_multiplier=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="ElraGradScaler"):
        scaler.step(opt, loss)
    assert opt.micro_batches == 0 and not hasattr(opt, "found_inf")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def _backward_and_step(opt: ElraOptimizer, loss: torch.Tensor, scaler: ElraGradScaler | None) -> None:
    """``loss.backward(); opt.step(loss)``, or the same through ``scaler``."""
    if scaler is None:
        loss.backward()
        opt.step(loss)
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def test_scaler_steps_run_the_optimizers_step_hooks_as_plain_steps_do():
    """``scaler.step(optimizer)`` called ELRA's step past torch's wrapper: hooks registered with
    ``register_step_pre_hook``/``register_step_post_hook`` (an EMA of the weights, a logger) silently never ran,
    where ``optimizer.step(loss)`` and torch's GradScaler run them. They run at every step now, with the loss."""

    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = ElraOptimizer(model.parameters(), None, 8, 1, lr=1e-4, batch_multiplier=2)
        seen = []
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", float(args[1].detach()))))
        opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o.stats["real_steps"])))
        for step in range(4):
            opt.zero_grad()
            _backward_and_step(opt, model(torch.full((2, 3), float(step))).pow(2).mean(), scaler)
        return seen

    plain = run(None)
    assert len(plain) == 8 and run(ElraGradScaler(init_scale=8.0)) == plain


def test_an_lr_scheduler_after_scaler_steps_warns_as_after_plain_steps():
    """torch's schedulers mark the optimizer's ``step`` to warn when the scheduler steps first; ``scaler.step``
    went past that mark, so the first ``scheduler.step()`` after it warned that it came before
    ``optimizer.step()``, in a loop in the right order."""

    def warnings_of(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = ElraOptimizer(model.parameters(), None, 8, 1, lr=1e-4)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                opt.zero_grad()
                _backward_and_step(opt, model(torch.full((2, 3), float(step))).pow(2).mean(), scaler)
                scheduler.step()
        return [str(w.message) for w in caught]

    assert warnings_of(ElraGradScaler()) == warnings_of(None) == []


def test_update_bn_inside_boosted_with_buffers_kept_aside_matches_the_copy_and_leaves_the_model_as_it_was():
    """The README advised ``update_bn`` inside ``boosted()``: the block swaps back the parameters, not the buffers,
    so the training model kept the boosted weights' running statistics (and the next checkpoint saved them). Its
    recipe now keeps the buffers aside; it evaluates as ``update_bn`` on the ``get_boost_model`` copy does."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = ElraOptimizer(model.parameters(), model, 8, 1, lr=1e-3)
    opt.get_boost_model(True, model)
    for _ in range(20):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step(loss)
    loader, probe = [torch.randn(8, 4) * 3 for _ in range(5)], torch.randn(16, 4)
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with opt.boosted():
        update_bn(loader, model)
        boosted = model.eval()(probe)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    _, _, copy_model = opt.get_boost_model(True)
    update_bn(loader, copy_model)
    assert torch.equal(copy_model.eval()(probe), boosted)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_the_scaler_refuses_another_optimizer_naming_it_and_changes_nothing():
    """It said only "ElraGradScaler drives an ElraOptimizer", also for an ElraOptimizer wrapped by Accelerate."""
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), ElraGradScaler()
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    with pytest.raises(TypeError, match=r"an ElraOptimizer, got SGD \(one prepared by Accelerate: pass .*elra_optimizer"):
        scaler.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_numpy_integer_boost_cycle_is_taken_as_the_constructor_takes_numpy_integers(tmp_path):
    """``enable_boost(np.int64(10))`` raised "Invalid boost cycle: np.int64(10) (expected an integer >= 2)", where
    the constructor takes numpy integers (``batch_size``, ``batch_multiplier``). It is the cycle of 10 now, a Python
    int in ``state_dict()`` (which ``torch.load``'s default ``weights_only=True`` reads back)."""
    np = pytest.importorskip("numpy")
    runs = []
    for cycle in (10, np.int64(10)):
        torch.manual_seed(0)
        model, opt, _ = _boosted_linear(steps=12)
        opt.enable_boost(cycle)
        for _ in range(14):
            opt.zero_grad()
            loss = model(torch.ones(1, 3)).pow(2).sum()
            loss.backward()
            opt.step(loss)
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        saved = torch.load(tmp_path / "opt.pt")["param_groups"][0]["elra_boost"]
        with opt.boosted() as count:
            runs.append((count, saved, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] == 10 and runs[0][1] == runs[1][1]
    assert type(runs[1][1]["cycle"]) is int
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


def test_a_scaler_step_refused_inside_boosted_can_be_retried_after_it():
    """The refused ``scaler.step`` had already marked the loss as handed over: the retry after the block was
    refused as a second call for one loss, and the micro-batch's gradient never reached ELRA. A retry now steps
    as the run that never tried inside; a second step for one loss is still refused."""
    runs = []
    for tried_inside in (False, True):
        torch.manual_seed(0)
        model, opt, _ = _boosted_linear()
        scaler = ElraGradScaler(init_scale=2.0**8)
        for step in range(6):
            opt.zero_grad()
            scaler.scale(model(torch.ones(1, 3)).pow(2).sum()).backward()
            if tried_inside and step == 3:
                with opt.boosted(), pytest.raises(RuntimeError, match="inside optimizer.boosted"):
                    scaler.step(opt)
            scaler.step(opt)
            if step == 4:
                with pytest.raises(RuntimeError, match="called twice for one scaled loss"):
                    scaler.step(opt)
            scaler.update()
        runs.append(([p.detach().clone() for p in model.parameters()], opt.stats))
    assert runs[0][1] == runs[1][1] and all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


def test_enable_boost_after_loading_a_boosted_checkpoint_keeps_its_mean():
    """A resumed script that turned boosting on after ``load_state_dict`` restarted the saved mean silently (the
    README's order for a checkpoint saved without boost); turning it on again keeps the mean and its count, and
    takes the new cycle. ``restart_boost`` still starts afresh."""
    torch.manual_seed(0)
    model, opt, _ = _boosted_linear(steps=6)
    with opt.boosted() as count:
        saved_mean = [p.detach().clone() for p in model.parameters()]
    resumed = ElraOptimizer(model.parameters(), model)
    resumed.load_state_dict(opt.state_dict())
    resumed.enable_boost(cycle=20)
    with resumed.boosted() as resumed_count:
        assert resumed_count == count >= 2
        assert all(torch.equal(a, b) for a, b in zip(saved_mean, model.parameters()))
    assert resumed.booster.cycle == 20
    resumed.restart_boost()
    with resumed.boosted() as restarted_count:
        assert restarted_count == 0


def test_a_boost_cycle_shorter_than_the_points_in_the_mean_is_refused_and_changes_nothing():
    """``enable_boost(cycle)`` on a mean of more points than ``cycle`` kept the count above the cycle: the state
    saved after it could not be loaded, not even by the optimizer that saved it."""
    torch.manual_seed(0)
    model, opt, _ = _boosted_linear(steps=6)
    count = opt.booster.count
    assert count > 2
    with pytest.raises(ValueError, match=f"shorter than the {count} points"):
        opt.enable_boost(cycle=2)
    assert (opt.booster.cycle, opt.booster.count) == (10, count)
    opt.enable_boost(cycle=count)
    ElraOptimizer(model.parameters(), model).load_state_dict(opt.state_dict())
    opt.restart_boost()
    opt.enable_boost(cycle=2)
    assert opt.booster.cycle == 2


def test_loading_a_checkpoint_with_other_boosting_than_the_optimizers_says_so(caplog):
    """The checkpoint's boosting replaces the one the optimizer was given (the checkpoint wins): boosting turned on
    before loading a checkpoint saved without it went off silently."""
    model, plain, _ = _boosted_linear()
    plain.disable_boost()
    boosted = _boosted_linear()[1]
    boosted.enable_boost(cycle=12)
    for saved, message in [(plain, "saved without boost"), (boosted, "boost cycle 12 replaces 20")]:
        resumed = ElraOptimizer(model.parameters(), model)
        resumed.enable_boost(cycle=20)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="elra"):
            resumed.load_state_dict(saved.state_dict())
        assert [message in r.getMessage() for r in caplog.records] == [True]
        assert resumed.booster.enabled == saved.booster.enabled
    with pytest.raises(ValueError, match="restart_boost"):  # the advice for a cycle shorter than the mean's points
        resumed.enable_boost(cycle=2)
    assert "after optimizer.restart_boost()" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="elra"):
        ElraOptimizer(model.parameters(), model).load_state_dict(boosted.state_dict())
    assert not caplog.records
