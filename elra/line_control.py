"""Step-length control along a preconditioned direction (``preconditioner="muon"``, ``"adam"``, ``"factored"``).

Plain Python numbers in, one :class:`LineDecision` out, like
:mod:`elra.control`, whose P2M rule assumes raw-gradient scale (its step clip,
rate ladder and schedule). Over a preconditioned direction ``u`` the step is
``x <- x - eta*u`` and ``eta`` is the only step length, set by ELRA's
gradient pair measured in the direction's metric:

    N = <g_next, u>   (the next gradient, at the new point, along the old step)
    D = <m_hat, u>    (> 0: the slope the step was taken on)

``r = N/D`` is 1 when the step saw no curvature, 0 at the line minimum and
negative after an overshoot; it is invariant to rescaling the loss or the
direction, and the step clip is relative to ``|x|``, so the step length needs
no constant of the problem's scale (the direction's ``eps`` still sees the
gradients' scale). ``eta`` is
multiplied by ``exp(GAIN*clip(r_bar - S*target, -1, 1))`` with ``r_bar`` the
ratio of the smoothed N and D: it settles at ``r = S*target``. The greedy
line minimum (target 0) is short-sighted on the benchmark transformer, but
where mini-batch noise dominates D, r stays near 0 whatever eta is and a
negative target grows eta to the clip (-0.1 and -0.3 diverged on the MLP
char-LMs). Without noise the pair is exact and ``eta`` follows it faster
(``NOISE_FREE_GAIN`` 0.3, ``NOISE_FREE_SMOOTHING`` 0.7 instead of 0.1 and
0.95). ``S`` (:meth:`LineController.signal_share`, from the smoothed
``|m|^2/|g|^2``) is the share of signal in the gradient: about 1 early in
training, about 0 once noise dominates, so the default target -0.1 acts
where r responds to eta (transformer 1.293 -> 1.262 held-out bits/char over
the muon direction with N and D smoothed over 0.9, the other benchmark tasks
within noise). In the mini-batch regime, where noise dominates the gradient, the line minimum is
too far and the target rises toward half the short-step ratio (:meth:`LineController.settling_ratio`).
The regime is detected at the second real step (see
:meth:`LineController._choose_regime`); a detected noise-free regime turns
stochastic where the steps after restarts show noise. A failed step is retraced along the unchanged old
direction (recomputed from the unchanged moments): noise-free problems
retrace when the loss rises and refit ``eta`` on the parabola through the
two losses (after MAX_RETRACES in a row the step is accepted with the last
accepted length); where the pair shows that the step went uphill from its
start, no length helps: the step is undone and the momentum restarts from
the gradient there (:meth:`LineController._went_uphill`). With these
restarts noise-free problems carry more momentum (``NOISE_FREE_BETA1``
0.95 instead of ``BETA1`` 0.9 where none is given). Mini-batch problems
retrace when the loss is not finite or far above the running statistics of
accepted losses (after MAX_REFUSALS such refusals in a row the step is
accepted: the statistics are stale, not the step).

Batch growth and the weight-decay control are P2M's (:mod:`elra.control`),
on the same clock: every ``CYCLE`` real steps (retraces included) a cycle
ends, and a window of ``window_length`` real steps (about ``STAT_LENGTH``
samples per cycle) closes at the first cycle end that completes it. A window
whose mean accepted loss does not beat the best window mean counts as
stalled; after six in a row (forgiven at five by a falling trend) the number
of micro-batches per real step doubles, as it does at every 25th refused loss
of a cycle (a fault, a non-finite loss or gradient, is retraced but not
counted there). Mini-batch problems only: a noise-free loss gains nothing from more
micro-batches. Unlike P2M the multiplier keeps no separate re-baselining
phase: a grown batch is judged against the best mean so far, which the
window that grew it set. The decoupled decay of each group is its configured
``weight_decay`` times :func:`elra.control.validation_lag` of the last
training and validation losses the user reported (1 until both are known).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Sequence

from .control import (
    CYCLE,
    LOSS_PRECISION,
    PROBE_TOLERANCE,
    RETRACES_PER_DOUBLING,
    check_progress,
    doubled,
    mean_loss,
    validation_lag,
    window_length,
)

logger = logging.getLogger("elra")

GAIN = 0.1  # mini-batch regime: eta changes by at most exp(GAIN) per accepted step
PAIR_SMOOTHING = 0.95  # EMA factor of N and D (transformer 1.262 -> 1.227 bits/char against 0.9; 0.97 ran away)
SHARE_SMOOTHING = 0.9  # EMA factor of |g|^2 and |m|^2 (the signal share)
# noise-free: the gradient pair is exact, so eta follows it faster (full-batch benchmarks, see docs/method.md)
NOISE_FREE_GAIN = 0.3
NOISE_FREE_SMOOTHING = 0.7
# |eta*u| <= RELATIVE_CLIP * max(|x|, CLIP_FLOOR * (the largest |x| of the accepted points so far)).
# Relative to |x| alone no step could cross the origin: a noise-free path through it stalled there.
# Near an optimum at 0 the bound relative to |x| is a good trust region; the floor keeps it elsewhere.
RELATIVE_CLIP = 0.1
CLIP_FLOOR = 0.1
LOSS_SMOOTHING = 0.98  # EMA factor of the accepted-loss statistics
LOSS_DEVIATIONS = 5.0  # mini-batch retrace above mean + this many standard deviations
LOSS_WARMUP = 10  # accepted steps before the statistics can reject a step
# an accepted mini-batch loss enters them at most this many deviations below their mean: one wild loss (-1e6
# from a buggy batch) would otherwise inflate the deviation and switch the refusal off for thousands of steps;
# the default's benchmark mini-batch runs never went below 5.8 (seeds 0-2), so they are unchanged
LOSS_FLOOR_DEVIATIONS = 2 * LOSS_DEVIATIONS
# ... and where the statistics saw no spread beyond rounding (identical losses: a frozen model's), deviations of this
# share of |mean|: the floor was the mean, every lower loss entered as the mean and the spread stayed 0, so each loss
# above it was refused (a tanh MLP after 30 such steps: 47 retraces, its batch doubled, mse 0.45 after 200 steps
# against 0.064). Only then: at any spread, 1% weakened the floor under a wild low loss where the noise is smaller
LOSS_FLOOR_SPREAD = 0.01
# eta is a length in parameter units: the relative clip, not these, bounds it where |x| and |u| are known. The floor
# keeps a long shrinking drift from reaching 0; it never lifts eta above the clip, nor a length already below it (a
# fit whose solution was ~1e-16 stepped 1e-12 a time and ran 5000x past it). The ceiling only keeps eta finite in
# float32 where nothing clips it (every point so far at 0); at 1e6 a fit whose coefficients were 1e10 never moved.
ETA_BOUNDS = (1e-12, 1e30)
SMALLEST_ETA = 1e-300  # a length below the floor stays positive, as the fused kernel's decay needs
BETA1 = 0.9  # the direction's momentum where none is given; noise-free problems get NOISE_FREE_BETA1
# full-batch digits CNN training loss 5.6e-6 instead of 9.9e-4, diabetes MLP 0.019 instead of 0.026, Rosenbrock
# 2e-26 instead of 7e-20 (docs/method.md); without the restarts (see _retrace) it cost Rosenbrock (2e-15) and a plain
# quadratic (1e-3 after 400 steps)
NOISE_FREE_BETA1 = 0.95
# a step budget (total_steps): its last COOLDOWN_SHARE of micro-batches take a step length falling linearly to
# COOLDOWN_FLOOR of the one reached, mini-batch regime only (docs/usage.md: benchmark against the budget not given)
COOLDOWN_SHARE = 0.2
COOLDOWN_FLOOR = 0.02
# the cooldown starts at the first accepted step of that window whose signal share is at most this: a run whose
# budget ends while its gradients are still mostly signal (the step length still climbing from its first probe)
# lost by cooling (digits MLP, 100 steps: 0.681 vs 0.728 accuracy at shares 0.24-0.28; MLP char-LM, 150 steps:
# 4.44 vs 3.68 bits/char at 0.48-0.64); those that gained started at 0.08 or less (docs/usage.md)
COOLDOWN_SIGNAL = 0.1
LINE_TARGET = -0.1  # the default target without noise (benchmarks/quality.py; see docs/method.md)
# mini-batch regime: where noise dominates the gradient, eta settles at this share of the short-step ratio
# instead of the line minimum (LineController.settling_ratio), faded by (1 - S)**NOISE_FADE: the term is a
# tenth of its size at S = 0.2. 0.8 stalled the wide regression's ramp (test mse 1.0 against 0.125), 0.3 left it
# at 0.19; fade 20 cost the transformer (seeds 0-1: 1.185 and 1.210 against 1.172 and 1.187 bits/char; docs/method.md)
NOISE_TARGET = 0.5
NOISE_FADE = 10
_TINY = 1e-300
# noise-free: a rise below this share of the loss is rounding (a float32 sum of 2000 squares moved by 1e-7 at
# the cubic fit's optimum; retracing it cut the step length 10x a time and stopped the fit 4e-4 short)
ROUNDING = 1e-6
MAX_RETRACES = 3  # noise-free: after this many retraces in a row, accept (the moments must turn)
# mini-batch: after this many refusals in a row, accept. The retraces have brought x within eta/1000 of the last
# accepted point, so the statistics, not the step, are wrong: after 20 losses of exactly 0 (spread 0, cap 0) every
# positive loss was refused for ever and the model never trained. The benchmark's digits runs refused at most 3 in a row
MAX_REFUSALS = 10
# the decoupled decay 1 - eta*wd of a step takes at most this share of a weight: eta grows past 1/wd where the
# weights are large against the direction (a fit's coefficients, ~1e3), and the factor turned negative there: the
# weights flipped sign and grew each step (a scalar fit at 1e5 with weight_decay=0.1 ended at 7.8e6)
MAX_DECAY = 0.5
# the accepted losses' squares are summed of losses scaled by a power of two to at most 2**SQUARE_RANGE: a loss
# above 1.3e154 squared to inf, and every step after it was refused (mean^2 inf too: inf - inf is nan)
SQUARE_RANGE = 500
# the probe's gradient pair: a tiny step changes an exact gradient along it by little (the benchmark's noise-free
# tasks: at most 9e-4 of D at lr 1e-5). Where it changed by more than PAIR_NOISE of D, the trapezoid's miss is
# measured against the curvature part plus a float32 loss's rounding (FINE_ROUNDING of it), not the 1e-5 allowance,
# which hid mini-batch noise as large as the whole curvature part: zero-initialised classifiers give every batch the
# loss log(classes), pairs that changed by 0.07-0.8 missed by about their curvature part, were taken for
# noise-free, and the retraces cut the step length to its floor (the model stayed at chance). Noise-free pairs that
# changed by more (lr 1e-3: up to 0.075) missed by at most 0.074 of it; float32 fits resumed near their optimum
# changed by 1.1-1.7% at lr 1e-6..1e-5, their losses' rounding a larger share (0.01: taken for mini-batches, 9x worse)
PAIR_NOISE = 0.02
FINE_ROUNDING = 2.0**-22
# detected noise-free regime: a restart's step (along m_hat = g, so D is the true slope) must meet the probe's
# trapezoid test; this many misses in a row (beyond rounding of the first loss too) switch to the stochastic regime
REDETECT_MISSES = 3


# fields added with batch growth and regime detection: a state saved before lacks them
_LATER_FIELDS = frozenset(
    {"window_steps", "window_accepted", "window_loss", "best_mean", "stalled_windows", "window_means", "cycle_retraces"}
    | {"noise_free", "probe_loss", "probe_length"}
    | {"ema_grad_sq", "ema_mom_sq"}
    | {"param_peak"}
    | {"restart", "restarts"}
    | {"from_restart"}
    | {"loss_exponent"}
    | {"noise_misses"}
    | {"micro_steps", "cooldown_eta"}
    | {"cooldown_from"}
)


def _bounded(eta: float, before: float) -> float:
    """``eta`` within ETA_BOUNDS, where the length ``before`` it was within them: one below the floor (a tiny
    ``lr``, a length the relative clip set) is never lifted to it, only kept positive."""
    return min(max(eta, ETA_BOUNDS[0] if before >= ETA_BOUNDS[0] else SMALLEST_ETA), ETA_BOUNDS[1])


def cooldown_factor(total_steps: int, taken: int, start: int = -1) -> float:
    """What a step budget of ``total_steps`` micro-batches multiplies the step length by after ``taken`` of them:
    1 before its last ``COOLDOWN_SHARE`` (or before micro-batch ``start``, when given), then falling linearly to
    ``COOLDOWN_FLOOR`` at the end, and that past it."""
    span = COOLDOWN_SHARE * total_steps if start < 0 else total_steps - start
    left = (total_steps - taken) / span if span > 0 else 0.0
    return 1.0 if left >= 1.0 else max(left, COOLDOWN_FLOOR)


def first_moment_factor(old_beta1: float, new_beta1: float) -> float:
    """What ``m_1 = (1-beta1)*g_1`` (one gradient so far) is multiplied by when beta1 changes."""
    return (1.0 - new_beta1) / (1.0 - old_beta1)


def _ema(average: float | None, value: float, keep: float) -> float:
    """``keep*average + (1-keep)*value``; ``value`` itself where there is no average yet (``None``)."""
    return value if average is None else keep * average + (1.0 - keep) * value


@dataclass
class LineSums:
    """Global sums of one real step (gradients already averaged over micro-batches).

    ``next_dir``: N = <g, u_old>; ``mom_dir``: D = <m_hat, u_old>; ``dir_sq``:
    |u_old|^2; ``param_sq``: |x|^2; ``grad_sq``: |g|^2 and ``mom_sq``: |m|^2
    (the momentum before it takes g, not bias corrected), whose ratio tells
    signal from noise (:meth:`LineController.signal_share`). ``next_dir`` is
    nan without a gradient.
    """

    next_dir: float
    mom_dir: float
    dir_sq: float
    param_sq: float
    grad_sq: float = 0.0
    mom_sq: float = 0.0

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in asdict(self).values())


@dataclass(frozen=True)
class LineDecision:
    """What the tensors must do.

    ``accept``: update the moments, then per group j ``x <- decay[j]*x - step*u_new``.
    ``retrace``: ``x <- x + shift*u_old`` (the decay of the last step stays:
    it needs no gradient and undoing it would need to know which parameters
    it touched). ``skip``: nothing.
    """

    action: str
    step: float = 0.0
    decay: tuple[float, ...] = ()
    shift: float = 0.0
    restart: bool = False


@dataclass
class LineState:
    eta: float
    multiplier: int
    noise_free: bool | None = None  # the regime: None until detected at the second real step
    probe_loss: float = 0.0  # the loss at the first point, and how far along u_0 the second lies
    probe_length: float = 0.0
    started: bool = False
    steps: int = 0
    retraces: int = 0
    failed: int = 0  # retraces since the last accepted step
    accepted_eta: float = 0.0  # eta of the last accepted step
    moment_steps: int = 0  # accepted steps: the moments' bias-correction count
    ema_next: float = 0.0
    ema_mom: float = 0.0
    ema_grad_sq: float | None = None  # EMAs of |g|^2 and |m|^2 (None before the first sample)
    ema_mom_sq: float | None = None
    param_peak: float = 0.0  # the largest |x|^2 of the accepted points so far: the step clip's floor
    restart: bool = False  # noise-free: the last step went uphill; back at its start (eta 0), the momentum restarts
    restarts: int = 0
    from_restart: bool = False  # the step under way was a restart's: along the gradient, it cannot restart again
    loss_mean: float = 0.0
    loss_sq: float = 0.0  # of the losses times 2**-loss_exponent: 0 unless they pass SQUARE_RANGE
    loss_weight: float = 0.0
    loss_exponent: int = 0
    accepted: int = 0
    last_good_loss: float = 0.0
    train_loss: float | None = None
    valid_loss: float | None = None
    # batch growth (P2M's windows and cycles): real steps, accepted losses and their sum in the open window
    window_steps: int = 0
    window_accepted: int = 0
    window_loss: float = 0.0
    best_mean: float | None = None  # the best window mean so far (None before the first window closes)
    stalled_windows: int = 0
    window_means: list[float] = field(default_factory=lambda: [0.0] * 6)
    cycle_retraces: int = 0
    noise_misses: int = 0  # detected noise-free regime: restart steps in a row that missed the trapezoid
    micro_steps: int = 0  # micro-batches of the real steps so far: the clock of a step budget's cooldown
    cooldown_eta: float = 0.0  # the step length a cooldown falls from (0 before it starts)
    cooldown_from: int = -1  # the micro-batch it falls from, if later than its window's start (COOLDOWN_SIGNAL)

    # the names the P2M state shows in ``ElraOptimizer.stats``
    @property
    def rate(self) -> float:
        return self.eta

    @property
    def alpha(self) -> float:
        return self.eta

    @property
    def schedule(self) -> float:
        return 0.0


class LineController:
    """Decides each real step of ELRA over a preconditioned direction from global scalars.

    Args:
        lr: initial step length along the direction (a probe; Adam's direction
            has entries of size about 1, so this is a per-coordinate step).
        classes: ``None`` detects the regime at the second real step (see
            :meth:`_choose_regime`; a detected noise-free one may turn out noisy
            later, :meth:`_recheck_regime`); ``<= 1`` selects the noise-free
            regime, ``>= 2`` the mini-batch one.
        batch_size: samples per micro-batch, sets the statistics window.
        min_multiplier: initial and smallest number of micro-batches per real step.
        target: the gradient-pair ratio r that eta settles at where the
            gradient has no noise (0: the line minimum; negative: a little
            past it); it is scaled by :meth:`signal_share`, so noise pulls it to 0.
        beta: the direction's momentum (beta1), which :meth:`signal_share` assumes;
            ``None``: :attr:`beta1` chooses it by the regime.
        total_steps: the micro-batches the run will take, or ``None``; in the
            mini-batch regime the last ``COOLDOWN_SHARE`` of them cool down
            (:meth:`_cooldown`).
    """

    def __init__(
        self,
        lr: float,
        classes: int | None,
        batch_size: int,
        min_multiplier: int,
        target: float = LINE_TARGET,
        beta: float | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.min_multiplier = min_multiplier
        self.target = target
        self.beta = beta
        self.momentum = None  # the momentum lives in the direction's moments
        noise_free = None if classes is None else classes <= 1
        self.lr = lr
        self.revisable = classes is None  # a detected noise-free regime may turn out noisy (_recheck_regime)
        self.classes = classes
        self._warned_noisy = False
        self.state = LineState(eta=lr, multiplier=min_multiplier, noise_free=noise_free)

    @property
    def step_length(self) -> float:
        """The length the next accepted step starts from (after a restart's retrace: the last accepted one)."""
        s = self.state
        return s.accepted_eta if s.restart else s.eta

    @property
    def beta1(self) -> float:
        """The direction's momentum: the given one, else NOISE_FREE_BETA1 in the noise-free regime and BETA1 otherwise."""
        if self.beta is not None:
            return self.beta
        return NOISE_FREE_BETA1 if self.deterministic else BETA1

    @property
    def deterministic(self) -> bool:
        return self.state.noise_free is True

    @property
    def regime(self) -> str:
        return {None: "auto", True: "deterministic", False: "stochastic"}[self.state.noise_free]

    def weight_decays(self, decays: Sequence[float]) -> list[float]:
        """The decoupled decay in force for each group: ``weight_decay`` times the validation lag (0 stays 0)."""
        s = self.state
        lag = validation_lag(s.train_loss, s.valid_loss, s.multiplier)
        return [0.0 if wd <= 0.0 else (float(wd) if lag is None else float(wd) * lag) for wd in decays]

    def set_train_loss(self, loss: float) -> None:
        self.state.train_loss = float(loss)

    def set_valid_loss(self, loss: float) -> None:
        self.state.valid_loss = float(loss)

    def real_step(
        self, losses: Sequence[float], sums: LineSums | None, decays: Sequence[float], half_precision: bool = False
    ) -> LineDecision:
        """Decide one real step; ``sums`` is ``None`` without a usable gradient."""
        losses = [float(v) for v in losses]
        bad = [v for v in losses if not math.isfinite(v)]
        loss = bad[0] if bad else mean_loss(losses)
        usable = sums is not None and not bad and sums.is_finite()
        s = self.state
        s.micro_steps += len(losses)
        if not s.started:
            if not usable:
                s.retraces += 1
                logger.warning("first ELRA step skipped: loss %.4g or its gradient is not finite", loss)
                return LineDecision("skip")
            s.started = True
            self._count_step()
            s.probe_loss = loss
            return self._accept(loss, None, decays)
        if s.noise_free is None and usable:
            before = self.beta1
            self._choose_regime(losses, loss, sums)
            if self.beta1 != before:  # the optimizer rescales m (one gradient so far) to this regime's beta1
                sums = replace(sums, mom_sq=sums.mom_sq * first_moment_factor(before, self.beta1) ** 2)
        elif self.deterministic and usable and s.from_restart:
            self._recheck_regime(losses, loss, sums)
        self._count_step()
        if usable and self._acceptable(loss):
            return self._accept(loss, sums, decays)
        return self._retrace(loss, sums if sums is not None and sums.is_finite() else None, refused=usable)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(LineState)}
        missing, unknown = names - state.keys() - _LATER_FIELDS, state.keys() - names
        if missing or unknown:
            raise ValueError(
                f"controller state does not match this version of elra: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        loaded = LineState(**{k: state[k] for k in names & state.keys()})  # older states: a fresh window, ...
        loaded.window_means = [float(v) for v in loaded.window_means]
        if "noise_free" not in state:  # ... and the given regime (classes=None then meant mini-batch training)
            loaded.noise_free = bool(self.state.noise_free)
        self.state = loaded

    # ------------------------------------------------------------- internals
    def _count_step(self) -> None:
        """Advance the step counters; at a cycle's end close a complete window and start a new cycle."""
        s = self.state
        s.steps += 1
        s.window_steps += 1
        if s.steps % CYCLE:
            return
        if s.window_steps >= window_length(s.multiplier, self.batch_size):
            self._close_window()
        s.cycle_retraces = 0

    def _close_window(self) -> None:
        """Compare the window's mean accepted loss with the best so far; after a stall, grow the batch."""
        s = self.state
        mean = s.window_loss / s.window_accepted if s.window_accepted else math.inf
        s.window_steps = s.window_accepted = 0
        s.window_loss = 0.0
        if s.best_mean is not None and not mean < s.best_mean:  # a tie is no progress
            s.stalled_windows += 1
        else:
            s.stalled_windows = 0
            s.best_mean = mean
        s.stalled_windows, best, grow = check_progress(s.window_means, s.stalled_windows, mean)
        if best is not None:
            s.best_mean = best
        if grow:
            self._grow()

    def _grow(self) -> None:
        """Double the micro-batches per real step (mini-batch problems only)."""
        s = self.state
        if self.deterministic:
            return
        value = max(self.min_multiplier, doubled(s.multiplier))
        if value != s.multiplier:
            logger.info("ELRA batch multiplier %d -> %d at real step %d", s.multiplier, value, s.steps)
        s.multiplier = value
        s.stalled_windows = 0

    def _choose_regime(self, losses: list[float], loss: float, sums: LineSums) -> None:
        """Detect the regime at the first usable point after the first (tiny) step, along ``u_0``: :meth:`_noisy`.

        Its tolerance is a share of the curvature part of the change, not of the whole change: along Adam-like
        directions the probe moves every coordinate by ``lr``, and the first-order decrease of a transformer at
        initialisation (whose batches all cost about log(vocabulary)) hid the loss noise under half the change.
        Global sums only, so every rank decides alike.
        """
        s = self.state
        predicted, curvature_term, scale = self._probe_terms(s.probe_loss, losses, sums)
        changed = abs(sums.mom_dir - sums.next_dir) > PAIR_NOISE * sums.mom_dir
        pair_noisy = changed and abs(loss - predicted) > PROBE_TOLERANCE * abs(curvature_term) + FINE_ROUNDING * scale
        s.noise_free = not (pair_noisy or self._noisy(s.probe_loss, losses, loss, sums))
        logger.info("ELRA chose the %s regime at real step %d", self.regime, s.steps + 1)

    def _recheck_regime(self, losses: list[float], loss: float, sums: LineSums) -> None:
        """A detected noise-free regime that meets mini-batch noise: switch to the stochastic one.

        A restart's step goes along ``m_hat = g`` from the last accepted point, as the probe went along ``g_0``
        from the first, so the probe's test applies (:meth:`_noisy`). Mini-batches whose first batch came twice
        (or that followed a few full-batch steps) were taken for noise-free for good: every rise cut the step
        length until it sat at its floor (digits MLP, first batch served twice: test accuracy 0.13 against 0.99).
        REDETECT_MISSES misses in a row switch; the first loss bounds the rounding too (a float32 loss fitted
        to 1e-9 moves by the ulps of its larger terms).

        A regime given (``classes`` 0 or 1) is kept, with a WARNING, once: ``classes=0`` is the published
        package's default, so code written for it passes 0 for mini-batches, which then sat at the floor silently.
        """
        s = self.state
        s.noise_misses = s.noise_misses + 1 if self._noisy(s.last_good_loss, losses, loss, sums, s.probe_loss) else 0
        if s.noise_misses >= REDETECT_MISSES and not self.revisable:
            if not self._warned_noisy:
                self._warned_noisy = True
                logger.warning(
                    "ELRA was told the loss is noise-free (classes=%s), but %d steps in a row changed it as "
                    "mini-batch losses do: for mini-batch training pass classes=None (detected) or the number of "
                    "classes, or the step length falls to its floor (a 16-bit loss's rounding can do this too)",
                    self.classes, s.noise_misses,
                )
        elif s.noise_misses >= REDETECT_MISSES:
            s.noise_free, s.eta = False, max(s.eta, self.lr)
            logger.info("ELRA switched to the stochastic regime at real step %d: the losses are noisy", s.steps + 1)

    def _noisy(self, start: float, losses: list[float], loss: float, sums: LineSums, *scales: float) -> bool:
        """Whether a step of ``probe_length`` along ``u`` from a point of loss ``start`` shows mini-batch noise.

        Without noise the loss changed by the trapezoid ``-length*(D + N)/2`` up to third-order terms; with
        mini-batches, losses of different batches differ by far more than a short step explains. The trapezoid's
        error is measured against the second-order (curvature) part of the change, ``length*(D - N)/2``, plus the
        rounding of the losses (and of ``scales``); micro-batch losses that differ at one point are noise too.
        """
        predicted, curvature_term, scale = self._probe_terms(start, losses, sums, *scales)
        allowed = PROBE_TOLERANCE * abs(curvature_term) + LOSS_PRECISION * scale
        spread = max(losses) - min(losses) > LOSS_PRECISION * max(abs(v) for v in losses)
        return spread or abs(loss - predicted) > allowed

    def _probe_terms(self, start: float, losses: list[float], sums: LineSums, *scales: float) -> tuple[float, float, float]:
        """The loss a step of ``probe_length`` from ``start`` predicts by the trapezoid, the curvature part of the
        change, and the largest magnitude among the losses, the prediction and ``scales`` (what they round at)."""
        s = self.state
        predicted = start - 0.5 * s.probe_length * (sums.mom_dir + sums.next_dir)
        curvature_term = 0.5 * s.probe_length * (sums.mom_dir - sums.next_dir)
        return predicted, curvature_term, max(abs(v) for v in (*losses, predicted, *scales))

    def _acceptable(self, loss: float) -> bool:
        s = self.state
        if self.deterministic:
            # a rise within ROUNDING is none; a restart is back at the last point (its loss to rounding); after
            # MAX_RETRACES shrinking retraces the rise is accepted: a new gradient must turn the direction
            rounding = loss - s.last_good_loss <= ROUNDING * abs(s.last_good_loss)
            return rounding or s.failed >= MAX_RETRACES or s.restart
        if s.accepted < LOSS_WARMUP or s.failed >= MAX_REFUSALS:
            return True
        mean, spread = self._loss_statistics()
        # within ROUNDING of the mean: identical losses (spread 0) have an EMA mean a rounding below them
        return loss <= mean + LOSS_DEVIATIONS * spread + ROUNDING * abs(mean)

    def _loss_statistics(self) -> tuple[float, float]:
        """Mean and standard deviation of the accepted losses (EMAs)."""
        s = self.state
        mean = s.loss_mean / s.loss_weight
        scaled = math.ldexp(mean, -s.loss_exponent)  # exact: the scale is a power of two (1 for most runs)
        return mean, math.ldexp(math.sqrt(max(s.loss_sq / s.loss_weight - scaled * scaled, 0.0)), s.loss_exponent)

    def _statistics_value(self, loss: float) -> float:
        """``loss`` as it enters the accepted-loss statistics: a mini-batch loss floored ``LOSS_FLOOR_DEVIATIONS``
        below their mean once they refuse steps; a noise-free loss is the function's value, unchanged."""
        if self.deterministic or self.state.accepted < LOSS_WARMUP:
            return loss
        mean, spread = self._loss_statistics()
        if spread <= ROUNDING * abs(mean):
            spread = LOSS_FLOOR_SPREAD * abs(mean)
        return max(loss, mean - LOSS_FLOOR_DEVIATIONS * spread)

    def _accept(self, loss: float, sums: LineSums | None, decays: Sequence[float]) -> LineDecision:
        s = self.state
        restart, s.restart = s.restart, False
        s.from_restart = restart
        if s.failed >= MAX_RETRACES or restart:
            s.eta = s.accepted_eta  # the direction failed, not the length
        # the sums of |g|^2 and |m|^2 exist once m has a gradient
        share = self.signal_share(sums) if sums is not None and s.moment_steps else None
        target = self.target if share is None else self.settling_ratio(share)
        if sums is not None:
            s.param_peak = max(s.param_peak, sums.param_sq)
        before = s.eta
        cooled = self._cooldown(share)  # 0 outside a step budget's cooldown, where the pairs set eta
        # noise-free and the gradient exactly zero: every point near is as good (a hinge loss met, a flat ReLU
        # region; N = 0 then too); its pair read as a line minimum grew eta to its bound, and the fading momentum's
        # direction (muon's keeps its size) carried the weights 5e5 times their norm away. The point stays.
        flat = self.deterministic and sums is not None and sums.grad_sq == 0.0 == sums.next_dir
        # a restart's pair measured the abandoned direction
        if sums is not None and sums.mom_dir > 0.0 and not restart and not cooled and not flat:
            gain, smoothing = (NOISE_FREE_GAIN, NOISE_FREE_SMOOTHING) if self.deterministic else (GAIN, PAIR_SMOOTHING)
            s.ema_next = _ema(s.ema_next, sums.next_dir, smoothing)
            s.ema_mom = _ema(s.ema_mom, sums.mom_dir, smoothing)
            if s.ema_mom > 0.0:  # a D of a few subnormals can round its EMA to 0: eta stays
                ratio = s.ema_next / s.ema_mom
                s.eta *= math.exp(gain * min(max(ratio - target, -1.0), 1.0))
            s.eta = _bounded(s.eta, before)
            scale = max(sums.param_sq, CLIP_FLOOR * CLIP_FLOOR * s.param_peak)
            if scale > 0.0 and sums.dir_sq > 0.0:
                s.eta = max(min(s.eta, RELATIVE_CLIP * math.sqrt(scale / sums.dir_sq)), SMALLEST_ETA)
        else:
            s.eta = _bounded(cooled or s.eta, before)
        value = self._statistics_value(loss)
        s.loss_mean = LOSS_SMOOTHING * s.loss_mean + (1.0 - LOSS_SMOOTHING) * value
        self._rescale_squares(value)
        scaled = math.ldexp(value, -s.loss_exponent)
        s.loss_sq = LOSS_SMOOTHING * s.loss_sq + (1.0 - LOSS_SMOOTHING) * scaled * scaled
        s.loss_weight = LOSS_SMOOTHING * s.loss_weight + (1.0 - LOSS_SMOOTHING)
        s.accepted += 1
        s.window_accepted += 1
        s.window_loss += value  # floored as in the statistics: one wild low loss set a best mean no window beat
        s.failed = 0
        s.accepted_eta = s.eta
        s.last_good_loss = loss
        s.probe_length = s.eta
        s.moment_steps += 1
        # the probe step stays a pure step along u_0 (see _choose_regime)
        in_force = [0.0] * len(decays) if s.noise_free is None or flat else self.weight_decays(decays)
        decay = tuple(1.0 - min(s.eta * a, MAX_DECAY) for a in in_force)
        return LineDecision("accept", step=0.0 if flat else s.eta, decay=decay, restart=restart)

    def _rescale_squares(self, value: float) -> None:
        """Choose the power of two the accepted losses are scaled by before they are squared: none while they
        and the losses behind the statistics stay below 2**SQUARE_RANGE (their squares, and the mean's, are finite),
        else just enough to bring them there; ``loss_sq`` follows (exactly, up to underflow of what it outweighs)."""
        s = self.state
        top = math.frexp(value)[1]
        if s.loss_sq > 0.0 and s.loss_weight > 0.0:
            top = max(top, math.frexp(math.sqrt(s.loss_sq / s.loss_weight))[1] + s.loss_exponent)
        exponent = max(0, top - SQUARE_RANGE)
        if exponent != s.loss_exponent:
            s.loss_sq = math.ldexp(s.loss_sq, 2 * (s.loss_exponent - exponent))
            s.loss_exponent = exponent

    def _cooldown(self, share: float | None) -> float:
        """The step length of an accepted step in a step budget's cooldown, 0 outside it; its first step keeps
        the length reached (``cooldown_eta``) that the cooldown falls from.

        Mini-batch regime only: in the last ``COOLDOWN_SHARE`` of ``total_steps`` micro-batches, from the first
        accepted step whose signal ``share`` is at most ``COOLDOWN_SIGNAL`` (or unknown), steps take that length times
        :func:`cooldown_factor`; the gradient pairs do not move it then. Where noise dominates, the pair anneals
        only as far as its greedy step (docs/usage.md); a fixed budget gains from a cooldown at its end, as the
        schedules tuned for Adam have one. Where signal still dominates, cooling only slows the descent: the
        pairs keep the step until noise takes over, and the fall starts from there. Without noise the exact
        pairs set the step to the end. A budget extended (or dropped) in its cooldown gives the length back
        (:attr:`ElraOptimizer.total_steps`).
        """
        s = self.state
        budgeted = self.total_steps is not None and s.noise_free is False
        if not budgeted or cooldown_factor(self.total_steps, s.micro_steps) == 1.0:
            if s.cooldown_eta:  # the budget was extended or dropped in a cooldown: back to where it fell from
                s.eta, s.cooldown_eta = s.cooldown_eta, 0.0
            s.cooldown_from = -1
            return 0.0
        if s.cooldown_eta == 0.0:
            if share is not None and share > COOLDOWN_SIGNAL:
                s.cooldown_from = s.micro_steps  # the fall, once it starts, starts after this step
                return 0.0
            s.cooldown_eta = s.eta
        return s.cooldown_eta * cooldown_factor(self.total_steps, s.micro_steps, s.cooldown_from)

    def signal_share(self, sums: LineSums) -> float:
        """The share of the gradient that is signal, from the smoothed ``|m|^2 / |g|^2``.

        With momentum ``beta1`` a constant gradient gives ``|m|^2 = |g|^2``,
        independent noise ``|m|^2 = (1-beta)/(1+beta) |g|^2``; in between the
        ratio is linear in the signal's share of ``|g|^2``. Updates the EMAs.
        """
        s = self.state
        s.ema_grad_sq = _ema(s.ema_grad_sq, sums.grad_sq, SHARE_SMOOTHING)
        s.ema_mom_sq = _ema(s.ema_mom_sq, sums.mom_sq, SHARE_SMOOTHING)
        floor = self._noise_floor
        if floor >= 1.0:  # no momentum: m is g, the ratio says nothing
            return 0.0
        ratio = s.ema_mom_sq / max(s.ema_grad_sq, _TINY)
        return min(max((ratio - floor) / (1.0 - floor), 0.0), 1.0)

    @property
    def _noise_floor(self) -> float:
        """``|m|^2/|g|^2`` of independent noise under momentum beta1: ``(1-beta1)/(1+beta1)``."""
        return (1.0 - self.beta1) / (1.0 + self.beta1)

    def settling_ratio(self, share: float) -> float:
        """The pair ratio that eta settles at for the signal share ``share`` (S): ``target*S``, and in the
        mini-batch regime ``NOISE_TARGET * f_m * (1-S)**NOISE_FADE`` more.

        ``f_m = S/(S + (1-S)(1-beta1)/(1+beta1))`` is the signal's share of the momentum: the ratio at a short
        step, falling to 0 at the line minimum along ``u``, about linearly in the length. Where the gradient is
        mostly noise that minimum is too far: the momentum carries a step's noise into the next
        ``1/(1-beta1)`` steps, which one pair does not see. The target then sits halfway down, about half the
        line minimum's length (the wide regression's line minimum settled at a length of 0.0022, test mse
        0.29 at that length held fixed, 0.082 at 1e-3). The term vanishes where signal dominates (S near 1)
        and with ``f_m`` where none is measured (S = 0).
        """
        target = self.target * share
        if self.state.noise_free is not False or share <= 0.0:
            return target
        in_momentum = share / (share + (1.0 - share) * self._noise_floor)
        return target + NOISE_TARGET * in_momentum * (1.0 - share) ** NOISE_FADE

    def _retrace(self, loss: float, sums: LineSums | None, refused: bool) -> LineDecision:
        """Go back along the old direction: ``x_old - eta_new*u_old`` (all the way where it went uphill).

        ``refused``: the loss and gradient were usable and the loss too high. Only such retraces make a storm
        that doubles the micro-batches: a fault (a non-finite loss or gradient, a skipped backward) says nothing
        of the mini-batch noise, and counted it grew the batch without end, since a real step of more
        micro-batches meets more of them (1% faulty micro-batches: a multiplier of 512 in 20000 steps).
        """
        s = self.state
        s.retraces += 1
        s.failed += 1
        if refused:
            s.cycle_retraces += 1
            if s.cycle_retraces % RETRACES_PER_DOUBLING == RETRACES_PER_DOUBLING - 1:
                self._grow()  # a retrace storm: the mini-batch noise swamps the step
        old = s.eta
        if s.restart:  # back at x_old, which gave no usable gradient this time: stay there
            return LineDecision("retrace")
        if not s.from_restart and self._went_uphill(loss, sums):
            s.restart, s.eta, s.probe_length = True, 0.0, 0.0
            s.restarts += 1
            logger.debug("ELRA restarts the momentum at real step %d: the step from the last point went uphill", s.steps)
            return LineDecision("retrace", step=0.0, shift=old)
        new = 0.5 * old
        if self.deterministic and sums is not None and math.isfinite(loss) and sums.mom_dir > 0.0:
            # parabola through f(x_old), its slope -D and f(x_old - old*u): its minimum
            curvature_term = loss - s.last_good_loss + old * sums.mom_dir
            if curvature_term > 0.0:
                new = min(max(sums.mom_dir * old * old / (2.0 * curvature_term), 0.1 * old), 0.5 * old)
        s.eta = _bounded(new, old)
        s.probe_length = s.eta
        logger.debug("ELRA retrace %d at real step %d: loss %.4g, step length %.4g", s.retraces, s.steps, loss, s.eta)
        return LineDecision("retrace", step=s.eta, shift=old - s.eta)

    def _went_uphill(self, loss: float, sums: LineSums | None) -> bool:
        """Noise-free: whether the loss rose because ``-u_old`` pointed uphill at ``x_old`` (no length helps).

        The slope at ``x_old`` along the step comes from the two losses and the
        slope ``-N`` at the new point: ``2*rise/eta + N`` (exact on a quadratic).
        Shorter retraces along such a direction only spend evaluations (a plain
        quadratic took 3 retraces in every 4 steps while the momentum turned);
        going back and restarting the momentum from the gradient there costs one.
        (A rise within ``ROUNDING`` of the loss was accepted before: it says nothing.)
        A restart's own step (along ``m_hat = g``, downhill) is not judged so: where the slope's estimate
        fails (a kink, a 16-bit step's rounding) that step would restart again from the same point with the
        same length, for ever; it retraces by shrinking instead (:meth:`_retrace`).
        """
        s = self.state
        if not (self.deterministic and sums is not None and math.isfinite(loss)):
            return False
        return 2.0 * (loss - s.last_good_loss) / s.eta + sums.next_dir >= 0.0
