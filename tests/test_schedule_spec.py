"""The schedule spec: the one description of a schedule a job carries, and the one way to build it."""
import ast
from pathlib import Path

import pytest

from pipetrain.schedule.builders import ScheduleSpec, build_schedule, microbatches_per_update
from pipetrain.schedule.schedule import ScheduleError

SCHEDULE_PACKAGE = Path(__file__).resolve().parents[1] / "pipetrain" / "schedule"


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "pipedream", "2bw"])
def test_a_spec_builds_the_schedule_and_resumes_at_a_cut(name):
    accumulate = 2 if name == "pipedream" else 1
    spec = ScheduleSpec(name, num_stages=3, microbatches=4, steps=3, accumulate=accumulate, checkpoint_every=4)
    assert spec.build() == build_schedule(name, num_stages=3, microbatches=4, steps=3, accumulate=accumulate,
                                          checkpoint_every=4)
    resumed = spec.resumed_at(4)
    assert resumed.first_microbatch == 4 and resumed.build().first_microbatch == 4
    assert ScheduleSpec(**spec.to_dict()) == spec  # what travels in the manifest rebuilds the same spec


def test_micro_batches_per_update_is_said_in_one_place():
    assert microbatches_per_update("pipedream", 8, 2) == 2
    assert microbatches_per_update("1f1b", 8) == 8 == microbatches_per_update("2bw", 8)
    assert ScheduleSpec("pipedream", num_stages=2, microbatches=8, steps=1, accumulate=4).microbatches_per_update == 4


def test_a_bad_spec_is_refused_when_it_is_made_naming_the_field():
    with pytest.raises(ScheduleError, match="checkpoint_every: must be a positive multiple of microbatches=4"):
        ScheduleSpec("1f1b", num_stages=2, microbatches=4, steps=2, checkpoint_every=6)
    with pytest.raises(ScheduleError, match="first_microbatch"):
        ScheduleSpec("1f1b", num_stages=2, microbatches=4, steps=2).resumed_at(3)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipetrain.schedule."):
            names.add(node.module.rsplit(".", 1)[1])
    return names


def test_the_schedule_package_has_no_import_cycle():
    graph = {p.stem: _imports(p) for p in SCHEDULE_PACKAGE.glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, node: str, seen: frozenset) -> bool:
        return any(n == start or (n not in seen and reaches(start, n, seen | {n})) for n in graph.get(node, ()))

    cyclic = sorted(m for m in graph if reaches(m, m, frozenset({m})))
    assert not cyclic, f"modules on an import cycle: {cyclic} ({graph})"


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "pipedream", "2bw"])
def test_cut_points_sit_where_a_scheduled_checkpoint_would(name):
    """A time-based cut K is taken where CHECKPOINT K would stand: the schedule
    built with checkpoints every step says where that is."""
    from pipetrain.schedule.actions import Kind

    plain = ScheduleSpec(name, num_stages=3, microbatches=4, steps=3).build()
    with_cuts = ScheduleSpec(name, num_stages=3, microbatches=4, steps=3, checkpoint_every=4).build()
    for s in range(3):
        points = plain.cut_points(s)
        for i, a in enumerate(with_cuts.actions[s]):
            if a.kind is Kind.CHECKPOINT and a.k < 12:
                # the actions before CHECKPOINT K, in the schedule without it
                assert points[a.k] == i - 1 - sum(b.kind is Kind.CHECKPOINT for b in with_cuts.actions[s][:i]), \
                    f"stage {s}, cut {a.k}"
