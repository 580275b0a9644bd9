"""``LineController``'s batch growth and validation-driven weight decay, fed plain numbers."""

from __future__ import annotations

import math

import pytest

from elra.control import MAX_MULTIPLIER
from elra.line_control import GAIN, LineController, LineSums

SUMS = LineSums(next_dir=0.0, mom_dir=1.0, dir_sq=1.0, param_sq=1.0)  # a step at the line minimum
SPIKE = 2.0  # a loss far above losses near 1: refused (a retrace), with a usable gradient


def _refusals(count: int) -> list[float]:
    """``count`` refused losses, each followed by an accepted one (ten refusals in a row force an accept)."""
    return [SPIKE, 1.0] * count


def _controller(classes: int = 10, batch_size: int = 768, multiplier: int = 1) -> LineController:
    """With ``batch_size * multiplier >= STAT_LENGTH`` a statistics window is one 100-step cycle."""
    return LineController(1e-3, classes, batch_size, multiplier)


def _feed(controller: LineController, losses) -> list[int]:
    """Real steps of one micro-batch loss each (nan: no gradient); the multiplier after each."""
    trace = []
    for loss in losses:
        n = controller.state.multiplier
        usable = math.isfinite(loss)
        controller.real_step([loss] * n, SUMS if usable else None, [0.0])
        trace.append(controller.state.multiplier)
    return trace


def _flat(steps: int) -> list[float]:
    return [1.0 - 0.01 * (-1) ** k for k in range(steps)]  # mini-batch noise around a constant


def _windows(means: list[float]) -> list[float]:
    """Noisy losses whose windows (of one cycle) have these means.

    A cycle's last step opens the next window, so the first window holds 99 losses.
    """
    return [m - 0.01 * (-1) ** k for i, m in enumerate(means) for k in range(99 if i == 0 else 100)]


def test_a_stalled_loss_doubles_the_micro_batches_after_six_windows_and_an_improving_one_does_not():
    stalled = _controller()
    trace = _feed(stalled, _flat(1500))
    # window 1 (steps 1-99, closed at step 100) sets the best; the next six only tie it
    assert trace[698] == 1 and trace[699] == 2  # step 700 closes the sixth stalled window
    assert trace[1298] == 2 and trace[1299] == 4 and set(trace) == {1, 2, 4}  # again, windows of 100 steps at m=2
    improving = _controller()
    assert set(_feed(improving, [1.0 / (1.0 + 0.01 * k) for k in range(1500)])) == {1}


def test_the_window_scales_with_the_samples_of_a_real_step():
    # 8 samples a micro-batch: 96 cycles a window, so 1500 stalled steps close no window
    assert set(_feed(_controller(batch_size=8), _flat(1500))) == {1}
    # 384 samples: windows of 2 cycles; the sixth stalled window closes at step 1400
    trace = _feed(_controller(batch_size=384), _flat(1500))
    assert trace[1398] == 1 and trace[1399] == 2


def test_a_falling_trend_forgives_a_stall():
    # five windows above the best, but falling: the best moves up to them, and the next beats it
    falling = _controller()
    assert set(_feed(falling, _windows([1.0, 1.02, 1.015, 1.01, 1.005, 1.003, 1.001, 1.001]))) == {1}
    assert falling.state.retraces == 0 and falling.state.stalled_windows == 0
    flat = _controller()  # the same first stall without the fall grows when the sixth window closes
    trace = _feed(flat, _windows([1.0] + [1.02] * 7))
    assert flat.state.retraces == 0 and trace[698] == 1 and trace[699] == 2


def test_the_noise_free_regime_never_grows():
    deterministic = _controller(classes=0)
    assert set(_feed(deterministic, _flat(1500) + [SPIKE + k for k in range(60)])) == {1}  # each one a rise
    assert deterministic.state.retraces >= 40


