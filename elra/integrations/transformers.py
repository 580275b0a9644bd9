"""``ElraTrainer``: ``transformers.Trainer`` driving ``ElraOptimizer``.

Trainer calls ``optimizer.step()`` without a loss once per accumulation chunk
of ``gradient_accumulation_steps`` micro-batches, clips gradients before it,
runs a learning-rate scheduler after it and clears the gradients with
``model.zero_grad()``. ELRA needs each micro-batch's loss, averages the
micro-batch gradients itself (its batch multiplier, which grows), owns its
rate and must see the gradients as they are. So ``ElraTrainer``:

- hands ELRA every micro-batch's own mean loss right after its backward
  (``step(loss)``: collect or real step); Trainer's argument-less ``step()``
  then has nothing left to do;
- builds ELRA with ``batch_multiplier = gradient_accumulation_steps``: the
  first real steps average exactly the micro-batches Trainer would have
  accumulated, and ELRA grows the multiplier from there;
- all-reduces DDP gradients in exactly the backward passes that complete a
  real step (ELRA's, not Trainer's chunk boundary, decides);
- keeps the gradients ELRA is still collecting through Trainer's
  ``model.zero_grad()``, so they also reach checkpoints;
- puts a scheduler in Trainer's slot that only reports ELRA's rate, and
  turns gradient clipping off (``max_grad_norm`` would rescale the gradients
  ELRA measures);
- feeds ``set_train_loss``/``set_valid_loss`` at every evaluation during
  training and adds ELRA's ``stats`` to Trainer's logs;
- gives the ELRA it builds the run's step budget (``total_steps``: the
  micro-batches of Trainer's ``max_steps`` optimizer steps, an epoch's last
  chunk shorter), also over a resumed checkpoint's and for a second
  ``train()`` call: the cooldown Trainer's own schedules end with.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:
    raise ImportError(
        "elra.integrations.transformers needs transformers and accelerate: pip install 'elra[transformers]'"
    ) from error

from ..optimizer import ElraOptimizer
from ..sync import tell_optimizer, uncompiled

logger = logging.getLogger("elra")

_TRAIN_LOSS_KEY = "elra_trainer_train_loss"
LOGGED_STATS = ("rate", "batch_multiplier", "retraces", "real_steps", "weight_decay")


class ElraRate:
    """Trainer's scheduler slot: reports ELRA's step length and changes nothing.

    ELRA owns its rate; Trainer logs ``get_last_lr()`` as ``learning_rate``.
    """

    def __init__(self, optimizer: ElraOptimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        """Nothing to schedule."""

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the rate lives in the optimizer's state."""


class _StepTaken:
    """The optimizer as Trainer's loop sees it: every step was already taken.

    ``ElraTrainer.training_step`` hands ELRA each micro-batch's loss right
    after its backward; Trainer's own ``optimizer.step()`` at the end of an
    accumulation chunk has nothing left to do. Checkpoints carry the
    trainer's running train loss along with ELRA's state; everything else
    (``param_groups``, ``zero_grad``, ``stats`` ...) is ELRA's.
    """

    def __init__(self, elra: ElraOptimizer, trainer: "ElraTrainer") -> None:
        self.elra = elra
        self.trainer = trainer

    def step(self, closure=None) -> None:
        if closure is not None:
            raise TypeError("ElraTrainer hands ELRA each micro-batch loss itself; call step() without a closure")
        if not self.trainer._fed_elra_step:  # an override of training_step that skipped ElraTrainer's trained nothing
            raise RuntimeError(
                "no micro-batch loss reached ELRA since Trainer's last optimizer step: ElraTrainer.training_step hands "
                "each loss to ELRA, so an override of training_step must call super().training_step(...)"
            )
        self.trainer._fed_elra_step = False

    def state_dict(self) -> dict[str, Any]:
        return {**self.elra.state_dict(), _TRAIN_LOSS_KEY: self.trainer._train_loss_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.trainer._load_train_loss_state(state_dict.pop(_TRAIN_LOSS_KEY, [0.0, 0.0]))
        self.elra.load_state_dict(state_dict)
        self.trainer._apply_step_budget()
        self.trainer._keep_collected()  # the restored partial sums, until Trainer's model.zero_grad() passed

    def __getattr__(self, name: str) -> Any:
        if name == "elra":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.elra, name)


