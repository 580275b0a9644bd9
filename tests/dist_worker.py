"""Spawned gloo workers for the distributed tests, and the single-process twin runs.

Every scenario trains the same small float64 model on the same data stream:
each rank takes its slice of a global batch, the single process takes the
whole batch. Ranks write their results to files that the tests compare.
"""

from __future__ import annotations

import copy
import math
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ranks import as_gloo_rank  # noqa: E402
from elra import ElraGradScaler, ElraOptimizer, compiled, grad_sync, orthogonal  # noqa: E402

compiled.MIN_ELEMENTS = 20  # scenarios with compiled=True: the small nets' weights through the kernel, their biases eager

LOCAL_BATCH = 4
FEATURES, HIDDEN, CLASSES = 5, 7, 3


@dataclass(frozen=True)
class Scenario:
    """One distributed training run and the events injected into it."""

    name: str
    strategy: str = "ddp"  # ddp | ddp-bucket-view | fsdp2 | fsdp2-root | fsdp2-offload | fsdp2-no-reshard | hsdp | hsdp-root
    # | fsdp1 | fsdp1-orig | fsdp1-no-shard | fsdp1-hybrid | fsdp1-mixed (float32 compute over the float64 shards)
    # | ddp-subgroup | fsdp1-subgroup (each rank's wrapper over a group of its own) | plain (no wrapper)
    steps: int = 40
    batch_multiplier: int = 1
    use_grad_sync: bool = True
    sync_backward_only: bool = False  # grad_sync around backward() only (DDP refuses: its forward decides)
    options: dict = field(default_factory=dict)
    nan_loss_at: int | None = None  # micro-step where the last rank reports a nan loss
    bad_loss_at: int | None = None  # micro-step where rank 0's loss is inf: all ranks skip backward
    count_collectives: bool = False
    count_reductions: bool = False  # count the gradient reductions of every backward
    pass_model: bool = True  # give the optimizer the model (else only grad_sync may tell it)
    compiled_model: bool = False  # give it torch.compile's wrapper around the model (not used for the forward)
    diverge: bool = False  # the last rank builds its optimizer with another lr
    odd_rank: dict = field(default_factory=dict)  # the last rank's own batch_multiplier, param "groups" or model "dtype"
    boost_cycle: int | None = None  # enable boosting with this cycle
    scaler: bool = False  # train through ElraGradScaler
    inf_grad_at: int | None = None  # micro-step where the last rank's first gradient shard gets an inf
    nan_plan: tuple = ()  # (micro-step, rank) pairs: that rank reports a nan loss then
    spike_plan: tuple = ()  # micro-steps where every rank reports its loss times 1000 (refused; one process the same)
    inf_plan: tuple = ()  # (micro-step, rank) pairs: that rank's first gradient shard gets an inf then
    full_batch: bool = False  # the same global batch at every step: a noise-free loss
    first_batch_twice: bool = False  # the first global batch at steps 0 and 1: mini-batches taken for noise-free
    fade_from: int | None = None  # micro-step from which the loss is multiplied by 1e-3: muon's directions shrink
    late_from: int | None = None  # micro-step from which the net's ``late`` layer joins the forward
    user_sync: bool = False  # the wrapper's own sync switch (FSDP2's, FSDP1's no_sync()) instead of grad_sync
    user_sync_every: int | None = None  # ... switched by a count of its own: on at micro-steps 0, n, 2n... only
    user_all_reduce: bool = False  # HSDP: the replicas' all-reduce off while collecting, the reduce-scatter on
    evaluate_before_step: bool | str = False  # a forward under no_grad between each backward and its step (a root
    # gathers); "rank0": on rank 0 alone (a training accuracy logged there)
    reports_at: int | None = None  # micro-step where rank r reports train loss 1 and validation loss 2 + r ...
    rank0_reports: bool = False  # ... or only rank 0 does (the single process reports what the ranks agree on)
    report_sync_report_at: int | None = None  # micro-step where rank 0 reports, all sync_pending_grads, rank 0 reports
    lone_skip_at: int | None = None  # micro-step where the last rank calls skip_backward where the others step
    cast_at: int | None = None  # micro-step before which the model, float32 until then, is cast to float64
    state_dict_at: int | None = None  # micro-step before which every rank takes optimizer.state_dict()
    sync_at: int | None = None  # micro-step before which every rank calls sync_pending_grads() (as before a checkpoint)
    lone_boost_restart_at: int | None = None  # micro-step before which the last rank alone calls restart_boost()
    lone_reload_at: int | None = None  # micro-step before which the last rank alone loads a copy of its own state
    lone_group_at: int | None = None  # micro-step before which the last rank alone adds a parameter group
    failed_boost_eval_at: int | None = None  # micro-step before which the ranks evaluate in boosted(), the forward raising


def _planned(plan: tuple, step: int, rank: int, sharded_world: int) -> bool:
    """Whether an injection of ``plan`` hits this rank (the single process takes every rank's)."""
    return any(s == step and (r == rank or sharded_world == 1) for s, r in plan)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, CLASSES)
        self.dead = torch.nn.Parameter(torch.ones(3))  # never used: no gradient on any rank
        self.late: torch.nn.Linear | None = None
        self.awake = False  # whether ``late`` takes part in the forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.hidden(x))
        out = self.out(hidden)
        return out + self.late(hidden) if self.awake else out


def make_net(late: bool = False, dtype: torch.dtype = torch.float64) -> Net:
    """The scenarios' net; ``late``: with a zero layer that joins later (its first gradients come mid-run)."""
    torch.manual_seed(0)
    net = Net()
    if late:
        net.late = torch.nn.Linear(HIDDEN, CLASSES)
        torch.nn.init.zeros_(net.late.weight)
        torch.nn.init.zeros_(net.late.bias)
    return net.to(dtype)


def scenario_net(scenario: Scenario) -> Net:
    """The net a scenario starts from: float32 where it is cast later (``cast_at``)."""
    return make_net(scenario.late_from is not None, torch.float64 if scenario.cast_at is None else torch.float32)


def global_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * LOCAL_BATCH, FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (world * LOCAL_BATCH,), generator=gen)
    return x, y


