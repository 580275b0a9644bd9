"""Gradient synchronisation off while ELRA only collects micro-batch gradients.

While the optimizer is collecting, each rank may keep its micro-batch
gradients to itself; only the backward pass of the micro-batch that completes
a real step needs the gradient reduction. Results are the same either way
(the reduction is linear); skipping it saves the communication.

Tensor parallelism leaves some gradients as partial sums over ranks (DTensors
placed ``Partial``); they are summed before a real step and before a
checkpoint saves them (:func:`reduce_partial_grads`, :func:`summed_partial`).
"""

from __future__ import annotations

import logging
import math
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
import torch.distributed as dist

from .chunks import runs

logger = logging.getLogger("elra")

if TYPE_CHECKING:
    from .optimizer import ElraOptimizer


@contextmanager
def grad_sync(model: torch.nn.Module, optimizer: "ElraOptimizer") -> Iterator[None]:
    """Wrap a micro-batch's forward AND backward: gradient sync off while collecting, on for a real step.

    Handles DDP and FSDP1 (``no_sync()``) and FSDP2 (``set_requires_gradient_sync``);
    any other model is left alone. DDP decides in the forward whether the
    backward will all-reduce, so the forward must run inside: a DDP backward
    collected here after a forward outside raises (it was all-reduced anyway).
    It also tells the optimizer the model (see ``ElraOptimizer``'s ``model``).
    """
    from .optimizer import ElraOptimizer

    if not isinstance(model, torch.nn.Module) or not isinstance(optimizer, ElraOptimizer):  # not at the next step
        raise TypeError(
            f"grad_sync(model, optimizer) takes the model and the ElraOptimizer, got {type(model).__name__} and "
            f"{type(optimizer).__name__}"
        )
    sync = not optimizer.collecting
    wrapper = hasattr(model, "set_requires_gradient_sync") or hasattr(model, "no_sync")
    if wrapper:
        _warn_if_partial(model, optimizer)
    tell_optimizer(model, optimizer, unsynced=wrapper and not sync)
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        yield
    elif hasattr(model, "no_sync") and not sync:
        with model.no_sync():
            yield
        if getattr(model, "require_forward_param_sync", False):
            raise RuntimeError(
                "grad_sync saved nothing: DDP's forward ran outside it with gradient sync on, so the backward "
                "all-reduced anyway. Put the forward inside too: `with grad_sync(model, optimizer): "
                "loss = loss_fn(model(x), y); loss.backward()`"
            )
    else:
        yield


_CHECKED_MODELS: "weakref.WeakKeyDictionary[ElraOptimizer, set[int]]" = weakref.WeakKeyDictionary()


def _warn_if_partial(model: torch.nn.Module, optimizer: "ElraOptimizer") -> None:
    """Warn (once per model and optimizer, unless it was told the layout with ``replicas=``) where ``model`` trains
    parameters ``optimizer`` does not hold: grad_sync turns the whole model's gradient reduction off while this
    optimizer collects, so another optimizer stepping those parameters meanwhile steps along this rank's own
    gradients (DDP's replicas drift apart, FSDP2's shards miss the micro-batches)."""
    if optimizer.reducer.layout_told:  # ZeRO: the other partitions' ELRAs collect alike
        return
    checked = _CHECKED_MODELS.setdefault(optimizer, set())
    if id(model) in checked:
        return
    checked.add(id(model))
    own = {id(p) for p in optimizer._params()}
    others = sum(1 for p in model.parameters() if p.requires_grad and id(p) not in own)
    if others:
        logger.warning(
            "grad_sync(model, optimizer): the model trains %d parameters this ELRA does not hold, and their "
            "gradients are not reduced while it collects micro-batches either: step another optimizer over them "
            "only on the micro-batch that completes ELRA's real step (when optimizer.collecting was False before "
            "its step), or leave grad_sync out (README: ELRA beside other optimizers)",
            others,
        )


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile``'s wrapper holds (``model`` itself if it is none, or if the wrapper is itself
    the DDP or FSDP module): the one whose type the optimizer reads for the gradient sync, the sums, the replicas
    and the resharding. ``fully_shard(torch.compile(net))`` makes the wrapper the FSDP module: unwrapped, the
    optimizer saw no FSDP unit, and a checkpoint taken mid-collection lost the sums FSDP2 held."""
    inner = getattr(model, "_orig_mod", None)
    if inner is None or _wraps_gradients(model):
        return model
    return inner


def _wraps_gradients(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a DDP, FSDP1 or FSDP2 module (one that reduces its gradients)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return True
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def tell_optimizer(model: torch.nn.Module, optimizer: "ElraOptimizer", unsynced: bool) -> None:
    """The optimizer learns ``model`` (once; :func:`uncompiled`), and with ``unsynced`` that the model's wrapper
    holds this rank's partial sums, collected with gradient sync off (a checkpoint must average them first)."""
    model = uncompiled(model)
    if not any(known is model for known in optimizer.models):
        optimizer.models.append(model)
    if unsynced:
        optimizer.unsynced_models.add(model)


