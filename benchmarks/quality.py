"""Training quality: ELRA with defaults against tuned-by-convention peers.

    pip install -e '.[bench]' && python benchmarks/quality.py [--seeds 3] [--out DIR]

Tasks: the cubic fit and Rosenbrock (deterministic), an MLP and a small CNN
on scikit-learn's digits, and a character-level language model on the
project's LICENSE text (all offline). Optimizers: ELRA (defaults, lr=1e-5),
Adam (1e-3), SGD with momentum (0.01, 0.9), Prodigy (1.0), Schedule-Free
AdamW (defaults) and the published elra 0.0.5 (fetched with pip). Reports the
final training loss (mean of the last 10% of steps), the test metric and the
number of gradient evaluations; writes a Markdown table and loss-curve PNGs
to --out (default ~/.cache/elra-bench/results; the README's figures come from
``--out benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.published import CACHE, RESULTS, load_published, scratch_dir  # noqa: E402
from elra import ElraOptimizer  # noqa: E402


@dataclass
class Task:
    name: str
    steps: int
    classes: int  # ELRA's regime: 0 deterministic, >= 2 stochastic
    batch_size: int
    metric: str
    make: Callable  # seed -> (model, batches(step) -> (inputs, targets), loss_fn, evaluate(model) -> float)


def _cubic(seed):
    x = torch.linspace(-math.pi, math.pi, 2000)
    xx, y = x.unsqueeze(-1).pow(torch.tensor([1, 2, 3])), torch.sin(x)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0, 1))
    loss_fn = torch.nn.MSELoss(reduction="sum")
    return model, lambda step: (xx, y), loss_fn, lambda m: loss_fn(m(xx), y).item()


class _Point(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64) + 0.1 * torch.randn(2, generator=gen, dtype=torch.float64))

    def forward(self, _):
        return (1 - self.xy[0]) ** 2 + 100 * (self.xy[1] - self.xy[0] ** 2) ** 2


def _rosenbrock(seed):
    model = _Point(seed)
    return model, lambda step: (None, None), lambda out, _: out, lambda m: m(None).item()


def _digits_split(seed, images: bool):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    if images:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def _classifier(seed, model_fn, images):
    x, y, x_test, y_test = _digits_split(seed, images)
    torch.manual_seed(seed)
    model = model_fn()
    gen = torch.Generator().manual_seed(seed)

    def batches(step):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        return x[idx], y[idx]

    def accuracy(m):
        with torch.no_grad():
            return (m(x_test).argmax(1) == y_test).float().mean().item()

    return model, batches, torch.nn.functional.cross_entropy, accuracy


def _mlp(seed):
    return _classifier(seed, lambda: torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)), False)


def _cnn(seed):
    def model():
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10),
        )

    return _classifier(seed, model, True)


CONTEXT = 16


def _char_lm(seed):
    text = (ROOT / "LICENSE").read_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    split = int(0.9 * len(ids))
    train, test = ids[:split], ids[split:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(len(vocab), 24), torch.nn.Flatten(), torch.nn.Linear(24 * CONTEXT, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, len(vocab)),
    )
    gen = torch.Generator().manual_seed(seed)

    def windows(data, starts):
        return torch.stack([data[s : s + CONTEXT] for s in starts]), data[starts + CONTEXT]

    def batches(step):
        return windows(train, torch.randint(0, len(train) - CONTEXT - 1, (64,), generator=gen))

    test_x, test_y = windows(test, torch.arange(0, len(test) - CONTEXT - 1, 7))

    def bits_per_char(m):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(m(test_x), test_y).item() / math.log(2)

    return model, batches, torch.nn.functional.cross_entropy, bits_per_char


TASKS = [
    Task("cubic fit", 2000, 0, 2000, "final loss (optimum 8.8172)", _cubic),
    Task("Rosenbrock", 1000, 0, 1, "f(x) (optimum 0)", _rosenbrock),
    Task("digits MLP", 1500, 10, 32, "test accuracy", _mlp),
    Task("digits CNN", 1500, 10, 32, "test accuracy", _cnn),
    Task("char LM", 3000, 60, 64, "test bits/char", _char_lm),
]


class _Quiet:
    """Runs the published package's calls with its prints silenced."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, loss):
        with contextlib.redirect_stdout(io.StringIO()):
            self.optimizer.step(loss)

    def zero_grad(self):
        self.optimizer.zero_grad()


def optimizers(published) -> dict[str, Callable]:
    from prodigyopt import Prodigy
    from schedulefree import AdamWScheduleFree

    def published_elra(params, task):
        with contextlib.redirect_stdout(io.StringIO()):
            return _Quiet(published.ElraOptimizer(list(params), None, task.batch_size, task.classes, lr=1e-5))

    return {
        "ELRA": lambda params, task: ElraOptimizer(params, None, task.batch_size, task.classes),
        "Adam 1e-3": lambda params, task: torch.optim.Adam(params, lr=1e-3),
        "SGD 0.01 m0.9": lambda params, task: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        "Prodigy": lambda params, task: Prodigy(params, lr=1.0),
        "Schedule-Free AdamW": lambda params, task: AdamWScheduleFree(params),
        "elra 0.0.5": published_elra,
    }


