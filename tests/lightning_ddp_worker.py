"""The Lightning example on 2 DDP processes (gloo, CPU), fitted whole and resumed from a checkpoint taken while
ELRA collects micro-batches; each process saves its parameters and ELRA's controller state.

    python tests/lightning_ddp_worker.py OUT

Lightning's ``strategy="ddp"`` starts the second process by running this script again. Each rank trains on its
fixed half of the digits in a fixed order; the resumed fit starts at the checkpoint's batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lightning_digits import build_module, digits_loaders  # noqa: E402

BATCH, MULTIPLIER, EPOCHS, SAVE_EVERY = 32, 3, 2, 4


class FixedBatches:
    """This rank's half of the training digits in batches of a fixed order, from batch ``start`` on."""

    def __init__(self, rank: int, start: int = 0) -> None:
        train = digits_loaders(BATCH)[0].dataset
        self.x, self.y = train.tensors[0][rank::2].double(), train.tensors[1][rank::2]
        self.start = start

    def __len__(self) -> int:
        return -(-len(self.y) // BATCH)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self)):
            yield self.x[i * BATCH : (i + 1) * BATCH], self.y[i * BATCH : (i + 1) * BATCH]


class SaveAtEnd(L.Callback):
    """Each rank saves its parameters, stats and controller state at the end of the fit, the ranks waiting for
    each other before leaving it (the first process may exit before the second wrote otherwise)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.sync_pending_grads()  # every rank: state_dict() refuses the ranks' own collected losses
        result = {
            "params": torch.cat([p.detach().flatten() for p in module.parameters()]),
            "stats": optimizer.stats,
            "controller": optimizer.state_dict()["param_groups"][0]["elra_controller"],
        }
        torch.save(result, self.path.format(rank=trainer.global_rank))
        trainer.strategy.barrier()


def fit(out: Path, name: str, checkpoint: Path | None = None) -> None:
    torch.manual_seed(0)
    module = build_module(BATCH, batch_multiplier=MULTIPLIER).double()
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy="ddp", precision="64-true", logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(dirpath=out / name, every_n_train_steps=SAVE_EVERY, save_top_k=-1),
            SaveAtEnd(str(out / f"{name}-rank{{rank}}.pt")),
        ],
    )
    start = SAVE_EVERY % len(FixedBatches(0)) if checkpoint is not None else 0
    valid = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*(t.double() if t.is_floating_point() else t for t in digits_loaders(BATCH)[1].dataset.tensors)),
        batch_size=256,
    )
    trainer.fit(module, FixedBatches(trainer.global_rank, start), valid, ckpt_path=checkpoint)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fit(out, "whole")
    fit(out, "resumed", out / "whole" / f"epoch=0-step={SAVE_EVERY}.ckpt")
