"""state_dict / load_state_dict: standard layout, exact resume in a fresh process."""

import copy
import io
import json
import logging
import math
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import digits_data, digits_model
import elra.line_control
from elra import ElraOptimizer
from resume_worker import make_optimizer, train

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS = 1400


@pytest.fixture(scope="module")
def uninterrupted():
    model, opt = train(STEPS)
    return model.state_dict(), opt.stats


# name: (steps, save at, mid-collection, preconditioner)
FRESH = {
    "mid-collection": (STEPS, 700, True, None), "real-step-boundary": (STEPS, 700, False, None),
    "adam": (500, 250, True, "adam"), "factored": (500, 250, True, "factored"),
}


@pytest.fixture(scope="module")
def fresh_resumes(tmp_path_factory) -> Path:
    """Each checkpoint of FRESH saved in this process, then all resumed in one fresh process (one interpreter start
    instead of four), which saved none of them; each resume builds its own model and optimizer."""
    out = tmp_path_factory.mktemp("fresh")
    jobs = []
    for name, (steps, save_at, mid_collection, preconditioner) in FRESH.items():
        checkpoint = out / f"{name}.ckpt"
        train(steps, save_at=save_at, save=checkpoint, mid_collection=mid_collection, preconditioner=preconditioner)
        jobs.append({"out": str(out / f"{name}.pt"), "steps": steps, "resume": str(checkpoint), "preconditioner": preconditioner})
    subprocess.run([sys.executable, str(WORKER), "--jobs", json.dumps(jobs)], check=True)
    return out


@pytest.mark.parametrize("mid_collection", [True, False], ids=["mid-collection", "real-step-boundary"])
def test_resume_in_fresh_process_is_bit_identical(fresh_resumes, uninterrupted, mid_collection):
    name = "mid-collection" if mid_collection else "real-step-boundary"
    saved = torch.load(fresh_resumes / f"{name}.ckpt", weights_only=True)
    resumed = torch.load(fresh_resumes / f"{name}.pt", weights_only=True)
    expected_model, expected_stats = uninterrupted
    assert all(torch.equal(resumed["model"][k], v) for k, v in expected_model.items())
    assert resumed["stats"] == expected_stats
    assert expected_stats["retraces"] > 0 and expected_stats["batch_multiplier"] >= 2
    collecting = bool(json.loads(saved["optimizer"]["param_groups"][0]["elra_controller"]["pending_losses"]))
    assert collecting == mid_collection and saved["step"] >= 700


@pytest.mark.parametrize("preconditioner", ["adam", "factored"])
def test_preconditioned_resume_in_fresh_process_is_bit_identical(fresh_resumes, preconditioner):
    model, expected = train(FRESH[preconditioner][0], preconditioner=preconditioner)
    resumed = torch.load(fresh_resumes / f"{preconditioner}.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][k], v) for k, v in model.state_dict().items())
    assert resumed["stats"] == expected.stats and expected.stats["retraces"] > 0


@pytest.mark.parametrize(
    "preconditioner, weight_keys, bias_keys",
    [(None, {"direction"}, {"direction"}), ("muon", {"exp_avg", "direction", "momentum_mean_square"}, {"exp_avg", "exp_avg_sq"})],
)
def test_state_dict_uses_the_torch_layout(preconditioner, weight_keys, bias_keys):
    model = torch.nn.Linear(3, 2)
    opt = ElraOptimizer(model.parameters(), lr=1e-4, preconditioner=preconditioner)
    model(torch.ones(1, 3)).sum().backward()
    opt.step(1.0)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {0, 1}
    extra = {"pending_grad", "collected", "moved", "late"}
    assert set(sd["state"][0]) == {*weight_keys, *extra} and set(sd["state"][1]) == {*bias_keys, *extra}
    assert all(not s["pending_grad"].any() for s in sd["state"].values())  # nothing pending: zeros
    assert all(s["moved"].item() == 1.0 for s in sd["state"].values())  # the step moved both
    assert all(s["late"].item() == 0.0 for s in sd["state"].values())  # both took their first gradient
    zero_d = {"moved", "late", "collected", "momentum_mean_square"}
    assert all(t.shape == (() if k in zero_d else model.weight.shape) for k, t in sd["state"][0].items())
    controller = sd["param_groups"][0]["elra_controller"]
    assert all(isinstance(v, (int, float, bool, list, type(None))) for k, v in controller.items() if k != "pending_losses")
    assert json.loads(controller["pending_losses"]) == []  # one JSON string: see the broadcast_from_rank0 test
    assert "elra_controller" not in opt.param_groups[0]


def test_state_dict_before_any_step_round_trips():
    model = torch.nn.Linear(3, 2)
    opt = ElraOptimizer(model.parameters())
    other = ElraOptimizer(model.parameters())
    other.load_state_dict(opt.state_dict())
    assert other.stats == opt.stats


def test_loading_state_of_another_model_raises():
    small, large = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)
    opt = ElraOptimizer(small.parameters())
    small(torch.ones(1, 3)).sum().backward()
    opt.step(1.0)
    with pytest.raises(ValueError, match="another model"):
        ElraOptimizer(large.parameters()).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("preconditioner", ["muon", "factored", "adam", None])
