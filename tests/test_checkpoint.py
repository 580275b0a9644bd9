"""state_dict / load_state_dict: standard layout, exact resume in a fresh process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elra import ElraOptimizer
from resume_worker import make_optimizer, train

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS = 1400


@pytest.fixture(scope="module")
def uninterrupted():
    model, opt = train(STEPS)
    return model.state_dict(), opt.stats


@pytest.mark.parametrize("mid_collection", [True, False], ids=["mid-collection", "real-step-boundary"])
def test_resume_in_fresh_process_is_bit_identical(tmp_path, uninterrupted, mid_collection):
    checkpoint, out = tmp_path / "ckpt.pt", tmp_path / "final.pt"
    train(STEPS, save_at=700, save=checkpoint, mid_collection=mid_collection)
    subprocess.run(
        [sys.executable, str(WORKER), str(out), "--steps", str(STEPS), "--resume", str(checkpoint)], check=True
    )
    saved = torch.load(checkpoint, weights_only=True)
    resumed = torch.load(out, weights_only=True)
    expected_model, expected_stats = uninterrupted
    assert all(torch.equal(resumed["model"][k], v) for k, v in expected_model.items())
    assert resumed["stats"] == expected_stats
    assert expected_stats["retraces"] > 0 and expected_stats["batch_multiplier"] >= 2
    collecting = bool(saved["optimizer"]["param_groups"][0]["elra_controller"]["pending_losses"])
    assert collecting == mid_collection and saved["step"] >= 700


def test_preconditioned_resume_in_fresh_process_is_bit_identical(tmp_path):
    checkpoint, out = tmp_path / "ckpt.pt", tmp_path / "final.pt"
    steps = 500
    model, expected = train(steps, preconditioner="adam")
    train(steps, save_at=250, save=checkpoint, mid_collection=True, preconditioner="adam")
    command = [sys.executable, str(WORKER), str(out), "--steps", str(steps), "--resume", str(checkpoint)]
    subprocess.run([*command, "--preconditioner", "adam"], check=True)
    resumed = torch.load(out, weights_only=True)
    assert all(torch.equal(resumed["model"][k], v) for k, v in model.state_dict().items())
    assert resumed["stats"] == expected.stats and expected.stats["retraces"] > 0


def test_state_dict_uses_the_torch_layout():
    model = torch.nn.Linear(3, 2)
    opt = ElraOptimizer(model.parameters(), lr=1e-4)
    model(torch.ones(1, 3)).sum().backward()
    opt.step(1.0)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {0, 1}
    assert all(set(s) == {"direction"} for s in sd["state"].values())
    assert sd["state"][0]["direction"].shape == model.weight.shape
    controller = sd["param_groups"][0]["elra_controller"]
    assert all(isinstance(v, (int, float, bool, list, type(None))) for v in controller.values())
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


def test_loading_a_foreign_state_dict_raises():
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="not an ElraOptimizer state_dict"):
        ElraOptimizer(model.parameters()).load_state_dict(adam.state_dict())


def test_controller_state_from_another_version_raises():
    model = torch.nn.Linear(3, 2)
    sd = make_optimizer(model).state_dict()
    del sd["param_groups"][0]["elra_controller"]["alpha"]
    with pytest.raises(ValueError, match="missing"):
        make_optimizer(model).load_state_dict(sd)
