"""Placement of d replicas of a p-stage pipeline: pure rules on hand-made worker lists, then a real LocalCluster."""
from __future__ import annotations

import random

import pytest

from pipetrain.runtime.placement import (
    PlacementError,
    StageNeed,
    WorkerInfo,
    place,
    wait_for_placement,
    workers_from_scheduler_info,
)

GiB = 2**30


def worker(host: str, port: int, *, memory: int | None = 16 * GiB) -> WorkerInfo:
    return WorkerInfo(address=f"tcp://{host}:{port}", host=host, resources={"GPU": 1}, memory_limit=memory,
                      name=f"{host}-{port}")


def hosts(names: str, per_host: int, **kwargs) -> list[WorkerInfo]:
    return [worker(h, port, **kwargs) for h in names for port in range(1, per_host + 1)]


def replica_needs(num_stages: int, num_replicas: int, memory=lambda s: 0) -> list[StageNeed]:
    return [StageNeed(stage=r * num_stages + s, memory_bytes=memory(s), replica=r)
            for r in range(num_replicas) for s in range(num_stages)]


def host_grid(placement, workers, num_stages: int, num_replicas: int) -> list[list[str]]:
    """grid[r][s]: the host running stage s of replica r."""
    host_of = {w.address: w.host for w in workers}
    return [[host_of[placement.stage_workers[r * num_stages + s]] for s in range(num_stages)]
            for r in range(num_replicas)]


def assert_one_task_per_worker(placement, workers, needs):
    assigned = list(placement.stage_workers.values())
    assert sorted(placement.stage_workers) == sorted(n.stage for n in needs)
    assert len(set(assigned)) == len(assigned), "a worker got two tasks"
    assert set(assigned).isdisjoint(placement.spares)
    assert set(assigned) | set(placement.spares) == {w.address for w in workers}
    memory = {w.address: w for w in workers}
    for need in needs:
        assert memory[placement.stage_workers[need.stage]].fits(need.memory_bytes), need


def test_each_replica_packs_onto_one_host_and_replicas_take_different_hosts():
    workers = hosts("abc", 4)
    needs = replica_needs(3, 2)
    placement = place(workers, needs)
    assert_one_task_per_worker(placement, workers, needs)
    assert host_grid(placement, workers, 3, 2) == [["a", "a", "a"], ["b", "b", "b"]]
    # The untouched host's workers are the best replacements, then the partly used hosts'.
    assert placement.spares == ("tcp://c:1", "tcp://c:2", "tcp://c:3", "tcp://c:4", "tcp://a:4", "tcp://b:4")

    # More replicas than hosts: whole replicas still, shared out over the hosts in turn.
    four = place(hosts("ab", 4), replica_needs(2, 4))
    assert host_grid(four, hosts("ab", 4), 2, 4) == [["a", "a"], ["b", "b"], ["a", "a"], ["b", "b"]]


def test_a_replica_too_big_for_any_host_fills_hosts_in_stage_order():
    workers = hosts("abc", 4)
    needs = replica_needs(6, 2)
    grid = host_grid(place(workers, needs), workers, 6, 2)
    # Two hosts each (the fewest), consecutive stages adjacent, and replica 1 starts on the
    # host replica 0 ended on, so no stage has both replicas on one host.
    assert grid == [["a"] * 4 + ["b"] * 2, ["b"] * 2 + ["c"] * 4]
    assert all(grid[0][s] != grid[1][s] for s in range(6))

    # With a fourth host, replica 1 keeps off replica 0's hosts altogether.
    assert host_grid(place(hosts("abcd", 4), needs), hosts("abcd", 4), 6, 2) == [
        ["a"] * 4 + ["b"] * 2, ["c"] * 4 + ["d"] * 2]


def test_one_worker_hosts_spread_each_stages_replicas():
    workers = hosts("abcdef", 1)
    needs = replica_needs(3, 2)
    placement = place(workers, needs)
    assert_one_task_per_worker(placement, workers, needs)
    assert host_grid(placement, workers, 3, 2) == [["a", "b", "c"], ["d", "e", "f"]]

    # A big host with room left does not take replica 1 while one-worker hosts are free:
    # stage s of both replicas would then share a host.
    mixed = hosts("a", 4) + hosts("bc", 1)
    assert host_grid(place(mixed, replica_needs(2, 2)), mixed, 2, 2) == [["a", "a"], ["b", "c"]]

    # Two-worker hosts, three-stage replicas: replica 1 takes the host that replica 0 ends on
    # for its first stage, not its last.
    pairs = hosts("abc", 2)
    grid = host_grid(place(pairs, needs), pairs, 3, 2)
    assert grid == [["a", "a", "b"], ["b", "c", "c"]]


