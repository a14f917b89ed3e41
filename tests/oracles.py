"""Independent oracles for the numerics tests, written from the definitions.

Nothing here uses pipetrain's executors or stages: the unpartitioned model
is the layers applied in sequence, and the asynchronous update rules are the
published ones, as straightforward loops.

- PipeDream (Narayanan et al., SOSP'19), weight stashing, n stages:
  w(t+1) = w(t) - lr * grad f(w_1(t-n+1), w_2(t-n+2), ..., w_n(t)),
  i.e. micro-batch t sees stage i's weights from n-i updates ago; with
  accumulation, an update every ``a`` micro-batches averages their gradients.
- PipeDream-2BW (Narayanan et al., ICML'21): with mini-batches of m >= n
  micro-batches, W(t+1) = W(t) - lr * grad f(W(t-1)) (delay 1, every stage).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import apply_sequence, init_sequence


def initial_params(layers, example_input, *, seed: int = 0) -> list:
    """Layer i's params from key fold_in(key(seed), i), as documented by JaxSequential."""
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(len(layers))]
    spec = jax.ShapeDtypeStruct(np.shape(example_input), np.asarray(example_input).dtype)
    return init_sequence(layers, spec, keys=keys)


def full_gradient(layers, loss, params, batches) -> list:
    """Mean over micro-batches of the unpartitioned model's gradient."""
    def one(ps, x, y):
        return loss(apply_sequence(layers, ps, x), y)

    grads = [jax.grad(one)(params, jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
    return jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)


def _split(params: list, ranges) -> list[list]:
    return [params[a:b] for a, b in ranges]


def async_rule_weights(layers, loss, params0, ranges, source, *, schedule: str, microbatches: int, steps: int,
                       accumulate: int = 1, lr: float) -> list[list[list]]:
    """W[s][v]: stage s's weights at version v under the published rule, with SGD."""
    p = len(ranges)
    versions = [[stage] for stage in _split(params0, ranges)]
    group = accumulate if schedule == "pipedream" else microbatches

    def used_version(s: int, k: int) -> int:
        if schedule == "pipedream":
            return max(0, k - (p - s) + 1) // accumulate
        if schedule == "2bw":
            return max(0, k // microbatches - 1)
        raise ValueError(schedule)

    def loss_of(stage_params, x, y):
        flat = [lp for stage in stage_params for lp in stage]
        return loss(apply_sequence(layers, flat, x), y)

    acc = None
    for k in range(steps * microbatches):
        used = [versions[s][used_version(s, k)] for s in range(p)]
        g = jax.grad(loss_of)(used, jnp.asarray(source.inputs(k)), jnp.asarray(source.targets(k)))
        acc = g if acc is None else jax.tree_util.tree_map(jnp.add, acc, g)
        if (k + 1) % group == 0:
            for s in range(p):
                versions[s].append(jax.tree_util.tree_map(lambda w, d: w - lr * d / group,
                                                          versions[s][-1], acc[s]))
            acc = None
    return versions
