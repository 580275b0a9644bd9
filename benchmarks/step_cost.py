"""Optimizer step time and optimizer-held memory, against Adam/AdamW in the same run.

Two models get fixed random gradients: a 9.4M-parameter MLP (few large
tensors) and a transformer-shaped stack of 48 blocks of width 64 (576
tensors, 2.4M parameters: the shape where per-tensor overhead shows). Only
``optimizer.step`` is timed (median of repeated steps after warm-up, the
optimizers taking turns step by step, each on its own copy of the model; on
CUDA between synchronisations). Held bytes are the bytes of tensors the optimizer
keeps between steps that are not the parameters.

    python benchmarks/step_cost.py [--model mlp transformer] [--device cpu|cuda] [--steps 30] [--keep-freed-memory]

``--device`` defaults to cuda when a GPU is present; CPU runs never touch CUDA.
"""

from __future__ import annotations

import argparse
import gc
import contextlib
import ctypes
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cli import positive  # noqa: E402
from benchmarks.published import CACHE, load_published, scratch_dir  # noqa: E402
from elra import ElraOptimizer  # noqa: E402


def make_model(kind: str, width: int, depth: int) -> torch.nn.Module:
    """``mlp``: ``depth`` square layers of ``width``; ``transformer``: 48 blocks of width 64."""
    if kind == "mlp":
        return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(depth)))
    from launch.models import Block

    return torch.nn.Sequential(*(Block(64, 4) for _ in range(48)))


def held_tensors(obj, params: set[int], seen: set[int] | None = None, depth: int = 0) -> dict[int, int]:
    """Storages of all tensors reachable from ``obj`` (attributes, dicts, lists), minus parameters."""
    seen = set() if seen is None else seen
    found: dict[int, int] = {}
    if id(obj) in seen or depth > 6:
        return found
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr not in params and obj.numel() > 1:
            found[ptr] = obj.untyped_storage().nbytes()
        return found
    if isinstance(obj, torch.nn.Module):
        return found
    if isinstance(obj, dict):
        children = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return found
    for child in children:
        found.update(held_tensors(child, params, seen, depth + 1))
    return found


class Timed:
    """One optimizer on its own copy of the model, stepping on fixed gradients."""

    def __init__(self, name: str, factory, model: torch.nn.Module, takes_loss: bool) -> None:
        self.name, self.takes_loss = name, takes_loss
        self.params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        gen = torch.Generator().manual_seed(0)
        self.grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(p) for p in self.params]
        self.opt = factory(self.params)
        self.times: list[float] = []

    def step(self, i: int, timed: bool) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()
        cuda = self.params[0].is_cuda
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if self.takes_loss:
            self.opt.step(1.0 / (1 + i))
        else:
            self.opt.step()
        if cuda:
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - start)

    def result(self) -> dict:
        for p in self.params:
            p.grad = None
        gc.collect()
        param_ptrs = {p.untyped_storage().data_ptr() for p in self.params}
        held = sum(held_tensors(self.opt, param_ptrs).values())
        param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        return {"name": self.name, "step_ms": 1e3 * statistics.median(self.times), "held": held / param_bytes}


def measure(candidates: list[tuple[str, object, bool]], model: torch.nn.Module, steps: int) -> list[dict]:
    """Median step time of every candidate, their steps interleaved (one step of each in turn, 5 untimed
    rounds first): a drift in the machine's speed (another process, clock changes) then reaches every
    optimizer alike instead of moving the ratios from run to run."""
    timed = [Timed(name, factory, model, loss) for name, factory, loss in candidates]
    for i in range(steps + 5):
        for entry in timed:
            entry.step(i, timed=i >= 5)
    return [entry.result() for entry in timed]


def keep_freed_memory() -> None:
    """glibc only: keep freed memory in the heap (no mmap for large blocks, no trimming), so that no step
    pays page faults for fresh temporaries. Adam(foreach) allocates parameter-sized temporaries every step;
    under glibc's adaptive thresholds they come back as fresh pages or not depending on the allocation
    history, and its step time moves between about 20 and 34 ms on the MLP from run to run."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31)):
        raise SystemExit("--keep-freed-memory: mallopt failed (glibc only)")


def published_factory(cache: Path):
    """The published package (fetched with pip into ``cache``); its prints are silenced."""
    module = load_published(cache)

    def factory(params):
        with contextlib.redirect_stdout(io.StringIO()):
            opt = module.ElraOptimizer(params, None, 32, 10, lr=1e-5)
        step = opt.step

        def quiet_step(loss):
            with contextlib.redirect_stdout(io.StringIO()):
                step(loss)

        opt.step = quiet_step
        return opt

    return factory


def candidates(args) -> list[tuple[str, object, bool]]:
    """(name, factory, takes the loss) of every optimizer measured; the first is the baseline."""
    rows = [
        ("Adam(foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), False),
        ("Adam(fused)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), False),
        ("AdamW(foreach) wd", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-4, foreach=True), False),
        ("AdamW(fused) wd", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-4, fused=True), False),
        ("ELRA P2M", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, preconditioner=None), True),
        ("ELRA P2M wd", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, preconditioner=None, weight_decay=0.9999), True),
        ("ELRA P2M momentum", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, preconditioner=None, momentum=0.9), True),
        ("ELRA (muon)", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5), True),
        ("ELRA adam", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, preconditioner="adam"), True),
        *(  # the compiled sums are for the CPU (elra.compiled)
            [("ELRA adam compiled", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, preconditioner="adam", compiled=True), True)]
            if args.device == "cpu"
            else []
        ),
        ("ELRA factored", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, preconditioner="factored"), True),
    ]
    if not args.no_published and args.device == "cpu":
        rows.append(("elra 0.0.5", published_factory(args.cache), True))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=["mlp", "transformer"], default=["mlp", "transformer"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--width", type=positive, default=1536, help="MLP width")
    parser.add_argument("--depth", type=positive, default=4, help="MLP layers")
    parser.add_argument("--steps", type=positive, default=30)
    parser.add_argument("--threads", type=positive, default=None)
    parser.add_argument("--no-published", action="store_true", help="skip the published elra 0.0.5 (CPU only)")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc: no page faults for temporaries")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    for kind in args.model:
        torch.manual_seed(0)
        model = make_model(kind, args.width, args.depth).to(device=args.device, dtype=dtype)
        n = sum(p.numel() for p in model.parameters())
        tensors = len(list(model.parameters()))
        where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
        print(f"\n{kind}: {n / 1e6:.1f}M parameters in {tensors} tensors, {args.dtype}, {where}")
        with scratch_dir():  # the published package writes state_lgs.txt where it runs
            rows = measure(candidates(args), model, args.steps)
        base = {row["name"]: row["step_ms"] for row in rows}
        print(f"{'optimizer':<20}{'step ms':>10}{'vs Adam(foreach)':>18}{'vs AdamW(foreach)':>19}{'held / params':>15}")
        for row in rows:
            print(
                f"{row['name']:<20}{row['step_ms']:>10.2f}{row['step_ms'] / base['Adam(foreach)']:>17.2f}x"
                f"{row['step_ms'] / base['AdamW(foreach) wd']:>18.2f}x{row['held']:>14.2f}x"
            )


if __name__ == "__main__":
    main()
