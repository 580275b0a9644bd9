"""Does TF32 hurt ELRA? The quality benchmark's transformer trained on CUDA with TF32 matrix products off and on.

ELRA's default direction orthogonalises momentum matrices by a Newton-Schulz
iteration in float32; with TF32 allowed (a global setting users often turn
on) its products run on the tensor cores with an error of about 1e-3
(``benchmarks/orthogonalize.py``). TF32 rounds the model's own products too,
so Adam(1e-3) runs beside ELRA as the control. Held-out bits per character
after the benchmark's 1000 steps, per seed and mean; evaluation on the CPU.

    python benchmarks/tf32.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality import TASKS  # noqa: E402
from elra import ElraOptimizer  # noqa: E402

OPTIMIZERS = {
    "ELRA": lambda params, task: ElraOptimizer(params, None, task.batch_size),
    "Adam 1e-3": lambda params, task: torch.optim.Adam(params, lr=1e-3),
}


def held_out(name: str, seed: int, tf32: bool) -> float:
    """Train the transformer task on CUDA with ``name``; its held-out bits/char."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    task = next(t for t in TASKS if t.name == "transformer")
    model, batches, loss_fn, evaluate = task.make(seed)
    model.cuda()
    opt = OPTIMIZERS[name](model.parameters(), task)
    for step in range(task.steps):
        inputs, targets = (t.cuda() for t in batches(step))
        loss = loss_fn(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step(loss.item()) if isinstance(opt, ElraOptimizer) else opt.step()
    torch.backends.cuda.matmul.allow_tf32 = False
    return evaluate(model.cpu())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print(f"| optimizer | TF32 | held-out bits/char ({args.seeds} seeds) | mean |")
    print("|---|---|---|---:|")
    for name in OPTIMIZERS:
        for tf32 in (False, True):
            values = [held_out(name, seed, tf32) for seed in range(args.seeds)]
            runs = ", ".join(f"{v:.3f}" for v in values)
            print(f"| {name} | {'on' if tf32 else 'off'} | {runs} | {statistics.fmean(values):.3f} |", flush=True)


if __name__ == "__main__":
    main()