@pytest.mark.parametrize("start, grown", [(1, 2), (3, 6), (4000, MAX_MULTIPLIER), (MAX_MULTIPLIER, MAX_MULTIPLIER)])
def test_the_25th_refused_loss_of_a_cycle_doubles_the_micro_batches(start, grown):
    controller = _controller(batch_size=8, multiplier=start)
    trace = _feed(controller, [1.0] * 20 + _refusals(24))
    assert set(trace) == {start} and controller.state.retraces == 24  # 24 retraces in the cycle
    trace = _feed(controller, [SPIKE])
    assert trace == [grown]
    # a new cycle starts the count again: 24 more (at steps 101-148) do not double
    _feed(controller, [1.0] * (100 - controller.state.steps))
    assert controller.state.steps == 100
    assert set(_feed(controller, _refusals(24))) == {grown}


def test_faults_are_retraced_but_never_double_the_micro_batches():
    """A non-finite loss or gradient says nothing of the mini-batch noise; counted, faults grew the batch without
    end, since a real step of more micro-batches meets more of them. 25 faults and 24 refusals in one cycle do not
    double; the 25th refusal does, as without the faults."""
    controller = _controller(batch_size=8)
    trace = _feed(controller, [1.0] * 20 + [math.nan] * 25 + [1.0] + _refusals(24))
    assert set(trace) == {1} and controller.state.retraces == 49 and controller.state.steps == 94
    assert _feed(controller, [SPIKE]) == [2]


def test_weight_decay_grows_with_the_validation_lag_up_to_its_cap():
    controller = _controller()
    assert controller.weight_decays([0.1, 0.0]) == [0.1, 0.0]  # nothing reported yet
    controller.set_train_loss(1.0)
    assert controller.weight_decays([0.1, 0.0]) == [0.1, 0.0]  # only one of them
    controller.set_valid_loss(0.8)
    assert controller.weight_decays([0.1, 0.0]) == [0.1, 0.0]  # valid <= train: the configured decay
    controller.set_valid_loss(2.5)  # lag sqrt(2*2.5/1 - 1) = 2
    assert controller.weight_decays([0.1, 0.0]) == [0.1 * 2.0, 0.0]
    decision = controller.real_step([1.0], SUMS, [0.1, 0.0])
    assert decision.decay == (1.0 - decision.step * 0.2, 1.0)  # the step uses the decay in force
    controller.set_valid_loss(100.0)  # lag sqrt(199) = 14.1: capped at 3 with one micro-batch
    assert controller.weight_decays([0.1]) == [0.1 * 3.0]
    controller.state.multiplier = 8  # a larger batch takes fewer steps per sample: a larger cap
    assert controller.weight_decays([0.1]) == [pytest.approx(0.1 * 3.0 * 8**0.666)]
    controller.set_train_loss(-1.0)  # the lag is defined for positive losses only
    assert controller.weight_decays([0.1]) == [0.1]


def test_a_resumed_controller_grows_at_the_same_step():
    losses = _flat(900) + _refusals(30) + _flat(600)
    uninterrupted = _controller()
    expected = _feed(uninterrupted, losses)
    first = _controller()
    trace = _feed(first, losses[:650])  # mid-window, five stalled windows behind
    assert first.state.stalled_windows == 5 and first.state.window_steps > 0
    resumed = _controller()
    resumed.load_state_dict(first.state_dict())
    trace += _feed(resumed, losses[650:])
    assert trace == expected and set(trace) == {1, 2, 4, 8}  # windows at 700 and 1500, a retrace storm at 949
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_a_state_saved_before_batch_growth_and_regime_detection_still_loads():
    controller = _controller()
    _feed(controller, _flat(50))
    later = ("window", "best", "stalled", "cycle", "noise_free", "probe", "param_peak")
    old = {k: v for k, v in controller.state_dict().items() if not k.startswith(later)}
    fresh = _controller()
    fresh.load_state_dict(old)
    assert fresh.state.steps == 50 and fresh.state.window_steps == 0 and fresh.state.best_mean is None
    assert fresh.state.param_peak == 0.0 < controller.state.param_peak  # the next accepted point sets it
    assert fresh.regime == controller.regime == "stochastic"  # the given regime (classes) stays
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({k: v for k, v in old.items() if k != "eta"})


