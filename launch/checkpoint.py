"""Per-epoch checkpoints that a restarted job resumes from, never half-written.

Each checkpoint is written to ``epoch-NNNNN.tmp`` and renamed to
``epoch-NNNNN`` by rank 0 only after every rank has finished writing and its
files are on the disk (fsynced), so an interrupted write, or one a power loss
cut short, is never taken for a checkpoint. Sharded strategies use
torch.distributed.checkpoint (each rank writes its shards; it can be loaded
on another number of ranks); none and DDP write one ``state.pt`` from rank 0.
Gradient sums collected toward a real step are kept (averaged over ranks
first). The newest ``keep`` complete checkpoints are kept. Each one records
in ``meta.json`` the strategy and world size that wrote it, the options its
model, data and batches depend on, and the epoch's summary line, so a job
resumed with an incompatible strategy, model, data or batch size is told
what differs, and a finished job says where it ended.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict_loader as _dcp_loader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

_NAME = re.compile(r"^epoch-(\d+)$")
_META = "meta.json"
_SHARDED = ("fsdp2", "fsdp1")

log = logging.getLogger("launch")


class CheckpointError(Exception):
    """A checkpoint directory this job cannot use; the message says why and what to do."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _from_dcp_loader(record: logging.LogRecord) -> bool:
    """False for the records DCP's loader logs on the root logger itself: the warnings, each with a traceback, that
    the checkpoint's global metadata and then the rank-local one could not be read (the load's exception says both)."""
    return os.path.normcase(record.pathname) != os.path.normcase(_dcp_loader.__file__)


@contextmanager
def _quiet_dcp_loader():
    """Keep DCP's loader from logging while it loads: a damaged checkpoint's failure is then the launcher's one line
    per rank. A filter on the root logger drops only what is logged on it directly (not what other loggers
    propagate to its handlers), and of that only the loader's own records; it is removed after the load."""
    root = logging.getLogger()
    root.addFilter(_from_dcp_loader)
    try:
        yield
    finally:
        root.removeFilter(_from_dcp_loader)


def durable(path: Path) -> None:
    """Force ``path``'s contents, a file's or a directory's entries, onto the disk: a rename publishes a file only
    as far as the disk holds it, and after a power loss a name renamed before could hold nothing or a part."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:  # a filesystem without fsync (of directories, on some): what it holds is what it has
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
        log.debug("fsync of %s: %s; relying on the filesystem", path, error)
    finally:
        os.close(descriptor)


def full_model_state(model: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The whole model's state_dict on rank 0 (on GPUs, empty elsewhere for sharded strategies).

    Gathered onto rank 0's CPU from GPUs; a CPU model is gathered on every rank
    instead (offloading it to the CPU gains nothing, and FSDP1's offloading
    full state dict crashes on CPU with torch 2.13).
    """
    if strategy in ("fsdp2", "fsdp1"):
        on_gpu = any(p.device.type != "cpu" for p in model.parameters())
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))
    return {k: v.detach().cpu().clone() for k, v in _unwrapped(model).state_dict().items()}


