"""ELRA in an Accelerate loop: 2 processes (DDP over gloo) against 1 process on the same global batches."""

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_worker import accelerate_process  # noqa: E402

STEPS, MULTIPLIER, GLOBAL_BATCH = 12, 3, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    (out / "two").mkdir()
    (out / "one").mkdir()
    args = (f"file://{out}/store", STEPS, MULTIPLIER, GLOBAL_BATCH, str(out))
    mp.spawn(accelerate_process, args=args, nprocs=3, join=True)
    ranks = [torch.load(out / "two" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, torch.load(out / "one" / "rank0.pt", weights_only=True)


def test_two_processes_follow_the_single_process_trajectory(runs):
    ranks, single = runs
    assert single["stats"]["real_steps"] == STEPS // MULTIPLIER
    for rank in ranks:
        assert rank["stats"] == single["stats"]
        for name, value in single["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=0, atol=1e-10)
    moved = [not torch.equal(a, b) for a, b in zip(single["params"].values(), _initial_params())]
    assert all(moved)


def test_gradients_are_all_reduced_only_for_real_steps(runs):
    ranks, _ = runs
    real = [(i + 1) % MULTIPLIER == 0 for i in range(STEPS)]
    for rank in ranks:
        assert rank["synced"] == real


def _initial_params():
    from hf_worker import tiny_gpt2

    return [p.detach() for p in tiny_gpt2(dtype=torch.float64).parameters()]


def test_accelerate_gradient_accumulation_is_refused():
    from accelerate import Accelerator

    from elra import ElraOptimizer
    from elra.integrations.accelerate import accumulate

    model = torch.nn.Linear(2, 1)
    optimizer = ElraOptimizer(model.parameters(), None, 4, 2)
    accelerator = Accelerator(cpu=True)
    accelerator.gradient_accumulation_steps = 4
    with pytest.raises(ValueError, match="batch_multiplier"):
        with accumulate(accelerator, model, optimizer):
            pass
