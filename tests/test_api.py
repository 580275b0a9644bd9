"""The optimizer API: arguments, step forms, collection, groups, stats, logging."""

import copy
import logging

import numpy as np
import pytest
import torch

from conftest import backward_and_step, cubic_data, cubic_model, digits_data, digits_model, digits_steps
from elra import ElraOptimizer


def _param(*values):
    return torch.nn.Parameter(torch.tensor(values))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "Invalid lr "),
        ({"lr": -1e-5}, "Invalid lr "),
        ({"lr": float("nan")}, "Invalid lr "),
        ({"lr": "1e-5"}, "Invalid lr "),
        ({"lr": torch.tensor([1e-5, 1e-5])}, "Invalid lr "),
        ({"lr": torch.tensor(-1e-5)}, "Invalid lr "),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"classes": -1}, "classes"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": 1.5}, "weight_decay"),
        ({"warmup": -1}, "warmup"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.5}, "momentum"),
        ({"batch_multiplier": 0}, "batch_multiplier"),
        ({"batch_multiplier": True}, "batch_multiplier"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 100.0}, "total_steps"),
        ({"total_steps": True}, "total_steps"),
        ({"total_steps": 100, "preconditioner": None}, "total_steps .* needs a preconditioner"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElraOptimizer([_param(1.0)], **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"model": "net"}, "model"), ({"process_group": "world"}, "process_group"), ({"replicas": 2}, "replicas"),
     ({"compiled": 1}, "compiled")],
)
def test_arguments_of_the_wrong_type_raise_type_error_naming_them(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ElraOptimizer([_param(1.0)], **kwargs)


def test_an_lr_given_as_a_one_element_tensor_is_taken_as_its_number():
    """torch's optimizers (and the published package) take ``lr=torch.tensor(1e-5)``; ELRA refused it."""
    from_tensor = ElraOptimizer([_param(1.0)], lr=torch.tensor(2e-5, dtype=torch.float64))
    assert from_tensor.defaults["lr"] == 2e-5 and from_tensor.state_dict()["param_groups"][0]["elra_config"]["lr"] == 2e-5


def test_an_lr_passed_second_as_torchs_optimizers_take_it_is_named_as_such():
    """``Adam(params, 1e-3)``'s habit: ELRA's second argument is the model, and the error only said it was no
    module."""
    with pytest.raises(TypeError, match=r"got float: ELRA's second argument is the model, pass lr=\.\.\. by name"):
        ElraOptimizer([_param(1.0)], 1e-4)


def test_seed_constructor_forms():
    model = cubic_model()
    ElraOptimizer(model.parameters(), model=model, lr=1e-6)
    opt = ElraOptimizer(list(model.parameters()), None, 32, 10, lr=1e-5, weight_decay=0.99999)
    assert opt.stats["weight_decay"] == pytest.approx(1e-5)


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_stats_show_the_weight_decay_a_group_edit_puts_in_force(preconditioner):
    p = _param(1.0, 2.0)
    opt = ElraOptimizer([p], None, 8, 3, weight_decay=1e-2, preconditioner=preconditioner)
    for step in range(4):
        if step == 2:
            opt.param_groups[0]["weight_decay"] = 0.05
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        opt.step(loss)
    assert opt.stats["weight_decay"] == pytest.approx(0.05)


def test_step_without_loss_raises_type_error_asking_for_it():
    """transformers' plain Trainer calls ``step()`` too: the error names the adapter that passes the loss."""
    p = _param(1.0, 2.0)
    opt = ElraOptimizer([p])
    (p**2).sum().backward()
    with pytest.raises(TypeError, match="needs the loss.*transformers.ElraTrainer"):
        opt.step()
    with pytest.raises(TypeError, match="closure given to ElraOptimizer.step returned None"):
        opt.step(lambda: None)  # Lightning's training_step skipping a batch
    assert opt.stats["micro_batches"] == 0 and opt.stats["real_steps"] == 0


@pytest.mark.parametrize("bad, error", [(torch.ones(2), ValueError), ("1.0", TypeError), (True, TypeError)])
def test_bad_loss_values_raise(bad, error):
    p = _param(1.0, 2.0)
    opt = ElraOptimizer([p])
    (p**2).sum().backward()
    with pytest.raises(error):
        opt.step(bad)
    assert opt.stats["real_steps"] == 0


def _cubic_run(step_form, steps=60):
    xx, y = cubic_data()
    model = cubic_model()
    opt = ElraOptimizer(model.parameters(), lr=1e-6)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xx), y)
            loss.backward()
            return loss

        if step_form == "closure":
            opt.step(closure)
        else:
            loss = closure()
            opt.step(loss.item() if step_form == "float" else loss)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), opt


