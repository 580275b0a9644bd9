"""The Accelerate loop and ElraTrainer on 2 processes (DDP over gloo) against 1 process on the same global batches."""

from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_worker import spawned_process  # noqa: E402

STEPS, MULTIPLIER, GLOBAL_BATCH = 12, 3, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    (out / "two").mkdir()
    (out / "one").mkdir()
    args = (f"file://{out}/store", STEPS, MULTIPLIER, GLOBAL_BATCH, str(out))
    mp.spawn(spawned_process, args=args, nprocs=3, join=True)
    return out


def _assert_matches(ranks, single):
    """Ranks agree exactly; with the single process up to rounding (another reduction order)."""
    assert ranks[0]["stats"] == ranks[1]["stats"]
    for key, value in single["stats"].items():
        expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-9, abs=1e-15)
        assert ranks[0]["stats"][key] == expected, key
    for name, value in single["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=0, atol=1e-10)


def _load(out, name):
    ranks = [torch.load(out / "two" / f"{name}{r}.pt", weights_only=True) for r in range(2)]
    return ranks, torch.load(out / "one" / f"{name}0.pt", weights_only=True)


def test_accelerate_loop_on_two_processes_follows_the_single_process_trajectory(runs):
    ranks, single = _load(runs, "rank")
    assert single["stats"]["real_steps"] == STEPS // MULTIPLIER
    _assert_matches(ranks, single)
    moved = [not torch.equal(a, b) for a, b in zip(single["params"].values(), _initial_params())]
    assert all(moved)


def test_accelerate_loop_all_reduces_gradients_only_for_real_steps(runs):
    ranks, _ = _load(runs, "rank")
    real = [(i + 1) % MULTIPLIER == 0 for i in range(STEPS)]
    for rank in ranks:
        assert rank["synced"] == real


def test_accelerate_state_saved_mid_collection_resumes_into_the_uninterrupted_run(runs):
    """``accelerator.save_state`` after ``elra_optimizer(optimizer).sync_pending_grads()`` (the README's
    recipe; the optimizer Accelerate hands out has no ``sync_pending_grads``), then ``load_state``."""
    for directory in ("two", "one"):
        for rank in (0, 1) if directory == "two" else (0,):
            whole = torch.load(runs / directory / f"rank{rank}.pt", weights_only=True)
            resumed = torch.load(runs / directory / f"resumed{rank}.pt", weights_only=True)
            assert resumed["stats"] == whole["stats"] and resumed["real_steps"] == whole["real_steps"][5:]
            assert resumed["synced"] == whole["synced"][5:]
            for name, value in whole["params"].items():
                assert torch.equal(resumed["params"][name], value), (directory, rank, name)


def test_trainer_on_two_processes_follows_the_single_process_trajectory(runs):
    """ELRA's real steps (every 3 micro-batches) fall inside Trainer's no_sync chunks of 2: ELRA decides the sync."""
    ranks, single = _load(runs, "trainer")
    assert single["stats"]["real_steps"] == 18 // 3 and not single["ddp"]
    assert all(rank["ddp"] for rank in ranks)
    _assert_matches(ranks, single)
    # the losses fed to the weight-decay control; transformers computes GPT-2's loss in float32
    assert ranks[0]["losses"] == ranks[1]["losses"] == pytest.approx(single["losses"], rel=1e-6)


def test_accelerate_sums_of_a_compiled_model_are_averaged_before_a_checkpoint(runs):
    """torch.compile's wrapper around DDP: ``sync_pending_grads`` did not see the DDP inside and averaged nothing
    (each process kept its own sums, and ``state_dict()`` saved process 0's without a word)."""
    ranks = [torch.load(runs / "two" / f"compiled_sums{r}.pt", weights_only=True) for r in range(2)]
    single = torch.load(runs / "one" / "compiled_sums0.pt", weights_only=True)
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=1e-10)


def test_trainer_compiled_on_two_processes_follows_the_single_process_trajectory(runs):
    """``torch_compile=True`` puts torch.compile's wrapper around DDP: ElraTrainer looked for DDP itself, left the
    sync to Trainer's chunks, and a real step inside a chunk took each process's own gradients (the processes
    drifted apart, 4e-4 after 2 real steps)."""
    ranks, single = _load(runs, "compiled")
    assert all(rank["ddp"] for rank in ranks) and not single["ddp"]
    assert single["stats"]["real_steps"] == 12 // 3
    _assert_matches(ranks, single)


def _initial_params():
    from hf_worker import tiny_gpt2

    return [p.detach() for p in tiny_gpt2(dtype=torch.float64).parameters()]


@pytest.mark.parametrize(
    "setting, match",
    [({"gradient_accumulation_steps": 4, "scaler": None}, "batch_multiplier"),
     ({"gradient_accumulation_steps": 1, "scaler": object()}, "bf16")],
    ids=["accelerate-accumulation", "fp16-scaler"],
)
def test_accelerate_settings_that_act_behind_elras_back_are_refused(setting, match):
    from elra import ElraOptimizer
    from elra.integrations.accelerate import accumulate

    model = torch.nn.Linear(2, 1)
    optimizer = ElraOptimizer(model.parameters(), None, 4, 2)
    accelerator = SimpleNamespace(**setting)  # the two attributes accumulate() reads; no Accelerate singleton touched
    with pytest.raises(ValueError, match=match):
        with accumulate(accelerator, model, optimizer):
            pass


def test_trainer_resumed_on_two_processes_mid_collection_equals_the_uninterrupted_run(runs):
    """Each DDP process collects its own partial sums (sync off) and train losses: the checkpoint (written
    by process 0) held process 0's alone, the resumed run went another way and fed ELRA process 0's losses
    twice. ElraTrainer averages the sums over the processes before saving, as ``sync_pending_grads`` does,
    and saves every process's losses."""
    for ranks in (_load(runs, "trainer")[0], _load(runs, "trainer_resumed")[0]):
        assert ranks[0]["ddp"] and ranks[1]["ddp"]
    for directory in ("two", "one"):
        whole = torch.load(runs / directory / "trainer0.pt", weights_only=True)
        resumed = torch.load(runs / directory / "trainer_resumed0.pt", weights_only=True)
        assert resumed["stats"] == whole["stats"] and whole["stats"]["real_steps"] == 18 // 3
        assert resumed["losses"] == whole["losses"]
        assert resumed["fed"] == whole["fed"][1:] and len(whole["fed"]) == 3  # evaluations at steps 4, 8, 9
        for name, value in whole["params"].items():
            assert torch.equal(resumed["params"][name], value), (directory, name)
