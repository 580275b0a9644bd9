"""ELRA on a CUDA device against the same computation on the CPU (skipped without a GPU).

In float64 the two devices differ only by rounding, so every decision (retrace,
batch growth, regime) must be the same and the parameters equal to ~1e-8; a
checkpoint written on the GPU must resume on the CPU. Run with
``pytest tests/test_cuda.py`` on a machine with a GPU (``benchmarks/gpu.sh`` does).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from elra import ElraGradScaler, ElraOptimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAN_AT = (9, 31)


def _net(device: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )
    return net.to(device=device, dtype=dtype)


def _train(net, opt, steps: int, start: int = 0) -> list[float]:
    """Mini-batch steps on a learnable rule, with nan losses injected (retraces); the losses."""
    device, dtype = next(net.parameters()).device, next(net.parameters()).dtype
    losses = []
    for step in range(start, steps):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        x, y = x.to(device=device, dtype=dtype), x[:, :4].argmax(1).to(device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step(math.nan if step in NAN_AT else loss.item())
    return losses


def _make(params, preconditioner, **kwargs):
    return ElraOptimizer(
        params, None, 16, 4, lr=1e-4, weight_decay=1e-2, batch_multiplier=2, preconditioner=preconditioner, **kwargs
    )


def _same_stats(a: dict, b: dict) -> None:
    for key, value in a.items():
        assert b[key] == (pytest.approx(value, rel=1e-8) if isinstance(value, float) else value), key


@pytest.mark.parametrize("preconditioner", [None, "adam", "factored", "muon"])
def test_cuda_steps_follow_the_cpu_run(preconditioner):
    nets = {device: _net(device) for device in ("cpu", "cuda")}
    opts = {device: _make(net.parameters(), preconditioner) for device, net in nets.items()}
    for device in nets:
        _train(nets[device], opts[device], 60)
    _same_stats(opts["cpu"].stats, opts["cuda"].stats)
    assert opts["cpu"].stats["retraces"] >= 2
    for p, q in zip(nets["cpu"].parameters(), nets["cuda"].parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("preconditioner", [None, "adam"])
def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu(preconditioner):
    net = _net("cuda")
    opt = _make(net.parameters(), preconditioner)
    _train(net, opt, 25)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    _train(net, opt, 50, start=25)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    resumed_net = _net("cpu")
    resumed_net.load_state_dict(saved["model"])
    resumed = _make(resumed_net.parameters(), preconditioner)
    resumed.load_state_dict(saved["optimizer"])
    _train(resumed_net, resumed, 50, start=25)
    _same_stats(opt.stats, resumed.stats)
    for p, q in zip(net.parameters(), resumed_net.parameters()):
        torch.testing.assert_close(q, p.cpu(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preconditioner", [None, "muon"])
def test_half_precision_on_cuda_learns_and_skips_overflowing_steps(dtype, preconditioner):
    net = _net("cuda", dtype)
    opt = ElraOptimizer(net.parameters(), None, 16, 4, lr=1e-4, preconditioner=preconditioner)
    scaler = ElraGradScaler(init_scale=2.0**10)
    losses = []
    for step in range(160):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
        y = x[:, :4].argmax(1).cuda()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x.to("cuda", dtype)).float(), y)
        scaler.scale(loss).backward()
        if step == 50:
            before = [p.detach().clone() for p in net.parameters()]
            next(net.parameters()).grad.view(-1)[0] = math.inf
            assert scaler.step(opt) == "overflow"
            assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
        else:
            scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in net.parameters())
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])