def test_loading_state_in_another_parameter_order_says_so(preconditioner):
    """A state_dict loaded over the same model's ``parameters()`` reversed: under muon and factored, whose matrices
    and vectors keep different state, the missing-key check came first and blamed the checkpoint ("lacks the
    'exp_avg_sq' state ... its preconditioner needs it"). The shapes are checked first now, as for adam and P2M."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = ElraOptimizer(model.parameters(), preconditioner=preconditioner)
    model(torch.ones(1, 3)).sum().backward()
    opt.step(1.0)
    reordered = ElraOptimizer(list(model.parameters())[::-1], preconditioner=preconditioner)
    with pytest.raises(ValueError, match="another model or parameter order"):
        reordered.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("other", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_loading_another_optimizers_state_dict_raises_saying_so(other):
    """An AdamW checkpoint (a Trainer run switched to ELRA) is named as such, not taken for a flattened DCP load."""
    model = torch.nn.Linear(3, 2)
    foreign = other(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    foreign.step()
    opt = ElraOptimizer(model.parameters())
    with pytest.raises(ValueError, match="another optimizer's state_dict") as error:
        opt.load_state_dict(foreign.state_dict())
    assert "flatten_optimizer_state_dict" not in str(error.value)
    assert opt.stats["real_steps"] == 0 and all("exp_avg" in opt.state[p] for p in model.parameters())


def test_controller_state_from_another_version_raises():
    model = torch.nn.Linear(3, 2)
    sd = make_optimizer(model).state_dict()
    del sd["param_groups"][0]["elra_controller"]["alpha"]
    with pytest.raises(ValueError, match="missing"):
        make_optimizer(model).load_state_dict(sd)


def test_dcp_resume_mid_collection_in_one_process_is_bit_identical(tmp_path):
    """torch.distributed.checkpoint loads only what a fresh optimizer's state has room for: the pending sums too."""
    import torch.distributed.checkpoint as dcp
    from dist_worker import Scenario, make_net, make_optimizer, train as train_scenario
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    scenario, save_at = Scenario("one", steps=40, batch_multiplier=3, use_grad_sync=False, nan_loss_at=30), 22
    model = make_net()
    opt = make_optimizer(model, scenario, single=True)
    train_scenario(replace(scenario, steps=save_at), model, opt, 0, 1, 1)
    assert opt.micro_batches == 1
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "dcp")
    train_scenario(scenario, model, opt, 0, 1, 1, start=save_at)

    fresh = make_net()
    fresh_opt = make_optimizer(fresh, scenario, single=True)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=tmp_path / "dcp")
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert fresh_opt.micro_batches == 1 and fresh.hidden.weight.grad is not None and fresh.dead.grad is None
    train_scenario(scenario, fresh, fresh_opt, 0, 1, 1, start=save_at)
    assert fresh_opt.stats == opt.stats and opt.stats["retraces"] >= 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def _first_layer_trained_at(trained, preconditioner, multiplier):
    """A small float64 classifier's ``build()`` (model and optimizer) and ``train(net, opt, steps)``, whose step
    ``i`` trains the first layer's weight where ``trained(i)`` and freezes it elsewhere."""
    data = torch.randn(30, 8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.randint(0, 3, (30, 8), generator=torch.Generator().manual_seed(1))

    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
        net[0].weight.requires_grad_(trained(0))
        opt = ElraOptimizer(net.named_parameters(), net, 8, 3, lr=1e-3, batch_multiplier=multiplier,
                            preconditioner=preconditioner, process_group=None)
        return net, opt

    def train(net, opt, steps):
        for i in steps:
            net[0].weight.requires_grad_(trained(i))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(data[i]), labels[i])
            loss.backward()
            opt.step(loss)

    return build, train


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("preconditioner", [None, "adam", "muon"])
def test_dcp_resume_with_a_frozen_parameter_unfrozen_later_continues_the_run(preconditioner, full):
    """torch.distributed.checkpoint hands a frozen parameter's state to no optimizer. Sharded, ELRA refused the
    load ("lacks the 'exp_avg' state"); full, the parameter took the loading optimizer's fresh state, read as not
    waiting for its first gradient, and once unfrozen the run went 5e-4 (adam) off the uninterrupted one. It now
    starts afresh, waiting, as in the saved run (and as torch's AdamW resumes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    build, train = _first_layer_trained_at(lambda i: i >= 20, preconditioner, 2)  # frozen, held: unfrozen at step 20
    reference, reference_opt = build()
    train(reference, reference_opt, range(30))
    net, opt = build()
    train(net, opt, range(13))  # mid-collection
    options = StateDictOptions(full_state_dict=full)
    model_sd, optim_sd = get_state_dict(net, opt, options=options)
    fresh, fresh_opt = build()
    fresh[0].weight.requires_grad_(False)
    set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    train(fresh, fresh_opt, range(13, 30))
    assert fresh_opt.stats == reference_opt.stats
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reference.parameters()))


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("preconditioner", [None, "adam", "muon"])
def test_dcp_resume_with_a_trained_parameter_frozen_at_the_load_warns_and_unfrozen_for_it_continues(
    preconditioner, full, caplog
):
    """A parameter frozen mid-collection (LoRA-style) keeps the gradient it collected, and the next real step moves
    it. torch.distributed.checkpoint hands a frozen parameter no state: the load started it afresh and dropped that
    gradient, 2.8e-2 (P2M) or 8.6e-4 (adam) off the uninterrupted run, silently. The load now warns, naming it; and
    unfrozen for the load (frozen again after), the run continues exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    build, train = _first_layer_trained_at(lambda i: i < 13, preconditioner, 3)  # frozen after micro-batch 12 of 12-14
    reference, reference_opt = build()
    train(reference, reference_opt, range(30))
    net, opt = build()
    train(net, opt, range(14))
    assert opt.micro_batches == 2 and net[0].weight.grad is not None
    options = StateDictOptions(full_state_dict=full)
    model_sd, optim_sd = get_state_dict(net, opt, options=options)
    fresh, fresh_opt = build()
    fresh[0].weight.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="elra"):
        set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    assert "hands frozen parameters no state: 1 held by this optimizer (0.weight) start afresh" in caplog.text
    caplog.clear()
    fresh, fresh_opt = build()
    with caplog.at_level(logging.WARNING, logger="elra"):
        set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    assert "frozen" not in caplog.text
    train(fresh, fresh_opt, range(14, 30))
    assert fresh_opt.stats == reference_opt.stats
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reference.parameters()))


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_dcp_resume_into_param_groups_listed_in_another_order_continues_the_run(tmp_path, preconditioner):
    """torch.distributed.checkpoint matches groups by parameter name and hands ELRA the saved groups in the
    loading optimizer's order, so ELRA's state need not arrive in the first: the load was refused, blaming
    ``flatten_optimizer_state_dict``. It continues the run now, each group with its own weight decay."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    data = torch.randn(10, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.randint(0, 3, (10, 4), generator=torch.Generator().manual_seed(1))

    def build(order):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        groups = {"first": {"params": list(net[0].parameters()), "weight_decay": 1e-2},
                  "last": {"params": list(net[2].parameters()), "weight_decay": 0.0}}
        opt = ElraOptimizer([groups[k] for k in order], net, 4, 3, lr=1e-4, preconditioner=preconditioner, process_group=None)
        return net, opt

    def train(net, opt, steps):
        for x, y in zip(data[steps], labels[steps]):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step(loss)

    net, opt = build(["first", "last"])
    train(net, opt, slice(0, 4))
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "dcp")
    train(net, opt, slice(4, 10))

    fresh, fresh_opt = build(["last", "first"])
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=tmp_path / "dcp")
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert [g["weight_decay"] for g in fresh_opt.param_groups] == [0.0, 1e-2]
    train(fresh, fresh_opt, slice(4, 10))
    first_groups_decay = {"weight_decay": None}  # stats show the first group's, another group here
    assert {**fresh_opt.stats, **first_groups_decay} == {**opt.stats, **first_groups_decay}
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), net.parameters()))


@pytest.mark.parametrize("reports", ["1234", [1.0, 1.0, math.nan, 1.0], [1.0, -1.0, 0.0, 0.0], [True, 1, 0, 0], None, 7])
def test_malformed_pending_reports_are_refused_before_anything_changes(reports):
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    _run(model, opt, 0, 7)
    saved, before = opt.state_dict(), copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["elra_controller"]["pending_reports"] = reports
    with pytest.raises(ValueError, match="pending_reports"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"][0]["elra_controller"] == before["param_groups"][0]["elra_controller"]


def test_a_flattened_dcp_state_dict_is_refused_naming_the_option():
    """torch rebuilds a flattened optimizer state from the keys the live optimizer has: ELRA's controller, its
    flags and collected sums would be dropped (torchtitan flattens by default)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    _run(model, opt, 0, 7)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    assert any("elra_controller" in key for key in optim_sd)  # saved: it is the load that loses it
    fresh = digits_model(torch.float32)
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=False"):
        set_state_dict(fresh, _digits_optimizer(fresh), model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)