def test_the_step_clip_is_relative_to_the_parameter_norm_floored_at_a_tenth_of_its_largest():
    controller = LineController(0.5, 1, 1, 1)  # noise-free
    controller.real_step([4.0], LineSums(0.0, 0.0, 0.0, 1.0), [0.0])  # the probe step
    no_curvature = dict(next_dir=1.0, mom_dir=1.0)  # r = 1: eta grows by exp(NOISE_FREE_GAIN) a step
    controller.real_step([3.0], LineSums(**no_curvature, dir_sq=1.0, param_sq=100.0), [0.0])  # |x| = 10
    controller.real_step([2.0], LineSums(**no_curvature, dir_sq=1e-2, param_sq=1e-6), [0.0])  # near the origin
    assert controller.state.eta == pytest.approx(0.5 * math.exp(0.6))  # under 0.1 * max(|x|, 1) / |u| = 1
    controller.real_step([1.0], LineSums(**no_curvature, dir_sq=1e4, param_sq=1e-6), [0.0])
    assert controller.state.eta == pytest.approx(0.1 * 1.0 / 100.0)
    controller.real_step([0.5], LineSums(**no_curvature, dir_sq=1e4, param_sq=0.0625), [0.0])
    assert controller.state.eta == pytest.approx(0.1 * 1.0 / 100.0)  # |x| = 0.25 is under the floor
    controller.real_step([0.25], LineSums(**no_curvature, dir_sq=1e10, param_sq=1e4), [0.0])
    assert controller.state.eta == pytest.approx(0.1 * 100.0 / 1e5)  # relative to |x| above it


def test_the_step_length_bounds_never_lift_it_above_the_clip_nor_stop_it_under_it():
    """The bounds were absolute: a length under 1e-12 (a tiny lr, or the clip near a tiny optimum) was lifted to
    1e-12, and the growth stopped at 1e6, however large the parameters (see the optimizer-level test)."""
    tiny = LineController(1e-21, 1, 1, 1)  # noise-free
    tiny.real_step([4.0], LineSums(0.0, 0.0, 0.0, 1e-32), [0.0])  # the probe step
    assert tiny.state.eta == 1e-21
    tiny.real_step([3.0], LineSums(1.0, 1.0, 1.0, 1e-32), [0.0])  # r = 1, |x| = 1e-16: the clip allows 1e-17
    assert tiny.state.eta == pytest.approx(1e-21 * math.exp(0.3))
    for loss in (2.0, 1.0, 0.5):
        tiny.real_step([loss], LineSums(1.0, 1.0, 1e10, 1e-32), [0.0])
    assert tiny.state.eta == pytest.approx(1e-22)  # 0.1 * 1e-16 / 1e5
    large = LineController(1.0, 1, 1, 1)
    large.real_step([4.0], LineSums(0.0, 0.0, 0.0, 1e40), [0.0])
    for k in range(60):
        large.real_step([3.0 - k / 30], LineSums(1.0, 1.0, 1.0, 1e40), [0.0])
    assert large.state.eta == pytest.approx(math.exp(0.3 * 60))  # 6.6e7, under the clip's 1e19


@pytest.mark.parametrize(
    "probe, slope_ratio, residual, regime",
    [
        (1e-5, 0.9999, 1e-6, "deterministic"),  # a tiny step on a smooth function
        (1e-2, 0.5, 1e-6, "deterministic"),  # a long probe: half the slope gone to curvature, still one function
        (1e-5, 0.83, 2e-3, "stochastic"),  # a transformer at initialisation: within half the change, not the curvature
    ],
)
def test_regime_measures_the_trapezoid_against_its_curvature_term(probe, slope_ratio, residual, regime):
    controller = LineController(probe, None, 32, 1)
    controller.real_step([4.6], LineSums(0.0, 0.0, 0.0, 1.0), [0.0])  # the probe step
    d = 800.0
    n = slope_ratio * d
    predicted = 4.6 - 0.5 * probe * (d + n)
    controller.real_step([predicted + residual], LineSums(n, d, 1.0, 1.0), [0.0])
    assert controller.regime == regime


