"""Spawned gloo workers for the distributed tests, and the single-process twin runs.

Every scenario trains the same small float64 model on the same data stream:
each rank takes its slice of a global batch, the single process takes the
whole batch. Ranks write their results to files that the tests compare.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ranks import as_gloo_rank  # noqa: E402
from elra import ElraGradScaler, ElraOptimizer, grad_sync  # noqa: E402

LOCAL_BATCH = 4
FEATURES, HIDDEN, CLASSES = 5, 7, 3


@dataclass(frozen=True)
class Scenario:
    """One distributed training run and the events injected into it."""

    name: str
    strategy: str = "ddp"  # ddp | fsdp2 | fsdp2-root | hsdp | fsdp1 | fsdp1-orig
    steps: int = 40
    batch_multiplier: int = 1
    use_grad_sync: bool = True
    options: dict = field(default_factory=dict)
    nan_loss_at: int | None = None  # micro-step where the last rank reports a nan loss
    bad_loss_at: int | None = None  # micro-step where rank 0's loss is inf: all ranks skip backward
    count_collectives: bool = False
    diverge: bool = False  # the last rank builds its optimizer with another lr
    boost_cycle: int | None = None  # enable boosting with this cycle
    scaler: bool = False  # train through ElraGradScaler
    inf_grad_at: int | None = None  # micro-step where the last rank's first gradient shard gets an inf
    nan_plan: tuple = ()  # (micro-step, rank) pairs: that rank reports a nan loss then
    inf_plan: tuple = ()  # (micro-step, rank) pairs: that rank's first gradient shard gets an inf then


def _planned(plan: tuple, step: int, rank: int, sharded_world: int) -> bool:
    """Whether an injection of ``plan`` hits this rank (the single process takes every rank's)."""
    return any(s == step and (r == rank or sharded_world == 1) for s, r in plan)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, CLASSES)
        self.dead = torch.nn.Parameter(torch.ones(3))  # never used: no gradient on any rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def global_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * LOCAL_BATCH, FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (world * LOCAL_BATCH,), generator=gen)
    return x, y


def train(
    scenario: Scenario, model, optimizer: ElraOptimizer, rank: int, world: int, sharded_world: int, start: int = 0
) -> list:
    """The training loop shared by the ranks (sharded_world ranks) and the single process (1)."""
    counts = []
    scaler = ElraGradScaler(init_scale=2.0**8, growth_interval=5) if scenario.scaler else None
    if scenario.boost_cycle:
        optimizer.enable_boost(scenario.boost_cycle)
    for step in range(start, scenario.steps):
        x, y = global_batch(step, world)
        if sharded_world > 1:
            x, y = x[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step == scenario.bad_loss_at and rank == 0:
            loss = loss + float("inf")
        if optimizer.skip_backward(loss):
            optimizer.step_retrace(loss)
            continue
        sync = grad_sync(model, optimizer) if scenario.use_grad_sync else nullcontext()
        with sync:
            (scaler.scale(loss) if scaler else loss).backward()
        if (step == scenario.inf_grad_at and rank == sharded_world - 1) or _planned(
            scenario.inf_plan, step, rank, sharded_world
        ):
            _poison_first_gradient(model)
        if scaler:
            counts.append((scaler.step(optimizer), scaler.get_scale()))
            scaler.update()
            continue
        value = loss.detach()
        if (step == scenario.nan_loss_at and rank == sharded_world - 1) or _planned(
            scenario.nan_plan, step, rank, sharded_world
        ):
            value = torch.tensor(float("nan"), dtype=torch.float64)
        if scenario.count_collectives:
            from torch.distributed.tensor.debug import CommDebugMode

            collecting = optimizer.collecting
            with CommDebugMode() as comm:
                optimizer.step(value)
            counts.append((collecting, comm.get_total_counts()))
        else:
            optimizer.step(value)
    return counts


def _poison_first_gradient(model) -> None:
    """Put an inf into the first non-empty local gradient shard of this rank."""
    for p in model.parameters():
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if grad is not None and grad.numel():
            grad.view(-1)[0] = float("inf")
            return


def make_optimizer(model, scenario: Scenario, single: bool = False, odd_rank: bool = False) -> ElraOptimizer:
    options = dict(scenario.options)
    if single:
        options.pop("check_consistency", None)
        options["process_group"] = None
    lr = 2e-4 if odd_rank and scenario.diverge else 1e-4
    classes = options.pop("classes", CLASSES)  # None: the regime is detected from the reduced losses and sums
    return ElraOptimizer(
        model.parameters(), None, LOCAL_BATCH, classes, lr=lr, batch_multiplier=scenario.batch_multiplier, **options
    )


def wrap(model: Net, strategy: str, world: int):
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if strategy in ("fsdp2", "fsdp2-root", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if strategy == "hsdp" else None
        if strategy != "fsdp2-root":
            fully_shard(model.hidden, mesh=mesh)
            fully_shard(model.out, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, device_id=torch.device("cpu"), use_orig_params=strategy == "fsdp1-orig")


def full_parameters(model, strategy: str) -> dict[str, torch.Tensor]:
    if strategy.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in model.named_parameters()}
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name.replace("module.", "", 1) if strategy == "ddp" else name] = full.detach().clone()
    return params


