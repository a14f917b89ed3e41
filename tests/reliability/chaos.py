"""Test-only faults that land at exact points of a pipeline: a model wrapper.

``ChaosModel(model, faults=[...], marker_dir=...)`` behaves like ``model``
(same layers, same numbers) except that its stages act when they reach a
fault's point: ``(stage, kind, k)`` with kind

- ``"F"`` / ``"B"``: at the start of the forward / backward of micro-batch k;
- ``"C"``: while the stage snapshots its state for the checkpoint at cut k
  (the runtime calls ``state_dict`` there, before the shard is written);
- ``"L"``: while the stage loads a checkpoint (only a resumed generation does);
- ``"S"``: inside the streamed backward of micro-batch k (an update's last, whose
  gradient buckets leave while it runs: runtime/replicas.py), once it has reported
  ``finals`` parameter sums final, so the buckets those complete have been sent.

and ``action``: ``"kill"`` sends SIGKILL to its own worker process (a real
kill of a real process: no cleanup runs, sockets reset, the nanny restarts
it), ``"stop"`` sends itself SIGSTOP (the test sends SIGCONT later),
``"corrupt-*"`` damages the newest committed checkpoint and then kills.

Each fault fires once per ``marker_dir``: the first process to reach it
creates ``marker_dir/<fault>`` exclusively (holding its pid), so the
re-run of the same micro-batch after recovery passes through untouched.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fault:
    stage: int
    kind: str  # F | B | C | L | S
    k: int = 0
    action: str = "kill"  # kill | stop | corrupt-truncate | corrupt-flip | corrupt-manifest | corrupt-marker
    # Wait (up to 20 s) until the checkpoint at this cut is committed before
    # acting, so the rollback point is known exactly.
    after_commit: int | None = None
    finals: int = 1  # "S": after this many sums of the streamed backward were final

    @property
    def name(self) -> str:
        return f"{self.action}-stage{self.stage}-{self.kind}{self.k}"


def fired(marker_dir: str | Path, fault: Fault) -> int | None:
    """The pid that fired ``fault``, None if it has not fired."""
    path = Path(marker_dir) / fault.name
    try:
        text = path.read_text().split()
    except FileNotFoundError:
        return None
    return int(text[0]) if text else None


class ChaosModel:
    def __init__(self, model: Any, *, faults: list[Fault], marker_dir: str, checkpoint_dir: str = ""):
        self.model, self.faults, self.marker_dir = model, list(faults), str(marker_dir)
        self.checkpoint_dir = str(checkpoint_dir)
        self.framework = model.framework

    def layer_names(self) -> list[str]:
        return self.model.layer_names()

    def layer_param_counts(self) -> list[int]:
        return self.model.layer_param_counts()

    def trace_specs(self, example_input: Any) -> list[Any]:
        return self.model.trace_specs(example_input)

    def layer_costs(self, method: str, example_input: Any, *, repeats: int = 5) -> list[float]:
        return self.model.layer_costs(method, example_input, repeats=repeats)

    def build_stage(self, spec: Any, *, optimizer: Any) -> "ChaosStage":
        mine = [f for f in self.faults if f.stage == spec.index]
        return ChaosStage(self.model.build_stage(spec, optimizer=optimizer), mine, self.marker_dir,
                          self.checkpoint_dir)


class ChaosStage:
    def __init__(self, inner: Any, faults: list[Fault], marker_dir: str, checkpoint_dir: str):
        self.inner, self.faults, self.marker_dir = inner, faults, marker_dir
        self.checkpoint_dir = checkpoint_dir
        self.spec, self.framework = inner.spec, inner.framework
        self.last_backward = -1

    def _reach(self, kind: str, k: int) -> None:
        for fault in self.faults:
            if fault.kind == kind and fault.k == k:
                self._fire(fault)

    def _fire(self, fault: Fault) -> None:
        path = Path(self.marker_dir) / fault.name
        if path.exists():
            return
        if fault.after_commit is not None:
            marker = Path(self.checkpoint_dir) / f"step-{fault.after_commit:010d}" / "COMMITTED"
            deadline = time.time() + 20
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.01)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # fired before: this is the re-run after recovery
        os.write(fd, f"{os.getpid()} {time.time()}\n".encode())
        os.fsync(fd)
        os.close(fd)
        if fault.action.startswith("corrupt-"):
            corrupt_newest(self.checkpoint_dir, fault.action[len("corrupt-"):])
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            with open(path, "a") as f:  # after SIGCONT: when this old-generation stage woke up
                f.write(f"woke {time.time()}\n")
            return  # and carries on as if nothing happened
        time.sleep(60)  # a kill is asynchronous: never run on past it

    # -- the Stage protocol, delegated ------------------------------------
    def forward(self, k: int, inputs: Any, *, version: int, targets: Any = None) -> Any:
        self._reach("F", k)
        return self.inner.forward(k, inputs, version=version, targets=targets)

    def backward(self, k: int, grad_outputs: Any = None) -> Any:
        self._reach("B", k)
        self.last_backward = k
        return self.inner.backward(k, grad_outputs)

    def update(self, *, new_version: int) -> None:
        self.inner.update(new_version=new_version)

    def __getattr__(self, name: str) -> Any:
        # Streamed replica buckets, where the inner stage streams: its order and switch, as they are,
        # and its streamed backward with the "S" faults inside.
        if name in ("gradient_order", "streams_gradients"):
            return getattr(self.inner, name)
        if name == "backward_streaming" and hasattr(self.inner, name):
            return self._backward_streaming
        raise AttributeError(name)

    def _backward_streaming(self, k: int, grad_outputs: Any, on_final: Any) -> Any:
        self._reach("B", k)
        self.last_backward = k
        reported = []

        def final(name: str) -> None:
            on_final(name)
            reported.append(name)
            for fault in self.faults:
                if fault.kind == "S" and fault.k == k and fault.finals == len(reported):
                    time.sleep(0.2)  # the channel thread writes the bucket just handed to it
                    self._fire(fault)

        return self.inner.backward_streaming(k, grad_outputs, final)

    def release(self, version: int) -> None:
        self.inner.release(version)

    def versions(self) -> tuple[int, ...]:
        return self.inner.versions()

    def evaluate(self, inputs: Any, *, targets: Any = None) -> Any:
        return self.inner.evaluate(inputs, targets=targets)

    def state_dict(self) -> dict:
        self._reach("C", self.last_backward + 1)
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._reach("L", 0)
        self.inner.load_state_dict(state)

    # replicated pipelines: the replicas' sum reads and writes the inner stage's accumulator
    def accumulated_gradients(self) -> tuple[dict, int]:
        from pipetrain.stages import replica_grads

        return replica_grads.read(self.inner)

    def set_accumulated_gradients(self, grads: dict, count: int) -> None:
        from pipetrain.stages import replica_grads

        replica_grads.write(self.inner, grads, count)


def corrupt_newest(checkpoint_dir: str, how: str) -> Path:
    """Damage the newest committed checkpoint in ``checkpoint_dir``; returns its directory."""
    steps = sorted(p for p in Path(checkpoint_dir).glob("step-*") if (p / "COMMITTED").exists())
    step = steps[-1]
    shard = step / "stage-0.safetensors"
    if how == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) - 3] ^= 0x10
        shard.write_bytes(bytes(data))
    elif how == "manifest":  # still valid JSON, but not the manifest the marker vouches for
        manifest = step / "manifest.json"
        body = json.loads(manifest.read_text())
        body["created_at"] += 1.0
        manifest.write_text(json.dumps(body, sort_keys=True, indent=1))
    elif how == "marker":
        (step / "COMMITTED").unlink()
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return step
