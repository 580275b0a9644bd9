"""Beyond the quality benchmark: model families and data pathologies a user will try that
``benchmarks/quality.py`` lacks, ELRA's default against Adam (1e-3) and AdamW (1e-3, weight decay 0.01).

    python benchmarks/beyond.py [--seeds 3] [--tasks NAME ...] [--optimizers NAME ...] [--out DIR]

quality.py measures clean, well-posed problems; these are the ones where a controller that adapts one global
step length from consecutive gradients (and detects whether the loss is noisy) can be misled, or where users
bring other architectures:

* "label noise": digits MLP (64-128-10), batch 32, 30% of the training labels randomised; clean test accuracy.
* "first batch twice": digits MLP, batch 32, the first mini-batch served at steps 0 and 1 (a resumed loader);
  test accuracy and the regime ELRA detected.
* "20 full-batch steps first": digits MLP, the first 20 evaluations on the whole training set, then batches of 32.
* "few-shot fine-tune": an MLP pretrained on digits 0-4 with Adam (seeded, the same for every optimizer), all
  weights fine-tuned with a new head on 50 rows of digits 5-9, batch 32; test loss and accuracy on 5-9.
* "LSTM char-LM": embedding 64, LSTM 128, context 64, batch 32 on the project's LICENSE text (last 10% held out);
  held-out bits per character.
* "multi-task 1:1000": a shared trunk with a 10-class head and a regression head, loss = CE + 1000 * MSE; test
  accuracy and regression mse.
* "logistic regression full-batch": breast_cancer (standardised), one nn.Linear, the whole training set each step;
  train loss, test log-loss, accuracy.
* "BatchNorm ResNet": a 4-block residual CNN with BatchNorm on 8x8 digits, batch 32; test accuracy and loss.
* "VAE": a digits VAE (latent 8, Bernoulli decoder), batch 32; test negative ELBO (nats, fixed sampling noise).

Every optimizer gets the same number of gradient evaluations (one backward = one evaluation); ELRA's loop is
``opt.zero_grad(); loss.backward(); opt.step(loss)`` (``opt.step_retrace(loss)`` on a non-finite loss). Data only
from scikit-learn's bundled datasets and the project's LICENSE. Prints a Markdown table (mean ± population sd over
seeds) and ELRA's controller (regime per seed, final step length ``stats["lr"]``, retraces); writes it to ``--out``
only when given. docs/benchmarks.md quotes its numbers.
"""

from __future__ import annotations

import argparse
import copy
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

from benchmarks.cli import known, positive, writable_folder  # noqa: E402
from benchmarks.quality import digits_split  # noqa: E402
from elra import ElraOptimizer  # noqa: E402

F = torch.nn.functional


@dataclass
class Task:
    name: str
    steps: int
    batch_size: int  # what ELRA is told
    metrics: list[str]  # names of what evaluate(model) returns, in order
    make: Callable  # seed -> (model, batches(step) -> (inputs, targets), loss_fn(output, targets), evaluate(model) -> tuple)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _accuracy(x_test, y_test):
    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return ((m(x_test).argmax(1) == y_test).float().mean().item(),)

    return evaluate