def rank_batch(step: int, world: int, rank: int, sharded_world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``global_batch(step, world)``, or this rank's slice of it where ``sharded_world`` ranks share it."""
    x, y = global_batch(step, world)
    if sharded_world == 1:
        return x, y
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[part], y[part]


def train(
    scenario: Scenario,
    model,
    optimizer: ElraOptimizer,
    rank: int,
    world: int,
    sharded_world: int,
    start: int = 0,
    reductions: list | None = None,
) -> list:
    """The training loop shared by the ranks (sharded_world ranks) and the single process (1).

    ``reductions`` (if given) receives ``(collecting, gradient reductions)`` per backward.
    """
    counts = []
    scaler = ElraGradScaler(init_scale=2.0**8, growth_interval=5) if scenario.scaler else None
    if scenario.boost_cycle and not start:  # a resumed run's boost comes from its checkpoint
        optimizer.enable_boost(scenario.boost_cycle)
    for step in range(start, scenario.steps):
        if step == scenario.cast_at:
            model.double()
        x, y = global_batch(0 if scenario.full_batch or (scenario.first_batch_twice and step < 2) else step, world)
        x = x.to(next(model.parameters()).dtype)
        if step == scenario.reports_at:
            _report(scenario, optimizer, rank, world, sharded_world)
        if step == scenario.report_sync_report_at:
            _report_around_a_sync(optimizer, rank)
        if step == scenario.state_dict_at:
            optimizer.state_dict()
        if step == scenario.sync_at:
            optimizer.sync_pending_grads()
        if step == scenario.lone_boost_restart_at and rank == world - 1 and sharded_world > 1:
            optimizer.restart_boost()
        if step == scenario.lone_reload_at and rank == world - 1 and sharded_world > 1:
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        if step == scenario.lone_group_at and rank == world - 1 and sharded_world > 1:
            optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
        if scenario.late_from is not None:
            getattr(model, "module", model).awake = step >= scenario.late_from  # DDP wraps the net, FSDP2 is it
        if sharded_world > 1:
            x, y = x[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        if step == scenario.failed_boost_eval_at and sharded_world > 1:  # the single process: the run without it
            _interrupted_boost_eval(model, optimizer, x)
        optimizer.zero_grad()
        collecting = optimizer.collecting
        own_no_sync = nullcontext()
        if scenario.user_sync and sharded_world > 1 and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(not collecting)
        elif scenario.user_sync and sharded_world > 1 and collecting:  # FSDP1's
            own_no_sync = model.no_sync()
        if scenario.user_all_reduce and sharded_world > 1:
            model.set_requires_all_reduce(not collecting)
        if scenario.user_sync_every and sharded_world > 1:  # blind to ELRA's micro-batches: off for some real steps
            sync = step % scenario.user_sync_every == 0
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(sync)
            elif not sync:
                own_no_sync = model.no_sync()
        around_forward = scenario.use_grad_sync and not scenario.sync_backward_only
        around_backward = scenario.use_grad_sync and scenario.sync_backward_only
        with own_no_sync, grad_sync(model, optimizer) if around_forward else nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if scenario.fade_from is not None and step >= scenario.fade_from:
                loss = loss * 1e-3
            if step == scenario.bad_loss_at and rank == 0:
                loss = loss + float("inf")
            if optimizer.skip_backward(loss):
                optimizer.step_retrace(loss)
                continue
            with grad_sync(model, optimizer) if around_backward else nullcontext(), _counting_reductions(
                model, reductions, collecting
            ):
                (scaler.scale(loss) if scaler else loss).backward()
        if scenario.evaluate_before_step is True or (scenario.evaluate_before_step == "rank0" and rank == 0):
            with torch.no_grad():
                model(x)
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
        if step in scenario.spike_plan:
            value = value * 1000.0
        if scenario.count_collectives:
            from torch.distributed.tensor.debug import CommDebugMode

            collecting = optimizer.collecting
            with CommDebugMode() as comm:
                optimizer.step(value)
            counts.append((collecting, comm.get_total_counts()))
        elif step == scenario.lone_skip_at and rank == world - 1:
            optimizer.skip_backward(value)  # meets the other ranks' step: a disagreement, not a size mismatch
        else:
            optimizer.step(value)
    return counts


def _interrupted_boost_eval(model, optimizer: ElraOptimizer, x: torch.Tensor) -> None:
    """An evaluation in ``boosted()`` whose forward raises before the last layer (FSDP's root gathered); caught."""

    def fail(module, args):
        raise LookupError("the evaluation failed")

    hook = getattr(model, "module", model).out.register_forward_pre_hook(fail)
    try:
        with optimizer.boosted(), torch.no_grad():
            model(x)
    except LookupError:
        pass
    finally:
        hook.remove()


def _report(scenario: Scenario, optimizer: ElraOptimizer, rank: int, world: int, sharded_world: int) -> None:
    """Rank r's validation loss is 2 + r; one process reports the mean of those the ranks report."""
    reporting = [0] if scenario.rank0_reports else list(range(world))
    if sharded_world == 1 or rank in reporting:
        optimizer.set_train_loss(1.0)
        optimizer.set_valid_loss(2.0 + rank if sharded_world > 1 else sum(2.0 + r for r in reporting) / len(reporting))


def _report_around_a_sync(optimizer: ElraOptimizer, rank: int) -> None:
    """Rank 0 reports validation loss 5, every rank synchronises (as before a checkpoint), rank 0 reports 3:
    the last report counts, as in the single process, where the synchronisation does nothing."""
    if rank == 0:
        optimizer.set_train_loss(1.0)
        optimizer.set_valid_loss(5.0)
    optimizer.sync_pending_grads()
    if rank == 0:
        optimizer.set_valid_loss(3.0)


@contextmanager
def _counting_reductions(model, reductions: list | None, collecting: bool) -> Iterator[None]:
    """Count the gradient reductions of one backward: DDP's buckets (see ``count_ddp_buckets``), FSDP's collectives."""
    if reductions is None:
        yield
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        before = len(model.buckets_reduced)
        yield
        reductions.append((collecting, len(model.buckets_reduced) - before))
        return
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        yield
    reductions.append((collecting, sum(n for op, n in comm.get_comm_counts().items() if "reduce" in str(op))))


def count_ddp_buckets(model) -> None:
    """Make DDP count the gradient buckets it all-reduces (in ``model.buckets_reduced``)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model.buckets_reduced = []

    def hook(state, bucket):
        model.buckets_reduced.append(bucket.index())
        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, hook)


def _poison_first_gradient(model) -> None:
    """Put an inf into the first non-empty local gradient shard of this rank."""
    for p in model.parameters():
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if grad is not None and grad.numel():
            grad.view(-1)[0] = float("inf")
            return


def make_optimizer(model, scenario: Scenario, single: bool = False, odd_rank: bool = False) -> ElraOptimizer:
    options = {"preconditioner": None, **scenario.options}  # P2M unless the scenario names a direction
    known = (torch.compile(model) if scenario.compiled_model else model) if scenario.pass_model else None
    if single:
        options.pop("check_consistency", None)
        options["process_group"] = None
    lr = 2e-4 if odd_rank and scenario.diverge else 1e-4
    odd = scenario.odd_rank if odd_rank else {}
    params = list(model.parameters())
    if odd.get("groups", 1) == 2:
        params = [{"params": params[:1]}, {"params": params[1:]}]
    multiplier = odd.get("batch_multiplier", scenario.batch_multiplier)
    classes = options.pop("classes", CLASSES)  # None: the regime is detected from the reduced losses and sums
    return ElraOptimizer(params, known, LOCAL_BATCH, classes, lr=lr, batch_multiplier=multiplier, **options)


def wrap(model: Net, strategy: str, world: int):
    if strategy == "plain":
        return model
    if strategy.endswith("-subgroup"):  # one job per rank: the wrapper reduces over this rank alone
        import torch.distributed as dist

        group = [dist.new_group([r]) for r in range(world)][dist.get_rank()]
        if strategy == "ddp-subgroup":
            return torch.nn.parallel.DistributedDataParallel(model, process_group=group, find_unused_parameters=True)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, device_id=torch.device("cpu"), process_group=group)
    if strategy in ("ddp", "ddp-bucket-view"):
        views = strategy == "ddp-bucket-view"  # .grad are views into DDP's buckets
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, gradient_as_bucket_view=views)
    if strategy in ("fsdp2", "fsdp2-root", "hsdp", "hsdp-root", "fsdp2-offload", "fsdp2-no-reshard"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        hsdp = strategy.startswith("hsdp")
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if hsdp else None
        options = {"mesh": mesh}
        if strategy == "fsdp2-offload":  # the shards and their optimizer step on the CPU
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
        elif strategy == "fsdp2-no-reshard":  # the gathered weights stay between forward and backward
            options["reshard_after_forward"] = False
        if not strategy.endswith("-root"):
            fully_shard(model.hidden, **options)
            fully_shard(model.out, **options)
        return fully_shard(model, **options)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    options = {}
    if strategy == "fsdp1-no-shard":  # every rank holds whole flat parameters
        options["sharding_strategy"] = ShardingStrategy.NO_SHARD
    elif strategy == "fsdp1-mixed":  # the unsharded gradients of no_sync in float32, the shards' in float64
        from torch.distributed.fsdp import MixedPrecision

        options["mixed_precision"] = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float64)
    elif strategy.startswith("fsdp1-hybrid"):  # sharded over 2 ranks (or 1), repeated over the other mesh dimension
        from torch.distributed.device_mesh import init_device_mesh

        shape = (world, 1) if strategy == "fsdp1-hybrid-one-shard" else (world // 2, 2)
        options["sharding_strategy"] = ShardingStrategy.HYBRID_SHARD
        options["device_mesh"] = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    elif strategy == "fsdp1-one-element":  # a unit of its own around a one-element parameter (a temperature)
        late = torch.nn.Linear(1, 1, bias=False).to(model.out.weight.dtype)
        model.late = FSDP(late, device_id=torch.device("cpu"))  # use_orig_params would pad it to 16 bytes
    flat = strategy in ("fsdp1", "fsdp1-one-element")
    return FSDP(model, device_id=torch.device("cpu"), use_orig_params=not flat, **options)


def full_parameters(model, strategy: str) -> dict[str, torch.Tensor]:
    if strategy.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in model.named_parameters()}
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name.replace("module.", "", 1) if strategy.startswith("ddp") else name] = full.detach().clone()
    return params


def probe_outputs(model, optimizer: ElraOptimizer, boost: bool) -> dict[str, torch.Tensor]:
    """The model's outputs on a fixed batch (the same on every rank): now, under ``boosted()``, and after it.

    Parameters alone miss weights a wrapper keeps gathered (FSDP's root): the
    forward is what must see every in-place change.
    """
    x = global_batch(-1, 2)[0]
    with torch.no_grad():
        outputs = {"plain": model(x).detach().clone()}
        if boost:
            with optimizer.boosted():
                outputs["boosted"] = model(x).detach().clone()
            outputs["after_boost"] = model(x).detach().clone()
    return outputs


def single_process(scenario: Scenario, world: int) -> dict:
    """The same computation in one process on the whole global batch."""
    model = scenario_net(scenario)
    optimizer = make_optimizer(model, scenario, single=True)
    counts = train(scenario, model, optimizer, 0, world, 1)
    result = {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "stats": optimizer.stats}
    result["counts"] = counts
    if scenario.boost_cycle:
        with optimizer.boosted():
            result["boosted"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    result["outputs"] = probe_outputs(model, optimizer, bool(scenario.boost_cycle))
    if scenario.fade_from is not None:  # the same run with muon's directions never shrunk: it must differ
        with _never_shrinking():
            unshrunk = scenario_net(scenario)
            train(scenario, unshrunk, make_optimizer(unshrunk, scenario, single=True), 0, world, 1)
        result["unshrunk"] = {k: v.detach().clone() for k, v in unshrunk.named_parameters()}
    return result


@contextmanager
def _never_shrinking() -> Iterator[None]:
    saved, orthogonal.SHRINK_BELOW = orthogonal.SHRINK_BELOW, 1e-30
    try:
        yield
    finally:
        orthogonal.SHRINK_BELOW = saved


def run_scenarios(rank: int, world: int, store: str, out: str, scenarios: list[Scenario]) -> None:
    """Entry point of one spawned rank."""

    def body() -> None:
        results = {}
        for scenario in scenarios:
            net = scenario_net(scenario)
            if rank == world - 1 and "dtype" in scenario.odd_rank:
                net.to(scenario.odd_rank["dtype"])
            model = wrap(net, scenario.strategy, world)
            reductions = [] if scenario.count_reductions else None
            if reductions is not None and scenario.strategy == "ddp":
                count_ddp_buckets(model)
            try:
                optimizer = make_optimizer(model, scenario, odd_rank=rank == world - 1)
                counts = train(scenario, model, optimizer, rank, world, world, reductions=reductions)
                outputs = probe_outputs(model, optimizer, bool(scenario.boost_cycle))
            except (RuntimeError, ValueError) as error:
                results[scenario.name] = {"error": str(error)}
                continue
            result = {"stats": optimizer.stats, "counts": counts, "params": full_parameters(model, scenario.strategy)}
            result["reductions"] = reductions
            result["outputs"] = outputs
            result["compiled_kernel"] = compiled._kernel is not None and not compiled._failed  # it ran, never fell back
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

    options = StateDictOptions(full_state_dict=full)  # no cpu_offload: FSDP1's offloading gather crashes on CPU with torch 2.13
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def _dcp_load(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _reload(model, optimizer, checkpoint: Path) -> None:
    import torch.distributed.checkpoint as dcp

    optimizer.sync_pending_grads()  # the template comes from state_dict(), which needs synchronised sums
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint)
    _dcp_load(model, optimizer, state)


def _broadcast_load(model, optimizer, state: dict) -> None:
    """torch's load of a full state dict that rank 0 alone holds (``broadcast_from_rank0``); model and optimizer
    apart: ``set_state_dict`` takes an empty model state on the other ranks for none to load, and they skip
    the model's broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)


def run_checkpointing(rank: int, world: int, store: str, out: str, runs: list[tuple[Scenario, int]], phase: str) -> None:
    """DCP round trips of FSDP2 runs, each ``(scenario, micro-step to save at)``.

    ``save``: train to the save point, save a DCP checkpoint (and a full copy
    for a single process), train on; then a fresh model and optimizer load the
    checkpoint and train the same steps. ``resume``: load the checkpoint on
    this world size and train on; rank 0 also runs single-process twins, one
    from the full copy and one from the DCP checkpoint itself. FSDP2 runs saved
    mid-collection are also loaded from rank 0's full copy broadcast to the
    others (``broadcast_from_rank0``). Saved in the
    middle of collecting under grad_sync, the pending sums are synchronised
    first (``state_dict()`` refuses before that: recorded as ``refused``).
    """
    import torch.distributed.checkpoint as dcp

    def resumed_twin(load) -> dict:
        single_model = make_net(scenario.late_from is not None)
        single_opt = make_optimizer(single_model, scenario, single=True)
        if scenario.boost_cycle:  # before the load: the template needs room for the boost means
            single_opt.enable_boost(scenario.boost_cycle)
        load(single_model, single_opt)
        train(scenario, single_model, single_opt, 0, world, 1, start=save_at)
        params = {k: v.detach().clone() for k, v in single_model.named_parameters()}
        return {"params": params, "stats": single_opt.stats, "outputs": probe_outputs(single_model, single_opt, boost)}

    def from_dcp(model, optimizer) -> None:
        state = _dcp_state(model, optimizer)
        dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
        _dcp_load(model, optimizer, state)

    def body() -> None:
        nonlocal scenario, save_at, checkpoint, boost
        for scenario, save_at in runs:
            boost = bool(scenario.boost_cycle)  # outputs under boosted() too
            checkpoint = Path(out) / scenario.name
            results = {}
            if phase == "save":
                model = wrap(make_net(scenario.late_from is not None), scenario.strategy, world)
                optimizer = make_optimizer(model, scenario)
                train(replace(scenario, steps=save_at), model, optimizer, rank, world, world)
                results["micro_batches"] = optimizer.micro_batches
                try:
                    optimizer.state_dict()
                except RuntimeError as error:
                    results["refused"] = str(error)
                optimizer.sync_pending_grads()
                dcp.save(_dcp_state(model, optimizer), checkpoint_id=checkpoint)
                full = _dcp_state(model, optimizer, full=True)
                if rank == 0:
                    torch.save(full, checkpoint.with_suffix(".full.pt"))
                train(scenario, model, optimizer, rank, world, world, start=save_at)
                results["uninterrupted"] = {"params": full_parameters(model, scenario.strategy), "stats": optimizer.stats}
                results["uninterrupted"]["controller"] = optimizer.controller.state_dict()  # the loss statistics too
                # load the checkpoint into this model mid-run: FSDP's root holds gathered weights (and,
                # collecting under grad_sync, unsynchronised sums) from the run that goes on
                results["uninterrupted"]["outputs"] = probe_outputs(model, optimizer, boost)
                _reload(model, optimizer, checkpoint)
                train(scenario, model, optimizer, rank, world, world, start=save_at)
                results["reloaded"] = {"params": full_parameters(model, scenario.strategy), "stats": optimizer.stats}
                results["reloaded"]["controller"] = optimizer.controller.state_dict()
                results["reloaded"]["outputs"] = probe_outputs(model, optimizer, boost)
                if scenario.strategy == "fsdp2" and "mid-collection" in scenario.name:  # rank 0's full copy, broadcast
                    model = wrap(make_net(scenario.late_from is not None), scenario.strategy, world)
                    optimizer = make_optimizer(model, scenario)
                    if boost:
                        optimizer.enable_boost(scenario.boost_cycle)
                    _broadcast_load(model, optimizer, full if rank == 0 else {"model": {}, "optim": {}})
                    loaded = [None] * world
                    torch.distributed.all_gather_object(loaded, optimizer.micro_batches)
                    results["broadcast_micro_batches"] = loaded
                    if len(set(loaded)) == 1:  # ranks that collected differently would wait for each other
                        train(scenario, model, optimizer, rank, world, world, start=save_at)
                        results["broadcast"] = {"params": full_parameters(model, scenario.strategy), "stats": optimizer.stats}
            model = wrap(make_net(scenario.late_from is not None), scenario.strategy, world)
            optimizer = make_optimizer(model, scenario)
            if boost:
                optimizer.enable_boost(scenario.boost_cycle)
            _reload(model, optimizer, checkpoint)
            results["loaded_micro_batches"] = optimizer.micro_batches
            train(scenario, model, optimizer, rank, world, world, start=save_at)
            results["resumed"] = {"params": full_parameters(model, scenario.strategy), "stats": optimizer.stats}
            results["resumed"]["controller"] = optimizer.controller.state_dict()
            results["resumed"]["outputs"] = probe_outputs(model, optimizer, boost)
            if rank == 0 and phase == "resume":
                full = torch.load(checkpoint.with_suffix(".full.pt"), weights_only=False)
                results["single"] = resumed_twin(lambda m, o: _dcp_load(m, o, full))
                results["single_dcp"] = resumed_twin(from_dcp)
            torch.save(results, Path(out) / f"{scenario.name}-{phase}{rank}.pt")

    scenario, save_at, checkpoint, boost = None, 0, None, False
    as_gloo_rank(rank, world, store, body)


class Routed(torch.nn.Module):
    """One expert per rank; each rank's samples go to its own expert (data-dependent routing)."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(FEATURES, CLASSES) for _ in range(experts))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return self.experts[expert](x)


def routed_grads(rank: int, world: int) -> dict[str, torch.Tensor | None]:
    """The gradients one micro-batch leaves on ``rank`` (its slice of the global batch, through its expert)."""
    model = Routed(world).double()
    x, y = global_batch(0, world)
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    torch.nn.functional.cross_entropy(model(x[part], rank), y[part]).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def run_routed_sync(rank: int, world: int, store: str, out: str, strategies: list[str]) -> None:
    """For each of ``strategies`` (DDP or FSDP2), collecting under grad_sync with each rank's batch routed to its
    own expert, then sync_pending_grads; one spawn for all of them."""

    def body() -> None:
        for strategy in strategies:
            if strategy == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(Routed(world).double(), find_unused_parameters=True)
            else:
                from torch.distributed.fsdp import fully_shard

                model = fully_shard(Routed(world).double())
            optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, batch_multiplier=2, preconditioner=None)
            x, y = global_batch(0, world)
            part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            with grad_sync(model, optimizer):
                loss = torch.nn.functional.cross_entropy(model(x[part], rank), y[part])
                loss.backward()
            optimizer.step(loss)
            optimizer.sync_pending_grads()
            full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
            grads = {name.replace("module.", "", 1): full(p.grad) for name, p in model.named_parameters()}
            collected = [float(entry["collected"]) for entry in optimizer.state_dict()["state"].values()]
            torch.save({"grads": grads, "collected": collected}, Path(out) / f"routed-{strategy}{rank}.pt")

    as_gloo_rank(rank, world, store, body)


def zero_fit(optimizer_for, steps: int = 20) -> torch.Tensor:
    """A noise-free P2M fit of a small tanh MLP, the same on every rank; the parameters at the end.

    ``optimizer_for(model)`` returns the loop's ``(zero_grad, step)``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    zero_grad, step = optimizer_for(model)
    for _ in range(steps):
        zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        step(loss)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def one_replica(p: torch.Tensor) -> int:
    """``replicas=`` under ZeRO: each rank's partition is on that rank alone (module level: ZeRO's
    ``consolidate_state_dict`` pickles the options of the optimizers it holds, which a lambda fails)."""
    return 1


def zero_redundancy(model, batch_multiplier: int = 1, guarded: bool = True, preconditioner: str | None = None):
    """ELRA under torch's ZeroRedundancyOptimizer over DDP; the loop's ``(zero_grad, step)``: ZeRO's
    ``zero_grad`` is torch's (it clears every gradient), ``guarded``: called only when ELRA collected nothing."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(
        ddp.parameters(), optimizer_class=ElraOptimizer, lr=1e-5, classes=0, preconditioner=preconditioner,
        batch_multiplier=batch_multiplier, replicas=one_replica,
    )

    def zero_grad() -> None:
        if not (guarded and optimizer.optim.micro_batches):
            optimizer.zero_grad()

    return zero_grad, lambda loss: optimizer.step(loss=loss)


def run_zero(rank: int, world: int, store: str, out: str) -> None:
    """ELRA under torch's ZeroRedundancyOptimizer: each rank holds its partition of the parameters alone."""

    def body() -> None:
        for multiplier in (1, 2):
            fit = zero_fit(lambda model: zero_redundancy(model, multiplier))
            torch.save(fit, Path(out) / f"zero{multiplier}-{rank}.pt")
        # each rank factors the matrices of its partition alone: their column sums must stay out of the all-reduce
        fit = zero_fit(lambda model: zero_redundancy(model, preconditioner="factored"))
        torch.save(fit, Path(out) / f"zero-factored-{rank}.pt")
        torch.save(zero_checkpoints(), Path(out) / f"zero-checkpoints-{rank}.pt")

    as_gloo_rank(rank, world, store, body)


def zero_checkpoints(steps: int = 20, save_at: int = 9) -> dict:
    """ELRA under ZeRO (batch multiplier 2, ``"adam"``) saved after ``save_at`` micro-steps (one of two
    collected), then resumed from ZeRO's consolidated state (``zero.load_state_dict``) and from each rank's
    ELRA state (``zero.optim.load_state_dict``); the parameters of each run, or the error its first step raised."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def run(start: int, load=None) -> tuple[torch.Tensor | str, tuple | None]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        zero = ZeroRedundancyOptimizer(
            torch.nn.parallel.DistributedDataParallel(model).parameters(), optimizer_class=ElraOptimizer, lr=1e-5,
            classes=0, preconditioner="adam", batch_multiplier=2, replicas=one_replica,
        )
        if load is not None:
            load(model, zero)
        saved = None
        for step in range(start, steps):
            if step == save_at:
                zero.optim.sync_pending_grads()  # each rank collected its own micro-batch's loss
                zero.consolidate_state_dict(to=0)
                consolidated = [zero.state_dict() if dist.get_rank() == 0 else None]
                dist.broadcast_object_list(consolidated, src=0)
                saved = (copy.deepcopy(model.state_dict()), consolidated[0], copy.deepcopy(zero.optim.state_dict()))
            if not zero.optim.micro_batches:
                zero.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            try:
                zero.step(loss=loss)
            except RuntimeError as error:
                return str(error), saved
        return torch.cat([p.detach().flatten() for p in model.parameters()]), saved

    uninterrupted, (weights, consolidated, own) = run(0)
    through_zero, _ = run(save_at, lambda model, zero: (model.load_state_dict(weights), zero.load_state_dict(consolidated)))
    through_elra, _ = run(save_at, lambda model, zero: (model.load_state_dict(weights), zero.optim.load_state_dict(own)))
    return {"uninterrupted": uninterrupted, "through_zero": through_zero, "through_elra": through_elra}


def uneven_inputs(model, optimizer: ElraOptimizer, rank: int, world: int, sharded_world: int) -> None:
    """Micro-steps 0-9 with one fewer on the last rank, under torch's ``Join(throw_on_early_termination=True)``
    (every rank stops at the same micro-batch: 0-8), then micro-steps 10-15 on every rank; one process takes the
    global batches of 0-8 and 10-15."""
    from torch.distributed.algorithms.join import Join

    def micro_step(step: int) -> None:
        x, y = rank_batch(step, world, rank, sharded_world)
        optimizer.zero_grad()
        with grad_sync(model, optimizer) if sharded_world > 1 else nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step(loss.detach())

    if sharded_world == 1:
        steps = range(9)
    else:
        steps = range(9 if rank == world - 1 else 10)
    try:
        with Join([model], throw_on_early_termination=True) if sharded_world > 1 else nullcontext():
            for step in steps:
                micro_step(step)
    except RuntimeError as error:
        if "exhausted" not in str(error):
            raise
    for step in range(10, 16):
        micro_step(step)


def run_uneven(rank: int, world: int, store: str, out: str) -> None:
    """``uneven_inputs`` under DDP (batch multiplier 2, P2M)."""

    def body() -> None:
        net = make_net()
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-4, batch_multiplier=2, preconditioner=None)
        uneven_inputs(model, optimizer, rank, world, world)
        params = {name: p.detach().clone() for name, p in net.named_parameters()}
        torch.save({"params": params, "stats": optimizer.stats}, Path(out) / f"uneven{rank}.pt")

    as_gloo_rank(rank, world, store, body)


class ScaledHead(torch.nn.Module):
    """Two outputs and a one-element scale: on 3 ranks FSDP2 leaves the last rank empty shards of the head's
    weight rows, its bias and the scale."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, 2)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))) * self.scale


EMPTY_SHARD_DIRECTIONS = ("muon", "adam", None)


def empty_shard_fit(model, optimizer: ElraOptimizer, rank: int, world: int, sharded_world: int) -> None:
    """Ten real steps on the global batches of ``world`` ranks (this rank's slice when sharded), two classes."""
    for step in range(10):
        x, y = rank_batch(step, world, rank, sharded_world)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y % 2)
        loss.backward()
        optimizer.step(loss.detach())


def run_empty_shards(rank: int, world: int, store: str, out: str) -> None:
    """``empty_shard_fit`` under FSDP2 (per layer and root) for each direction; saves the full parameters."""

    def body() -> None:
        from torch.distributed.fsdp import fully_shard

        results = {}
        for preconditioner in EMPTY_SHARD_DIRECTIONS:
            torch.manual_seed(0)
            model = ScaledHead().double()
            fully_shard(model.hidden)
            fully_shard(model.out)
            fully_shard(model)
            optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, lr=1e-3, preconditioner=preconditioner)
            empty_shard_fit(model, optimizer, rank, world, world)
            params = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
            results[preconditioner] = {"params": params, "stats": optimizer.stats}
        torch.save(results, Path(out) / f"empty{rank}.pt")

    as_gloo_rank(rank, world, store, body)


PARTIAL_WRAP_DIRECTIONS = (None, "adam", "muon")


def partial_wrap_fit(model, optimizer: ElraOptimizer, rank: int, world: int, sharded_world: int, synced: bool) -> None:
    """Ten real steps; ``synced``: the gradients of the parameters no FSDP unit holds are averaged over ranks."""
    for step in range(10):
        x, y = rank_batch(step, world, rank, sharded_world)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in model.out.parameters() if synced else ():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        optimizer.step(loss.detach())


def partial_wrap_fit_at_completion(model, optimizer: ElraOptimizer, rank: int, world: int, sync_mid: bool) -> list:
    """Seven micro-batches, two a real step; ``net.out``'s gradients averaged over ranks by this caller only on
    the micro-batch that completes one. With ``sync_mid``, ``sync_pending_grads()`` after the fifth (one
    collected), as before a checkpoint. Returns ``net.out``'s collected gradients after the fifth."""
    held = []
    for step in range(7):
        x, y = rank_batch(step, world, rank, world)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in model.out.parameters() if not optimizer.collecting else ():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        optimizer.step(loss.detach())
        if step == 4:
            if sync_mid:
                optimizer.sync_pending_grads()
            held = [p.grad.clone() for p in model.out.parameters()]
    return held


def run_partial_wrap(rank: int, world: int, store: str, out: str) -> None:
    """FSDP2 on ``net.hidden`` alone (the root, with ``net.out``, left plain) for each direction: what the first
    steps raise when nothing reduces ``net.out``'s gradients, and the full parameters after ten steps where this
    worker averages them itself."""

    def body() -> None:
        from torch.distributed.fsdp import fully_shard

        results = {}
        for preconditioner in PARTIAL_WRAP_DIRECTIONS:
            for synced in (False, True):
                model = make_net()
                fully_shard(model.hidden)
                optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-3, preconditioner=preconditioner)
                try:
                    partial_wrap_fit(model, optimizer, rank, world, world, synced)
                    outcome = "nothing raised"
                except RuntimeError as raised:
                    outcome = str(raised)
                params = full_parameters(model, "fsdp2")
                results[preconditioner, synced] = {"outcome": outcome, "params": params, "stats": optimizer.stats}
            for synced_mid_collection in (False, True):
                model = make_net()
                fully_shard(model.hidden)
                optimizer = ElraOptimizer(
                    model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-3, preconditioner=preconditioner, batch_multiplier=2
                )
                held = partial_wrap_fit_at_completion(model, optimizer, rank, world, synced_mid_collection)
                results[preconditioner, "mid", synced_mid_collection] = {"held": held, "params": full_parameters(model, "fsdp2")}
        torch.save(results, Path(out) / f"partial{rank}.pt")

    as_gloo_rank(rank, world, store, body)


