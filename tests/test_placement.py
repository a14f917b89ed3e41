"""Placement: the pure rules on hand-made worker lists, then a real LocalCluster."""
from __future__ import annotations

import random
import re

import pytest

from pipetrain.runtime.placement import (
    Placement,
    PlacementError,
    StageNeed,
    WorkerInfo,
    place,
    wait_for_placement,
    wait_for_placement_async,
    workers_from_scheduler_info,
)

GiB = 2**30


def worker(host: str, port: int, *, gpu: int = 0, memory: int | None = 16 * GiB, status: str = "running"):
    return WorkerInfo(address=f"tcp://{host}:{port}", host=host, resources={"GPU": gpu} if gpu else {},
                      memory_limit=memory, nthreads=1, name=f"{host}-{port}", status=status)


def needs(n: int, memory: int = 0) -> list[StageNeed]:
    return [StageNeed(stage=s, memory_bytes=memory) for s in range(n)]


def test_only_workers_declaring_the_resource_are_used_when_any_does():
    cpu = [worker("10.0.0.1", p) for p in (1, 2, 3)]
    gpu = [worker("10.0.0.2", 1, gpu=1), worker("10.0.0.3", 1, gpu=1)]
    placement = place(cpu + gpu, needs(2))
    assert set(placement.stage_workers.values()) == {w.address for w in gpu}
    assert placement.spares == ()  # CPU workers are not spares of a GPU job
    assert placement.resource == "GPU" and placement.task_resources == {"GPU": 1}

    with pytest.raises(PlacementError, match="lacks resource 'GPU'"):
        place(cpu + gpu, needs(3))


def test_all_workers_are_candidates_when_none_declares_the_resource():
    workers = [worker("127.0.0.1", p) for p in (40001, 40002, 40003)]
    placement = place(workers, needs(2))
    assert placement.stage_workers == {0: "tcp://127.0.0.1:40001", 1: "tcp://127.0.0.1:40002"}
    assert placement.spares == ("tcp://127.0.0.1:40003",)
    assert placement.resource is None and placement.task_resources == {}

    with pytest.raises(PlacementError, match="no workers declare|lacks resource"):
        place(workers, needs(1), require_resource=True)


def test_stages_spread_over_hosts_before_doubling_up():
    workers = [worker(h, p, gpu=1) for h in ("a", "b", "c") for p in (1, 2)]
    placement = place(workers, needs(3))
    hosts = {w.address: w.host for w in workers}
    assert sorted(hosts[a] for a in placement.stage_workers.values()) == ["a", "b", "c"]

    four = place(workers, needs(4))
    assert sorted(hosts[a] for a in four.stage_workers.values()) == ["a", "a", "b", "c"]
    # The spare on a host with the fewest stages comes first: it shares fewest failures.
    assert [hosts[a] for a in four.spares] == ["b", "c"]


def test_memory_need_is_checked_and_a_big_stage_gets_the_big_worker():
    small = worker("a", 1, gpu=1, memory=4 * GiB)
    big = worker("b", 1, gpu=1, memory=64 * GiB)
    stage_needs = [StageNeed(0, 2 * GiB), StageNeed(1, 32 * GiB)]  # big stage listed last on purpose
    assert place([small, big], stage_needs).stage_workers == {0: small.address, 1: big.address}

    with pytest.raises(PlacementError) as error:
        place([small, big], [StageNeed(0, 32 * GiB), StageNeed(1, 32 * GiB)])
    assert "too little memory" in str(error.value)


def test_unlimited_memory_fits_everything_and_is_kept_as_a_spare_when_possible():
    unlimited = worker("a", 1, memory=None)
    limited = worker("b", 1, memory=8 * GiB)
    placement = place([unlimited, limited], needs(1, memory=1 * GiB))
    assert placement.stage_workers == {0: limited.address}  # best fit leaves the roomiest as spare
    assert placement.spares == (unlimited.address,)
    assert place([unlimited, limited], needs(1, memory=100 * GiB)).stage_workers == {0: unlimited.address}


def test_excluded_and_not_running_workers_are_never_used():
    workers = [worker("a", 1, gpu=1), worker("b", 1, gpu=1), worker("c", 1, gpu=1, status="closing_gracefully")]
    placement = place(workers, needs(1), exclude=["tcp://a:1"])
    assert placement.stage_workers == {0: "tcp://b:1"} and placement.spares == ()
    with pytest.raises(PlacementError) as error:
        place(workers, needs(2), exclude=["tcp://a:1"])
    assert "excluded (known dead, or a driver's own)" in str(error.value)
    assert "not running (closing_gracefully)" in str(error.value)


def test_placement_is_deterministic_whatever_the_order_of_the_worker_list():
    workers = [worker(f"10.0.0.{h}", p, gpu=1, memory=(h % 3 + 1) * 8 * GiB) for h in range(1, 12) for p in (1, 2)]
    stage_needs = [StageNeed(s, (s % 3) * 8 * GiB) for s in range(8)]
    expected = place(workers, stage_needs)
    for seed in range(5):
        shuffled = workers[:]
        random.Random(seed).shuffle(shuffled)
        assert place(shuffled, stage_needs) == expected
    # Natural order: 10.0.0.9 comes before 10.0.0.10.
    uniform = [worker("10.0.0.10", 1, gpu=1), worker("10.0.0.9", 1, gpu=1)]
    assert place(uniform, needs(1)).stage_workers == {0: "tcp://10.0.0.9:1"}
    assert expected.spares[0].startswith("tcp://10.0.0.") and len(expected.spares) == 22 - 8


