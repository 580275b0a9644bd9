"""The seed's Example 1: fit sin(x) on [-pi, pi] with a cubic polynomial.

    python examples/cubic_fit.py [--steps 2000]

Noise-free (full batch), so ELRA detects its deterministic regime (classes=None, the default, finds what
classes=0 would set):
the step length is its own alpha, grown from the tiny lr by the gradient-pair
rule. The least-squares optimum has a loss of 8.8172.
"""

import argparse
import math

import torch

from elra import ElraOptimizer


def fit(steps: int) -> tuple[float, torch.nn.Module]:
    x = torch.linspace(-math.pi, math.pi, 2000)
    y = torch.sin(x)
    xx = x.unsqueeze(-1).pow(torch.tensor([1, 2, 3]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0, 1))
    loss_fn = torch.nn.MSELoss(reduction="sum")
    optimizer = ElraOptimizer(model.parameters(), model=model, lr=1e-6)
    best = math.inf
    for _ in range(steps):
        loss = loss_fn(model(xx), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss.item())  # ELRA needs the loss value
        best = min(best, loss.item())
    return best, model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    steps = parser.parse_args().steps
    if steps < 1:
        parser.error(f"--steps must be at least 1, got {steps}")
    best, model = fit(steps)
    linear = model[0]
    w = linear.weight[0].tolist()
    print(f"best loss {best:.4f} (least squares: 8.8172)")
    print(f"Result: y = {linear.bias.item():.5f} + {w[0]:.5f} x + {w[1]:.5f} x^2 + {w[2]:.5f} x^3")
