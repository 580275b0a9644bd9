"""Property-based tests of the controllers: any inputs, finite and bounded outputs, exact restore."""

import json
import math

from hypothesis import example, given, settings
from hypothesis import strategies as st
import torch

from elra.control import MAX_MULTIPLIER, Controller, StepSums
from elra.line_control import ETA_BOUNDS, SMALLEST_ETA, LineController, LineSums

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
anything = st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e-300, 1e300]))
positive = st.one_of(st.floats(min_value=0.0, max_value=1e6), st.sampled_from([math.nan, math.inf, 0.0]))


@st.composite
def real_steps(draw):
    """One real step's inputs: losses for up to 3 micro-batches and sums (or no gradient)."""
    losses = draw(st.lists(anything, min_size=1, max_size=3))
    if draw(st.booleans()) and draw(st.booleans()):
        return losses, None
    sums = StepSums(
        grad_sq=[draw(positive)], grad_dir=[draw(anything)], dir_sq=[draw(positive)],
        param_sq=[draw(positive)], param_dir=[draw(anything)], grad_param=[draw(anything)],
    )
    return losses, sums


def _realizable(sums: StepSums) -> bool:
    """Whether some tensors g, x and B have these sums (one group): finite, and their Gram matrix,
    normalised by its diagonal, positive semidefinite. Only for those does the step clip bound the step
    of the momentum direction, the projection of y = g/n + a*x on beta*B + (1-beta)*y."""
    diag = [sums.grad_sq[0], sums.param_sq[0], sums.dir_sq[0]]
    off = {(0, 1): sums.grad_param[0], (0, 2): sums.grad_dir[0], (1, 2): sums.param_dir[0]}
    if not all(map(math.isfinite, diag + list(off.values()))):
        return False
    gram = torch.eye(3, dtype=torch.float64)
    for (i, j), value in off.items():
        norm = math.sqrt(diag[i] * diag[j])
        if abs(value) > norm * (1 + 1e-9):  # Cauchy-Schwarz
            return False
        gram[i, j] = gram[j, i] = value / norm if norm else 0.0
    return bool(torch.linalg.eigvalsh(gram).min() >= -1e-9)


def _decided_with_a_restored_twin(make, steps, decay):
    """Feeds ``steps`` to ``make()``'s controller, from the middle on also to a twin restored from its
    JSON state; yields each step's sums, decision and controller. The twin must decide alike and end
    in the same state."""
    controller, twin = make(), None
    for index, (losses, sums) in enumerate(steps):
        if index == len(steps) // 2:
            twin = make()
            twin.load_state_dict(json.loads(json.dumps(controller.state_dict())))
        decision = controller.real_step(losses, sums, [decay])
        if twin is not None:
            assert twin.real_step(losses, sums, [decay]) == decision
        yield sums, decision, controller
    if twin is not None:
        assert twin.state_dict() == controller.state_dict()


configs = st.fixed_dictionaries(
    {
        "lr": st.floats(min_value=1e-8, max_value=1.0),
        "classes": st.sampled_from([0, 1, 2, 10, 1000]),
        "batch_size": st.integers(1, 1024),
        "warmup": st.integers(0, 100),
        "momentum": st.sampled_from([None, 0.5, 0.9]),
        "min_multiplier": st.integers(1, 4),
    }
)


@settings(max_examples=150, deadline=None, database=None)  # no example database in the checkout
@given(config=configs, steps=st.lists(real_steps(), min_size=1, max_size=250), decay=st.sampled_from([0.0, 1e-4, 0.3]))
@example(  # sums no tensors can have (<g, x> = 1e300 with |g| = 0): found once by a random run
    config={"lr": 1.0, "classes": 0, "batch_size": 1, "warmup": 0, "momentum": 0.5, "min_multiplier": 1},
    steps=[([0.0], StepSums([1.0], [0.0], [0.0], [0.0], [0.0], [0.0])), ([0.0], StepSums([0.0], [0.0], [0.0], [1.0], [1e300], [1e300]))],
    decay=1e-4,
)
def test_decisions_are_finite_bounded_and_restorable_at_any_point(config, steps, decay):
    clipped = True  # whether the last accepted step's sums are those of some tensors
    for sums, decision, controller in _decided_with_a_restored_twin(lambda: Controller(**config), steps, decay):
        numbers = (decision.keep, decision.grad_scale, decision.step, decision.shift, *decision.param_scale)
        assert all(math.isfinite(v) for v in numbers)
        assert decision.step >= 0.0
        s = controller.state
        assert 1e-12 <= s.alpha <= 1e6
        # the floor 1e-5, unless the step clip (rate * |d| <= 10, applied after it as published) takes it lower
        assert 0.0 < s.rate and math.isfinite(s.rate)
        if decision.action == "accept":
            clipped = sums is None or _realizable(sums)
        assert s.rate >= 1e-5 or s.rate * s.dir_norm <= 10.0 * (1 + 1e-9) or not clipped
        assert 1 <= s.multiplier <= 6250
        assert controller.step_length > 0.0 and math.isfinite(controller.step_length)