class SequenceNet(torch.nn.Module):
    """A norm, a two-layer feed-forward block and a head over a sequence (batch, positions, features), float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(FEATURES)
        self.up = torch.nn.Linear(FEATURES, 2 * HIDDEN)
        self.down = torch.nn.Linear(2 * HIDDEN, FEATURES)
        self.head = torch.nn.Linear(FEATURES, CLASSES)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.norm(x))))).mean(1)


TENSOR_PARALLEL = ((None, 1), ("adam", 1), ("muon", 2))  # (direction, batch multiplier)
SEQUENCE = 6


def sequence_batch(step: int, ranks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``ranks`` times ``LOCAL_BATCH`` sequences and their labels, the same for a step wherever drawn."""
    gen = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(ranks * LOCAL_BATCH, SEQUENCE, FEATURES, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (ranks * LOCAL_BATCH,), generator=gen)


def sequence_fit(model, optimizer: ElraOptimizer, positions: slice = slice(None), steps: range | None = None) -> None:
    """Ten real steps (or the micro-steps ``steps`` of them) on batches of ``LOCAL_BATCH`` sequences, their
    ``positions`` only."""
    for step in range(10 * optimizer.stats["batch_multiplier"]) if steps is None else steps:
        x, y = sequence_batch(step)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[:, positions]), y)
        loss.backward()
        optimizer.step(loss.detach())


