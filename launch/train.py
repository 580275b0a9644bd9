"""Train with ELRA on one process or many: the project's main job.

    torchrun --standalone --nproc_per_node=2 launch/train.py --strategy fsdp2 --epochs 10
    python launch/train.py --strategy none --model gpt --max-steps 200

Strategies: none (one process), ddp, fsdp2 (fully_shard per layer, or per
transformer block, then the root), fsdp1 (FullyShardedDataParallel). gloo on
CPU, nccl on CUDA. Models: an MLP on scikit-learn's digits; torchvision's
ResNet-18 on CIFAR-10 (from --data-dir when its files are there, torchvision's
FakeData otherwise); a small character-level GPT on --text (by default the
installed Python standard library's source, no download). With
--checkpoint-dir every epoch is checkpointed (DCP for the sharded strategies)
and a restarted job resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import math
import os
import signal
import sys
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elra import ElraOptimizer, grad_sync  # noqa: E402
from launch.checkpoint import Checkpointer, CheckpointError  # noqa: E402
from launch.data import IGNORED, build_data  # noqa: E402
from launch.models import CharGPT, digits_mlp  # noqa: E402
from launch.text import TextTooShort  # noqa: E402

log = logging.getLogger("launch")
MAX_EPOCHS = 10**6  # the step budget counts the epochs' steps one by one: 10**8 of them sat 2 minutes silent
EPOCHS_WHY = " (the step budget counts each epoch's steps before training)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default."""


def _expects(name: str):
    """Name an option's parser after what it expects: argparse says "invalid <name> value: 'abc'"."""

    def named(parse):
        parse.__name__ = name
        return parse

    return named


def _at_least(low: int, high: int | None = None, why: str = ""):
    @_expects(f"integer >= {low}")
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is above {high}{why}")
        return value

    return parse


@_expects("positive number")
def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} is not a finite number above 0")
    return value


@_expects("number of seconds")
def _seconds(text: str) -> float:
    """A ``--timeout`` that a process group's timedelta holds (1e15 overflowed it in a traceback) and its ranks
    can connect within (0.001 timed out in the rendezvous, "after 0ms", in a traceback on every rank)."""
    value = _positive_float(text)
    if value > 1e9:
        raise argparse.ArgumentTypeError(f"{value} is above 1e9 seconds (31 years)")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1 second, too short for the ranks to connect")
    return value


@_expects("integer")
def _seed(text: str) -> int:
    """An integer torch's generators take: one beyond 64 bits ended the job in a traceback from manual_seed."""
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is outside torch's seeds, [-2**63, 2**64)")
    return value


@_expects("file name")
def _file_path(text: str) -> Path:
    """A path that names a file: ``results/`` (not there yet) passed as one, and the model went into a file
    named ``results``."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a directory; name the file to write in it")
    return Path(text)


@_expects("number of threads")
def _threads(text: str) -> int:
    """Up to the machine's CPUs: 100000 threads crashed the job in its first matrix product (a segmentation
    fault), 2**31 ended it in a traceback from set_num_threads."""
    value = _at_least(0)(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise argparse.ArgumentTypeError(f"{value} is above the {cpus} CPUs of this machine")
    return value


@_expects("number in [0, 1]")
def _weight_decay(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1] (0.9999 means 1e-4)")
    return value


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be created or written ("" when it can), checked before training: a path under a
    file or in a read-only directory failed only when the first checkpoint or, for --save-final, the end
    of the run came, losing the run."""
    path = path.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        return f"{existing} is a file, so nothing can be created under it; name a path outside it"
    writes_in = existing if existing.is_dir() else existing.parent  # an existing --save-final is replaced in it
    if not os.access(writes_in, os.W_OK):
        return f"{writes_in} is not writable; name a path you can write"
    return ""


# The options only one --model reads (by their dest); the others ignored them silently.
_MODEL_OPTIONS = {
    "seed": "mlp", "text": "gpt", "context": "gpt", "width": "gpt", "heads": "gpt", "layers": "gpt",
    "data_dir": "resnet18", "fake_size": "resnet18",
}


