"""The flat checkpoint layout the torch and Keras stages share.

``v{version}/{param}`` for every retained weight version, ``opt/{name}`` for
the optimizer state, ``acc/{param}`` for the gradient accumulator,
``corr/{slot}/{param}`` and ``corr/step/v{version}/{param}`` for a delay
correction's state (``pipetrain.stages.corrections``), and ``meta/versions``, ``meta/latest``,
``meta/accumulated``. Packing takes a
framework's tensor -> numpy copy; unpacking takes a ``convert(key, array,
like)`` that builds the framework's tensor and checks it against ``like``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

META = ("meta/versions", "meta/latest", "meta/accumulated")


@dataclass
class Unpacked:
    versions: dict[int, dict[str, Any]]
    opt_state: dict[str, Any]
    acc: dict[str, Any]
    latest: int
    accumulated: int
    correction: dict[str, Any]  # "{slot}/{param}" -> tensor
    steps: dict[int, dict[str, Any]]  # version -> {param: the update that made it} ("predict")


def pack(versions: Mapping[int, Mapping[str, Any]], opt_state: Mapping[str, Any], acc: Mapping[str, Any], *,
         latest: int, accumulated: int, to_numpy: Callable[[Any], np.ndarray],
         correction: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for v, params in versions.items():
        state.update({f"v{v}/{n}": to_numpy(t) for n, t in params.items()})
    state.update({f"opt/{n}": to_numpy(t) for n, t in opt_state.items()})
    state.update({f"acc/{n}": to_numpy(t) for n, t in acc.items()})
    state.update({f"corr/{n}": to_numpy(t) for n, t in (correction or {}).items()})
    state["meta/versions"] = np.array(sorted(versions), np.int64)
    state["meta/latest"] = np.array(latest, np.int64)
    state["meta/accumulated"] = np.array(accumulated, np.int64)
    return state


def unpack(state: Mapping[str, np.ndarray], *, stage: int, names: list[str], template: Mapping[str, Any],
           opt_template: Mapping[str, Any], convert: Callable[[str, np.ndarray, Any], Any],
           correction_template: Mapping[str, Any] | None = None, steps: bool = False) -> Unpacked:
    """Check ``state`` holds exactly this stage's keys, then convert it.
    Errors name the stage and the key at fault."""
    def get(key: str, like: Any) -> Any:
        if key not in state:
            raise KeyError(f"stage {stage}: state has no {key!r}")
        return convert(key, np.array(state[key]), like)  # an owned copy: frameworks may share it

    missing = [key for key in META if key not in state]
    if missing:
        raise KeyError(f"stage {stage}: state has no {missing[0]!r}")
    versions = [int(v) for v in np.asarray(state["meta/versions"]).reshape(-1)]
    correction_template = correction_template or {}
    known = {f"acc/{n}" for n in names} | {f"opt/{n}" for n in opt_template} | set(META)
    known |= {f"corr/{n}" for n in correction_template}
    known |= {f"corr/step/v{v}/{n}" for v in versions for n in names} if steps else set()
    known |= {f"v{v}/{n}" for v in versions for n in names}
    unexpected = sorted(set(state) - known)
    if unexpected:
        raise KeyError(f"stage {stage}: unexpected state keys {unexpected[:5]}")
    return Unpacked(versions={v: {n: get(f"v{v}/{n}", template[n]) for n in names} for v in versions},
                    opt_state={n: get(f"opt/{n}", t) for n, t in opt_template.items()},
                    acc={n: get(f"acc/{n}", template[n]) for n in names},
                    latest=int(state["meta/latest"]), accumulated=int(state["meta/accumulated"]),
                    correction={n: get(f"corr/{n}", t) for n, t in correction_template.items()},
                    steps={v: {n: get(f"corr/step/v{v}/{n}", template[n]) for n in names} for v in versions}
                    if steps else {})
