"""Training quality: ELRA with defaults against tuned-by-convention peers.

    pip install -e '.[bench]' && python benchmarks/quality.py [--seeds 3] [--jobs 2] [--out DIR]

Tasks (all offline): the cubic fit and Rosenbrock (deterministic), an MLP and
a small CNN on scikit-learn's digits, an MLP regression on scikit-learn's
diabetes data (these three also full-batch: deterministic losses), a wide
linear regression on synthetic data whose mini-batch gradients are mostly
noise, a character-level MLP language model on the project's LICENSE text, and two language models on the installed Python standard library's
source: an MLP over 16 characters and a 2-layer causal transformer
(``launch.models.CharGPT``, context 64). Optimizers: ELRA (defaults: the
muon direction and automatic weight decay), ELRA as the README's training
loop uses it (``set_train_loss``/``set_valid_loss`` every REPORT_EVERY steps,
the validation loss on about VALID_SHARE of the training split held out, so
it trains on less; the wide regression's endless stream keeps every batch and
draws its validation samples besides; mini-batch tasks only), ELRA P2M (the published method,
``preconditioner=None``), ELRA over Adam's and the factored direction, Adam
(1e-3), AdamW (1e-3, weight decay 0.01), SGD with momentum (0.01, 0.9),
Prodigy (1.0), Schedule-Free AdamW (defaults) and the published elra 0.0.5
(fetched with pip). Every optimizer gets the same number of gradient
evaluations. Reports the final training loss (mean of the last 10% of steps),
the held-out metric, and for ELRA what its controller did (step length, batch
multiplier, retraces over the run); writes a Markdown table and PNG plots to
``--out`` (default ~/.cache/elra-bench/results; the README's figures come
from ``--out benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import importlib.util
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli import known, positive, writable_folder  # noqa: E402
from benchmarks.published import CACHE, RESULTS, load_published, scratch_dir  # noqa: E402
from elra import ElraOptimizer  # noqa: E402
from elra.line_control import cooldown_factor  # noqa: E402
from launch.models import CharGPT  # noqa: E402
from launch.text import CharCorpus  # noqa: E402


@dataclass
class Task:
    name: str
    steps: int
    # the published package's regime (0 deterministic, >= 2 stochastic; a function where the data decide it);
    # ELRA detects its own
    classes: int | Callable[[], int]
    batch_size: int
    metric: str
    make: Callable  # seed -> (model, batches(step) -> (inputs, targets), loss_fn, evaluate(model) -> float)
    one_seed: bool = False  # a toy problem: its seed only moves the start a little
    # make(seed, hold_out=True) adds valid_loss(model): the training split loses VALID_SHARE to a validation split
    validates: bool = False

    def regime(self) -> int:
        """``classes``, for the published package."""
        return self.classes() if callable(self.classes) else self.classes


VALID_SHARE = 0.15  # of the training split, held out by the rows that report losses (never the test split)
REPORT_EVERY = 100  # steps between the losses such a row reports (set_train_loss / set_valid_loss)
REPORTING = "ELRA, losses reported"
PUBLISHED = "elra 0.0.5"
BUDGET = "ELRA, total_steps"  # told the task's steps: the cooldown of a step budget (docs/usage.md)


def _split_off(count: int) -> int:
    """How many of ``count`` training items stay for training when VALID_SHARE is held out."""
    return count - int(VALID_SHARE * count)


VALID_BLOCK = 2048  # characters: a text's training split is cut into blocks, every VALID_EVERY-th held out
VALID_EVERY = 7  # (about VALID_SHARE; blocks all along the text, since its tail is not like its head)
VALID_WINDOWS = 512  # at most this many windows in a language model's validation loss


def _text_starts(length: int, context: int, hold_out: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starts of the windows ``[s, s + context]`` of a text of ``length`` characters to train on, and with
    ``hold_out`` the starts of at most VALID_WINDOWS validation windows, each inside a held-out block (no
    character of them is trained on). Without ``hold_out`` every start trains, as in the other rows."""
    starts = torch.arange(length - context - 1)
    if not hold_out:
        return starts, None
    first, last = starts // VALID_BLOCK % VALID_EVERY, (starts + context) // VALID_BLOCK % VALID_EVERY
    held = VALID_EVERY - 1
    valid = starts[(first == held) & (last == held)]
    picked = torch.linspace(0, len(valid) - 1, min(VALID_WINDOWS, len(valid))).long()
    return starts[(first != held) & (last != held)], valid[picked]


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


