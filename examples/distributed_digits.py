"""ELRA under DDP or FSDP2: each rank trains on its part of scikit-learn's digits.

    torchrun --standalone --nproc_per_node=2 examples/distributed_digits.py --strategy fsdp2 [--epochs 10]
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from elra import ElraOptimizer, grad_sync

parser = argparse.ArgumentParser()
parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=16, help="per rank")
args = parser.parse_args()
for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
    if value < 1:
        parser.error(f"{option} must be at least 1, got {value}")

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)

torch.manual_seed(0)  # same initial weights on every rank
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
if args.strategy == "ddp":
    model = DDP(model)
else:  # shard each layer, then the root
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
optimizer = ElraOptimizer(model.parameters(), model, args.batch_size, 10, lr=1e-5, batch_multiplier=2)

for epoch in range(args.epochs):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    for batch in order.split(args.batch_size * world):
        if len(batch) < world:
            break  # a last global batch too small to give every rank a sample (an empty one's loss is nan: a retrace)
        mine = batch[rank::world]  # this rank's part of the global batch
        optimizer.zero_grad()
        with grad_sync(model, optimizer):  # forward and backward: no gradient all-reduce while only collecting
            loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
            if optimizer.skip_backward(loss):
                optimizer.step_retrace(loss)
                continue
            loss.backward()
        optimizer.step(loss)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if rank == 0:
        s = optimizer.stats
        print(f"epoch {epoch + 1}  accuracy {accuracy:.3f}  lr {s['lr']:.3g}  batch x{s['batch_multiplier']}  retraces {s['retraces']}")

dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip the interpreter teardown that gloo's threads sometimes abort