@pytest.mark.parametrize(
    "slope_ratio, miss, regime",
    [
        (0.5, 1.0, "stochastic"),  # zero logits: each batch costs log(10), the probe moved batch 1's along its slope
        (0.9999, 0.0, "deterministic"),  # a smooth function, its curvature part below the losses' rounding
        (0.95, 0.0, "deterministic"),  # a longer probe: the pair changed by 5%, the trapezoid holds
        (0.985, 1.58, "deterministic"),  # a float32 fit resumed near its optimum: 1.5%, a miss of float32 rounding
    ],
)
def test_a_probe_pair_changed_beyond_a_tiny_steps_curvature_is_noise_the_losses_cannot_show(slope_ratio, miss, regime):
    """The probe's trapezoid test allows the losses' rounding (1e-5 of the loss), which here exceeds the whole
    curvature part of the change; where the pair changed by more than 2% the miss (in curvature parts) is
    measured against that part and a float32 loss's rounding."""
    controller = LineController(1e-5, None, 32, 1)
    start = math.log(10.0)
    controller.real_step([start], LineSums(0.0, 0.0, 0.0, 1.0), [0.0])  # the probe step
    d = 5.0
    n = slope_ratio * d
    curvature_part = 0.5 * 1e-5 * (d - n)
    loss = start - 0.5 * 1e-5 * (d + n) + miss * curvature_part
    controller.real_step([loss], LineSums(n, d, 1.0, 1.0), [0.0])
    assert controller.regime == regime


def test_the_signal_share_tells_a_steady_gradient_from_noise():
    """|m|^2/|g|^2 is 1 for a steady gradient and (1-beta)/(1+beta) for independent noise; 0 without momentum."""
    floor = 0.1 / 1.9
    for mom_sq, share in ((4.0, 1.0), (4.0 * floor, 0.0), (4.0 * (floor + 1.0) / 2, 0.5), (0.0, 0.0)):
        controller = LineController(1e-3, None, 32, 1)
        assert controller.signal_share(LineSums(0.0, 1.0, 1.0, 1.0, grad_sq=4.0, mom_sq=mom_sq)) == pytest.approx(share)
    without_momentum = LineController(1e-3, None, 32, 1, beta=0.0)
    assert without_momentum.signal_share(LineSums(0.0, 1.0, 1.0, 1.0, grad_sq=4.0, mom_sq=4.0)) == 0.0


def _settled_length(classes: int, share: float) -> float:
    """The step length a controller settles at where the pair ratio falls linearly from the momentum's signal
    share f_m at a short step to 0 at length 1 (the line minimum), for a gradient of signal share ``share``."""
    controller = LineController(1e-3, classes, 32, 1)
    rho = (1.0 - controller.beta1) / (1.0 + controller.beta1)
    in_momentum = share / (share + (1.0 - share) * rho)
    mom_sq = 4.0 * (rho + (1.0 - rho) * share)  # the |m|^2 of a gradient (|g|^2 = 4) of that share
    for _ in range(3000):
        ratio = in_momentum * (1.0 - controller.state.eta)
        controller.real_step([1.0], LineSums(ratio, 1.0, 1.0, 1e6, grad_sq=4.0, mom_sq=mom_sq), [0.0])
    return controller.state.eta


def test_where_noise_dominates_the_mini_batch_step_settles_short_of_the_line_minimum(monkeypatch):
    """Halfway down from the short-step ratio f_m (the target 0.5*f_m*(1-S)^10 + S*target): at S = 0.01
    about 0.55 of the line minimum; with signal dominating, and without noise, at the line minimum (a little
    past it: the target -0.1*S)."""
    share = 0.01
    in_momentum = share / (share + (1.0 - share) * 0.1 / 1.9)
    expected = 1.0 - (0.5 * in_momentum * (1.0 - share) ** 10 - 0.1 * share) / in_momentum
    assert _settled_length(10, share) == pytest.approx(expected, rel=1e-3) and expected < 0.6
    assert _settled_length(10, 0.9) == pytest.approx(1.0 + 0.1 * 0.9 / (0.9 / (0.9 + 0.1 * 0.1 / 1.9)), rel=1e-3)
    assert _settled_length(0, share) == pytest.approx(1.0 + 0.1 * share / (share / (share + 0.99 * 0.05 / 1.95)), rel=1e-3)
    monkeypatch.setattr("elra.line_control.NOISE_TARGET", 0.0)
    assert _settled_length(10, share) == pytest.approx(1.0 + 0.1 * share / in_momentum, rel=1e-3)