def digits_split(images: bool = False):
    """The digits, scaled to [0, 1], in one fixed random 80/20 train/test split (``images``: 1x8x8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    if images:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def _classifier(seed, model_fn, images, full=False, hold_out=False):
    x, y, x_test, y_test = digits_split(images)
    if hold_out:  # the split's order is random: its tail is a random validation set
        keep = _split_off(len(y))
        x, y, x_valid, y_valid = x[:keep], y[:keep], x[keep:], y[keep:]
    torch.manual_seed(seed)
    model = model_fn()
    gen = torch.Generator().manual_seed(seed)

    def batches(step):
        if full:
            return x, y
        idx = torch.randint(0, len(y), (32,), generator=gen)
        return x[idx], y[idx]

    def accuracy(m):
        with torch.no_grad():
            return (m(x_test).argmax(1) == y_test).float().mean().item()

    task = model, batches, torch.nn.functional.cross_entropy, accuracy
    return (*task, _loss_on(torch.nn.functional.cross_entropy, x_valid, y_valid)) if hold_out else task


def _loss_on(loss_fn, inputs, targets):
    """``valid_loss(model)``: ``loss_fn`` on a fixed validation set."""

    def valid_loss(m):
        with torch.no_grad():
            return loss_fn(m(inputs), targets).item()

    return valid_loss


def _mlp(seed, full=False, hold_out=False):
    return _classifier(
        seed, lambda: torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)), False, full,
        hold_out,
    )


def _cnn(seed, full=False, hold_out=False):
    def model():
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10),
        )

    return _classifier(seed, model, True, full, hold_out)


CONTEXT = 16


def _char_lm(seed, hold_out=False):
    text = (ROOT / "LICENSE").read_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    split = int(0.9 * len(ids))
    train, test = ids[:split], ids[split:]
    train_starts, valid_starts = _text_starts(len(train), CONTEXT, hold_out)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(len(vocab), 24), torch.nn.Flatten(), torch.nn.Linear(24 * CONTEXT, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, len(vocab)),
    )
    gen = torch.Generator().manual_seed(seed)

    def windows(data, starts):
        return torch.stack([data[s : s + CONTEXT] for s in starts]), data[starts + CONTEXT]

    def batches(step):
        return windows(train, train_starts[torch.randint(0, len(train_starts), (64,), generator=gen)])

    test_x, test_y = windows(test, torch.arange(0, len(test) - CONTEXT - 1, 7))

    def bits_per_char(m):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(m(test_x), test_y).item() / math.log(2)

    task = model, batches, torch.nn.functional.cross_entropy, bits_per_char
    if not hold_out:
        return task
    return (*task, _loss_on(torch.nn.functional.cross_entropy, *windows(train, valid_starts)))


def _diabetes(seed, full=False, hold_out=False):
    """An MLP regression on scikit-learn's diabetes data (standardised); test mean squared error."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    y = (y - y[train].mean()) / y[train].std()
    if hold_out:  # standardised as the other rows are; the validation rows are left out of training only
        train, valid = train[: _split_off(len(train))], train[_split_off(len(train)) :]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1), torch.nn.Flatten(0, 1))
    gen = torch.Generator().manual_seed(seed)

    def batches(step):
        idx = train if full else train[torch.randint(0, len(train), (32,), generator=gen)]
        return x[idx], y[idx]

    def test_mse(m):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(m(x[test]), y[test]).item()

    task = model, batches, torch.nn.functional.mse_loss, test_mse
    return (*task, _loss_on(torch.nn.functional.mse_loss, x[valid], y[valid])) if hold_out else task


WIDE_INPUTS, WIDE_OUTPUTS, WIDE_NOISE = 4096, 4, 0.1


