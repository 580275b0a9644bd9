"""ELRA inside a training loop that is not yours: PyTorch Lightning.

    pip install lightning && python examples/lightning_digits.py [--epochs 5]

Lightning's automatic optimisation calls ``optimizer.step(closure)``; the
closure runs forward and backward and returns the loss, which is all ELRA
needs. ``set_train_loss``/``set_valid_loss`` go in the epoch-end hooks.
Lightning's ``accumulate_grad_batches`` (also from a
``GradientAccumulationScheduler``) and gradient clipping are refused:
the first hands ELRA every N-th loss divided by N beside the gradient of N
batches, the second rescales the gradients ELRA measures; ELRA averages
micro-batches itself (``batch_multiplier``) and handles bad steps (retrace).
So is a precision with a GradScaler (``precision="16-mixed"`` on a GPU): it
runs the closure itself and calls ``step()`` through torch's GradScaler,
without the loss, which ELRA refuses (``TypeError``: that scaler would
unscale the gradients ELRA may still be summing); ``"bf16-mixed"`` (no
scaler) works.
A ``ckpt_path`` taken while ELRA collects micro-batches resumes with them
(``zero_grad`` goes to ELRA, which keeps them) and with the train losses not
yet fed. ELRA's step budget (``total_steps``) is Lightning's
``estimated_stepping_batches``, every micro-batch of the fit: set again once
a checkpoint is restored, so a fit resumed with more epochs cools down at its
new end. Exits with a message (status 0) when Lightning is not installed.
"""

import argparse
import sys

import torch
from sklearn.datasets import load_digits

try:
    import lightning as L
except ImportError:
    L = None

from elra import ElraOptimizer


def digits_loaders(batch_size: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    train = torch.utils.data.TensorDataset(x[order[:split]], y[order[:split]])
    valid = torch.utils.data.TensorDataset(x[order[split:]], y[order[split:]])
    return (
        torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
        torch.utils.data.DataLoader(valid, batch_size=256),
    )


def build_module(batch_size: int, batch_multiplier: int = 1):
    class SyncBeforeCheckpoint(L.Callback):
        """Under DDP each rank holds the losses of its own collected micro-batches and those it reported, and
        Lightning writes rank 0's checkpoint (every rank resumed with rank 0's own; ELRA's ``state_dict()``
        refuses them now). Lightning asks the callbacks for their state on every rank right before it takes
        the optimizer's, at every checkpoint (epoch end, ``every_n_train_steps``, ``save_checkpoint``): the
        ranks average them there (``sync_pending_grads``, one all-reduce of a few numbers)."""

        _trainer = None

        def state_dict(self) -> dict:
            trainer = self._trainer
            if trainer is not None and trainer.world_size > 1:
                for optimizer in trainer.optimizers:
                    optimizer.sync_pending_grads()
            return {}

        def setup(self, trainer, pl_module, stage: str) -> None:
            self._trainer = trainer

    class DigitsClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
            self.train_losses, self.valid_losses, self.accuracy = [], [], 0.0

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.train_losses.append(loss.detach())
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            logits = self.net(x)
            # per sample: the set's mean loss and accuracy, not the mean of the batch means (the last batch is short)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            self.valid_losses.append(torch.stack([loss, (logits.argmax(1) == y).sum(), loss.new_tensor(len(y))]))

        def on_validation_epoch_end(self) -> None:
            # a non-finite micro-batch loss made ELRA retrace; it stays out of the mean (set_train_loss refuses it)
            train = torch.stack(self.train_losses) if self.train_losses else torch.zeros(0)
            loss, correct, count = torch.stack(self.valid_losses).sum(0)
            train, valid, self.accuracy = train[torch.isfinite(train)], loss / count, (correct / count).item()
            # trainer.validate() outside a fit has no optimizer to feed: it only measures
            if self.trainer.state.fn == "fit" and len(train) and torch.isfinite(valid):
                optimizer = self.optimizers().optimizer
                optimizer.set_train_loss(train.mean().item())
                optimizer.set_valid_loss(valid.item())
            self.train_losses, self.valid_losses = [], []

        def configure_callbacks(self):
            return [SyncBeforeCheckpoint()]

        def on_fit_start(self) -> None:
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                raise ValueError(
                    f"precision={self.trainer.precision!r} steps through a GradScaler, which calls ELRA's step() "
                    "without the loss, and ELRA refuses torch's GradScaler (it would unscale the gradients ELRA may "
                    "still be summing): use precision="
                    "'bf16-mixed' or '32' (or a loop of your own with elra.ElraGradScaler)"
                )

        def on_train_epoch_start(self) -> None:
            # at each epoch's start, before its first step: a GradientAccumulationScheduler sets
            # accumulate_grad_batches there
            if self.trainer.accumulate_grad_batches != 1 or self.trainer.gradient_clip_val:
                raise ValueError(
                    "ELRA needs every micro-batch's own loss and its unclipped gradient: drop accumulate_grad_batches "
                    "and gradient_clip_val, also a GradientAccumulationScheduler (ElraOptimizer(batch_multiplier=...) "
                    "averages micro-batches)"
                )

        def zero_grad(self, set_to_none: bool = True) -> None:
            """Lightning clears the gradients before fitting: ELRA's ``zero_grad`` keeps those it is still
            collecting, restored from a ``ckpt_path`` taken mid-collection."""
            optimizers = self.trainer.optimizers if self._trainer is not None else []
            if not optimizers:
                super().zero_grad(set_to_none)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=set_to_none)

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            # the losses not yet fed to set_train_loss, a row per rank (Lightning writes rank 0's checkpoint; under
            # DDP the other ranks resumed with rank 0's)
            local = torch.stack(self.train_losses) if self.train_losses else torch.zeros(0)
            rows = self.all_gather(local) if self.trainer.world_size > 1 else local.unsqueeze(0)
            checkpoint["train_losses"] = rows.cpu()

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            rows = torch.as_tensor(checkpoint.get("train_losses", []))
            if rows.dim() == 2 and len(rows) == self.trainer.world_size:
                rows = rows[self.global_rank]  # each rank its own; on another number of ranks, each all of them
            self.train_losses = list(rows.flatten())

        def configure_optimizers(self):
            return ElraOptimizer(
                self.parameters(), None, batch_size, 10, lr=1e-5, batch_multiplier=batch_multiplier,
                total_steps=self.trainer.estimated_stepping_batches,
            )

        def on_train_start(self) -> None:
            # after a ckpt_path's restore, which brought the checkpoint's budget: this fit's (max_epochs may have grown)
            self.optimizers().optimizer.total_steps = self.trainer.estimated_stepping_batches

    return DigitsClassifier()


def train(epochs: int, batch_size: int = 32) -> tuple[float, dict]:
    torch.manual_seed(0)
    module = build_module(batch_size)
    train_loader, valid_loader = digits_loaders(batch_size)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_loader, valid_loader)
    return module.accuracy, trainer.optimizers[0].stats


if __name__ == "__main__":
    if L is None:
        print("Lightning is not installed (pip install lightning); nothing to run.")
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    epochs = parser.parse_args().epochs
    if epochs < 1:  # Lightning's -1 (no end) leaves ELRA's step budget without a number
        parser.error(f"--epochs must be at least 1, got {epochs}")
    accuracy, stats = train(epochs)
    print(f"validation accuracy {accuracy:.3f}, ELRA real steps {stats['real_steps']}, lr {stats['lr']:.3g}")