def _random_batches(inputs, targets, seed: int, size: int = 32) -> Callable:
    """``batches(step)``: ``size`` rows drawn with replacement by a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def batches(step):
        idx = torch.randint(0, len(inputs), (size,), generator=gen)
        return inputs[idx], targets[idx]

    return batches


def _label_noise(seed, noise=0.3):
    x, y, x_test, y_test = digits_split()
    y = y.clone()
    g = torch.Generator().manual_seed(100 + seed)
    flip = torch.rand(len(y), generator=g) < noise
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    torch.manual_seed(seed)
    return _mlp(), _random_batches(x, y, seed), F.cross_entropy, _accuracy(x_test, y_test)


def _odd_start(seed, full_steps=0, repeats=0):
    """Digits MLP on batches of 32 whose start is odd: the first batch served ``repeats`` times, or the first
    ``full_steps`` evaluations on the whole training set."""
    x, y, x_test, y_test = digits_split()
    torch.manual_seed(seed)
    model = _mlp()
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(y), (32,), generator=gen)

    def batches(step):
        if step < repeats:
            return x[first], y[first]
        if step < full_steps:
            return x, y
        idx = torch.randint(0, len(y), (32,), generator=gen)
        return x[idx], y[idx]

    return model, batches, F.cross_entropy, _accuracy(x_test, y_test)


def _finetune(seed, rows=50):
    x, y, x_test, y_test = digits_split()
    xa, ya = x[y < 5], y[y < 5]
    xb, yb = x[y >= 5][:rows], y[y >= 5][:rows] - 5
    xtb, ytb = x_test[y_test >= 5], y_test[y_test >= 5] - 5
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU())
    pre = torch.nn.Sequential(body, torch.nn.Linear(256, 5))
    adam = torch.optim.Adam(pre.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(1000):  # pretraining: Adam, the same for every optimizer compared
        i = torch.randint(0, len(ya), (32,), generator=g)
        adam.zero_grad()
        F.cross_entropy(pre(xa[i]), ya[i]).backward()
        adam.step()
    torch.manual_seed(seed + 100)
    model = torch.nn.Sequential(copy.deepcopy(body), torch.nn.Linear(256, 5))
    batches = _random_batches(xb, yb, seed)

    def evaluate(m):
        with torch.no_grad():
            out = m(xtb)
            return F.cross_entropy(out, ytb).item(), (out.argmax(1) == ytb).float().mean().item()

    return model, batches, F.cross_entropy, evaluate


class _LSTM(torch.nn.Module):
    def __init__(self, vocab, hidden=128):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 64)
        self.rnn = torch.nn.LSTM(64, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])


def _lstm_lm(seed, context=64):
    text = (ROOT / "LICENSE").read_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    split = int(0.9 * len(ids))
    train, test = ids[:split], ids[split:]
    torch.manual_seed(seed)
    model = _LSTM(len(vocab))
    gen = torch.Generator().manual_seed(seed)

    def batches(step):
        starts = torch.randint(0, len(train) - context - 1, (32,), generator=gen)
        w = torch.stack([train[s : s + context + 1] for s in starts])
        return w[:, :-1], w[:, 1:]

    def loss_fn(out, targets):
        return F.cross_entropy(out.reshape(-1, len(vocab)), targets.reshape(-1))

    def bits_per_char(m):
        m.eval()
        n = (len(test) - 1) // context * context
        with torch.no_grad():
            return (loss_fn(m(test[:n].view(-1, context)), test[1 : n + 1].view(-1, context)).item() / math.log(2),)

    return model, batches, loss_fn, bits_per_char


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU())
        self.a = torch.nn.Linear(128, 10)
        self.b = torch.nn.Linear(128, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h), self.b(h).squeeze(1)


def _multitask(seed, wa=1.0, wb=1000.0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    r = x.sum(1) + 0.5 * y.float()  # regression target: ink total + label/2, standardised
    r = (r - r.mean()) / r.std()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    torch.manual_seed(seed)
    model = _TwoHeads()
    gen = torch.Generator().manual_seed(seed)

    def batches(step):
        idx = train[torch.randint(0, len(train), (32,), generator=gen)]
        return x[idx], (y[idx], r[idx])

    def loss_fn(out, targets):
        return wa * F.cross_entropy(out[0], targets[0]) + wb * F.mse_loss(out[1], targets[1])

    def evaluate(m):
        with torch.no_grad():
            a, b = m(x[test])
            return (a.argmax(1) == y[test]).float().mean().item(), F.mse_loss(b, r[test]).item()

    return model, batches, loss_fn, evaluate


def _logreg(seed):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x_all = torch.tensor(data.data, dtype=torch.float32)
    y_all = torch.tensor(data.target, dtype=torch.float32)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y_all))
    x, y, x_test, y_test = x_all[order[:split]], y_all[order[:split]], x_all[order[split:]], y_all[order[split:]]
    mean, std = x.mean(0), x.std(0)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    torch.manual_seed(seed)
    model = torch.nn.Linear(30, 1)

    def loss_fn(out, targets):
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), targets)

    def evaluate(m):
        with torch.no_grad():
            return (
                loss_fn(m(x), y).item(),
                loss_fn(m(x_test), y_test).item(),
                ((m(x_test).squeeze(-1) > 0).float() == y_test).float().mean().item(),
            )

    return model, lambda step: (x, y), loss_fn, evaluate


class _Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.c2, self.b2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class _ResNet(torch.nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(_Block(c), _Block(c), torch.nn.MaxPool2d(2), _Block(c), _Block(c))
        self.head = torch.nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _resnet(seed):
    x, y, x_test, y_test = digits_split(images=True)
    torch.manual_seed(seed)
    model = _ResNet()
    batches = _random_batches(x, y, seed)

    def evaluate(m):
        m.eval()  # BatchNorm's running statistics
        with torch.no_grad():
            out = m(x_test)
            return (out.argmax(1) == y_test).float().mean().item(), F.cross_entropy(out, y_test).item()

    return model, batches, F.cross_entropy, evaluate


class _VAE(torch.nn.Module):
    def __init__(self, z=8):
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2 * z))
        self.dec = torch.nn.Sequential(torch.nn.Linear(z, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))

    def forward(self, x):
        mu, log_var = self.enc(x).chunk(2, -1)
        return self.dec(mu + torch.randn_like(mu) * (0.5 * log_var).exp()), mu, log_var


def _vae_loss(out, targets):
    logits, mu, log_var = out
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(targets)
    return bce - 0.5 * (1 + log_var - mu**2 - log_var.exp()).sum() / len(targets)


def _vae(seed):
    x, _, x_test, _ = digits_split()
    torch.manual_seed(seed)
    model = _VAE()
    batches = _random_batches(x, x, seed)

    def evaluate(m):
        torch.manual_seed(123)  # the test ELBO with sampling, the same noise for every run
        with torch.no_grad():
            return (_vae_loss(m(x_test), x_test).item(),)

    return model, batches, _vae_loss, evaluate


TASKS = [
    Task("label noise", 1500, 32, ["clean test accuracy"], _label_noise),
    Task("first batch twice", 1500, 32, ["test accuracy"], lambda seed: _odd_start(seed, repeats=2)),
    Task("20 full-batch steps first", 1500, 32, ["test accuracy"], lambda seed: _odd_start(seed, full_steps=20)),
    Task("few-shot fine-tune", 300, 32, ["test loss", "test accuracy"], _finetune),
    Task("LSTM char-LM", 1500, 32, ["held-out bits/char"], _lstm_lm),
    Task("multi-task 1:1000", 1500, 32, ["test accuracy", "test mse (regression head)"], _multitask),
    Task("logistic regression full-batch", 500, 455, ["train loss", "test log-loss", "test accuracy"], _logreg),
    Task("BatchNorm ResNet", 1500, 32, ["test accuracy", "test loss"], _resnet),
    Task("VAE", 2000, 32, ["test negative ELBO (nats)"], _vae),
]

OPTIMIZERS = {
    "ELRA": lambda params, task: ElraOptimizer(params, None, task.batch_size),
    "Adam 1e-3": lambda params, task: torch.optim.Adam(params, lr=1e-3),
    "AdamW 1e-3 wd0.01": lambda params, task: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
}


def run(task: Task, name: str, seed: int) -> dict:
    """``task.steps`` gradient evaluations of optimizer ``name``; a peer stops at a non-finite loss (diverged)."""
    model, batches, loss_fn, evaluate = task.make(seed)
    opt = OPTIMIZERS[name](list(model.parameters()), task)
    elra = isinstance(opt, ElraOptimizer)
    start, finished = time.perf_counter(), True
    for step in range(task.steps):
        model.train()
        inputs, targets = batches(step)
        opt.zero_grad()
        loss = loss_fn(model(inputs), targets)
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
            opt.step(value) if elra else opt.step()
        elif elra:
            opt.step_retrace(value)
        else:
            finished = False
            break
    seconds = time.perf_counter() - start
    metrics = evaluate(model) if finished else tuple(math.nan for _ in task.metrics)
    result = {"metrics": metrics, "seconds": seconds}
    if elra:
        stats = opt.stats
        result.update(regime=stats["regime"], lr=stats["lr"], retraces=stats["retraces"])
    return result


def _cell(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    note = "" if len(finite) == len(values) else f" ({len(values) - len(finite)} diverged)"
    if len(values) == 1:
        return f"{finite[0]:.4g}{note}"
    return f"{statistics.fmean(finite):.4g} ± {statistics.pstdev(finite):.2g}{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=positive, default=3)
    parser.add_argument("--tasks", nargs="*", default=[t.name for t in TASKS])
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    parser.add_argument("--out", type=Path, help="a folder for beyond.md (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    known(parser, "tasks", args.tasks, [t.name for t in TASKS])
    known(parser, "optimizers", args.optimizers, list(OPTIMIZERS))
    if args.out:
        args.out = writable_folder(parser, args.out)
    tasks = [t for t in TASKS if t.name in args.tasks]
    peers = [n for n in OPTIMIZERS if n in args.optimizers]
    began = time.perf_counter()
    lines = ["| task | metric | " + " | ".join(peers) + " |", "|---|---|" + "---:|" * len(peers)]
    controller = ["| task | ELRA regime (per seed) | final step length | retraces |", "|---|---|---:|---:|"]
    for task in tasks:
        results = {}
        for name in peers:
            results[name] = [run(task, name, seed) for seed in range(args.seeds)]
            cells = [_cell([r["metrics"][i] for r in results[name]]) for i in range(len(task.metrics))]
            seconds = statistics.fmean(r["seconds"] for r in results[name])
            print(f"{task.name:30s} {name:18s} " + "; ".join(f"{m}: {c}" for m, c in zip(task.metrics, cells))
                  + f"  ({seconds:.1f} s/run)", flush=True)
        for i, metric in enumerate(task.metrics):
            lines.append(f"| {task.name} | {metric} | " + " | ".join(_cell([r["metrics"][i] for r in results[n]]) for n in peers) + " |")
        if "ELRA" in results:
            elra = results["ELRA"]
            controller.append(
                f"| {task.name} | {', '.join(r['regime'] for r in elra)} | {_cell([r['lr'] for r in elra])} | "
                f"{_cell([r['retraces'] for r in elra])} |"
            )
    evals = ", ".join(f"{t.name} {t.steps}" for t in tasks)
    table = "\n".join(lines) + (
        f"\n\nGradient evaluations per run (every optimizer): {evals}. Mean ± population standard deviation (ddof 0)"
        f" over {args.seeds} seed(s).\n"
    )
    if "ELRA" in peers:
        table += "\n" + "\n".join(controller) + "\n"
    table += f"\nWall time {time.perf_counter() - began:.0f} s.\n"
    print()
    print(table)
    if args.out:
        (args.out / "beyond.md").write_text(table)
        print(f"written to {args.out / 'beyond.md'}")


if __name__ == "__main__":
    main()
