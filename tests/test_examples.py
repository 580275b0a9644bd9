"""The examples run and reach what they promise."""

import json
import importlib.util
import logging
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*command: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _accuracies(output: str) -> list[float]:
    return [float(v) for v in re.findall(r"accuracy (\d\.\d+)", output)]


def _run_script(monkeypatch, name: str, *args: str) -> None:
    """``python examples/<name>.py <args>`` in this process (its ``__main__`` block included), without the seconds
    a fresh interpreter takes to import torch; a SystemExit it raises propagates with its code."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py"), *args])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")


def test_digits_example_learns_the_digits(monkeypatch, capsys):
    _run_script(monkeypatch, "digits", "--epochs", "8")
    accuracies = _accuracies(capsys.readouterr().out)
    assert len(accuracies) == 8 and accuracies[-1] > 0.93


@pytest.mark.parametrize(
    "name, option",
    [("digits", "--epochs"), ("digits", "--batch-size"), ("distributed_digits", "--epochs"), ("distributed_digits", "--batch-size"),
     ("cubic_fit", "--steps"), ("rosenbrock", "--steps"), ("half_precision", "--epochs"), ("lightning_digits", "--epochs")],
)
def test_examples_refuse_a_count_of_zero_in_one_line(monkeypatch, capsys, name, option):
    """digits.py --epochs 0 ended in an UnboundLocalError traceback (the accuracy of an epoch that never ran),
    distributed_digits.py --batch-size 0 in a traceback on every rank, cubic_fit.py --steps 0 printed a best loss
    of inf; each is refused before anything runs (no process group either)."""
    if name == "lightning_digits":
        pytest.importorskip("lightning")  # without it the example says so and exits 0
    with pytest.raises(SystemExit) as stop:
        _run_script(monkeypatch, name, option, "0")
    assert stop.value.code == 2 and f"{option} must be at least 1, got 0" in capsys.readouterr().err


def test_the_digits_example_refuses_a_seed_torch_cannot_take_in_one_line(monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        _run_script(monkeypatch, "digits", "--seed", str(2**64))
    assert stop.value.code == 2 and "--seed must be one of torch's seeds" in capsys.readouterr().err


def test_distributed_example_trains_the_same_under_ddp_and_fsdp2():
    outputs = {
        strategy: _run(
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(EXAMPLES / "distributed_digits.py"), "--strategy", strategy, "--epochs", "4",
        )
        for strategy in ("ddp", "fsdp2")
    }
    ddp, fsdp2 = (_accuracies(outputs[s]) for s in ("ddp", "fsdp2"))
    assert len(ddp) == 4 and ddp[-1] > 0.9
    assert ddp == pytest.approx(fsdp2, abs=2e-3)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cubic_fit_example_reaches_the_least_squares_loss(caplog):
    with caplog.at_level(logging.INFO, logger="elra"):
        best, _ = _example("cubic_fit").fit(2000)
    assert best < 8.8172 + 1e-4
    assert "ELRA chose the deterministic regime at real step 2" in caplog.text  # detected, as its docstring says


def test_rosenbrock_example_reaches_the_minimum():
    xy, final, stats = _example("rosenbrock").minimise(500)
    assert final < 1e-12 and torch.allclose(xy, torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert stats["retraces"] > 0 and stats["regime"] == "deterministic"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_example_trains_with_the_scaler(dtype):
    accuracy, scale, _ = _example("half_precision").train(dtype, epochs=6)
    assert accuracy > 0.95 and scale >= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_half_precision_example_on_cuda_without_a_gpu_says_so(monkeypatch, capsys):
    """It ended in torch's 'Found no NVIDIA driver' traceback (an exception other than SystemExit here)."""
    with pytest.raises(SystemExit) as stop:
        _run_script(monkeypatch, "half_precision", "--device", "cuda", "--epochs", "1")
    assert stop.value.code == 2  # exit status 2, the message without a traceback
    assert "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err


def test_lightning_example_drives_elra_through_closures():
    pytest.importorskip("lightning")
    accuracy, stats = _example("lightning_digits").train(epochs=3)
    assert accuracy > 0.85 and stats["real_steps"] == 3 * 45


def test_lightning_example_validates_outside_fit():
    """``trainer.validate`` on a Trainer without optimizers (before a fit, or a new one after it) only measures;
    the module asked it for ELRA's optimizer and raised ``AttributeError``."""
    L = pytest.importorskip("lightning")
    example = _example("lightning_digits")
    torch.manual_seed(0)
    module = example.build_module(32)
    train_loader, valid_loader = example.digits_loaders(32)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                 enable_checkpointing=False)
    L.Trainer(**quiet).validate(module, valid_loader, verbose=False)
    assert 0.0 <= module.accuracy <= 1.0
    trainer = L.Trainer(max_epochs=1, limit_train_batches=20, num_sanity_val_steps=0, **quiet)
    trainer.fit(module, train_loader, valid_loader)
    fitted = module.accuracy
    optimizer = trainer.optimizers[0]
    fed = optimizer.controller.state.train_loss, optimizer.controller.state.valid_loss
    L.Trainer(**quiet).validate(module, valid_loader, verbose=False)
    assert module.accuracy == fitted
    assert (optimizer.controller.state.train_loss, optimizer.controller.state.valid_loss) == fed