def _noise_free_after_one_step(lr: float = 0.5) -> LineController:
    """A noise-free controller whose first step (length ``lr``) was accepted at loss 1."""
    controller = LineController(lr, 0, 1, 1)
    assert controller.real_step([1.0], LineSums(0.0, 0.0, 1.0, 1.0), [0.0]).action == "accept"
    return controller


def test_a_step_that_went_uphill_is_undone_and_restarts_the_momentum():
    """On a quadratic the slope at the start of the failed step is ``2*rise/eta + N``: here 2*0.5/0.5 - 1.5 = 0.5
    uphill (shorter retraces along it only spent evaluations); back at the start, the next step restarts."""
    controller = _noise_free_after_one_step()
    length = controller.step_length
    pair = (controller.state.ema_next, controller.state.ema_mom)
    decision = controller.real_step([1.5], LineSums(-1.5, 1.0, 1.0, 1.0), [0.0])
    assert decision.action == "retrace" and decision.shift == length  # all the way back
    assert controller.state.restart and controller.state.restarts == 1
    assert controller.step_length == length  # what the restarted step starts from, not the 0 offset of the point
    decision = controller.real_step([1.0 + 1e-12], LineSums(0.2, 3.0, 1.0, 1.0), [0.0])  # x_old, to rounding
    assert decision.action == "accept" and decision.restart and decision.step == length
    assert (controller.state.ema_next, controller.state.ema_mom) == pair  # that pair measured the abandoned direction
    assert not controller.state.restart and not controller.real_step([0.5], SUMS, [0.0]).restart


def test_a_restarts_own_step_that_rises_shrinks_and_never_restarts_again():
    """The restart's step is along ``m_hat = g``: downhill. Where it rises all the same (a kink, a 16-bit step
    rounding) the slope estimate is wrong; restarting again would retake the same step from the same point with
    the same length, for ever. It retraces by shrinking, as any step too long, until a step is accepted."""
    controller = _noise_free_after_one_step()
    length = controller.step_length
    controller.real_step([1.5], LineSums(-1.5, 1.0, 1.0, 1.0), [0.0])  # uphill: back, restart pending
    assert controller.real_step([1.0], LineSums(0.2, 3.0, 1.0, 1.0), [0.0]).restart  # the restart's step
    uphill_again = LineSums(-1.5, 1.0, 1.0, 1.0)  # measured as uphill as the first one
    for _ in range(2):
        decision = controller.real_step([1.5], uphill_again, [0.0])
        assert decision.action == "retrace" and 0.0 < decision.shift < length and not controller.state.restart
    assert controller.state.restarts == 1
    assert controller.real_step([0.9], SUMS, [0.0]).action == "accept"
    decision = controller.real_step([1.5], uphill_again, [0.0])  # an ordinary step may restart again
    assert controller.state.restart and controller.state.restarts == 2 and decision.shift == controller.step_length


@pytest.mark.parametrize(
    "loss, next_dir, action",
    [
        (1.5, -2.5, "retrace"),  # slope 2*0.5/0.5 - 2.5 < 0: downhill from x_old, too long: a shorter retrace
        (1.5, -1.5, "restart"),
        (1.0 + 1e-7, 1.0, "accept"),  # a rise within rounding of the loss says nothing
        (1.0 + 1e-5, 1.0, "restart"),
    ],
)
def test_only_a_step_measured_uphill_restarts_and_a_rise_within_rounding_is_accepted(loss, next_dir, action):
    controller = _noise_free_after_one_step()
    decision = controller.real_step([loss], LineSums(next_dir, 1.0, 1.0, 1.0), [0.0])
    assert decision.action == ("accept" if action == "accept" else "retrace")
    assert controller.state.restart == (action == "restart") and (decision.shift == 0.5) == (action == "restart")