def _given(parser: argparse.ArgumentParser, argv, names) -> list[str]:
    """Which of ``names`` (dests) the command line gives: argparse sets no default where one is set already."""
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in names}))
    return [name for name in names if getattr(probe, name) is not unset]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--strategy", choices=["none", "ddp", "fsdp2", "fsdp1"], default="none", help="data parallelism (all but none need torchrun)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="gloo on cpu, nccl on cuda")
    parser.add_argument("--model", choices=["mlp", "resnet18", "gpt"], default="mlp", help="digits MLP, CIFAR-10 ResNet-18, character GPT")
    parser.add_argument("--epochs", type=_at_least(1, MAX_EPOCHS, EPOCHS_WHY), default=10, help="epochs to reach (a resumed job counts those done)")
    parser.add_argument("--batch-size", type=_at_least(1), default=32, help="micro-batch size per rank (sequences for gpt)")
    parser.add_argument("--lr", type=_positive_float, default=1e-5, help="ELRA's first step length (a tiny probe)")
    parser.add_argument(
        "--preconditioner", choices=["auto", "muon", "adam", "factored", "none"], default="auto",
        help="ELRA's direction: auto is muon, or adam under fsdp1 (which flattens the matrices muon needs whole); "
        "none is P2M, the published method",
    )
    parser.add_argument(
        "--weight-decay", type=_weight_decay, default=None,
        help="decoupled decay (0.9999 means 1e-4); none: 0.1 along a preconditioned direction, 0 for P2M",
    )
    parser.add_argument("--checkpoint-dir", type=Path, help="checkpoint every epoch here and resume from the newest")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR-10 files (resnet18)")
    parser.add_argument("--fake-size", type=_at_least(1), default=2048, help="FakeData images when CIFAR-10 is absent (resnet18)")
    parser.add_argument("--text", type=Path, help="UTF-8 text for gpt (none: the Python standard library's source)")
    parser.add_argument("--context", type=_at_least(1), default=64, help="characters per gpt window")
    parser.add_argument("--width", type=_at_least(1), default=128, help="gpt embedding width")
    parser.add_argument("--heads", type=_at_least(1), default=4, help="gpt attention heads (divide --width)")
    parser.add_argument("--layers", type=_at_least(1), default=2, help="gpt transformer blocks")
    parser.add_argument("--max-steps", type=_at_least(0), default=0, help="micro-batches per epoch (0: all)")
    parser.add_argument(
        "--cooldown", action=argparse.BooleanOptionalAction, default=True,
        help="give ELRA the run's micro-batches as its step budget (total_steps): its step length cools down over "
        "the last fifth of them (not for P2M); a resumed job counts its --epochs",
    )
    parser.add_argument("--timeout", type=_seconds, default=300.0, help="seconds a collective may wait for a rank")
    parser.add_argument("--seed", type=_seed, default=0, help="digits train/validation split (mlp)")
    parser.add_argument("--threads", type=_threads, default=0, help="CPU threads per process (0: torch default)")
    parser.add_argument("--save-final", type=_file_path, help="write the final full model state_dict here (directories created)")
    parser.add_argument("--crash-after-epoch", type=int, default=0, help=argparse.SUPPRESS)  # fault-injection tests
    parser.add_argument("--batch-multiplier", type=_at_least(1), default=1, help=argparse.SUPPRESS)  # mid-collection tests
    args = parser.parse_args(argv)
    for name in _given(parser, argv, _MODEL_OPTIONS):
        if _MODEL_OPTIONS[name] != args.model:
            option = "--" + name.replace("_", "-")
            parser.error(f"{option} applies to --model {_MODEL_OPTIONS[name]} only, not --model {args.model}: leave it out")
    if args.strategy == "fsdp1" and args.preconditioner in ("muon", "factored"):  # ELRA raised on every rank
        parser.error(
            f"--preconditioner {args.preconditioner} needs each matrix whole, but --strategy fsdp1 flattens them: "
            "use --preconditioner auto or adam (or none), or --strategy fsdp2"
        )
    if args.model == "gpt" and args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    if args.text is not None and not args.text.is_file():
        parser.error(f"--text {args.text} is not a file")
    if args.save_final is not None and args.save_final.is_dir():
        parser.error(f"--save-final {args.save_final} is a directory; name the file to write")
    if args.save_final is not None and args.text is not None and args.save_final.resolve() == args.text.resolve():
        parser.error(f"--save-final {args.save_final} is the --text file: the model would replace it; name another file")
    if args.save_final is not None and args.checkpoint_dir is not None:
        # not yet created, it passed as a file: the run ended in a traceback renaming onto the checkpoints' directory
        checkpoints = args.checkpoint_dir.resolve()
        if args.save_final.resolve() in (checkpoints, *checkpoints.parents):
            parser.error(
                f"--save-final {args.save_final} is a directory --checkpoint-dir {args.checkpoint_dir} creates for its "
                f"checkpoints; name a file, such as {args.checkpoint_dir / 'model.pt'}"
            )
    for option, path in (("--checkpoint-dir", args.checkpoint_dir), ("--save-final", args.save_final)):
        if path is not None and (problem := _unwritable(path)):
            parser.error(f"{option} {path}: {problem}")
    return args