def test_lightning_example_resumes_from_a_checkpoint_taken_mid_collection(tmp_path):
    """Lightning's ``zero_grad()`` before fitting dropped the restored micro-batch gradients (ELRA then raised).

    Lightning replays a mid-epoch plain DataLoader from a fresh shuffle, so the trajectories differ; the
    collected micro-batch counts, and the train losses not yet fed to ``set_train_loss`` travel along.
    """
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    example = _example("lightning_digits")

    def fit(out, ckpt_path=None, epochs=2):
        torch.manual_seed(0)
        module = example.build_module(32, batch_multiplier=3)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=7, save_top_k=-1)])
        trainer.fit(module, *example.digits_loaders(32), ckpt_path=ckpt_path)
        return module, trainer.optimizers[0]

    whole, whole_optimizer = fit(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "epoch=0-step=7.ckpt"
    assert json.loads(torch.load(checkpoint, weights_only=False)["optimizer_states"][0]["param_groups"][0][
        "elra_controller"]["pending_losses"])  # saved mid-collection
    resumed, resumed_optimizer = fit(tmp_path / "resumed", checkpoint)
    assert resumed_optimizer.stats["real_steps"] == whole_optimizer.stats["real_steps"] == 2 * 45 // 3
    saved = torch.load(checkpoint, weights_only=False)["train_losses"]  # a row per rank
    later = torch.load(tmp_path / "resumed" / "epoch=0-step=14.ckpt", weights_only=False)["train_losses"]
    assert saved.shape == (1, 7) and later.shape == (1, 14) and torch.equal(later[:, :7], saved)
    # the step budget: every micro-batch of the fit, also of one resumed for more epochs than its checkpoint's
    assert whole_optimizer.total_steps == 2 * 45
    _, longer = fit(tmp_path / "longer", checkpoint, epochs=3)
    assert longer.total_steps == 3 * 45 and longer.controller.state.micro_steps == 3 * 45

def test_lightning_example_on_two_ddp_processes_resumes_mid_collection_as_the_uninterrupted_fit(tmp_path):
    """Each rank collects the losses of its own micro-batches, and Lightning writes rank 0's checkpoint: a fit
    resumed from a step checkpoint taken mid-collection went on with rank 0's losses on both ranks, its loss
    statistics off the uninterrupted fit's. The example's callback averages them over the ranks before every
    checkpoint (ELRA's ``state_dict()`` refuses them otherwise), and the resumed fit is the uninterrupted one."""
    pytest.importorskip("lightning")
    _run(sys.executable, str(Path(__file__).parent / "lightning_ddp_worker.py"), str(tmp_path))
    saved = torch.load(tmp_path / "whole" / "epoch=0-step=4.ckpt", weights_only=False)["optimizer_states"][0]
    assert len(json.loads(saved["param_groups"][0]["elra_controller"]["pending_losses"])) == 1  # 1 of 3 collected
    for rank in range(2):
        whole, resumed = (torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=False) for name in ("whole", "resumed"))
        assert torch.equal(whole["params"], resumed["params"]) and whole["stats"] == resumed["stats"]
        assert whole["controller"] == resumed["controller"] and whole["stats"]["real_steps"] >= 10


def test_lightning_example_reports_and_feeds_the_whole_validation_sets_loss_and_accuracy():
    """The 360 validation digits come in batches of 256 and 104: the accuracy was the last batch's alone and the
    loss fed to set_valid_loss the unweighted mean of the two batch means."""
    L = pytest.importorskip("lightning")
    example = _example("lightning_digits")
    torch.manual_seed(0)
    module = example.build_module(32)
    train_loader, valid_loader = example.digits_loaders(32)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=6, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_loader, valid_loader)
    x, y = (torch.cat(parts) for parts in zip(*valid_loader))
    with torch.no_grad():
        logits = module.net(x)
    assert [len(batch[1]) for batch in valid_loader] == [256, 104]
    assert module.accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    valid_loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert trainer.optimizers[0].controller.state.valid_loss == pytest.approx(valid_loss, rel=1e-6)


@pytest.mark.parametrize("option", [{"accumulate_grad_batches": 2}, {"gradient_clip_val": 1.0}])
def test_lightning_example_refuses_what_would_fight_elra(option):
    """Accumulation handed ELRA every 2nd loss, halved, beside two batches' gradient; clipping rescales it."""
    L = pytest.importorskip("lightning")
    example = _example("lightning_digits")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **option)
    with pytest.raises(ValueError, match="accumulate_grad_batches and gradient_clip_val"):
        trainer.fit(example.build_module(32), *example.digits_loaders(32))