def _epochs_in(directory: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``directory``, oldest first: by epoch, not by name (epoch-100000 sorts before
    epoch-99999)."""
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())


class Checkpointer:
    def __init__(
        self, directory: Path, strategy: str, rank: int, keep: int = 2, world: int = 1, job: dict | None = None
    ) -> None:
        """``job``: the options (name: value) the model, data and batches depend on; a checkpoint written with other
        values is refused (another --seed splits the data anew, another --heads reshapes nothing the load would
        notice, another --batch-size is not the one the optimizer's state resumes with)."""
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"--checkpoint-dir {directory} is a file; name a directory (it is created if missing)")
        # one checkpoint's files, and no epoch-N beside them (a --save-final named state.pt may sit among those)
        if any((directory / name).is_file() for name in ("state.pt", ".metadata")) and not _epochs_in(directory):
            # it holds no epoch-N: the job trained afresh from epoch 1, saying nothing, into the old checkpoint
            named = _NAME.match(directory.name)
            epoch = f" (epoch {int(named.group(1))})" if named else ""
            raise CheckpointError(
                f"--checkpoint-dir {directory} is a checkpoint{epoch}, not a directory of them: give the one that "
                f"holds it, {directory.parent}, to resume from its newest"
            )
        self.directory = directory
        self.keep = keep
        self.strategy = strategy
        self.world = world
        self.job = dict(job or {})
        self.sharded = strategy in _SHARDED
        self.rank = rank
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
        _barrier()

    def newest(self) -> tuple[int, Path] | None:
        found = _epochs_in(self.directory)  # none on a rank whose node does not share rank 0's (_check_ranks_agree)
        return found[-1] if found else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, summary: str = "") -> None:
        """Checkpoint ``epoch`` (complete epochs); ``summary`` is the epoch's report line, kept in meta.json."""
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
            durable(partial / "state.pt")
        _barrier()
        if self.rank == 0:  # DCP syncs its files itself
            meta = {"strategy": self.strategy, "world_size": self.world, "job": self.job, "epoch": epoch, "summary": summary}
            (partial / _META).write_text(json.dumps(meta))
            durable(partial / _META)
            durable(partial)
            partial.rename(final)
            durable(self.directory)
            complete = _epochs_in(self.directory)
            for _, old in complete[: -self.keep]:
                shutil.rmtree(old)
        _barrier()

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the newest complete checkpoint; returns the number of epochs it holds (0: none)."""
        newest = self.newest()
        self._check_ranks_agree(newest)
        if newest is None:
            return 0
        epoch, path = newest
        self._check_compatible(path)
        if self.sharded:
            model_state, optim_state = get_state_dict(model, optimizer)
            # param_names stay out of the load: DCP matches the state by name itself (FSDP1's load would leave the
            # saved order's names against this order's state), and checkpoints from before they were saved lack them
            for group in optim_state["param_groups"]:
                group.pop("param_names", None)
            state = {"model": model_state, "optim": optim_state}
            try:
                with _quiet_dcp_loader():
                    dcp.load(state, checkpoint_id=path)
            except dcp.CheckpointException as error:  # on every rank, with each failing rank's exception
                failure = min(error.failures.items())[1][0]
                if any(words in str(failure) for words in ("Missing key", "Size mismatch")):  # readable, another model's
                    raise _does_not_fit(path, failure) from None
                raise _damaged(path, failure) from None
            # DCP loads what this model asks for: a parameter or buffer of the checkpoint's that it lacks went unnoticed
            saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
            unexpected = sorted(k for k in saved if k.startswith("model.") and k[len("model."):] not in model_state)
            if unexpected:
                raise _does_not_fit(path, RuntimeError(f"Unexpected key in checkpoint state_dict: {unexpected[0]}"))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            try:
                # onto the CPU, whatever device wrote it: the loads below put each tensor on its parameter's device
                state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:  # missing, truncated, not torch's
                raise _damaged(path, error) from None
            try:  # the model's state by name (RuntimeError), then the optimizer's by position (ValueError)
                _unwrapped(model).load_state_dict(state["model"])
                optimizer.load_state_dict(state["optim"])
            except (RuntimeError, ValueError) as error:  # another model, its parameters renamed or reordered
                raise _does_not_fit(path, error) from None
        return epoch

    def summary(self) -> str:
        """The report line of the newest complete checkpoint's epoch ("" when none or not recorded)."""
        newest = self.newest()
        return _meta(newest[1]).get("summary", "") if newest else ""

    def _check_ranks_agree(self, newest: tuple[int, Path] | None) -> None:
        """Refuse, on every rank, ranks that see other newest checkpoints: a --checkpoint-dir on disks the nodes
        do not share. Rank 0 alone creates it, renames and (none, ddp) writes, so the other nodes' ranks found
        no directory (a traceback) or a stale one, and trained from another epoch mixed with rank 0's."""
        if not dist.is_initialized():
            return
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, (newest[0] if newest else 0) if self.directory.is_dir() else None)
        if len(set(seen)) > 1:
            views = ", ".join(f"rank {r}: " + ("no directory" if e is None else f"epoch {e}") for r, e in enumerate(seen))
            raise CheckpointError(
                f"--checkpoint-dir {self.directory} holds other checkpoints on other ranks (the newest, {views}): it "
                "must be one directory every rank reads, on a filesystem all nodes share"
            )

    def _check_compatible(self, path: Path) -> None:
        """Refuse a checkpoint of another strategy, naming both; note a change of world size."""
        meta = _meta(path)
        if not meta and not (path / ".metadata").exists() and not (path / "state.pt").exists():
            # an empty directory: not one "written by --strategy none or ddp", as the guess below took it
            raise _damaged(path, FileNotFoundError("it holds neither state.pt nor torch.distributed.checkpoint's shards"))
        written = meta.get("strategy") or ("fsdp2 or fsdp1" if (path / ".metadata").exists() else "none or ddp")
        world = meta.get("world_size")
        compatible = [self.strategy] if self.sharded else ["none", "ddp"]
        if not any(s in compatible for s in written.split(" or ")):
            usable = written if written in _SHARDED or " or " in written else "none or ddp"
            raise CheckpointError(
                f"{path} was written by --strategy {written}" + (f" on {world} rank" + "s" * (world != 1) if world else "")
                + f"; --strategy {self.strategy} cannot resume it (its files are "
                + ("torch.distributed.checkpoint shards" if (path / ".metadata").exists() else "one state.pt")
                + f"): resume with --strategy {usable}, or start afresh in another --checkpoint-dir"
            )
        written_job = meta.get("job", {})
        differ = [k for k in self.job if k in written_job and written_job[k] != self.job[k]]
        if differ:
            raise CheckpointError(
                f"{path} was written with " + ", ".join(_option(k, written_job[k]) for k in differ)
                + "; this job has " + ", ".join(_option(k, self.job[k]) for k in differ)
                + ": resume with the options (and data) it was written with, or start afresh in another --checkpoint-dir"
            )
        if world is not None and world != self.world and self.rank == 0:
            log.warning("%s was written on %d rank%s, resuming on %d: the global batch changes with it", path, world, "s" * (world != 1), self.world)


