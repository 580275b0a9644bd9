"""The examples run and reach what they promise."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*command: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _accuracies(output: str) -> list[float]:
    return [float(v) for v in re.findall(r"accuracy (\d\.\d+)", output)]


def test_digits_example_learns_the_digits():
    accuracies = _accuracies(_run(sys.executable, str(EXAMPLES / "digits.py"), "--epochs", "8"))
    assert len(accuracies) == 8 and accuracies[-1] > 0.93


def test_distributed_example_trains_the_same_under_ddp_and_fsdp2():
    outputs = {
        strategy: _run(
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(EXAMPLES / "distributed_digits.py"), "--strategy", strategy, "--epochs", "3",
        )
        for strategy in ("ddp", "fsdp2")
    }
    ddp, fsdp2 = (_accuracies(outputs[s]) for s in ("ddp", "fsdp2"))
    assert len(ddp) == 3 and ddp[-1] > 0.9
    assert ddp == pytest.approx(fsdp2, abs=2e-3)