def test_memory_decides_which_workers_of_a_host_take_which_stage():
    # Host a: one big, one small worker; the big stage of each replica gets the big one.
    workers = [worker("a", 1, memory=8 * GiB), worker("a", 2, memory=64 * GiB),
               worker("b", 1, memory=8 * GiB), worker("b", 2, memory=64 * GiB)]
    needs = replica_needs(2, 2, memory=lambda s: 32 * GiB if s == 1 else 4 * GiB)
    placement = place(workers, needs)
    assert placement.stage_workers == {0: "tcp://a:1", 1: "tcp://a:2", 2: "tcp://b:1", 3: "tcp://b:2"}

    # Within a host, a stage takes the smallest worker that fits it: the big one stays a spare.
    roomy = [worker(h, p, memory=memory) for h in "ab" for p, memory in ((1, 64 * GiB), (2, 16 * GiB), (3, 16 * GiB))]
    placed = place(roomy, replica_needs(2, 2, memory=lambda s: 8 * GiB))
    assert placed.stage_workers == {0: "tcp://a:2", 1: "tcp://a:3", 2: "tcp://b:2", 3: "tcp://b:3"}
    assert placed.spares == ("tcp://a:1", "tcp://b:1")


def test_a_replica_keeps_off_other_replicas_hosts_when_as_few_hosts_do():
    # Replica 0 fills host a and puts its big last stage on b. Replica 1 could start on b's two
    # free workers (b + d, two hosts), but c + d is two hosts too and holds no other replica.
    workers = hosts("abd", 3, memory=64 * GiB) + [worker("c", 1, memory=8 * GiB)]
    needs = replica_needs(4, 2, memory=lambda s: 32 * GiB if s == 3 else 0)
    assert host_grid(place(workers, needs), workers, 4, 2) == [["a", "a", "a", "b"], ["c", "d", "d", "d"]]


def test_a_run_stops_short_of_a_stage_another_replica_holds_on_that_host():
    # Found by comparing against a search without short runs. Replica 1 ends on host e (stages
    # 2, 3); replica 2 reaches e at stage 1 and takes only that stage there, not 1-2, so that
    # no stage has two replicas on one host (four hosts rather than three).
    limits = {"a": [8], "b": [None, 8], "c": [None, None, None, 64], "d": [64], "e": [8, 8, 8, 8], "f": [64]}
    workers = [worker(h, p, memory=m and m * GiB) for h, ms in limits.items() for p, m in enumerate(ms, 1)]
    needs = replica_needs(4, 3, memory=lambda s: 32 * GiB if s == 0 else 0)
    grid = host_grid(place(workers, needs), workers, 4, 3)
    assert grid == [["c", "c", "c", "c"], ["b", "b", "e", "e"], ["d", "e", "a", "f"]]
    assert all(len({grid[r][s] for r in range(3)}) == 3 for s in range(4))


def test_a_memory_limited_mix_is_still_placed_when_grouping_cannot():
    # Packing replica 0 onto host a would take both big workers; replica 1's big stage would then
    # fit nowhere. The plain rule still places every task, each on a worker that fits it.
    workers = [worker("a", 1, memory=64 * GiB), worker("a", 2, memory=64 * GiB),
               worker("b", 1, memory=8 * GiB), worker("b", 2, memory=8 * GiB)]
    needs = replica_needs(2, 2, memory=lambda s: 32 * GiB if s == 0 else 4 * GiB)
    placement = place(workers, needs)
    assert_one_task_per_worker(placement, workers, needs)
    assert {placement.stage_workers[0], placement.stage_workers[2]} == {"tcp://a:1", "tcp://a:2"}

    with pytest.raises(PlacementError, match="too little memory"):
        place(workers, replica_needs(2, 2, memory=lambda s: 32 * GiB))


def test_replicas_are_placed_whenever_any_assignment_exists():
    # Oracle: the same tasks as one pipeline (replica 0 throughout) go through the plain rule,
    # which never strands a need that some assignment could place.
    rng = random.Random(0)
    placed = refused = 0
    for _ in range(300):
        workers = [worker(h, p, memory=rng.choice([None, 8 * GiB, 32 * GiB, 64 * GiB]))
                   for h in "abcdef"[:rng.randint(1, 6)] for p in range(1, rng.randint(2, 5))]
        num_stages, num_replicas = rng.randint(1, 4), rng.randint(2, 3)
        memory = [rng.choice([0, 4 * GiB, 16 * GiB, 48 * GiB]) for _ in range(num_stages)]
        needs = replica_needs(num_stages, num_replicas, memory=memory.__getitem__)
        try:
            place(workers, [StageNeed(n.stage, n.memory_bytes) for n in needs])
        except PlacementError:
            with pytest.raises(PlacementError):
                place(workers, needs)
            refused += 1
            continue
        assert_one_task_per_worker(place(workers, needs), workers, needs)
        placed += 1
    assert placed > 100 and refused > 30  # both sides of the oracle were exercised