def run_tensor_parallel(rank: int, world: int, store: str, out: str) -> None:
    """``SequenceNet`` under tensor parallelism with sequence parallelism: the norm over this rank's positions
    (its weights' gradients partial sums), ``up`` column-wise, ``down`` row-wise; every rank sees the same
    sequences. Saves the full parameters for each direction; where the batch multiplier is 2, also of a run saved
    by DCP with one micro-batch collected (micro-step 11) and resumed into a fresh model and optimizer."""

    def body() -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        plan = {
            "norm": SequenceParallel(),
            "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Replicate()),
        }

        def built(preconditioner: str | None, multiplier: int):
            model = parallelize_module(SequenceNet(), mesh, plan)
            options = {"lr": 1e-3, "preconditioner": preconditioner, "batch_multiplier": multiplier}
            return model, ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, **options)

        results, positions = {}, slice(rank * (SEQUENCE // world), (rank + 1) * (SEQUENCE // world))
        for preconditioner, multiplier in TENSOR_PARALLEL:
            model, optimizer = built(preconditioner, multiplier)
            sequence_fit(model, optimizer, positions)
            results[preconditioner] = full_parameters(model, "tensor-parallel")
            if multiplier == 2:
                import torch.distributed.checkpoint as dcp

                model, optimizer = built(preconditioner, multiplier)
                sequence_fit(model, optimizer, positions, range(11))
                assert optimizer.micro_batches == 1  # saved with a micro-batch collected
                optimizer.sync_pending_grads()  # on more than one rank state_dict() wants the collected losses' means
                checkpoint = Path(out) / f"tensor-parallel-{preconditioner}"
                dcp.save(_dcp_state(model, optimizer), checkpoint_id=checkpoint)
                model, optimizer = built(preconditioner, multiplier)
                _reload(model, optimizer, checkpoint)
                sequence_fit(model, optimizer, positions, range(11, 20))
                results[preconditioner, "resumed"] = full_parameters(model, "tensor-parallel")
        torch.save(results, Path(out) / f"tensor-parallel{rank}.pt")

    as_gloo_rank(rank, world, store, body)


def mesh_replicas(p: torch.Tensor) -> int:
    """The README's ``replicas=`` for FSDP2 over tensor parallelism on a 2-D mesh: a parameter only FSDP2 shards
    lies on the data-parallel sub-mesh, and each rank of the other dimension holds a copy of its shard."""
    world = torch.distributed.get_world_size()
    if not hasattr(p, "device_mesh"):
        return world
    copies = world // p.device_mesh.size()
    for size, placement in zip(p.device_mesh.shape, p.placements):
        copies *= size if placement.is_replicate() else 1
    return copies


def sequence_batches(first: int, count: int) -> list:
    """Ten batches of ``count`` ranks' ``LOCAL_BATCH`` sequences, from the ``first``'s on (of 4 ranks' batches)."""
    part = slice(first * LOCAL_BATCH, (first + count) * LOCAL_BATCH)
    return [tuple(t[part] for t in sequence_batch(step, 4)) for step in range(10)]


def run_two_dimensional(rank: int, world: int, store: str, out: str) -> None:
    """``SequenceNet`` on a 2 x 2 mesh: tensor and sequence parallelism over ``tp``, FSDP2 over ``dp``; the two
    ``dp`` groups train on their own batches, this rank on its ``tp`` half of the positions. ELRA is given
    :func:`mesh_replicas`. Saves the full parameters for each direction."""

    def body() -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp, tp = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
        plan = {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)), "down": RowwiseParallel(output_layouts=Replicate())}
        results, part = {}, SEQUENCE // 2
        for preconditioner in LAYOUT_DIRECTIONS:
            model = fully_shard(parallelize_module(SequenceNet(), mesh["tp"], plan), mesh=mesh["dp"])
            optimizer = ElraOptimizer(
                model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-3, preconditioner=preconditioner, replicas=mesh_replicas
            )
            layout_fit(model, optimizer, [(x[:, tp * part : (tp + 1) * part], y) for x, y in sequence_batches(dp, 1)])
            results[preconditioner] = full_parameters(model, "fsdp2")
        torch.save(results, Path(out) / f"two-dimensional{rank}.pt")

    as_gloo_rank(rank, world, store, body)


