"""Global scalars: the inner products and losses of one real step, in one vector.

Each real step needs a few inner products per parameter group (``|g|^2``,
``<g, B>`` ...) and the losses of its micro-batches. Every rank computes them
tensor by tensor on what it holds locally (DTensor shards via ``to_local()``,
FSDP1 flat shards, DDP replicas), weights each tensor by 1/(number of ranks
holding an identical copy), and ONE ``all_reduce(SUM)`` of a small float64
vector over the data-parallel group makes the global values. A single process
issues no collective. The vector then reaches the host with one transfer.

A step may also need a few per-element sums over ranks (the column sums of a
factored second moment, :mod:`elra.factored`): they ride in the same vector as
weighted vector blocks (:meth:`ScalarBatch.add_vector`) and stay on the device.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from .chunks import stacked
from .sync import fsdp1_shards, wrapper_groups

_LOW_PRECISION = (torch.float16, torch.bfloat16)
AUTO = "auto"


class Limits(NamedTuple):
    """Sizes (in elements) that choose how a device computes many inner products (see :class:`Products`).

    ``stacked``: up to this size a tensor's products come from a copy
    stacked with others. ``batch``: elements per vector in one stacked copy
    (bounds the temporary memory). ``gram``: a stack gives all its products
    in one matrix product, else in a ``torch.dot`` each. ``piece``: a larger
    tensor's products are the float64 sums of the ``torch.dot`` of pieces of
    this many elements (``None``: one ``torch.dot`` per product).
    """

    stacked: int
    batch: int
    gram: bool
    piece: int | None


# CPU float32 matrix products are IEEE. A CPU torch.dot accumulates in a few float32 lanes, its relative error
# growing with the length (2^25 elements: 6e-4 at 2 threads, 2e-3 at 1), so a tensor beyond 2^22 elements is dotted
# in pieces of 2^22 (at most 8e-5, bfloat16 1.3e-4, however long; smaller pieces cost calls: 2^17 made P2M's step on
# the 9.4M MLP 29% slower).
CPU_LIMITS = Limits(stacked=1 << 12, batch=1 << 18, gram=True, piece=1 << 22)
# On an accelerator each op is a kernel launch and memory is fast: copying a
# tensor of up to 16 MB of float32 into a stack costs less than its own launches.
# Its matrix products may be rounded (TF32): each product is a torch.dot there.
# Its reductions are trees: one torch.dot per product of a large tensor.
DEVICE_LIMITS = Limits(stacked=1 << 22, batch=1 << 23, gram=False, piece=None)


def limits(device: torch.device) -> Limits:
    """The :class:`Limits` of ``device`` (CPU or accelerator)."""
    return CPU_LIMITS if device.type == "cpu" else DEVICE_LIMITS


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view (float32 for 16-bit tensors, so that inner products accumulate in it)."""
    tensor = tensor.reshape(-1)
    return tensor.float() if tensor.dtype in _LOW_PRECISION else tensor


def products(
    batch: "ScalarBatch",
    vectors: Sequence[Sequence[torch.Tensor]],
    pairs: Sequence[tuple[int, int, int]],
    weights: Sequence[float],
) -> None:
    """Adds to ``batch`` the weighted inner products of aligned tensor lists (see :class:`Products`)."""
    accumulator = Products(batch, pairs)
    accumulator.add(vectors, weights)
    accumulator.finish()


def copy_squares(
    batch: "ScalarBatch", slot: int, params: Sequence[torch.Tensor], with_gradient: bool, world: int
) -> list[int]:
    """Adds |x|^2 (at ``slot``) and |g|^2 (at ``slot + 1``, where the step has gradients) of ``params``, whole
    copies on each of ``world`` ranks, as 1/world of each rank's terms; returns the two slots, whose terms every
    rank must hold alike (:meth:`ScalarBatch.read`'s ``agree``)."""
    weights = [1.0 / world] * len(params)
    products(batch, ([local(p) for p in params],), [(0, 0, slot)], weights)
    grads = [local(p.grad) for p in params if p.grad is not None] if with_gradient else []
    if grads:
        products(batch, (grads,), [(0, 0, slot + 1)], weights[: len(grads)])
    return [slot, slot + 1]


