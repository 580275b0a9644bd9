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
