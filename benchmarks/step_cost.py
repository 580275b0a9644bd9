"""Optimizer step time and optimizer-held memory, against Adam in the same run.

A ~10M-parameter MLP gets fixed random gradients; only ``optimizer.step`` is
timed (median of repeated steps after warm-up). Held bytes are the bytes of
tensors the optimizer keeps between steps that are not the parameters.

    python benchmarks/step_cost.py [--width 2048] [--steps 30] [--published]
"""

from __future__ import annotations

import argparse
import gc
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.published import load_published  # noqa: E402
from elra import ElraOptimizer  # noqa: E402


def make_model(width: int, depth: int) -> torch.nn.Module:
    layers = [torch.nn.Linear(width, width) for _ in range(depth)]
    return torch.nn.Sequential(*layers)


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


def measure(name: str, factory, model: torch.nn.Module, steps: int, takes_loss: bool) -> dict:
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    opt = factory(params)
    times = []
    for i in range(steps + 5):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = time.perf_counter()
        if takes_loss:
            opt.step(1.0 / (1 + i))
        else:
            opt.step()
        elapsed = time.perf_counter() - start
        if i >= 5:
            times.append(elapsed)
    for p in params:
        p.grad = None
    gc.collect()
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    held = sum(held_tensors(opt, param_ptrs).values())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"name": name, "step_ms": 1e3 * statistics.median(times), "held": held / param_bytes}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-published", action="store_true", help="skip the published elra 0.0.5")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "elra-bench")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_model(args.width, args.depth)
    n = sum(p.numel() for p in model.parameters())
    print(f"MLP {args.depth}x{args.width}: {n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    candidates = [
        ("Adam(foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), False),
        ("Adam(fused)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), False),
        ("ELRA", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5), True),
        ("ELRA wd", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, weight_decay=1e-4), True),
        ("ELRA momentum", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, momentum=0.9), True),
        ("ELRA adam", lambda ps: ElraOptimizer(ps, None, 32, 10, lr=1e-5, preconditioner="adam"), True),
    ]
    if not args.no_published:
        candidates.append(("elra 0.0.5", published_factory(args.cache), True))
    rows = [measure(name, factory, model, args.steps, loss) for name, factory, loss in candidates]
    base = rows[0]["step_ms"]
    print(f"{'optimizer':<16}{'step ms':>10}{'vs Adam(foreach)':>18}{'held / params':>15}")
    for row in rows:
        print(f"{row['name']:<16}{row['step_ms']:>10.2f}{row['step_ms'] / base:>17.2f}x{row['held']:>14.2f}x")


if __name__ == "__main__":
    main()