class Products:
    """Weighted inner products of aligned tensor lists, added to a :class:`ScalarBatch`.

    Each :meth:`add` takes lists of same-shaped tensors (``vectors[a][i]`` and
    ``vectors[b][i]`` belong to one parameter ``i`` of weight ``weights[i]``);
    every ``(a, b, slot)`` of ``pairs`` adds ``sum_i weights[i] * <vectors[a][i],
    vectors[b][i]>`` to ``slot``. :meth:`finish` hands the sums of all calls
    to the batch in one tensor.

    Many small tensors cost a dispatch (on an accelerator, a kernel launch)
    per tensor and per product where their data costs little, so tensors of
    up to ``stacked`` elements (:func:`limits`) with the same shape, dtype
    and weight are stacked (all their vectors, at most ``batch`` elements
    per vector). On CPU one matrix product of a stack gives all its pairs
    (the Gram matrix of its vectors); on an accelerator, where TF32 may
    round matrix products, each pair is one ``torch.dot`` of two rows. A
    stack whose vectors differ in dtype is built one vector at a time (a
    stack of mixed dtypes converts tensor by tensor: on CUDA a kernel each).
    Larger tensors are read in place, all products of one tensor before the
    next, so that its vectors are read from memory once and from cache after
    that (on CPU piece by piece, see :class:`Limits`).
    """

    def __init__(self, batch: "ScalarBatch", pairs: Sequence[tuple[int, int, int]]) -> None:
        self.batch = batch
        self.slots = [slot for _, _, slot in pairs]
        self.used = sorted({a for a, _, _ in pairs} | {b for _, b, _ in pairs})
        position = {v: k for k, v in enumerate(self.used)}
        self.at = [(position[a], position[b]) for a, b, _ in pairs]
        self.terms: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.grams: dict[float, list[torch.Tensor]] = {}

    def add(self, vectors: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> None:
        used, first = self.used, vectors[self.used[0]]
        if not first:
            return
        limit = limits(first[0].device)
        classes: dict[tuple, list[int]] = {}
        for i, t in enumerate(first):
            if t.numel() <= limit.stacked:
                classes.setdefault((t.shape, t.dtype, weights[i]), []).append(i)
            elif limit.piece is None or t.numel() <= limit.piece:  # every product of one tensor before the next:
                self._add_rows([flat(vectors[v][i]) for v in used], weights[i])  # its vectors stay in cache
            else:  # the same, a piece at a time
                rows = [vectors[v][i].reshape(-1) for v in used]
                for piece in zip(*(row.split(limit.piece) for row in rows)):
                    self._add_rows([flat(row) for row in piece], weights[i])
        for (shape, _, weight), members in classes.items():
            per_stack = max(1, limit.batch // max(1, shape.numel()))
            for start in range(0, len(members), per_stack):
                columns = [[vectors[v][i] for i in members[start : start + per_stack]] for v in used]
                if len({column[0].dtype for column in columns}) > 1:  # one stack per column, one dtype each
                    self._add_rows(_common([stacked(column).reshape(-1) for column in columns]), weight)
                    continue
                rows = torch.stack([t for column in columns for t in column]).reshape(len(used), -1)  # channels_last: a copy
                rows = rows.float() if rows.dtype in _LOW_PRECISION else rows
                if limit.gram:
                    self.grams.setdefault(weight, []).append(rows @ rows.T)
                else:
                    self._add_rows(rows.unbind(), weight)

    def _add_rows(self, rows: Sequence[torch.Tensor], weight: float) -> None:
        """The products of ``rows`` (one flat vector per used list) as the terms of one weight."""
        if any(row.dtype != rows[0].dtype for row in rows):  # a gradient of another dtype (``grad_dtype``)
            rows = _common(rows)
        self.terms += [torch.dot(rows[a], rows[b]) for a, b in self.at]
        self.weights.append(weight)

    def finish(self) -> None:
        batch, width = self.batch, len(self.used)
        if self.grams:
            index = torch.tensor([a * width + b for a, b in self.at], device=batch.device)
            for weight, matrices in self.grams.items():
                total = torch.stack(matrices).to(batch.dtype).sum(0) if len(matrices) > 1 else matrices[0].to(batch.dtype)
                batch.add_values(self.slots, total.view(-1)[index] * weight)
        if self.terms:
            table = torch.stack(self.terms).view(len(self.weights), len(self.at)).to(batch.dtype)
            batch.add_values(self.slots, weighted_sum(table, self.weights))
        self.terms, self.weights, self.grams = [], [], {}


def weighted_sum(table: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i weights[i] * table[i]``: the slot values of per-tensor rows of terms (one op when the weights agree)."""
    if all(w == weights[0] for w in weights):
        return table.sum(0) * weights[0]
    return torch.tensor(list(weights), dtype=table.dtype, device=table.device) @ table


def _common(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``rows`` in one dtype for ``torch.dot``: their promoted dtype, float32 for 16-bit ones.

    Each row is stacked from one list, which has one dtype: a stack of mixed
    dtypes would convert tensor by tensor (on CUDA a kernel each).
    """
    dtype = functools.reduce(torch.promote_types, (row.dtype for row in rows))
    dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
    return [row.to(dtype) for row in rows]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds (a DTensor's local shard, else the tensor)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype of a step's sums on ``device``: float64, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Reducer:
    """The data-parallel group of an optimizer and how many ranks hold each tensor.

    Args:
        process_group: ``"auto"`` (the default group when torch.distributed is
            initialised with more than one rank, else this process alone),
            ``None`` (this process alone: no collective), or a process group.
        replicas: optional function giving, for a parameter, the number of
            ranks of the group that hold an identical copy of what this rank
            holds. By default DTensors count the mesh dimensions they are
            replicated over, FSDP1 flat parameters (and their views) are
            shards unless their unit's strategy repeats them (NO_SHARD,
            HYBRID_SHARD: see :meth:`learn_shards`), and other tensors are
            replicas on every rank (DDP).
    """

    def __init__(self, process_group=AUTO, replicas: Callable[[torch.Tensor], int] | None = None) -> None:
        if isinstance(process_group, str) and process_group == AUTO:
            process_group = AUTO  # the marker is compared by identity: "auto" read from a config file is another string
        if process_group is not AUTO and process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be 'auto', None or a torch.distributed.ProcessGroup, got {process_group!r}")
        if replicas is not None and not callable(replicas):
            raise TypeError("replicas must be a function of a parameter returning a number of ranks")
        self._process_group = process_group
        self._replicas = replicas
        self.flat_shards: dict[torch.Tensor, int] = {}  # FSDP1 parameters: distinct shards (see learn_shards)
        self._shards_of: tuple[int, ...] = ()  # the models they were read from

    @property
    def layout_told(self) -> bool:
        """Whether the caller gave ``replicas``: a layout ELRA does not read from the wrappers (ZeRO's partitions,
        tensor parallelism's sub-meshes)."""
        return self._replicas is not None

    def __deepcopy__(self, memo: dict) -> "Reducer":
        """A copy reduces over the same group (a group is a connection, not data)."""
        return Reducer(self._process_group, self._replicas)

    def __getstate__(self) -> dict:
        if self._process_group is not AUTO and self._process_group is not None:
            raise TypeError(
                "an ElraOptimizer built with an explicit process_group cannot be pickled (a process group "
                "lives in its process): save optimizer.state_dict() instead, or build it with process_group='auto'"
            )
        return {**self.__dict__, "flat_shards": {}, "_shards_of": ()}  # the copy reads its own models

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._process_group == AUTO:
            self._process_group = AUTO  # unpickled: an equal string

    def learn_shards(self, models: Sequence[torch.nn.Module]) -> None:
        """Read from the FSDP1 units of ``models`` how many distinct shards their parameters have (NO_SHARD
        and HYBRID_SHARD repeat them on several ranks); again only when the models change.

        A DDP model or FSDP1 unit whose group is not as large as the one ELRA sums over (DDP on a subgroup,
        ``process_group`` left at ``"auto"``) raises: its replicas or shards would be weighted for the wrong
        ranks and the sums mixed with other ranks' silently. So does one over several ranks with
        ``process_group=None``: each rank would decide from its own loss (and FSDP1 from its own shards), and
        the replicas drift apart. ``replicas=`` takes over the counting (layouts beyond these rules), and the
        check.
        """
        key = tuple(map(id, models))
        if key != self._shards_of:
            world = self.world_size
            for wrapper, size in wrapper_groups(models) if self._replicas is None else ():
                if size != world:
                    raise ValueError(
                        f"the model's {wrapper} reduces over {size} ranks but ELRA sums over {world}: pass "
                        "process_group= the group the wrapper was given (or replicas= for a layout of your own)"
                    )
            self.flat_shards, self._shards_of = fsdp1_shards(models), key

    @property
    def shards_key(self) -> tuple[int, ...]:
        """Which models :meth:`learn_shards` last read: replica counts may change with them."""
        return self._shards_of

    @property
    def group(self):
        """The process group to reduce over, or ``None`` for this process alone."""
        if self._process_group is AUTO:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                return dist.group.WORLD
            return None
        if self._process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ElraOptimizer was given a process group but torch.distributed is not initialised "
                "(or was destroyed): call init_process_group first, or pass process_group=None"
            )
        return self._process_group

    @property
    def world_size(self) -> int:
        group = self.group
        return 1 if group is None else dist.get_world_size(group)

    def replicas(self, param: torch.Tensor) -> int:
        """Number of ranks holding an identical copy of this rank's part of ``param``."""
        return self._replicas_in(param, self.world_size)

    def weights(self, params: Sequence[torch.Tensor]) -> list[float]:
        """``1 / replicas`` of each parameter: the share of its local sums this rank contributes."""
        replicas = self.replicas_counter()
        return [1.0 / replicas(p) for p in params]

    def replicas_counter(self) -> Callable[[torch.Tensor], int]:
        """:meth:`replicas` with the group looked up once: for one step's many parameters."""
        world = self.world_size
        return lambda param: self._replicas_in(param, world)

    def _replicas_in(self, param: torch.Tensor, world: int) -> int:
        if self._replicas is not None:
            count = self._replicas(param)
        elif hasattr(param, "placements") and hasattr(param, "device_mesh"):
            mesh = param.device_mesh
            if mesh.size() != world:
                raise ValueError(
                    f"a parameter is distributed over a device mesh of {mesh.size()} ranks but ELRA reduces over "
                    f"{world}: pass process_group= the group of that mesh, or replicas= (FSDP2 over tensor "
                    "parallelism on a 2-D mesh: the README's mesh_replicas)"
                )
            count = math.prod(mesh.size(dim) for dim, placement in enumerate(param.placements) if placement.is_replicate())
        elif getattr(param, "_fsdp_flattened", False):  # a shard, unless the unit's strategy repeats it
            count = max(1, world // self.flat_shards.get(param, world))
        else:
            count = world
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"replicas must be a positive integer, got {count!r}")
        return count

    def sum(self, vector: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``vector`` in place over the group; nothing for one process."""
        group = self.group
        if group is not None:
            dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group)
        return vector


# ranks' terms of a sum of squares over replicated tensors that spread by more than this share of their mean
# square are not of the same tensors (a gradient never all-reduced): rounding alone spreads them by about 1e-14
# (terms 1e-7 apart, as kernels of other threads or devices round), a rank's own micro-batch gradient by 1e-2 and
# more. Squares only: a product of two vectors can cancel to far below their lengths, and its rounding with it
AGREEMENT = 1e-8


class VectorBlock:
    """A vector summed over ranks with a step's scalars; ``value`` holds the sum after :meth:`ScalarBatch.read`."""

    __slots__ = ("terms", "weight", "value")

    def __init__(self, terms: torch.Tensor, weight: float) -> None:
        self.terms, self.weight = terms, weight
        self.value: torch.Tensor | None = None


class ScalarBatch:
    """Collects weighted scalar terms into numbered slots (and vector blocks), then sums them globally once."""

    def __init__(self, slots: int, device: torch.device, reducer: Reducer) -> None:
        self.slots = slots
        self.device = device
        self.dtype = accumulation_dtype(device)
        self.reducer = reducer
        self._summed: list[tuple[list[int], torch.Tensor]] = []
        self._constants = [0.0] * slots
        self._vectors: list[VectorBlock] = []
        self.disagreeing: list[int] = []  # after read(agree=...): the slots whose ranks' terms differ

    def add_values(self, slots: list[int], values: torch.Tensor) -> None:
        """Weighted terms already summed, one per slot (a 1-D tensor of the batch's dtype)."""
        if slots:
            self._summed.append((slots, values))

    def add_constant(self, slot: int, value: float) -> None:
        """A host-side number (already this rank's share) to be summed over ranks."""
        self._constants[slot] += value

    def add_vector(self, terms: torch.Tensor, weight: float) -> VectorBlock:
        """A 1-D tensor of this rank's terms times ``weight`` (1/replicas), summed over ranks elementwise.

        It travels after the scalars and losses in the same collective; after
        :meth:`read` the block's ``value`` is the global sum (on the device, in
        the terms' dtype: no host transfer).
        """
        block = VectorBlock(terms.reshape(-1), weight)
        self._vectors.append(block)
        return block

    def read(self, losses: Sequence[float | torch.Tensor], agree: Sequence[int] = ()) -> tuple[list[float], list[float]]:
        """Global (slot values, mean losses over ranks): one collective, one host transfer.

        ``agree``: slots that hold sums of squares of tensors every rank holds
        alike (replicas), so every rank's terms must be equal; their squares
        ride along, and :attr:`disagreeing` lists the slots where not.
        """
        vector = torch.tensor(self._constants, dtype=self.dtype, device=self.device)
        if self._summed:
            slots = [slot for slots, _ in self._summed for slot in slots]
            vector.index_add_(0, torch.tensor(slots, device=self.device), torch.cat([values for _, values in self._summed]))
        world = self.reducer.world_size
        mean_losses = loss_vector(losses, self.dtype, self.device) / world
        agree = list(agree)
        head = [vector, mean_losses] + ([vector[agree] ** 2] if agree else [])
        reduced = self.reducer.sum(torch.cat(head + self._weighted_vectors()))
        start = sum(t.numel() for t in head)
        self._hand_out(reduced[start:])
        values = reduced[:start].tolist()  # the vector blocks stay on the device
        self.disagreeing = [
            slot
            for slot, total_sq in zip(agree, values[start - len(agree) : start])
            if total_sq / world - (values[slot] / world) ** 2 > AGREEMENT * total_sq / world  # False for non-finite sums
        ]
        return values[: self.slots], values[self.slots : self.slots + len(losses)]

    def _weighted_vectors(self) -> list[torch.Tensor]:
        """All vector blocks' weighted terms as one tensor (a few ops, whatever the number of blocks)."""
        if not self._vectors:
            return []
        terms = torch.cat([b.terms for b in self._vectors]).to(self.dtype)
        weights = [b.weight for b in self._vectors]
        if len(set(weights)) > 1:
            sizes = torch.tensor([b.terms.numel() for b in self._vectors], device=self.device)
            return [terms * torch.tensor(weights, dtype=self.dtype, device=self.device).repeat_interleave(sizes)]
        return [terms if weights[0] == 1.0 else terms * weights[0]]

    def _hand_out(self, sums: torch.Tensor) -> None:
        """Each vector block's global sum, a view of ``sums`` in its terms' dtype (one conversion when they share one)."""
        dtypes = {b.terms.dtype for b in self._vectors}
        if len(dtypes) == 1:
            sums = sums.to(dtypes.pop())
        offset = 0
        for block in self._vectors:
            size = block.terms.numel()
            block.value, offset = sums[offset : offset + size].to(block.terms.dtype), offset + size


def loss_vector(losses: Sequence[float | torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``losses`` (numbers or scalar tensors on any device) as one vector, read back from no device."""
    if all(not isinstance(v, torch.Tensor) for v in losses):
        return torch.tensor([float(v) for v in losses], dtype=dtype, device=device)
    return torch.stack(
        [
            v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=dtype, device=device)
            for v in losses
        ]
    )
