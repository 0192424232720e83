r"""Gradient and objective estimates over a Dask cluster, reduced exactly (DESIGN.md §1.1–1.2, issue 14).

:func:`distributed_estimate` and :func:`distributed_objective` split the ``n`` episodes of an estimate into chunks
of ``chunk_size`` consecutive episodes, keyed exactly as a single-process run keys them
(:func:`pydso.engine.episode_keys`: one key per episode, split before chunking), and map the chunks to the workers
of a ``dask.distributed`` cluster. Each worker runs the compiled chunk (compiled once per worker and shape) and
returns only **sufficient statistics**, never episodes:

* per-episode samples :math:`a_i` (gradients, objectives) are reduced through mergeable moments
  :math:`(n_c, \bar a_c, M_{2,c} = \sum_{i\in c}(a_i-\bar a_c)^2)`, combined with Chan, Golub & LeVeque's pairwise
  update :math:`M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b/(n_a+n_b)`; the mean and the standard error
  :math:`\sqrt{M_2/(n-1)}/\sqrt n` are the single-process ones (two-pass ``ddof=1`` formula) to rounding;
* a batch-wide baseline of :class:`~pydso.Score` is rebuilt from global sums in a first pass:
  :class:`~pydso.MeanBaseline` from :math:`\sum_j C^{(j)}_{t+1}` and :math:`\sum_j W^{(j)}_{t+1}` (each episode's
  leave-one-out mean is then :math:`(\sum_j C_j - C_i)/(\sum_j W_j - W_i)`), the fitted
  :class:`~pydso.StateValueBaseline` from the normal equations :math:`\sum x x^\top`, :math:`\sum x y` of each
  cross-fitting fold (the fold is the *global* episode index mod 2). The rolled-out chunk stays on its worker
  between the passes (a Dask future), so nothing is simulated twice;
* :class:`~pydso.Pathwise` returns its batch-means group means (chunks hold whole groups), combined with the
  single-process formula.

So the distributed estimate equals ``estimator.estimate(problem, theta, key=key, n=n)`` for the same key
(measured difference ~1e-15 relative; bit-identical is not promised, sums are taken in another order).

When *not* to use it: for estimates that take well under a second on one machine (scheduling, serialisation and
each worker's compilation cost seconds), and inside a compiled loop (it is a host-side orchestration). On one
machine with several cores, ``PYDSO_CPU_DEVICES`` (sharding over JAX devices in one process) is cheaper. See
``docs/distributed.md`` for pointing it at a real cluster.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_key, check_positive_int
from .._errors import DivergenceError, ProblemError
from .._typing import PyTree
from ..backends import get_backend
from ..engine import episode_keys, rollout_chunk
from ..systems import Problem
from ._base import AbstractEstimator, Estimate, check_finite_estimate, warn_single_episode
from ._baselines import AbstractBaseline, MeanBaseline, NoBaseline, StateValueBaseline
from ._logged import LoggedBatch, as_batch
from ._pathwise import Pathwise, combine_group_means
from ._score import Score, per_episode_score_gradients
from ._weights import WeightedReturns, weighted_returns

__all__ = ["distributed_estimate", "distributed_objective"]

DEFAULT_N_WORKERS = 2


# ----------------------------------------------------------------------------------------------------------------
# mergeable moments


def _moments(samples: PyTree) -> tuple[PyTree, PyTree]:
    """``(mean, M2)`` over the leading (episode) axis of every leaf (two-pass, as ``jnp.std``)."""
    mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), samples)
    m2 = jax.tree.map(lambda a, m: jnp.sum((a - m) ** 2, axis=0), samples, mean)
    return mean, m2


def _merge(acc, part):
    """Chan et al.'s pairwise update of ``(count, mean, M2)`` (pytrees of numpy arrays)."""
    if acc is None:
        return part
    na, ma, sa = acc
    nb, mb, sb = part
    n = na + nb

    def mean(a, b):
        return a + (b - a) * (nb / n)

    def m2(a_m, b_m, a_s, b_s):
        d = b_m - a_m
        return a_s + b_s + d**2 * (na * nb / n)

    return n, jax.tree.map(mean, ma, mb), jax.tree.map(m2, ma, mb, sa, sb)


def _mean_stderr(acc):
    n, mean, m2 = acc
    if n < 2:
        return mean, jax.tree.map(lambda m: np.full_like(m, np.nan), mean)
    return mean, jax.tree.map(lambda s: np.sqrt(s / (n - 1)) / np.sqrt(n), m2)


