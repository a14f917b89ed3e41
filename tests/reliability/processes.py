"""A Dask cluster of real, separate processes: `dask scheduler` and `dask worker`.

For the tests that kill the scheduler itself, or start workers that see the
file system differently from the driver (their own mount namespace, as a
container without the shared directory mounted would): a LocalCluster's
scheduler lives inside the test process, where neither can be done.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from pipetrain.runtime.local import single_thread_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessCluster:
    def __init__(self, n_workers: int, *, worker_prefix: list[str] | None = None):
        self.env = {**os.environ, **single_thread_env()}
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", self.address.rsplit(":", 1)[1], "--no-dashboard"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers = [self._worker(worker_prefix or []) for _ in range(n_workers)]

    def _worker(self, prefix: list[str]) -> subprocess.Popen:
        command = [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--nthreads", "1",
                   "--no-dashboard", "--memory-limit", "0", "--no-nanny", "--host", "127.0.0.1"]
        if prefix:  # e.g. unshare ... sh -c 'mount ...; exec "$@"' sh
            command = prefix + command
        return subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_scheduler(self) -> None:
        self.scheduler.kill()
        self.scheduler.wait(timeout=10)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                process.kill()
        for process in [*self.workers, self.scheduler]:
            process.wait(timeout=10)


@contextmanager
def process_cluster(n_workers: int, **kwargs) -> Iterator[ProcessCluster]:
    cluster = ProcessCluster(n_workers, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()


def read_only_prefix(path: str) -> list[str] | None:
    """A command prefix that runs a worker in its own mount namespace where
    ``path`` is read-only (None where unshare or mounting is not allowed)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return None
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = f'mount --bind "{path}" "{path}" && mount -o remount,bind,ro "{path}" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh"]


def wait_until(predicate, *, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
