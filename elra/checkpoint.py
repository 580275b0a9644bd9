"""Checkpoints of :class:`elra.optimizer.ElraOptimizer`: ``state_dict``, ``load_state_dict`` and what they need.

The torch layout, plus ELRA's own numbers: the controller's state, the boost
counters and the hyperparameters in ``param_groups[0]``; per parameter,
beside the direction state, the gradient sums collected toward the next real
step (``pending_grad``, and ``collected`` where the parameter holds a ``.grad``) and whether
the last accepted step moved it (``moved``) or its moments still wait for a
first gradient (``late``). A load validates everything before it changes
anything.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .boost import Booster, new_mean
from .config import FOREIGN_GROUP_OPTIONS, checked_config, decay_rate, make_controller
from .geometry import direction_state, kept_finite, make_direction, moment_dtype
from .orthogonal import MEAN_SQUARE_KEY
from .reduce import accumulation_dtype, loss_vector, local
from .sync import drop_unsynced_grads, fsdp_wrapping, summed_partial, sync_unsynced_grads

logger = logging.getLogger("elra")

STATE_KEY = "elra_controller"
BOOST_KEY = "elra_boost"
CONFIG_KEY = "elra_config"
_PENDING_GRAD = "pending_grad"
_MOVED = "moved"  # 1.0 where the last accepted step moved the parameter: a retrace and the next sums need it
_LATE = "late"  # 1.0 where a parameter's moments wait for their first gradient after the first update
# 1.0 where the parameter holds a ``.grad``: while collecting, its sums are in ``pending_grad`` (all NaN ones too:
# an overflow's); at a real-step boundary ``pending_grad`` is zeros, and the zero ``.grad`` that
# ``zero_grad(set_to_none=False)`` leaves there counts as a gradient at the next step, None does not
_COLLECTED = "collected"
_FLAGS = (_MOVED, _LATE, _COLLECTED)  # 0-d per-parameter state
# direction state that older checkpoints lack (elra before session 21: muon's mean squares); it starts afresh
_ADDED_LATER = frozenset({MEAN_SQUARE_KEY})
# hyperparameters that older checkpoints lack (elra before session 22: total_steps): the constructor's hold
_CONFIG_ADDED_LATER = frozenset({"total_steps"})
_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
# torch's state_dict and load_state_dict hooks (register_state_dict_pre_hook...): ELRA runs them around its whole state
_HOOKS = (
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class Checkpointing:
    """The checkpoint methods of :class:`elra.optimizer.ElraOptimizer` (a mixin before ``torch.optim.Optimizer``)."""

    def state_dict(self) -> dict[str, Any]:
        """The torch layout, plus the controller's numbers in ``param_groups[0]``.

        While collecting, the partial gradient sums are saved too, so a resumed
        run continues with the same micro-batches. Every parameter carries a
        ``pending_grad`` (zeros when nothing is pending), so that the state of a
        fresh optimizer, the template ``torch.distributed.checkpoint`` loads
        into, has room for them. ``collected`` says which parameters hold a
        ``.grad``, also at a real-step boundary: a step counts a zero one (kept
        by ``zero_grad(set_to_none=False)``) as a gradient, a missing one not.
        Sums a wrapper holds per rank (collected under
        :func:`elra.grad_sync`) must be synchronised first: see
        :meth:`sync_pending_grads`. Under FSDP, mid-collection, the optimizer
        must know the model (``model``, or ``grad_sync``) to see such sums.
        """
        self._refuse_inside_boosted("state_dict()")
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._note_unsynced_models()
        collecting = (
            f"state_dict() in the middle of collecting micro-batches ({len(self._pending)} of "
            f"{self.controller.state.multiplier})"
        )
        if self._pending and self.unsynced_models:
            raise RuntimeError(
                f"{collecting} with gradient sync off (grad_sync, or the wrapper's no_sync()): "
                "each rank holds its own partial sums, which one checkpoint cannot keep. Call "
                "optimizer.sync_pending_grads() on every "
                "rank first (one gradient reduction), or save when optimizer.collecting is False"
            )
        wrapping = fsdp_wrapping(self._params()) if self._pending else None
        if wrapping is not None and not self.models:
            raise RuntimeError(
                f"{collecting} under {wrapping}, but the optimizer does not know the model: "
                "with gradient sync off (set_requires_gradient_sync(False), no_sync()) the wrapper holds the partial "
                "sums itself, which the checkpoint would lose. Give the optimizer the wrapped model, "
                "ElraOptimizer(model.parameters(), model, ...), or use `with elra.grad_sync(model, optimizer):`, "
                "or save when optimizer.collecting is False"
            )
        if self._pending and self._grads_changed_since_step():
            raise RuntimeError(
                f"state_dict() between backward() and step() while collecting micro-batches ({len(self._pending)} "
                f"of {self.controller.state.multiplier}): the gradients changed since the last step(loss), they hold "
                "a micro-batch whose loss step() has not had, and a run resumed from this checkpoint would count it "
                "twice when it repeats the iteration. Save after optimizer.step(loss), or before loss.backward()"
            )
        world = self.reducer.world_size
        if self._pending and world > 1 and self._pending is not self._pending_as_averaged:
            raise RuntimeError(
                f"{collecting} on {world} ranks: each rank holds the losses of its own "
                "micro-batches, and a checkpoint keeps one rank's (a resumed run's loss statistics went another way, "
                "silently). Call optimizer.sync_pending_grads() on every rank first (it averages them over the ranks, "
                "one all-reduce of a few numbers), or save when optimizer.collecting is False"
            )
        if world > 1 and any(self._reports[1::2]):  # the counts of this rank's train and validation reports
            raise RuntimeError(
                f"state_dict() on {world} ranks after set_train_loss/set_valid_loss on this rank: the next real step "
                "would take the mean of what the ranks reported, and a checkpoint keeps one rank's reports (a resumed "
                "run decayed the weights by other losses, silently). Call optimizer.sync_pending_grads() on every rank "
                "first (it applies them, one all-reduce of a few numbers), or save after the next step"
            )
        with self._torch_hooks_held():
            sd = super().state_dict()
        controller = self.controller.state_dict()
        # one string, not a list: torch's load of a full state dict broadcast from rank 0 (broadcast_from_rank0)
        # flattens lists element by element and takes only the keys a fresh optimizer's state_dict has, whose
        # list is empty: the other ranks resumed without the collected losses, and the next step hung
        controller["pending_losses"] = json.dumps([float(v) for v in self._pending])
        controller["pending_reports"] = [float(v) for v in self._reports]
        sd["param_groups"][0][STATE_KEY] = controller
        sd["param_groups"][0][BOOST_KEY] = self.booster.state_dict()
        sd["param_groups"][0][CONFIG_KEY] = dict(self._config)
        index = 0
        collecting, moments = bool(self._pending), self.geometry is not None  # P2M keeps none: never late
        for p in self._params():
            collected = torch.tensor(float(p.grad is not None))
            if collecting and p.grad is not None:
                pending = summed_partial(p.grad, p)  # DCP saves no partial sums
            else:  # NaN: no gradient collected, as elra before the flag read it
                pending = torch.full_like(p, math.nan if collecting else 0.0, memory_format=torch.preserve_format)
            moved = torch.tensor(float(p in self._moved))
            # 1 before the first update too: torch.distributed.checkpoint's full load fills a frozen parameter's
            # state from the loading optimizer's own (it hands none over), which must read as waiting
            late = torch.tensor(float(moments and p in self._waiting))
            flags = {_MOVED: moved, _LATE: late, _COLLECTED: collected}
            sd["state"][index] = {**sd["state"].get(index, {}), _PENDING_GRAD: pending, **flags}
            index += 1
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            sd = sd if result is None else result
        return sd

    @contextmanager
    def _torch_hooks_held(self) -> Iterator[None]:
        """torch's ``state_dict``/``load_state_dict`` without its hooks: ELRA runs them itself, around its whole
        state (inside torch's part a post hook saw no controller and no collected sums, a load pre hook's dict was
        not the one ELRA checked and read, a load post hook saw the controller before the load)."""
        held = {name: getattr(self, name) for name in _HOOKS}
        for name in _HOOKS:
            setattr(self, name, OrderedDict())
        try:
            yield
        finally:
            for name, hooks in held.items():
                setattr(self, name, hooks)

    @torch.no_grad()
    def sync_pending_grads(self) -> None:
        """Reduce the micro-batch gradients collected with sync off, as the next real step would.

        A collective: call it on every rank, before saving a checkpoint while
        collecting on more than one rank, under :func:`elra.grad_sync` or with
        sync on (``state_dict()`` refuses otherwise). Averaging the partial sums over ranks now gives the same
        averaged gradient at the real step (the reduction is linear), and the
        averaged sums are what one checkpoint can hold, at any world size.
        Costs one gradient reduction (DDP: an all-reduce of all gradients;
        FSDP2: an all-reduce per parameter; FSDP1: per wrapped module) at
        checkpoint time; no gradient reduction when nothing is pending or sync was on. The whole copies beside
        shards (a model ``fully_shard`` wraps in part), whose gradients the caller averages, are averaged here too
        where the ranks' sums differ (:meth:`_average_copies`).

        On more than one rank it also averages this rank's losses of the
        collected micro-batches and applies the losses reported since the last
        real step (one all-reduce of a few numbers, also with sync on): one
        checkpoint holds one rank's (``torch.distributed.checkpoint`` keeps one
        rank's param group, a single file rank 0's), and every rank resumed
        with them; the real step takes their mean over ranks, so the means give it the same.
        """
        self._note_unsynced_models()
        # whether a model holds unreduced sums is read on each rank (an evaluation forward on one rank alone
        # leaves DDP's flag looking unsynced there): the ranks reduce where any says so, or none does
        unsynced = self._average_pending_losses([float(model in self.unsynced_models) for model in self.models])
        self.unsynced_models.update(model for model, flag in zip(self.models, unsynced) if flag)
        copies = self._replication_layout()[1] if self._pending else []
        if not self._pending or not (self.unsynced_models or copies):
            self.unsynced_models.clear()
            return
        unstepped = self._grads_changed_since_step()
        # a collective per model, in the order the optimizer learned them (tell_optimizer): the same on every rank,
        # where a set's order follows the models' addresses, which differ between processes
        for model in [m for m in self.models if m in self.unsynced_models]:
            sync_unsynced_grads(model)
        self.unsynced_models.clear()
        self._average_copies(copies)
        self._keep_grads()
        if unstepped:  # a backward since the last step: its micro-batch is in the synchronised sums too
            self._kept_versions.clear()

    @torch.no_grad()
    def _average_copies(self, copies: list[torch.Tensor]) -> None:
        """The collected sums of the whole copies beside shards (a model ``fully_shard`` wraps in part, or its
        ``ignored_params``), averaged over ranks where the ranks hold different ones: a caller that averages them
        on the micro-batch completing the real step holds its rank's own while collecting, and a checkpoint kept
        one rank's (7e-4 off the uninterrupted run on resume). The average is what that reduction gives (it is
        linear); sums the ranks share already stay as they are, bit for bit (one all-reduce of a few numbers
        tells). Every rank reduces every copy, a zero one where it has no gradient: the same collectives on all.
        Plain tensors only: a replicated DTensor's gradient is reduced as its placements say."""
        plain = [p for p in copies if not hasattr(p, "placements")]
        if not plain:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plain]
        held = torch.tensor([float(p.grad is not None) for p in plain], dtype=torch.float64, device=plain[0].device)
        terms = torch.stack([torch.stack([w.sum(), w.square().sum(), w.pow(3).sum()]) for w in map(torch.Tensor.double, grads)])
        signature = torch.cat([terms.sum(0), held])
        extremes = torch.cat([signature, -signature])
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX, group=self.reducer.group)
        highest, lowest = extremes.chunk(2)
        if torch.equal(highest, -lowest):
            return
        for p, grad, anywhere in zip(plain, grads, highest[3:].tolist()):
            self.reducer.sum(grad).div_(self.reducer.world_size)
            if p.grad is None and anywhere:
                p.grad = grad

    @torch.no_grad()
    def _average_pending_losses(self, flags: list[float]) -> list[float]:
        """Replace this rank's collected micro-batch losses by their means over ranks, and apply the losses
        reported on any rank since the last real step, as that step would; ``flags`` ride along: their sums
        over ranks are returned.

        The real step sums each micro-batch's loss over ranks divided by the world size: the means give it
        the same values on any number of ranks that each hold them. Reports applied here leave none pending,
        so a later report replaces them, as it does without this call (kept pending as means, such a report
        on one rank was averaged with the others' share of the earlier one).
        """
        world = self.reducer.world_size
        if world == 1:
            return flags
        device = self._device or torch.device("cpu")  # where the real step's vector lives (_scalar_batch)
        losses = loss_vector([*self._pending, *self._reports, *flags], accumulation_dtype(device), device)
        sums, split, reports = self.reducer.sum(losses), len(self._pending), len(self._reports)
        self._pending = self._pending_as_averaged = (sums[:split] / world).tolist()
        self._apply_reports(sums[split : split + reports].tolist())
        return sums[split + reports :].tolist()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict``: everything, or nothing if it does not fit.

        The checkpoint's hyperparameters win (as torch restores a group's
        ``lr``): momentum, batch size, regime, warmup, the smallest batch
        multiplier and the default lr and weight decay are those it was saved
        with; each one that differs from this optimizer's is logged at WARNING.
        ``process_group``, ``replicas``, ``check_consistency`` and ``compiled`` describe this
        job, not the run, and stay as constructed. A state_dict that does not
        fit raises ``ValueError`` before anything changes.
        """
        self._refuse_inside_boosted("load_state_dict()")
        self._param_versions = None  # weights loaded with it belong to its state: no edit between steps
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict  # shallow, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        self._note_unsynced_models()
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        foreign = sorted({key for g in groups or () if isinstance(g, dict) for key in FOREIGN_GROUP_OPTIONS & g.keys()})
        # ELRA's state rides in the first group saved; a name-keyed load (torch.distributed.checkpoint's
        # set_state_dict) hands the groups over in this optimizer's order, which may put it in another
        home = next((g for g in groups or () if isinstance(g, dict) and STATE_KEY in g), None)
        if foreign and home is None:
            raise ValueError(
                f"another optimizer's state_dict (its parameter groups set {', '.join(map(repr, foreign))}, as "
                "torch.optim's Adam, AdamW or SGD do): ELRA cannot continue from another optimizer's state. Load the "
                "model's weights alone and start ElraOptimizer afresh"
            )
        if home is None and groups is None and isinstance(state_dict.get("state"), dict) and "version" in state_dict["state"]:
            raise ValueError(
                "a state_dict of the published elra package (0.0.5: its param_groups are None): ELRA cannot continue "
                "from it. Load the model's weights alone and start ElraOptimizer afresh (preconditioner=None for the "
                "published method)"
            )
        if home is None:
            raise ValueError(
                "not an ElraOptimizer state_dict (no controller state in its param_groups). From "
                "torch.distributed.checkpoint with StateDictOptions(flatten_optimizer_state_dict=True) (torchtitan's "
                "setting)? Its files hold ELRA's state, but torch rebuilds only the keys its own optimizers keep: "
                "save and load with flatten_optimizer_state_dict=False"
            )
        config = self._saved_config(home.get(CONFIG_KEY))
        for index, group in enumerate(groups):  # every later step and stats would raise on it
            try:
                decay_rate(group.get("weight_decay", config["weight_decay"]))
            except ValueError as error:
                raise ValueError(f"parameter group {index} of the state_dict: {error}") from error
        controller_state = dict(home[STATE_KEY])
        pending = _pending_losses(controller_state.pop("pending_losses", "[]"))
        reports = _pending_reports(controller_state.pop("pending_reports", [0.0] * len(self._reports)), len(self._reports))
        controller = make_controller(config)
        controller.load_state_dict(controller_state)
        if len(pending) >= controller.state.multiplier:
            raise ValueError(
                f"the state_dict holds {len(pending)} collected micro-batches for a batch multiplier of "
                f"{controller.state.multiplier}: it is corrupted"
            )
        booster = Booster()
        boost = home.get(BOOST_KEY)
        if boost is not None:
            try:
                booster.load_state_dict(boost)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"the boost state of the state_dict is unusable: {error!r}") from error
        geometry = make_direction(config["preconditioner"], config["momentum"], self._compiled)
        self._check_saved_state(state_dict, booster.enabled, geometry, config["preconditioner"])
        # Keep this optimizer's param_names, which name its parameters in its order: torch takes the saved ones,
        # which after a name-keyed load into another order (torch.distributed.checkpoint's) name the saved order
        own_names = [g.get("param_names") for g in self.param_groups]
        with self._torch_hooks_held():
            super().load_state_dict(state_dict)
        for group, names in zip(self.param_groups, own_names):
            if names is None:
                group.pop("param_names", None)
            else:
                group["param_names"] = names
        self._own_loaded_state(state_dict)
        self._restore_float32_moments(state_dict, geometry)
        for group in self.param_groups:
            for key in (STATE_KEY, BOOST_KEY, CONFIG_KEY):
                group.pop(key, None)
        self._log_config_change(config)
        self._log_frozen_without_state(state_dict)
        self._log_boost_change(booster)
        self._config = config
        self.defaults.update(lr=config["lr"], weight_decay=config["weight_decay"])
        self.controller = controller
        self.geometry = geometry
        self.booster = booster
        self._fill_missing_state()
        self._pending, self._reports = pending, reports
        self._pending_as_averaged = pending  # a checkpoint's losses are the ranks' means (or one rank's own)
        self._moved = {p for p in self._params() if self._loaded_as_moved(p)}
        self._waiting = {p for p in self._params() if self._loaded_as_waiting(p)}
        for model in self.unsynced_models:  # loaded mid-run: what the wrappers collected belongs to the old run
            drop_unsynced_grads(model, self._params())
        self.unsynced_models.clear()
        self._restore_grads(state_dict, bool(pending))  # and what .grad holds
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _refuse_state_loaded_around_it(self) -> None:
        """Refuse a checkpoint's per-parameter entries written into ``state`` without :meth:`load_state_dict`.

        torch's ``ZeroRedundancyOptimizer.load_state_dict`` copies each saved entry into its local optimizer's
        ``state`` and never calls that optimizer's ``load_state_dict`` (its ``state_dict`` keeps no controller):
        ELRA went on from its first step length and an unknown regime over the saved moments, silently. Every
        saved entry holds ``pending_grad``, which a loaded state never keeps: one look at the first parameter.
        """
        first = next(iter(self._params()), None)
        if first is not None and _PENDING_GRAD in self.state.get(first, ()):
            raise RuntimeError(
                "the optimizer state holds a checkpoint's per-parameter entries that ElraOptimizer.load_state_dict "
                "did not load, without ELRA's controller (step length, regime, batch multiplier). torch's "
                "ZeroRedundancyOptimizer.load_state_dict does this: under ZeRO save zero.optim.state_dict() on every "
                "rank and load it with zero.optim.load_state_dict(...) on as many ranks"
            )

    def _saved_config(self, saved: Any) -> dict[str, Any]:
        """The checkpoint's hyperparameters, validated; this optimizer's for checkpoints without them."""
        if saved is None:
            logger.info("ELRA state_dict without hyperparameters (saved by an older elra): keeping the constructor's")
            return dict(self._config)
        if not isinstance(saved, dict):
            raise ValueError(f"the state_dict's ELRA hyperparameters are not a dict: {saved!r}")
        lacking = self._config.keys() - saved.keys() - _CONFIG_ADDED_LATER
        if lacking:
            raise ValueError(f"the state_dict's ELRA hyperparameters {saved!r} lack {sorted(lacking)}")
        config = {**self._config, **saved}
        if "total_steps" not in saved and config["preconditioner"] is None:
            config["total_steps"] = None  # a P2M checkpoint from before budgets: P2M has none (logged as a change)
        return checked_config(config)

    def _log_config_change(self, config: dict[str, Any]) -> None:
        changed = {k: (self._config.get(k), v) for k, v in config.items() if self._config.get(k) != v}
        if changed:
            # the groups' own weight_decay came with them (edited mid-run, it differs from the constructor's)
            in_force = sorted({repr(g.get("weight_decay", config["weight_decay"])) for g in self.param_groups})
            groups = (
                f" (weight_decay: of groups added later; the loaded groups decay by {', '.join(in_force)})"
                if "weight_decay" in changed and in_force != [repr(config["weight_decay"])] else ""
            )
            logger.warning(
                "ELRA load_state_dict: the checkpoint's hyperparameters replace the constructor's: %s%s",
                ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())),
                groups,
            )
        if self._compiled and config["preconditioner"] not in ("adam", "muon"):
            logger.warning(
                "ELRA load_state_dict: compiled=True does nothing for the checkpoint's preconditioner=%r (it computes "
                "Adam's direction's sums)",
                config["preconditioner"],
            )

    def _log_frozen_without_state(self, state_dict: dict[str, Any]) -> None:
        """Warn where torch.distributed.checkpoint (its ids are names) handed frozen parameters no state of their own.

        It gives a parameter with ``requires_grad=False`` at the load none (its full load fills it from the loading
        optimizer's), so it starts afresh: right where the saved run never trained it, but one trained and then
        frozen (a LoRA-style freeze mid-collection keeps its collected gradient) would lose its state, and the run
        would differ (2.8e-2 for P2M, 8.6e-4 for adam). Which of the two it was, the load cannot tell.
        """
        saved_ids = _saved_ids(state_dict["param_groups"])
        frozen = [i for i, p in zip(saved_ids, self._params()) if isinstance(i, str) and not p.requires_grad]
        if frozen:
            logger.warning(
                "ELRA load_state_dict: torch.distributed.checkpoint hands frozen parameters no state: %d held by this "
                "optimizer (%s%s) start afresh. Right if the saved run never trained them; if it did (frozen after "
                "training, or while collecting micro-batches) unfreeze them for set_state_dict and freeze them after",
                len(frozen), ", ".join(frozen[:3]), ", ..." if len(frozen) > 3 else "",
            )

    def _log_boost_change(self, loaded: Booster) -> None:
        """Warn where the checkpoint's boosting replaces the one this optimizer was given (the checkpoint wins)."""
        if not self.booster.enabled:
            return
        if not loaded.enabled:
            logger.warning(
                "ELRA load_state_dict: the checkpoint was saved without boost, so boosting is off now; call "
                "optimizer.enable_boost() after load_state_dict to boost the resumed run"
            )
        elif loaded.cycle != self.booster.cycle:
            logger.warning(
                "ELRA load_state_dict: the checkpoint's boost cycle %d replaces %d; call optimizer.enable_boost(cycle) "
                "after load_state_dict to change it (a cycle shorter than the %d points its mean holds after "
                "optimizer.restart_boost())",
                loaded.cycle,
                self.booster.cycle,
                loaded.count,
            )

    def _check_saved_state(
        self, state_dict: dict[str, Any], boost_enabled: bool, geometry, preconditioner: str | None
    ) -> None:
        """Validate the per-parameter state against this optimizer's parameters, changing nothing.

        ``geometry`` (the checkpoint's ``preconditioner``, ``None`` for P2M) tells which state each parameter needs.
        """
        saved_groups, saved_state = state_dict["param_groups"], state_dict.get("state", {})
        sizes = [len(g["params"]) for g in self.param_groups]
        saved_sizes = [len(g.get("params", ())) for g in saved_groups]
        if sizes != saved_sizes:
            raise ValueError(
                f"the state_dict has parameter groups of sizes {saved_sizes}, this optimizer {sizes}: "
                "it is from another model or parameter grouping"
            )
        unmatched = [g for g, saved in enumerate(saved_groups) if "lr" not in saved]
        if unmatched:  # every group ELRA saves has its options; set_state_dict passes a group it matched to none bare
            raise ValueError(
                f"parameter groups {unmatched} of the state_dict have no options: torch.distributed.checkpoint's "
                "set_state_dict matched no saved group to them by name, the checkpoint was saved with another "
                "parameter grouping. Build the optimizer with the checkpoint's parameter groups"
            )
        self._check_saved_names(saved_groups)
        saved_ids = _saved_ids(saved_groups)
        params = self._params()
        for index, (saved_id, p) in enumerate(zip(saved_ids, params)):
            shapes = {"direction": p.shape} if geometry is None else geometry.state_shapes(p)
            needed = [*shapes, "boost"] if boost_enabled else list(shapes)
            entry = saved_state.get(saved_id, {})
            if not entry and not p.requires_grad:  # torch.distributed.checkpoint hands a frozen one's state over
                continue  # to no optimizer: it starts afresh, waiting for its first gradient (_fill_missing_state)
            # this direction's own state first: another order also lacks keys (muon: a matrix's, a vector's); another
            # preconditioner's state (factored's row factor under "adam") is named by the key it lacks below
            _check_state_shapes(index, p, {k: entry[k] for k in shapes if k in entry}, shapes)
            for key in needed if p.numel() else ():  # FSDP1 saves no state for a parameter with no local part
                if key not in entry and key not in _ADDED_LATER:
                    # a torch.distributed.checkpoint load reads only the keys the loading optimizer's state has
                    why = (
                        "its boost is on: from torch.distributed.checkpoint, call optimizer.enable_boost() before "
                        "get_state_dict and dcp.load, so that the template has room for the boost means"
                        if key == "boost" else f"its preconditioner={preconditioner!r} needs it"
                    )
                    raise ValueError(f"the state_dict lacks the '{key}' state of parameter {index} ({why})")
            _check_state_shapes(index, p, {k: v for k, v in entry.items() if k not in shapes}, shapes)  # the rest
            direction = entry.get("direction") if geometry is None else None
            if isinstance(direction, torch.Tensor) and not kept_finite(direction, p.dtype):
                raise ValueError(
                    f"P2M's direction of parameter {index} exceeds the range of its {p.dtype} (torch casts the "
                    "state to it, and a retrace along it would write inf into the parameter): load it into the "
                    "model in the dtype it was saved from"
                )

    def _check_saved_names(self, saved_groups: list[dict[str, Any]]) -> None:
        """Refuse saved state that would land on a parameter of another name.

        torch maps saved state to parameters by position, so same-shaped parameters in
        another order (two ``Linear(16, 16)`` swapped) would swap their state silently.
        Where both sides have ``param_names`` (the optimizer was given
        ``model.named_parameters()``), they must agree, up to the parts wrappers add. A
        group without names (``parameters()``, or saved by older elra) is mapped by position.
        Ids that are names (``get_optimizer_state_dict``'s) are compared instead of the saved
        ``param_names``: ``set_state_dict`` hands them over in this optimizer's order, with the
        saved ``param_names`` of the group whose options it gave this one, so there the two
        must name the same parameters; loaded directly, they are in the saved order.
        """
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            names, saved_names, ids = group.get("param_names"), saved.get("param_names"), saved["params"]
            keyed_by_name = bool(ids) and all(isinstance(i, str) for i in ids)
            if keyed_by_name and saved_names is not None and sorted(map(_bare_name, ids)) != sorted(map(_bare_name, saved_names)):
                raise ValueError(
                    f"parameter group {g} here holds {len(ids)} parameters that the state_dict's groups hold in "
                    f"another grouping (the options it would take are those of a saved group of "
                    f"{len(saved_names)}: {', '.join(saved_names[:3])}{', ...' if len(saved_names) > 3 else ''}): "
                    "build the optimizer with the checkpoint's parameter groups"
                )
            saved_order = ids if keyed_by_name else saved_names if all(isinstance(i, int) for i in ids) else None
            if names is None or saved_order is None:
                continue
            for index, (name, saved_name) in enumerate(zip(names, saved_order)):
                if _bare_name(name) != _bare_name(saved_name):
                    raise ValueError(
                        f"parameter {index} of group {g} is '{name}' here but '{saved_name}' in the state_dict: its "
                        "state would land on another parameter (the parameters are in another order, or of another "
                        "model)"
                    )

    def _own_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """Copy state tensors that torch's load kept shared with the state_dict.

        torch's ``load_state_dict`` keeps a tensor already of the right dtype and
        device as it is, so loading a live ``state_dict()`` (another optimizer's)
        would make two optimizers update one direction buffer.
        """
        saved = {
            local(v).data_ptr()
            for entry in state_dict.get("state", {}).values()
            for v in entry.values()
            if isinstance(v, torch.Tensor) and v.numel()
        }
        for entry in self.state.values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.numel() and local(value).data_ptr() in saved:
                    entry[key] = value.clone()

    def _restore_float32_moments(self, state_dict: dict[str, Any], geometry) -> None:
        """Undo torch's cast of loaded state to the parameter's dtype for the float32 state of 16-bit parameters.

        The moments (``geometry``'s state keys) and the boost mean are float32 there: in float16
        ``(1-b2)*g^2`` would flush to 0 and the direction become inf (see :func:`moment_dtype`), and a
        16-bit running mean stops moving (:mod:`elra.boost`); they are made float32 from the saved values,
        whatever their dtype (a float64 run's too). P2M's direction (``geometry`` ``None``) follows the parameter's
        dtype, as it is made, also from a float32 checkpoint resumed in 16 bits.
        """
        saved_ids = _saved_ids(state_dict["param_groups"])
        params = self._params()
        for saved_id, p in zip(saved_ids, params):
            wide = moment_dtype(p)
            if p.dtype == wide:
                continue
            moments = geometry.state_shapes(p) if geometry is not None else {}
            for key, value in state_dict.get("state", {}).get(saved_id, {}).items():
                if not isinstance(value, torch.Tensor) or key not in self.state[p]:
                    continue
                if key == "boost" or key in moments:
                    self.state[p][key] = value.to(device=self.state[p][key].device, dtype=wide, copy=True)

    def _fill_missing_state(self) -> None:
        """Recreate the state a checkpoint did not hold.

        FSDP1 (``use_orig_params=True``) hands ``load_state_dict`` no state at all
        for a parameter that lies wholly in another rank's shard; its state here
        is empty tensors, so nothing is lost by creating them again. A checkpoint
        of an older elra lacks the keys of ``_ADDED_LATER``: they start afresh.
        ``torch.distributed.checkpoint`` hands no state to a frozen parameter: it
        starts afresh too, waiting for its first gradient (as torch's AdamW would).
        """
        started_afresh = set()
        for p in self._params():
            state = self.state[p]
            keys = {"direction"} if self.geometry is None else self.geometry.state_shapes(p).keys()
            if p.numel() and keys <= state.keys():
                continue
            if p.numel() and not keys & state.keys() and not p.requires_grad:
                state[_LATE] = torch.tensor(1.0)  # a frozen parameter's, which DCP loads no state into
            elif p.numel():
                started_afresh.update(keys - state.keys())
            for key, value in direction_state(self.geometry, p).items():
                state.setdefault(key, value)
            if self.booster.enabled:
                state.setdefault("boost", new_mean(p))
        if started_afresh:
            logger.info("ELRA state_dict of an older elra: %s start afresh", ", ".join(sorted(started_afresh)))

    def _loaded_as_moved(self, p: torch.Tensor) -> bool:
        """Whether the checkpoint's last accepted step moved ``p`` (taken off its state).

        Checkpoints without the flag, and parameters with no local part (no
        state under FSDP1), count as moved: a direction the step did not move
        along is zero in P2M, and that was all older checkpoints could say.
        """
        flag = self.state.get(p, {}).pop(_MOVED, None)
        return flag is None or bool(flag)

    def _loaded_as_waiting(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments still wait for their first gradient (taken off its state).

        Before the first update every parameter waits. After it, the flag says;
        checkpoints without it (older, or a fresh optimizer's template that
        ``torch.distributed.checkpoint`` loads into) say no, as older elra assumed.
        """
        flag = self.state.get(p, {}).pop(_LATE, None)
        return self._moment_steps() == 0 or (flag is not None and bool(flag))

    def _moment_steps(self) -> int:
        """Moment updates so far (P2M keeps no moments: 0)."""
        return getattr(self.controller.state, "moment_steps", 0)

    def _restore_grads(self, state_dict: dict[str, Any], collecting: bool) -> None:
        """Give every parameter the ``.grad`` the checkpoint says it had: the saved partial sums while
        collecting, zeros at a real-step boundary (a zero ``.grad`` counts as a gradient at the next step),
        ``None`` where it had none. The live run's gradients go: sums it collected (``zero_grad`` keeps them
        while collecting) must not join the loaded run's next real step.

        The sums come from ``state_dict`` itself, in the dtype the parameter's gradients take (its
        ``grad_dtype``, float32 sums of a bfloat16 parameter): torch's load cast them to the parameter's dtype.
        """
        saved_ids = _saved_ids(state_dict["param_groups"])
        params = self._params()
        saved_state = state_dict.get("state", {})
        for saved_id, p in zip(saved_ids, params):
            state = self.state.get(p, {})
            grad, flag = state.pop(_PENDING_GRAD, None), state.pop(_COLLECTED, None)
            grad = saved_state.get(saved_id, {}).get(_PENDING_GRAD, grad)
            if flag is None:  # saved before the flag: all NaN (or an empty shard) said "no gradient" while collecting
                flag = collecting and grad is not None and not bool(local(grad).isnan().all())
            dtype = getattr(p, "grad_dtype", None) or p.dtype
            p.grad = grad.to(device=p.device, dtype=dtype, copy=True) if grad is not None and bool(flag) else None
        self._kept_grads = {}
        if collecting:
            self._keep_grads()


def _saved_ids(saved_groups: list[dict[str, Any]]) -> list[Any]:
    """The ids of a state_dict's parameters in its groups' order (torch's positions, or DCP's names)."""
    return [i for g in saved_groups for i in g["params"]]


def _bare_name(name: str) -> str:
    """A parameter's name without the parts wrappers add (DDP's ``module``, ``torch.compile``'s ``_orig_mod``,
    FSDP1's and activation checkpointing's): a run resumed under another wrapper keeps its names."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _pending_losses(saved: Any) -> list[float]:
    """The losses of the micro-batches collected toward the next real step: a JSON list (a list before session
    25), checked."""
    try:
        values = json.loads(saved) if isinstance(saved, str) else saved
    except ValueError:
        values = None
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise ValueError(f"the state_dict's pending_losses {saved!r} are not a list of numbers")
    return [float(v) for v in values]


def _pending_reports(saved: Any, size: int) -> list[float]:
    """The train and validation losses reported since the last real step (value, count 0 or 1, twice), checked."""
    valid = (
        isinstance(saved, (list, tuple))
        and len(saved) == size
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in saved)
        and all(0 <= saved[i] <= 1 for i in range(1, size, 2))  # a fraction: session 17's sync averaged them over ranks
    )
    if not valid:
        raise ValueError(f"the state_dict's pending_reports {saved!r} are not {size // 2} (loss, count in [0, 1]) pairs")
    return [float(v) for v in saved]


def _check_state_shapes(index: int, p: torch.Tensor, entry: dict[str, Any], shapes: dict[str, torch.Size]) -> None:
    """Refuse saved state of parameter ``index`` whose tensors do not have the shapes ``p``'s state has."""
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.shape != shapes.get(key, () if key in _FLAGS else p.shape):
            raise ValueError(
                f"state '{key}' of shape {tuple(value.shape)} does not fit parameter {index} of shape "
                f"{tuple(p.shape)}: the state_dict is from another model or parameter order"
            )
