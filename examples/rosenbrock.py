"""The seed's Example 2: the Rosenbrock function, minimum 0 at (1, 1).

    python examples/rosenbrock.py [--steps 500]

A non-convex valley with a long curved floor. ELRA's deterministic regime
(detected: classes=None, the default) reaches it from a tiny first step, retracing the steps that
overshoot. Computed in float64: near the minimum float32 rounding is the noise.
"""

import argparse

import torch

from elra import ElraOptimizer


def minimise(steps: int, start=(-1.5, 2.0)) -> tuple[torch.Tensor, float, dict]:
    xy = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    # P2M, the published method: on a noise-free problem it lands exactly on the minimum
    optimizer = ElraOptimizer([xy], lr=1e-5, preconditioner=None)
    for _ in range(steps):
        loss = (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss)
    final = ((1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2).item()
    return xy.detach(), final, optimizer.stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    steps = parser.parse_args().steps
    if steps < 1:
        parser.error(f"--steps must be at least 1, got {steps}")
    xy, final, stats = minimise(steps)
    print(f"x = {xy.tolist()}, f = {final:.3e}, retraces {stats['retraces']}")