def test_mini_batch_noise_never_restarts_and_keeps_beta1_09():
    controller = LineController(0.5, 10, 1, 1)
    for loss in [1.0] * 12 + [100.0]:  # the outlier is retraced
        decision = controller.real_step([loss], LineSums(-1.5, 1.0, 1.0, 1.0), [0.0])
    assert decision.action == "retrace" and decision.shift < 0.5 and not controller.state.restart
    assert controller.beta1 == 0.9


@pytest.mark.parametrize("classes, beta, beta1", [(0, None, 0.95), (10, None, 0.9), (None, None, 0.9), (0, 0.5, 0.5)])
def test_beta1_is_the_given_one_else_the_regimes(classes, beta, beta1):
    assert LineController(1e-3, classes, 1, 1, beta=beta).beta1 == beta1


def _loss_mean_and_spread(controller: LineController) -> tuple[float, float]:
    s = controller.state
    mean = s.loss_mean / s.loss_weight
    return mean, math.sqrt(max(s.loss_sq / s.loss_weight - mean * mean, 0.0))


def _refusal_cap(controller: LineController) -> float:
    mean, spread = _loss_mean_and_spread(controller)
    return mean + 5.0 * spread


def test_one_wild_low_loss_leaves_the_mini_batch_refusal_in_place():
    """One loss of -1e6 entered the statistics as it came: the deviation grew to ~1e5 and no step was refused for
    thousands of steps (on the digits MLP the cap went from 1.18 to 6.7e5, and was 3.9 1700 steps later)."""
    undisturbed, disturbed = _controller(), _controller()
    losses = _flat(300)
    _feed(undisturbed, losses)
    _feed(disturbed, losses[:150])
    assert disturbed.real_step([-1e6], SUMS, [0.0]).action != "retrace"  # a low loss is no reason to refuse
    _feed(disturbed, losses[151:])
    cap, normal = _refusal_cap(disturbed), _refusal_cap(undisturbed)
    assert normal < cap < normal + 0.1  # 150 steps on; a step well above the noise is refused again
    assert disturbed.real_step([cap + 0.01], SUMS, [0.0]).action == "retrace"
    noise_free = LineController(1e-3, 1, 768, 1)  # a noise-free loss is the function's value: it enters as it is
    _feed(noise_free, [1.0] * 20 + [-1e6])
    assert _loss_mean_and_spread(noise_free)[0] < -1e4


@pytest.mark.parametrize("loss", [0.1, 0.2, 2.5, 5.0])
def test_a_loss_equal_to_every_accepted_one_is_never_refused(loss):
    """With identical mini-batch losses (a flat or clamped loss) the spread is 0 and the EMA mean rounds a little
    below the loss itself (0.1: 45 of 60 steps refused, and the micro-batches doubled)."""
    controller = _controller()
    actions = [controller.real_step([loss], SUMS, [0.0]).action for _ in range(60)]
    assert actions == ["accept"] * 60 and controller.state.multiplier == 1
    assert controller.real_step([loss * 1.01], SUMS, [0.0]).action == "retrace"  # above it is still refused


def test_noisy_losses_after_identical_ones_teach_the_statistics_their_spread():
    """After identical losses (a frozen model's: spread 0) the floor of an accepted loss was the mean itself: every
    lower loss entered as the mean, the spread stayed 0, and every loss above it was refused (30 of 60, the
    micro-batches doubled). A lower loss now enters as it is, and the refusals stop after the first."""
    controller = _controller()
    _feed(controller, [0.5] * 30)
    noisy = [0.5 - 0.05 * (-1) ** k for k in range(60)]
    actions = [controller.real_step([loss], SUMS, [0.0]).action for loss in noisy]
    assert actions.count("retrace") <= 1 and controller.state.multiplier == 1
    assert _loss_mean_and_spread(controller)[1] == pytest.approx(0.05, rel=0.2)