def drop_unsynced_grads(model: torch.nn.Module, params: Iterable[torch.Tensor]) -> None:
    """Free the sums of ``params``' gradients that a wrapper of ``model`` keeps apart from ``.grad`` with sync off,
    once ELRA discarded them (the caller sets the ``.grad`` of ``params``).

    When a real step is abandoned mid-collection (``step_retrace`` on a skipped
    backward), DDP's local sums sit in ``.grad``, but FSDP keeps unsharded sums
    of its own that the next synchronised backward would add to fresh
    gradients: FSDP2's unsharded parameters and HSDP's sums held back from the
    replicas' all-reduce, FSDP1's flat parameters. Those of other optimizers
    over the same model stay (their collected micro-batches were lost before),
    except in a unit that holds both, where the held sums are one buffer (an
    FSDP1 flat parameter, HSDP's held-back sums of an FSDP2 group).
    """
    own = {id(p) for p in params}
    groups, fsdp_params, _ = _gradient_units(model)
    for group in groups:
        if getattr(group, "_partial_reduce_output", None) is not None and any(
            id(fsdp_param.sharded_param) in own for fsdp_param in group.fsdp_params
        ):
            group._partial_reduce_output = None
    for fsdp_param in fsdp_params:
        if id(fsdp_param.sharded_param) not in own:
            continue
        fsdp_param.unsharded_accumulated_grad = None
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None:
            unsharded.grad = None
    for module in model.modules():
        flat_param = getattr(getattr(module, "_handle", None), "flat_param", None)
        if flat_param is not None and (
            id(flat_param) in own or any(id(p) in own for p in getattr(flat_param, "_params", None) or ())
        ):
            flat_param.grad = None


def holds_unsynced_grads(model: torch.nn.Module) -> bool:
    """Whether an FSDP unit of ``model`` holds gradient sums its backward did not reduce: gradient sync
    turned off by the caller (FSDP2's ``set_requires_gradient_sync(False)``, FSDP1's ``no_sync()``) rather
    than by :func:`grad_sync`, or HSDP's all-reduce over the replicas alone (``set_requires_all_reduce(False)``).
    FSDP1's sharded strategies leave an unsharded flat gradient then (NO_SHARD leaves no trace: its gradients
    are whole either way). Asked at every real step, so the units are found once per model."""
    groups, fsdp_params, handles = _gradient_units(model)
    if any(getattr(group, "_partial_reduce_output", None) is not None for group in groups):
        return True
    for fsdp_param in fsdp_params:
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if fsdp_param.unsharded_accumulated_grad is not None or getattr(unsharded, "grad", None) is not None:
            return True
    return any(_unsharded_flat_grad(handle) is not None for handle in handles)