def test_error_message_says_what_was_found_and_what_was_needed():
    workers = [worker("gpu-host-1", 8786, gpu=1, memory=8 * GiB), worker("cpu-host", 8787)]
    with pytest.raises(PlacementError) as error:
        place(workers, [StageNeed(0, 2 * GiB), StageNeed(1, 3 * GiB)])
    message = str(error.value)
    for expected in ("2 stages need 2 distinct workers from workers declaring resource 'GPU'",
                     "stage 0: memory 2.0 GiB", "stage 1: memory 3.0 GiB, on worker tcp://gpu-host-1:8786",
                     "tcp://gpu-host-1:8786 (name gpu-host-1-8786, host gpu-host-1, resources GPU=1, memory 8.0 GiB",
                     "tcp://cpu-host:8787", "resources none", "lacks resource 'GPU'",
                     "taken by stage 1"):
        assert expected in message, f"{expected!r} missing from:\n{message}"


def test_repeated_stage_ids_are_refused():
    with pytest.raises(ValueError, match="stage ids repeat"):
        place([worker("a", 1)], [StageNeed(0), StageNeed(0)])


def test_scheduler_info_entries_become_worker_records():
    info = {"workers": {
        "tcp://10.0.0.2:1": {"host": "10.0.0.2", "resources": {"GPU": 1}, "memory_limit": 0,
                             "nthreads": 1, "name": 7, "status": "running"},
        "tcp://10.0.0.1:1": {"host": "10.0.0.1", "resources": {}, "memory_limit": 1024,
                             "nthreads": 4, "name": "w", "status": "paused"},
    }}
    first, second = workers_from_scheduler_info(info)
    assert first == WorkerInfo("tcp://10.0.0.1:1", "10.0.0.1", {}, 1024, 4, "w", "paused")
    assert second == WorkerInfo("tcp://10.0.0.2:1", "10.0.0.2", {"GPU": 1}, None, 1, "7", "running")
    with pytest.raises(ValueError, match="no 'workers' entry"):
        workers_from_scheduler_info({"tcp://10.0.0.1:1": {}})


# --- a real cluster: two worker processes, one thread each -------------------------------------

def _local_cluster(**worker_kwargs):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                           **worker_kwargs)
    return cluster, Client(cluster)


@pytest.mark.cluster
def test_real_local_cluster_without_resources():
    cluster, client = _local_cluster()
    try:
        workers = workers_from_scheduler_info(client.scheduler_info(n_workers=-1))
        assert len(workers) == 2 and all(w.resources == {} and w.nthreads == 1 for w in workers)
        assert all(w.memory_limit and w.memory_limit > 0 for w in workers)

        placement = wait_for_placement(client, needs(2), timeout=10)
        assert set(placement.stage_workers.values()) == set(cluster.scheduler_info["workers"])
        assert placement.resource is None and placement.spares == ()

        with pytest.raises(PlacementError) as error:
            wait_for_placement(client, needs(3), timeout=1.0, poll=0.2)
        message = str(error.value)
        assert "3 stages need 3 distinct workers" in message and "Found 2 worker(s)" in message
        assert re.search(r"Waited 1\.\d s for suitable workers \(timeout 1 s\)", message)
    finally:
        client.close()
        cluster.close()


@pytest.mark.cluster
def test_real_local_cluster_with_gpu_resources_and_an_async_client():
    import asyncio

    from distributed import Client

    cluster, client = _local_cluster(resources={"GPU": 1})
    try:
        workers = workers_from_scheduler_info(client.scheduler_info(n_workers=-1))
        assert [w.resources for w in workers] == [{"GPU": 1}, {"GPU": 1}]
        placement = wait_for_placement(client, needs(1), timeout=10)
        assert placement.resource == "GPU" and len(placement.spares) == 1

        # The stage task can claim the resource and runs where it was placed.
        address = placement.worker_of(0)
        future = client.submit(lambda: "ran", workers=[address], resources=placement.task_resources, pure=False)
        assert future.result(timeout=30) == "ran"
        assert client.who_has(future)[future.key] == (address,)

        async def with_async_client():
            async with Client(cluster.scheduler_address, asynchronous=True) as aclient:
                found = await wait_for_placement_async(aclient, needs(2), timeout=10)
                with pytest.raises(PlacementError, match=r"Waited \d+\.\d s .*timeout 0.5 s"):
                    await wait_for_placement_async(aclient, needs(2), exclude=[address], timeout=0.5, poll=0.1)
                return found

        assert asyncio.run(with_async_client()) == place(workers, needs(2))
    finally:
        client.close()
        cluster.close()


def test_placement_records_compare_by_value():
    assert Placement({0: "a"}, ("b",), None) == Placement({0: "a"}, ("b",), None)


def test_a_worker_kept_for_drivers_never_gets_a_stage_and_the_error_says_why():
    from pipetrain.runtime.placement import DRIVER_RESOURCE

    workers = [WorkerInfo("tcp://a:1", "a"), WorkerInfo("tcp://b:1", "b", resources={DRIVER_RESOURCE: 1})]
    placement = place(workers, [StageNeed(0)], resource=None)
    assert placement.stage_workers == {0: "tcp://a:1"} and placement.spares == ()
    line = (f"tcp://b:1 (name , host b, resources {DRIVER_RESOURCE}=1, memory unlimited, running) -- reserved for "
            f"drivers ({DRIVER_RESOURCE})")
    with pytest.raises(PlacementError, match=re.escape(line)):
        place(workers, [StageNeed(0), StageNeed(1)], resource=None)