@pytest.mark.parametrize("level, rise", [(0.0, 0.01), (2.0, 2.01)])
def test_refusals_by_stale_statistics_end_after_ten_in_a_row(level, rise):
    """Identical mini-batch losses (20 of exactly 0: a loss weight ramped from 0) leave the statistics no deviation;
    every higher loss was then refused for ever, eta fell to its floor and the micro-batches doubled."""
    controller = _controller()
    _feed(controller, [level] * 20)
    actions = [controller.real_step([rise], SUMS, [0.0]).action for _ in range(30)]
    assert actions[:10] == ["retrace"] * 10 and actions[10] == "accept"
    assert actions.count("retrace") < 15 and controller.state.multiplier == 1
    reference = _controller()  # what the statistics would be without the first losses: the rise is their level
    _feed(reference, [rise] * 30)
    assert controller.step_length == pytest.approx(reference.step_length, rel=0.5)


def test_one_wild_low_loss_does_not_double_the_micro_batches():
    """The window mean took the loss as it came: -1e6 at step 151 made its window's mean -1e4, no later window beat
    it, and the sixth stalled window (step 800) doubled the micro-batches of a run whose loss was still falling."""
    losses = [1.0 / (1.0 + 0.01 * k) - 0.01 * (-1) ** k for k in range(1500)]
    undisturbed, disturbed = _controller(), _controller()
    assert set(_feed(undisturbed, losses)) == {1}
    _feed(disturbed, losses[:150])
    assert disturbed.real_step([-1e6], SUMS, [0.0]).action == "accept"
    assert set(_feed(disturbed, losses[151:])) == {1}
    assert disturbed.state.best_mean == pytest.approx(undisturbed.state.best_mean, rel=1e-3)


def test_losses_beyond_the_square_range_are_judged_as_the_same_losses_scaled_down():
    """The accepted-loss statistics summed the squares of the losses: above 1.3e154 they were inf, the spread
    sqrt(inf - inf) nan, and every step after the warmup was refused (ten in a row, then one forced accept) while
    the micro-batches doubled. The squares are now of the losses scaled by a power of two: losses 2^520 and
    2^1000 times those of a run near 1 take its decisions exactly, with its statistics times that power."""

    def run(exponent):
        controller = _controller()
        losses = [math.ldexp(loss + (3.0 if k % 37 == 36 else 0.0), exponent) for k, loss in enumerate(_flat(300))]
        decisions = [controller.real_step([loss], SUMS, [0.0]) for loss in losses]
        return decisions, controller

    decisions, plain = run(0)
    assert 5 <= [d.action for d in decisions].count("retrace") <= 10  # the spikes after the warmup, no more
    mean, spread = plain._loss_statistics()
    for exponent in (520, 1000):
        scaled_decisions, scaled = run(exponent)
        assert scaled_decisions == decisions and scaled.state.multiplier == plain.state.multiplier == 1
        assert scaled._loss_statistics() == (math.ldexp(mean, exponent), math.ldexp(spread, exponent))


def _steady(controller: LineController, steps: int, ratio: float, micro_batches: int = 1, signal: bool = False) -> list[float]:
    """Accepted mini-batch steps whose pair has ``N/D = ratio``, their gradients noise (or all ``signal``);
    eta after each."""
    etas = []
    for k in range(steps):
        sums = LineSums(next_dir=ratio, mom_dir=1.0, dir_sq=1e-12, param_sq=1.0, grad_sq=1.0, mom_sq=float(signal))
        controller.real_step([1.0 - 0.01 * (-1) ** k] * micro_batches, sums, [0.0])
        etas.append(controller.state.eta)
    return etas


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_step_budget_cools_the_step_length_down_over_its_last_fifth_of_micro_batches(micro_batches):
    budget = LineController(1e-3, 10, 32, micro_batches, total_steps=100 * micro_batches)
    free = LineController(1e-3, 10, 32, micro_batches)
    before = _steady(budget, 80, 0.5, micro_batches)
    assert before == _steady(free, 80, 0.5, micro_batches) and before[-1] > before[40]  # the pairs grow eta
    top = before[-1]
    # in the cooldown the pairs move nothing (r = 1 would grow eta); real step k takes top * (100 - k) / 20
    cooling = _steady(budget, 30, 1.0, micro_batches)
    assert cooling[:19] == pytest.approx([top * (19 - k) / 20 for k in range(19)])
    assert cooling[19:] == pytest.approx([top * 0.02] * 11)  # the floor, at the budget's end and past it
    assert budget.state.micro_steps == 110 * micro_batches


