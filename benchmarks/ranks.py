"""Run a function as one spawned gloo rank (shared by the distributed benchmark and tests)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

import torch
import torch.distributed as dist


def as_gloo_rank(rank: int, world: int, store: str, body: Callable[[], None]) -> None:
    """Initialise gloo, run ``body()``, and exit without the interpreter teardown.

    Spawned gloo workers sometimes abort in that teardown ("terminate called
    without an active exception"); the work is done by then, so leave directly.
    A failure prints its traceback and exits with status 1.
    """
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
        body()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
