"""Monte-Carlo estimates and the estimator interface."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_key, check_positive_int
from .._typing import PyTree
from ..engine import episode_keys, shard_episodes
from ..systems import Problem

__all__ = ["Estimate", "AbstractEstimator", "mean_and_stderr"]


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
        """Estimate :math:`\\nabla J(\\theta)` from ``n`` fresh episodes (compiled once per problem and n)."""
        key = check_key(key)
        n = check_positive_int(n, "n")
        self.check(problem)
        problem.check_theta(theta)
        return jit_estimate(self, problem, theta, shard_episodes(episode_keys(key, n)))


@eqx.filter_jit
def jit_estimate(estimator, problem, theta, keys):
    """``estimator._estimate`` compiled once per (estimator, problem, shapes); module level so that every caller
    (the estimator itself, :func:`pydso.minimize`) shares the compilation."""
    return estimator._estimate(problem, theta, keys)
