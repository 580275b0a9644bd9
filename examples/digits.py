"""Train an MLP on scikit-learn's digits (8x8 images, 10 classes) with ELRA on CPU.

    python examples/digits.py [--epochs 30] [--batch-size 32] [--seed 0]

No learning rate, batch size schedule or weight decay to tune: ELRA adapts its
step size, grows its batch multiplier and steers weight decay from the train
and validation losses it is told once per epoch.
"""

from __future__ import annotations

import argparse
import logging

import torch
from sklearn.datasets import load_digits

from elra import ElraOptimizer


def load(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


@torch.no_grad()
def evaluate(model, x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
    if not -(2**63) <= args.seed < 2**64:
        parser.error(f"--seed must be one of torch's seeds, in [-2**63, 2**64), got {args.seed}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_valid, y_valid) = load(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = ElraOptimizer(model.parameters(), None, args.batch_size, 10, lr=1e-5, weight_decay=0.9999)

    for epoch in range(1, args.epochs + 1):
        for batch in torch.randperm(len(x_train)).split(args.batch_size):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step(loss)
        train_loss, _ = evaluate(model, x_train, y_train)
        valid_loss, accuracy = evaluate(model, x_valid, y_valid)
        optimizer.set_train_loss(train_loss)
        optimizer.set_valid_loss(valid_loss)
        s = optimizer.stats
        print(
            f"epoch {epoch:3d}  train {train_loss:.4f}  valid {valid_loss:.4f}  accuracy {accuracy:.3f}  "
            f"lr {s['lr']:.3g}  batch x{s['batch_multiplier']}  retraces {s['retraces']}"
        )
    return accuracy


if __name__ == "__main__":
    main()
