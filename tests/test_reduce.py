"""The step's inner products: the batched computation against a plain one, tensor by tensor."""

import math

import pytest
import torch

import elra.reduce
from elra.reduce import CPU_LIMITS, DEVICE_LIMITS, Reducer, ScalarBatch, products


def _reference(vectors, pairs, weights, slots):
    values = [0.0] * slots
    for a, b, slot in pairs:
        for i, w in enumerate(weights):
            x, y = (vectors[v][i].double().reshape(-1) for v in (a, b))
            values[slot] += w * float(torch.dot(x, y))
    return values


@pytest.mark.parametrize("limits", [CPU_LIMITS, DEVICE_LIMITS._replace(batch=20000)], ids=["cpu", "accelerator"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, "bfloat16 beside float32", "float64 gradients of float32"]
)
def test_products_equal_the_plain_sums_for_small_stacked_and_large_tensors(dtype, limits, monkeypatch):
    """On CPU the large tensors are read in place; an accelerator's sizes stack them all (in small stacks here).

    16-bit parameters and gradients come beside float32 moments: their stacks are built one list at a time.
    A gradient of another dtype than its parameter (``p.grad_dtype``): a large one's ``torch.dot`` with the
    parameter raised at the first step (dot : expected both vectors to have same dtype).
    """
    monkeypatch.setattr(elra.reduce, "limits", lambda device: limits)
    gen = torch.Generator().manual_seed(0)
    # many same-shaped small tensors (stacked, some over two stacks), odd shapes, a 0-dim one and large ones
    shapes = [(7,)] * 30 + [(64, 64)] * 70 + [(3, 5), (), (300, 300), (70000,), (5, 4, 3)]
    weights = [1.0 if i % 4 else 0.5 for i in range(len(shapes))]  # mixed replica weights
    mixed = {"bfloat16 beside float32": [torch.bfloat16, torch.bfloat16, torch.float32]}
    mixed["float64 gradients of float32"] = [torch.float32, torch.float64, torch.float32]
    dtypes = mixed[dtype] if isinstance(dtype, str) else [dtype] * 3
    vectors = [[torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s in shapes] for d in dtypes]
    vectors[2][-1] = vectors[2][-1].transpose(0, 2)  # a non-contiguous tensor
    vectors[0][-1] = vectors[0][-1].transpose(0, 2)
    vectors[1][-1] = vectors[1][-1].transpose(0, 2)
    pairs = [(0, 0, 0), (0, 2, 1), (2, 2, 2), (1, 1, 3), (0, 1, 4), (1, 2, 5), (0, 2, 5)]
    batch = ScalarBatch(6, torch.device("cpu"), Reducer(None))
    products(batch, vectors, pairs, weights)
    values, _ = batch.read([0.0])
    expected = _reference(vectors, pairs, weights, 6)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(values, expected):
        assert got == pytest.approx(want, rel=tolerance, abs=tolerance * 1e3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_of_a_tensor_of_2_25_elements_are_accurate_on_cpu(dtype):
    """|g|^2, <g, u>, |u|^2 of one 2^25-element tensor against float64: a float32 torch.dot over the whole
    tensor accumulated in a few lanes and was 2e-3 off at one thread (the error grows with the length); pieces
    of 2^22 elements keep it below 1.3e-4 however long the tensor."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 25
    g = (torch.randn(n, generator=gen) + 0.5).to(dtype)
    u = torch.randn(n, generator=gen).to(dtype)
    batch = ScalarBatch(3, torch.device("cpu"), Reducer(None))
    products(batch, ([g], [u]), [(0, 0, 0), (0, 1, 1), (1, 1, 2)], [1.0])
    values, _ = batch.read([0.0])
    expected = [0.0] * 3
    for gs, us in zip(g.split(1 << 20), u.split(1 << 20)):  # float64 sums, a piece at a time
        gs, us = gs.double(), us.double()
        for slot, (a, b) in enumerate([(gs, gs), (gs, us), (us, us)]):
            expected[slot] += float(torch.dot(a, b))
    scale = math.sqrt(expected[0] * expected[2])  # the size of <g, u>'s rounding, whatever its sign
    assert [abs(got - want) / scale for got, want in zip(values, expected)] == pytest.approx([0.0] * 3, abs=2.5e-4)


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
def test_a_float32_parameter_with_float64_gradients_steps_as_with_the_rounded_gradients(preconditioner):
    """``p.grad_dtype = torch.float64``: the step's sums take the float64 gradient (the first step raised in
    ``torch.dot`` for any tensor above the stacked size); the run follows the one given float32 gradients."""
    from elra import ElraOptimizer

    start = torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    wide, rounded = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    if not hasattr(wide, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype")
    wide.grad_dtype = torch.float64
    runs = []
    for p, dtype in ((wide, torch.float64), (rounded, torch.float32)):
        opt = ElraOptimizer([p], None, 8, 3, lr=1e-4, preconditioner=preconditioner)
        for step in range(6):
            grad = torch.randn(100, 100, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            p.grad = grad.float().to(dtype)  # the same numbers: only the dtype differs
            opt.step(1.0 / (1 + step))
        runs.append(opt.stats)
    assert wide.grad.dtype == torch.float64 and runs[0]["real_steps"] == runs[1]["real_steps"] == 6
    assert runs[0]["lr"] == pytest.approx(runs[1]["lr"], rel=1e-6) and not torch.equal(wide, start)  # float64 sums
    assert torch.allclose(wide, rounded, rtol=1e-6, atol=1e-6)


class _TwoRanks(Reducer):
    """A step's all-reduce as two replicas would sum it: this rank's vector plus the other rank's (``other``,
    recorded from a batch of the other rank's tensors by a reducer with ``other=None``)."""

    def __init__(self, other: torch.Tensor | None = None) -> None:
        super().__init__(None)
        self.other, self.sent = other, None

    @property
    def world_size(self) -> int:
        return 2

    def sum(self, vector: torch.Tensor) -> torch.Tensor:
        self.sent = vector.clone()
        return vector if self.other is None else vector + self.other


