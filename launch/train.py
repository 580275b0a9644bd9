"""Train with ELRA on one process or many: the project's main job.

    torchrun --standalone --nproc_per_node=2 launch/train.py --strategy fsdp2 --epochs 10
    python launch/train.py --strategy none --model mlp

Strategies: none (one process), ddp, fsdp2 (fully_shard per layer and root),
fsdp1 (FullyShardedDataParallel). gloo on CPU, nccl on CUDA. Models: an MLP
on scikit-learn's digits, or torchvision's ResNet-18 on CIFAR-10 (from
``--data-dir`` when its files are there, torchvision's FakeData otherwise).
With ``--checkpoint-dir`` every epoch is checkpointed (DCP for the sharded
strategies) and a restarted job resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elra import ElraOptimizer, grad_sync  # noqa: E402
from launch.checkpoint import Checkpointer  # noqa: E402
from launch.data import build_data  # noqa: E402

log = logging.getLogger("launch")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["none", "ddp", "fsdp2", "fsdp1"], default="none")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["mlp", "resnet18"], default="mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size per rank")
    parser.add_argument("--lr", type=float, default=1e-5, help="ELRA's first step length (a tiny probe)")
    parser.add_argument("--weight-decay", type=float, default=0.9999, help="0.9999 means 1e-4")
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR-10 files (resnet18)")
    parser.add_argument("--fake-size", type=int, default=2048, help="FakeData images when CIFAR-10 is absent")
    parser.add_argument("--max-steps", type=int, default=0, help="micro-batches per epoch (0: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait for a rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch default)")
    parser.add_argument("--save-final", type=Path, help="write the final full model state_dict here")
    parser.add_argument("--crash-after-epoch", type=int, default=0, help=argparse.SUPPRESS)  # fault-injection tests
    parser.add_argument("--batch-multiplier", type=int, default=1, help=argparse.SUPPRESS)  # mid-collection tests
    return parser.parse_args(argv)


def setup(args) -> tuple[int, int, torch.device]:
    """Process group (if launched by torchrun or asked for) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.strategy == "none" and world > 1:
        raise SystemExit("--strategy none runs one process; launch it without torchrun or pick ddp/fsdp2/fsdp1")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.strategy != "none":
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "gloo":
            # Gloo's eager full-mesh connect can hang for good when torchrun restarts the
            # workers after a failure; connecting lazily, at the first collective, does not.
            os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
        timeout = datetime.timedelta(seconds=args.timeout)
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def build_model(name: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    if name == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes))
    import torchvision

    return torchvision.models.resnet18(num_classes=classes)


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules())[1:]:
            if any(p.requires_grad for p in module.parameters(recurse=False)) and not list(module.children()):
                fully_shard(module)
        return fully_shard(model)
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, device_id=device, use_orig_params=True)
    return model


def reduce_mean(values: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Sum ``(loss_sum, correct, count, ...)`` over ranks."""
    if distributed:
        dist.all_reduce(values)
    return values


@torch.no_grad()
def evaluate(model, loader, device, distributed: bool) -> tuple[float, float]:
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        totals += torch.stack(
            [
                torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ]
        )
    loss_sum, correct, count = reduce_mean(totals, distributed).tolist()
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def train_epoch(model, optimizer, loader, device, args, distributed: bool) -> float:
    """One pass over this rank's part of the data; returns the mean micro-batch loss over ranks."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for index, (x, y) in enumerate(loader):
        if args.max_steps and index >= args.max_steps:
            break
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        with grad_sync(model, optimizer) if distributed else nullcontext():  # the forward too: DDP decides there
            loss = torch.nn.functional.cross_entropy(model(x), y)
            totals += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
            if optimizer.skip_backward(loss):
                optimizer.step_retrace(loss)
                continue
            loss.backward()
        optimizer.step(loss)
    loss_sum, count = reduce_mean(totals, distributed).tolist()
    return loss_sum / max(count, 1.0)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup(args)
    distributed = world > 1 or args.strategy != "none"
    train_set, valid_set, classes = build_data(args)
    model = wrap(build_model(args.model, classes), args.strategy, device)
    optimizer = ElraOptimizer(
        model.parameters(), None, args.batch_size, classes, lr=args.lr, weight_decay=args.weight_decay,
        batch_multiplier=args.batch_multiplier,
    )
    optimizer.enable_boost()
    checkpointer = Checkpointer(args.checkpoint_dir, args.strategy, rank) if args.checkpoint_dir else None
    start = checkpointer.resume(model, optimizer) if checkpointer else 0
    if start and rank == 0:
        log.info("resumed from epoch %d", start)

    for epoch in range(start, args.epochs):
        loader = train_set.loader(epoch, rank, world, args.batch_size)
        train_loss = train_epoch(model, optimizer, loader, device, args, distributed)
        valid_loss, accuracy = evaluate(model, valid_set.loader(None, rank, world, 256), device, distributed)
        with optimizer.boosted() as averaged:
            boosted = evaluate(model, valid_set.loader(None, rank, world, 256), device, distributed) if averaged else None
        boost_accuracy = boosted[1] if boosted else float("nan")
        optimizer.restart_boost()
        optimizer.set_train_loss(train_loss)
        optimizer.set_valid_loss(valid_loss)
        if checkpointer:
            checkpointer.save(model, optimizer, epoch + 1)
        if epoch + 1 == args.crash_after_epoch and rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0:
            s = optimizer.stats
            print(
                f"epoch {epoch + 1:3d}  train {train_loss:.4f}  valid {valid_loss:.4f}  accuracy {accuracy:.4f}  "
                f"boost {boost_accuracy:.4f}  lr {s['lr']:.3g}  batch x{s['batch_multiplier']}  "
                f"retraces {s['retraces']}",
                flush=True,
            )
    if args.save_final:
        from launch.checkpoint import full_model_state

        state = full_model_state(model, args.strategy)
        if rank == 0:
            torch.save(state, args.save_final)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's threads sometimes abort the interpreter's own teardown ("terminate
    # called without an active exception"); the work is done, leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
