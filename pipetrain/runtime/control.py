"""The control plane: small messages between the driver and its stages.

Activations and gradients never come here: they go worker to worker over the
transport. This is only rendezvous (each stage's transport address, in the
scheduler's metadata), reports (losses, busy time, checkpoint shards written)
and the stop signal, carried by Dask's own coordination primitives through
the scheduler, all namespaced by job id and generation so a stage of an old
generation talks into the void.

The stop flag is watched by a thread of its own (polling the scheduler four
times a second), so the compute thread checks a local flag: cheap enough to
look at after every action, not only while waiting for data. The stop and a
time-based checkpoint request live in one metadata entry per generation
(``ControlNames.flags``), so each poll is one scheduler call; and reports go
out at most every ``REPORT_PERIOD``, all those queued meanwhile as one item.
Each scheduler call wakes the worker's event loop, whose thread then takes the
GIL from the compute thread: on a 2-core machine, a two-call poll and a call per
report cost a pipeline of 55 ms steps about 5% of its throughput.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipetrain.runtime.messages import CourierError, Report


@dataclass(frozen=True)
class ControlNames:
    job_id: str
    generation: int

    @property
    def prefix(self) -> str:
        return f"pipetrain/{self.job_id}/g{self.generation}"

    def address(self, stage: int) -> str:
        return f"{self.prefix}/address/{stage}"

    @property
    def reports(self) -> str:
        return f"{self.prefix}/reports"

    @property
    def flags(self) -> list[str]:
        """The generation's flags in the scheduler's metadata: {"stop": True, "checkpoint-request": cut}."""
        return ["pipetrain", f"{self.prefix}/flags"]


# How often a stage's courier sends its reports at most: those queued meanwhile go as one item.
# The driver reads them every JobPlan.poll (0.2 s) anyway.
REPORT_PERIOD = 0.1


def unbatched(items: list[Any]) -> list[Any]:
    """The reports in what the reports queue held: each item is one report's wire dict or a batch of
    them (a list, which the scheduler's serialization may hand back as a tuple)."""
    return [report for item in items for report in (item if isinstance(item, (list, tuple)) else [item])]


class StageControl:
    """A stage's side: publish its address, find its neighbours, report."""

    def __init__(self, names: ControlNames, *, client: Any = None):
        from distributed import Queue

        self.names = names
        self._client = client
        self._reports = Queue(names.reports, client=client)
        self._outbox: queue.Queue = queue.Queue()
        # Reports go out from a thread of their own so the compute thread never
        # waits on a scheduler round trip.
        self._courier = threading.Thread(target=self._deliver, name="pipetrain-courier", daemon=True)
        self._courier.start()
        self._stop_seen = threading.Event()
        self.requested_cut: int | None = None  # a time-based checkpoint the driver asked for
        self._closed = threading.Event()
        self._task = _current_task()  # (worker, key) when this runs as a Dask task
        self._watcher = threading.Thread(target=self._watch_stop, name="pipetrain-stop-watch", daemon=True)
        self._watcher.start()

    def _metadata_client(self) -> Any:
        if self._client is not None:
            return self._client
        from distributed import get_client

        return get_client()

    def publish_address(self, stage: int, address: str) -> None:
        self._metadata_client().set_metadata(["pipetrain", self.names.address(stage)], address)

    def peer_address(self, stage: int, *, timeout: float, poll: float = 0.02) -> str:
        """The transport address stage ``stage`` published. Polled (scheduler
        metadata has a non-blocking read; a blocking ``Variable.get`` that times
        out logs an error on the scheduler), so a stop (a neighbour died while
        the generation was starting) ends the wait."""
        client = self._metadata_client()
        deadline = time.monotonic() + timeout
        while True:
            address = client.get_metadata(["pipetrain", self.names.address(stage)], default=None)
            if address is not None:
                return address
            if self.stopped():
                from pipetrain.runtime.links import Stopped

                raise Stopped(f"stopped by the driver while waiting for the address of stage {stage}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage {stage} did not publish its transport address within {timeout:.0f} s")
            time.sleep(poll)

    def stopped(self) -> bool:
        return self._stop_seen.is_set()

    def wait_stopped(self, timeout: float) -> bool:
        """Whether the driver's stop arrives within ``timeout`` seconds."""
        return self._stop_seen.wait(timeout)

    # A stage cut off from the scheduler this long stops: its driver can no
    # longer hear it, commit its checkpoints or stop it, so training on would
    # only leave uncommitted checkpoints behind (and a Dask scheduler that comes
    # back has forgotten every task anyway).
    CONTROL_LOST_AFTER = 3.0

    def _watch_stop(self) -> None:
        # Polled with is_set rather than a blocking Event.wait: a wait still
        # pending on the scheduler when the task ends or the cluster closes is
        # cancelled there and logged as an error.
        unreachable_since: float | None = None
        while not self._closed.wait(0.25):
            if self._task_released():
                self.lost_reason = "its Dask task was released (its driver is gone and Dask forgot it)"
                self._stop_seen.set()
                return
            try:
                client = self._metadata_client()
                if str(getattr(client, "status", "running")) != "running":
                    raise ConnectionError(f"client status {client.status!r}")
                flags = client.sync(client.scheduler.get_metadata, keys=self.names.flags, default=None,
                                    callback_timeout=2.0) or {}
                if flags.get("stop"):
                    self._stop_seen.set()
                    return
                self.requested_cut = flags.get("checkpoint-request")
                unreachable_since = None
            except Exception as error:  # noqa: BLE001 - unreachable for a moment, or for good
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.CONTROL_LOST_AFTER:
                    self.lost_reason = f"the control plane (Dask scheduler) is unreachable: {error!r}"
                    self._stop_seen.set()
                    return

    lost_reason: str | None = None  # set when the stop came from losing the scheduler, not from the driver

    def _task_released(self) -> bool:
        """Whether the worker no longer runs this stage's task for anyone: its driver's
        client went away and Dask cancelled or forgot it, while this thread, which
        Dask cannot kill, trains on. A stage that notices stops, as on its stop flag."""
        if self._task is None:
            return False
        worker, key = self._task
        state = worker.state.tasks.get(key)
        return state is None or state.state in ("cancelled", "released", "forgotten")

    def report(self, message: Report) -> None:
        """Send ``message`` (a ``runtime.messages`` report) from the courier thread."""
        self._outbox.put(message)

    def call_in_courier(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the courier thread, in order with reports; a report it returns is sent."""
        self._outbox.put((fn, args))

    def close(self) -> None:
        self._closed.set()
        self._outbox.put(None)
        self._courier.join()
        if self._error is not None:
            raise self._error

    _error: BaseException | None = None

    def _deliver(self) -> None:
        last_put = -REPORT_PERIOD
        closing = False
        while not closing:
            items = [self._outbox.get()]
            # Whatever else comes before REPORT_PERIOD has passed since the last put goes with it.
            while items[-1] is not None and (wait := last_put + REPORT_PERIOD - time.monotonic()) > 0:
                try:
                    items.append(self._outbox.get(timeout=wait))
                except queue.Empty:
                    break
            closing = items[-1] is None
            batch = []
            for item in items[:-1] if closing else items:
                try:
                    if isinstance(item, tuple):  # call_in_courier: in order with the reports
                        fn, args = item
                        item = fn(*args)
                    if isinstance(item, Report):
                        batch.append(item.to_wire())
                except BaseException as e:  # surfaced by close(), and reported
                    self._error = e
                    batch.append(CourierError(self.names.generation, None, error=repr(e)).to_wire())
            if batch:
                try:
                    self._reports.put(batch)
                except BaseException as e:
                    self._error = self._error or e
                last_put = time.monotonic()


def _current_task() -> tuple[Any, str] | None:
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except (ImportError, ValueError, AttributeError):
        return None
    return (worker, key) if key is not None else None


class DriverControl:
    """The driver's side: read reports, raise the stop flag."""

    def __init__(self, names: ControlNames, *, client: Any):
        from distributed import Queue

        self.names, self._client = names, client
        self._reports = Queue(names.reports, client=client)

    def drain(self, timeout: float, *, callback_timeout: float | None = None) -> list[Any]:
        """Every report waiting now; if none, wait ``timeout`` and return none.
        (A blocking ``Queue.get`` that times out logs an error on the scheduler.)
        ``callback_timeout`` bounds the call itself: a scheduler that went away
        raises TimeoutError then, not after the client's 30 s reconnect."""
        import time

        reports = unbatched(self._reports.get(batch=True, callback_timeout=callback_timeout))
        if not reports:
            time.sleep(timeout)
        return reports

    def stop(self) -> None:
        self._client.set_metadata(self.names.flags + ["stop"], True)

    def request_checkpoint(self, client: Any, cut: int) -> None:
        """Ask every stage for a checkpoint at ``cut`` (time-based checkpoints)."""
        client.set_metadata(self.names.flags + ["checkpoint-request"], cut)