def summed_partial(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with the partial sums it holds (a DTensor's ``Partial`` placements) summed over their mesh
    dimensions into ``param``'s placements there: one collective; ``grad`` itself where it holds none."""
    placements = getattr(grad, "placements", None)
    if placements is None or not any(placement.is_partial() for placement in placements):
        return grad
    target = [own if placement.is_partial() else placement for placement, own in zip(placements, param.placements)]
    return grad.redistribute(grad.device_mesh, target)


def reduce_partial_grads(params: Iterable[torch.Tensor]) -> None:
    """Gradients that are DTensors of partial sums (under tensor parallelism, a replicated parameter used on
    sharded activations, such as a norm under ``SequenceParallel``) become the sums (:func:`summed_partial`). Each
    rank's local part is only its share: ELRA's sums would read it as the gradient and each rank would step along
    its own (torch's optimizers reduce them implicitly, when an op meets the parameter)."""
    for p in params:
        if p.grad is not None:
            summed = summed_partial(p.grad, p)
            if summed is not p.grad:
                p.grad = summed


def holds_gathered_weights(model: torch.nn.Module) -> bool:
    """Whether an FSDP unit of ``model`` keeps its weights gathered outside a forward and backward: an FSDP2 unit
    after a backward under ``set_reshard_after_backward(False)``, a root (FSDP2 holding parameters, FSDP1) after a
    forward without backward (an evaluation). The next forward would use those copies, not the shards a step
    changed. Asked after every real step (no walk over the modules, see :func:`_gradient_units`)."""
    groups, _, handles = _gradient_units(model)
    return any(not group.is_sharded for group in groups) or any(not handle.needs_unshard() for handle in handles)


_UNITS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _gradient_units(model: torch.nn.Module) -> tuple[list, list, list]:
    """``model``'s FSDP2 parameter groups and their ``FSDPParam``s, and its sharded FSDP1 units' handles: where a
    wrapper keeps unreduced sums and gathered weights. A walk over the modules, remembered while the model's first
    parameter is the same object (``fully_shard`` wraps a module in place and registers new parameters)."""
    first = next(model.parameters(), None)
    cached = _UNITS.get(model)
    if cached is not None and cached[0] is first:
        return cached[1]
    handles = []
    if dist.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        handles = [
            module._handle
            for module in model.modules()
            if isinstance(module, FullyShardedDataParallel)
            and module._handle is not None
            and module._handle.uses_sharded_strategy
        ]
    groups = list(_fsdp2_groups(model))
    units = (groups, [fsdp_param for group in groups for fsdp_param in group.fsdp_params], handles)
    _UNITS[model] = (first, units)
    return units


SYNC_BUCKET = 1 << 22  # elements per all-reduce of :func:`_sync_ddp` (16 MB of float32): no flat copy of all gradients


def _sync_ddp(model: torch.nn.parallel.DistributedDataParallel) -> None:
    """DDP's ``.grad`` averaged over ranks, every parameter's: ranks may differ in which parameters got a
    gradient (data-dependent routing), so one small all-reduce first counts, per parameter, the ranks that
    have one (none: ``.grad`` stays ``None``; some: a zero gradient stands in on the others). Then the
    gradients are all-reduced in place, in buckets of one dtype and at most SYNC_BUCKET elements (a larger
    tensor alone), in the same order on every rank."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    group = model.process_group
    counts = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(counts, group=group)
    grads_by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, count in zip(params, counts.tolist()):
        if count:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads_by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    world = dist.get_world_size(group)
    for grads in grads_by_dtype.values():
        for (bucket,) in runs([grads], budget=SYNC_BUCKET):
            single = len(bucket) == 1 and bucket[0].is_contiguous()
            flat = bucket[0] if single else torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=group)
            flat /= world
            if not single:
                torch._foreach_copy_(bucket, [part.view(g.shape) for part, g in zip(flat.split([g.numel() for g in bucket]), bucket)])


def _fsdp2_groups(model: torch.nn.Module) -> Iterator:
    """The parameter groups of ``model``'s FSDP2 units (torch internals: what HSDP's held-back sums hang on)."""
    for module in model.modules():
        fsdp2_state = getattr(module, "_get_fsdp_state", None)
        if fsdp2_state is not None:
            yield from fsdp2_state()._fsdp_param_groups  # a unit over several modules has one each


@torch.no_grad()
def sync_unsynced_grads(model: torch.nn.Module) -> None:
    """Average over ranks the gradients ``model``'s wrapper collected with sync off (a collective).

    Leaves them where a synchronised backward would: DDP's ``.grad`` (bucketed
    all-reduces in place, see :func:`_sync_ddp`), FSDP2's sharded ``.grad`` (each
    unsharded sum all-reduced over the mesh and divided as the unit's backward
    divides, by ``set_gradient_divide_factor``'s factor where set, then this rank's shard kept; the
    next synchronised backward adds its reduce-scatter to it), FSDP1's sharded
    flat ``.grad`` (the same, for the flat parameter; FSDP1 adds the next
    reduce-scatter to a sharded ``.grad`` too).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        _sync_ddp(model)
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import distribute_tensor

    if any(getattr(group, "_partial_reduce_output", None) is not None for group in _gradient_units(model)[0]):
        raise RuntimeError(
            "the model's HSDP units hold sums reduce-scattered within the shards but not all-reduced over the "
            "replicas (set_requires_all_reduce(False)): FSDP adds them inside its next synchronised backward, and "
            "ELRA cannot average them outside it (for a real step, or for a checkpoint mid-collection). Nothing "
            "moved. Keep the all-reduce on for the micro-batch that completes a real step, or turn the whole sync "
            "off while collecting instead: `with elra.grad_sync(model, optimizer):` around forward and backward, "
            "or model.set_requires_gradient_sync(not optimizer.collecting)"
        )
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            _sync_fsdp1(module)
            continue
        if not isinstance(module, FSDPModule):
            continue
        groups = module._get_fsdp_state()._fsdp_param_groups
        fsdp_params = [fsdp_param for group in groups for fsdp_param in group.fsdp_params]
        # a unit's own divisor (set_gradient_divide_factor) where set, as its backward divides: else the mean
        divisors = [getattr(group, "gradient_divide_factor", None) for group in groups for _ in group.fsdp_params]
        for fsdp_param, full, divisor in zip(fsdp_params, _unsharded_sums(fsdp_params), divisors):
            unsharded = getattr(fsdp_param, "_unsharded_param", None)  # none before the first forward
            if full is None:
                continue
            param = fsdp_param.sharded_param
            mesh = param.device_mesh
            full = full.to(param.dtype)
            for dim in range(mesh.ndim):
                dist.all_reduce(full, group=mesh.get_group(dim))
            full /= mesh.size() if divisor is None else divisor
            shard = distribute_tensor(full, mesh, param.placements, src_data_rank=None)
            if param.grad is None:
                param.grad = shard
            else:
                param.grad.to_local().add_(shard.to_local())
            fsdp_param.unsharded_accumulated_grad = None
            if unsharded is not None:
                unsharded.grad = None


