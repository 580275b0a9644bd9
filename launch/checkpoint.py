"""Per-epoch checkpoints that a restarted job resumes from, never half-written.

Each checkpoint is written to ``epoch-NNNNN.tmp`` and renamed to
``epoch-NNNNN`` by rank 0 only after every rank has finished writing, so an
interrupted write is never taken for a checkpoint. Sharded strategies use
torch.distributed.checkpoint (each rank writes its shards; it can be loaded
on another number of ranks); none and DDP write one ``state.pt`` from rank 0.
Gradient sums collected toward a real step are kept (averaged over ranks first).
The newest ``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

_NAME = re.compile(r"^epoch-(\d+)$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def full_model_state(model: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The whole model's state_dict on rank 0 (empty elsewhere for sharded strategies)."""
    if strategy in ("fsdp2", "fsdp1"):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in _unwrapped(model).state_dict().items()}


class Checkpointer:
    def __init__(self, directory: Path, strategy: str, rank: int, keep: int = 2) -> None:
        self.directory = directory
        self.keep = keep
        self.sharded = strategy in ("fsdp2", "fsdp1")
        self.rank = rank
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
        _barrier()

    def newest(self) -> tuple[int, Path] | None:
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return max(found) if found else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        final = self.directory / f"epoch-{epoch:05d}"
        partial = final.with_name(final.name + ".tmp")
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)
        # An epoch can end in the middle of collecting micro-batches: the sums each rank
        # collected with gradient sync off are averaged first, so one checkpoint holds them.
        optimizer.sync_pending_grads()
        _barrier()
        if self.sharded:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
        elif self.rank == 0:
            partial.mkdir(parents=True)
            state = {"model": _unwrapped(model).state_dict(), "optim": optimizer.state_dict(), "epoch": epoch}
            torch.save(state, partial / "state.pt")
        _barrier()
        if self.rank == 0:
            partial.rename(final)
            complete = sorted(p for p in self.directory.iterdir() if _NAME.match(p.name) and p.is_dir())
            for old in complete[: -self.keep]:
                shutil.rmtree(old)
        _barrier()

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the newest complete checkpoint; returns the number of epochs it holds (0: none)."""
        newest = self.newest()
        if newest is None:
            return 0
        epoch, path = newest
        if self.sharded:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            state = torch.load(path / "state.pt", weights_only=True)
            _unwrapped(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
        return epoch