@contextmanager
def _sync_when_elra_steps(model: torch.nn.Module, optimizer: ElraOptimizer) -> Iterator[None]:
    """Around forward and backward: DDP all-reduces iff this micro-batch completes a real step.

    Trainer switches DDP's sync off for all but the last micro-batch of its
    chunk; ELRA's real steps need not fall there (its multiplier grows, and
    the last chunk of an epoch may be short), so ELRA's ``collecting`` decides.
    DDP reads the flag at forward time. While collecting, ELRA learns that each
    process holds its own partial sums (as under ``elra.grad_sync``), which a
    checkpoint must average first (``ElraTrainer._save_checkpoint``).
    With ``torch_compile=True`` Trainer hands over torch.compile's wrapper around DDP: the flag is DDP's.
    """
    model = uncompiled(model)
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        yield
        return
    tell_optimizer(model, optimizer, unsynced=optimizer.collecting)
    before = model.require_backward_grad_sync
    model.require_backward_grad_sync = not optimizer.collecting
    try:
        yield
    finally:
        model.require_backward_grad_sync = before


def _classes(model: torch.nn.Module) -> int:
    """ELRA's ``classes``: the vocabulary of a language-model head, else the number of labels."""
    config = getattr(model, "config", None)
    if config is None:
        return 2
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return max(2, int(getattr(text_config, "vocab_size", 2)))
    return max(2, int(getattr(config, "num_labels", 2)))


