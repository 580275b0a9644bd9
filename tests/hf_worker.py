"""A tiny GPT-2 on synthetic tokens; the Accelerate loop and ElraTrainer run on 1 and 2 processes.

Needs transformers and accelerate; the test modules skip before importing it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from benchmarks.ranks import as_gloo_rank  # noqa: E402
from elra import ElraOptimizer  # noqa: E402
from hf_trainer import CONTEXT, VOCAB, CountingSequences  # noqa: E402  (the example's data, learnable)


def tiny_gpt2(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype)


def accelerate_train(steps: int, multiplier: int, global_batch: int, out: Path) -> None:
    """The README's Accelerate loop on the float64 tiny GPT-2; each process writes what it saw.

    ``split_batches``: each process gets its slice of the same global batch, so
    1 and 2 processes train on the same data. A DDP comm hook records in which
    micro-steps gradients were all-reduced. The run saves its state after
    micro-step 5 (ELRA is collecting); a second run resumes from there (``resumed``).
    """
    from accelerate import Accelerator, DataLoaderConfiguration

    from elra.integrations.accelerate import accumulate, elra_optimizer

    def run(resume: bool):
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
        model = tiny_gpt2(dtype=torch.float64)
        optimizer = ElraOptimizer(model.parameters(), None, global_batch, VOCAB, lr=1e-4, batch_multiplier=multiplier)
        loader = torch.utils.data.DataLoader(CountingSequences(steps * global_batch, seed=1), batch_size=global_batch)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if resume:
            accelerator.load_state(str(out / "accelerate_state"))
            loader = accelerator.skip_first_batches(loader, 5)

        reduced = []
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):

            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def count_allreduce(state, bucket):
                reduced.append(True)
                return allreduce_hook(state, bucket)

            model.register_comm_hook(torch.distributed.group.WORLD, count_allreduce)
        synced, real_steps = [], []
        for i, batch in enumerate(loader, 5 if resume else 0):
            optimizer.zero_grad()
            before = len(reduced)
            with accumulate(accelerator, model, optimizer):
                loss = model(**batch).loss
                accelerator.backward(loss)
            optimizer.step(loss)
            synced.append(len(reduced) > before)
            real_steps.append(optimizer.optimizer.stats["real_steps"])
            if i == 4 and not resume:
                elra_optimizer(optimizer).sync_pending_grads()  # each process collected its own sums
                accelerator.save_state(str(out / "accelerate_state"))
        params = {name: p.detach().clone() for name, p in accelerator.unwrap_model(model).named_parameters()}
        name = "resumed" if resume else "rank"
        torch.save(
            {"params": params, "stats": optimizer.optimizer.stats, "synced": synced, "real_steps": real_steps},
            out / f"{name}{accelerator.process_index}.pt",
        )

    run(resume=False)
    run(resume=True)


def trainer_train(out: Path) -> None:
    """ElraTrainer on the float64 tiny GPT-2; real steps (multiplier 3) straddle Trainer's chunks of 2.

    ``split_batches``: each process trains on its slice of the same global batch.
    The run saves a checkpoint at Trainer step 5 (micro-batch 10: ELRA is collecting, train losses not yet fed);
    a second run resumes from the first one (``trainer_resumed``).
    """
    from transformers import TrainingArguments

    from elra.integrations.transformers import ElraTrainer

    def run(output_dir: Path, resume: Path | None = None):
        model = tiny_gpt2(dtype=torch.float64)
        optimizer = ElraOptimizer(model.parameters(), None, 8, VOCAB, lr=1e-4, weight_decay=0.01, batch_multiplier=3)
        args = TrainingArguments(
            output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=16,
            gradient_accumulation_steps=2, max_steps=9, eval_strategy="steps", eval_steps=4, logging_steps=4,
            save_strategy="steps", save_steps=5, report_to=[], use_cpu=True,
            disable_tqdm=True, seed=0, accelerator_config={"split_batches": True},
        )
        trainer = ElraTrainer(
            model=model, args=args, train_dataset=CountingSequences(64, 0), eval_dataset=CountingSequences(32, 1),
            optimizers=(optimizer, None),
        )
        fed, set_train_loss = [], optimizer.set_train_loss
        optimizer.set_train_loss = lambda loss: (fed.append(loss), set_train_loss(loss))[1]
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        state = optimizer.controller.state
        return {
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "stats": optimizer.stats,
            "losses": (state.train_loss, state.valid_loss),
            "fed": fed,  # the train losses of the evaluations, one per evaluation
            "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        }, trainer.args.process_index

    whole, index = run(out / "trainer")
    torch.save(whole, out / f"trainer{index}.pt")
    resumed, index = run(out / "trainer_resumed", out / "trainer" / "checkpoint-5")
    torch.save(resumed, out / f"trainer_resumed{index}.pt")


def trainer_compiled(out: Path) -> None:
    """ElraTrainer with ``torch_compile=True``: Trainer's model is torch.compile's wrapper (around DDP on 2 processes).

    Compilation itself is switched off (its wrapper stays): the run only needs whom ELRA's sync decision reaches.
    Real steps of 3 micro-batches straddle Trainer's no_sync chunks of 2.
    """
    from transformers import TrainingArguments

    from elra.integrations.transformers import ElraTrainer

    model = tiny_gpt2(dtype=torch.float64)
    optimizer = ElraOptimizer(model.parameters(), None, 8, VOCAB, lr=1e-4, batch_multiplier=3)
    args = TrainingArguments(
        output_dir=str(out / "compiled"), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=6,
        logging_steps=6, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        accelerator_config={"split_batches": True}, torch_compile=True, torch_compile_backend="eager",
    )
    trainer = ElraTrainer(model=model, args=args, train_dataset=CountingSequences(64, 0), optimizers=(optimizer, None))
    with torch._dynamo.config.patch(disable=True):
        trainer.train()
    wrapped = trainer.model_wrapped
    torch.save(
        {
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "stats": optimizer.stats,
            "ddp": isinstance(getattr(wrapped, "_orig_mod", None), torch.nn.parallel.DistributedDataParallel),
        },
        out / f"compiled{trainer.args.process_index}.pt",
    )


def accelerate_compiled_sums(global_batch: int, out: Path) -> None:
    """The README's Accelerate loop with the prepared model compiled (as ``dynamo_backend`` does: around DDP),
    compilation switched off: two micro-batches of three collected, then ``sync_pending_grads``; saves ``.grad``."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from elra.integrations.accelerate import accumulate, elra_optimizer

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    model = tiny_gpt2(dtype=torch.float64)
    optimizer = ElraOptimizer(model.parameters(), None, global_batch, VOCAB, lr=1e-4, batch_multiplier=3)
    loader = torch.utils.data.DataLoader(CountingSequences(2 * global_batch, seed=1), batch_size=global_batch)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    wrapped = torch.compile(wrapped, backend="eager")
    with torch._dynamo.config.patch(disable=True):
        for batch in loader:
            optimizer.zero_grad()
            with accumulate(accelerator, wrapped, optimizer):
                loss = wrapped(**batch).loss
                accelerator.backward(loss)
            optimizer.step(loss)
    elra_optimizer(optimizer).sync_pending_grads()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.save(grads, out / f"compiled_sums{accelerator.process_index}.pt")


def _both(out: Path, steps: int, multiplier: int, global_batch: int) -> None:
    accelerate_train(steps, multiplier, global_batch, out)
    accelerate_compiled_sums(global_batch, out)
    trainer_train(out)
    trainer_compiled(out)


def spawned_process(index: int, store: str, steps: int, multiplier: int, global_batch: int, out: str) -> None:
    """Spawned processes 0 and 1 form a 2-process job; process 2 runs the same loop alone.

    One spawn for both runs: each process pays the transformers import once, side by side.
    Each runs the Accelerate loop, then ElraTrainer.
    """
    if index == 2:
        torch.set_num_threads(1)
        _both(Path(out) / "one", steps, multiplier, global_batch)
        sys.stdout.flush()
        os._exit(0)
    os.environ.update(
        RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1"
    )
    as_gloo_rank(index, 2, store, lambda: _both(Path(out) / "two", steps, multiplier, global_batch))