def setup(args) -> tuple[int, int, torch.device]:
    """Process group (if launched by torchrun or asked for) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.strategy == "none" and world > 1:
        raise SystemExit("--strategy none runs one process; launch it without torchrun or pick ddp/fsdp2/fsdp1")
    if args.strategy != "none" and not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        raise SystemExit(
            f"--strategy {args.strategy} runs under torchrun, which starts the ranks: "
            f"torchrun --standalone --nproc_per_node=2 launch/train.py --strategy {args.strategy} ...; "
            "for one process without torchrun use --strategy none"
        )
    if args.device == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:  # torch.cuda.set_device's traceback otherwise
            raise SystemExit(
                f"--device cuda: this process is local rank {local_rank}, but the machine has {gpus} CUDA device"
                + "s" * (gpus != 1) + (": start at most one process per device" if gpus else ": use --device cpu")
            )
        device = torch.device("cuda", local_rank)
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


def build_model(args, classes: int) -> torch.nn.Module:
    """The model of ``--model``; ``classes`` is the vocabulary size for gpt."""
    torch.manual_seed(0)  # identical initial weights on every rank
    if args.model == "mlp":
        return digits_mlp(classes)
    if args.model == "gpt":
        return CharGPT(classes, context=args.context, width=args.width, heads=args.heads, layers=args.layers)
    import torchvision

    return torchvision.models.resnet18(num_classes=classes)


def _shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What FSDP shards on its own: a transformer's blocks, else every leaf layer with parameters."""
    if isinstance(getattr(model, "blocks", None), torch.nn.ModuleList):
        return list(model.blocks)
    return [
        m for m in list(model.modules())[1:]
        if any(p.requires_grad for p in m.parameters(recurse=False)) and not list(m.children())
    ]


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in _shard_units(model):
            fully_shard(module)
        return fully_shard(model)
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        blocks = getattr(model, "blocks", None)
        policy = ModuleWrapPolicy({type(b) for b in blocks}) if isinstance(blocks, torch.nn.ModuleList) else None
        return FSDP(model, device_id=device, use_orig_params=True, auto_wrap_policy=policy)
    return model


def _quiet_fsdp_warnings() -> None:
    """Warnings about FSDP's own internals, repeated every epoch, that this loop cannot act on.

    FSDP1's state dicts, and DCP handling them, warn about their ShardedTensor
    internals on every save and load; FSDP2 warns that the root returns a view
    (an in-place change of it would skip a hook; the loss here never makes one).
    """
    for message in (
        "FSDP2-wrapped module .* returned a view tensor",
        "Please use DTensor instead and we are deprecating ShardedTensor",
        "`_get_pg_default_device` will be deprecated",
        "Multiple backends are registered with this ProcessGroup",
    ):
        warnings.filterwarnings("ignore", message=message, module="torch.distributed")