def _unsharded_sums(fsdp_params: list) -> list[torch.Tensor | None]:
    """Each FSDP2 parameter's unsharded gradient sum on this rank: zeros where another rank has one and this
    rank none (data-dependent routing), ``None`` where no rank has one. Every rank then reduces the same
    parameters in the same order; one small all-reduce of the counts decides."""
    if not fsdp_params:
        return []
    sums = []
    for fsdp_param in fsdp_params:
        full = fsdp_param.unsharded_accumulated_grad
        sums.append(getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None) if full is None else full)
    mesh = fsdp_params[0].sharded_param.device_mesh
    device = fsdp_params[0].sharded_param.to_local().device
    counts = torch.tensor([float(full is not None) for full in sums], dtype=torch.float64, device=device)
    for dim in range(mesh.ndim):
        dist.all_reduce(counts, group=mesh.get_group(dim))
    return [
        None if not count else full if full is not None else torch.zeros(p.sharded_param.shape, device=device)
        for p, full, count in zip(fsdp_params, sums, counts.tolist())
    ]


def _sync_fsdp1(module: torch.nn.Module) -> None:
    """FSDP1: average the unsharded flat gradient of ``no_sync`` over ranks, keep this rank's shard."""
    handle = module._handle
    full = _unsharded_flat_grad(handle)
    if full is None:
        return  # nothing collected unsharded
    flat = handle.flat_param
    # under MixedPrecision the unsharded sums are in param_dtype: reduced and kept in the flat parameter's dtype,
    # as FSDP1's own reduce-scatter leaves them (assigning them as they are raised torch's grad dtype error)
    full = full.to(flat.dtype)
    groups = [module.process_group] + [g for g in [getattr(module, "_inter_node_pg", None)] if g is not None]
    for group in groups:
        dist.all_reduce(full, group=group)
    full /= math.prod(dist.get_world_size(g) for g in groups)
    if handle.uses_sharded_strategy:
        shard, _ = type(handle)._get_shard(full, handle.rank, handle.world_size)
        saved = getattr(flat, "_saved_grad_shard", None)  # a sharded sum from before the unsynced backwards
        if saved is not None:
            shard += saved
            del flat._saved_grad_shard
        flat.grad = shard
    elif full is not flat.grad:
        flat.grad = full
    if handle._use_orig_params:
        handle._use_sharded_grad_views()


def _unsharded_flat_grad(handle) -> torch.Tensor | None:
    """The unsharded gradient of an FSDP1 unit's flat parameter (what its backward leaves under ``no_sync``)."""
    flat = getattr(handle, "flat_param", None)
    if flat is None or flat.grad is None or flat.grad.size() != flat._unpadded_unsharded_size:
        return None
    return flat.grad


