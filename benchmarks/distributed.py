"""What ELRA costs in communication, and wall time per step on 1, 2 and 3 ranks.

    python benchmarks/distributed.py [--width 512] [--steps 40] [--out DIR]

Spawns gloo ranks on CPU. For DDP and FSDP2 it counts the collectives that
``optimizer.step`` issues (``CommDebugMode``) and the bytes it all-reduces,
and times the optimizer step and the whole training step (forward, backward
with the wrapper's gradient reduction, step), median over the steps. The
table goes to --out (default ~/.cache/elra-bench/results; the README's comes
from ``--out benchmarks/results``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor.debug import CommDebugMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli import positive, writable_folder  # noqa: E402
from benchmarks.published import RESULTS  # noqa: E402
from benchmarks.ranks import as_gloo_rank  # noqa: E402
from elra import ElraOptimizer, grad_sync  # noqa: E402


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()) for _ in range(4)))


def _wrap(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model:
            fully_shard(block)
        return fully_shard(model)
    return model


def _measure(rank: int, world: int, store: str, out: str, strategy: str, width: int, steps: int) -> None:
    def body() -> None:
        model = _wrap(_model(width), strategy)
        optimizer = ElraOptimizer(model.parameters(), None, 32, 10, lr=1e-5, batch_multiplier=2)
        sent: list[int] = []
        original = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            sent.append(tensor.numel() * tensor.element_size())
            return original(tensor, *args, **kwargs)

        step_times, train_times, collectives, step_bytes, collecting_collectives = [], [], [], [], []
        gen = torch.Generator().manual_seed(rank)
        for step in range(steps + 4):
            x = torch.randn(32, width, generator=gen)
            start = time.perf_counter()
            optimizer.zero_grad()
            with grad_sync(model, optimizer):  # forward and backward: DDP decides in the forward
                loss = model(x).pow(2).mean()
                loss.backward()
            collecting = optimizer.collecting
            sent.clear()
            dist.all_reduce = counting_all_reduce
            with CommDebugMode() as comm:
                step_start = time.perf_counter()
                optimizer.step(loss.detach())
                step_end = time.perf_counter()
            dist.all_reduce = original
            if step >= 4 and collecting:
                collecting_collectives.append(comm.get_total_counts())
            if step >= 4 and not collecting:
                step_times.append(step_end - step_start)
                train_times.append(step_end - start)
                collectives.append(comm.get_total_counts())
                step_bytes.append(sum(sent))
        result = {
            "step_ms": 1e3 * statistics.median(step_times),
            "train_ms": 1e3 * statistics.median(train_times),
            "collectives": max(collectives),
            "bytes": max(step_bytes),
            "collecting_collectives": max(collecting_collectives, default=None),
            "params": sum(p.numel() for p in _model(width).parameters()),
        }
        if rank == 0:
            torch.save(result, Path(out) / f"{strategy}-{world}.pt")

    as_gloo_rank(rank, world, store, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=positive, default=512)
    parser.add_argument("--steps", type=positive, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table goes")
    args = parser.parse_args()
    args.out = writable_folder(parser, args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, world in [("none", 1), ("ddp", 2), ("ddp", 3), ("fsdp2", 2), ("fsdp2", 3)]:
            store = f"file://{tmp}/store-{strategy}-{world}"
            mp.spawn(_measure, args=(world, store, tmp, strategy, args.width, args.steps), nprocs=world, join=True)
            rows.append((strategy, world, torch.load(Path(tmp) / f"{strategy}-{world}.pt")))
    table = _table(rows, args.width)
    print(table)
    (args.out / "distributed.md").write_text(table)
    print(f"written to {args.out}")


def _table(rows: list[tuple[str, int, dict]], width: int) -> str:
    """The markdown table of ``(strategy, ranks, measured)`` rows, and what collecting micro-steps issued."""
    params = rows[0][2]["params"]
    lines = [
        f"MLP 4x{width} ({params / 1e6:.2f}M parameters), batch 32 per rank, batch multiplier 2, gloo on CPU, "
        "one thread per rank; times are medians over real steps.",
        "",
        "| strategy | ranks | collectives per real step() | bytes all-reduced per step() | step() ms | train step ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for strategy, world, r in rows:
        lines.append(
            f"| {strategy} | {world} | {r['collectives']} | {r['bytes']} | {r['step_ms']:.2f} | {r['train_ms']:.2f} |"
        )
    counts = [r["collecting_collectives"] for _, _, r in rows if r["collecting_collectives"] is not None]
    if not counts:
        return "\n".join(lines) + "\n\nNo collecting micro-step was measured.\n"
    collecting = "no collective" if max(counts) == 0 else f"up to {max(counts)} collectives"
    return "\n".join(lines) + f"\n\nCollecting micro-steps issued {collecting} from the optimizer.\n"


if __name__ == "__main__":
    main()
