"""Faults under torchrun: a killed rank restarts elastically, a stalled rank fails the job in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TRAIN = Path(__file__).resolve().parents[1] / "launch" / "train.py"


def _env() -> dict[str, str]:
    """The environment at call time (conftest points TMPDIR at pytest's base temp once the session starts)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}",
        str(TRAIN), "--strategy", "ddp", "--threads", "1", *args,
    ]


def _workers(parent: int) -> list[int]:
    """PIDs of the processes torchrun started."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return sorted(children)


def _wait_for(path: Path, job: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert job.poll() is None, "the job ended early"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_killed_rank_restarts_elastically_and_ends_where_an_undisturbed_run_ends(tmp_path):
    settings = ["--epochs", "12", "--save-final"]
    reference = tmp_path / "reference.pt"
    subprocess.run(_torchrun(*settings, str(reference)), check=True, capture_output=True, env=_env(), timeout=300)

    final, checkpoints = tmp_path / "final.pt", tmp_path / "ckpt"
    job = subprocess.Popen(
        _torchrun(*settings, str(final), "--checkpoint-dir", str(checkpoints), "--timeout", "20", restarts=3),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    _wait_for(checkpoints / "epoch-00002", job)
    os.kill(_workers(job.pid)[-1], signal.SIGKILL)
    try:
        _, err = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "resumed from epoch" in err  # the restarted workers picked up the newest checkpoint
    expected, got = torch.load(reference, weights_only=True), torch.load(final, weights_only=True)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_stalled_rank_fails_the_job_within_the_timeout(tmp_path):
    checkpoints = tmp_path / "ckpt"
    job = subprocess.Popen(
        _torchrun("--epochs", "200", "--timeout", "5", "--checkpoint-dir", str(checkpoints)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    _wait_for(checkpoints / "epoch-00001", job)
    victim = _workers(job.pid)[-1]
    os.kill(victim, signal.SIGSTOP)
    stalled = time.time()
    try:
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
        try:
            os.kill(victim, signal.SIGKILL)  # a stopped orphan would otherwise linger
        except ProcessLookupError:
            pass
    assert job.returncode != 0
    assert time.time() - stalled < 90
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-3000:]
