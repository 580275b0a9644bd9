"""launch/train.py under torchrun: every strategy, and a killed job that resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAIN = Path(__file__).resolve().parents[1] / "launch" / "train.py"
SMALL = ["--epochs", "3", "--max-steps", "12", "--threads", "1"]


def _command(strategy: str, *extra: str) -> list[str]:
    launcher = [sys.executable] if strategy == "none" else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, str(TRAIN), "--strategy", strategy, *SMALL, *extra]


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _accuracies(output: str) -> list[float]:
    return [float(v) for v in re.findall(r" accuracy (\d\.\d+)", output)]


def _boost_accuracies(output: str) -> list[float]:
    return [float(v) for v in re.findall(r" boost (\d\.\d+|nan)", output)]


def test_every_strategy_runs_and_the_distributed_ones_agree():
    outputs = {s: _run(_command(s)) for s in ("none", "ddp", "fsdp2", "fsdp1")}
    results = {s: _accuracies(output) for s, output in outputs.items()}
    assert all(len(v) == 3 for v in results.values())
    assert results["ddp"] == pytest.approx(results["fsdp2"], abs=1e-3) == results["fsdp1"]
    assert results["none"][-1] > 0.5
    boosts = {s: _boost_accuracies(outputs[s]) for s in ("ddp", "fsdp2", "fsdp1")}
    assert boosts["ddp"] == pytest.approx(boosts["fsdp2"], abs=1e-3) == boosts["fsdp1"]
    assert boosts["fsdp1"] != results["fsdp1"]  # the boosted weights were evaluated, not the current ones


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp1"])
def test_crashed_job_resumes_from_its_newest_complete_checkpoint(tmp_path, strategy):
    # 12 micro-batches per epoch, 5 per real step: epochs end in the middle of collecting
    collect = ["--batch-multiplier", "5", "--epochs", "6"]
    reference = tmp_path / "reference.pt"
    _run(_command(strategy, "--save-final", str(reference), "--checkpoint-dir", str(tmp_path / "uninterrupted"), *collect))

    checkpoints, final = tmp_path / "ckpt", tmp_path / "final.pt"
    resumable = ["--checkpoint-dir", str(checkpoints), "--save-final", str(final), *collect]
    crashed = subprocess.run(_command(strategy, *resumable, "--crash-after-epoch", "3"), capture_output=True, timeout=300)
    assert crashed.returncode != 0 and not final.exists()
    (checkpoints / "epoch-00004.tmp").mkdir()  # a write that was interrupted
    (checkpoints / "epoch-00004.tmp" / "state.pt").write_bytes(b"garbage")

    if strategy == "ddp":  # the checkpoint it resumes from holds a pending micro-batch sum
        saved = torch.load(checkpoints / "epoch-00003" / "state.pt", weights_only=True)["optim"]
        assert saved["param_groups"][0]["elra_controller"]["pending_losses"]
    output = _run(_command(strategy, *resumable))
    assert [int(m) for m in re.findall(r"epoch +(\d+) ", output)] == [4, 5, 6]
    expected, got = torch.load(reference, weights_only=True), torch.load(final, weights_only=True)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resnet18_on_fake_cifar_runs_one_process(tmp_path):
    pytest.importorskip("torchvision")
    output = _run(
        [sys.executable, str(TRAIN), "--model", "resnet18", "--fake-size", "64", "--max-steps", "2", "--epochs", "1",
         "--batch-size", "8", "--threads", "1", "--data-dir", str(tmp_path / "no-cifar-here")]
    )
    assert len(_accuracies(output)) == 1
