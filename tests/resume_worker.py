"""Train a digits MLP with ELRA; optionally save at one step or resume from a checkpoint.

Run as a script so that a resumed run starts in a fresh process:
    python resume_worker.py OUT --steps N [--save-at K --save PATH] [--resume PATH]
    python resume_worker.py --jobs '[{"out": OUT, "steps": N, "resume": PATH, "preconditioner": P}, ...]'
(--jobs: several resumes, one after the other, each into its own model and
optimizer, in one process that saved none of them: one interpreter start.)
Each micro-step's batch depends only on its index, so a resumed run sees the
same data as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import digits_data, digits_model  # noqa: E402
from elra import ElraOptimizer  # noqa: E402


def make_optimizer(model: torch.nn.Module, preconditioner: str | None = None) -> ElraOptimizer:
    return ElraOptimizer(
        model.parameters(), None, 768, 10, lr=1e-5, weight_decay=1e-3, momentum=0.5, batch_multiplier=2,
        preconditioner=preconditioner,
    )


def train(
    steps: int,
    save_at: int | None = None,
    save: Path | None = None,
    resume: Path | None = None,
    mid_collection: bool = False,
    preconditioner: str | None = None,
):
    """Train; or run until the first step >= save_at that is (or is not) mid-collection and save there."""
    x, y = digits_data(torch.float32)
    model = digits_model(torch.float32)
    opt = make_optimizer(model, preconditioner)
    start = 0
    if resume is not None:
        checkpoint = torch.load(resume, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        start = checkpoint["step"]
    for step in range(start, steps):
        if save_at is not None and step >= save_at and (opt.stats["micro_batches"] > 0) == mid_collection:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, save)
            break
        gen = torch.Generator().manual_seed(step)
        idx = torch.randint(0, len(x), (8,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        if step % 97 == 50:
            opt.step_retrace(loss.item())
            continue
        loss.backward()
        opt.step(loss)
        if step % 300 == 299:
            opt.set_train_loss(loss.item())
            opt.set_valid_loss(1.2 * loss.item())
    return model, opt


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--preconditioner")
    parser.add_argument("--jobs", type=json.loads, help="resumes to run in turn (JSON list), instead of OUT --steps")
    args = parser.parse_args()
    if args.jobs is None and (args.out is None or args.steps is None):
        parser.error("give OUT and --steps, or --jobs")
    jobs = args.jobs if args.jobs is not None else [
        {"out": args.out, "steps": args.steps, "save_at": args.save_at, "save": args.save, "resume": args.resume,
         "preconditioner": args.preconditioner}
    ]
    for job in jobs:
        resume = job.get("resume")
        model, opt = train(job["steps"], job.get("save_at"), job.get("save"), resume and Path(resume),
                           preconditioner=job.get("preconditioner"))
        torch.save({"model": model.state_dict(), "stats": opt.stats}, job["out"])


if __name__ == "__main__":
    main()
