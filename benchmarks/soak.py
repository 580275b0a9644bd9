"""Soak: many thousands of ELRA steps with faults and checkpoint/resume, against an undisturbed run.

    python benchmarks/soak.py [--steps 20000] [--resume-every 1000] [--fault-rate 0.01]

An MLP on the digits trains twice on the same batch stream (batch 16,
classes=10). The disturbed run gets nan losses, inf gradients and skipped
backward passes at random steps, and every ``resume-every`` steps its model
and optimizer go through ``state_dict`` -> ``torch.save`` -> ``torch.load``
-> fresh objects (a restart). Reports retraces, resumes, batch multiplier and
final loss/accuracy of both runs, and checks that parameters stayed finite.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli import fraction, positive  # noqa: E402
from elra import ElraOptimizer  # noqa: E402

EPOCH = 90  # micro-batches of 16 in the 1437 training digits


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def _fresh():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = ElraOptimizer(model.parameters(), None, 16, 10, lr=1e-5, weight_decay=0.9999)
    optimizer.enable_boost()
    return model, optimizer


def _restart(model, optimizer):
    """Round-trip through bytes into new objects, as a restarted process would."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model, optimizer = _fresh()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer


def run(steps: int, resume_every: int, fault_rate: float, disturbed: bool) -> dict:
    x, y, x_test, y_test = _data()
    model, optimizer = _fresh()
    batches = torch.Generator().manual_seed(1)
    faults = torch.Generator().manual_seed(2)
    counts = {"nan loss": 0, "inf gradient": 0, "skipped backward": 0, "resumes": 0}
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(y), (16,), generator=batches)
        fault = torch.rand((), generator=faults).item() < fault_rate and disturbed
        kind = int(torch.randint(0, 3, (), generator=faults)) if fault else -1
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        if kind == 2:
            counts["skipped backward"] += 1
            optimizer.step_retrace(loss.item())
        else:
            loss.backward()
            if kind == 1:
                counts["inf gradient"] += 1
                model[0].weight.grad[0, 0] = math.inf
            if kind == 0:
                counts["nan loss"] += 1
            optimizer.step(math.nan if kind == 0 else loss)
        if (step + 1) % EPOCH == 0:
            optimizer.restart_boost()  # an epoch boundary: the boost averages the next epoch
        if disturbed and resume_every and (step + 1) % resume_every == 0:
            model, optimizer = _restart(model, optimizer)
            counts["resumes"] += 1
    with torch.no_grad():
        train_loss = torch.nn.functional.cross_entropy(model(x), y).item()
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        with optimizer.boosted():
            boost_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()  # the last epoch's mean
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {
        **counts, **{k: optimizer.stats[k] for k in ("real_steps", "retraces", "batch_multiplier")},
        "train loss": train_loss, "test accuracy": accuracy, "boosted accuracy": boost_accuracy,
        "finite parameters": finite, "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive, default=20000)
    parser.add_argument("--resume-every", type=positive, default=1000)
    parser.add_argument("--fault-rate", type=fraction, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(1)
    undisturbed = run(args.steps, 0, 0.0, disturbed=False)
    disturbed = run(args.steps, args.resume_every, args.fault_rate, disturbed=True)
    print(f"{args.steps} micro-steps, faults at rate {args.fault_rate}, restart every {args.resume_every} steps")
    print(f"{'':22s}{'undisturbed':>14s}{'disturbed':>14s}")
    for key in disturbed:
        a, b = undisturbed[key], disturbed[key]
        fmt = (lambda v: f"{v:14.4f}") if isinstance(b, float) else (lambda v: f"{v!s:>14}")
        print(f"{key:22s}{fmt(a)}{fmt(b)}")
    if not disturbed["finite parameters"]:
        raise SystemExit("non-finite parameters after the soak")


if __name__ == "__main__":
    main()