@pytest.mark.parametrize("scale", [2.0**16, torch.tensor(2.0**16)])
def test_the_published_step_with_a_scale_names_the_scaler_and_changes_nothing(scale):
    """Code ported from the published package calls step(loss, scale): the error said a closure was passed."""
    p = _param(1.0)
    opt = ElraOptimizer([p])
    loss = (p**2).sum()
    loss.backward()
    with pytest.raises(TypeError, match="ElraGradScaler"):
        opt.step(loss, scale)
    with pytest.raises(TypeError, match="ElraGradScaler"):
        opt.step(loss, closure=scale)
    assert p.item() == 1.0 and opt.stats["real_steps"] == opt.micro_batches == 0
    opt.step(loss)
    assert opt.stats["real_steps"] == 1


def test_a_loss_handed_on_as_the_closure_is_named_as_such_and_changes_nothing():
    """A wrapper's ``step(loss)`` that hands the loss on as ``closure=`` (ZeroRedundancyOptimizer) was told to
    use ElraGradScaler, the advice for the published ``step(loss, scale)``."""
    p = _param(1.0)
    opt = ElraOptimizer([p])
    loss = (p**2).sum()
    loss.backward()
    named = r"needs a callable, got Tensor: pass the loss as step\(loss\).*step\(loss=loss\)"
    with pytest.raises(TypeError, match=named):
        opt.step(closure=loss)
    assert p.item() == 1.0 and opt.stats["real_steps"] == opt.micro_batches == 0


def test_a_loss_beside_a_wrappers_closure_names_the_closure_form_and_changes_nothing():
    """Lightning's ``self.optimizers().step(loss=loss)`` adds a closure of its own: "pass the loss or a closure,
    not both" blamed the caller for a closure it never passed. The message names the form that works, which
    then takes the step as ``step(loss)`` does."""
    p = _param(1.0)
    opt = ElraOptimizer([p])
    loss = (p**2).sum()
    loss.backward()
    with pytest.raises(TypeError, match=r"not both \(a wrapper may add a closure.*step\(closure=lambda: loss\)"):
        opt.step(loss, closure=lambda: None)
    assert p.item() == 1.0 and opt.stats["real_steps"] == opt.micro_batches == 0
    assert opt.step(closure=lambda: loss) is loss and opt.stats["real_steps"] == 1


def test_float_tensor_and_closure_losses_give_identical_trajectories():
    by_float, _ = _cubic_run("float")
    by_tensor, _ = _cubic_run("tensor")
    by_closure, opt = _cubic_run("closure")
    assert torch.equal(by_float, by_tensor)
    assert torch.equal(by_float, by_closure)
    assert opt.stats["real_steps"] == 60


