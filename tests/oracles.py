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


# --- delay corrections (pipetrain.stages.corrections), from the papers' definitions ----------------
#
# Both async schedules run the no-flush 1F1B order, so with w = p - s micro-batches
# in flight on stage s and an update every g micro-batches (g = accumulate for
# pipedream, m for 2bw), when F k runs stage s has made max(0, k - w + 1) // g
# updates; F k reads version v = that many (pipedream) or max(0, k // m - 1)
# (2bw), and its gradient is applied by the update that starts from version k // g.
#
# - predict (SpecTrain / PipeOptim): F k and B k use W[v] + (k // g - v) * (W[v] - W[v-1]).
# - dcasgd (DC-ASGD-c): g + lam * g * g * (W[k // g] - W[read]).
# - dcasgd-a (DC-ASGD-a): ms = m * ms + (1 - m) * g * g first, then lam / (sqrt(ms) + eps) for lam.


class NumpyOptimizer:
    """sgd, momentum and adam on float32 numpy dicts, from their textbook definitions."""

    def __init__(self, name: str, lr: float, *, momentum: float = 0.9, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8):
        self.name, self.lr, self.momentum, self.b1, self.b2, self.eps = name, lr, momentum, b1, b2, eps
        self.t, self.slots = 0, {}

    def step(self, w: dict, g: dict) -> dict:
        self.t += 1
        out = {}
        for n in w:
            if self.name == "sgd":
                d = g[n]
            elif self.name == "momentum":
                d = self.slots[n] = g[n] + np.float32(self.momentum) * self.slots.get(n, np.zeros_like(g[n]))
            else:
                m = self.slots[n, "m"] = self.b1 * self.slots.get((n, "m"), 0) + (1 - self.b1) * g[n]
                v = self.slots[n, "v"] = self.b2 * self.slots.get((n, "v"), 0) + (1 - self.b2) * g[n] ** 2
                d = (m / (1 - self.b1 ** self.t)) / (np.sqrt(v / (1 - self.b2 ** self.t)) + self.eps)
            out[n] = (w[n] - self.lr * d).astype(np.float32)
        return out


def corrected_async_weights(grad_fn, params0: list[dict], *, schedule: str, microbatches: int, steps: int,
                            optimizers: list, correction: str, accumulate: int = 1, lam: float = 0.0,
                            mean_square: float = 0.95, eps: float = 1e-8) -> list[list[dict]]:
    """W[s][v] (flat name -> float32 array) of every stage under ``schedule`` with
    ``correction``; ``grad_fn(k, weights per stage) -> gradients per stage``,
    ``optimizers`` one NumpyOptimizer per stage."""
    p, m = len(params0), microbatches
    g = accumulate if schedule == "pipedream" else m
    W = [[{n: np.asarray(a, np.float32) for n, a in stage.items()}] for stage in params0]
    ms = [{n: np.zeros_like(a) for n, a in stage[0].items()} for stage in W]
    acc: list[dict] = [{} for _ in range(p)]
    for k in range(steps * m):
        target = k // g
        if schedule == "pipedream":
            read = [max(0, k - (p - s) + 1) // g for s in range(p)]
        else:
            read = [max(0, k // m - 1)] * p
        if correction == "predict":
            used = [{n: w + np.float32(target - v) * (w - (W[s][v - 1][n] if v else w)) for n, w in W[s][v].items()}
                    for s, v in enumerate(read)]
        else:
            used = [W[s][read[s]] for s in range(p)]
        grads = [{n: np.asarray(a, np.float32) for n, a in stage.items()} for stage in grad_fn(k, used)]
        for s in range(p):
            for n, gr in grads[s].items():
                if correction.startswith("dcasgd"):
                    scale = np.float32(lam)
                    if correction == "dcasgd-a":
                        ms[s][n] = np.float32(mean_square) * ms[s][n] + np.float32(1 - mean_square) * gr * gr
                        scale = scale / (np.sqrt(ms[s][n]) + np.float32(eps))
                    gr = gr + scale * gr * gr * (W[s][target][n] - used[s][n])
                acc[s][n] = acc[s].get(n, 0) + gr
        if (k + 1) % g == 0:
            for s in range(p):
                W[s].append(optimizers[s].step(W[s][-1], {n: a / np.float32(g) for n, a in acc[s].items()}))
            acc = [{} for _ in range(p)]
    return W


# --- LR schedules and global-norm clipping (pipetrain.optim), from their definitions ----------------

def scheduled_lr(count: int, *, schedule: str, lr: float, warmup: int = 0, decay_steps: int | None = None,
                 min_lr: float = 0.0) -> float:
    """The LR of update number ``count`` (0: the first): a linear ramp from 0 over
    ``warmup`` updates, then ``lr`` (constant), or from ``lr`` down to ``min_lr`` at
    update ``decay_steps`` along half a cosine period (cosine) or a line (linear)."""
    if count < warmup:
        return lr * count / warmup
    if schedule == "constant":
        return lr
    done = min(1.0, (count - warmup) / (decay_steps - warmup))
    if schedule == "linear":
        return lr + (min_lr - lr) * done
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + np.cos(np.pi * done))


class ScheduledNumpyOptimizer(NumpyOptimizer):
    """NumpyOptimizer whose update number t (0: the first) uses the LR ``lr_of(t)``."""

    def __init__(self, name: str, lr_of, **kw):
        super().__init__(name, lr_of(0), **kw)
        self.lr_of = lr_of

    def step(self, w: dict, g: dict) -> dict:
        self.lr = self.lr_of(self.t)
        return super().step(w, g)


def global_norm(grads: list[dict]) -> float:
    """sqrt of the sum of every squared gradient entry of every stage, in float64."""
    return float(np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for stage in grads for a in stage.values())))