def _option(key: str, value) -> str:
    """A job entry as the command line gives it (``data``: the data it found, ``text_sha256``: the text read, see
    ``launch.train.job_options``)."""
    if key == "text_sha256":
        return f"a --text of sha256 {value}"
    return f"data {value}" if key == "data" else f"--{key.replace('_', '-')} {value}"


def _meta(path: Path) -> dict:
    """The checkpoint's meta.json (empty for checkpoints written before it existed)."""
    file = path / _META
    try:
        meta = json.loads(file.read_text()) if file.exists() else {}
    except ValueError as error:  # not JSON, not UTF-8
        raise _damaged(path, error) from None
    if not isinstance(meta, dict):
        raise _damaged(path, ValueError(f"{_META} holds a {type(meta).__name__}, not an object"))
    return meta


def _does_not_fit(path: Path, error: Exception) -> CheckpointError:
    """A checkpoint that was read but whose state is another model's: one edited since, or its parameters renamed,
    reordered or reshaped (not a damaged checkpoint: the model it was written with resumes it)."""
    reason = " ".join(str(error).split()).rstrip(".")
    return CheckpointError(
        f"{path} does not fit this model: {reason}; resume with the model it was written with, "
        "or start afresh in another --checkpoint-dir"
    )


def _damaged(path: Path, error: Exception) -> CheckpointError:
    """A complete checkpoint whose files cannot be read (a disk that lost them, a copy cut short): the error
    names it rather than ending in a traceback; it is not skipped silently, for the epochs it holds."""
    reason = " ".join(str(error).split()).split(". ")[0]  # torch.load's first sentence says it; the rest is advice
    return CheckpointError(
        f"{path} cannot be read ({type(error).__name__}" + f": {reason}" * bool(reason)
        + "); remove it to resume from the checkpoint before it, or start afresh in another --checkpoint-dir"
    )
