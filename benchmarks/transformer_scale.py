"""Does ELRA's lead on the benchmark transformer hold at a larger scale? A GPU run.

The quality benchmark's transformer (``benchmarks/quality.py``: 0.4M
parameters, context 64, 1000 steps on one CPU thread) is small. This trains
``launch.models.CharGPT`` at a size a CPU cannot (default: width 256, 6
layers, context 128, batch 64, about 4.8M parameters) on 20M characters of
the standard library's source (more than 2000 steps read: held-out loss
then measures optimisation, not memorisation), in bfloat16 autocast as GPU
training usually runs, every optimizer for the same number of steps from the
same weights and batches. Prints held-out bits per character (the last 10%
of the text) and the wall time per training step (forward, backward and the
optimizer's step, evaluations left out) per run, as each run ends.

    python benchmarks/transformer_scale.py [--steps 1500] [--seeds 2] [--first-seed 0] [--text-size 20000000]
        [--eval-every 0] [--optimizers ...]

Needs prodigyopt and schedulefree for those peers (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cli import positive  # noqa: E402
from elra import ElraOptimizer  # noqa: E402
from benchmarks.quality import CooledAdam, prodigy, schedule_free  # noqa: E402
from launch.models import CharGPT  # noqa: E402
from launch.text import CharCorpus  # noqa: E402


OPTIMIZERS = {
    "ELRA": lambda params, batch, steps: ElraOptimizer(params, None, batch),
    "ELRA, total_steps": lambda params, batch, steps: ElraOptimizer(params, None, batch, total_steps=steps),
    "ELRA adam": lambda params, batch, steps: ElraOptimizer(params, None, batch, preconditioner="adam"),
    "Adam 1e-3": lambda params, batch, steps: torch.optim.Adam(params, lr=1e-3),
    "Adam 1e-3, cooldown": lambda params, batch, steps: CooledAdam(params, steps),
    "Schedule-Free AdamW": lambda params, batch, steps: schedule_free(params),
    "Prodigy": lambda params, batch, steps: prodigy(params),
}


def bits_per_char(model: torch.nn.Module, ids: torch.Tensor, context: int) -> float:
    """Mean next-character loss in bits over windows of ``ids`` that do not overlap (float32, no autocast)."""
    starts = torch.arange(0, len(ids) - context - 1, context, device=ids.device)
    inputs, targets = CharCorpus.windows(ids, context, starts)
    total = 0.0
    with torch.no_grad():
        for x, y in zip(inputs.split(256), targets.split(256)):
            logits = model(x)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / targets.numel() / math.log(2)


def train(name: str, corpus: CharCorpus, args, seed: int, device: torch.device) -> tuple[float, float]:
    """Held-out bits/char after ``args.steps`` steps, and the mean wall time of a step in ms."""
    torch.manual_seed(seed)
    model = CharGPT(len(corpus.vocab), args.context, args.width, args.heads, args.layers).to(device)
    opt = OPTIMIZERS[name](model.parameters(), args.batch_size, args.steps)
    takes_loss = isinstance(opt, ElraOptimizer)
    if hasattr(opt, "train") and not takes_loss:
        opt.train()
    train_ids = corpus.train.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    _wait(device)
    start, evaluating = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train_ids) - args.context - 1, (args.batch_size,), generator=gen, device=device)
        inputs, targets = CharCorpus.windows(train_ids, args.context, starts)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.float32):
            logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step(loss) if takes_loss else opt.step()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            _wait(device)
            evaluating -= time.perf_counter()
            bits = evaluate(model, opt, corpus, args.context, device)
            print(f"  {name} seed {seed} step {step}: held-out bits/char {bits:.4f}", flush=True)
            evaluating += time.perf_counter()
    _wait(device)
    step_ms = (time.perf_counter() - start - evaluating) * 1e3 / args.steps
    return evaluate(model, opt, corpus, args.context, device), step_ms


def _wait(device: torch.device) -> None:
    """Let the device finish its queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: torch.nn.Module, opt, corpus: CharCorpus, context: int, device: torch.device) -> float:
    """Held-out bits/char of the weights an optimizer is judged on (Schedule-Free: its averaged ones); training resumes."""
    takes_loss = isinstance(opt, ElraOptimizer)
    if hasattr(opt, "eval") and not takes_loss:
        opt.eval()  # Schedule-Free is evaluated on its averaged weights
    model.eval()
    bits = bits_per_char(model, corpus.valid.to(device), context)
    model.train()
    if hasattr(opt, "train") and not takes_loss:
        opt.train()
    return bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive, default=1500)
    parser.add_argument("--seeds", type=positive, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--width", type=positive, default=256)
    parser.add_argument("--heads", type=positive, default=8)
    parser.add_argument("--layers", type=positive, default=6)
    parser.add_argument("--context", type=positive, default=128)
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument(
        "--text-size", type=int, default=20_000_000, help="characters of the standard library's source (the default: under one epoch)"
    )
    parser.add_argument("--eval-every", type=int, default=0, help="also print held-out bits/char every this many steps")
    parser.add_argument("--float32", action="store_true", help="no bfloat16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    corpus = CharCorpus.load(size=args.text_size)
    probe = CharGPT(len(corpus.vocab), args.context, args.width, args.heads, args.layers)
    print(
        f"CharGPT width {args.width}, {args.layers} layers, context {args.context}: "
        f"{sum(p.numel() for p in probe.parameters()) / 1e6:.2f}M parameters; {len(corpus.train):,} training and "
        f"{len(corpus.valid):,} held-out characters; batch {args.batch_size}, {args.steps} steps, "
        f"{'float32' if args.float32 else 'bfloat16 autocast'}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}",
        flush=True,
    )
    for name in args.optimizers:  # untimed: the device's and each optimizer's first-use costs
        train(name, corpus, argparse.Namespace(**{**vars(args), "steps": 5}), 0, device)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in args.optimizers}
    for seed in range(args.first_seed, args.first_seed + args.seeds):  # seed by seed: an interrupted run still compares every optimizer
        for name in args.optimizers:
            bits, step_ms = train(name, corpus, args, seed, device)
            results[name].append((bits, step_ms))
            print(f"seed {seed}  {name:20s} held-out bits/char {bits:.4f}  step {step_ms:.2f} ms", flush=True)
    print("\n| optimizer | held-out bits/char | mean | step ms (mean) |\n|---|---|---:|---:|")
    for name, runs in results.items():
        if runs:
            bits = ", ".join(f"{b:.3f}" for b, _ in runs)
            print(f"| {name} | {bits} | {statistics.fmean(b for b, _ in runs):.3f} | {statistics.fmean(t for _, t in runs):.1f} |")


if __name__ == "__main__":
    main()