def _as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


# ----------------------------------------------------------------------------------------------------------------
# worker side: everything below runs inside Dask tasks (module-level, so workers import it from pydso)


@functools.lru_cache(maxsize=8)
def _load(blob: bytes):
    """Unpickle the (estimator, problem) sent with a task once per worker: every task of a run (and every later
    run with the same objects) gets the same Python objects, so ``filter_jit`` compiles once per worker."""
    import cloudpickle

    return cloudpickle.loads(blob)


def _wrap_keys(keydata: np.ndarray, impl: str) -> jax.Array:
    return jax.random.wrap_key_data(jnp.asarray(keydata), impl=impl)


class _GlobalMeanBaseline(AbstractBaseline):
    """:class:`MeanBaseline` of a chunk with the sums over *all* episodes of the estimate (leave-one-out)."""

    total_c: jax.Array
    total_w: jax.Array

    def __call__(self, problem, theta, batch, returns):
        C, W = returns.cost_to_go[:, 1:], returns.weights[:, 1:]
        num = self.total_c - C
        den = self.total_w - W
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _value_features(baseline: StateValueBaseline, batch: LoggedBatch, returns: WeightedReturns):
    """The regressors ``phi`` and ``x = W phi``, targets ``y`` and mask of :class:`StateValueBaseline`'s fit."""
    w = batch.step_weights
    states = batch.states[:, :-1]
    horizon = returns.costs.shape[1]
    t_frac = jnp.arange(horizon) / horizon
    phi = jax.vmap(jax.vmap(baseline.features, in_axes=(0, 0)), in_axes=(0, None))(states, t_frac)
    W = returns.weights[:, 1:]
    valid = (w > 0) & batch.valid
    y = jnp.where(valid, returns.cost_to_go[:, 1:] / jnp.where(w > 0, w, 1.0), 0.0)
    return phi, phi * W[..., None], y, valid


class _CrossFitBaseline(AbstractBaseline):
    """The fitted :class:`StateValueBaseline` of a chunk with coefficients fitted on the folds of all episodes."""

    coef_from_0: jax.Array
    coef_from_1: jax.Array
    offset: jax.Array  # global index of the chunk's first episode (the fold is the global index mod 2)
    inner: StateValueBaseline

    def __call__(self, problem, theta, batch, returns):
        phi, _, _, _ = _value_features(self.inner, batch, returns)
        n = phi.shape[0]
        fold = (self.offset + jnp.arange(n)) % 2
        coef = jnp.where((fold == 0)[:, None], self.coef_from_1, self.coef_from_0)
        return batch.step_weights * jnp.einsum("ntf,nf->nt", phi, coef)


def _needs_stats(baseline: AbstractBaseline) -> bool:
    return isinstance(baseline, MeanBaseline) or (
        isinstance(baseline, StateValueBaseline) and baseline.value_fn is None
    )


@eqx.filter_jit
def _score_batch(estimator: Score, problem, theta, keys, offset):
    """The chunk's episodes as a batch, their returns, and the sums its baseline needs (``None`` if none)."""
    traj = jax.lax.stop_gradient(rollout_chunk(problem, theta, keys, estimator.backend))
    batch = as_batch(traj, problem)
    returns = weighted_returns(problem, theta, batch, jnp.zeros_like(batch.behavior_logp))  # W = 1 exactly
    stats = _score_stats(estimator.baseline, batch, returns, offset) if _needs_stats(estimator.baseline) else None
    return batch, returns, stats


def _score_stats(baseline, batch, returns, offset):
    if isinstance(baseline, MeanBaseline):
        return jnp.sum(returns.cost_to_go[:, 1:], 0), jnp.sum(returns.weights[:, 1:], 0)
    _, x, y, valid = _value_features(baseline, batch, returns)
    fold = (offset + jnp.arange(x.shape[0])) % 2
    out = []
    for f in (0, 1):
        m = (valid & (fold == f)[:, None]).astype(x.dtype)[..., None]
        out.append((jnp.einsum("ntf,ntg->fg", x * m, x), jnp.einsum("ntf,nt->f", x * m, y)))
    return tuple(out)


@eqx.filter_jit
def _score_moments(problem, theta, batch, returns, baseline):
    grads, obj = per_episode_score_gradients(problem, theta, batch, returns, baseline)
    return _moments(grads), _moments(obj)


