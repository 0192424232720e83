"""Baselines of the score estimator (one family, used on-policy and off-policy)."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._typing import PyTree
from ..engine import Trajectories
from ..systems import Problem

__all__ = ["AbstractBaseline", "NoBaseline", "MeanBaseline", "StateValueBaseline"]


class AbstractBaseline(eqx.Module):
    r"""A baseline :math:`b_t` for the score estimator, in the units of the weighted cost-to-go
    :math:`C_{t+1}`. It may use other episodes but never episode ``i``'s own future, so it adds no bias."""

    @abc.abstractmethod
    def __call__(self, traj: Trajectories, targets: jax.Array, theta: PyTree, problem: Problem) -> jax.Array:
        """Baseline values of shape ``(n, H)`` for ``targets`` :math:`C_{t+1}` of shape ``(n, H)``."""


class NoBaseline(AbstractBaseline):
    """:math:`b_t = 0`: the plain REINFORCE-style estimator (highest variance)."""

    def __call__(self, traj, targets, theta, problem):
        return jnp.zeros_like(targets)


class MeanBaseline(AbstractBaseline):
    r"""Leave-one-out mean over episodes at each time: :math:`b_t^{(i)} = \frac{1}{n-1}\sum_{j\ne i} C^{(j)}_{t+1}`.

    Unbiased (episode ``i`` is excluded from its own baseline); needs ``n >= 2``.
    """

    def __call__(self, traj, targets, theta, problem):
        n = targets.shape[0]
        return (jnp.sum(targets, axis=0, keepdims=True) - targets) / (n - 1)


def _default_features(x, t_frac):
    x = jnp.ravel(jnp.asarray(x, float))
    return jnp.concatenate([jnp.ones(1), x, x**2, jnp.array([t_frac, t_frac**2])])


class StateValueBaseline(AbstractBaseline):
    r"""A state-value baseline :math:`b_t = w_t\,(\hat V(x_t) - L(x_t))`, an estimate of
    :math:`E[C_{t+1}\mid x_t]`.

    * With ``value_fn(x, theta)`` given (e.g. a fitted critic or, in tests, the exact value), it is used as is.
    * Otherwise :math:`E[C_{t+1}/w_t \mid x_t]` is fitted by ridge regression on ``features(x, t/H)``
      (default: :math:`[1, x, x^2, t/H, (t/H)^2]`), *cross-fitted*: episodes are split in two halves and each
      half's baseline is fitted on the other, so the estimator stays unbiased.

    For tabular chains pass ``features=lambda x, t: jax.nn.one_hot(x, S)``.
    """

    value_fn: Callable | None = eqx.field(static=True, default=None)
    features: Callable = eqx.field(static=True, default=_default_features)
    ridge: float = eqx.field(static=True, default=1e-6)

    def __call__(self, traj, targets, theta, problem):
        n, horizon = targets.shape
        w = traj.step_weights
        states = traj.states[:, :-1]
        if self.value_fn is not None:
            v = jax.vmap(jax.vmap(lambda x: self.value_fn(x, theta)))(states)
            return w * (v - traj.costs)
        t_frac = jnp.arange(horizon) / horizon
        phi = jax.vmap(jax.vmap(self.features, in_axes=(0, 0)), in_axes=(0, None))(states, t_frac)
        valid = (w > 0) & traj.alive[:, :-1]
        y = jnp.where(valid, targets / jnp.where(w > 0, w, 1.0), 0.0)
        fold = jnp.arange(n) % 2

        def fit(mask):
            m = (valid & mask[:, None]).astype(phi.dtype)[..., None]
            a = jnp.einsum("ntf,ntg->fg", phi * m, phi) + self.ridge * jnp.eye(phi.shape[-1])
            rhs = jnp.einsum("ntf,nt->f", phi * m, y)
            return jnp.linalg.solve(a, rhs)

        coef_from_0, coef_from_1 = fit(fold == 0), fit(fold == 1)
        coef = jnp.where((fold == 0)[:, None], coef_from_1, coef_from_0)
        return w * jnp.einsum("ntf,nf->nt", phi, coef)
