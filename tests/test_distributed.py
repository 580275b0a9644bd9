"""Data-parallel and sharded ELRA (gloo, CPU, spawned ranks) against one process on the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from dist_worker import Scenario, make_net, run_scenarios

TWO_RANKS = [
    Scenario(
        "ddp",
        options={"momentum": 0.5, "weight_decay": 1e-3, "check_consistency": 1},
        nan_loss_at=6,
        bad_loss_at=11,
        count_collectives=True,
    ),
    Scenario("ddp-collect-grad-sync", batch_multiplier=2),
    Scenario("ddp-collect-no-helper", batch_multiplier=2, use_grad_sync=False, count_collectives=True),
    Scenario("fsdp2-per-layer", "fsdp2", batch_multiplier=2, options={"weight_decay": 1e-3}, nan_loss_at=9),
    Scenario("fsdp2-root", "fsdp2-root", bad_loss_at=5),
    Scenario("fsdp2-skip-mid-collection", "fsdp2", batch_multiplier=2, bad_loss_at=9, nan_loss_at=13),
    Scenario("fsdp1-flat", "fsdp1", batch_multiplier=2, nan_loss_at=9),
    Scenario("fsdp1-orig-params", "fsdp1-orig", batch_multiplier=2, options={"momentum": 0.5}),
    Scenario("diverged-ranks", options={"check_consistency": 1}, steps=3, diverge=True),
]
THREE_RANKS = [
    Scenario("ddp-collect-grad-sync", batch_multiplier=2, nan_loss_at=7),
    Scenario("fsdp2-per-layer", "fsdp2", batch_multiplier=2, use_grad_sync=False, options={"weight_decay": 1e-3}),
    Scenario("fsdp1-flat", "fsdp1", nan_loss_at=4),
    Scenario("fsdp1-orig-params", "fsdp1-orig", batch_multiplier=2, nan_loss_at=9),
]
FOUR_RANKS = [Scenario("hsdp-2x2", "hsdp", batch_multiplier=2, options={"momentum": 0.5}, nan_loss_at=5)]


def _spawn(tmp_path, world: int, scenarios: list[Scenario]) -> list[dict]:
    mp.spawn(run_scenarios, args=(world, f"file://{tmp_path}/store", str(tmp_path), scenarios), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("two"), 2, TWO_RANKS)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("three"), 3, THREE_RANKS)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("four"), 4, FOUR_RANKS)


def _assert_matches_single_process(ranks: list[dict], name: str) -> dict:
    results = [r[name] for r in ranks]
    assert all("error" not in r for r in results), [r.get("error") for r in results]
    stats = results[0]["stats"]
    assert all(r["stats"] == stats for r in results), "ranks disagree"
    single = results[0]["single"]
    for key, value in single["stats"].items():
        if isinstance(value, float):
            assert math.isclose(stats[key], value, rel_tol=1e-9, abs_tol=1e-15), key
        else:
            assert stats[key] == value, key
    for key, value in single["params"].items():
        assert torch.allclose(results[0]["params"][key], value, rtol=0, atol=1e-10), key
        assert all(torch.equal(r["params"][key], results[0]["params"][key]) for r in results), key
    assert torch.equal(single["params"]["dead"], make_net().dead)
    return stats


@pytest.mark.parametrize("name", [s.name for s in TWO_RANKS if not s.diverge])
def test_two_ranks_follow_the_single_process_trajectory(two, name):
    stats = _assert_matches_single_process(two, name)
    scenario = next(s for s in TWO_RANKS if s.name == name)
    if scenario.nan_loss_at is not None or scenario.bad_loss_at is not None:
        assert stats["retraces"] >= 1


@pytest.mark.parametrize("name", [s.name for s in THREE_RANKS])
def test_three_ranks_with_uneven_shards_follow_the_single_process_trajectory(three, name):
    _assert_matches_single_process(three, name)


def test_hsdp_on_a_2x2_mesh_follows_the_single_process_trajectory(four):
    stats = _assert_matches_single_process(four, "hsdp-2x2")
    assert stats["retraces"] >= 1


def test_nan_loss_on_one_rank_retraces_every_rank(two):
    results = [r["ddp"] for r in two]
    assert results[0]["stats"]["retraces"] == results[1]["stats"]["retraces"] >= 2


def test_step_issues_at_most_one_collective_and_none_while_collecting(two):
    for name in ("ddp", "ddp-collect-no-helper"):
        counts = two[0][name]["counts"]
        assert counts and all(total == (0 if collecting else 1) for collecting, total in counts)
        assert any(collecting for collecting, _ in counts) == (name != "ddp")


def test_diverged_controller_state_raises_on_every_rank(two):
    for rank in two:
        assert "ranks disagree" in rank["diverged-ranks"]["error"]
