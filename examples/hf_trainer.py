"""ELRA in Hugging Face's Trainer: a tiny GPT-2 learns synthetic token sequences.

    pip install -e '.[transformers]' && python examples/hf_trainer.py [--steps 300] [--accumulation 2]

``ElraTrainer`` takes Trainer's arguments and builds ``ElraOptimizer`` from
them (first step length ``learning_rate``, decay for weights but not for
biases and norms, ``gradient_accumulation_steps`` as ELRA's smallest batch
multiplier). The sequences count up in steps of 3 modulo 64, with 10% random
tokens; a model that guesses uniformly scores log(64) = 4.16. No download:
the model is built from a config. Prints one line per evaluation and writes
only to a temporary directory (or ``--output-dir``). Exits with a message
(status 0) when transformers is not installed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

try:
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, TrainerCallback, TrainingArguments

    from elra.integrations.transformers import ElraTrainer
except ImportError:
    ElraTrainer = None

VOCAB, CONTEXT = 64, 32


class CountingSequences(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=gen)
        ids = (start + 3 * torch.arange(CONTEXT)) % VOCAB
        noise = torch.rand(count, CONTEXT, generator=gen) < 0.1
        self.ids = torch.where(noise, torch.randint(0, VOCAB, (count, CONTEXT), generator=gen), ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def print_evaluations():
    class PrintEvaluations(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.train = logs
            if "eval_loss" in logs:
                t = self.train
                print(
                    f"step {state.global_step:4d}  train loss {t['loss']:.3f}  eval loss {logs['eval_loss']:.3f}  "
                    f"ELRA rate {t['elra_rate']:.3g}  batch multiplier {t['elra_batch_multiplier']}  "
                    f"retraces {t['elra_retraces']}"
                )

    return PrintEvaluations()


def train(steps: int = 300, accumulation: int = 2, output_dir: str | None = None) -> tuple[list[float], dict]:
    """Train; returns the evaluation losses and ELRA's final stats."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, max_steps=steps, per_device_train_batch_size=16,
            gradient_accumulation_steps=accumulation, learning_rate=1e-4, weight_decay=0.01,
            eval_strategy="steps", eval_steps=max(1, steps // 6), logging_steps=max(1, steps // 6),
            save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
        )
        trainer = ElraTrainer(
            model=model, args=args, train_dataset=CountingSequences(2048, 0), eval_dataset=CountingSequences(256, 1),
            callbacks=[print_evaluations()],
        )
        trainer.remove_callback(PrinterCallback)  # our one line per evaluation instead of every log dict
        trainer.train()
    evaluations = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return evaluations, trainer.elra_optimizer.stats


if __name__ == "__main__":
    if ElraTrainer is None:
        print("transformers is not installed (pip install -e '.[transformers]'); nothing to run.")
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="Trainer steps (each of --accumulation micro-batches)")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--output-dir", default=None, help="Trainer's output_dir (default: a temporary directory)")
    options = parser.parse_args()
    for name in ("steps", "accumulation"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(options, name)}")
    losses, stats = train(options.steps, options.accumulation, options.output_dir)
    print(f"eval loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform guess 4.159); ELRA real steps {stats['real_steps']}")
