"""ElraTrainer: transformers.Trainer driving ELRA, against a hand-written ELRA loop and across a resume."""

import json
import importlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402

import elra.line_control  # noqa: E402
from elra import ElraOptimizer  # noqa: E402
from elra.control import validation_lag  # noqa: E402
from elra.integrations.transformers import ElraTrainer  # noqa: E402
from hf_worker import VOCAB, CountingSequences, tiny_gpt2  # noqa: E402


def _args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=32,
        gradient_accumulation_steps=2, learning_rate=1e-4, max_steps=12, logging_steps=4, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**options, **overrides})


def _recording_trainer(*args, **kwargs):
    """An ElraTrainer that keeps the micro-batches Trainer feeds it, in order."""
    batches = []

    class Recording(ElraTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording(*args, **kwargs), batches


def _replay(batches, make_optimizer):
    """The hand-written ELRA loop of the README on the micro-batches Trainer fed."""
    model = tiny_gpt2()
    optimizer = make_optimizer(model)
    for batch in batches:
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step(loss)
    return model, optimizer


def _trainer_groups(model, weight_decay):
    """Decay for the weights, none for biases and GPT-2's LayerNorms (ln_1, ln_2, ln_f)."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith(".weight") and ".ln_" not in n]
    rest = [p for n, p in named if not n.endswith(".weight") or ".ln_" in n]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("multiplier", [None, 3], ids=["multiplier-from-accumulation", "own-optimizer-multiplier-3"])
def test_trainer_takes_the_steps_of_a_hand_written_elra_loop(tmp_path, multiplier):
    """Each micro-batch's own loss reaches ELRA, nothing clips, schedules or drops collected gradients.

    With the optimizer built by ElraTrainer, ELRA's multiplier is the accumulation (2);
    with a given optimizer of multiplier 3, real steps straddle Trainer's chunks of 2.
    """
    model = tiny_gpt2()
    args = _args(tmp_path, weight_decay=0.01)
    if multiplier is None:
        trainer, batches = _recording_trainer(model=model, args=args, train_dataset=CountingSequences(64, 0))

        def make(replayed):
            return ElraOptimizer(
                _trainer_groups(replayed, 0.01), None, 8, VOCAB, lr=1e-4, weight_decay=0.01, batch_multiplier=2,
                total_steps=24,  # max_steps 12 x accumulation 2
            )
    else:
        given = ElraOptimizer(model.parameters(), None, 8, VOCAB, lr=1e-4, batch_multiplier=multiplier)
        trainer, batches = _recording_trainer(
            model=model, args=args, train_dataset=CountingSequences(64, 0), optimizers=(given, None)
        )

        def make(replayed):
            return ElraOptimizer(replayed.parameters(), None, 8, VOCAB, lr=1e-4, batch_multiplier=multiplier)

    trainer.train()
    replayed, reference = _replay(batches, make)
    assert len(batches) == 24 and trainer.elra_optimizer.stats == reference.stats
    assert trainer.elra_optimizer.stats["real_steps"] == 24 // (multiplier or 2)
    for (name, p), q in zip(model.named_parameters(), replayed.parameters()):
        assert torch.equal(p, q), name


def test_trainer_learns_logs_elra_stats_and_feeds_the_weight_decay_control(tmp_path):
    model = tiny_gpt2()
    args = _args(
        tmp_path, gradient_accumulation_steps=1, weight_decay=0.01, max_steps=110, logging_steps=10,
        eval_strategy="steps", eval_steps=10,
    )
    trainer = ElraTrainer(model=model, args=args, train_dataset=CountingSequences(256, 0), eval_dataset=CountingSequences(64, 1))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    stats = trainer.elra_optimizer.stats
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"] and evals[-1] < 0.7 * evals[0]
    assert stats["real_steps"] + stats["retraces"] >= 110
    assert {k: logs[-1][f"elra_{k}"] for k in ("rate", "batch_multiplier", "retraces", "real_steps")} == {
        k: stats[k] for k in ("rate", "batch_multiplier", "retraces", "real_steps")
    }
    assert logs[-1]["learning_rate"] == stats["lr"]
    control = trainer.elra_optimizer.controller.state
    # the last evaluation's losses: Trainer's eval_loss, and the mean train loss of its interval
    assert control.valid_loss == evals[-1]
    assert control.train_loss == pytest.approx(logs[-1]["loss"], rel=1e-6)
    # fed to the controller, they set the decay in force: the configured one times the validation lag
    lag = validation_lag(control.train_loss, control.valid_loss, stats["batch_multiplier"])
    assert lag is not None and stats["weight_decay"] == pytest.approx(0.01 * lag, rel=1e-12)


@pytest.mark.parametrize("eval_on_start", [False, True])
def test_resume_from_a_trainer_checkpoint_equals_the_uninterrupted_run(tmp_path, eval_on_start):
    """Dropout on (RNG), shuffled data across epochs, a checkpoint between evaluations and mid-collection.

    Boost on: its mean travels in optimizer.pt (the resumed optimizer did not call enable_boost). With
    ``eval_on_start`` the resumed run's first evaluation fed the checkpoint's train losses to ELRA at once,
    where the uninterrupted run fed them with the next ones (the parameters drifted 1.6e-4 apart in a longer run).
    """

    def run(out, resume=None):
        model = tiny_gpt2(dropout=0.1)
        optimizer = ElraOptimizer(model.parameters(), None, 8, VOCAB, lr=1e-4, weight_decay=0.01, batch_multiplier=3)
        if resume is None:
            optimizer.enable_boost()
        args = _args(
            out, max_steps=14, save_strategy="steps", save_steps=5, eval_strategy="steps", eval_steps=4,
            per_device_eval_batch_size=16, eval_on_start=eval_on_start,
        )
        trainer = ElraTrainer(
            model=model, args=args, train_dataset=CountingSequences(64, 0), eval_dataset=CountingSequences(32, 1),
            optimizers=(optimizer, None),
        )
        feed = optimizer.set_train_loss
        optimizer.set_train_loss = lambda loss: fed.setdefault(out, {}).update({trainer.state.global_step: loss}) or feed(loss)
        trainer.train(resume_from_checkpoint=resume)
        return model, optimizer

    fed = {}  # the train losses fed to ELRA, by Trainer's step
    whole, whole_opt = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-5"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert json.loads(saved["param_groups"][0]["elra_controller"]["pending_losses"])  # saved mid-collection
    assert saved["elra_trainer_train_loss"][1] > 0  # and with train losses not yet fed to ELRA
    resumed, resumed_opt = run(tmp_path / "resumed", resume=str(checkpoint))
    assert list(fed[tmp_path / "whole"]) == [4, 8, 12, 14]
    assert fed[tmp_path / "resumed"] == {step: fed[tmp_path / "whole"][step] for step in (8, 12, 14)}
    assert resumed_opt.stats == whole_opt.stats and resumed_opt.stats["real_steps"] == 9
    assert resumed_opt.controller.state == whole_opt.controller.state
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(whole_opt.state[p]["boost"], resumed_opt.state[q]["boost"]), name


def test_the_trainer_gives_its_elra_the_runs_step_budget_also_over_a_resumed_checkpoints(tmp_path, monkeypatch):
    """max_steps x accumulation micro-batches; a run resumed with more max_steps cools down at its new end
    (these runs are too short for noise to dominate: the cooldown is let start at once)."""
    monkeypatch.setattr(elra.line_control, "COOLDOWN_SIGNAL", 1.0)

    def trainer(out, max_steps):
        args = _args(out, max_steps=max_steps, save_strategy="steps", save_steps=12)
        return ElraTrainer(model=tiny_gpt2(), args=args, train_dataset=CountingSequences(64, 0))

    first = trainer(tmp_path / "first", 12)
    first.train()
    cooled = first.elra_optimizer.controller.state
    assert first.elra_optimizer.total_steps == 24 and cooled.micro_steps == 24
    assert cooled.cooldown_eta > 0.0 and first.elra_optimizer.stats["lr"] == pytest.approx(0.02 * cooled.cooldown_eta)
    for max_steps in (12, 6):  # the finished run relaunched from its last checkpoint (raised: a budget of 0, -12)
        again = trainer(tmp_path / f"again-{max_steps}", max_steps)
        again.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-12"))
        assert again.elra_optimizer.total_steps == 24 and again.elra_optimizer.controller.state == cooled
        assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), again.model.parameters()))
    longer = trainer(tmp_path / "longer", 20)
    longer.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-12"))
    state = longer.elra_optimizer.controller.state
    assert longer.elra_optimizer.total_steps == 40 and state.micro_steps == 40
    # a new cooldown, from the length given back at the resume (not the old one's start, nor its floor)
    assert state.cooldown_eta != cooled.cooldown_eta and state.cooldown_eta > 0.1 * cooled.cooldown_eta


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_finished_run_ending_inside_an_epoch_relaunched_from_its_last_checkpoint_trains_nothing(tmp_path, accumulation):
    """Where max_steps ends inside an epoch, Trainer relaunched from the final checkpoint runs the chunk it
    resumes into before its stop check: ELRA took a real step past its budget (31 of 30, the weights 6.8e-4 off
    the finished run), or collected a micro-batch past it. Now that chunk trains nothing."""

    def trainer(out):
        args = _args(out, max_steps=7, gradient_accumulation_steps=accumulation, per_device_train_batch_size=4,
                     save_strategy="steps", save_steps=7)
        return ElraTrainer(model=tiny_gpt2(), args=args, train_dataset=CountingSequences(100, 0))  # 25 batches an epoch

    finished = trainer(tmp_path / "finished")
    finished.train()
    relaunched = trainer(tmp_path / "relaunched")
    relaunched.train(resume_from_checkpoint=str(tmp_path / "finished" / "checkpoint-7"))
    assert relaunched.elra_optimizer.stats == finished.elra_optimizer.stats
    assert relaunched.elra_optimizer.micro_batches_taken == finished.elra_optimizer.micro_batches_taken == 7 * accumulation
    assert all(torch.equal(p, q) for p, q in zip(finished.model.parameters(), relaunched.model.parameters()))


@pytest.mark.parametrize("epochs, max_steps, budget", [(2, -1, 18), (None, 7, 13)], ids=["epochs", "max_steps"])
def test_the_step_budget_counts_the_short_last_chunk_of_an_epoch(tmp_path, epochs, max_steps, budget):
    """An epoch of 9 micro-batches in chunks of 2 is 5 optimizer steps, the last of one micro-batch: Trainer
    counts it as a whole step, and the budget was max_steps x 2 (20 here, where 18 run: with chunks of 32 over
    100 micro-batches an epoch, 128 a 100-batch epoch, so the cooldown never came). Now it is what the run
    takes, by epochs and by max_steps (7 steps: one epoch of 9 and two chunks of 2)."""
    extra = {"num_train_epochs": epochs} if epochs else {}
    trainer, batches = _recording_trainer(
        model=tiny_gpt2(), args=_args(tmp_path, max_steps=max_steps, **extra), train_dataset=CountingSequences(72, 0)
    )
    trainer.train()
    elra_optimizer = trainer.elra_optimizer
    taken = elra_optimizer.controller.state.micro_steps + elra_optimizer.micro_batches  # 13: one still collected
    assert len(batches) == budget == elra_optimizer.total_steps == taken == elra_optimizer.micro_batches_taken


def test_a_second_train_call_gets_a_budget_of_its_own(tmp_path, monkeypatch):
    """Trainer counts a second ``train()`` from step 0 again (its own schedules start over) while ELRA goes on
    from the first one's end: the budget stayed the first call's, and the whole second run took the cooldown's
    floor, 2% of the step length. Now it ends with the second call, which takes back the length the first
    cooldown fell from and cools down again at its own end."""
    monkeypatch.setattr(elra.line_control, "COOLDOWN_SIGNAL", 1.0)
    trainer = ElraTrainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=10), train_dataset=CountingSequences(64, 0))
    trainer.train()
    first = trainer.elra_optimizer.controller.state.cooldown_eta
    trainer.train()
    state = trainer.elra_optimizer.controller.state
    assert trainer.elra_optimizer.total_steps == state.micro_steps == 40
    assert first > 0.0 and state.cooldown_eta != first and state.cooldown_eta > 0.1 * first  # a fall of its own
    assert trainer.elra_optimizer.stats["lr"] == pytest.approx(0.02 * state.cooldown_eta)


@pytest.mark.parametrize("elra_options", [{"total_steps": None}, {"preconditioner": None}, {"total_steps": 7}])
def test_the_trainer_leaves_the_budget_to_elra_options_and_p2m(tmp_path, elra_options):
    trainer = ElraTrainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=CountingSequences(16, 0),
                          elra_options=elra_options)
    trainer.create_optimizer_and_scheduler(12)
    assert trainer.elra_optimizer.total_steps == elra_options.get("total_steps")


def test_a_nan_micro_batch_loss_retraces_and_stays_out_of_the_fed_train_loss(tmp_path):
    losses = []

    class NanOnce(ElraTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if return_outputs:  # evaluation
                return loss
            loss = loss * float("nan") if len(losses) == 6 else loss
            losses.append(loss.item())
            return loss

    model = tiny_gpt2()
    args = _args(tmp_path, gradient_accumulation_steps=1, max_steps=8, eval_strategy="steps", eval_steps=8)
    trainer = NanOnce(model=model, args=args, train_dataset=CountingSequences(64, 0), eval_dataset=CountingSequences(32, 1))
    trainer.train()
    assert trainer.elra_optimizer.stats["retraces"] >= 1
    finite = [v for v in losses if v == v]
    assert len(finite) == 7 and trainer.elra_optimizer.controller.state.train_loss == pytest.approx(sum(finite) / 7)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_logged_grad_norm_is_the_norm_of_the_collected_sum(tmp_path):
    """Trainer logs the norm of .grad at the end of its chunk: ELRA's sum of the micro-batch gradients, not their
    mean (Trainer's own accumulation divides each loss by the chunk length), so it grows with the multiplier."""
    trainer, batches = _recording_trainer(
        model=tiny_gpt2(), args=_args(tmp_path, max_steps=1, logging_steps=1), train_dataset=CountingSequences(64, 0)
    )
    trainer.train()
    model = tiny_gpt2()
    for batch in batches:
        model(**batch).loss.backward()  # sums the two micro-batch gradients
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert len(batches) == 2 and trainer.state.log_history[0]["grad_norm"] == pytest.approx(total.item(), rel=1e-5)


def test_trainer_refuses_what_would_fight_elra(tmp_path):
    model = tiny_gpt2()
    data = CountingSequences(16, 0)
    elra = ElraOptimizer(model.parameters(), None, 8, VOCAB)
    with pytest.raises(TypeError, match="ElraOptimizer"):
        ElraTrainer(model=model, args=_args(tmp_path), train_dataset=data,
                    optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="own rate"):
        ElraTrainer(model=model, args=_args(tmp_path), train_dataset=data,
                    optimizers=(elra, torch.optim.lr_scheduler.ConstantLR(elra)))
    with pytest.raises(ValueError, match="you passed your own"):
        ElraTrainer(model=model, args=_args(tmp_path), train_dataset=data, optimizers=(elra, None),
                    elra_options={"momentum": 0.9})


@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_trainer_refuses_an_optim_that_fuses_its_update_into_backward(tmp_path, optim):
    """Other ``optim`` values are ignored (ELRA is built anyway); LOMO's made Trainer pass ``learning_rate`` to the
    backward, which failed inside torch ("backward() got an unexpected keyword argument")."""
    with pytest.raises(ValueError, match=f"optim='{optim}'"):
        ElraTrainer(model=tiny_gpt2(), args=_args(tmp_path, optim=optim), train_dataset=CountingSequences(16, 0)).train()


def test_a_training_step_override_that_skips_elra_trainers_is_named(tmp_path):
    """A subclass whose ``training_step`` runs its own backward (or Trainer's) never handed ELRA a loss: the run
    finished, logged losses and left every parameter where it started. Trainer's optimizer step now raises."""

    class OwnStep(ElraTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
            self.accelerator.backward(loss)
            return loss.detach()

    trainer = OwnStep(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=CountingSequences(16, 0))
    with pytest.raises(RuntimeError, match=r"must call super\(\)\.training_step"):
        trainer.train()


def test_trainer_refuses_a_model_sharded_at_load_time(tmp_path):
    """``from_pretrained(distributed_config=...)`` shards the model with FSDP2 itself; Trainer defers its gradient
    reduction to the end of each accumulation chunk, which ElraTrainer does not steer: a real step inside a chunk
    would take the sharded gradients without the micro-batches whose reduction Trainer deferred. FSDP through
    TrainingArguments was refused, this was let through."""
    model = tiny_gpt2()
    model._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=...) sets
    with pytest.raises(ValueError, match="sharded at load time"):
        ElraTrainer(model=model, args=_args(tmp_path), train_dataset=CountingSequences(16, 0))


def test_trainer_refuses_fp16_also_when_accelerate_sets_it(tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision fp16`` (or ``accelerate config``) sets ACCELERATE_MIXED_PRECISION, which
    TrainingArguments turns into fp16 with ``fp16=False``: only ``fp16=True`` was refused, and on a GPU Trainer's
    GradScaler scaled the gradients ELRA measured (x65536) and unscaled its collected sums in place."""
    data = CountingSequences(16, 0)
    with pytest.raises(ValueError, match="fp16"):
        ElraTrainer(model=tiny_gpt2(), args=_args(tmp_path, fp16=True), train_dataset=data)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="ACCELERATE_MIXED_PRECISION"):
        ElraTrainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    ElraTrainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data)


@pytest.mark.parametrize(
    "weight_decay, elra_options, expected", [(0.0, {}, None), (0.0, {"weight_decay": 0.0}, 0.0), (0.05, {}, 0.05)]
)
def test_the_weights_take_elras_automatic_decay_unless_a_decay_is_given(tmp_path, weight_decay, elra_options, expected):
    """TrainingArguments' weight_decay defaults to 0, which would switch off the decay ELRA's defaults rely on."""
    model = tiny_gpt2()
    trainer = ElraTrainer(model=model, args=_args(tmp_path, weight_decay=weight_decay),
                          train_dataset=CountingSequences(16, 0), elra_options=elra_options)
    weights, rest = trainer.create_optimizer().param_groups
    assert weights["weight_decay"] == expected and rest["weight_decay"] == 0.0


@pytest.mark.parametrize("module, framework", [("transformers", "transformers"), ("accelerate", "accelerate")])
def test_an_integration_without_its_framework_names_the_extra(monkeypatch, module, framework):
    monkeypatch.setitem(sys.modules, framework, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"elra.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'elra\[transformers\]'"):
        importlib.import_module(f"elra.integrations.{module}")


def test_import_elra_does_not_import_the_frameworks():
    code = "import sys, elra; assert not {'transformers', 'accelerate'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_with_several_evaluation_sets_only_the_first_ones_loss_is_fed(tmp_path):
    """Trainer evaluates each set through ``evaluate``: when the first set's loss was not finite (not fed), the
    second set's loss was fed to ELRA as the validation loss, beside the train losses it did not belong to."""

    class NanFirstSet(ElraTrainer):
        def get_eval_dataloader(self, eval_dataset=None):
            self.current_set = eval_dataset
            return super().get_eval_dataloader(eval_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if return_outputs and self.current_set == "first":
                return result[0] * float("nan"), result[1]
            return result

    def run(sets):
        model = tiny_gpt2()
        args = _args(tmp_path, gradient_accumulation_steps=1, max_steps=4, eval_strategy="steps", eval_steps=2)
        trainer = NanFirstSet(model=model, args=args, train_dataset=CountingSequences(64, 0), eval_dataset=sets)
        fed = []
        set_valid_loss = trainer.create_optimizer().set_valid_loss
        trainer.elra_optimizer.set_valid_loss = lambda loss: (fed.append(loss), set_valid_loss(loss))[1]
        trainer.train()
        return fed, trainer.state.log_history

    fed, _ = run({"first": CountingSequences(32, 1), "second": CountingSequences(32, 2)})
    assert fed == []
    fed, history = run({"second": CountingSequences(32, 2), "first": CountingSequences(32, 1)})
    assert fed == [h["eval_second_loss"] for h in history if "eval_second_loss" in h] and len(fed) == 2


def test_train_losses_saved_by_two_processes_resume_into_one_as_their_totals(tmp_path):
    """A checkpoint holds every process's [sum, count] of the train losses not yet fed; one process takes both,
    halved: each of two processes counted every micro-batch, so taken whole the saved micro-batches weighed twice
    as much as the resumed run's in the next evaluation's mean (2e-4 off in a 2-to-1 resume of a tiny GPT-2)."""
    trainer = ElraTrainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=CountingSequences(16, 0))
    state = trainer.create_optimizer().state_dict()
    assert state["elra_trainer_train_loss"] == [0.0, 0.0]
    trainer.optimizer.load_state_dict({**state, "elra_trainer_train_loss": [8.25, 2.0, 4.5, 1.0]})
    assert trainer.optimizer.state_dict()["elra_trainer_train_loss"] == [6.375, 1.5]
    trainer.optimizer.load_state_dict({**state, "elra_trainer_train_loss": [8.25, 2.0]})  # one process's
    assert trainer.optimizer.state_dict()["elra_trainer_train_loss"] == [8.25, 2.0]


def test_an_evaluation_inside_boosted_is_not_fed_to_the_weight_decay_control(tmp_path):
    """The advice in docs/integrations.md, evaluating inside ``trainer.elra_optimizer.boosted()`` to see the mean, fed the boost
    mean's loss during training to the weight-decay control as the validation loss of the current weights, with the
    train losses gathered for the next regular evaluation, which then had only the few left. Such an evaluation
    feeds nothing now: the control gets what the run without it gets."""
    from transformers import TrainerCallback

    def run(boosted_evaluation):
        model = tiny_gpt2()
        args = _args(tmp_path, gradient_accumulation_steps=1, weight_decay=0.01, max_steps=8, eval_strategy="steps",
                     eval_steps=4)
        trainer = ElraTrainer(model=model, args=args, train_dataset=CountingSequences(64, 0),
                              eval_dataset=CountingSequences(32, 1))
        trainer.create_optimizer()
        elra = trainer.elra_optimizer
        elra.enable_boost()
        fed, boosted_losses = [], []
        set_train_loss, set_valid_loss = elra.set_train_loss, elra.set_valid_loss
        elra.set_train_loss = lambda loss: (fed.append(("train", loss)), set_train_loss(loss))[1]
        elra.set_valid_loss = lambda loss: (fed.append(("valid", loss)), set_valid_loss(loss))[1]

        class BoostedEvaluation(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if boosted_evaluation and state.global_step in (3, 6):
                    with elra.boosted() as count:
                        assert count > 0
                        boosted_losses.append(trainer.evaluate(metric_key_prefix="boosted")["boosted_loss"])

        trainer.add_callback(BoostedEvaluation())
        trainer.train()
        return fed, [p.detach().clone() for p in model.parameters()], boosted_losses

    fed, params, boosted_losses = run(True)
    reference_fed, reference_params, _ = run(False)
    assert len(boosted_losses) == 2 and len(reference_fed) == 4
    assert fed == reference_fed
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params))