LAYOUT_DIRECTIONS = (None, "adam", "muon")
LAYOUT_STEPS, LAYOUT_SAVE = 10, 5


def layout_fit(model, optimizer: ElraOptimizer, batches: list, start: int = 0) -> None:
    """Real steps on ``batches[start:]``, one (inputs, labels) pair each."""
    for x, y in batches[start:]:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step(loss.detach())


def layout_batches(first: int, count: int, world: int) -> list:
    """The slices of ranks ``first .. first+count-1`` of the global batches of ``world`` ranks, joined."""
    part = slice(first * LOCAL_BATCH, (first + count) * LOCAL_BATCH)
    return [tuple(t[part] for t in global_batch(step, world)) for step in range(LAYOUT_STEPS)]


def run_layouts(rank: int, world: int, store: str, out: str) -> None:
    """On 4 ranks, for each direction: two DDP jobs of two ranks each, ELRA given its job's group; then FSDP2 with
    a mesh per module (``hidden`` HSDP 2x2, ``out`` sharded over all 4, the root HSDP), trained to the end and,
    once more, saved by DCP half-way and resumed into a fresh model and optimizer. Saves the full parameters."""

    def body() -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        jobs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        job = jobs[rank // 2]
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        flat = init_device_mesh("cpu", (world,))

        def meshed():
            net = make_net()
            fully_shard(net.hidden, mesh=hsdp)
            fully_shard(net.out, mesh=flat)
            return fully_shard(net, mesh=hsdp)

        results, batches = {}, layout_batches(rank, 1, world)
        for preconditioner in LAYOUT_DIRECTIONS:
            net = make_net()
            model = torch.nn.parallel.DistributedDataParallel(net, process_group=job, find_unused_parameters=True)
            options = {"lr": 1e-3, "preconditioner": preconditioner}
            optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, process_group=job, **options)
            layout_fit(model, optimizer, batches)
            results["jobs", preconditioner] = {name: p.detach().clone() for name, p in net.named_parameters()}
            for resumed in (False, True):
                model = meshed()
                optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, **options)
                layout_fit(model, optimizer, batches[:LAYOUT_SAVE] if resumed else batches)
                if resumed:
                    checkpoint = Path(out) / f"layout-{preconditioner}"
                    dcp.save(_dcp_state(model, optimizer), checkpoint_id=checkpoint)
                    model = meshed()
                    optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, **options)
                    _reload(model, optimizer, checkpoint)
                    layout_fit(model, optimizer, batches, start=LAYOUT_SAVE)
                results["meshes", preconditioner, resumed] = full_parameters(model, "fsdp2")
        torch.save(results, Path(out) / f"layouts{rank}.pt")

    as_gloo_rank(rank, world, store, body)


