"""Shared fixtures: the published package for comparisons, and small problems."""

from __future__ import annotations

import atexit
import contextlib
import getpass
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.published import load_published  # noqa: E402

# hypothesis keeps caches in ./.hypothesis unless told otherwise: never in the
# checkout, and not left behind in the temporary directory either.
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    _hypothesis_dir = tempfile.mkdtemp(prefix="elra-hypothesis-")
    atexit.register(shutil.rmtree, _hypothesis_dir, ignore_errors=True)
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = _hypothesis_dir

# The test problems are tiny: one thread per process avoids oversubscribing the
# cores when pytest-xdist runs workers side by side.
torch.set_num_threads(1)


def _checkout_status() -> set[str] | None:
    """``git status --porcelain`` lines of the checkout (None without git or outside a repository)."""
    try:
        done = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Nothing a test runs may write into the checkout (use tmp dirs): fails the session if something did."""
    before = _checkout_status()
    yield
    after = _checkout_status()
    if before is not None and after is not None and after != before:
        pytest.fail(f"the tests changed the checkout {ROOT}: {sorted(after ^ before)}")


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """Processes the tests start keep their temporary files under pytest's base temp, which pytest prunes.

    torchrun makes a ``torchelastic_*`` log directory in the temporary directory
    at every launch and never removes it. torch.compile's cache stays where it
    was, so spawned workers that compile keep finding it warm.
    """
    inductor_cache = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess-tmp"))
    yield
    if before is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="session")
def published(tmp_path_factory):
    """The published ``elra`` 0.0.5, fetched with pip, imported as ``elra_published``."""
    return published_or_skip(tmp_path_factory.getbasetemp() / "published")


def published_or_skip(cache: Path):
    """The published package, or a skip of the comparing test where pip cannot fetch it (offline, no pip)."""
    try:
        return load_published(cache)
    except (subprocess.CalledProcessError, OSError) as error:
        pytest.skip(f"the published elra 0.0.5 cannot be installed: {error}")


@pytest.fixture
def quiet(monkeypatch, tmp_path):
    """Silence the published package's prints and keep the files it writes in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return lambda: contextlib.redirect_stdout(io.StringIO())


def cubic_data(dtype=torch.float32):
    """The seed's Example 1: fit sin(x) on [-pi, pi] with a cubic."""
    x = torch.linspace(-math.pi, math.pi, 2000, dtype=dtype)
    y = torch.sin(x)
    return x.unsqueeze(-1).pow(torch.tensor([1, 2, 3])), y


def cubic_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0, 1)).to(dtype)


def cubic_optimum(dtype=torch.float64) -> float:
    """Least-squares loss of the cubic fit (the value ELRA must reach)."""
    xx, y = cubic_data(torch.float64)
    design = torch.cat([torch.ones(len(y), 1, dtype=torch.float64), xx], 1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1)).solution
    return float(((design @ solution).squeeze(1) - y).pow(2).sum())


def run_cubic(make_opt, steps, dtype=torch.float32, shift=0.0):
    """Train the cubic fit; returns the loss of every step (before its update) and the model."""
    xx, y = cubic_data(dtype)
    model = cubic_model(dtype)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    opt = make_opt(model)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(xx), y) + shift
        value = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step(value)
        losses.append(value)
    return losses, model


def backward_and_step(opt, loss: torch.Tensor, scaler=None):
    """``loss.backward(); opt.step(loss)``, or through ``scaler`` (scale, backward, step, update): its outcome."""
    if scaler is None:
        loss.backward()
        opt.step(loss)
        return None
    scaler.scale(loss).backward()
    outcome = scaler.step(opt)
    scaler.update()
    return outcome


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


def regression_after_zero_losses(make_optimizer, zero_steps: int) -> float:
    """The final mse of a linear regression (300 mini-batches of 16) trained after ``zero_steps`` steps of its loss
    weighted 0 (zero losses and gradients): a run of identical losses must not stop the training after it."""
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]) + 0.1 * torch.randn(256)
    model = torch.nn.Linear(5, 1)
    optimizer = make_optimizer(model.parameters())
    rows = torch.Generator().manual_seed(0)
    for step in range(zero_steps + 300):
        batch = torch.randint(0, 256, (16,), generator=rows)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[batch]).squeeze(1), y[batch]) * float(step >= zero_steps)
        loss.backward()
        optimizer.step(loss)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x).squeeze(1), y).item()


def run_rosenbrock(make_opt, steps, dtype=torch.float64, start=(-1.5, 2.0), shift=0.0):
    xy = torch.nn.Parameter(torch.tensor(start, dtype=dtype))
    opt = make_opt([xy])
    losses = []
    for _ in range(steps):
        loss = rosenbrock(xy) + shift
        value = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step(value)
        losses.append(value)
    return losses, xy


def digits_data(dtype=torch.float64):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data, dtype=dtype) / 16.0, torch.tensor(digits.target)


def digits_steps(model, opt, x, y, steps: int, seed: int, after_step=None) -> None:
    """``steps`` mini-batches of 32 digits drawn with ``seed``: cross-entropy, backward, ``opt.step(loss)``, then
    ``after_step(step)`` where given."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step(loss)
        if after_step is not None:
            after_step(step)


def digits_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).to(dtype)