def _run(model, opt, start, stop, boost_loss=False):
    """Train micro-steps start..stop-1 on batches that depend only on the step index."""
    x, y = digits_data(torch.float32)
    for step in range(start, stop):
        idx = torch.randint(0, len(x), (8,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        if step % 37 == 20:
            opt.step_retrace(loss.item())
            continue
        loss.backward()
        opt.step(loss)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _collect(model, opt, start, stop, nan_grad_at=None):
    """Micro-steps start..stop-1 with ``zero_grad`` after ``step`` (a no-op while collecting); at ``nan_grad_at``
    the first layer's gradient is all NaN (an overflow) under a finite loss."""
    x, y = digits_data(torch.float32)
    for step in range(start, stop):
        idx = torch.randint(0, len(x), (8,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        if step == nan_grad_at:
            next(model.parameters()).grad.fill_(math.nan)
        opt.step(loss)
        opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _saved(model, opt) -> tuple[dict, dict]:
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resumed(saved: tuple[dict, dict], **kwargs):
    model = digits_model(torch.float32)
    model.load_state_dict(saved[0])
    opt = _digits_optimizer(model, **kwargs)
    opt.load_state_dict(saved[1])
    return model, opt


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_rolling_back_while_collecting_drops_the_live_runs_sums(preconditioner):
    """A checkpoint of a real-step boundary, loaded while the live run collects: the sums in ``.grad`` belong to
    the abandoned micro-batches and must not join the next real step (the loaded run goes as a fresh resume)."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner=preconditioner)
    _collect(model, opt, 0, 30)
    assert not opt.micro_batches
    saved = _saved(model, opt)
    _collect(model, opt, 30, 32)
    assert opt.micro_batches == 2
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    fresh, fresh_opt = _resumed(saved, preconditioner=preconditioner)
    assert _same(_collect(model, opt, 30, 90), _collect(fresh, fresh_opt, 30, 90)) and opt.stats == fresh_opt.stats


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_an_all_nan_gradient_collected_before_a_checkpoint_is_still_there_after_it(preconditioner):
    """All NaN also meant "no gradient collected" in ``pending_grad``: the flag ``collected`` tells them apart."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner=preconditioner)
    _collect(model, opt, 0, 31, nan_grad_at=30)
    assert opt.micro_batches == 1
    saved = _saved(model, opt)
    fresh, fresh_opt = _resumed(saved, preconditioner=preconditioner)
    retraces = opt.stats["retraces"]
    assert _same(_collect(model, opt, 31, 60), _collect(fresh, fresh_opt, 31, 60)) and opt.stats == fresh_opt.stats
    assert opt.stats["retraces"] > retraces


def _digits_optimizer(model, **kwargs):
    kwargs = {"lr": 1e-5, "weight_decay": 1e-3, "momentum": 0.5, "batch_multiplier": 3, **kwargs}
    return ElraOptimizer(model.parameters(), None, 8, 10, **kwargs)


def _boosted(model, opt):
    with opt.boosted():
        return torch.cat([p.detach().flatten() for p in model.parameters()])


def _same(a, b):
    return torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_mid_collection_continue_the_same_trajectory(tmp_path, how):
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    opt.enable_boost(50)
    stop = 100
    _run(model, opt, 0, stop)
    while not opt.micro_batches:
        _run(model, opt, stop, stop + 1)
        stop += 1
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        torch.save((model, opt), tmp_path / "both.pt")
        model2, opt2 = torch.load(tmp_path / "both.pt", weights_only=False)
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    end, end2 = _run(model, opt, stop, 300), _run(model2, opt2, stop, 300)
    assert _same(end, end2)
    assert opt.stats == opt2.stats and opt.stats["retraces"] > 0 and opt.stats["batch_multiplier"] >= 3
    assert _same(_boosted(model, opt), _boosted(model2, opt2))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_with_an_lr_scheduler_attached_steps_itself_not_the_original(how):
    """A scheduler wraps ``step`` on the instance with a reference to the original: the copy must not keep it."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    _run(model, opt, 0, 30)
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    original, stats = torch.cat([p.detach().flatten() for p in model.parameters()]), opt.stats
    copied = _run(model2, opt2, 30, 60)
    assert _same(torch.cat([p.detach().flatten() for p in model.parameters()]), original) and opt.stats == stats
    assert opt2.stats["real_steps"] > stats["real_steps"]
    assert _same(copied, _run(model, opt, 30, 60)) and opt.stats == opt2.stats  # the original, later, goes alike


def test_a_copy_shares_an_explicit_process_group_and_refuses_pickling(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = digits_model(torch.float32)
        opt = _digits_optimizer(model, process_group=dist.group.WORLD)
        assert copy.deepcopy(opt).reducer.group is dist.group.WORLD
        with pytest.raises(TypeError, match="process_group"):
            pickle.dumps(opt)
    finally:
        dist.destroy_process_group()


def test_checkpoint_hyperparameters_win_over_the_constructor(caplog):
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, batch_multiplier=1, momentum=0.5, weight_decay=1e-3)
    _run(model, opt, 0, 60)
    saved_model, saved_opt = copy.deepcopy((model.state_dict(), opt.state_dict()))
    expected = _run(model, opt, 60, 200)

    resumed = digits_model(torch.float32)
    resumed.load_state_dict(saved_model)
    other = ElraOptimizer(resumed.parameters(), None, 32, 0, lr=1e-3, weight_decay=0.2, batch_multiplier=4)
    with caplog.at_level(logging.WARNING, logger="elra"):
        other.load_state_dict(saved_opt)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "momentum None -> 0.5" in message and "batch_multiplier 4 -> 1" in message
    assert _same(_run(resumed, other, 60, 200), expected)
    assert other.stats == opt.stats
    assert other.state_dict()["param_groups"][0]["elra_config"] == opt.state_dict()["param_groups"][0]["elra_config"]


def test_the_warning_on_a_changed_weight_decay_names_the_one_the_groups_take(caplog):
    """A decay edited in ``param_groups`` mid-run (0.1 -> 0.02) is the one a checkpoint's groups resume with, but the
    warning named only the constructor's default (0.05 -> 0.1): the 0.02 in force was never named."""
    model = digits_model(torch.float32)
    opt = ElraOptimizer(model.parameters(), None, 32, 0, lr=1e-3, weight_decay=0.1)
    opt.param_groups[0]["weight_decay"] = 0.02
    _run(model, opt, 0, 5)
    other = ElraOptimizer(digits_model(torch.float32).parameters(), None, 32, 0, lr=1e-3, weight_decay=0.05)
    with caplog.at_level(logging.WARNING, logger="elra"):
        other.load_state_dict(opt.state_dict())
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "weight_decay 0.05 -> 0.1 (weight_decay: of groups added later; the loaded groups decay by 0.02)" in message
    assert other.param_groups[0]["weight_decay"] == 0.02


@pytest.mark.parametrize("saved, built", [("muon", None), (None, "adam"), ("factored", "muon")])
def test_a_checkpoint_of_another_preconditioner_continues_its_own_run(caplog, saved, built):
    """The README: the checkpoint's ``preconditioner`` (and ``line_target``) win over the constructor's."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner=saved, line_target=-0.2)
    _run(model, opt, 0, 40)
    saved_model, saved_opt = copy.deepcopy((model.state_dict(), opt.state_dict()))
    expected = _run(model, opt, 40, 90)
    resumed = digits_model(torch.float32)
    resumed.load_state_dict(saved_model)
    other = _digits_optimizer(resumed, preconditioner=built)
    with caplog.at_level(logging.WARNING, logger="elra"):
        other.load_state_dict(saved_opt)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"preconditioner {built!r} -> {saved!r}" in message and "line_target -0.1 -> -0.2" in message
    assert _same(_run(resumed, other, 40, 90), expected) and other.stats == opt.stats


def _refuse(opt, sd, error=ValueError, match=None):
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)


def test_a_refused_load_state_dict_changes_nothing():
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    _run(model, opt, 0, 61)
    twin_model, twin = copy.deepcopy((model, opt))
    good = opt.state_dict()

    bad_shape = copy.deepcopy(good)
    bad_shape["state"][3]["exp_avg"] = torch.zeros(5)
    _refuse(opt, bad_shape, match="does not fit parameter 3")
    unknown_field = copy.deepcopy(good)
    unknown_field["param_groups"][0]["elra_controller"]["surprise"] = 1.0
    unknown_field["param_groups"][0]["lr"] = 123.0
    _refuse(opt, unknown_field, match="unknown")
    missing = copy.deepcopy(good)
    del missing["state"][1]
    _refuse(opt, missing, match="lacks the '.*' state of parameter 1")
    bad_config = copy.deepcopy(good)
    bad_config["param_groups"][0]["elra_config"]["momentum"] = 1.5
    _refuse(opt, bad_config, match="momentum")
    no_boost = copy.deepcopy(good)
    no_boost["param_groups"][0]["elra_boost"]["enabled"] = True
    _refuse(opt, no_boost, match=r"lacks the 'boost' state .*call optimizer.enable_boost\(\) before get_state_dict")
    bad_decay = copy.deepcopy(good)  # loaded, it made every later step and stats raise
    bad_decay["param_groups"][0]["weight_decay"] = 5.0
    _refuse(opt, bad_decay, match="weight_decay")
    for key, value in (("cycle", 0), ("count", -1), ("count", 10**6)):  # cycle 0: a mean frozen from the start
        bad_boost = copy.deepcopy(good)
        bad_boost["param_groups"][0]["elra_boost"][key] = value
        _refuse(opt, bad_boost, match=f"boost state .*Invalid boost {key}")

    assert _same(_run(model, opt, 61, 200), _run(twin_model, twin, 61, 200))
    assert opt.stats == twin.stats


def test_boost_state_loads_into_an_optimizer_without_boost():
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    opt.enable_boost(40)
    _run(model, opt, 0, 90)
    resumed = copy.deepcopy(model)
    plain = _digits_optimizer(resumed)
    plain.load_state_dict(opt.state_dict())
    assert _same(_run(model, opt, 90, 200), _run(resumed, plain, 90, 200))
    assert _same(_boosted(model, opt), _boosted(resumed, plain)) and plain.stats["boost_count"] > 1


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
@pytest.mark.parametrize("saved", [torch.float32, torch.float64])
def test_a_float32_checkpoint_resumed_in_bfloat16_takes_a_bfloat16_runs_state_dtypes(preconditioner, saved):
    """A float32 (or float64) run's checkpoint resumed with the model cast to bfloat16: the state takes the
    dtypes a bfloat16 run makes (float32 moments and boost mean, P2M's direction in bfloat16). Before, every
    float32 state tensor stayed float32, the 16-bit boost mean of then too: its update at the next accepted
    step raised a dtype error; a float64 run's moments became bfloat16."""

    def run(opt, net, start, stop, dtype):
        for step in range(start, stop):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 5, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
            loss.backward()
            opt.step(loss)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(saved)
    make = lambda m: ElraOptimizer(m.parameters(), None, 8, 3, lr=1e-4, preconditioner=preconditioner)
    opt = make(net)
    opt.enable_boost(10)
    run(opt, net, 0, 5, saved)
    half = copy.deepcopy(net).to(torch.bfloat16)
    fresh = make(copy.deepcopy(half))
    fresh.enable_boost(10)
    resumed = make(half)
    resumed.load_state_dict(opt.state_dict())
    dtypes = lambda o: [{k: v.dtype for k, v in o.state[p].items()} for g in o.param_groups for p in g["params"]]
    assert dtypes(resumed) == dtypes(fresh)
    run(resumed, half, 5, 10, torch.bfloat16)
    with resumed.boosted() as count:
        assert count > 5 and all(torch.isfinite(p).all() for p in half.parameters())


def test_a_checkpoint_without_hyperparameters_keeps_the_constructors(caplog):
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    _run(model, opt, 0, 40)
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["elra_config"]  # as saved by an older elra
    resumed, twin = copy.deepcopy(model), copy.deepcopy(model)
    old = _digits_optimizer(resumed)
    with caplog.at_level(logging.INFO, logger="elra"):
        old.load_state_dict(sd)
    assert any("older elra" in r.getMessage() for r in caplog.records)
    new = _digits_optimizer(twin)
    new.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert _same(_run(resumed, old, 40, 120), _run(twin, new, 40, 120))


def test_a_muon_checkpoint_of_an_older_elra_starts_the_momentum_mean_squares_afresh(caplog):
    """Saved before the matrices kept the EMA of their momentum's mean square: it loads, the EMAs start from the
    next step's mean square, as a fresh run's first step starts them, and the run trains on."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner="muon")
    _run(model, opt, 0, 40)
    sd = copy.deepcopy(opt.state_dict())
    matrices = [i for i, p in enumerate(model.parameters()) if p.dim() == 2]
    assert matrices and all(sd["state"][i].pop("momentum_mean_square") > 0 for i in matrices)
    resumed = copy.deepcopy(model)
    old = _digits_optimizer(resumed, preconditioner="muon")
    with caplog.at_level(logging.INFO, logger="elra"):
        old.load_state_dict(sd)
    assert any("momentum_mean_square start afresh" in r.getMessage() for r in caplog.records)
    params = list(resumed.parameters())
    assert all(old.state[params[i]]["momentum_mean_square"] == 0 for i in matrices)
    _run(resumed, old, 40, 80)
    assert all(old.state[params[i]]["momentum_mean_square"] > 0 for i in matrices)
    assert old.stats["real_steps"] > opt.stats["real_steps"] and math.isfinite(old.stats["lr"])


def test_a_dcp_muon_checkpoint_of_an_older_elra_loads_with_a_partial_load(tmp_path):
    """``dcp.load`` refuses the template's mean squares missing from the files unless the planner allows a partial
    load (README); then they start afresh and the run trains on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner="muon")
    _run(model, opt, 0, 40)
    model_sd, optim_sd = get_state_dict(model, opt)
    for entry in optim_sd["state"].values():
        entry.pop("momentum_mean_square", None)  # as an older elra saved it
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "dcp")
    fresh = digits_model(torch.float32)
    fresh_opt = _digits_optimizer(fresh, preconditioner="muon")
    template = lambda: dict(zip(("model", "optim"), get_state_dict(fresh, fresh_opt)))
    with pytest.raises(BaseException, match="momentum_mean_square"):  # torch's CheckpointException
        dcp.load(template(), checkpoint_id=tmp_path / "dcp")
    state = template()
    dcp.load(state, checkpoint_id=tmp_path / "dcp", planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    matrices = [p for p in fresh.parameters() if p.dim() == 2]
    assert matrices and all(fresh_opt.state[p]["momentum_mean_square"] == 0 for p in matrices)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    _run(fresh, fresh_opt, 40, 60)
    assert all(fresh_opt.state[p]["momentum_mean_square"] > 0 for p in matrices)


def test_a_dcp_resume_into_another_preconditioner_fails_loudly_and_load_state_dict_takes_the_checkpoints(tmp_path):
    """docs/checkpoints.md: ``dcp.load`` reads the template's keys, the loading optimizer's own direction's, so a muon
    checkpoint into an adam-built template fails (torch's "Missing key"), never loads silently; through
    ``load_state_dict`` the checkpoint's preconditioner wins and the run continues as the saved one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner="muon")
    _run(model, opt, 0, 20)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "dcp")
    saved = opt.state_dict()
    fresh = digits_model(torch.float32)
    fresh_opt = _digits_optimizer(fresh, preconditioner="adam")
    with pytest.raises(BaseException, match="Missing key.*exp_avg_sq"):  # torch's CheckpointException
        dcp.load(dict(zip(("model", "optim"), get_state_dict(fresh, fresh_opt))), checkpoint_id=tmp_path / "dcp")
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(saved)
    _run(model, opt, 20, 30)
    _run(fresh, fresh_opt, 20, 30)
    assert fresh_opt.stats == opt.stats
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
def test_resume_remembers_which_parameters_the_last_step_moved(preconditioner):
    """A head without a gradient in the last accepted step did not move: after a resume, the next
    step's sums must leave its (nonzero) direction out, and a retrace must not move it back."""

    def run(opt, net, steps):
        for step in steps:
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            heads = ["a"] if step == 5 else ["a", "b"]
            loss = sum(net[h](torch.tanh(net["body"](x))).square().mean() for h in heads)
            opt.zero_grad()
            loss.backward()
            opt.step(math.nan if step == 6 else loss.item())  # step 6 fails: a retrace

    torch.manual_seed(0)
    net = torch.nn.ModuleDict({k: torch.nn.Linear(4, 4 if k == "body" else 3) for k in ("body", "a", "b")}).double()
    twin = copy.deepcopy(net)
    make = lambda m: ElraOptimizer(m.parameters(), None, 6, 3, lr=1e-4, preconditioner=preconditioner)
    opt = make(net)
    run(opt, net, range(6))
    saved = copy.deepcopy(opt.state_dict())
    twin.load_state_dict(net.state_dict())
    resumed = make(twin)
    resumed.load_state_dict(saved)
    head_b = net["b"].weight.detach().clone()
    run(opt, net, range(6, 7))
    assert opt.stats["retraces"] == 1 and torch.equal(net["b"].weight, head_b)  # b has no step to undo
    run(opt, net, range(7, 12))
    run(resumed, twin, range(6, 12))
    assert resumed.stats == opt.stats
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))


def test_a_checkpoint_without_moved_flags_counts_every_parameter_as_moved():
    """Checkpoints from before the flag load; P2M's directions of unmoved parameters are zero, so nothing changes."""
    model = torch.nn.Linear(3, 2)
    opt = ElraOptimizer(model.parameters(), None, 4, 2, preconditioner=None)
    model(torch.ones(1, 3)).sum().backward()
    opt.step(1.0)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        del entry["moved"]
    resumed = ElraOptimizer(model.parameters(), None, 4, 2, preconditioner=None)
    resumed.load_state_dict(sd)
    assert resumed._moved == set(model.parameters())
    assert all("moved" not in state for state in resumed.state.values())


class _TwoLayers(torch.nn.Module):
    """Two same-shaped layers, registered (and so listed by ``named_parameters``) in the order ``names``."""

    def __init__(self, names=("a", "b")):
        super().__init__()
        torch.manual_seed(0)
        for name in names:
            setattr(self, name, torch.nn.Linear(16, 16))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _train_two(model, opt, steps):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - x).square().mean()
        loss.backward()
        opt.step(loss)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_named_parameters_in_another_order_are_refused_naming_the_first(preconditioner):
    """Positional loading put the state of same-shaped parameters on each other's, silently."""
    model = _TwoLayers()
    opt = ElraOptimizer(model.named_parameters(), lr=1e-4, preconditioner=preconditioner)
    _train_two(model, opt, 20)
    saved = _saved(model, opt)[1]
    swapped = _TwoLayers(("b", "a"))
    _refuse(ElraOptimizer(swapped.named_parameters(), preconditioner=preconditioner), saved,
            match="parameter 0 of group 0 is 'b.weight' here but 'a.weight' in the state_dict")

    twin_model = _TwoLayers()
    twin_model.load_state_dict(model.state_dict())
    twin = ElraOptimizer(twin_model.named_parameters(), preconditioner=preconditioner)
    twin.load_state_dict(saved)  # the same order: exact
    assert _same(_train_two(model, opt, 20), _train_two(twin_model, twin, 20)) and opt.stats == twin.stats
    wrapped = [(f"module._orig_mod.{name}", p) for name, p in _TwoLayers().named_parameters()]
    ElraOptimizer(wrapped, preconditioner=preconditioner).load_state_dict(saved)  # another wrapper: the same names


def test_state_saved_without_names_loads_by_position():
    """Checkpoints of parameters() and of elra before the check carry no names: they load as they did."""
    model = _TwoLayers()
    opt = ElraOptimizer(model.parameters(), lr=1e-4)
    _train_two(model, opt, 20)
    saved = _saved(model, opt)[1]
    assert "param_names" not in saved["param_groups"][0]
    named = ElraOptimizer(_TwoLayers(("b", "a")).named_parameters())
    named.load_state_dict(saved)
    assert named.stats == opt.stats


def test_dcp_state_dict_helpers_match_named_state_by_name_in_any_order():
    """get_state_dict/set_state_dict key the state by name and reorder it (keeping the saved param_names): no refusal."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _TwoLayers()
    opt = ElraOptimizer(model.named_parameters(), lr=1e-4)
    _train_two(model, opt, 20)
    model_sd, optim_sd = get_state_dict(model, opt)
    swapped = _TwoLayers(("b", "a"))
    other = ElraOptimizer(swapped.named_parameters())
    set_state_dict(swapped, other, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for name in ("a", "b"):
        assert _same(other.state[getattr(swapped, name).weight]["direction"], opt.state[getattr(model, name).weight]["direction"])


def test_a_load_keeps_the_loading_optimizers_names():
    """torch took the saved param_names: after a name-keyed load into another order they named the saved order, so
    the next checkpoint refused the model it came from and passed one in the saved order, state swapped."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _TwoLayers()
    opt = ElraOptimizer(model.named_parameters(), lr=1e-4)
    _train_two(model, opt, 20)
    swapped = _TwoLayers(("b", "a"))
    other = ElraOptimizer(swapped.named_parameters())
    model_sd, optim_sd = get_state_dict(model, opt)
    set_state_dict(swapped, other, model_state_dict=model_sd, optim_state_dict=optim_sd)
    saved = _saved(swapped, other)[1]
    assert saved["param_groups"][0]["param_names"] == ["b.weight", "b.bias", "a.weight", "a.bias"]
    ElraOptimizer(_TwoLayers(("b", "a")).named_parameters()).load_state_dict(saved)
    _refuse(ElraOptimizer(_TwoLayers().named_parameters()), saved, match="parameter 0 of group 0 is 'a.weight' here")
    unnamed = ElraOptimizer(_TwoLayers().parameters())
    unnamed.load_state_dict(_saved(model, opt)[1])
    assert "param_names" not in unnamed.param_groups[0]  # it stays unnamed, as constructed


def test_a_name_keyed_state_dict_loaded_directly_into_another_order_is_refused():
    """``get_optimizer_state_dict``'s output keys the state by name in the saved order; handed to
    ``load_state_dict`` itself (not through ``set_state_dict``, which reorders it) into a model whose two
    same-shaped layers are registered the other way round, each took the other's state silently."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _TwoLayers()
    opt = ElraOptimizer(model.named_parameters(), lr=1e-4)
    _train_two(model, opt, 20)
    keyed = get_optimizer_state_dict(model, opt)
    assert keyed["param_groups"][0]["params"][0] == "a.weight"
    _refuse(ElraOptimizer(_TwoLayers(("b", "a")).named_parameters()), copy.deepcopy(keyed),
            match="parameter 0 of group 0 is 'b.weight' here but 'a.weight' in the state_dict")
    twin_model = _TwoLayers()
    twin_model.load_state_dict(model.state_dict())
    twin = ElraOptimizer(twin_model.named_parameters())
    twin.load_state_dict(copy.deepcopy(keyed))  # the same order: exact
    assert _same(_train_two(model, opt, 5), _train_two(twin_model, twin, 5)) and opt.stats == twin.stats


def _grouped(model, layout, named):
    params = list(model.named_parameters() if named else model.parameters())
    return [{"params": [params[i] for i in members], **({"weight_decay": 0.0} if k else {})} for k, members in enumerate(layout)]


@pytest.mark.parametrize(
    "named, saved_layout, loaded_layout, match",
    [
        (True, [[0, 1], [2, 3]], [[0, 1, 2, 3]], "parameter group 0 here holds 4 parameters that the state_dict's groups hold in another grouping"),
        (False, [[0, 1], [2, 3]], [[0, 2], [1, 3]], r"parameter groups \[0\] of the state_dict have no options"),
        (False, [[0, 1, 2, 3]], [[0, 1], [2, 3]], r"parameter groups \[0\] of the state_dict have no options"),
    ],
)
def test_set_state_dict_into_another_parameter_grouping_is_refused(named, saved_layout, loaded_layout, match):
    """torch's ``set_state_dict`` regroups the saved state by name: a group gets the options of the last saved
    group holding one of its parameters, or none. Two groups (the second without decay) loaded into one took
    ``weight_decay=0`` for all four parameters and resumed 5e-5 off the uninterrupted run, silently, where
    ``load_state_dict`` of the same checkpoint refused the group sizes. Refused now, changing nothing, where
    the groups are named or where a group matched no saved one; the same grouping loads."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _TwoLayers()
    opt = ElraOptimizer(_grouped(model, saved_layout, named), lr=1e-4, preconditioner="adam")
    _train_two(model, opt, 20)
    model_sd, optim_sd = get_state_dict(model, opt)
    fresh = _TwoLayers()
    other = ElraOptimizer(_grouped(fresh, loaded_layout, named), lr=1e-4, preconditioner="adam")
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=match):
        set_state_dict(fresh, other, model_state_dict=copy.deepcopy(model_sd), optim_state_dict=copy.deepcopy(optim_sd))
    after = other.state_dict()
    assert after["param_groups"] == before["param_groups"] and all(
        torch.equal(after["state"][i][k], v) for i, entry in before["state"].items() for k, v in entry.items()
    )
    same = ElraOptimizer(_grouped(fresh, saved_layout, named), lr=1e-4, preconditioner="adam")
    set_state_dict(fresh, same, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert _same(_train_two(model, opt, 5), _train_two(fresh, same, 5)) and opt.stats == same.stats


def _heads():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({k: torch.nn.Linear(4, 4 if k == "body" else 3) for k in ("body", "a", "b")}).double()


def _heads_optimizer(net, preconditioner, batch_multiplier=1):
    return ElraOptimizer(net.parameters(), None, 6, 3, lr=1e-4, preconditioner=preconditioner, batch_multiplier=batch_multiplier)


def _heads_step(opt, net, step, zeroing):
    """One micro-step; head ``b`` is in the loss of some micro-batches only (and, ``frozen``, also
    ``requires_grad=False`` at times); ``zero_grad`` before the backward, ``set_to_none`` as ``zeroing`` says."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
    if "frozen" in zeroing:
        net["b"].requires_grad_(step % 7 not in (3, 4))
    opt.zero_grad(set_to_none=zeroing.startswith("none") or (zeroing == "mixed" and step % 2 == 0))
    heads = ["a", "b"] if step % 5 in (1, 2) else ["a"]
    loss = sum(net[h](torch.tanh(net["body"](x))).square().mean() for h in heads)
    loss.backward()
    opt.step(loss.item())
    return torch.cat([p.detach().flatten() for p in net.parameters()]), opt.stats


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
@pytest.mark.parametrize("batch_multiplier", [1, 3])
@pytest.mark.parametrize("zeroing", ["zeros", "mixed", "zeros, b frozen at times", "none, b frozen at times"])
def test_resume_keeps_the_zero_gradients_of_a_parameter_used_at_times(preconditioner, batch_multiplier, zeroing):
    """``zero_grad(set_to_none=False)`` leaves a zero ``.grad`` on head ``b``, which the next micro-batches may not
    reach: the next step counts it as a gradient (its moments take a zero, it decays and moves), a missing one not.
    Saved after any micro-step (real-step boundaries too), resumed into a fresh model and optimizer, and rolled
    back into the live ones, the run goes on step for step as the uninterrupted one."""
    net = _heads()
    opt = _heads_optimizer(net, preconditioner, batch_multiplier)
    saved, trajectory = {}, []
    for step in range(20):
        if step in range(1, 12):
            saved[step] = _saved(net, opt)
        trajectory.append(_heads_step(opt, net, step, zeroing))
    for start, checkpoint in saved.items():
        fresh = _heads()
        for model, optimizer in [(fresh, _heads_optimizer(fresh, preconditioner)), (net, opt)]:  # and a rollback
            model.load_state_dict(checkpoint[0])
            optimizer.load_state_dict(checkpoint[1])
            for step in range(start, 20):
                params, stats = _heads_step(optimizer, model, step, zeroing)
                assert torch.equal(params, trajectory[step][0]) and stats == trajectory[step][1], (start, step)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_a_copy_keeps_the_zero_gradients_of_a_parameter_used_at_times(how, preconditioner):
    """A copy at a real-step boundary keeps the zero ``.grad`` that ``zero_grad(set_to_none=False)`` left on
    head ``b`` (deepcopy and pickle drop a parameter's ``.grad``), and goes on as the original."""
    net = _heads()
    opt = _heads_optimizer(net, preconditioner)
    for step in range(3):
        _heads_step(opt, net, step, "zeros")
    net2, opt2 = copy.deepcopy((net, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    assert torch.equal(net2["b"].weight.grad, net["b"].weight.grad)
    for step in range(3, 20):
        (params, stats), (params2, stats2) = _heads_step(opt, net, step, "zeros"), _heads_step(opt2, net2, step, "zeros")
        assert torch.equal(params, params2) and stats == stats2, step


def _float32_grads_net() -> torch.nn.Module:
    """A bfloat16 MLP whose gradients are float32 (torch's ``grad_dtype``)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(torch.bfloat16)
    for p in net.parameters():
        p.grad_dtype = torch.float32
    return net


def _float32_grads_step(opt, net, step):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
    opt.zero_grad()
    loss = (net(x.bfloat16()).float() - x[:, :1].sin()).square().mean()
    loss.backward()
    opt.step(loss)


@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_float32_sums_of_bfloat16_parameters_resume_unrounded_in_their_grad_dtype(preconditioner):
    """Parameters may take gradients in another dtype (``grad_dtype``). Collected float32 sums of bfloat16
    parameters come back float32 and unrounded: before, the load cast them to bfloat16 and then failed to assign
    them (``RuntimeError``), leaving the optimizer half loaded."""
    net = _float32_grads_net()
    opt = ElraOptimizer(net.parameters(), batch_multiplier=3, lr=1e-4, preconditioner=preconditioner)
    for step in range(5):
        _float32_grads_step(opt, net, step)
    assert opt.micro_batches == 2
    checkpoint = copy.deepcopy((net.state_dict(), opt.state_dict()))
    fresh = _float32_grads_net()
    fresh.load_state_dict(checkpoint[0])
    resumed = ElraOptimizer(fresh.parameters(), batch_multiplier=3, lr=1e-4, preconditioner=preconditioner)
    resumed.load_state_dict(checkpoint[1])
    assert all(torch.equal(p.grad, q.grad) and q.grad.dtype == torch.float32 for p, q in zip(net.parameters(), fresh.parameters()))
    for step in range(5, 20):
        _float32_grads_step(opt, net, step)
        _float32_grads_step(resumed, fresh, step)
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), fresh.parameters())), step


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_the_float32_gradients_of_bfloat16_parameters(how):
    """Copies of a parameter drop its ``grad_dtype``: a copy of the model and the optimizer made while collecting
    raised assigning the float32 sums. It now keeps the grad dtype and the sums, and goes on as the original."""
    net = _float32_grads_net()
    opt = ElraOptimizer(net.parameters(), batch_multiplier=3, lr=1e-4)
    for step in range(4):
        _float32_grads_step(opt, net, step)
    net2, opt2 = copy.deepcopy((net, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    assert all(q.grad_dtype == torch.float32 and torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), net2.parameters()))
    for step in range(4, 20):
        _float32_grads_step(opt, net, step)
        _float32_grads_step(opt2, net2, step)
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters())), step


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_a_checkpoint_between_backward_and_step_is_refused_while_collecting(preconditioner):
    """Between ``backward()`` and ``step(loss)`` the gradients hold a micro-batch whose loss ELRA has not had: a
    checkpoint taken there while collecting held its gradient in the sums, and the resumed run, repeating the
    iteration, counted it twice (silently another trajectory). It raises; at a real-step boundary, where the
    repeated iteration starts from cleared gradients, such a checkpoint resumes exactly."""
    x, y = digits_data()
    model = digits_model()
    opt = ElraOptimizer(model.parameters(), None, 8, 10, lr=1e-4, batch_multiplier=3, preconditioner=preconditioner)
    trajectory, boundary = [], None

    def backward(net, optimizer, i):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[8 * i : 8 * i + 8]), y[8 * i : 8 * i + 8])
        loss.backward()
        return loss

    for i in range(12):
        loss = backward(model, opt, i)
        if opt.micro_batches:
            with pytest.raises(RuntimeError, match="between backward"):
                opt.state_dict()
        elif i == 6:
            boundary = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.step(loss)
        trajectory.append([p.clone() for p in model.parameters()])
        opt.state_dict()  # after step: fine
    fresh = digits_model()
    fresh.load_state_dict(boundary[0])
    resumed = ElraOptimizer(fresh.parameters(), None, 8, 10, lr=1e-4, batch_multiplier=3, preconditioner=preconditioner)
    resumed.load_state_dict(boundary[1])
    for i in range(6, 12):
        resumed.step(backward(fresh, resumed, i))
        assert all(torch.equal(p, q) for p, q in zip(trajectory[i], fresh.parameters())), i
    resumed.step(backward(fresh, resumed, 12))
    copied = copy.deepcopy((fresh, resumed))  # copied, or loaded, mid-collection: a backward still counts
    resumed.load_state_dict(resumed.state_dict())
    for net, optimizer in [(fresh, resumed), copied]:
        assert optimizer.micro_batches
        backward(net, optimizer, 13)
        with pytest.raises(RuntimeError, match="between backward"):
            optimizer.state_dict()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_between_backward_and_step_still_refuses_a_checkpoint_until_its_step(how):
    """A copy made while collecting, after ``backward()`` and before ``step(loss)``, holds that micro-batch's
    gradient in its sums without its loss, as the original does. The copy noted its gradients' versions afresh and
    took them for stepped: its ``state_dict()`` passed, and a run resumed from it counted the micro-batch twice.
    It refuses as the original does until its ``step(loss)``, and then goes on as the original."""
    net = _heads()
    opt = _heads_optimizer(net, None, batch_multiplier=3)
    _heads_step(opt, net, 0, "none")
    assert opt.micro_batches
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = net["a"](torch.tanh(net["body"](x))).square().mean()
    loss.backward()
    net2, opt2 = copy.deepcopy((net, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    for optimizer in (opt, opt2):
        with pytest.raises(RuntimeError, match="between backward"):
            optimizer.state_dict()
        optimizer.step(loss.item())
        optimizer.state_dict()
    for step in range(2, 10):
        assert torch.equal(_heads_step(opt, net, step, "none")[0], _heads_step(opt2, net2, step, "none")[0]), step


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_a_backward_that_reaches_only_parameters_without_a_gradient_is_seen_before_a_checkpoint(preconditioner):
    """Experts trained over a frozen trunk: a micro-batch routed to expert ``b`` alone, after one routed to ``a``,
    changes no gradient ELRA kept, and a checkpoint taken between its backward and ``step(loss)`` passed, holding
    its gradient without its loss (a run resumed there counted it twice). It is refused too; after the step the
    checkpoint resumes into the uninterrupted run."""
    net = _heads()
    net["body"].requires_grad_(False)
    opt = _heads_optimizer(net, preconditioner, batch_multiplier=3)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def routed(model, optimizer, head):
        loss = model[head](torch.tanh(model["body"](x))).square().mean()
        loss.backward()
        return loss.item()

    opt.step(routed(net, opt, "a"))
    loss = routed(net, opt, "b")
    with pytest.raises(RuntimeError, match="between backward"):
        opt.state_dict()
    opt.step(loss)
    saved = _saved(net, opt)
    fresh = _heads()
    fresh.load_state_dict(saved[0])
    fresh["body"].requires_grad_(False)
    resumed = _heads_optimizer(fresh, preconditioner)
    resumed.load_state_dict(saved[1])
    for model, optimizer in [(net, opt), (fresh, resumed)]:
        optimizer.step(routed(model, optimizer, "a"))
    assert opt.stats["real_steps"] == 1 and all(torch.equal(p, q) for p, q in zip(net.parameters(), fresh.parameters()))


def test_a_backward_that_reaches_only_a_group_added_while_collecting_is_seen_before_a_checkpoint():
    """The same for a parameter added by ``add_param_group`` while collecting: the checkpoint passed."""
    net = _heads()
    net["body"].requires_grad_(False)
    opt = ElraOptimizer(net["a"].parameters(), None, 6, 3, lr=1e-4, batch_multiplier=3)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(2):
        loss = net["a"](x).square().mean()
        loss.backward()
        opt.step(loss.item())
    assert opt.micro_batches == 2
    opt.add_param_group({"params": net["b"].parameters()})
    opt.state_dict()  # after the step: fine
    loss = net["b"](x).square().mean()
    loss.backward()
    with pytest.raises(RuntimeError, match="between backward"):
        opt.state_dict()
    opt.step(loss.item())
    opt.state_dict()


@pytest.mark.parametrize("preconditioner", [None, "adam"])
@pytest.mark.parametrize("zeroing", ["none", "zeros"])
def test_checkpoints_after_step_while_collecting_are_not_refused(preconditioner, zeroing):
    """The refusal above misfired on none of the legitimate places to save while collecting: after ``step(loss)``
    (with ``zero_grad`` before the next backward, ``set_to_none`` or not), right after ``load_state_dict`` restored
    the sums and after the next step of that loaded run, and a deepcopy or pickle of the optimizer, which go on
    exactly as the original."""
    net = _heads()
    opt = _heads_optimizer(net, preconditioner, batch_multiplier=3)
    for step in range(8):
        _heads_step(opt, net, step, zeroing)
        opt.zero_grad(set_to_none=zeroing == "none")
        saved = _saved(net, opt)
    assert opt.micro_batches
    fresh = _heads()
    fresh.load_state_dict(saved[0])
    loaded = _heads_optimizer(fresh, preconditioner)
    loaded.load_state_dict(saved[1])
    _saved(fresh, loaded)
    net2, opt2 = copy.deepcopy((net, opt))
    net3, opt3 = pickle.loads(pickle.dumps((net, opt)))
    for step in range(8, 14):
        expected = _heads_step(opt, net, step, zeroing)
        for model, optimizer in [(fresh, loaded), (net2, opt2), (net3, opt3)]:
            assert torch.equal(_heads_step(optimizer, model, step, zeroing)[0], expected[0]), step
            _saved(model, optimizer)


def test_state_dict_hooks_see_and_shape_elras_whole_state():
    """torch's state_dict and load_state_dict hooks ran inside torch's part: a post hook saw the state without
    ELRA's (the controller, the collected sums), a load pre hook's dict was not the one ELRA checked and read, and a
    load post hook saw the optimizer before ELRA restored its controller. A pair of hooks that keys the state by
    parameter name (torch's suggestion for reordered models) must resume the run as a plain checkpoint does."""
    names = [name for name, _ in digits_model(torch.float32).named_parameters()]

    def by_name(opt, sd):
        assert "elra_controller" in sd["param_groups"][0] and all("pending_grad" in s for s in sd["state"].values())
        return {**sd, "state": {names[k]: v for k, v in sd["state"].items()}}

    def by_index(opt, sd):
        return {**sd, "state": {names.index(k): v for k, v in sd["state"].items()}}

    model = digits_model(torch.float32)
    opt = _digits_optimizer(model)
    _collect(model, opt, 0, 31)
    assert opt.micro_batches
    plain = _saved(model, opt)
    opt.register_state_dict_post_hook(by_name)
    hooked = _saved(model, opt)
    assert set(hooked[1]["state"]) == set(names)
    seen = []
    fresh, fresh_opt = _resumed(plain)
    model2 = digits_model(torch.float32)
    model2.load_state_dict(hooked[0])
    opt2 = _digits_optimizer(model2)
    opt2.register_load_state_dict_pre_hook(by_index)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append(o.stats))
    opt2.load_state_dict(hooked[1])
    assert seen == [opt.stats] and "elra_controller" not in opt2.param_groups[0]
    end = _collect(fresh, fresh_opt, 31, 90)
    assert _same(_collect(model2, opt2, 31, 90), end) and opt2.stats == fresh_opt.stats


def test_sync_pending_grads_reduces_the_models_in_the_order_the_optimizer_learned_them(monkeypatch):
    """Each model's reduction is a collective, so every rank must take the models in one order. They were taken in
    a set's order, which follows the models' hashes (their addresses, which differ between processes): one rank
    could average model A's gradient sums with another rank's sums of model B. Hashes stand in for the addresses."""
    import elra.checkpoint
    from elra.sync import tell_optimizer

    class Hashed(torch.nn.Linear):
        def __init__(self, key: int) -> None:
            super().__init__(2, 2)
            self.key = key

        def __hash__(self) -> int:
            return self.key

    models = [Hashed(key) for key in (7, 6, 5, 4, 3, 2, 1, 0)]  # a set of them iterates in the reverse order
    opt = ElraOptimizer([p for m in models for p in m.parameters()], batch_multiplier=2)
    loss = sum(m(torch.ones(1, 2)).sum() for m in models)
    loss.backward()
    opt.step(loss)
    for m in models:
        tell_optimizer(m, opt, unsynced=True)
    reduced = []
    monkeypatch.setattr(elra.checkpoint, "sync_unsynced_grads", reduced.append)
    opt.sync_pending_grads()
    assert reduced == models


@pytest.mark.parametrize("preconditioner", ["adam", "muon"])
def test_a_run_resumed_in_its_step_budgets_cooldown_continues_bit_identically(preconditioner, monkeypatch):
    """Saved in the cooldown (micro-steps 96-120 of a 120-step budget, 3 micro-batches a real step, retraces
    among them): the clock and the length the cooldown falls from resume with the run, past the budget too.
    Its gradients are still a fifth signal there: the cooldown is let start at once (a start the signal share
    delays resumes in test_line_control)."""
    monkeypatch.setattr(elra.line_control, "COOLDOWN_SIGNAL", 1.0)
    model = digits_model(torch.float32)
    start = copy.deepcopy(model)
    opt = _digits_optimizer(model, preconditioner=preconditioner, total_steps=120)
    expected = _run(model, opt, 0, 130)
    model, opt = start, _digits_optimizer(start, preconditioner=preconditioner, total_steps=120)
    _run(model, opt, 0, 105)
    controller = opt.state_dict()["param_groups"][0]["elra_controller"]
    assert 96 <= controller["micro_steps"] <= 105 and controller["cooldown_eta"] > 0  # mid-cooldown
    resumed = copy.deepcopy(model)
    again = _digits_optimizer(resumed, preconditioner=preconditioner, total_steps=120)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert _same(_run(resumed, again, 105, 130), expected)
    assert again.stats["lr"] == pytest.approx(controller["cooldown_eta"] * 0.02)  # at the floor past the budget


def test_a_checkpoint_from_before_step_budgets_keeps_the_constructors_budget():
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner="adam")
    _run(model, opt, 0, 30)
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["elra_config"]["total_steps"]
    for key in ("micro_steps", "cooldown_eta", "cooldown_from"):
        del sd["param_groups"][0]["elra_controller"][key]
    resumed = _digits_optimizer(copy.deepcopy(model), preconditioner="adam", total_steps=40)
    resumed.load_state_dict(sd)
    assert resumed._config["total_steps"] == 40 and resumed.controller.total_steps == 40
    assert resumed.controller.state.micro_steps == 0  # the clock starts at the load: the budget counts from there


def test_a_p2m_checkpoint_from_before_step_budgets_loads_without_the_constructors_budget(caplog):
    """The constructor's budget holds for such a checkpoint, where it can: P2M has none. The load raised
    "total_steps ... needs a preconditioner", which read like a constructor error; now the checkpoint's P2M
    wins, as its other hyperparameters do, with the change logged."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner=None)
    _run(model, opt, 0, 10)
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["elra_config"]["total_steps"]
    resumed = _digits_optimizer(copy.deepcopy(model), preconditioner="adam", total_steps=40)
    with caplog.at_level(logging.WARNING, logger="elra"):
        resumed.load_state_dict(sd)
    assert resumed.preconditioner is None and resumed.total_steps is None
    assert any("total_steps 40 -> None" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_a_deep_copied_state_dict_kept_while_training_goes_on_resumes_exactly(preconditioner):
    """``state_dict()`` hands out the live state tensors, as torch's optimizers do, among them a collected
    micro-batch sum (the ``.grad`` the next backward adds to), beside numbers copied at the call: a dict kept
    while training went on and saved later mixed two moments of the run. The README says to save it at once or
    keep a ``copy.deepcopy``; such a copy, saved after more steps, resumes the run exactly."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, preconditioner=preconditioner, batch_multiplier=3)
    _run(model, opt, 0, 7)  # 2 real steps and one collected micro-batch
    assert opt.micro_batches == 1
    kept, kept_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _run(model, opt, 7, 20)
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    buffer.seek(0)
    resumed_model = digits_model(torch.float32)
    resumed_model.load_state_dict(kept_model)
    resumed = _digits_optimizer(resumed_model, preconditioner=preconditioner, batch_multiplier=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _run(resumed_model, resumed, 7, 20)
    assert resumed.stats == opt.stats
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_collected_losses_saved_as_a_list_by_an_older_elra_still_load():
    """Session 25 saves them as one JSON string (torch's rank-0 broadcast flattened the list); a list loads
    too, and a value that is neither is refused before anything changes."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, batch_multiplier=3)
    _run(model, opt, 0, 7)
    sd = copy.deepcopy(opt.state_dict())
    controller = sd["param_groups"][0]["elra_controller"]
    assert isinstance(controller["pending_losses"], str) and len(json.loads(controller["pending_losses"])) == 1
    as_list = copy.deepcopy(sd)
    as_list["param_groups"][0]["elra_controller"]["pending_losses"] = json.loads(controller["pending_losses"])
    resumed = _digits_optimizer(copy.deepcopy(model), batch_multiplier=3)
    resumed.load_state_dict(as_list)
    assert resumed.micro_batches == 1 and resumed.state_dict()["param_groups"][0]["elra_controller"] == controller
    assert resumed.micro_batches_taken == opt.micro_batches_taken == 7  # two real steps of 3 and one collected
    controller["pending_losses"] = "1.5, nonsense"
    with pytest.raises(ValueError, match="pending_losses"):
        _digits_optimizer(copy.deepcopy(model), batch_multiplier=3).load_state_dict(sd)


def test_p2m_counts_the_micro_batches_taken_and_its_checkpoint_restores_them():
    """``micro_batches_taken`` raised AttributeError under P2M (its controller kept no such clock), also after
    loading a P2M checkpoint into an optimizer built with the default direction. A P2M state of an older elra,
    which lacks the count, loads with the clock at the collected micro-batches."""
    model = digits_model(torch.float32)
    opt = _digits_optimizer(model, batch_multiplier=2, preconditioner=None)
    _run(model, opt, 0, 5)
    assert opt.micro_batches_taken == 5  # two real steps of 2 and one collected
    resumed = _digits_optimizer(copy.deepcopy(model))  # the default direction: the checkpoint's P2M wins
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.preconditioner is None and resumed.micro_batches_taken == 5
    older = copy.deepcopy(opt.state_dict())
    del older["param_groups"][0]["elra_controller"]["micro_steps"]
    resumed.load_state_dict(older)
    assert resumed.micro_batches_taken == 1


def test_a_budget_set_after_loading_replaces_the_checkpoints_and_is_saved():
    """A job resumed to run longer sets its own budget after the load: from there it trains as a run built with
    that budget (bit for bit before the cooldown), and the next checkpoint carries it."""
    model = digits_model(torch.float32)
    start = copy.deepcopy(model)
    longer = _digits_optimizer(model, preconditioner="adam", total_steps=200)
    expected = _run(model, longer, 0, 150)
    model, opt = start, _digits_optimizer(start, preconditioner="adam", total_steps=120)
    _run(model, opt, 0, 60)
    again = _digits_optimizer(model, preconditioner="adam", total_steps=200)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert again.total_steps == 120  # the checkpoint's, with a warning
    assert again.micro_batches_taken == 60  # the budget's clock, restored
    again.total_steps = again.micro_batches_taken + 140
    assert _same(_run(model, again, 60, 150), expected)
    assert again.state_dict()["param_groups"][0]["elra_config"]["total_steps"] == 200
    again.total_steps = None
    assert again.controller.total_steps is None
    with pytest.raises(ValueError, match="total_steps"):
        again.total_steps = 0
    with pytest.raises(ValueError, match="needs a preconditioner"):
        _digits_optimizer(digits_model(torch.float32), preconditioner=None).total_steps = 100
    assert again.total_steps is None  # a refused value changes nothing
