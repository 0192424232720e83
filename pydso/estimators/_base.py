"""Monte-Carlo estimates and the estimator interface."""

import abc
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_key, check_positive_int
from .._errors import DivergenceError
from .._typing import PyTree
from ..engine import episode_keys, shard_episodes
from ..systems import Problem

__all__ = [
    "Estimate",
    "AbstractEstimator",
    "mean_and_stderr",
    "check_finite_estimate",
    "warn_single_episode",
]


class Estimate(eqx.Module):
    """A Monte-Carlo gradient estimate.

    **Attributes:**

    - ``gradient``: mean of the per-episode gradient estimates (pytree like theta).
    - ``stderr``: standard error of ``gradient`` (same pytree).
    - ``objective``: mean per-episode objective, an unbiased estimate of :math:`J(\\theta)`.
    - ``objective_stderr``: its standard error.
    """

    gradient: PyTree
    stderr: PyTree
    objective: jax.Array
    objective_stderr: jax.Array


def mean_and_stderr(samples: PyTree) -> tuple[PyTree, PyTree]:
    """Mean over the leading (episode) axis of every leaf, and its standard error (``ddof=1``)."""
    n = jax.tree.leaves(samples)[0].shape[0]
    mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), samples)
    std = jax.tree.map(lambda a: jnp.std(a, axis=0, ddof=1) / jnp.sqrt(n), samples)
    return mean, std


class AbstractEstimator(eqx.Module):
    """A gradient estimator: ``estimate(problem, theta, key, n) -> Estimate``."""

    @abc.abstractmethod
    def _estimate(self, problem: Problem, theta: PyTree, keys: jax.Array) -> Estimate:
        """Traceable core, given one key per episode."""

    def check(self, problem: Problem) -> None:
        """Raise :class:`~pydso.ProblemError` if this estimator cannot be used on ``problem``."""

    def estimate(self, problem: Problem, theta: PyTree, *, key: jax.Array, n: int) -> Estimate:
        """Estimate :math:`\\nabla J(\\theta)` from ``n`` fresh episodes (compiled once per problem and n).

        With ``n=1`` the standard errors are undefined: they are returned as NaN and a :class:`UserWarning` says
        so (use ``n >= 2`` for error bars). A rollout that diverges (non-finite state) or a non-finite objective or
        gradient raises :class:`~pydso.DivergenceError` naming the episode and step, as :func:`pydso.rollout`
        does, instead of returning NaN or inf.
        """
        key = check_key(key)
        n = check_positive_int(n, "n")
        self.check(problem)
        problem.check_theta(theta)
        warn_single_episode(n, f"{type(self).__name__}.estimate")
        est = jit_estimate(self, problem, theta, shard_episodes(episode_keys(key, n)))
        check_finite_estimate(est, problem, theta, key=key, n=n, what=f"the {type(self).__name__} estimate")
        return est


def warn_single_episode(n: int, what: str) -> None:
    """Warn that standard errors from ``n == 1`` episode are undefined (NaN)."""
    if n == 1:
        warnings.warn(
            f"{what} with n=1: a standard error needs at least two episodes, so the reported standard errors are NaN; "
            "pass n >= 2 for error bars",
            UserWarning,
            stacklevel=3,
        )


def check_finite_estimate(est: "Estimate", problem: Problem, theta: PyTree, *, key: jax.Array, n: int, what: str):
    """Raise :class:`~pydso.DivergenceError` if the gradient or objective of ``est`` is non-finite, naming the
    episode and step where the simulation of the same ``n`` episodes (same ``key``) diverged, or where a step cost
    overflowed.

    Inside a trace (the estimate called under ``jax.jit``/``vmap``/``grad``) values are not known: nothing is
    checked there, and the caller checks the concrete result (as :func:`pydso.minimize` does)."""
    leaves = [est.objective, *jax.tree.leaves(est.gradient)]
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return
    if all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
        return
    from ..engine import rollout

    traj = rollout(problem, theta, key=key, n=n)  # raises the engine's DivergenceError for a non-finite state
    costs = np.asarray(traj.costs, dtype=float)
    bad = ~np.isfinite(costs)
    if bad.any():
        ep, t = (int(i) for i in np.argwhere(bad)[0])
        affected = int(bad.any(axis=1).sum())
        where = f"the step cost is non-finite in episode {ep} at step {t} ({affected} of {n} episodes)"
    else:
        tc = np.asarray(traj.terminal_costs, dtype=float)
        if (~np.isfinite(tc)).any():
            where = f"the terminal cost is non-finite in episode {int(np.argmax(~np.isfinite(tc)))}"
        else:
            where = "the simulated states and costs are finite, so the gradient itself overflowed"
    raise DivergenceError(
        f"{what} diverged: its objective or gradient is non-finite; {where}. Reduce dt or the horizon, lower gamma, "
        "or check theta and the cost."
    )


@eqx.filter_jit
def jit_estimate(estimator, problem, theta, keys):
    """``estimator._estimate`` compiled once per (estimator, problem, shapes); module level so that every caller
    (the estimator itself, :func:`pydso.minimize`) shares the compilation."""
    return estimator._estimate(problem, theta, keys)