OWN_NO_SYNC_SAVE, OWN_NO_SYNC_STEPS = 10, 20  # micro-step 10: one micro-batch of three collected


def own_no_sync_steps(
    model, optimizer: ElraOptimizer, rank: int, world: int, sharded_world: int, start: int, out: str = ""
) -> None:
    """Micro-steps ``start`` to OWN_NO_SYNC_STEPS, with DDP's own ``no_sync()`` (not grad_sync) while collecting;
    at OWN_NO_SYNC_SAVE ``sync_pending_grads()`` on every rank, and rank 0 saves a checkpoint into ``out``."""
    for step in range(start, OWN_NO_SYNC_STEPS):
        if step == OWN_NO_SYNC_SAVE and start < step:
            optimizer.sync_pending_grads()
            checkpoint = {"model": getattr(model, "module", model).state_dict(), "optim": optimizer.state_dict()}
            if rank == 0:
                torch.save(checkpoint, Path(out) / "own-no-sync-checkpoint.pt")
        x, y = rank_batch(step, world, rank, sharded_world)
        optimizer.zero_grad()
        with model.no_sync() if sharded_world > 1 and optimizer.collecting else nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step(loss.detach())


def run_own_no_sync(rank: int, world: int, store: str, out: str) -> None:
    """``own_no_sync_steps`` under DDP (batch multiplier 3, adam); rank 0 saves the checkpoint."""

    def body() -> None:
        net = make_net()
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-4, batch_multiplier=3, preconditioner="adam")
        own_no_sync_steps(model, optimizer, rank, world, world, 0, out)
        params = {name: p.detach().clone() for name, p in net.named_parameters()}
        torch.save({"params": params, "stats": optimizer.stats}, Path(out) / f"own-no-sync{rank}.pt")

    as_gloo_rank(rank, world, store, body)