@pytest.mark.parametrize("backend, preconditioner, scaled", [("eager", "muon", False), ("aot_eager", None, True)])
def test_a_compiled_training_step_runs_elras_step_as_written(backend, preconditioner, scaled):
    """``torch.compile`` of a whole training step (zero_grad, forward, backward, step), as torch's optimizers allow.
    Dynamo traced into ELRA's step and skipped the real steps without a word (batch multiplier 2: 0 of 5 taken),
    or failed inside torch (functionalization of the fused kernels). The step, zero_grad and the scaler now run
    eagerly at a graph break: the same trajectory as the loop uncompiled."""
    from elra import ElraGradScaler

    def run(compiled: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        opt = ElraOptimizer(model.parameters(), None, 8, 0, preconditioner=preconditioner, batch_multiplier=2)
        scaler = ElraGradScaler(init_scale=16.0)
        x, y = torch.randn(80, 4, dtype=torch.float64), torch.randn(80, 2, dtype=torch.float64)

        def train_step(xb, yb):
            opt.zero_grad()
            backward_and_step(opt, torch.nn.functional.mse_loss(model(xb), yb), scaler if scaled else None)

        step = torch.compile(train_step, backend=backend) if compiled else train_step
        for i in range(10):
            step(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
        return torch.cat([p.detach().flatten() for p in model.parameters()]), opt.stats

    (expected, expected_stats), (params, stats) = run(False), run(True)
    assert expected_stats["real_steps"] == stats["real_steps"] == 5
    assert torch.equal(params, expected) and stats == expected_stats


def test_closure_returns_loss():
    p = _param(1.0, 2.0)
    opt = ElraOptimizer([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0


def test_parameters_without_grad_are_left_alone():
    used, unused = _param(1.0, 2.0), _param(3.0, 4.0)
    opt = ElraOptimizer([used, unused], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        opt.step(loss)
    assert torch.equal(unused.detach(), torch.tensor([3.0, 4.0]))
    assert not torch.equal(used.detach(), torch.tensor([1.0, 2.0]))
    assert not any(t.any() for t in opt.state[unused].values() if isinstance(t, torch.Tensor))


def test_step_without_any_gradient_raises_and_keeps_state():
    p = _param(1.0)
    opt = ElraOptimizer([p])
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.step(1.0)
    assert opt.stats["real_steps"] == 0


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ElraOptimizer(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(1.0)


def test_collected_micro_batches_average_their_gradients():
    p = _param(1.0, 2.0)
    opt = ElraOptimizer([p], classes=10, lr=0.1, batch_multiplier=3, preconditioner=None)  # P2M's first step: -lr*g
    directions = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]), torch.tensor([2.0, 2.0])]
    seen = []
    for d in directions:
        seen.append(opt.collecting)
        opt.zero_grad()
        (p * d).sum().backward()
        opt.step(1.0)
    assert seen == [True, True, False]
    expected = torch.tensor([1.0, 2.0]) - 0.1 * sum(directions) / 3
    assert torch.allclose(p.detach(), expected)
    assert opt.stats["real_steps"] == 1


def test_model_zero_grad_while_collecting_fails_loudly():
    model = torch.nn.Linear(2, 1)
    opt = ElraOptimizer(model.parameters(), classes=10, batch_multiplier=2)
    model(torch.ones(1, 2)).sum().backward()
    opt.step(1.0)
    model.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="model.zero_grad"):
        opt.step(1.0)


def test_a_gradient_edit_while_collecting_works_in_place_and_names_itself_out_of_place():
    """``p.grad = p.grad * c`` reads as a reset once ELRA collects: the error blamed ``model.zero_grad()`` alone.
    In place it trains on, the edit applied to the sum kept so far (as torch's accumulation in ``.grad`` does)."""

    def run(edit):
        torch.manual_seed(0)
        model, inputs = torch.nn.Linear(3, 1, dtype=torch.float64), torch.randn(4, 4, 3, dtype=torch.float64)
        opt = ElraOptimizer(model.parameters(), classes=10, batch_multiplier=2)
        for x in inputs:
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            for p in model.parameters():
                edit(p)
            opt.step(loss)
        return list(model.parameters())

    def replace(p):
        p.grad = p.grad * 0.5

    with pytest.raises(RuntimeError, match=r"Edit gradients in place \(p.grad.mul_"):
        run(replace)
    halved = run(lambda p: p.grad.mul_(0.5))
    assert not all(torch.equal(a, b) for a, b in zip(halved, run(lambda p: None)))


def test_after_a_reset_while_collecting_the_optimizer_recovers_with_a_new_collection():
    """The reset raised at every later step too (the collected gradients could never come back), even once the
    loop used optimizer.zero_grad(): the collection is dropped, and training goes on as from that point."""

    def collect(model, opt, inputs):
        for x in inputs:
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step(loss)

    torch.manual_seed(0)
    model, inputs = torch.nn.Linear(3, 1), torch.randn(6, 4, 3)
    reference = copy.deepcopy(model)
    opt = ElraOptimizer(model.parameters(), classes=10, batch_multiplier=2)
    collect(model, opt, inputs[:1])
    model.zero_grad()
    model(inputs[1]).sum().backward()
    with pytest.raises(RuntimeError, match="model.zero_grad"):
        opt.step(1.0)
    assert opt.micro_batches == 0 and opt.stats["real_steps"] == 0
    collect(model, opt, inputs[2:])
    collect(reference, ElraOptimizer(reference.parameters(), classes=10, batch_multiplier=2), inputs[2:])
    assert opt.stats["real_steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_optimizer_zero_grad_keeps_gradients_while_collecting():
    p = _param(1.0)
    opt = ElraOptimizer([p], classes=10, batch_multiplier=2)
    (2 * p).sum().backward()
    opt.step(1.0)
    opt.zero_grad()
    assert p.grad is not None and p.grad.item() == 2.0
    (3 * p).sum().backward()
    opt.step(1.0)
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_a_step_without_backward_while_collecting_is_refused(preconditioner):
    """A step(loss) with no backward before it was collected silently: as a micro-batch without gradient (the
    real step's gradient then halved), or a repeat of the last one's. Refused as at a real step, and the run
    goes on as if the call had not been made; a backward of a zero gradient is a gradient."""

    def run(extra=None):
        torch.manual_seed(0)
        model, inputs = torch.nn.Linear(3, 2), torch.randn(8, 4, 3)
        opt = ElraOptimizer(model.parameters(), classes=10, batch_multiplier=2, preconditioner=preconditioner)
        for i, x in enumerate(inputs):
            opt.zero_grad()
            loss = model(x).square().mean()
            if extra == "nothing" and i == 2:
                with pytest.raises(RuntimeError, match="no parameter has a gradient"):
                    opt.step(loss)
            if extra == "zero" and i == 2:
                (0.0 * loss).backward(retain_graph=True)
                opt.step(loss)
            loss.backward()
            opt.step(loss)
            if extra == "again" and i == 2:  # micro-batch 1 of 2 was collected
                with pytest.raises(RuntimeError, match="without a backward"):
                    opt.step(loss)
        return list(model.parameters()), opt.stats["real_steps"]

    reference, steps = run()
    for extra in ("nothing", "again"):
        params, taken = run(extra)
        assert taken == steps and all(torch.equal(a, b) for a, b in zip(params, reference))
    params, _ = run("zero")  # a micro-batch more, with its gradient of zeros
    assert not all(torch.equal(a, b) for a, b in zip(params, reference))


def test_zero_grad_after_a_backward_no_step_counted_while_collecting_is_warned_of_once(caplog):
    """A GAN's loop: the generator's backward reaches the critic's weights, and the zero_grad() that would clear
    them in torch keeps ELRA's collected sums, so the generator's gradient joined the critic's real step silently.
    Warned of, once; not refused: an in-place edit of .grad reads the same (clip_grad_norm_ after step() to log
    the norm, which a refusal broke)."""
    torch.manual_seed(0)
    generator, critic = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    opt = ElraOptimizer(critic.parameters(), classes=10, batch_multiplier=2)
    noise = torch.randn(4, 2)
    with caplog.at_level(logging.WARNING, logger="elra"):
        critic(generator(noise).detach()).mean().backward()
        opt.step(1.0)
        critic(generator(noise)).mean().backward(inputs=list(generator.parameters()))
        opt.zero_grad()  # nothing reached the critic's weights since its step
        assert not caplog.records
        critic(generator(noise)).mean().backward()
        opt.zero_grad()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), float("inf"))
        opt.zero_grad()
    assert len(caplog.records) == 1 and "gradients changed since the last step(loss)" in caplog.records[0].getMessage()


def test_the_backward_checks_leave_parameters_whose_gradients_a_wrapper_moves_alone(tmp_path):
    """DDP's bucket views move the model's gradients, so only the optimizer's other parameter (frozen, never a
    gradient) showed: every collection was refused as one without any gradient (as FSDP1 with a frozen
    ignored module). The checks look only where every parameter's .grad shows a backward."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2), gradient_as_bucket_view=True)
        frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
        opt = ElraOptimizer([*model.parameters(), frozen], model, 4, 2, batch_multiplier=2)
        for x in torch.randn(4, 4, 3):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step(loss)
        assert opt.stats["real_steps"] == 2
    finally:
        dist.destroy_process_group()


def test_param_group_lr_shows_the_current_rate_and_schedulers_do_not_steer():
    def run(with_scheduler):
        x, y = digits_data(torch.float32)
        model = digits_model(torch.float32)
        opt = ElraOptimizer(model.parameters(), None, 32, 10, lr=1e-5)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1) if with_scheduler else None
        digits_steps(model, opt, x, y, 50, 0, after_step=lambda _: scheduler.step() if scheduler else None)
        return [p.detach().clone() for p in model.parameters()], opt

    plain, opt = run(False)
    scheduled, _ = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, scheduled))
    assert opt.param_groups[0]["lr"] == opt.stats["lr"] != 1e-5


def test_p2m_reports_the_length_its_first_steps_take_with_classes_given():
    """P2M with ``classes`` given (the published call): after the first step ``stats["lr"]`` and
    ``param_groups[0]["lr"]`` showed the rate's initial 0.1, a length no step had taken (the first step, and a
    retrace before any accepted step, move by ``alpha``). They show the length the point is at, measured from
    the parameters: ``x = x0 - lr * g0`` (no momentum, no decay)."""
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = ElraOptimizer([x], None, 8, 10, lr=1e-4, preconditioner=None)
    x0 = x.detach().clone()
    for scale in (1.0, 1e9):  # the second loss is far above the cap: refused, retraced along the first step
        opt.zero_grad()
        loss = ((x - 3.0) ** 2).sum() * scale
        loss.backward()
        if scale == 1.0:
            g0 = x.grad.clone()
        opt.step(loss)
        lengths = (x0 - x.detach()) / g0
        assert torch.allclose(lengths, lengths[0], rtol=1e-9)
        assert opt.stats["lr"] == opt.param_groups[0]["lr"] == pytest.approx(lengths[0].item(), rel=1e-9)
    assert opt.stats["regime"] == "stochastic" and opt.stats["retraces"] == 1


@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_a_group_added_mid_run_shows_the_current_step_length_at_once(preconditioner):
    """``param_groups[i]["lr"]`` shows the current step length (learning-rate monitors read it): a group added
    after steps showed the constructor's lr instead, until the next real step (with a batch multiplier, all the
    micro-batches until then), while ``stats["lr"]`` and the other groups showed the step length in force."""
    a, b = _param(1.0, 2.0), _param(3.0)
    opt = ElraOptimizer([a], lr=1e-5, batch_multiplier=3, preconditioner=preconditioner)
    for step in range(31):
        opt.zero_grad()
        loss = (a**2).sum()
        loss.backward()
        opt.step(loss)
    assert opt.collecting and opt.stats["lr"] != 1e-5
    opt.add_param_group({"params": [b], "weight_decay": 0.0})
    assert [g["lr"] for g in opt.param_groups] == [opt.stats["lr"]] * 2


def test_add_param_group_after_steps_trains_the_new_group():
    a, b = _param(1.0, 2.0), _param(3.0)
    opt = ElraOptimizer([a], lr=1e-3)
    for step in range(150):
        if step == 20:
            opt.add_param_group({"params": [b], "weight_decay": 0.0})
        opt.zero_grad()
        loss = (a**2).sum() + (b**2).sum()
        loss.backward()
        opt.step(loss)
    assert abs(b.item()) < 1e-2 and a.abs().max() < 1e-2


@pytest.mark.parametrize("preconditioner", [None, "adam", "muon"])
@pytest.mark.parametrize("added", ["new", "again"])
def test_a_parameter_put_into_param_groups_directly_is_refused_before_the_step_changes_anything(preconditioner, added):
    """torch's optimizers make state lazily, so appending to ``param_groups[i]["params"]`` trains there; ELRA
    made its state in ``add_param_group`` and failed inside the step with ``KeyError: 'exp_avg'`` (a parameter
    appended twice went unseen and counted twice in every sum). Now ``ValueError`` names ``add_param_group``,
    and the run then goes on as one that used it."""
    def run(detour: bool):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2, 2))
        opt = ElraOptimizer([a], None, 8, 1, lr=1e-3, preconditioner=preconditioner)
        for step in range(8):
            if step == 3 and detour:
                params = opt.param_groups[0]["params"]
                params.append(b if added == "new" else a)
                loss = (a**2).sum() + (b**2).sum()
                loss.backward()
                with pytest.raises(ValueError, match="add_param_group"):
                    opt.step(loss)
                params.pop()
                opt.zero_grad()
            if step == 3:
                opt.add_param_group({"params": [b]})
            opt.zero_grad()
            loss = (a**2).sum() + (b**2).sum() * (step >= 3)
            loss.backward()
            opt.step(loss)
        return [a.detach(), b.detach()], opt.stats

    (plain, stats), (detoured, detoured_stats) = run(False), run(True)
    assert detoured_stats == stats and all(torch.equal(x, y) for x, y in zip(plain, detoured))


def test_group_weight_decay_applies_only_to_its_group():
    decayed, plain = _param(1.0, 1.0), _param(1.0, 1.0)
    opt = ElraOptimizer([{"params": [decayed], "weight_decay": 0.1}, {"params": [plain], "weight_decay": 0.0}], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        loss = decayed.sum() + plain.sum()
        loss.backward()
        opt.step(loss)
    assert (plain.detach() < 1.0).all()
    assert (decayed.detach() < plain.detach()).all()


def test_stats_hold_the_documented_keys():
    opt = ElraOptimizer([_param(1.0)])
    assert {"real_steps", "retraces", "batch_multiplier", "lr", "alpha", "weight_decay"} <= opt.stats.keys()


def test_p2m_only_options_set_with_a_preconditioner_are_reported_not_silently_dropped(caplog):
    """``warmup`` and ``acceptance`` act on P2M's controller only: along a preconditioned direction
    they changed nothing, silently (the seed's half-precision example asks for ``warmup=10``)."""

    def train(**options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = ElraOptimizer(model.parameters(), None, 8, 2, **options)
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):
            x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    caplog.set_level(logging.WARNING, logger="elra")
    assert torch.equal(train(), train(warmup=10, acceptance="published"))
    assert [r.getMessage() for r in caplog.records] == [
        "ELRA: warmup=10 and acceptance='published' apply to P2M (preconditioner=None) only: "
        "preconditioner='muon' ignores them"
    ]
    caplog.clear()
    assert not torch.equal(train(preconditioner=None), train(preconditioner=None, warmup=10))
    assert not torch.equal(train(preconditioner=None), train(preconditioner=None, acceptance="published"))
    ElraOptimizer([_param(1.0)], preconditioner="adam", warmup=1)
    assert caplog.records == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), torch.tensor(-float("inf")), np.float32("nan")])