@st.composite
def line_steps(draw):
    """One real step of the line controller: losses for up to 3 micro-batches and its sums (or no gradient)."""
    losses = draw(st.lists(anything, min_size=1, max_size=3))
    if draw(st.booleans()) and draw(st.booleans()):
        return losses, None
    return losses, LineSums(
        next_dir=draw(anything), mom_dir=draw(anything), dir_sq=draw(positive), param_sq=draw(positive),
        grad_sq=draw(positive), mom_sq=draw(positive),
    )


line_configs = st.fixed_dictionaries(
    {
        "lr": st.floats(min_value=1e-8, max_value=1.0),
        "classes": st.sampled_from([None, 0, 1, 2, 1000]),
        "batch_size": st.integers(1, 1024),
        "min_multiplier": st.integers(1, 4),
        "target": st.sampled_from([0.0, -0.1, -0.5]),
        "beta": st.sampled_from([None, 0.0, 0.9]),
    }
)


@settings(max_examples=150, deadline=None, database=None)
@given(config=line_configs, steps=st.lists(line_steps(), min_size=1, max_size=250), decay=st.sampled_from([0.0, 0.1]))
@example(  # D = 5e-324 rounds its EMA to 0: the ratio N/D was a ZeroDivisionError (found by a random run)
    config={"lr": 1.0, "classes": None, "batch_size": 1, "min_multiplier": 1, "target": 0.0, "beta": 0.0},
    steps=[([0.0], LineSums(0.0, 0.0, 0.0, 0.0)), ([0.0], LineSums(0.0, 5e-324, 0.0, 0.0))],
    decay=0.0,
)
@example(  # the largest |x| (the step clip's floor) set before the restore, smaller ones after it
    config={"lr": 1e-3, "classes": 1, "batch_size": 1, "min_multiplier": 1, "target": 0.0, "beta": 0.9},
    steps=[([4.0 - k], LineSums(1.0, 1.0, 1.0, param_sq)) for k, param_sq in enumerate((1.0, 100.0, 1.0, 1.0))],
    decay=0.0,
)
@example(  # eta * weight_decay > 1 (large weights): the decay factor 1 - eta*wd was negative
    config={"lr": 100.0, "classes": 0, "batch_size": 1, "min_multiplier": 1, "target": 0.0, "beta": 0.9},
    steps=[([1.0], LineSums(1.0, 1.0, 1.0, 1e6))],
    decay=0.1,
)
def test_line_decisions_are_finite_bounded_and_restorable_at_any_point(config, steps, decay):
    """The line controller (the preconditioned directions) under any inputs, like the P2M one above."""
    for _, decision, controller in _decided_with_a_restored_twin(lambda: LineController(**config), steps, decay):
        assert decision.action in ("accept", "retrace", "skip")
        assert all(math.isfinite(v) for v in (decision.step, decision.shift, *decision.decay))
        assert decision.step >= 0.0 and all(0.0 <= d <= 1.0 for d in decision.decay)
        s = controller.state
        assert SMALLEST_ETA <= s.eta <= ETA_BOUNDS[1] or (s.restart and s.eta == 0.0)  # back at x_old
        assert not decision.restart or decision.action == "accept"
        assert math.isfinite(s.param_peak) and s.param_peak >= 0.0
        assert 1 <= s.multiplier <= MAX_MULTIPLIER