def run_unsynced_real_step(rank: int, world: int, store: str, out: str) -> None:
    """DDP with every micro-batch under the model's own ``no_sync()``, the one completing a real step too, for
    P2M, adam and muon; then DDP with a layer unfrozen after it was built; then HSDP with the replicas' all-reduce
    off throughout: each rank writes what its first
    real step raised (HSDP: whether anything moved, and whether ``step_retrace`` dropped FSDP's held sums); then
    FSDP1 under ``no_sync()`` throughout with an optimizer that does not know the model."""

    def body() -> None:
        for preconditioner in (None, "adam", "muon"):
            net = make_net()
            model = torch.nn.parallel.DistributedDataParallel(net)
            optimizer = ElraOptimizer(
                model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-4, batch_multiplier=2,
                preconditioner=preconditioner,
            )
            error = "nothing raised"
            try:
                for step in range(6):
                    x, y = global_batch(step, world)
                    x, y = x[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
                    optimizer.zero_grad()
                    with model.no_sync():
                        loss = torch.nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                    optimizer.step(loss.detach())
            except RuntimeError as raised:
                error = f"step {step}: {raised}"
            (Path(out) / f"unsynced-{preconditioner}-{rank}.txt").write_text(error)
        net = make_net()  # a layer unfrozen after DDP was built: DDP never reduces its gradients
        net.out.requires_grad_(False)
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        net.out.requires_grad_(True)
        optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-4, preconditioner="adam")
        x, y = rank_batch(0, world, rank, world)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        try:
            optimizer.step(1.0)
            error = "nothing raised"
        except RuntimeError as raised:
            error = str(raised)
        (Path(out) / f"unsynced-unfrozen-{rank}.txt").write_text(error)
        model = wrap(make_net(), "hsdp", world)  # replicated over both ranks, one shard each
        model.set_requires_all_reduce(False)  # reduce-scatter on, the replicas' all-reduce off: FSDP holds sums
        optimizer = ElraOptimizer(model.parameters(), model, LOCAL_BATCH, CLASSES, lr=1e-4, batch_multiplier=2)
        before = [p.full_tensor().clone() for p in model.parameters()]
        error = "nothing raised"
        for step in range(2):
            x, y = global_batch(step, world)
            loss = torch.nn.functional.cross_entropy(model(x[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]), y[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH])
            loss.backward()
            try:
                optimizer.step(loss.detach())
            except RuntimeError as raised:
                error = f"step {step}: {raised}"
        moved = any(not torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before))
        optimizer.step_retrace(loss.detach())
        held = any(
            group._partial_reduce_output is not None
            for unit in model.modules() if hasattr(unit, "_get_fsdp_state")
            for group in unit._get_fsdp_state()._fsdp_param_groups
        )
        (Path(out) / f"unsynced-hsdp-{rank}.txt").write_text(f"{error}\nmoved {moved}, held after step_retrace {held}")
        # an optimizer that does not know the model, no_sync() throughout: P2M's sums and adam's
        for strategy, preconditioner in (("fsdp1", None), ("fsdp1-orig", "adam")):
            model = wrap(make_net(), strategy, world)
            optimizer = ElraOptimizer(
                model.parameters(), None, LOCAL_BATCH, CLASSES, lr=1e-4, batch_multiplier=2, preconditioner=preconditioner
            )
            error = "nothing raised"
            for step in range(2):
                x, y = global_batch(step, world)
                own = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
                with model.no_sync():
                    loss = torch.nn.functional.cross_entropy(model(x[own]), y[own])
                    loss.backward()
                try:
                    optimizer.step(loss.detach())
                except RuntimeError as raised:
                    error = f"step {step}: {raised}"
            (Path(out) / f"unsynced-{strategy}-{rank}.txt").write_text(error)

    as_gloo_rank(rank, world, store, body)