def test_a_step_budget_leaves_noise_free_steps_to_the_pairs():
    budget, free = LineController(1e-3, 0, 32, 1, total_steps=50), LineController(1e-3, 0, 32, 1)
    assert _steady(budget, 80, 0.5) == _steady(free, 80, 0.5)


def test_a_refused_step_in_the_cooldown_retraces_and_the_next_accept_takes_the_cooldowns_length():
    controller = LineController(1e-3, 10, 32, 1, total_steps=100)
    top = _steady(controller, 85, 0.5)[79]
    sums = LineSums(next_dir=0.5, mom_dir=1.0, dir_sq=1e-12, param_sq=1.0, grad_sq=1.0, mom_sq=0.0)
    assert controller.real_step([1e6], sums, [0.0]).action == "retrace"  # micro-step 86
    assert controller.real_step([1.0], sums, [0.0]).action == "accept"  # micro-step 87
    assert controller.state.eta == pytest.approx(top * 13 / 20)


@pytest.mark.parametrize("new_budget", [200, None])
def test_a_budget_extended_or_dropped_in_its_cooldown_gives_the_step_length_back(new_budget):
    controller = LineController(1e-3, 10, 32, 1, total_steps=100)
    top = _steady(controller, 80, 0.5)[-1]
    assert _steady(controller, 10, 0.5)[-1] == pytest.approx(top * 10 / 20)  # cooling
    controller.total_steps = new_budget
    eta = _steady(controller, 1, 0.5)[0]  # one pair's move from top (at most a factor exp(GAIN)), not from top / 2
    assert top * math.exp(-GAIN) <= eta <= top * math.exp(GAIN) and controller.state.cooldown_eta == 0.0


def test_a_cooldown_waits_for_noise_to_dominate_and_falls_from_there_to_the_budgets_end():
    """Budget 200: gradients all signal over micro-steps 151-170 keep the pairs moving eta in the window (from
    161); once the smoothed share is down to COOLDOWN_SIGNAL the fall starts, linear from the length reached to
    the floor at 200; a state saved in the fall resumes it exactly."""
    controller, free = LineController(1e-3, 10, 32, 1, total_steps=200), LineController(1e-3, 10, 32, 1)
    for steps, signal in ((150, False), (20, True)):
        assert _steady(controller, steps, 0.5, signal=signal) == _steady(free, steps, 0.5, signal=signal)
    assert controller.state.cooldown_eta == 0.0 and controller.state.cooldown_from == 170
    while True:
        reached = free.state.eta
        first = _steady(controller, 1, 0.5)
        if controller.state.cooldown_eta:
            break
        assert first == _steady(free, 1, 0.5)
    start, top = controller.state.cooldown_from, controller.state.cooldown_eta
    assert 175 < start < 195 and top == reached and controller.state.micro_steps == start + 1
    saved = controller.state_dict()
    falling = first + _steady(controller, 205 - controller.state.micro_steps, 0.5)
    clock = range(start + 1, 206)
    assert falling == pytest.approx([top * max((200 - t) / (200 - start), 0.02) for t in clock])
    resumed = LineController(1e-3, 10, 32, 1, total_steps=200)
    resumed.load_state_dict(saved)
    assert _steady(resumed, len(falling) - 1, 0.5) == falling[1:]


def test_a_cooldown_never_starts_while_the_gradients_stay_signal():
    controller, free = LineController(1e-3, 10, 32, 1, total_steps=100), LineController(1e-3, 10, 32, 1)
    assert _steady(controller, 110, 0.5, signal=True) == _steady(free, 110, 0.5, signal=True)
    assert controller.state.cooldown_eta == 0.0