@eqx.filter_jit
def _score_fused(estimator: Score, problem, theta, keys):
    """One pass for baselines without batch-wide sums: rollout and per-episode gradients in one compiled call."""
    batch, returns, _ = _score_batch(estimator, problem, theta, keys, jnp.asarray(0))
    return _score_moments(problem, theta, batch, returns, estimator.baseline)


def _task_score_fused(blob, theta, keydata, impl):
    estimator, problem = _load(blob)
    (gm, gs), (om, os_) = _score_fused(estimator, problem, _as_jax(theta), _wrap_keys(keydata, impl))
    n = keydata.shape[0]
    return jax.device_get(((n, gm, gs), (n, om, os_)))


def _task_score_batch(blob, theta, keydata, impl, offset):
    estimator, problem = _load(blob)
    return _score_batch(estimator, problem, _as_jax(theta), _wrap_keys(keydata, impl), jnp.asarray(offset))


def _task_score_stats(triple):
    return jax.device_get(triple[2])


def _task_score_moments(blob, theta, triple, stats, offset):
    estimator, problem = _load(blob)
    batch, returns, _ = triple
    base = estimator.baseline
    if isinstance(base, MeanBaseline):
        base = _GlobalMeanBaseline(*_as_jax(stats))
    elif _needs_stats(base):
        base = _CrossFitBaseline(*_as_jax(stats), jnp.asarray(offset), base)
    (gm, gs), (om, os_) = _score_moments(problem, _as_jax(theta), batch, returns, base)
    n = batch.states.shape[0]
    return jax.device_get(((n, gm, gs), (n, om, os_)))


@eqx.filter_jit
def _pathwise_groups(estimator: Pathwise, problem, theta, keys, mask):
    """Group-mean gradients ``(k, ...)`` of ``k`` groups of ``m`` episodes, and ``(mean, M2)`` of the real
    episodes' objectives (the group means exactly as :class:`~pydso.Pathwise` forms them)."""
    backend = get_backend(estimator.backend)
    w = jnp.asarray(problem.setting.weights()[0])

    def group_mean(theta, keys_g, mask_g):
        b = backend.simulate(problem, theta, keys_g, checkpoints=estimator.checkpoints)
        values = b.costs @ w.astype(b.costs.dtype) + b.terminal_weights * b.terminal_costs
        return jnp.sum(jnp.where(mask_g, values, 0.0)) / jnp.sum(mask_g, dtype=values.dtype), values

    (_, values), grads = jax.vmap(jax.value_and_grad(group_mean, has_aux=True), in_axes=(None, 0, 0))(theta, keys, mask)
    v, msk = values.reshape(-1), mask.reshape(-1)
    count = jnp.sum(msk, dtype=v.dtype)
    mean = jnp.sum(jnp.where(msk, v, 0.0)) / count
    m2 = jnp.sum(jnp.where(msk, (v - mean) ** 2, 0.0))
    return grads, mean, m2


def _task_pathwise(blob, theta, keydata, impl, mask):
    estimator, problem = _load(blob)
    keys = _wrap_keys(keydata, impl)
    grads, mean, m2 = _pathwise_groups(estimator, problem, _as_jax(theta), keys, jnp.asarray(mask))
    return jax.device_get((grads, mean, m2))


@eqx.filter_jit
def _objective_chunk(problem, theta, keys, backend):
    traj = rollout_chunk(problem, theta, keys, backend)
    values = traj.objective
    finite = jnp.all(jnp.isfinite(traj.states).reshape(traj.states.shape[0], -1), axis=1) & jnp.isfinite(values)
    mean, m2 = _moments(values)
    return mean, m2, finite


def _task_objective(blob, theta, keydata, impl, backend):
    _, problem = _load(blob)
    mean, m2, finite = _objective_chunk(problem, _as_jax(theta), _wrap_keys(keydata, impl), backend)
    return jax.device_get((mean, m2, finite))


# ----------------------------------------------------------------------------------------------------------------
# client side