def single_process(scenario: Scenario, world: int) -> dict:
    """The same computation in one process on the whole global batch."""
    model = make_net()
    optimizer = make_optimizer(model, scenario, single=True)
    counts = train(scenario, model, optimizer, 0, world, 1)
    result = {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "stats": optimizer.stats}
    result["counts"] = counts
    if scenario.boost_cycle:
        with optimizer.boosted():
            result["boosted"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    return result


def run_scenarios(rank: int, world: int, store: str, out: str, scenarios: list[Scenario]) -> None:
    """Entry point of one spawned rank."""

    def body() -> None:
        results = {}
        for scenario in scenarios:
            model = wrap(make_net(), scenario.strategy, world)
            optimizer = make_optimizer(model, scenario, odd_rank=rank == world - 1)
            try:
                counts = train(scenario, model, optimizer, rank, world, world)
            except RuntimeError as error:
                results[scenario.name] = {"error": str(error)}
                continue
            result = {"stats": optimizer.stats, "counts": counts, "params": full_parameters(model, scenario.strategy)}
            if scenario.boost_cycle:
                with optimizer.boosted():
                    result["boosted"] = full_parameters(model, scenario.strategy)
                result["after_boost"] = full_parameters(model, scenario.strategy)
            if rank == 0:
                result["single"] = single_process(scenario, world)
            results[scenario.name] = result
        torch.save(results, Path(out) / f"rank{rank}.pt")

    as_gloo_rank(rank, world, store, body)


def _dcp_state(model, optimizer, full: bool = False) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def _dcp_load(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run_checkpointing(rank: int, world: int, store: str, out: str, scenario: Scenario, save_at: int, phase: str) -> None:
    """DCP round trips of an FSDP2 run.

    ``save``: train to ``save_at``, save a DCP checkpoint (and a full copy for a
    single process), train on; then a fresh model and optimizer load the
    checkpoint and train the same steps. ``resume``: load the checkpoint on
    this world size, train on, and rank 0 runs the single-process twin from
    the full copy.
    """
    import torch.distributed.checkpoint as dcp

    def body() -> None:
        checkpoint = Path(out) / "dcp"
        results = {}
        if phase == "save":
            model = wrap(make_net(), scenario.strategy, world)
            optimizer = make_optimizer(model, scenario)
            train(replace(scenario, steps=save_at), model, optimizer, rank, world, world)
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=checkpoint)
            full = _dcp_state(model, optimizer, full=True)
            if rank == 0:
                torch.save(full, Path(out) / "full.pt")
            train(scenario, model, optimizer, rank, world, world, start=save_at)
            results["uninterrupted"] = {"params": full_parameters(model, scenario.strategy), "stats": optimizer.stats}
        model = wrap(make_net(), scenario.strategy, world)
        optimizer = make_optimizer(model, scenario)
        state = _dcp_state(model, optimizer)
        dcp.load(state, checkpoint_id=checkpoint)
        _dcp_load(model, optimizer, state)
        train(scenario, model, optimizer, rank, world, world, start=save_at)
        results["resumed"] = {"params": full_parameters(model, scenario.strategy), "stats": optimizer.stats}
        if rank == 0 and phase == "resume":
            single_model = make_net()
            single_opt = make_optimizer(single_model, scenario, single=True)
            _dcp_load(single_model, single_opt, torch.load(Path(out) / "full.pt", weights_only=False))
            train(scenario, single_model, single_opt, 0, world, 1, start=save_at)
            params = {k: v.detach().clone() for k, v in single_model.named_parameters()}
            results["single"] = {"params": params, "stats": single_opt.stats}
        torch.save(results, Path(out) / f"{phase}{rank}.pt")

    as_gloo_rank(rank, world, store, body)