def _loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a classifier's (batch, classes) or a language model's (batch, length, vocab) logits."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction)


def reduce_sum(values: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Sum ``(loss_sum, correct, count, ...)`` over ranks."""
    if distributed:
        dist.all_reduce(values)
    return values


@torch.no_grad()
def evaluate(model, loader, device, distributed: bool) -> tuple[float, float]:
    """Mean loss and accuracy per target (per character for gpt) over the held-out set of all ranks.

    In eval mode: in training mode resnet18's BatchNorm normalised by each held-out batch's statistics and
    folded the held-out images into its running statistics, those the trained model uses. Those statistics
    (buffers) are rank 0's on every rank, as DDP broadcasts them: FSDP leaves each rank its own, which made its
    held-out lines differ from DDP's, and a resumed job's (DCP restores rank 0's) from the uninterrupted one's.
    """
    if distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    training = model.training
    model.eval()
    try:
        return _evaluate(model, loader, device, distributed)
    finally:
        model.train(training)


def _evaluate(model, loader, device, distributed: bool) -> tuple[float, float]:
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        totals += torch.stack(
            [
                _loss(logits, y, reduction="sum").double(),
                (logits.argmax(-1) == y).sum().double(),
                (y != IGNORED).sum().double(),  # the padding of a rank's share counts for nothing
            ]
        )
    loss_sum, correct, count = reduce_sum(totals, distributed).tolist()
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def train_epoch(model, optimizer, loader, device, args, distributed: bool) -> float:
    """One pass over this rank's part of the data; returns the mean finite micro-batch loss over ranks.

    A non-finite loss makes ELRA retrace; it stays out of the mean (NaN when no loss was finite).
    """
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for index, (x, y) in enumerate(loader):
        if args.max_steps and index >= args.max_steps:
            break
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        with grad_sync(model, optimizer) if distributed else nullcontext():  # the forward too: DDP decides there
            loss = _loss(model(x), y)
            finite = torch.isfinite(loss.detach())
            totals += torch.stack([torch.where(finite, loss.detach(), 0.0), finite]).double()
            if optimizer.skip_backward(loss):
                optimizer.step_retrace(loss)
                continue
            loss.backward()
        optimizer.step(loss)
    loss_sum, count = reduce_sum(totals, distributed).tolist()
    return loss_sum / count if count else math.nan


def _report(args, epoch: int, train_loss: float, valid: tuple[float, float], boosted, stats: dict) -> str:
    """One epoch's line: held-out loss and accuracy (bits per character for gpt), boost, ELRA's state."""
    valid_loss, accuracy = valid
    if args.model == "gpt":
        boost = boosted[0] / math.log(2) if boosted else float("nan")
        quality = f"bits/char {valid_loss / math.log(2):.4f}  boost bits/char {boost:.4f}"
    else:
        boost = boosted[1] if boosted else float("nan")
        quality = f"accuracy {accuracy:.4f}  boost {boost:.4f}"
    return (
        f"epoch {epoch:3d}  train {train_loss:.4f}  valid {valid_loss:.4f}  {quality}  lr {stats['lr']:.3g}  "
        f"batch x{stats['batch_multiplier']}  retraces {stats['retraces']}"
    )


def preconditioner(args) -> str | None:
    """The ``--preconditioner`` for ElraOptimizer (``auto``: muon, adam under fsdp1)."""
    if args.preconditioner == "auto":
        return "adam" if args.strategy == "fsdp1" else "muon"
    return None if args.preconditioner == "none" else args.preconditioner


def step_budget(args, train_set, world: int, start: int = 0, taken: int = 0) -> int | None:
    """ELRA's ``total_steps``: the micro-batches of ``--epochs`` epochs (each ``--max-steps`` at most; a text
    epoch's offset can cost one: counted epoch by epoch, a resumed job's budget came out short of the
    uninterrupted one's and cooled down elsewhere); ``None`` without ``--cooldown`` or for P2M. Resumed after
    ``start`` epochs that took ``taken`` micro-batches, those and the rest's on ``world`` ranks: a job resumed on
    another number of ranks has epochs of another length (its budget from the new epoch length alone sat at or
    far beyond the clock, so it ran at the cooldown's floor or never cooled down)."""
    if not args.cooldown or preconditioner(args) is None:
        return None
    per_step = args.batch_size * world
    counts = [train_set.training_samples(epoch) // per_step for epoch in range(start, args.epochs)]
    return taken + sum(min(count, args.max_steps) if args.max_steps else count for count in counts)


def check_sizes(args, train_set, valid_set, world: int) -> None:
    """Refuse data too small for one training step per epoch or one held-out sample per rank.

    Every rank takes the same steps, so what does not fill a global batch is
    left out of the epoch; with nothing left, each epoch would train nothing
    and report (and feed ELRA) a loss of 0.
    """
    unit = "windows" if args.model == "gpt" else "samples"
    ranks = f"{world} rank" + "s" * (world != 1)
    available, per_step = train_set.fewest_training_samples(), args.batch_size * world
    if available < per_step:
        raise SystemExit(
            f"--batch-size {args.batch_size} on {ranks} takes {per_step} training {unit} per step, but an epoch has "
            f"{available}: not one step; lower --batch-size"
        )
    if len(valid_set) < world:
        raise SystemExit(f"the held-out set has {len(valid_set)} {unit}, fewer than the {ranks}: nothing to evaluate")


def job_options(args, source: str = "", text_sha256: str = "") -> dict[str, str | int]:
    """The options the model, its data and its batches depend on, and the data's ``source`` where the options
    do not fix it (:class:`launch.data.Data`): a resumed job must repeat them.

    ``--batch-size`` among them: ELRA resumes with the batch size of its checkpoint (its statistics
    window), so another one would feed it micro-batches of a size it does not count with. ``--max-steps`` picks
    each epoch's micro-batches (its first N): another one trains another schedule than the job started.
    ``--preconditioner`` (as resolved from auto): ELRA resumes with its checkpoint's, ignoring another one, whose state
    a sharded load expected in the checkpoint (and called it unreadable without). The source: a text
    of another vocabulary maps the same ids to other characters; CIFAR-10 appearing or vanishing in
    ``--data-dir`` swaps FakeData for it.
    """
    names = {"mlp": ("seed",), "gpt": ("text", "context", "width", "heads", "layers"), "resnet18": ()}
    job = {
        "model": args.model, "batch_size": args.batch_size, "max_steps": args.max_steps,
        "preconditioner": preconditioner(args) or "none",
    }
    for name in names[args.model]:
        value = getattr(args, name)
        job[name] = str(value.resolve()) if isinstance(value, Path) else value
    if source:
        job["data"] = source
    if text_sha256:  # a text edited (or a Python upgraded) at the same path: the held-out part holds trained-on text
        job["text_sha256"] = text_sha256
    return job


def train(args, rank: int, world: int, device: torch.device, distributed: bool) -> None:
    """Build, resume, train and save. The wrapped model lives only in this frame (see ``main``)."""
    try:
        train_set, valid_set, classes, source, text_sha256 = build_data(args)
    except TextTooShort as error:  # a one-line error, as check_sizes gives
        raise SystemExit(str(error)) from None
    except UnicodeDecodeError as error:  # only --text is decoded
        raise SystemExit(
            f"--text {args.text} is not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8"
        ) from None
    if source.startswith("FakeData") and rank == 0:  # a --data-dir without them trained on noise saying nothing
        log.warning("no CIFAR-10 files (cifar-10-batches-py, intact) under --data-dir %s: training on %s, random "
                    "images whose accuracy means nothing", args.data_dir, source)
    check_sizes(args, train_set, valid_set, world)
    model = wrap(build_model(args, classes), args.strategy, device)
    budget = step_budget(args, train_set, world)
    optimizer = ElraOptimizer(  # given the model: it reshards FSDP's gathered weights after its in-place changes
        model.named_parameters(), model, args.batch_size, classes, lr=args.lr, weight_decay=args.weight_decay,
        batch_multiplier=args.batch_multiplier, preconditioner=preconditioner(args), total_steps=budget,
    )
    optimizer.enable_boost()
    checkpointer = (
        Checkpointer(args.checkpoint_dir, args.strategy, rank, world=world, job=job_options(args, source, text_sha256))
        if args.checkpoint_dir else None
    )
    start = checkpointer.resume(model, optimizer) if checkpointer else 0
    if start and budget is not None:
        budget = step_budget(args, train_set, world, start, optimizer.micro_batches_taken)
    if optimizer.total_steps != budget:  # the checkpoint's, of a job with other --epochs, --cooldown or ranks
        if rank == 0:
            log.info("step budget %s micro-batches for --epochs %d, not the checkpoint's %s",
                     budget, args.epochs, optimizer.total_steps)
        optimizer.total_steps = budget
    if start >= args.epochs and rank == 0:
        print(
            f"the run is complete: {args.checkpoint_dir} holds {start} epochs (--epochs {args.epochs}), nothing to train; "
            f"it ended at\n{checkpointer.summary() or f'epoch {start:3d}'}",
            flush=True,
        )
    elif start and rank == 0:
        log.info("resumed from epoch %d of %d", start, args.epochs)

    for epoch in range(start, args.epochs):
        loader = train_set.loader(epoch, rank, world, args.batch_size)
        train_loss = train_epoch(model, optimizer, loader, device, args, distributed)
        valid = evaluate(model, valid_set.loader(None, rank, world, 256), device, distributed)
        with optimizer.boosted() as averaged:
            boosted = evaluate(model, valid_set.loader(None, rank, world, 256), device, distributed) if averaged else None
        optimizer.restart_boost()
        if math.isfinite(train_loss) and math.isfinite(valid[0]):  # equal on every rank: all or none report
            optimizer.set_train_loss(train_loss)
            optimizer.set_valid_loss(valid[0])
        elif rank == 0:
            log.warning("epoch %d: train loss %s, valid loss %s: not fed to ELRA's weight-decay control",
                        epoch + 1, train_loss, valid[0])
        line = _report(args, epoch + 1, train_loss, valid, boosted, optimizer.stats)
        if checkpointer:
            checkpointer.save(model, optimizer, epoch + 1, summary=line)
        if epoch + 1 == args.crash_after_epoch and rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0:
            print(line, flush=True)
    if args.save_final:
        from launch.checkpoint import durable, full_model_state

        state = full_model_state(model, args.strategy)
        if rank == 0:
            args.save_final.parent.mkdir(parents=True, exist_ok=True)  # as --checkpoint-dir: not at the end of a run
            partial = args.save_final.with_name(args.save_final.name + ".tmp")
            torch.save(state, partial)
            durable(partial)  # on the disk before its name is: a power loss left the name on a truncated file
            partial.replace(args.save_final)  # whole or not at all: a killed write left a truncated model there
            durable(args.save_final.parent)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _quiet_fsdp_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup(args)
    distributed = args.strategy != "none"
    train(args, rank, world, device, distributed)
    if distributed:
        # The wrapper is gone with train()'s frame; collect what cycles kept of it while the
        # process group is still registered. DDP's reducer owns a reference to the group: if
        # freeing the reducer dropped the group's last one, ~ProcessGroupGloo would join gloo's
        # threads under the GIL while a thread freeing a finished work's Python tensors waits for
        # the GIL (a deadlock at exit seen with torch 2.13). Freed here, the group's last
        # reference goes in destroy_process_group, whose binding releases the GIL.
        gc.collect()
        dist.destroy_process_group()


def _exit_code(stop: SystemExit) -> int:
    """SystemExit's code as an exit status, its message (if any) on stderr."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(f"train.py: error: {stop.code}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    # Leave without the interpreter's teardown, whatever happens: gloo's threads
    # sometimes abort it ("terminate called without an active exception").
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = _exit_code(stop)
    except CheckpointError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
