"""Helpers the adapter tests share: a seeded micro-batch, a model cut into
stages, and one micro-batch driven forward and backward through them with
numpy at the boundaries (as on the wire)."""
import numpy as np

from pipetrain.optim import Optimizer
from pipetrain.stages.base import StageSpec, stage_ranges
from pipetrain.stages.tensors import to_numpy

SGD = Optimizer("sgd", lr=0.1)


def batch(k, n=8):
    rng = np.random.default_rng(k)
    return rng.standard_normal((n, 16)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


class Batches:
    """The seeded micro-batches of ``batch`` as a data source (inputs and targets by id)."""

    microbatch_size = 8

    def inputs(self, k):
        return batch(k)[0]

    def targets(self, k):
        return batch(k)[1]


def stages(model, boundaries, opt=SGD):
    ranges = stage_ranges(boundaries, len(model))
    return [model.build_stage(StageSpec(i, len(ranges), a, b), optimizer=opt) for i, (a, b) in enumerate(ranges)]


def pipeline_step(stages_, k, x, y, *, version=0):
    """F then B of micro-batch k through all stages, activations as numpy (the wire)."""
    h = x
    for s in stages_[:-1]:
        h = to_numpy(s.forward(k, h, version=version))
    loss = stages_[-1].forward(k, h, version=version, targets=y)
    g = None
    for s in reversed(stages_):
        g = s.backward(k, g)
        g = None if g is None else to_numpy(g)
    return loss


def assert_state_round_trip(a, b, saved):
    """Load ``saved`` (``a``'s state dicts) into the fresh stages ``b``: their state
    dicts come back byte for byte, and one more micro-batch and update on both
    runs gives the same state."""
    for s, state in zip(b, saved):
        s.load_state_dict(state)
    for s, state in zip(b, saved):
        again = s.state_dict()
        assert again.keys() == state.keys()
        assert all(again[n].tobytes() == state[n].tobytes() and again[n].dtype == state[n].dtype for n in state)
    for run in (a, b):
        pipeline_step(run, 10, *batch(10), version=2)
        for s in run:
            s.update(new_version=5)
    for sa, sb in zip(a, b):
        assert all(np.array_equal(v, sb.state_dict()[n]) for n, v in sa.state_dict().items())


def optimizer_and_optax_twin(name):
    """A pipetrain Optimizer and the optax transformation it must match step for step."""
    import jax
    import optax

    opt = Optimizer(name, lr=1e-2, weight_decay=0.05 if name == "adamw" else 0.0)
    tx = {"sgd": optax.sgd(opt.lr), "momentum": optax.sgd(opt.lr, momentum=opt.momentum),
          "adam": optax.adam(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps),
          # decay_mask "auto": biases and other rank <= 1 parameters are not decayed
          "adamw": optax.adamw(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                               mask=lambda ps: jax.tree_util.tree_map(lambda q: q.ndim >= 2, ps))}[name]
    return opt, tx


def assert_runs_equal(a, b) -> None:
    """Two FitResults trained the same, bit for bit: every loss, and every stage's state."""
    assert a.losses == b.losses
    for s, (x, y) in enumerate(zip(a.states, b.states, strict=True)):
        assert x.keys() == y.keys(), f"stage {s}"
        for name in x:
            assert np.array_equal(x[name], y[name]), f"stage {s}: {name} differs"
