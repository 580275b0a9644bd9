"""The seed's Example 3: a 2-layer network trained in float16 or bfloat16 with ElraGradScaler.

    python examples/half_precision.py [--dtype float16|bfloat16] [--epochs 10] [--device cpu|cuda]

The whole model is in half precision (not autocast). ElraGradScaler scales
the loss for backward, hands the loss value to ELRA, skips steps whose
gradients overflow (halving the scale) and grows the scale when clean.
"""

import argparse

import torch
from sklearn.datasets import load_digits

from elra import ElraGradScaler, ElraOptimizer


def train(dtype: torch.dtype, epochs: int, batch_size: int = 32, device: str = "cpu") -> tuple[float, float, int]:
    digits = load_digits()
    x = (torch.tensor(digits.data) / 16.0).to(device=device, dtype=dtype)
    y = torch.tensor(digits.target, device=device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(device=device, dtype=dtype)
    optimizer = ElraOptimizer(model.parameters(), None, batch_size, 10, lr=1e-4)
    scaler = ElraGradScaler(init_scale=2.0**16)
    overflows = 0
    for epoch in range(epochs):
        for batch in torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).to(device).split(batch_size):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]).float(), y[batch])
            scaler.scale(loss).backward()
            overflows += scaler.step(optimizer) == "overflow"
            scaler.update()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return accuracy, scaler.get_scale(), overflows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    accuracy, scale, overflows = train(getattr(torch, args.dtype), args.epochs, device=args.device)
    print(f"{args.dtype}: accuracy {accuracy:.3f}, loss scale {scale:g}, skipped overflow steps {overflows}")