def test_replica_placement_is_deterministic_whatever_the_order_of_the_worker_list():
    workers = [worker(f"10.0.0.{h}", p, memory=(h % 3 + 1) * 8 * GiB) for h in range(1, 12) for p in (1, 2, 3)]
    needs = replica_needs(4, 3, memory=lambda s: (s % 3) * 8 * GiB)
    expected = place(workers, needs)
    assert_one_task_per_worker(expected, workers, needs)
    for seed in range(5):
        shuffled = workers[:]
        random.Random(seed).shuffle(shuffled)
        assert place(shuffled, needs) == expected
        assert place(shuffled, sorted(needs, key=lambda n: -n.stage)) == expected


def test_error_text_counts_stages_times_replicas_and_names_each_task():
    workers = hosts("ab", 1) + hosts("c", 1, memory=2 * GiB)
    with pytest.raises(PlacementError) as error:
        place(workers, replica_needs(2, 2, memory=lambda s: 1 * GiB))
    message = str(error.value)
    for expected in ("cannot place stage 1 of replica 1 (needs memory 1.0 GiB)",
                     "2 stages x 2 replicas = 4 tasks need 4 distinct workers from workers declaring resource 'GPU'",
                     "Needed, one worker per task:",
                     "stage 0 of replica 0: memory 1.0 GiB, on worker tcp://",
                     "stage 1 of replica 1: memory 1.0 GiB\n",
                     "taken by stage 0 of replica 1", "Found 3 worker(s)"):
        assert expected in message, f"{expected!r} missing from:\n{message}"
    assert "4 stages need" not in message


def test_needs_that_are_not_p_stages_times_d_replicas_are_refused():
    workers = hosts("abcd", 2)
    with pytest.raises(ValueError, match=r"number the replicas 0\.\.1; the needs name replicas \[0, 2\]"):
        place(workers, [StageNeed(0, replica=0), StageNeed(1, replica=2)])
    with pytest.raises(ValueError, match="same number of tasks.*replica 0 has 2, replica 1 has 1"):
        place(workers, [StageNeed(0, replica=0), StageNeed(1, replica=0), StageNeed(2, replica=1)])
    misnumbered = r"StageNeed.stage 3 of replica 0 must be the task id replica \* 2 \+ stage, in 0\.\.1"
    with pytest.raises(ValueError, match=misnumbered):
        place(workers, [StageNeed(0, replica=0), StageNeed(3, replica=0), StageNeed(1, replica=1),
                        StageNeed(2, replica=1)])
    with pytest.raises(ValueError, match="stage ids repeat"):
        place(workers, [StageNeed(0, replica=0), StageNeed(0, replica=1)])


def test_one_replica_is_placed_exactly_as_before():
    # Rule 4 (spread over hosts) still holds for a single pipeline: no packing onto one host.
    workers = hosts("abc", 2)
    single = [StageNeed(s, s * GiB) for s in range(4)]
    explicit = [StageNeed(s, s * GiB, replica=0) for s in range(4)]
    placement = place(workers, single)
    assert place(workers, explicit) == placement
    assert sorted(host_grid(placement, workers, 4, 1)[0]) == ["a", "a", "b", "c"]
    # Stage ids need not be 0..p-1 without replicas, as before.
    assert set(place(workers, [StageNeed(5), StageNeed(9)]).stage_workers) == {5, 9}


@pytest.mark.cluster
def test_real_local_cluster_places_two_replicas_of_two_stages_on_four_workers():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=4, processes=False, threads_per_worker=1, dashboard_address=None,
                      resources={"GPU": 1}) as cluster, Client(cluster) as client:
        workers = workers_from_scheduler_info(client.scheduler_info(n_workers=-1))
        assert len(workers) == 4 and len({w.host for w in workers}) == 1
        needs = replica_needs(2, 2, memory=lambda s: 1024)
        placement = wait_for_placement(client, needs, timeout=10)
        assert placement == place(workers, needs) and placement.spares == ()
        # One host: each replica takes two neighbouring workers, in worker order.
        assert [placement.worker_of(t) for t in range(4)] == [w.address for w in workers]

        # Each task, claiming the resource, runs on the worker it was placed on.
        futures = {t: client.submit(lambda t: t, t, workers=[placement.worker_of(t)],
                                    resources=placement.task_resources, pure=False) for t in range(4)}
        assert {t: f.result(timeout=30) for t, f in futures.items()} == {0: 0, 1: 1, 2: 2, 3: 3}
        assert {t: tuple(client.who_has(f)[f.key]) for t, f in futures.items()} == {
            t: (placement.worker_of(t),) for t in range(4)}

        with pytest.raises(PlacementError, match="2 stages x 3 replicas = 6 tasks need 6 distinct workers"):
            wait_for_placement(client, replica_needs(2, 3), timeout=0.5, poll=0.1)