def _wide_regression(seed, hold_out=False):
    """A linear map from 4096 Gaussian inputs to 4 outputs fitted to a random teacher's noisy outputs, 32
    samples a batch: each gradient is mostly noise (ELRA's pair ratio sits near 0.1 at any short step).
    Test mean squared error against the teacher's noise-free outputs on 4096 fresh samples."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(WIDE_OUTPUTS, WIDE_INPUTS, generator=gen) / WIDE_INPUTS**0.5

    def samples(count):
        x = torch.randn(count, WIDE_INPUTS, generator=gen)
        return x, x @ teacher.T

    x_test, y_test = samples(4096)
    x_valid, y_valid = samples(1024)
    y_valid = y_valid + WIDE_NOISE * torch.randn(y_valid.shape, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Linear(WIDE_INPUTS, WIDE_OUTPUTS)

    def batches(step):
        x, y = samples(32)
        return x, y + WIDE_NOISE * torch.randn(y.shape, generator=gen)

    def test_mse(m):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(m(x_test), y_test).item()

    task = model, batches, torch.nn.functional.mse_loss, test_mse
    return (*task, _loss_on(torch.nn.functional.mse_loss, x_valid, y_valid)) if hold_out else task


def _full_batch(make):
    """``make``'s task on its whole training set at every step: a noise-free loss (full-batch training)."""
    return lambda seed: make(seed, full=True)


_CORPUS: list[CharCorpus] = []


def _stdlib_corpus() -> CharCorpus:
    if not _CORPUS:
        _CORPUS.append(CharCorpus.load())
    return _CORPUS[0]


def _language_model(seed, model: torch.nn.Module, context: int, batch: int, sequence: bool, hold_out: bool = False):
    """Next-character prediction on the stdlib corpus; held-out bits per character.

    ``sequence``: the model predicts every position of its window (a
    transformer); otherwise only the character after the window (an MLP).
    """
    corpus = _stdlib_corpus()
    train_starts, valid_starts = _text_starts(len(corpus.train), context, hold_out)
    gen = torch.Generator().manual_seed(seed)

    def windows(ids, starts):
        inputs, targets = CharCorpus.windows(ids, context, starts)
        return (inputs, targets) if sequence else (inputs, targets[:, -1])

    def batches(step):
        return windows(corpus.train, train_starts[torch.randint(0, len(train_starts), (batch,), generator=gen)])

    def loss_fn(logits, targets):
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())

    test_x, test_y = windows(corpus.valid, torch.arange(0, len(corpus.valid) - context - 1, context if sequence else 7))

    def bits_per_char(m):
        with torch.no_grad():
            return sum(loss_fn(m(x), y).item() * len(y) for x, y in zip(test_x.split(256), test_y.split(256))) / len(test_y) / math.log(2)

    task = model, batches, loss_fn, bits_per_char
    return (*task, _loss_on(loss_fn, *windows(corpus.train, valid_starts))) if hold_out else task


def _mlp_lm(seed, hold_out=False):
    vocab = len(_stdlib_corpus().vocab)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, 24), torch.nn.Flatten(), torch.nn.Linear(24 * CONTEXT, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, vocab),
    )
    return _language_model(seed, model, CONTEXT, 64, sequence=False, hold_out=hold_out)


def _transformer(seed, hold_out=False):
    torch.manual_seed(seed)
    model = CharGPT(len(_stdlib_corpus().vocab), context=64, width=128, heads=4, layers=2)
    return _language_model(seed, model, 64, 32, sequence=True, hold_out=hold_out)


def _stdlib_vocab() -> int:
    """The stdlib corpus's characters: the published package's ``classes`` for its language models (the corpus,
    and so its vocabulary, depends on the Python installed)."""
    return len(_stdlib_corpus().vocab)


LICENSE_VOCAB = len(set((ROOT / "LICENSE").read_text()))  # the char LM's (76)