def run(task: Task, name: str, factory, seed: int) -> dict:
    model, batches, loss_fn, evaluate = task.make(seed)
    opt = factory(model.parameters(), task)
    takes_loss = isinstance(opt, (ElraOptimizer, _Quiet))
    schedule_free = hasattr(opt, "train") and hasattr(opt, "eval") and not takes_loss
    if schedule_free:
        opt.train()
    losses, error = [], None
    start = time.perf_counter()
    try:
        _train(task, model, batches, loss_fn, opt, takes_loss, losses)
    except Exception as exc:  # the published package crashes on some problems: report it
        error = type(exc).__name__
    if schedule_free:
        opt.eval()
    tail = [v for v in losses[-max(1, len(losses) // 10) :] if math.isfinite(v)]
    return {
        "loss": statistics.fmean(tail) if tail and error is None else math.nan,
        "metric": evaluate(model) if error is None else math.nan,
        "error": error,
        "grads": len(losses),
        "seconds": time.perf_counter() - start,
        "curve": losses,
    }


def _train(task, model, batches, loss_fn, opt, takes_loss, losses) -> None:
    for step in range(task.steps):
        inputs, targets = batches(step)
        loss = loss_fn(model(inputs), targets)
        value = loss.item()
        losses.append(value)
        opt.zero_grad()
        if not math.isfinite(value):
            if isinstance(opt, ElraOptimizer):
                opt.step_retrace(value)
                continue
            break  # the other optimizers have no way back
        loss.backward()
        opt.step(value) if takes_loss else opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table and plots go")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--tasks", nargs="*", default=[t.name for t in TASKS])
    args = parser.parse_args()
    args.out, args.cache = args.out.resolve(), args.cache.resolve()
    torch.set_num_threads(1)
    peers = optimizers(load_published(args.cache))
    args.out.mkdir(parents=True, exist_ok=True)
    with scratch_dir():  # the published package writes state_lgs.txt where it runs
        _benchmark(args, peers)
    print(f"written to {args.out}")


def _benchmark(args, peers: dict[str, Callable]) -> None:
    lines = [
        "| task | metric | " + " | ".join(peers) + " |",
        "|---|---|" + "---:|" * len(peers),
    ]
    curves = {}
    for task in [t for t in TASKS if t.name in args.tasks]:
        seeds = range(1) if task.classes == 0 else range(args.seeds)
        cells_loss, cells_metric = [], []
        for name, factory in peers.items():
            results = [run(task, name, factory, seed) for seed in seeds]
            curves[(task.name, name)] = results[0]["curve"]
            errors = sorted({r["error"] for r in results if r["error"]})
            cells_loss.append(_cell([r["loss"] for r in results], errors))
            cells_metric.append(_cell([r["metric"] for r in results], errors))
            print(f"{task.name:12s} {name:20s} loss {cells_loss[-1]:>22s}  {task.metric}: {cells_metric[-1]}", flush=True)
        lines.append(f"| {task.name} | train loss (last 10%) | " + " | ".join(cells_loss) + " |")
        lines.append(f"| {task.name} | {task.metric} | " + " | ".join(cells_metric) + " |")
    grads = ", ".join(f"{t.name} {t.steps}" for t in TASKS if t.name in args.tasks)
    table = "\n".join(lines) + f"\n\nGradient evaluations per run (every optimizer): {grads}. Mean ± std over seeds.\n"
    (args.out / "quality.md").write_text(table)
    print(table)
    _plot(curves, args.out)


def _cell(values: list[float], errors: list[str]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if errors:
        return "crashed: " + ", ".join(errors)
    if not finite:
        return "diverged"
    mean = statistics.fmean(finite)
    spread = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    note = "" if len(finite) == len(values) else f" ({len(values) - len(finite)} diverged)"
    return f"{mean:.4g} ± {spread:.2g}{note}" if len(values) > 1 else f"{mean:.4g}{note}"


def _plot(curves: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    for task in dict.fromkeys(t for t, _ in curves):
        fig, ax = plt.subplots(figsize=(7, 4))
        for (t, name), curve in curves.items():
            if t != task:
                continue
            window = max(1, len(curve) // 100)
            smooth = [statistics.fmean(curve[i : i + window]) for i in range(0, len(curve) - window + 1, window)]
            style = {"linewidth": 2.5, "zorder": 3} if name == "ELRA" else {"linestyle": "--"} if name == "elra 0.0.5" else {}
            ax.plot([i * window for i in range(len(smooth))], smooth, label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("gradient evaluations")
        ax.set_ylabel("training loss (window mean)")
        ax.set_title(task)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"quality_{task.replace(' ', '_').lower()}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
