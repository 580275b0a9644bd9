"""The P2M controller: step size, retrace, batch multiplier and weight decay.

Plain Python numbers in, one :class:`Decision` out. No tensors, no
communication, no I/O: every rank that feeds the controller the same global
sums takes the same decision, and the whole state is a dict of numbers.

The constants and the order of the updates follow the published ``elra``
package, which is the executable definition of the method.
Where the package divides by zero or assumes positive losses, this module
guards the division or measures thresholds by the loss magnitude instead.
Two additions are the project's own: the regime detected from the first
step when ``classes`` is not given, and (unless ``acceptance="published"``)
a stochastic loss cap measured in units of the observed loss noise, with loss
statistics that clip outliers.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

logger = logging.getLogger("elra")

GROWTH_SCALE = 1e6
DAMPER_START = 855000.0
DAMPER_SHRINK = 3.9
DAMPER_RETRACE_FACTOR = 16.0
STEP_CLIP = 10.0
SCHEDULE_BASE = 2.0 / 3.0
SCHEDULE_MAX = 28.3943679363  # keeps (2/3)**schedule above 1e-5
# keeps (2/3)**schedule below 1.3e176: with a gradient norm of 0 (an exact minimum, a loss constant) the schedule's
# floor below is -inf, and falling 0.33 per cycle it made (2/3)**schedule raise OverflowError after ~530000 steps
SCHEDULE_MIN = -1000.0
RATE_FLOOR = 1e-5
ALPHA_BOUNDS = (1e-8, 1e6)
RETRACE_ALPHA_BOUNDS = (1e-12, 1e6)
CYCLE = 100
STAT_LENGTH = 768
MAX_MULTIPLIER = 6250
RETRACES_PER_DOUBLING = 26  # the 25th retrace of a cycle doubles the multiplier
HALF_GRAD_LIMIT = 65e3
ACCEPTANCE_RULES = ("noise", "published")
PROBE_TOLERANCE = 0.5  # noise-free: the loss change after the first step matches its prediction within 50%
LOSS_PRECISION = 1e-5  # relative loss differences below this are rounding, not mini-batch noise
NOISE_CAP = 3.0  # a loss may exceed the first loss by this many noise units (plus 10%) before it is refused
NOISE_CLIP = 4.0  # a loss enters the statistics at most this many noise units away from the previous one
NOISE_MEMORY = 20  # the noise estimate averages over about this many micro-batch losses
RANGE_LIMIT = 0.5  # a step may bring 16-bit parameters at most to half their dtype's largest value


def window_length(multiplier: int, batch_size: int) -> int:
    """Real steps of a statistics window: about ``STAT_LENGTH`` samples per cycle, whole cycles."""
    return max(1, int(STAT_LENGTH / (multiplier * batch_size))) * CYCLE


def doubled(multiplier: int) -> int:
    """The next batch multiplier (at least 2, at most ``MAX_MULTIPLIER``)."""
    return min(max(2 * multiplier, 2), MAX_MULTIPLIER)


def mean_loss(losses: Sequence[float]) -> float:
    """The mean of finite ``losses``, exactly rounded; also where their sum passes float's range (``math.fsum``
    raises OverflowError there: two micro-batch losses above 9e307 crashed the real step instead of refusing it)."""
    n = len(losses)
    try:
        return math.fsum(losses) / n
    except OverflowError:
        return math.fsum(v / n for v in losses)


def check_progress(means: list[float], stalled: int, mean: float) -> tuple[int, float | None, bool]:
    """The stall rule at the end of a window whose mean loss is ``mean``.

    ``stalled`` counts the windows in a row (this one included) whose mean
    did not beat the best; ``means[0]`` holds the best, ``means[1:]`` the
    stalled means. After six stalled windows the batch should grow; at five, a
    falling trend (the first two or three of the six above the last ones)
    forgives the stall. Returns the new count, the new best mean (``None``:
    unchanged) and whether to grow; updates ``means`` in place.
    """
    if stalled >= 6:
        means[0] = mean
        return 0, mean, True
    means[stalled] = mean
    if stalled == 5:
        first2, last2 = means[0] + means[1], means[4] + means[5]
        first3, last3 = means[0] + means[1] + means[2], means[3] + means[4] + means[5]
        if first2 > last2 or first3 > last3:
            best = min(last2 / 2.0, last3 / 3.0)
            means[0] = best
            return 0, best, False
    return stalled, None, False


def validation_lag(train: float | None, valid: float | None, multiplier: int) -> float | None:
    """The weight-decay factor ``sqrt(2*valid/train - 1)`` (1 if valid <= train), capped at ``3*multiplier**0.666``.

    ``None`` unless both losses are known and positive.
    """
    if train is None or valid is None or not (train > 0.0 and valid > 0.0):
        return None
    lag = 1.0 if valid <= train else math.sqrt(2.0 * valid / train - 1.0)
    return min(3.0 * multiplier**0.666, lag)


@dataclass
class StepSums:
    """Global sums of one real step, one entry per parameter group.

    ``g`` is the sum of the micro-batch gradients (not yet averaged), ``B`` the
    stored direction buffer (the previous direction is ``dir_coef * B``) and
    ``x`` the parameters. Sums that a step does not need are zero.
    """

    grad_sq: list[float]
    grad_dir: list[float]
    dir_sq: list[float]
    param_sq: list[float]
    param_dir: list[float]
    grad_param: list[float]

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for values in asdict(self).values() for v in values)

    def scaled(self, factor: float) -> StepSums:
        """The sums for gradients multiplied by ``factor`` (undoing a loss scale)."""
        return StepSums(
            [v * factor * factor for v in self.grad_sq],
            [v * factor for v in self.grad_dir],
            self.dir_sq,
            self.param_sq,
            self.param_dir,
            [v * factor for v in self.grad_param],
        )


@dataclass(frozen=True)
class Decision:
    """What the tensors must do after one real step.

    ``accept``: ``B = keep*B + grad_scale*g + param_scale[j]*x`` per group j,
    then ``x -= step*B``. ``retrace``: ``x += shift*B``. ``skip``: nothing.
    """

    action: str
    keep: float = 0.0
    grad_scale: float = 0.0
    param_scale: tuple[float, ...] = ()
    step: float = 0.0
    shift: float = 0.0


@dataclass(frozen=True)
class RangeBounds:
    """Norms of the 16-bit tensors of a step, each element divided by its dtype's largest value.

    Global L2 norms (over all ranks) of the parameters ``x``, the stored
    directions ``B`` and the summed gradients ``g``. An L2 norm bounds every
    element, so ``x + c*B`` stays within ``RANGE_LIMIT`` of the range when
    ``|x| + |c|*|B|`` does: a sufficient test, decided identically on every rank
    before any tensor changes.
    """

    params: float
    directions: float
    grads: float

    def allows(self, decision: Decision) -> bool:
        """Whether the new direction and the point after an accepted step stay in range."""
        decay = max((abs(a) for a in decision.param_scale), default=0.0)
        new_dir = abs(decision.keep) * self.directions + abs(decision.grad_scale) * self.grads + decay * self.params
        return new_dir <= RANGE_LIMIT and self.params + abs(decision.step) * new_dir <= RANGE_LIMIT

    def allows_shift(self, shift: float) -> bool:
        """Whether ``x + shift*B`` (a retrace beyond the current or the last good point) stays in range."""
        return self.params + abs(shift) * self.directions <= RANGE_LIMIT


# fields added since: a state saved before lacks them
_LATER_FIELDS = frozenset({"micro_steps"})


@dataclass
class ControlState:
    """Everything the controller remembers between real steps."""

    alpha: float
    multiplier: int
    started: bool = False
    rate: float = 0.1
    rate_damper: float = 1.0
    schedule: float = 1.0
    growth_damper: float = DAMPER_START
    slope: float = 0.0
    angle_sum: float = 0.0
    angle_min: float = 0.0
    loss_limit: float = 0.0
    stat_mean: float = 0.0
    stat_dev: float = 0.0
    dev_correction: float = 1.0
    last_good_loss: float = 0.0
    loss_sum: float = 0.0
    var_sum: float = 0.0
    steps: int = 0
    window_steps: int = 0
    window_retraces: int = 0
    cycle_retraces: int = 0
    stalled_windows: int = 0
    window_means: list[float] = field(default_factory=lambda: [0.0] * 6)
    increased: bool = False
    increase_phase: int = 0
    grad_norm_avg: float = 0.0
    dir_norm_sum: float = 0.0
    dir_norm: float = 0.0
    dir_coef: float = 1.0
    offset: float = 0.0
    accepted_any: bool = False
    wd_factor: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    retraces: int = 0
    noise_free: bool | None = None  # the regime: deterministic, stochastic, or None until detected
    probe_loss: float = 0.0
    probe_slope: float = 0.0
    noise: float = 0.0
    noise_samples: int = 0
    last_loss: float = 0.0
    micro_steps: int = 0  # micro-batches of the real steps so far (ElraOptimizer.micro_batches_taken)

    @property
    def restarts(self) -> int:
        """P2M keeps its momentum through every step (the line controller's count, for ``stats``)."""
        return 0


class Controller:
    """Decides each real step of ELRA from global scalars.

    Args:
        lr: initial step length (the first step is ``x -= lr * g``).
        classes: ``None`` detects the regime (see :meth:`_choose_regime`);
            ``<= 1`` selects the deterministic regime, ``>= 2`` the stochastic one.
        batch_size: samples per micro-batch, sets the statistics window.
        warmup: real steps over which the rate may ramp up.
        momentum: momentum factor or ``None``.
        min_multiplier: initial and smallest number of micro-batches per step.
        acceptance: ``"noise"`` measures the stochastic regime's loss cap in
            units of the observed mini-batch loss noise and keeps the loss
            statistics robust to outliers, and undoes a refused first step
            (halving it at each retrace); ``"published"`` is the published
            package's rule (cap ``1.1 * max(first loss, log(classes))``).
    """

    def __init__(
        self,
        lr: float,
        classes: int | None,
        batch_size: int,
        warmup: int,
        momentum: float | None,
        min_multiplier: int,
        acceptance: str = "noise",
    ) -> None:
        if acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"Invalid acceptance: {acceptance!r} (expected one of {ACCEPTANCE_RULES})")
        self.classes = classes
        self.batch_size = batch_size
        self.acceptance = acceptance
        self.warmup_factor = 1.0 if warmup <= 1 else 1.0 / warmup
        self.momentum = momentum
        self.min_multiplier = min_multiplier
        noise_free = None if classes is None else classes <= 1
        self.state = ControlState(alpha=lr, multiplier=min_multiplier, noise_free=noise_free)

    # ------------------------------------------------------------------ API
    @property
    def deterministic(self) -> bool:
        """True in the deterministic regime, and while the regime is still being detected."""
        return self.state.noise_free is not False

    @property
    def regime(self) -> str:
        """``"deterministic"``, ``"stochastic"``, or ``"auto"`` until detected."""
        return {None: "auto", True: "deterministic", False: "stochastic"}[self.state.noise_free]

    @property
    def step_length(self) -> float:
        """The current step length: the rate, or ``alpha`` if deterministic or before the first accepted step
        after the first (the first step, and a retrace before any accepted step, move by ``alpha``)."""
        s = self.state
        return s.alpha if self.deterministic or not s.accepted_any else s.rate

    def weight_decays(self, decays: Sequence[float]) -> list[float]:
        """The decay factor in force for each group (0 for groups without decay): ``weight_decay`` until the
        validation lag is known (:meth:`_update_weight_decay`, at a cycle's end), then the lag itself for every
        group with decay (the published package's ``self.WD = min(cap, b)``; the line controller multiplies)."""
        factor = self.state.wd_factor
        return [0.0 if wd <= 0.0 else (wd if factor is None else factor) for wd in decays]

    def set_train_loss(self, loss: float) -> None:
        self.state.train_loss = float(loss)

    def set_valid_loss(self, loss: float) -> None:
        self.state.valid_loss = float(loss)

    def real_step(
        self,
        losses: Sequence[float],
        sums: StepSums | None,
        decays: Sequence[float],
        half_precision: bool = False,
        bounds: RangeBounds | None = None,
    ) -> Decision:
        """Decide one real step.

        ``losses`` are the (global) losses of its micro-batches, ``sums`` the
        global sums or ``None`` when there is no usable gradient (the caller
        skipped ``backward``). A non-finite loss or sum turns the step into a
        retrace; before the first step there is nothing to revert, so such a
        step is skipped. With ``bounds`` (16-bit parameters), a step whose
        result could leave the dtype's range is refused the same way.
        """
        losses = [float(v) for v in losses]
        bad = [v for v in losses if not math.isfinite(v)]
        loss = bad[0] if bad else losses[-1]
        n = len(losses)
        self.state.micro_steps += n
        if bad or (sums is not None and not (sums.is_finite() and self._direction_is_finite(n, sums, decays))):
            sums = None
        if sums is not None and half_precision:
            if math.sqrt(sum(sums.grad_sq)) / n >= HALF_GRAD_LIMIT:
                sums = None
        s = self.state
        if not s.started:
            undecided = s.noise_free is None
            decision = None if sums is None else self._in_range(lambda: self._first_step(losses, n, sums, decays), bounds)
            if decision is None:
                self.state.retraces += 1  # not s: a refusal for range put the state before the step back
                logger.warning("first ELRA step skipped: loss %.4g or its gradient is not finite or too large", loss)
                return Decision("skip")
            if undecided and self.state.noise_free is False:  # logged once taken: a refusal puts back "auto"
                logger.info("ELRA chose the stochastic regime at real step 1")
            return decision
        if s.noise_free is None and sums is not None:
            self._choose_regime(losses, n, sums)
        if sums is None and self.acceptance == "published":
            s.window_steps += 1  # a step without gradient counts twice in the window, as published
        self._count_step()
        recorded = self._observe_noise(losses) if self._noise_aware else loss
        if sums is not None and self._acceptable(loss, min(losses)):
            decision = self._in_range(lambda: self._accept(recorded, n, sums, decays), bounds)
            if decision is not None:
                return decision
        return self._retrace(loss, bounds)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(ControlState)}
        missing, unknown = names - state.keys() - _LATER_FIELDS, state.keys() - names
        if missing or unknown:
            raise ValueError(
                f"controller state does not match this version of elra: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        loaded = ControlState(**{k: state[k] for k in names & state.keys()})  # an older one's clock starts at 0
        loaded.window_means = [float(v) for v in loaded.window_means]
        self.state = loaded

    # ------------------------------------------------------------- internals
    def _in_range(self, decide, bounds: RangeBounds | None) -> Decision | None:
        """``decide()``, or ``None`` with the state unchanged if its step could overflow."""
        if bounds is None:
            return decide()
        saved = copy.deepcopy(self.state)
        decision = decide()
        if bounds.allows(decision):
            return decision
        refused, self.state = self.state, saved  # the refused state has counted this step (also the first)
        logger.warning(
            "ELRA step %d refused: a step of %.4g could overflow the 16-bit parameters", refused.steps, decision.step
        )
        return None

    def _first_step(self, losses: list[float], n: int, sums: StepSums, decays: Sequence[float]) -> Decision:
        s = self.state
        loss = losses[-1]
        if s.noise_free is None and self._differ(losses):
            s.noise_free = False  # micro-batch losses at one point differ: mini-batch noise (logged by real_step)
        self._count_step()
        floor = math.log(self.classes) if self.classes is not None and self.classes >= 2 else math.log(2.0)
        scale = abs(loss)
        s.loss_sum = loss
        s.loss_limit = loss if self.acceptance == "noise" else max(loss, floor)
        s.last_loss = loss
        s.last_good_loss = loss
        s.multiplier = self.min_multiplier
        s.stat_mean = loss + 0.1 * scale
        s.stat_dev = 0.3 * 1.1 * scale
        s.started = True
        decay = self._decay_coefficients(n, sums, decays) if self.deterministic else [0.0] * len(decays)
        y_sq, _ = self._direction_sums(n, sums, decay)
        s.dir_norm = math.sqrt(y_sq)
        s.grad_norm_avg = s.dir_norm
        s.probe_loss = mean_loss(losses)
        s.probe_slope = sum(sums.grad_sq) / (n * n) + sum(a * v / n for a, v in zip(decay, sums.grad_param))
        return self._move(n, decay, s.alpha, y_sq, y_sq, y_sq, beta=0.0)

    @staticmethod
    def _differ(losses: Sequence[float], reference: float | None = None, tolerance: float = 0.0) -> bool:
        """Whether losses differ by more than ``tolerance`` plus rounding (``reference``: one more value)."""
        values = [*losses] if reference is None else [*losses, reference]
        scale = max(abs(v) for v in values)
        return max(values) - min(values) > tolerance + LOSS_PRECISION * scale

    def _choose_regime(self, losses: Sequence[float], n: int, sums: StepSums) -> None:
        """Detect the regime from the first point after the first step (the probe).

        The first step moved ``x`` by ``length`` along ``y0`` (later retraces
        only shorten it). Without noise, the loss change is the trapezoid
        ``-length * (<g0, y0> + <g1, y0>) / 2`` up to third-order terms; with
        mini-batches the losses of different batches differ by far more than
        the tiny first step can explain. Uses global sums only, so every rank
        decides alike.
        """
        s = self.state
        mean = mean_loss(losses)
        length = s.offset / s.dir_coef if s.dir_coef else 0.0
        slope = sum(sums.grad_dir) / n * s.dir_coef
        predicted = s.probe_loss - 0.5 * length * (s.probe_slope + slope)
        noisy = self._differ(losses) or self._differ([mean], predicted, PROBE_TOLERANCE * abs(predicted - s.probe_loss))
        s.noise_free = not noisy
        logger.info("ELRA chose the %s regime at real step %d", self.regime, s.steps + 1)

    @property
    def _noise_aware(self) -> bool:
        return self.acceptance == "noise" and self.state.noise_free is False

    def _observe_noise(self, losses: Sequence[float]) -> float:
        """Update the loss noise (mean absolute difference of consecutive losses); the last loss, clipped.

        Each loss is first clipped to ``NOISE_CLIP`` noise units around the
        previous one, so one outlier (a buggy batch, a huge negative loss)
        moves neither the noise nor the loss statistics by much.
        """
        s = self.state
        reference = s.last_loss
        for value in losses:
            if not math.isfinite(value):
                continue
            if s.noise > 0.0:
                value = min(max(value, reference - NOISE_CLIP * s.noise), reference + NOISE_CLIP * s.noise)
            s.noise_samples += 1
            s.noise += (abs(value - reference) - s.noise) / min(s.noise_samples, NOISE_MEMORY)
            reference = value
        s.last_loss = reference
        return reference

    def _count_step(self) -> None:
        """Advance the step counters and run the per-cycle control every 100 steps."""
        s = self.state
        s.steps += 1
        s.window_steps += 1
        if s.steps % CYCLE:
            return
        if s.window_steps >= window_length(s.multiplier, self.batch_size):
            self._close_window()
        s.grad_norm_avg = s.dir_norm_sum / CYCLE
        self._update_weight_decay()
        self._update_schedule()
        s.cycle_retraces = 0
        if self.acceptance == "published":  # whose count forgets a longer window's earlier retraces
            s.window_retraces = 0
        s.angle_sum = 0.0
        s.angle_min = 0.0
        s.dir_norm_sum = 0.0

    def _close_window(self) -> None:
        """Compare the window's mean loss with the best so far; maybe grow the multiplier."""
        s = self.state
        accepted = self._window_losses() - 1  # the closing step's loss is recorded after the close
        mean = s.loss_sum / accepted if accepted > 0 else math.inf
        dev = math.sqrt(s.var_sum / accepted) if accepted > 0 else 0.0
        s.loss_sum = 0.0
        s.var_sum = 0.0
        s.window_steps = 0
        s.window_retraces = 0
        if mean > s.stat_mean:
            s.stalled_windows += 1
        else:
            s.stalled_windows = 0
            s.stat_mean = mean
        if s.increase_phase == 2:
            s.stat_mean = mean
            s.increase_phase = 0
        elif s.increase_phase == 1:
            s.increase_phase = 2
        s.increased = False
        self._check_progress(mean)
        s.stat_dev = dev
        s.dev_correction = 1.0
        if not self.deterministic:
            wanted = max(2 * s.multiplier, 2) if s.increased else s.multiplier
            self._set_multiplier(max(self.min_multiplier, min(wanted, MAX_MULTIPLIER)))

    def _check_progress(self, mean: float) -> None:
        """After six windows without progress (trend check at five), ask for a larger batch."""
        s = self.state
        s.stalled_windows, best, grow = check_progress(s.window_means, s.stalled_windows, mean)
        if best is not None:
            s.stat_mean = best
        if grow:
            s.increased = True
            s.increase_phase = 1

    def _update_weight_decay(self) -> None:
        """More decay when the validation loss lags the training loss (positive losses only)."""
        s = self.state
        s.wd_factor = validation_lag(s.train_loss, s.valid_loss, s.multiplier)

    def _update_schedule(self) -> None:
        s = self.state
        g = s.grad_norm_avg
        limit = math.log(g / STEP_CLIP) / math.log(1.5) if g > 0.0 else -math.inf
        if s.angle_sum > -1.0 and s.cycle_retraces > 0:
            s.schedule = max(limit, s.schedule - 1.0, SCHEDULE_MIN)
        if s.angle_min < -0.2:
            s.schedule += 1.0
        else:
            s.schedule = max(limit, s.schedule - 0.33, SCHEDULE_MIN)

    def _set_multiplier(self, value: int) -> None:
        s = self.state
        if value != s.multiplier:
            logger.info("ELRA batch multiplier %d -> %d at real step %d", s.multiplier, value, s.steps)
        s.multiplier = value

    def _acceptable(self, loss: float, best: float) -> bool:
        s = self.state
        noise_aware = self._noise_aware
        cap = s.loss_limit + 0.1 * abs(s.loss_limit) + (NOISE_CAP * s.noise if noise_aware else 0.0)
        # the noise rule refuses a loss above its cap: at a first loss of 0 without noise the cap is 0, and the
        # published strict bound refused a loss that stays at 0; the published rule keeps its own
        if not self.deterministic and not (loss <= cap if noise_aware else loss < cap):
            return False
        deviation = s.stat_dev * s.dev_correction
        if noise_aware and s.stat_dev == 0.0:
            # none measured yet (a first loss of 0 gives 0): the noise, else every higher loss is refused for ever
            deviation = s.noise
        return best <= s.stat_mean + 5.0 * deviation

    def _decay_coefficients(self, n: int, sums: StepSums, decays: Sequence[float]) -> list[float]:
        """Per-group coefficient ``a`` of the decoupled decay ``g_avg + a*x``."""
        s = self.state
        wds = self.weight_decays(decays)
        x_norm = math.sqrt(sum(sums.param_sq))
        if not any(wds) or x_norm <= 0.0:
            return [0.0] * len(wds)
        grad_norm = s.grad_norm_avg if s.grad_norm_avg > 0.0 else math.sqrt(sum(sums.grad_sq)) / n
        kappa = 0.005 * grad_norm / x_norm * (4.0 if s.increased else 2.0)
        return [wd * kappa for wd in wds]

    def _direction_is_finite(self, n: int, sums: StepSums, decays: Sequence[float]) -> bool:
        """Whether the new direction's sums are finite too (finite sums can overflow in them)."""
        decay = self._decay_coefficients(n, sums, decays)
        y_sq, y_dir = self._direction_sums(n, sums, decay)
        momentum = self.momentum or 0.0
        spread = momentum * momentum * sum(sums.dir_sq) + y_sq + abs(y_dir)
        return all(map(math.isfinite, (*decay, y_sq, y_dir, spread)))

    @staticmethod
    def _direction_sums(n: int, sums: StepSums, decay: Sequence[float]) -> tuple[float, float]:
        """``|y|^2`` and ``<y, B>`` for the new direction ``y = g/n + a*x``."""
        y_sq = 0.0
        y_dir = 0.0
        for j, a in enumerate(decay):
            y_sq += sums.grad_sq[j] / (n * n) + 2.0 * a * sums.grad_param[j] / n + a * a * sums.param_sq[j]
            y_dir += sums.grad_dir[j] / n + a * sums.param_dir[j]
        return max(y_sq, 0.0), y_dir

    def _accept(self, loss: float, n: int, sums: StepSums, decays: Sequence[float]) -> Decision:
        s = self.state
        decay = self._decay_coefficients(n, sums, decays)
        s.dev_correction = max(1.0, s.dev_correction / 1.05)
        self._record_accepted_loss(loss)
        s.last_good_loss = loss
        y_sq, y_dir = self._direction_sums(n, sums, decay)
        self._adapt_after_accept(y_dir * s.dir_coef, math.sqrt(y_sq))
        length = s.alpha if self.deterministic else s.rate
        decision = self._move(n, decay, length, y_sq, y_dir, sum(sums.dir_sq), beta=self.momentum or 0.0)
        s.accepted_any = True
        s.dir_norm_sum += s.dir_norm
        return decision

    def _move(
        self, n: int, decay: Sequence[float], length: float, y_sq: float, y_dir: float, dir_sq: float, beta: float
    ) -> Decision:
        """The tensor update of a step of ``length`` along ``y = g/n + a*x``.

        Without momentum the buffer stores ``n*y`` (one copy of the summed
        gradient, no scaling pass). With momentum it stores ``m = beta*m +
        (1-beta)*y`` and the direction is the projection of ``y`` on ``m``,
        a multiple of ``m`` whose factor comes from the sums.
        """
        s = self.state
        if self.momentum is None:
            decision = Decision("accept", 0.0, 1.0, tuple(n * a for a in decay), length / n)
            s.dir_coef = 1.0 / n
        else:
            new_dot = beta * y_dir + (1.0 - beta) * y_sq
            new_sq = max(beta * beta * dir_sq + 2.0 * beta * (1.0 - beta) * y_dir + (1.0 - beta) ** 2 * y_sq, 0.0)
            s.dir_coef = new_dot / new_sq if new_sq > 0.0 else 0.0
            s.dir_norm = abs(s.dir_coef) * math.sqrt(new_sq)
            decision = Decision("accept", beta, (1.0 - beta) / n, tuple((1.0 - beta) * a for a in decay), length)
        s.offset = decision.step
        return decision

    def _record_accepted_loss(self, loss: float) -> None:
        """Running loss statistics of the window (the published recurrences, unchanged)."""
        s = self.state
        n = s.window_steps
        s.loss_sum += loss
        if n:
            spread = s.loss_sum - self._window_losses() * loss
            s.var_sum += spread * spread / (n * n)
        else:
            s.var_sum = 0.0
        if s.steps <= n:
            count = self._window_losses()
            s.stat_mean = s.loss_sum / count
            s.stat_dev = math.sqrt(s.var_sum / count) * 1.05**s.cycle_retraces  # the window's, as published counts

    def _window_losses(self) -> int:
        """How many losses ``loss_sum`` holds once this step's is recorded, as the statistics count them.

        A window after the first holds the loss of the step that closed the
        one before (recorded after the close); the published count assumes one
        in the first window too, whose first step is counted already, counts a
        step without gradient twice, and, as it forgets a window's retraces
        every 100 steps, counts those of a longer window's earlier cycles as
        losses. Its mean was low by their share, and a loss large against its
        noise (shifted, or flat) was refused from the next window on while the
        batch doubled (without noise: a regression shifted by 1e4 ended 17
        times above the unshifted one's loss). The noise rule counts them
        right; ``acceptance="published"`` keeps the published count.
        """
        s = self.state
        carried = 0 if self.acceptance == "noise" and s.steps <= s.window_steps else 1
        return s.window_steps - s.window_retraces + carried

    def _growth(self, retrace: bool) -> float:
        s = self.state
        damp = s.growth_damper
        if retrace:
            if damp > 1.0:
                damp = damp * DAMPER_RETRACE_FACTOR if damp < GROWTH_SCALE / DAMPER_RETRACE_FACTOR else DAMPER_START
            else:
                damp += DAMPER_RETRACE_FACTOR
        else:
            damp /= DAMPER_SHRINK
        s.growth_damper = damp
        return GROWTH_SCALE / (1.0 + damp)

    def _adapt_after_accept(self, new_dot_old: float, new_norm: float) -> None:
        """Parabola step-size update from the gradient pair, then the rate schedule."""
        s = self.state
        old_sq = s.dir_norm * s.dir_norm
        growth = self._growth(retrace=False)
        s.slope = new_dot_old / old_sq if old_sq > 0.0 else 0.0
        s.rate_damper = math.sqrt(s.rate_damper)
        h = 1.0 - s.slope
        s.dir_norm = new_norm
        if growth * h < 1.0:
            s.alpha *= growth
        else:
            s.alpha = (s.alpha if self.deterministic else s.rate) / h
        s.rate = min(
            s.rate_damper * SCHEDULE_BASE ** (s.schedule + s.increased),
            s.rate_damper * self.warmup_factor * s.steps,
        )
        s.rate = max(RATE_FLOOR, s.rate)
        step_norm = s.rate * s.dir_norm
        if step_norm > STEP_CLIP:
            s.rate *= STEP_CLIP / step_norm
        slope = s.slope
        if slope > 0.0 and not self.deterministic:
            s.alpha = min(s.alpha, s.rate / slope)
        s.angle_sum += min(0.0, s.alpha * slope)
        s.angle_min = min(s.angle_min, s.alpha * slope)
        if s.alpha * slope < -0.1:
            s.alpha = -0.1 / slope
        s.alpha = min(max(s.alpha, ALPHA_BOUNDS[0]), ALPHA_BOUNDS[1])

    def _retrace(self, loss: float, bounds: RangeBounds | None = None) -> Decision:
        s = self.state
        # saturates: past about 14,550 retraces in one window the product overflowed to inf, and a measured
        # deviation of 0 times inf (nan) refused every later step until the window closed
        s.dev_correction = min(s.dev_correction * 1.05, sys.float_info.max)
        s.window_retraces += 1
        s.cycle_retraces += 1
        s.retraces += 1
        if not self.deterministic and s.cycle_retraces % RETRACES_PER_DOUBLING == RETRACES_PER_DOUBLING - 1:
            s.stalled_windows = 0
            self._set_multiplier(doubled(s.multiplier))
        self._growth(retrace=True)
        s.schedule = min(s.schedule + 0.4, SCHEDULE_MAX)
        s.rate_damper = max(1e-3, s.rate_damper * 0.5)
        if self._noise_aware and s.rate < RATE_FLOOR:
            s.rate *= 0.5  # cut below the floor by the step clip: the floor would lengthen the step retraced
        else:
            s.rate = max(RATE_FLOOR, s.rate * 0.5)
        if self.deterministic:
            self._refit_alpha(loss)
        elif not s.accepted_any and self.acceptance == "noise":
            s.alpha *= 0.5  # back along the refused first step; the published rule keeps its length (stays there)
        s.alpha = min(max(s.alpha, RETRACE_ALPHA_BOUNDS[0]), RETRACE_ALPHA_BOUNDS[1])
        length = s.rate if s.accepted_any and not self.deterministic else s.alpha
        new_offset = length * s.dir_coef
        shift = s.offset - new_offset
        between = shift * s.offset >= 0.0 and abs(shift) <= abs(s.offset)  # between two points held before
        if bounds is not None and not between and not bounds.allows_shift(shift):
            shift, new_offset = s.offset, 0.0  # back to the last good point exactly: it was in range
        s.offset = new_offset
        s.dir_norm_sum += s.dir_norm
        logger.debug("ELRA retrace %d at real step %d: loss %.4g, alpha %.4g", s.retraces, s.steps, loss, s.alpha)
        return Decision("retrace", shift=shift)

    def _refit_alpha(self, loss: float) -> None:
        """Deterministic retrace: minimum of the parabola through the two losses."""
        s = self.state
        old_sq = s.dir_norm * s.dir_norm
        denom = (loss - s.last_good_loss) + s.alpha * old_sq
        ratio = 0.5 * s.alpha * old_sq / denom if denom != 0.0 else math.nan
        s.alpha *= ratio if ratio < math.inf else 0.01