def run_divided_sync(rank: int, world: int, store: str, out: str) -> None:
    """FSDP2 with ``set_gradient_divide_factor`` (none, 0.5, the world size): each rank writes, per factor, the
    largest gap between the gradients ELRA's reduction leaves after two backward passes with sync off and those
    FSDP2's own reduction leaves with sync on."""

    def body() -> None:
        from torch.distributed.fsdp import fully_shard

        from elra.sync import sync_unsynced_grads

        def gradients(sync: bool, factor: float | None) -> list[torch.Tensor]:
            model = fully_shard(make_net())
            model.set_requires_gradient_sync(sync)
            if factor is not None:
                model.set_gradient_divide_factor(factor)
            for step in range(2):
                x, y = global_batch(step, world)
                own = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
                torch.nn.functional.cross_entropy(model(x[own]), y[own]).backward()
            if not sync:
                sync_unsynced_grads(model)
            return [p.grad.to_local() for p in model.parameters() if p.grad is not None]

        gaps = {}
        for factor in (None, 0.5, float(world)):
            held, reduced = gradients(False, factor), gradients(True, factor)
            assert len(held) == len(reduced) > 0
            gaps[factor] = max((a - b).abs().max().item() for a, b in zip(held, reduced))
        torch.save(gaps, Path(out) / f"divided-{rank}.pt")

    as_gloo_rank(rank, world, store, body)


class TwoHeads(torch.nn.Module):
    """Two classifiers of the same input, each trained by an optimizer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = make_net(), make_net()


def two_heads_steps(model: TwoHeads, a, b, rank: int, world: int, sharded_world: int, steps: int = 10, nan_at: int = 3) -> None:
    """``a`` over head a steps every micro-batch, ``b`` over head b (an ELRA collecting two, or AdamW) too, on
    ``rank_batch``; at micro-step ``nan_at`` a's loss is nan: a skips its backward and retraces, and b's collected
    sums must stay."""
    for step in range(steps):
        x, y = rank_batch(step, world, rank, sharded_world)
        a.zero_grad()
        b.zero_grad()
        loss_a = torch.nn.functional.cross_entropy(model.a(x), y) * (math.nan if step == nan_at else 1.0)
        loss_b = torch.nn.functional.cross_entropy(model.b(x), y)
        loss_b.backward()
        if a.skip_backward(loss_a):
            a.step_retrace(loss_a)
        else:
            loss_a.backward()
            a.step(loss_a)
        b.step(loss_b)


def two_heads_optimizers(model: TwoHeads, known) -> tuple[ElraOptimizer, ElraOptimizer]:
    """ELRA over head a (one micro-batch a real step) and over head b (two), both told ``known`` as the model."""
    a = ElraOptimizer(model.a.parameters(), known, LOCAL_BATCH, CLASSES, lr=1e-4, preconditioner="adam")
    b = ElraOptimizer(model.b.parameters(), known, LOCAL_BATCH, CLASSES, lr=1e-4, batch_multiplier=2, preconditioner="adam")
    return a, b


def run_two_heads(rank: int, world: int, store: str, out: str) -> None:
    """``two_heads_steps`` under FSDP2 (every linear layer and the root wrapped), both optimizers given the model."""

    def body() -> None:
        from torch.distributed.fsdp import fully_shard

        model = TwoHeads()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                fully_shard(module)
        fully_shard(model)
        a, b = two_heads_optimizers(model, model)
        two_heads_steps(model, a, b, rank, world, world)
        params = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        torch.save(params, Path(out) / f"two-heads-{rank}.pt")

    as_gloo_rank(rank, world, store, body)