class _Cluster:
    """The given client, or an embedded ``LocalCluster`` of worker processes started here and closed on exit."""

    def __init__(self, client, n_workers: int):
        try:
            from dask.distributed import Client
        except ImportError as e:  # pragma: no cover - dask is a dependency
            raise ProblemError(
                "client: distributed estimates need dask.distributed; pip install 'dask[distributed]'"
            ) from e
        if client is not None and not isinstance(client, Client):
            raise ProblemError(
                f"client must be a dask.distributed.Client (e.g. Client('tcp://scheduler:8786')) or None for an "
                f"embedded LocalCluster, got {type(client).__name__} {client!r}"
            )
        self.client, self.n_workers, self.own = client, check_positive_int(n_workers, "n_workers"), None

    def __enter__(self):
        if self.client is None:
            from dask.distributed import Client, LocalCluster

            cluster = LocalCluster(
                n_workers=self.n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            self.client = self.own = Client(cluster)
        return self.client

    def __exit__(self, *exc):
        if self.own is not None:
            cluster = self.own.cluster
            self.own.close()
            cluster.close()


def _workers(client, default: int) -> int:
    try:
        return max(1, len(client.nthreads()))
    except Exception:  # noqa: BLE001 - an unusual client: fall back on the requested count
        return default


def _gather(client, futures):
    """``client.gather`` with a failing task reported as a pydso error (pydso's own errors pass through)."""
    try:
        return client.gather(futures)
    except (ProblemError, DivergenceError):
        raise
    except Exception as e:  # noqa: BLE001 - a worker-side failure: name the usual causes
        raise ProblemError(
            f"client: a task of the distributed estimate failed on the cluster ({type(e).__name__}: {e}). Check "
            "that every worker has pydso and the same jax/equinox/cloudpickle versions installed, that the "
            "problem's callables are importable there (or pickled by value), and that a chunk fits in a worker's "
            "memory (lower chunk_size); see docs/distributed.md"
        ) from e


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _chunking(n: int, chunk_size, unit: int, units: int, workers: int, what: str) -> int:
    """Episodes per chunk: a multiple ``k * unit`` of ``unit`` episodes with ``k`` dividing ``units`` (so every
    chunk has one compiled shape); by default the largest such chunk giving at least one chunk per worker."""
    valid = [k * unit for k in _divisors(units)]
    if chunk_size is None:
        fits = [c for c in valid if units * unit // c >= workers]
        return max(fits) if fits else min(valid)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if chunk_size not in valid:
        shown = ", ".join(str(c) for c in valid[:12]) + (", ..." if len(valid) > 12 else "")
        rule = "a divisor of n" if unit == 1 else f"a multiple of the group size {unit} dividing the {units} groups"
        raise ProblemError(
            f"chunk_size={chunk_size} does not split the n={n} episodes of {what} into equal chunks: chunk_size "
            f"must be {rule}; valid values: {shown} (or chunk_size=None)"
        )
    return chunk_size


def _check_common(problem, theta, key, n):
    key = check_key(key)
    n = check_positive_int(n, "n")
    if not isinstance(problem, Problem):
        raise ProblemError(f"problem must be a pydso.Problem, got {type(problem).__name__}")
    problem.check_theta(theta)
    return key, n


def _blob(*objects) -> bytes:
    import cloudpickle

    return cloudpickle.dumps(objects)


def distributed_estimate(
    estimator: AbstractEstimator,
    problem: Problem,
    theta: PyTree,
    *,
    key: jax.Array,
    n: int,
    client=None,
    chunk_size: int | None = None,
    n_workers: int = DEFAULT_N_WORKERS,
) -> Estimate:
    r"""``estimator.estimate(problem, theta, key=key, n=n)`` computed over a Dask cluster (module docstring).

    The ``n`` episodes, keyed by :func:`pydso.engine.episode_keys` exactly as in one process, are cut into chunks
    of ``chunk_size`` consecutive episodes; each worker runs the compiled chunk and returns sufficient statistics,
    which are reduced exactly: the result equals the single-process :class:`~pydso.Estimate` for the same ``key``
    and ``n`` (to rounding, ~1e-15 relative), whatever ``chunk_size`` and the number of workers.

    **Arguments:**

    - ``estimator``: a :class:`~pydso.Score` (any of its baselines: :class:`~pydso.NoBaseline`,
      :class:`~pydso.MeanBaseline` and the fitted :class:`~pydso.StateValueBaseline` are rebuilt from global
      sums, a given ``value_fn`` is used as is) or a :class:`~pydso.Pathwise` estimator.
    - ``problem``, ``theta``: as for :meth:`~pydso.estimators.AbstractEstimator.estimate`. Both are pickled
      (cloudpickle) and sent to every worker once: the problem's callables must be importable there or
      picklable by value.
    - ``key``: a JAX PRNG key (keyword-only), split into one key per episode before chunking.
    - ``n``: number of episodes.
    - ``client``: a ``dask.distributed.Client`` (``Client("tcp://scheduler:8786")`` for a real cluster). Default
      ``None``: an embedded ``LocalCluster`` of ``n_workers`` single-threaded worker processes, started here and
      closed before returning.
    - ``chunk_size``: episodes per chunk (per task). Every chunk has the same compiled shape, so it must divide
      ``n`` (for :class:`~pydso.Pathwise`: a multiple of the batch-means group size dividing the groups).
      Default: the largest chunk that still gives every worker one.
    - ``n_workers``: worker processes of the embedded cluster (ignored with ``client``).

    **Returns:** an :class:`~pydso.Estimate`; a diverging estimate raises :class:`~pydso.DivergenceError` as
    :meth:`~pydso.estimators.AbstractEstimator.estimate` does.

    Not for small estimates (the cluster's start, serialisation and every worker's compilation cost seconds).
    """
    key, n = _check_common(problem, theta, key, n)
    if not isinstance(estimator, Score | Pathwise):
        raise ProblemError(
            f"estimator must be pydso.Score(...) or pydso.Pathwise(...) for a distributed estimate, got "
            f"{type(estimator).__name__}; other estimators run in one process (estimator.estimate)"
        )
    estimator.check(problem)
    if isinstance(estimator, Score):
        if not isinstance(estimator.baseline, NoBaseline | MeanBaseline | StateValueBaseline):
            raise ProblemError(
                f"Score(baseline={type(estimator.baseline).__name__}(...)): a distributed estimate knows how to "
                "reduce NoBaseline, MeanBaseline and StateValueBaseline only; use estimator.estimate in one process"
            )
        if isinstance(estimator.baseline, MeanBaseline) and n < 2:
            raise ProblemError("MeanBaseline needs at least 2 episodes: pass n >= 2")
    warn_single_episode(n, "distributed_estimate")
    with _Cluster(client, n_workers) as cl:
        workers = _workers(cl, n_workers)
        keys = episode_keys(key, n)
        impl = str(jax.random.key_impl(keys))
        keydata = np.asarray(jax.random.key_data(keys))
        theta_np = jax.device_get(theta)
        [blob] = cl.scatter([_blob(estimator, problem)], broadcast=True, hash=False)
        if isinstance(estimator, Score):
            est = _score(cl, blob, estimator, n, theta_np, keydata, impl, chunk_size, workers)
        else:
            est = _pathwise(cl, blob, estimator, problem, n, theta_np, keydata, impl, chunk_size, workers)
    check_finite_estimate(
        est, problem, theta, key=key, n=n, what=f"the distributed {type(estimator).__name__} estimate"
    )
    return est


def _score(cl, blob, estimator: Score, n, theta, keydata, impl, chunk_size, workers) -> Estimate:
    chunk = _chunking(n, chunk_size, 1, n, workers, "the Score estimate")
    starts = list(range(0, n, chunk))
    if not _needs_stats(estimator.baseline):  # one pass: rollout and gradients in one compiled call per chunk
        futures = [cl.submit(_task_score_fused, blob, theta, keydata[s : s + chunk], impl, pure=False) for s in starts]
    else:  # two passes; each chunk's episodes stay on its worker (a future) in between
        pairs = [cl.submit(_task_score_batch, blob, theta, keydata[s : s + chunk], impl, s, pure=False) for s in starts]
        parts = _gather(cl, [cl.submit(_task_score_stats, p, pure=False) for p in pairs])
        total = functools.reduce(lambda a, b: jax.tree.map(np.add, a, b), parts)
        if isinstance(estimator.baseline, StateValueBaseline):
            ridge = estimator.baseline.ridge
            (a0, r0), (a1, r1) = total
            eye = np.eye(a0.shape[0])
            total = jax.device_get((jnp.linalg.solve(a0 + ridge * eye, r0), jnp.linalg.solve(a1 + ridge * eye, r1)))
        futures = [cl.submit(_task_score_moments, blob, theta, p, total, s, pure=False) for p, s in zip(pairs, starts)]
    grad_acc = obj_acc = None
    for g, o in _gather(cl, futures):  # merged in chunk order: deterministic
        grad_acc, obj_acc = _merge(grad_acc, g), _merge(obj_acc, o)
    grad, grad_se = _mean_stderr(grad_acc)
    obj, obj_se = _mean_stderr(obj_acc)
    return Estimate(_as_jax(grad), _as_jax(grad_se), jnp.asarray(obj), jnp.asarray(obj_se))


def _pathwise(cl, blob, estimator: Pathwise, problem, n, theta, keydata, impl, chunk_size, workers) -> Estimate:
    backend = get_backend(estimator.backend)
    groups = backend.gradient_groups(problem, n) if estimator.groups is None else estimator.groups
    m = -(-n // min(groups, n))  # exactly as Pathwise._estimate forms its groups
    G = -(-n // m)
    m = backend.group_size(problem, m, G)
    chunk = _chunking(n, chunk_size, m, G, workers, f"the Pathwise estimate ({G} groups of {m} episodes)")
    k = chunk // m
    pad = G * m - n
    if pad:
        keydata = np.concatenate([keydata, keydata[:pad]])
    mask = (np.arange(G * m) < n).reshape(G, m)
    keydata = keydata.reshape((G, m) + keydata.shape[1:])
    futures = [
        cl.submit(_task_pathwise, blob, theta, keydata[g : g + k], impl, mask[g : g + k], pure=False)
        for g in range(0, G, k)
    ]
    gmeans, obj_acc = [], None
    for (grads, mean, m2), g in zip(_gather(cl, futures), range(0, G, k)):
        gmeans.append(grads)
        obj_acc = _merge(obj_acc, (int(mask[g : g + k].sum()), mean, m2))
    grads = jax.tree.map(lambda *xs: np.concatenate(xs), *gmeans)
    mean, stderr = combine_group_means(grads, jnp.asarray(mask.sum(axis=1) / n))
    obj, obj_se = _mean_stderr(obj_acc)
    return Estimate(mean, stderr, jnp.asarray(obj), jnp.asarray(obj_se))


def distributed_objective(
    problem: Problem,
    theta: PyTree,
    *,
    key: jax.Array,
    n: int,
    client=None,
    chunk_size: int | None = None,
    n_workers: int = DEFAULT_N_WORKERS,
    backend=None,
) -> tuple[float, float]:
    r"""Monte-Carlo estimate of :math:`J(\theta) = E[\sum_t w_t L(x_t) + w_{end}\Phi]` and its standard error
    from ``n`` episodes simulated over a Dask cluster: the mean and ``std(ddof=1)/sqrt(n)`` of
    ``pydso.rollout(problem, theta, key=key, n=n).objective``, equal to them for the same ``key`` (to rounding),
    without bringing any episode back (each chunk returns its count, mean and :math:`M_2`).

    **Arguments:**

    - ``problem``, ``theta``, ``key``, ``n``: as for :func:`pydso.rollout`.
    - ``client``, ``chunk_size``, ``n_workers``: as for :func:`distributed_estimate` (``chunk_size`` divides ``n``).
    - ``backend``: the simulation backend (name or instance; default ``"jax"``).

    **Returns:** ``(J, stderr)`` as floats. A non-finite state or objective raises :class:`~pydso.DivergenceError`
    naming the first such episode.

    Not for small ``n``: use :func:`pydso.rollout` (it also returns the episodes).
    """
    key, n = _check_common(problem, theta, key, n)
    b = get_backend(backend)
    b.check(problem)
    warn_single_episode(n, "distributed_objective")
    with _Cluster(client, n_workers) as cl:
        workers = _workers(cl, n_workers)
        chunk = _chunking(n, chunk_size, 1, n, workers, "the objective")
        keys = episode_keys(key, n)
        impl = str(jax.random.key_impl(keys))
        keydata = np.asarray(jax.random.key_data(keys))
        theta_np = jax.device_get(theta)
        [blob] = cl.scatter([_blob(None, problem)], broadcast=True, hash=False)
        starts = list(range(0, n, chunk))
        futures = [
            cl.submit(_task_objective, blob, theta_np, keydata[s : s + chunk], impl, backend, pure=False)
            for s in starts
        ]
        acc = None
        for (mean, m2, finite), s in zip(_gather(cl, futures), starts):
            if not np.all(finite):
                raise DivergenceError(
                    f"distributed_objective diverged: non-finite state or objective in episode "
                    f"{s + int(np.argmin(finite))} ({int((~finite).sum())} of the {chunk} episodes of its chunk). "
                    "Reduce dt, tighten the solver tolerances, or check theta and the cost."
                )
            acc = _merge(acc, (chunk, mean, m2))
    obj, obj_se = _mean_stderr(acc)
    return float(obj), float(obj_se)