class _ElraHooks(TrainerCallback):
    """Puts back the gradients ELRA is collecting after Trainer's ``model.zero_grad()``; notes a ``train()``
    call's start (an evaluation before its first micro-batch feeds nothing)."""

    def __init__(self, trainer: "ElraTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._trained = False
        self.trainer._restore_collected()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._restore_collected()


class ElraTrainer(Trainer):
    """``transformers.Trainer`` training with ``ElraOptimizer``; same arguments.

    Without ``optimizers``, it builds ``ElraOptimizer`` from the
    ``TrainingArguments``: weight decay ``args.weight_decay`` for the weights
    (its default 0: ELRA's automatic decay; ``elra_options={"weight_decay": 0.0}``
    for none), none for biases and norms (Trainer's ``get_decay_parameter_names``), first
    step length ``args.learning_rate``, ``batch_size`` the per-device batch,
    ``batch_multiplier`` the ``gradient_accumulation_steps``, ``classes`` the
    model's vocabulary (language models) or number of labels.
    ``total_steps`` the run's micro-batches (those of ``max_steps`` optimizer
    steps of ``gradient_accumulation_steps`` each, an epoch's last one
    shorter where the epoch does not divide: the step length cools down over
    their last fifth; also when resuming, where ``max_steps`` may have grown,
    and for a second ``train()`` call, which Trainer counts from step 0 again;
    not for P2M).
    ``elra_options`` (a dict) overrides or adds ``ElraOptimizer`` arguments
    (e.g. ``momentum``, ``preconditioner``, ``classes``; ``total_steps=None``
    for no budget). Or pass your own: ``optimizers=(ElraOptimizer(...), None)``.

    ELRA owns its rate: a scheduler is refused, ``lr_scheduler_type`` and the
    warmup arguments are ignored. Gradients are never clipped
    (``max_grad_norm`` is ignored). ``fp16``, DeepSpeed, FSDP and models sharded
    at load time (``from_pretrained(distributed_config=...)``) are refused (use ``bf16``, or DDP).
    """

    _feed_elra = True  # off while Trainer evaluates the sets of a dict one by one: the outer call feeds the first

    def __init__(self, *args: Any, elra_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.elra_options = dict(elra_options or {})
        self.elra_optimizer: ElraOptimizer | None = None
        self._check_supported()
        if self.args.max_grad_norm:
            logger.info("ElraTrainer does not clip gradients: max_grad_norm=%g is ignored", self.args.max_grad_norm)
            self.args = copy.copy(self.args)
            self.args.max_grad_norm = 0.0
        # finite micro-batch losses since the last evaluation: [sum, count], on the device (no host sync)
        self._train_losses = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        self._saved_train_losses: list[float] | None = None  # every process's [sum, count], while checkpointing
        self._collected: dict[torch.Tensor, torch.Tensor] = {}
        self._budgets = False  # whether the ELRA is built here without a total_steps of elra_options
        self._max_steps: int | None = None  # Trainer's optimizer steps of this run: the step budget's end
        self._epoch_shape: tuple[int, int | None] | None = None  # (optimizer steps, micro-batches) per epoch
        self._trained = False  # whether this train() call ran a micro-batch yet
        self._fed_elra_step = False  # whether training_step handed ELRA a loss since Trainer's last optimizer step
        if self.optimizer is not None:
            self._adopt(self.optimizer)
        self.add_callback(_ElraHooks(self))

    def _check_supported(self) -> None:
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            raise ValueError("ElraTrainer builds ElraOptimizer itself: drop optimizer_cls_and_kwargs")
        if self.optimizer is not None and self.elra_options:
            raise ValueError("elra_options configure the ElraOptimizer that ElraTrainer builds; you passed your own")
        if self.optimizer is not None and not isinstance(self.optimizer, (ElraOptimizer, _StepTaken)):
            raise TypeError(
                f"ElraTrainer trains with ElraOptimizer, got {type(self.optimizer).__name__}; "
                "use transformers.Trainer for other optimizers"
            )
        if self.lr_scheduler is not None and not isinstance(self.lr_scheduler, ElraRate):
            raise ValueError(
                "ELRA sets its own rate, a scheduler would only mislabel it: pass optimizers=(elra_optimizer, None)"
            )
        # fp16 also comes from the environment (``accelerate launch --mixed_precision fp16``, ``accelerate config``)
        if self.args.fp16 or self.accelerator.mixed_precision == "fp16" or self.accelerator.scaler is not None:
            raise ValueError(
                "ElraTrainer does not support fp16 (fp16=True or ACCELERATE_MIXED_PRECISION=fp16): Trainer's "
                "GradScaler would hand ELRA scaled gradients and skip steps behind its back; use bf16=True or float32"
            )
        optim = str(getattr(self.args.optim, "value", self.args.optim))  # an OptimizerNames member, or a string
        if "lomo" in optim:  # LOMO fuses its update into backward (Trainer hands the backward its learning_rate)
            raise ValueError(f"ElraTrainer steps ELRA itself: optim={optim!r} would fuse another update into "
                             "backward; leave optim at its default (other optim values are ignored)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "ElraTrainer supports one process and DDP; DeepSpeed and FSDP run their own optimizer step. "
                "For FSDP2, write the loop with ElraOptimizer and elra.grad_sync (see the README)"
            )
        if getattr(self, "is_distributed_loading_by_transformers", False):
            raise ValueError(
                "ElraTrainer supports one process and DDP; a model sharded at load time "
                "(from_pretrained(distributed_config=...)) reduces its gradients at Trainer's accumulation "
                "boundaries, not at ELRA's real steps. Write the loop with ElraOptimizer and elra.grad_sync instead"
            )

    # ------------------------------------------------------- optimizer
    def create_optimizer(self, model: torch.nn.Module | None = None):
        """ElraOptimizer with Trainer's parameter groups (no decay for biases and norms)."""
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            weight_decay = self.elra_options.get("weight_decay", self.args.weight_decay or None)
            if weight_decay is None:
                logger.info("ElraTrainer: weight_decay=0 (TrainingArguments' default) -> ELRA's automatic decay; "
                            "elra_options={'weight_decay': 0.0} trains without")
            groups = [
                {"params": [p for name, p in trained if name in decay], "weight_decay": weight_decay},
                {"params": [p for name, p in trained if name not in decay], "weight_decay": 0.0},
            ]
            options = {
                "batch_size": self.args.per_device_train_batch_size,
                "classes": _classes(model),
                "lr": self.args.learning_rate,
                "weight_decay": weight_decay,
                "batch_multiplier": self.args.gradient_accumulation_steps,
                **self.elra_options,
            }
            self.optimizer = ElraOptimizer([g for g in groups if g["params"]], None, **options)
            self._budgets = "total_steps" not in self.elra_options
        self._adopt(self.optimizer)
        return self.optimizer

    def set_initial_training_values(self, *args: Any, **kwargs: Any):
        """Trainer's own; notes an epoch's optimizer steps and micro-batches (its second and sixth values: the
        dataloader's length, ``None`` without one) for the step budget."""
        values = super().set_initial_training_values(*args, **kwargs)
        self._epoch_shape = (values[1], values[5])
        return values

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """A scheduler that reports ELRA's rate and changes nothing; the step budget of the ELRA built here."""
        if self.lr_scheduler is None:
            self.lr_scheduler = ElraRate(self.elra_optimizer)
        if self._budgets:
            self._max_steps = num_training_steps
            self._apply_step_budget()
        return self.lr_scheduler

    def _micro_batches(self, steps: int) -> int:
        """The micro-batches of Trainer's first ``steps`` optimizer steps: chunks of ``gradient_accumulation_steps``,
        each epoch's last one shorter where its micro-batches do not divide (Trainer counts it as a whole step)."""
        accumulation = self.args.gradient_accumulation_steps
        steps_per_epoch, per_epoch = self._epoch_shape or (None, None)
        if not steps_per_epoch or not per_epoch:
            return steps * accumulation
        epochs, rest = divmod(steps, steps_per_epoch)
        return epochs * per_epoch + rest * accumulation

    def _apply_step_budget(self) -> None:
        """This run's budget, counted from where ELRA stands at Trainer's step: over a resumed checkpoint's (a
        run made longer cools down at its new end), and for a second ``train()`` call, which Trainer counts from
        step 0 again while ELRA goes on from the first one's end."""
        elra = self.elra_optimizer
        if self._max_steps is None or elra.preconditioner is None:
            return  # P2M has its own schedule
        rest = self._micro_batches(self._max_steps) - self._micro_batches(self.state.global_step)
        if rest <= 0:  # a finished run relaunched from its last checkpoint: Trainer trains nothing, the budget stays
            return  # (before the checkpoint loads the fresh ELRA has taken none: a budget of 0 or less raised)
        budget = elra.micro_batches_taken + rest
        if elra.total_steps == budget:
            return
        if elra.total_steps is not None:
            logger.info(
                "ElraTrainer: step budget %d micro-batches (this run's max_steps of gradient_accumulation_steps), "
                "not the %d the optimizer held", budget, elra.total_steps,
            )
        elra.total_steps = budget

    def _adopt(self, optimizer: ElraOptimizer | _StepTaken) -> None:
        """Put the step-less view of ELRA in Trainer's slot."""
        if isinstance(optimizer, _StepTaken):
            return
        self.elra_optimizer = optimizer
        self.optimizer = _StepTaken(optimizer, self)

    # ------------------------------------------------------------ step
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one micro-batch, then ``step(loss)``: ELRA collects or steps.

        The backward uses the micro-batch's own mean loss (``num_items_in_batch``
        is not used): ELRA averages the micro-batches itself. The returned loss
        is divided by the chunk length, as Trainer's, so Trainer logs the mean.
        """
        elra = self.elra_optimizer
        chunk = getattr(self, "current_gradient_accumulation_steps", 1)
        if 0 < self.state.max_steps <= self.state.global_step:
            # a finished run relaunched from its last checkpoint: where max_steps ends inside an epoch, Trainer runs
            # the chunk it resumes into before its stop check. Plain Trainer's step there is at its linear
            # schedule's rate of 0; ELRA's would be a real one (1e-3 off the finished run): the loss, no step
            self._fed_elra_step = True  # deliberately: Trainer's optimizer.step() after it has nothing to do
            with torch.no_grad():
                return self.compute_loss(model, inputs).detach() / chunk
        elra.zero_grad()  # clears only after a real step; keeps what ELRA collects
        self.current_gradient_accumulation_steps = 1
        try:
            with _sync_when_elra_steps(model, elra):
                loss = super().training_step(model, inputs, None)
        finally:
            self.current_gradient_accumulation_steps = chunk
        elra.step(loss)  # a non-finite loss makes ELRA retrace; it stays out of the train-loss mean
        self._trained = self._fed_elra_step = True
        finite = torch.isfinite(loss)
        self._train_losses += torch.stack([torch.where(finite, loss, 0.0), finite]).to(torch.float64)
        self._keep_collected()
        return loss / chunk

    def _keep_collected(self) -> None:
        elra = self.elra_optimizer
        self._collected = (
            {p: p.grad for p in elra._params() if p.grad is not None}
            if elra.micro_batches
            else {}
        )

    def _restore_collected(self) -> None:
        """Put the collected gradients back after Trainer's ``model.zero_grad()``.

        Trainer logs the gradient norm with ``clip_grad_norm_(..., inf)`` after ELRA's step, which multiplies
        them by 1 in place: ELRA notes their versions again, or ``state_dict()`` would take that for a backward.
        """
        for p, grad in self._collected.items():
            if p.grad is None:
                p.grad = grad
        self.elra_optimizer._note_kept_versions()

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        """Trainer's checkpoint, after averaging the partial sums each DDP process collected with sync off.

        Every process gets here, process 0 writes ``optimizer.pt``: without the average it held process 0's
        sums alone, and a run resumed mid-collection went another way. The average is what the real step
        would have reduced (it is linear), so the run goes on as it would have. The train losses not yet fed
        go in per process too (process 0's alone counted twice on 2 processes at the next evaluation).
        """
        if self.elra_optimizer is not None:
            self.elra_optimizer.sync_pending_grads()
            self._keep_collected()
        self._saved_train_losses = self.accelerator.gather(self._train_losses).tolist()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saved_train_losses = None

    # ---------------------------------------------- losses and logs
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation; during training it also feeds ELRA's weight-decay control.

        The train loss is the mean finite micro-batch loss since the previous
        evaluation (over all processes), the validation loss Trainer's
        ``eval_loss``. With several evaluation sets the first one counts (not
        finite: nothing is fed, as with one set). An evaluation inside
        ``elra_optimizer.boosted()`` (of the boost mean) feeds nothing, and so
        does one before a ``train()`` call's first micro-batch (``eval_on_start``):
        a resumed run's train losses wait for the evaluation that took them in
        the run it continues.
        """
        sets = self.eval_dataset if eval_dataset is None else eval_dataset
        several = isinstance(sets, dict) and bool(sets)
        feed, self._feed_elra = self._feed_elra, self._feed_elra and not several  # each set comes back through here
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._feed_elra = feed
        valid = metrics.get(f"{metric_key_prefix}_{next(iter(sets))}_loss" if several else f"{metric_key_prefix}_loss")
        elra = self.elra_optimizer
        fed = feed and self.is_in_train and self._trained and valid is not None
        if fed and elra is not None and not elra._boost_swapped:
            total, count = self.accelerator.reduce(self._train_losses, reduction="sum").tolist()
            if count and math.isfinite(valid):
                self.elra_optimizer.set_train_loss(total / count)
                self.elra_optimizer.set_valid_loss(valid)
                self._train_losses.zero_()
            elif count:
                logger.warning("evaluation loss %s is not finite: not fed to ELRA's weight-decay control", valid)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, with ELRA's rate, batch multiplier, retraces, real steps and weight decay."""
        if self.elra_optimizer is not None and ("loss" in logs or "train_loss" in logs):
            stats = self.elra_optimizer.stats
            logs = {**logs, **{f"elra_{name}": stats[name] for name in LOGGED_STATS}}
        super().log(logs, start_time)

    def _train_loss_state(self) -> list[float]:
        """``[sum, count]`` of every process in turn (saved by a checkpoint), else this process's."""
        return self._train_losses.tolist() if self._saved_train_losses is None else self._saved_train_losses

    def _load_train_loss_state(self, state: list[float]) -> None:
        """Each process its own ``[sum, count]``; on another number of processes, process 0 takes the totals
        times new/saved processes: every process counts each micro-batch, so a saved micro-batch weighs in the
        evaluation's mean as a new one does (taken as they were, 2 processes resumed on 1 counted the saved
        micro-batches twice)."""
        pairs = torch.tensor(state, dtype=torch.float64).reshape(-1, 2)
        index, processes = self.args.process_index, self.args.world_size
        if len(pairs) == processes:
            self._train_losses.copy_(pairs[index])
        elif index == 0:
            self._train_losses.copy_(pairs.sum(0) * (processes / len(pairs)))
        else:
            self._train_losses.zero_()