def fsdp1_shards(models: Iterable[torch.nn.Module]) -> dict[torch.Tensor, int]:
    """For the parameters of the FSDP1 units in ``models`` (flat parameters and, with ``use_orig_params``,
    the views the optimizer holds): in how many distinct shards the data-parallel ranks hold them.

    FULL_SHARD and SHARD_GRAD_OP shard over the unit's process group; HYBRID_SHARD over its shard group (the
    copies repeat across the replicate group); NO_SHARD keeps one whole copy on every rank.
    """
    if not dist.is_available():
        return {}
    from torch.distributed.fsdp import FullyShardedDataParallel

    shards: dict[torch.Tensor, int] = {}
    for model in models:
        for name, module in model.named_modules():
            handle = getattr(module, "_handle", None) if isinstance(module, FullyShardedDataParallel) else None
            if handle is None:
                continue
            count = module.process_group.size() if handle.uses_sharded_strategy else 1
            flat = handle.flat_param
            ambiguous = flat._unpadded_unsharded_size == getattr(flat, "_sharded_size", None)
            if count > 1 and flat.requires_grad and ambiguous:
                unit = name.replace("_fsdp_wrapped_module.", "") or "at the root"
                raise ValueError(
                    f"the FullyShardedDataParallel unit {unit} shards a flat parameter of one element over {count} "
                    "ranks (and no alignment padding): FSDP1 tells a reduced gradient shard from an unreduced sum "
                    "by its size, alike here, so it adds micro-batches wrongly (torch's own optimizers too) and "
                    "ELRA would reduce the gradient twice. Wrap that parameter's module with its parent, give its "
                    "unit sharding_strategy=NO_SHARD, or use FSDP2 (fully_shard)"
                )
            for p in (flat, *(flat._params or ()), *(flat._shared_params or ())):
                shards[p] = count
    return shards


def wrapper_groups(models: Iterable[torch.nn.Module]) -> Iterator[tuple[str, int]]:
    """The data-parallel group size of each DDP model and FSDP1 unit in ``models``, with its name.

    Their parameters are replicas or shards over that group (FSDP1's
    HYBRID_SHARD: its shard group times its replicate group), not over
    whatever group ELRA sums over.
    """
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    for model in models:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            yield "DistributedDataParallel", model.process_group.size()
            continue
        for module in model.modules():
            if isinstance(module, FullyShardedDataParallel):
                replicate = getattr(module, "_inter_node_pg", None)
                handle = getattr(module, "_handle", None)
                one_rank_shards = handle is not None and not handle.uses_sharded_strategy
                if replicate is not None and replicate.size() > 1 and one_rank_shards:
                    raise ValueError(
                        "FullyShardedDataParallel's HYBRID_SHARD over a shard group of one rank runs as NO_SHARD "
                        f"and never reduces the gradients over its {replicate.size()} replicas (torch's FSDP1): "
                        "use a shard group of several ranks, FULL_SHARD or NO_SHARD over all ranks, DDP, or FSDP2"
                    )
                groups = [module.process_group] + [g for g in [replicate] if g is not None]
                yield "FullyShardedDataParallel", math.prod(g.size() for g in groups)


def reshard(models: Iterable[torch.nn.Module]) -> int:
    """Free the weights FSDP keeps gathered after a forward; returns the FSDP modules found.

    FSDP2's root (``fully_shard(model)`` holding parameters) and FSDP1's root
    keep their gathered weights from a forward until the backward, and a
    forward without backward (evaluation, a skipped backward) leaves them
    there. An in-place change of the shards (a retrace without backward, the
    boost swap) would not reach them: resharding makes the next forward
    gather the current shards. No communication.
    """
    if not dist.is_available():
        return 0
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    found = 0
    for model in models:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
                found += 1
            elif isinstance(module, FullyShardedDataParallel):
                found += 1
                handle = module._handle
                if handle is not None and handle.uses_sharded_strategy and not handle.needs_unshard():
                    from torch.distributed.fsdp._runtime_utils import _reshard

                    _reshard(module, handle, free_unsharded_flat_param=True)
    return found


def fsdp_wrapping(params: Iterable[torch.Tensor]) -> str | None:
    """The FSDP flavour that manages ``params`` (None: no FSDP), for error messages."""
    for p in params:
        if getattr(p, "_fsdp_flattened", False):
            return "FSDP1 (FullyShardedDataParallel)"
        if hasattr(p, "device_mesh") and hasattr(p, "placements"):
            return "FSDP2 (fully_shard)"
    return None