TASKS = [
    Task("cubic fit", 2000, 0, 2000, "final loss (optimum 8.8172)", _cubic, one_seed=True),
    Task("Rosenbrock", 1000, 0, 1, "f(x) (optimum 0)", _rosenbrock, one_seed=True),
    Task("digits MLP full-batch", 400, 0, 1437, "test accuracy", _full_batch(_mlp)),
    Task("digits CNN full-batch", 200, 0, 1437, "test accuracy", _full_batch(_cnn)),
    Task("diabetes full-batch", 600, 0, 353, "test mse (standardised)", _full_batch(_diabetes)),
    Task("digits MLP", 1500, 10, 32, "test accuracy", _mlp, validates=True),
    Task("digits CNN", 1500, 10, 32, "test accuracy", _cnn, validates=True),
    Task("diabetes MLP", 1000, 2, 32, "test mse (standardised)", _diabetes, validates=True),
    Task("wide regression", 1000, 2, 32, "test mse (noise-free)", _wide_regression, validates=True),
    Task("char LM", 3000, LICENSE_VOCAB, 64, "test bits/char", _char_lm, validates=True),
    Task("MLP char-LM", 2000, _stdlib_vocab, 64, "held-out bits/char", _mlp_lm, validates=True),
    Task("transformer", 1000, _stdlib_vocab, 32, "held-out bits/char", _transformer, validates=True),
]


class _Quiet:
    """Runs the published package's calls with its prints silenced."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, loss):
        with contextlib.redirect_stdout(io.StringIO()):
            self.optimizer.step(loss)

    def step_retrace(self, loss):
        with contextlib.redirect_stdout(io.StringIO()):
            self.optimizer.step_retrace(loss)

    def zero_grad(self):
        self.optimizer.zero_grad()


def published_elra(published) -> Callable:
    """The factory of the published package's optimizer (``published``: the imported package)."""

    def make(params, task):
        with contextlib.redirect_stdout(io.StringIO()):
            return _Quiet(published.ElraOptimizer(list(params), None, task.batch_size, task.regime(), lr=1e-5))

    return make


class CooledAdam(torch.optim.Adam):
    """Adam(1e-3) told the step budget as ELRA's ``total_steps`` is: the same cooldown over its last steps
    (``elra.line_control.cooldown_factor`` times 1e-3), the fair peer of ELRA given the budget."""

    def __init__(self, params, total_steps: int) -> None:
        super().__init__(params, lr=1e-3)
        self.total_steps, self.taken = total_steps, 0

    @torch.no_grad()
    def step(self, closure=None):
        self.taken += 1
        for group in self.param_groups:
            group["lr"] = 1e-3 * cooldown_factor(self.total_steps, self.taken)
        return super().step(closure)


def prodigy(params):
    from prodigyopt import Prodigy  # the bench extra's peers, imported where they run (main checks they are there)

    return Prodigy(params, lr=1.0)


def schedule_free(params):
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(params)


PEER_PACKAGES = {"Prodigy": "prodigyopt", "Schedule-Free AdamW": "schedulefree"}


def optimizers(published) -> dict[str, Callable]:
    return {
        "ELRA": lambda params, task: ElraOptimizer(params, None, task.batch_size),
        REPORTING: lambda params, task: ElraOptimizer(params, None, task.batch_size),
        "ELRA P2M": lambda params, task: ElraOptimizer(params, None, task.batch_size, preconditioner=None),
        "ELRA adam": lambda params, task: ElraOptimizer(params, None, task.batch_size, preconditioner="adam"),
        "ELRA factored": lambda params, task: ElraOptimizer(params, None, task.batch_size, preconditioner="factored"),
        BUDGET: lambda params, task: ElraOptimizer(params, None, task.batch_size, total_steps=task.steps),
        "Adam 1e-3": lambda params, task: torch.optim.Adam(params, lr=1e-3),
        "Adam 1e-3, cooldown": lambda params, task: CooledAdam(params, task.steps),
        "AdamW 1e-3 wd0.01": lambda params, task: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
        "SGD 0.01 m0.9": lambda params, task: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        "Prodigy": lambda params, task: prodigy(params),
        "Schedule-Free AdamW": lambda params, task: schedule_free(params),
        PUBLISHED: published_elra(published),
    }


TRACE_EVERY = 10