def test_a_non_finite_reported_loss_is_refused_and_changes_nothing(value):
    opt = ElraOptimizer([_param(1.0)])
    opt.set_train_loss(2.0)
    opt.set_valid_loss(3.0)
    before = copy.deepcopy(opt.state_dict())
    for report in (opt.set_train_loss, opt.set_valid_loss):
        with pytest.raises(ValueError, match="must be finite"):
            report(value)
    assert opt.state_dict()["param_groups"][0]["elra_controller"] == before["param_groups"][0]["elra_controller"]


def test_library_logs_through_elra_logger_and_prints_nothing(capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="elra")
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0]))
    opt = ElraOptimizer([xy], lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss = (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2
        loss.backward()
        opt.step(loss)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert opt.stats["retraces"] > 0
    assert any(r.name == "elra" and "retrace" in r.getMessage() for r in caplog.records)


def test_process_group_without_initialised_distributed_raises(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        p = _param(1.0)
        opt = ElraOptimizer([p], process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    (p * 2).sum().backward()
    with pytest.raises(RuntimeError, match="not initialised"):
        opt.step(1.0)
    assert opt.stats["real_steps"] == 0


def test_process_group_must_be_a_group():
    with pytest.raises(TypeError, match="process_group"):
        ElraOptimizer([_param(1.0)], process_group="world")


def test_process_group_auto_read_from_a_config_file_is_the_default():
    """``"auto"`` read from JSON or a command line is another string object than the constructor's default,
    which was compared by identity: it raised "process_group must be 'auto', ..., got 'auto'"."""
    from elra.reduce import AUTO

    read = "".join(["au", "to"])
    assert read == AUTO and read is not AUTO  # an equal string, not the same object
    opt = ElraOptimizer([_param(1.0)], process_group=read)
    assert copy.deepcopy(opt).stats == opt.stats  # pickling needs the default marker too


def test_parameter_on_a_mesh_of_another_size_than_the_group_raises():
    from elra.reduce import Reducer

    class Shard:  # a DTensor-like parameter on a 4-rank mesh
        class device_mesh:
            @staticmethod
            def size(dim=None):
                return 4

        placements = ()

    with pytest.raises(ValueError, match="mesh of 4 ranks"):
        Reducer(process_group=None).replicas(Shard())


def test_named_parameters_train_like_parameters_and_keep_their_names():
    plain_model, named_model = cubic_model(), cubic_model()
    plain = ElraOptimizer(plain_model.parameters(), lr=1e-6)
    named = ElraOptimizer(named_model.named_parameters(), lr=1e-6)
    xx, y = cubic_data()
    for _ in range(30):
        for model, opt in ((plain_model, plain), (named_model, named)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xx), y, reduction="sum")
            loss.backward()
            opt.step(loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), named_model.parameters()))
    assert named.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias"]
    again = ElraOptimizer(cubic_model().named_parameters(), lr=1e-6)
    again.load_state_dict(named.state_dict())
    assert again.stats == named.stats


@pytest.mark.parametrize(
    "group, match",
    [
        ({"lr": 1e-2}, "per-group learning rates"),
        ({"momentum": 0.9}, "one momentum"),
        ({"betas": (0.5, 0.5)}, "'betas'"),
        ({"eps": 1.0, "nesterov": True}, "'eps', 'nesterov'"),
        ({"lr_scale": 0.65}, "lr_scale=0.65"),
    ],
)
def test_per_group_lr_and_momentum_are_refused(group, match):
    with pytest.raises(ValueError, match=match):
        ElraOptimizer([{"params": [_param(1.0)], **group}, {"params": [_param(2.0)]}], lr=1e-5, momentum=0.5)
    ElraOptimizer([{"params": [_param(1.0)], "lr": 1e-5, "momentum": 0.5, "lr_scale": 1.0}], lr=1e-5, momentum=0.5)


def test_foreign_group_options_and_sets_are_refused_by_add_param_group_too():
    opt = ElraOptimizer([_param(1.0)], lr=1e-5)
    with pytest.raises(ValueError, match="'amsgrad'"):
        opt.add_param_group({"params": [_param(2.0)], "amsgrad": True})
    with pytest.raises(TypeError, match="ordered collection"):
        opt.add_param_group({"params": {_param(3.0)}})
    assert len(opt.param_groups) == 1 and len(opt.state) == 1


@pytest.mark.parametrize("preconditioner", [None, "muon"])
@pytest.mark.parametrize("key, value", [("momentum", 0.5), ("maximize", True), ("betas", (0.5, 0.9)), ("lr_scale", 0.5)])
def test_an_option_written_into_param_groups_mid_run_is_refused_before_the_step_changes_anything(
    preconditioner, key, value
):
    """Given to the constructor these raise; written into ``param_groups`` after it, ELRA kept them (and saved
    them) while the run went on without them: ``maximize=True`` went on minimising. Now the next step (a
    collecting one too) and ``step_retrace`` raise, nothing moves, and without the key the run goes on as one
    that never had it."""

    def run(detour: bool):
        torch.manual_seed(0)
        x = torch.randn(64, 3)
        model = torch.nn.Linear(3, 2)
        opt = ElraOptimizer(model.parameters(), None, 8, 0, lr=1e-4, preconditioner=preconditioner, batch_multiplier=2)
        for step in range(12):
            opt.zero_grad()
            loss = model(x[step::12]).square().mean()
            loss.backward()
            if detour and step in (5, 6):  # 5 collects, 6 completes a real step
                opt.param_groups[0][key] = value
                before = [p.detach().clone() for p in model.parameters()]
                for call in (opt.step, opt.step_retrace):
                    with pytest.raises(ValueError, match=key):
                        call(loss)
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
                del opt.param_groups[0][key]
            opt.step(loss)
        return [p.detach() for p in model.parameters()], opt.stats

    (plain, stats), (detoured, detoured_stats) = run(False), run(True)
    assert detoured_stats == stats and all(torch.equal(x, y) for x, y in zip(plain, detoured))


@pytest.mark.parametrize("preconditioner", ["adam", "muon"])
def test_losses_handed_over_in_one_reused_tensor_are_the_values_it_held_then(preconditioner):
    """ELRA keeps each collected micro-batch's loss until the real step; it kept a view of the caller's tensor,
    so a loss buffer reused in place (CUDA-graph training's static output) left every kept loss at the last
    value, and the steps judged the wrong losses (a noise-free fit in 4 micro-batches ended at 0.073 instead of
    0.029; here 22 retraces against 8). The run through one buffer now equals the run handed ``loss.item()``."""

    def run(reused: bool):
        torch.manual_seed(0)
        x = torch.randn(128, 4, dtype=torch.float64)
        y = torch.sin(x.sum(1, keepdim=True))
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        opt = ElraOptimizer(model.parameters(), None, 32, 0, preconditioner=preconditioner, batch_multiplier=4)
        buffer = torch.zeros((), dtype=torch.float64)
        for step in range(400):
            part = slice(step % 4 * 32, step % 4 * 32 + 32)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
            loss.backward()
            opt.step(buffer.copy_(loss.detach()) if reused else loss.item())
        return [p.detach() for p in model.parameters()], opt.stats

    (plain, stats), (reused, reused_stats) = run(False), run(True)
    assert reused_stats == stats and all(torch.equal(a, b) for a, b in zip(plain, reused))


def test_skip_backward_takes_a_numeric_limit_only():
    opt = ElraOptimizer([_param(1.0)], lr=1e-5)
    assert opt.skip_backward(3.0, limit=2) and not opt.skip_backward(1.0, limit=2.5)
    for limit in ("x", True, float("nan")):
        with pytest.raises(TypeError, match="limit must be a number"):
            opt.skip_backward(1.0, limit=limit)


def test_numpy_losses_are_accepted_like_floats():
    np = pytest.importorskip("numpy")
    forms = [lambda v: v, lambda v: np.float32(v), lambda v: np.array(v), lambda v: np.array([v])]
    ends = []
    for form in forms:
        p = _param(1.0, -2.0)
        opt = ElraOptimizer([p], lr=1e-3)
        for _ in range(20):
            opt.zero_grad()
            loss = (p**2).sum()
            loss.backward()
            opt.step(form(loss.item()))
        opt.set_train_loss(form(0.5))
        opt.set_valid_loss(form(0.6))
        ends.append(p.detach().clone())
    assert all(torch.equal(end, ends[0]) for end in ends)


@pytest.mark.parametrize("make", [lambda np: torch.tensor(True), lambda np: np.bool_(True), lambda np: np.array(True)])
def test_boolean_losses_are_refused_in_every_form(make):
    np = pytest.importorskip("numpy")
    p = _param(1.0, 2.0)
    opt = ElraOptimizer([p])
    (p**2).sum().backward()
    with pytest.raises(TypeError, match="boolean"):
        opt.step(make(np))
    with pytest.raises(TypeError):
        opt.set_train_loss(make(np))
    assert opt.stats["real_steps"] == 0


def test_the_published_packages_other_api_is_refused_as_the_readme_says():
    """README, How it compares: mode and dummy raise TypeError; positionally the sixth argument is weight_decay
    (the package's mode); step(loss, scale) names ElraGradScaler; the package's other methods do not exist."""
    p = _param(1.0, 2.0)
    for option in ("mode", "dummy"):
        with pytest.raises(TypeError, match=option):
            ElraOptimizer([p], None, 32, 10, 1e-5, **{option: 1})
    assert ElraOptimizer([p], None, 32, 10, 1e-5, 0.9999).state_dict()["param_groups"][0]["weight_decay"] == 0.9999
    with pytest.raises(ValueError, match="weight_decay"):
        ElraOptimizer([p], None, 32, 10, 1e-5, "P2M")
    optimizer = ElraOptimizer([p], None, 32, 10)
    p.pow(2).sum().backward()
    with pytest.raises(TypeError, match="ElraGradScaler"):
        optimizer.step(1.0, 2.0)
    for name in ("step_noscale", "step_allinone", "check_next_step", "get_param", "set_param", "get_gradient",
                 "get_boost_model_prev", "get_boost_future", "set_classes", "set_lgs_device", "copy_model",
                 "vec_stat", "print_model_stat"):
        assert not hasattr(optimizer, name), name


def test_get_boost_model_and_grad_sync_name_arguments_of_the_wrong_kind_at_once():
    """``get_boost_model(True, "notamodel")`` was taken and failed an epoch later at the copy; ``grad_sync(None,
    optimizer)`` failed at the next step inside the sync code, ``grad_sync(optimizer, model)`` on a missing
    attribute. Each raises ``TypeError`` naming what it takes, and nothing changes."""
    from elra import grad_sync

    model = torch.nn.Linear(2, 1)
    opt = ElraOptimizer(model.parameters(), None, 8, 0)
    with pytest.raises(TypeError, match="torch.nn.Module, got str"):
        opt.get_boost_model(True, "notamodel")
    assert opt._boost_source is None and not opt.booster.enabled
    for args in ((None, opt), (opt, model)):
        with pytest.raises(TypeError, match="takes the model and the ElraOptimizer"):
            with grad_sync(*args):
                pass
    assert opt.models == []


def test_a_set_of_parameters_is_refused_at_construction_as_in_add_param_group():
    """``ElraOptimizer(set(model.parameters()))`` was taken (torch's optimizers take it) in hash order, which
    changes between runs: a resumed run would hand the saved state of one tensor to another of its shape."""
    model = torch.nn.Linear(3, 3)
    for params in (set(model.parameters()), frozenset(model.parameters())):
        with pytest.raises(TypeError, match="a set's order changes between runs"):
            ElraOptimizer(params)