def sync_weights(grad_fn, params0: list[dict], *, microbatches: int, steps: int, optimizers: list,
                 clip_norm: float | None = None) -> list[dict]:
    """Every stage's weights after ``steps`` flush steps (gpipe / 1f1b): each step
    averages ``grad_fn(k, weights per stage)`` over its micro-batches at the step's
    weights; with ``clip_norm``, the mean gradients of all stages together are scaled
    by min(1, clip_norm / their global norm) (optax.clip_by_global_norm); then each
    stage's optimizer steps."""
    W = [{n: np.asarray(a, np.float32) for n, a in stage.items()} for stage in params0]
    for t in range(steps):
        ks = range(t * microbatches, (t + 1) * microbatches)
        per_k = [[{n: np.asarray(a, np.float32) for n, a in stage.items()} for stage in grad_fn(k, W)] for k in ks]
        mean = [{n: sum(g[s][n] for g in per_k) / np.float32(microbatches) for n in W[s]} for s in range(len(W))]
        if clip_norm:
            scale = np.float32(min(1.0, clip_norm / global_norm(mean)))
            mean = [{n: a * scale for n, a in stage.items()} for stage in mean]
        W = [optimizers[s].step(W[s], mean[s]) for s in range(len(W))]
    return W


def clipped_async_weights(grad_fn, params0: list[dict], *, schedule: str, microbatches: int, steps: int,
                          optimizers: list, clip_norm: float, accumulate: int = 1) -> list[dict]:
    """Every stage's last weights under pipedream or 2bw (the read versions of
    ``corrected_async_weights``, no correction) with clipping: 2bw scales each update's
    mean gradients of all stages by min(1, clip_norm / their global norm); pipedream
    scales each stage's by min(1, clip_norm / the norm of that stage's own)."""
    p, m = len(params0), microbatches
    g = accumulate if schedule == "pipedream" else m
    W = [[{n: np.asarray(a, np.float32) for n, a in stage.items()}] for stage in params0]
    acc: list[dict] = [{} for _ in range(p)]
    for k in range(steps * m):
        read = ([max(0, k - (p - s) + 1) // g for s in range(p)] if schedule == "pipedream"
                else [max(0, k // m - 1)] * p)
        grads = grad_fn(k, [W[s][read[s]] for s in range(p)])
        for s in range(p):
            for n, gr in grads[s].items():
                acc[s][n] = acc[s].get(n, 0) + np.asarray(gr, np.float32)
        if (k + 1) % g == 0:
            mean = [{n: a / np.float32(g) for n, a in stage.items()} for stage in acc]
            if schedule == "pipedream":
                scales = [min(1.0, clip_norm / global_norm([stage])) for stage in mean]
            else:
                scales = [min(1.0, clip_norm / global_norm(mean))] * p
            for s in range(p):
                W[s].append(optimizers[s].step(W[s][-1], {n: a * np.float32(scales[s]) for n, a in mean[s].items()}))
            acc = [{} for _ in range(p)]
    return [versions[-1] for versions in W]