def _disagreeing(mine: list[torch.Tensor], theirs: list[torch.Tensor], agree: list[int]) -> list[int]:
    """The slots two ranks' terms of |g|^2, <g, u>, |u|^2 (slots 0, 1, 2) disagree on, checked on ``agree``."""
    pairs = [(0, 0, 0), (0, 1, 1), (1, 1, 2)]
    recorder = _TwoRanks()
    other = ScalarBatch(3, torch.device("cpu"), recorder)
    products(other, [[t] for t in theirs], pairs, [0.5])
    other.read([0.0], agree=agree)
    batch = ScalarBatch(3, torch.device("cpu"), _TwoRanks(recorder.sent))
    products(batch, [[t] for t in mine], pairs, [0.5])
    batch.read([0.0], agree=agree)
    return batch.disagreeing


def test_replicas_agree_on_their_sums_of_squares_and_not_on_a_product_that_cancels():
    """DDP replicas' terms of a product of two vectors that cancels (<g, u> near the line minimum) differ by
    their rounding, which is large against the product itself: two ranks at 1 and 2 CPU threads raised "the
    ranks hold different gradients" at real step 167 of a correct run. Only sums of squares are checked, and a
    gradient of the rank's own still disagrees there."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(65536, generator=gen, dtype=torch.float64)
    u = torch.randn(65536, generator=gen, dtype=torch.float64)
    u -= torch.dot(g, u) / torch.dot(g, g) * g  # <g, u> cancels to rounding
    rounded = u + 1e-7 * torch.randn(65536, generator=gen, dtype=torch.float64)  # as another thread count rounds
    assert _disagreeing([g, u], [g, rounded], agree=[0, 1, 2]) == [1]  # what the check was: a false alarm
    assert _disagreeing([g, u], [g, rounded], agree=[0, 2]) == []
    own = g + 0.1 * torch.randn(65536, generator=gen, dtype=torch.float64)  # a gradient never all-reduced
    assert _disagreeing([g, u], [own, u], agree=[0, 2]) == [0]


@pytest.mark.parametrize("preconditioner", [None, "adam", "muon"])
def test_the_replica_check_covers_exactly_the_steps_sums_of_squares(preconditioner, monkeypatch):
    """Which slots a real step asks the replicas to agree on: its sums of squares (|g|^2, |x|^2, the
    direction's, the momentum's, P2M's per group and the 16-bit range bounds), no product of two vectors."""
    from elra import ElraOptimizer
    from elra.geometry import DIR_SQ, GRAD_SQ, MOM_SQ, PARAM_SQ

    asked = []
    read = ScalarBatch.read
    monkeypatch.setattr(ScalarBatch, "read", lambda self, losses, agree=(): asked.append(list(agree)) or read(self, losses, agree))
    monkeypatch.setattr(Reducer, "world_size", property(lambda self: 2))
    monkeypatch.setattr(Reducer, "sum", lambda self, vector: 2 * vector)  # two replicas alike
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "weight_decay": 0.0}]
    opt = ElraOptimizer(groups, None, 8, preconditioner=preconditioner, process_group=None)
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step(loss)
    if preconditioner is None:  # _SUMS' grad_sq, dir_sq, param_sq of each of the two groups
        expected = [0, 1, 4, 5, 6, 7]
    else:
        expected = [DIR_SQ, PARAM_SQ, GRAD_SQ, MOM_SQ]
    assert asked and all(sorted(a) == expected for a in asked)