def test_lightning_example_refuses_accumulation_a_callback_schedules():
    """GradientAccumulationScheduler sets trainer.accumulate_grad_batches at each epoch's start, after on_fit_start
    had checked it: ELRA trained silently on every 2nd loss, halved, beside two batches' gradient."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    example = _example("lightning_digits")
    module = example.build_module(32)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[GradientAccumulationScheduler({0: 2})])
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(module, *example.digits_loaders(32))
    assert trainer.optimizers[0].stats["micro_batches"] == trainer.optimizers[0].stats["real_steps"] == 0


def test_lightning_example_refuses_a_grad_scaler_and_trains_in_bf16_mixed():
    """precision="16-mixed" on a GPU (its plugin built here for the CPU) runs the closure and calls ELRA's step()
    through torch's GradScaler without the loss: a TypeError deep in Lightning, refused up front here. "bf16-mixed",
    without a scaler, passes the closure and trains."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    example = _example("lightning_digits")
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, num_sanity_val_steps=0)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, plugins=[fp16], **quiet)
    with pytest.raises(ValueError, match="precision='16-mixed' steps through a GradScaler.*use precision='bf16-mixed'"):
        trainer.fit(example.build_module(32), *example.digits_loaders(32))
    unchecked = example.build_module(32)
    unchecked.on_fit_start = lambda: None  # past the example's check, ELRA itself refuses torch's scaler
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, plugins=[fp16], **quiet)
    with pytest.raises(TypeError, match="torch.amp.GradScaler cannot drive ELRA"):
        trainer.fit(unchecked, *example.digits_loaders(32))
    torch.manual_seed(0)
    module = example.build_module(32)
    trainer = L.Trainer(max_epochs=2, precision="bf16-mixed", **quiet)
    trainer.fit(module, *example.digits_loaders(32))
    assert trainer.optimizers[0].stats["real_steps"] == 2 * 45 and module.accuracy > 0.8


def test_hf_trainer_example_trains_gpt2_with_elra():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    losses, stats = _example("hf_trainer").train(steps=90, accumulation=2)
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    assert stats["real_steps"] + stats["retraces"] == 90 and stats["batch_multiplier"] == 2


@pytest.mark.parametrize("option", ["--steps", "--accumulation"])
def test_hf_trainer_example_refuses_zero_in_one_line(monkeypatch, capsys, option):
    """--accumulation 0 ended in a ZeroDivisionError traceback inside Trainer; --steps 0 (Trainer's max_steps=0,
    "not set") trained one step, where it promises --steps Trainer steps."""
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as stop:
        _run_script(monkeypatch, "hf_trainer", option, "0")
    assert stop.value.code == 2 and f"{option} must be at least 1, got 0" in capsys.readouterr().err


def test_lightning_example_keeps_a_non_finite_loss_out_of_the_fed_train_loss():
    """ELRA retraces a NaN micro-batch loss; the epoch's mean train loss then was NaN, and set_train_loss raised."""
    L = pytest.importorskip("lightning")
    example = _example("lightning_digits")
    seen = []

    class NanOnce(type(example.build_module(32))):
        def training_step(self, batch, index):
            x, y = batch
            loss = super().training_step((x * float("nan") if index == 3 else x, y), index)
            seen.append(loss.item())
            return loss

    module = NanOnce()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, *example.digits_loaders(32))
    optimizer = trainer.optimizers[0]
    finite = [v for v in seen if v == v]
    assert len(finite) == 7 and optimizer.stats["retraces"] >= 1
    assert optimizer.controller.state.train_loss == pytest.approx(sum(finite) / 7, rel=1e-6)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_distributed_example_follows_one_process_when_the_last_batch_leaves_a_rank_empty():
    """1797 digits in global batches of 2 x 449: the last one has a single sample, so rank 1 got none, its loss was
    nan, and every epoch ended in a retrace on both ranks (the step length halved). A batch too small for every rank
    to get a sample is dropped; the run then follows one process on the same global batches."""
    output = _run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "distributed_digits.py"), "--strategy", "ddp", "--epochs", "2", "--batch-size", "449",
    )
    from sklearn.datasets import load_digits

    from elra import ElraOptimizer

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = ElraOptimizer(model.parameters(), model, 449, 10, lr=1e-5, batch_multiplier=2)
    expected = []
    for epoch in range(2):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for batch in order[: len(order) // 898 * 898].split(898):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step(loss)
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        s = optimizer.stats
        expected.append(f"epoch {epoch + 1}  accuracy {accuracy:.3f}  lr {s['lr']:.3g}  batch x{s['batch_multiplier']}"
                        f"  retraces {s['retraces']}")
    assert [line for line in output.splitlines() if line.startswith("epoch")] == expected
