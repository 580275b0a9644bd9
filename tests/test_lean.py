"""Lean by construction: state size, in-place updates, one host transfer per real step."""

import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch

import elra
import elra.chunks
import elra.reduce

ElraOptimizer = partial(elra.ElraOptimizer, preconditioner=None)  # P2M, the published method, not the default


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))


def _train(model, opt, steps, loss_as_tensor=True):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 20, generator=gen)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss if loss_as_tensor else loss.item())


def test_optimizer_holds_one_tensor_per_parameter():
    model = _mlp()
    for options in ({}, {"momentum": 0.9, "weight_decay": 1e-3}):
        opt = ElraOptimizer(model.parameters(), None, 16, 5, lr=1e-4, **options)
        _train(model, opt, 30)
        held = [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        assert sum(t.nbytes for t in held) == sum(p.nbytes for p in model.parameters())


def test_parameters_are_updated_in_place():
    model = _mlp()
    before = [(p, p.data_ptr()) for p in model.parameters()]
    opt = ElraOptimizer(model.parameters(), None, 16, 5, lr=1e-4)
    _train(model, opt, 20)
    assert all(p is q and p.data_ptr() == ptr for (p, ptr), q in zip(before, model.parameters()))


def test_one_host_transfer_per_real_step(monkeypatch):
    model = _mlp()
    opt = ElraOptimizer(model.parameters(), None, 16, 5, lr=1e-4, weight_decay=1e-3, batch_multiplier=2)
    _train(model, opt, 4)
    calls = []
    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    x = torch.randn(16, 20)
    for expected in (0, 1):
        calls.clear()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss)
        assert calls == ["tolist"] * expected


class _Kernels(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops of a region that would launch a kernel on an accelerator (views and host bookkeeping do not)."""

    FREE = {"lift_fresh", "_record_function_enter_new", "_record_function_exit", "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket.__name__ in self.FREE):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "options",
    [dict(preconditioner=None, weight_decay=1e-2, momentum=0.9), dict(preconditioner="adam"), dict(preconditioner="factored"), dict(preconditioner="muon")],
)
def test_an_accelerator_step_launches_as_many_kernels_for_many_tensors_as_for_few(monkeypatch, options):
    """With an accelerator's batching sizes, a real step's kernels do not grow with the number of tensors."""
    monkeypatch.setattr(elra.reduce, "limits", lambda device: elra.reduce.DEVICE_LIMITS)
    monkeypatch.setattr(elra.chunks, "CHUNK", elra.chunks.DEVICE_CHUNK)

    def kernels(blocks: int) -> int:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(m for _ in range(blocks) for m in (torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))))
        opt = elra.ElraOptimizer(model.parameters(), None, 16, 5, lr=1e-4, **options)
        for step in range(4):
            opt.zero_grad()
            model(torch.randn(16, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            counter = _Kernels()
            with counter:
                opt.step(1.0 / (1 + step))
        return counter.count

    assert kernels(32) == kernels(4)


class _NewTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the size of every tensor an op returns in memory it did not get (storages not in ``known``)."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known, self.sizes = known, [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.sizes.append(t.numel())
        return out


def test_an_adam_step_holds_no_parameter_sized_temporary_also_where_the_gradients_change():
    """The sums of the old direction ran run by run only where the moved parameters were those with a gradient;
    where they were not (a head used on every other step), ``u_old`` and its denominator were made whole: twice the
    parameter bytes at once, against Adam(foreach)'s once. Every temporary is now at most a run."""
    torch.manual_seed(0)
    trunk, head = torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 2)
    opt = elra.ElraOptimizer([*trunk.parameters(), *head.parameters()], None, 16, 5, lr=1e-4, preconditioner="adam")
    for step in range(6):
        opt.zero_grad()
        hidden = trunk(torch.randn(16, 1024, generator=torch.Generator().manual_seed(step)))
        (head(hidden).square().mean() if step % 2 else hidden.square().mean()).backward()
        tensors = [*trunk.parameters(), *head.parameters()]
        known = {t.untyped_storage().data_ptr() for t in tensors + [p.grad for p in tensors if p.grad is not None]}
        known |= {v.untyped_storage().data_ptr() for state in opt.state.values() for v in state.values()}
        recorder = _NewTensors(known)
        with recorder:
            opt.step(1.0 / (1 + step))
        assert max(recorder.sizes) <= elra.chunks.CHUNK < trunk.weight.numel()


