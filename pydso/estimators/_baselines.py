r"""Baselines of the score gradient: one family, used on-policy and off-policy (DESIGN.md §1.1, §1.8).

The score gradient of a batch with per-decision weights :math:`W` (all 1 on-policy) is

.. math:: \hat g = \sum_t w_t W_t \nabla L(x_t) + \sum_t s_t\,\big(C^W_{t+1} - W_{t+1}\, b_t\big),

with :math:`s_t = \nabla\log P(x_{t+1}\mid x_t,\theta)` and the weighted cost-to-go :math:`C^W_{t+1}`
(:class:`~pydso.estimators.WeightedReturns`). A baseline :math:`b_t` may depend on :math:`x_0..x_t` and on the
*other* episodes but not on episode ``i``'s own future: then :math:`E_B[W_{t+1} s_t b_t] = E_\theta[s_t]\,b_t = 0`
and it adds no bias, only (ideally) removes variance. It is expressed in the units of
:math:`\hat G_{t+1} = C^W_{t+1}/W_{t+1}`.

* :class:`NoBaseline` — :math:`b_t = 0` (REINFORCE; Williams 1992).
* :class:`MeanBaseline` — leave-one-out mean over the other episodes at each time, self-normalised off-policy.
* :class:`StateValueBaseline` — :math:`b_t = w_t (V(x_t) - L(x_t))`, an estimate of :math:`E[\hat G_{t+1}\mid x_t]`,
  with a given value function or one fitted by cross-fitted ridge regression (Greensmith, Bartlett & Baxter 2004,
  *Variance reduction techniques for gradient estimates in reinforcement learning*, JMLR).

The same objects are accepted by :class:`~pydso.Score`, :func:`~pydso.estimators.offpolicy_gradient`, the natural
gradient and the proximal surrogate.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import ProblemError
from .._typing import PyTree
from ..systems import Problem
from ._logged import LoggedBatch
from ._weights import WeightedReturns

__all__ = ["AbstractBaseline", "NoBaseline", "MeanBaseline", "StateValueBaseline", "check_baseline"]


class AbstractBaseline(eqx.Module):
    r"""A baseline :math:`b_t` for the score gradient, in the units of :math:`\hat G_{t+1} = C^W_{t+1}/W_{t+1}`
    (module docstring). It may use other episodes but never episode ``i``'s own future, so it adds no bias.
    Subclasses are final."""

    @abc.abstractmethod
    def __call__(self, problem: Problem, theta: PyTree, batch: LoggedBatch, returns: WeightedReturns) -> jax.Array:
        """Baseline values.

        **Arguments:**

        - ``problem``, ``theta``: the target chain.
        - ``batch``: the ``n`` episodes of ``H`` transitions.
        - ``returns``: their :class:`~pydso.estimators.WeightedReturns` at ``theta``.

        **Returns:** ``(n, H)`` values :math:`b_t`.
        """


class NoBaseline(AbstractBaseline):
    """:math:`b_t = 0`: the plain REINFORCE-style estimator (highest variance)."""

    def __call__(self, problem, theta, batch, returns):
        return jnp.zeros_like(returns.costs)


class MeanBaseline(AbstractBaseline):
    r"""Leave-one-out mean over episodes at each time,
    :math:`b_t^{(i)} = \sum_{j\ne i} C^{W,(j)}_{t+1} \big/ \sum_{j\ne i} W^{(j)}_{t+1}`: on-policy
    (:math:`W = 1`) the plain mean :math:`\frac{1}{n-1}\sum_{j\ne i} C^{(j)}_{t+1}`; off-policy its self-normalised
    version. Unbiased (episode ``i`` is excluded from its own baseline); needs at least 2 episodes (per chunk, when
    a dataset is streamed).
    """

    def __call__(self, problem, theta, batch, returns):
        n = returns.weights.shape[0]
        if n < 2:
            raise ProblemError("MeanBaseline needs at least 2 episodes (per chunk, when a dataset is streamed)")
        C, W = returns.cost_to_go[:, 1:], returns.weights[:, 1:]
        num = jnp.sum(C, 0, keepdims=True) - C
        den = jnp.sum(W, 0, keepdims=True) - W
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _default_features(x, t_frac):
    x = jnp.ravel(jnp.asarray(x, float))
    return jnp.concatenate([jnp.ones(1), x, x**2, jnp.array([t_frac, t_frac**2])])


class StateValueBaseline(AbstractBaseline):
    r"""A state-value baseline :math:`b_t = w_t\,(\hat V(x_t) - L(x_t))`, an estimate of
    :math:`E[\hat G_{t+1}\mid x_t]`.

    **Arguments:**

    - ``value_fn``: ``V(x, theta) -> scalar`` (a fitted critic such as :class:`~pydso.estimators.LinearValue`, or
      in tests the exact value), used as is. Default: fitted, see below.
    - ``features``: ``phi(x, t/H) -> (f,)`` features of the fitted baseline (default
      :math:`[1, x, x^2, t/H, (t/H)^2]`; for tabular chains ``lambda x, t: jax.nn.one_hot(x, S)``).
    - ``ridge``: ridge of the regression.

    Without ``value_fn`` the coefficients :math:`\beta` minimise
    :math:`\sum_{i,t} (C^W_{t+1}/w_t - W_{t+1}\,\phi(x_t, t/H)^\top\beta)^2 + \text{ridge}\,\|\beta\|^2` — the
    variance of the advantage terms :math:`C^W_{t+1} - W_{t+1} b_t` themselves (on-policy: ordinary least squares of
    :math:`C_{t+1}/w_t` on :math:`\phi`) — *cross-fitted*: episodes are split in two halves and each half's baseline
    is fitted on the other, so the estimator stays unbiased.
    """

    value_fn: Callable | None = None
    features: Callable = eqx.field(static=True, default=_default_features)
    ridge: float = eqx.field(static=True, default=1e-6)

    def __call__(self, problem, theta, batch, returns):
        w = batch.step_weights
        states = batch.states[:, :-1]
        if self.value_fn is not None:
            v = jax.vmap(jax.vmap(lambda x: self.value_fn(x, theta)))(states)
            return w * (jax.lax.stop_gradient(v) - returns.costs)
        n, horizon = returns.costs.shape
        t_frac = jnp.arange(horizon) / horizon
        phi = jax.vmap(jax.vmap(self.features, in_axes=(0, 0)), in_axes=(0, None))(states, t_frac)
        W = returns.weights[:, 1:]
        valid = (w > 0) & batch.valid
        y = jnp.where(valid, returns.cost_to_go[:, 1:] / jnp.where(w > 0, w, 1.0), 0.0)
        x = phi * W[..., None]
        fold = jnp.arange(n) % 2

        def fit(mask):
            m = (valid & mask[:, None]).astype(phi.dtype)[..., None]
            a = jnp.einsum("ntf,ntg->fg", x * m, x) + self.ridge * jnp.eye(phi.shape[-1])
            rhs = jnp.einsum("ntf,nt->f", x * m, y)
            return jnp.linalg.solve(a, rhs)

        coef_from_0, coef_from_1 = fit(fold == 0), fit(fold == 1)
        coef = jnp.where((fold == 0)[:, None], coef_from_1, coef_from_0)
        return w * jnp.einsum("ntf,nf->nt", phi, coef)


def check_baseline(baseline) -> AbstractBaseline:
    """Return ``baseline`` if it is a baseline object, else raise :class:`~pydso.ProblemError` saying what to pass."""
    if isinstance(baseline, AbstractBaseline):
        return baseline
    raise ProblemError(
        f"baseline must be a baseline object — pydso.NoBaseline(), pydso.MeanBaseline() or "
        f"pydso.StateValueBaseline(value_fn=... | features=...) — got {baseline!r}"
    )