def run(task: Task, name: str, factory, seed: int) -> dict:
    if name == REPORTING:
        model, batches, loss_fn, evaluate, valid_loss = task.make(seed, hold_out=True)
    else:
        (model, batches, loss_fn, evaluate), valid_loss = task.make(seed), None
    opt = factory(model.parameters(), task)
    takes_loss = isinstance(opt, (ElraOptimizer, _Quiet))
    schedule_free = hasattr(opt, "train") and hasattr(opt, "eval") and not takes_loss
    if schedule_free:
        opt.train()
    losses, trace, error = [], [], None
    start = time.perf_counter()
    finished = False  # a peer that broke off on a non-finite loss (its last included) diverged
    try:
        finished = _train(task, model, batches, loss_fn, opt, takes_loss, losses, trace, valid_loss)
    except Exception as exc:  # the published package crashes on some problems: report it
        error = type(exc).__name__
    seconds = time.perf_counter() - start  # training only: the held-out evaluation below is left out
    if schedule_free:
        opt.eval()
    tail = [v for v in losses[-max(1, len(losses) // 10) :] if math.isfinite(v)]
    return {
        "loss": statistics.fmean(tail) if tail and finished else math.nan,
        "metric": evaluate(model) if finished else math.nan,
        "error": error,
        "grads": len(losses),
        "seconds": seconds,
        "curve": losses,
        "trace": trace,
    }


def _train(task, model, batches, loss_fn, opt, takes_loss, losses, trace, valid_loss=None) -> bool:
    """``task.steps`` gradient evaluations, False where a peer broke off on a non-finite loss (the last
    one too); ELRA's controller is sampled every TRACE_EVERY steps and after the last. With
    ``valid_loss``, every REPORT_EVERY steps ELRA is told the mean training loss since the last report and
    the validation loss (its weight-decay control), as the README's training loop does once an epoch."""
    for step in range(task.steps):
        if valid_loss is not None and step and step % REPORT_EVERY == 0:
            recent = [v for v in losses[-REPORT_EVERY:] if math.isfinite(v)]
            if recent:
                opt.set_train_loss(statistics.fmean(recent))
                opt.set_valid_loss(valid_loss(model))
        inputs, targets = batches(step)
        loss = loss_fn(model(inputs), targets)
        value = loss.item()
        losses.append(value)
        opt.zero_grad()
        if math.isfinite(value):
            loss.backward()
            opt.step(value) if takes_loss else opt.step()
        elif takes_loss:  # ELRA and the published package retrace a step that skipped backward
            opt.step_retrace(value)
        else:
            return False  # the other optimizers have no way back
        if isinstance(opt, ElraOptimizer) and (step % TRACE_EVERY == 0 or step == task.steps - 1):  # and where it ended
            stats = opt.stats
            trace.append((step, stats["lr"], stats["batch_multiplier"], stats["retraces"]))
    return True


def _run_job(job: tuple[str, str, int, Path]) -> tuple[str, str, int, dict]:
    """One (task, optimizer, seed) run in a worker process with one thread.

    Runs in a scratch directory: the published package writes a log file into
    the working directory.
    """
    task_name, name, seed, cache = job
    torch.set_num_threads(1)
    task = next(t for t in TASKS if t.name == task_name)
    factory = optimizers(load_published(cache) if name == PUBLISHED else None)[name]
    with scratch_dir():
        return task_name, name, seed, run(task, name, factory, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=positive, default=3)
    parser.add_argument("--jobs", type=positive, default=os.cpu_count() or 1, help="runs in parallel, one thread each")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table and plots go")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--tasks", nargs="*", default=[t.name for t in TASKS], help="names of the tasks to run")
    parser.add_argument("--optimizers", nargs="*", help="names of the optimizers to run (default: all)")
    args = parser.parse_args()
    names = list(optimizers(None))
    known(parser, "tasks", args.tasks, [t.name for t in TASKS])
    known(parser, "optimizers", args.optimizers, names)
    args.out, args.cache = writable_folder(parser, args.out), args.cache.resolve()
    peers = [n for n in names if not args.optimizers or n in args.optimizers]
    needed = {PEER_PACKAGES[n] for n in peers if n in PEER_PACKAGES}
    missing = sorted(package for package in needed if not importlib.util.find_spec(package))
    if missing:
        parser.error(f"{missing} not installed: pip install -e '.[bench]', or choose --optimizers without them")
    if PUBLISHED in peers:
        load_published(args.cache)  # fetched once here, before the workers import it
    tasks = [t for t in TASKS if t.name in args.tasks]
    jobs = [
        (t.name, n, seed, args.cache)
        for t in tasks
        for n in peers
        if t.validates or n != REPORTING  # a noise-free fit has no decay to control (and no validation split)
        for seed in range(1 if t.one_seed else args.seeds)
    ]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        done = {(t, n, s): r for t, n, s, r in pool.map(_run_job, jobs)}
    lines = ["| task | metric | " + " | ".join(peers) + " |", "|---|---|" + "---:|" * len(peers)]
    curves, traces = {}, {}
    for task in tasks:
        cells_loss, cells_metric = [], []
        for name in peers:
            results = [r for (t, n, _), r in sorted(done.items(), key=lambda kv: kv[0][2]) if t == task.name and n == name]
            if not results:
                cells_loss.append("n/a")
                cells_metric.append("n/a")
                continue
            curves[(task.name, name)] = results[0]["curve"]
            if results[0]["trace"] and name == "ELRA":
                traces[task.name] = results[0]["trace"]
            errors = sorted({r["error"] for r in results if r["error"]})
            cells_loss.append(_cell([r["loss"] for r in results], errors))
            cells_metric.append(_cell([r["metric"] for r in results], errors))
            seconds = statistics.fmean(r["seconds"] for r in results)
            print(f"{task.name:14s} {name:20s} loss {cells_loss[-1]:>22s}  {task.metric}: {cells_metric[-1]}  ({seconds:.0f} s/run)", flush=True)
        lines.append(f"| {task.name} | train loss (last 10%) | " + " | ".join(cells_loss) + " |")
        lines.append(f"| {task.name} | {task.metric} | " + " | ".join(cells_metric) + " |")
    grads = ", ".join(f"{t.name} {t.steps}" for t in tasks)
    table = "\n".join(lines) + f"\n\nGradient evaluations per run (every optimizer): {grads}. Mean ± population standard deviation (ddof 0) over seeds.\n"
    table += "\n" + _controller_table(traces)
    print(table)
    (args.out / "quality.md").write_text(table)
    _plot(curves, traces, args.out)
    print(f"written to {args.out}")


def _controller_table(traces: dict) -> str:
    """What ELRA's controller did in its first seed's run of each task."""
    lines = ["| task | ELRA step length (first / median / last) | batch multiplier (last) | retraces |", "|---|---|---:|---:|"]
    for task, trace in traces.items():
        lengths = [length for _, length, _, _ in trace]
        lines.append(
            f"| {task} | {lengths[0]:.3g} / {statistics.median(lengths):.3g} / {lengths[-1]:.3g} | {trace[-1][2]} | {trace[-1][3]} |"
        )
    return "\n".join(lines) + "\n"


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


def _plot(curves: dict, traces: dict, out: Path) -> None:
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
            style = {"linewidth": 2.5, "zorder": 3} if name == "ELRA" else {"linestyle": "--"} if name == PUBLISHED else {}
            ax.plot([i * window for i in range(len(smooth))], smooth, label=name, **style)
        ax.set_yscale("symlog" if any(v <= 0 for (t, _), c in curves.items() if t == task for v in c) else "log")
        ax.set_xlabel("gradient evaluations")
        ax.set_ylabel("training loss (window mean)")
        ax.set_title(task)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"quality_{task.replace(' ', '_').lower()}.png", dpi=110)
        plt.close(fig)
    if traces:
        _plot_controller(plt, traces, out)


def _plot_controller(plt, traces: dict, out: Path) -> None:
    """ELRA's step length, batch multiplier and retraces over each task's run (first seed)."""
    fig, axes = plt.subplots(len(traces), 1, figsize=(7, 1.8 * len(traces)), sharex=False, squeeze=False)
    for ax, (task, trace) in zip(axes[:, 0], traces.items()):
        steps = [s for s, _, _, _ in trace]
        ax.plot(steps, [length for _, length, _, _ in trace], label="step length")
        ax.set_yscale("log")
        ax.set_ylabel(task, fontsize=8)
        twin = ax.twinx()
        twin.step(steps, [m for _, _, m, _ in trace], color="tab:orange", label="batch multiplier")
        twin.plot(steps, [r for _, _, _, r in trace], color="tab:red", linestyle=":", label="retraces")
        twin.set_yscale("symlog")
    axes[0, 0].set_title("ELRA's controller: step length (left), batch multiplier and retraces (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "quality_controller.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