class _MixedLists(torch.utils._python_dispatch.TorchDispatchMode):
    """Records multi-tensor ops and stacks over tensors of several dtypes (on CUDA: a kernel per tensor).

    ``_foreach_copy_`` is the exception: it converts a whole list in one kernel, by design.
    """

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (name.startswith("_foreach") and name != "_foreach_copy_") or name in ("stack", "cat"):
            dtypes = {t.dtype for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)}
            if len(dtypes) > 1:
                self.found.append((name, sorted(map(str, dtypes))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
def test_a_16_bit_step_gives_every_multi_tensor_op_one_dtype(monkeypatch, preconditioner):
    """bfloat16 parameters with float32 moments: gradients and steps are converted by whole lists."""
    monkeypatch.setattr(elra.reduce, "limits", lambda device: elra.reduce.DEVICE_LIMITS)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).bfloat16()
    opt = elra.ElraOptimizer(model.parameters(), None, 16, 3, lr=1e-4, weight_decay=1e-2, preconditioner=preconditioner)
    mixed = _MixedLists()
    for step in range(6):
        opt.zero_grad()
        model(torch.randn(16, 8, generator=torch.Generator().manual_seed(step)).bfloat16()).float().square().mean().backward()
        with mixed:
            opt.step(math.nan if step == 3 else 1.0 / (1 + step))  # a retrace too
    assert opt.stats["retraces"] == 1
    assert mixed.found == []


def test_step_cost_benchmark_steps_each_optimizer_on_its_own_copy():
    """benchmarks/step_cost.py interleaves the optimizers' steps: each needs its own parameters (else one
    would step from where another left), and the held-bytes column must read the state as it is."""
    from benchmarks.step_cost import measure

    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    candidates = [
        ("Adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), False),
        ("P2M", lambda ps: ElraOptimizer(ps, None, 16, 5, lr=1e-5), True),
        ("adam", lambda ps: elra.ElraOptimizer(ps, None, 16, 5, lr=1e-5, preconditioner="adam"), True),
    ]
    rows = measure(candidates, model, steps=3)
    assert [row["name"] for row in rows] == ["Adam", "P2M", "adam"]
    assert [row["held"] for row in rows] == [2.0, 1.0, 2.0]
    assert all(row["step_ms"] > 0 for row in rows)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_distributed_benchmark_reports_the_collectives_it_measured_on_collecting_micro_steps():
    """benchmarks/distributed.py ended its table with "Collecting micro-steps issue no collective" without
    measuring them: the sentence must say what the collecting steps issued."""
    from benchmarks.distributed import _table

    row = {"collectives": 1, "bytes": 72, "step_ms": 1.0, "train_ms": 2.0, "params": 1000}
    quiet = _table([("ddp", 2, {**row, "collecting_collectives": 0})], 64)
    assert "Collecting micro-steps issued no collective from the optimizer." in quiet
    loud = _table([("ddp", 2, {**row, "collecting_collectives": 0}), ("fsdp2", 2, {**row, "collecting_collectives": 3})], 64)
    assert "no collective" not in loud and "up to 3 collectives" in loud
    assert "No collecting micro-step was measured." in _table([("none", 1, {**row, "collecting_collectives": None})], 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
@pytest.mark.parametrize("script", ["orthogonalize", "transformer_scale"])
def test_gpu_benchmarks_on_cuda_without_a_gpu_say_so_at_once(script, tmp_path):
    """orthogonalize.py spent its SVDs (a minute and a half here) and transformer_scale.py loaded its text
    before torch's 'Found no NVIDIA driver' traceback: both refuse before any work, as step_cost.py does."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / f"{script}.py"), "--device", "cuda"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--device cuda: torch sees no CUDA device here" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("script, options, says", [
    ("quality", ["--tasks", "cubic", "fit"], "unknown tasks ['cubic', 'fit']"),
    ("quality", ["--optimizers", "Adam"], "unknown optimizers ['Adam']"),
    ("quality", ["--seeds", "0"], "--seeds: must be at least 1"),
    ("quality", ["--out", "a_file"], "cannot write there"),
    ("soak", ["--fault-rate", "7"], "--fault-rate: must be in [0, 1]"),
])
def test_benchmark_options_that_would_waste_a_run_are_refused_in_one_line(script, options, says, tmp_path):
    """quality.py filtered unknown names away and wrote an empty table over quality.md (exit 0); zero seeds, or an
    --out it cannot write, ended a run in tracebacks, the latter after the whole run."""
    (tmp_path / "a_file").touch()
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / f"{script}.py"), *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def _breaks_at(step):
    """A quality-benchmark task's ``make``: a linear regression whose loss is infinite at gradient evaluation ``step``."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=gen), torch.randn(64, generator=gen)

    def make(seed):
        calls = []

        def loss_fn(out, target):
            calls.append(None)
            loss = torch.nn.functional.mse_loss(out, target)
            return loss * math.inf if len(calls) == step + 1 else loss

        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0, 1))
        return model, lambda step: (x, y), loss_fn, lambda m: torch.nn.functional.mse_loss(m(x), y).item()

    return make


def test_quality_benchmark_reports_a_peer_that_broke_off_as_diverged():
    """benchmarks/quality.py stops a peer at its first non-finite loss (it has no retrace): the run must read
    as diverged, not as the mean of its last finite losses and the metric of the weights it stopped at.
    ELRA retraces the same loss and runs all its gradient evaluations."""
    from benchmarks.quality import Task, _cell, run

    task = Task("breaks at step 30", 100, 0, 64, "mse", _breaks_at(30))
    adam = run(task, "Adam", lambda params, task: torch.optim.Adam(params, lr=1e-3), 0)
    assert adam["grads"] == 31 and adam["error"] is None
    assert math.isnan(adam["loss"]) and math.isnan(adam["metric"])
    assert _cell([adam["metric"]], []) == "diverged"
    elra_run = run(task, "ELRA", lambda params, task: elra.ElraOptimizer(params, None, task.batch_size), 0)
    assert elra_run["grads"] == 100 and math.isfinite(elra_run["loss"]) and math.isfinite(elra_run["metric"])


def test_quality_benchmark_reports_a_peer_that_broke_off_at_its_last_gradient_as_diverged():
    """A peer's non-finite loss at the last of its gradient evaluations left as many losses as the task has
    steps, and the run read as finished: the mean of its finite losses and the metric of its weights."""
    from benchmarks.quality import Task, _cell, run

    task = Task("breaks at its last step", 31, 0, 64, "mse", _breaks_at(30))
    adam = run(task, "Adam", lambda params, task: torch.optim.Adam(params, lr=1e-3), 0)
    assert adam["grads"] == 31 and adam["error"] is None
    assert math.isnan(adam["loss"]) and math.isnan(adam["metric"])
    assert _cell([adam["loss"]], []) == "diverged"


def test_quality_benchmark_traces_elras_controller_to_the_end_of_the_run():
    """The controller table's last step length and its retraces are ELRA's at the end of the run: the trace
    was sampled every TRACE_EVERY accepted or collected steps only, so it ended up to TRACE_EVERY - 1
    gradient evaluations early and left out a retraced sample step (Rosenbrock, seed 0: 85 retraces
    where the run made 87)."""
    from benchmarks.quality import TRACE_EVERY, Task, _train

    task = Task("breaks at its last step", 3 * TRACE_EVERY + 1, 0, 64, "mse", _breaks_at(3 * TRACE_EVERY))
    model, batches, loss_fn, _ = task.make(0)
    opt = elra.ElraOptimizer(model.parameters(), None, task.batch_size)
    losses, trace = [], []
    assert _train(task, model, batches, loss_fn, opt, True, losses, trace)
    assert [step for step, *_ in trace] == [0, TRACE_EVERY, 2 * TRACE_EVERY, 3 * TRACE_EVERY]
    assert trace[-1][1:] == (opt.stats["lr"], opt.stats["batch_multiplier"], opt.stats["retraces"])
    assert trace[-1][3] > trace[-2][3]  # the last evaluation's retrace is counted


def test_quality_benchmark_times_the_training_not_the_held_out_evaluation():
    """A run's seconds (its "s/run") included the final held-out evaluation."""
    import time

    from benchmarks.quality import Task, run

    def make(seed):
        model, batches, loss_fn, _ = _breaks_at(-1)(seed)
        return model, batches, loss_fn, lambda m: time.sleep(1.0) or 0.0

    result = run(Task("slow evaluation", 5, 0, 64, "mse", make), "Adam", lambda params, task: torch.optim.Adam(params), 0)
    assert result["metric"] == 0.0 and result["seconds"] < 0.5


def test_quality_benchmark_tells_the_published_package_its_language_models_vocabulary():
    """The published package's ``classes`` is the length of the output layer (its floor ``log(classes)`` on
    the first loss): the char LM told it 60 for a vocabulary of 76 characters."""
    from benchmarks.quality import TASKS

    for task in (t for t in TASKS if "LM" in t.name or t.name == "transformer"):
        model = task.make(0)[0]
        outputs = model.head.out_features if hasattr(model, "head") else model[-1].out_features
        assert task.regime() == outputs, task.name


def test_quality_benchmark_lets_the_published_package_retrace_a_non_finite_loss(published, quiet):
    """The published elra 0.0.5 has ``step_retrace`` as ELRA has: the benchmark broke its run off at the first
    non-finite loss as if it were a peer without one, and the run read as diverged. It now retraces and runs
    all its gradient evaluations."""
    from benchmarks.quality import Task, published_elra, run

    task = Task("breaks at step 30", 100, 2, 64, "mse", _breaks_at(30))
    result = run(task, "elra 0.0.5", published_elra(published), 0)
    assert result["error"] is None and result["grads"] == 100
    assert math.isfinite(result["loss"]) and math.isfinite(result["metric"])


def test_beyond_benchmark_runs_every_task_to_finite_metrics():
    """``benchmarks/beyond.py``: each task, three gradient evaluations with ELRA and with a peer, gives one finite
    value per declared metric (and ELRA's controller columns), so the README's table can be rerun."""
    import dataclasses

    from benchmarks.beyond import TASKS, run

    for task in TASKS:
        short = dataclasses.replace(task, steps=3)
        for name in ("ELRA", "Adam 1e-3"):
            result = run(short, name, 0)
            assert len(result["metrics"]) == len(task.metrics), (task.name, name)
            assert all(map(math.isfinite, result["metrics"])), (task.name, name)
            assert ("regime" in result) == (name == "ELRA")
