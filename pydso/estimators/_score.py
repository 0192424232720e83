r"""Gradient estimators for :math:`J(\theta) = E\big[\sum_{t<H} w_t L(x_t,\theta) + w_{end}\Phi(x_{end},\theta)\big]`.

Two families (DESIGN.md §1):

* :class:`Score` — the likelihood-ratio ("score") gradient, which needs only :math:`\log P(x'\mid x,\theta)`:

  .. math:: \hat g = \sum_t w_t \nabla L(x_t) + \sum_t \nabla\log P(x_{t+1}\mid x_t)\,(C_{t+1} - b_t),

  with :math:`C_{t+1} = \sum_{k>t} w_k L(x_k) + w_{end}\Phi` the weighted cost-to-go and :math:`b_t` any baseline
  that does not depend on :math:`x_{t+1}` (for :math:`w_t=\gamma^t` this is the rollout form of DESIGN.md §1.1,
  :math:`\sum_t\gamma^t[\nabla L + \gamma\nabla\log P\,(G_{t+1} - b)]`). Works for any chain with a density,
  including discrete ones; variance grows with the horizon, so use a baseline.
* :class:`Pathwise` — backpropagation through the reparameterised rollout (the discrete adjoint of the scan, or
  the diffrax adjoint chosen on the :class:`~pydso.ODESystem`). Low variance; needs dynamics differentiable in
  :math:`\theta` with the noise fixed. Do not use it on chaotic long horizons (exploding gradients): shorten
  the horizon or lower :math:`\gamma`.

Both return an :class:`Estimate`: the mean over ``n`` independent episodes of per-episode estimates, with its
standard error (sample standard deviation / :math:`\sqrt n`) computed per parameter entry.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import ProblemError
from .._typing import PyTree
from ..backends import AbstractBackend
from ..engine import rollout_chunk
from ..systems import Problem
from ._base import AbstractEstimator, Estimate, mean_and_stderr
from ._baselines import AbstractBaseline, MeanBaseline

__all__ = ["Score", "score_gradient"]


class Score(AbstractEstimator):
    r"""The score (likelihood-ratio) gradient of DESIGN.md §1.1 with a ``baseline``
    (:class:`MeanBaseline` by default).

    Needs a transition density (:class:`~pydso.MarkovChain`, :class:`~pydso.GaussianChain`,
    :class:`~pydso.TabularChain`, :class:`~pydso.SDESystem` with Euler–Maruyama). Unbiased for any baseline
    that ignores the episode's own future. Reference: Williams (1992); Sutton et al. (2000).
    """

    baseline: AbstractBaseline = eqx.field(default_factory=MeanBaseline)
    backend: "str | AbstractBackend | None" = eqx.field(static=True, default=None)

    def check(self, problem):
        if not problem.system.has_log_prob:
            raise ProblemError(
                f"the score estimator needs a transition log-density, but {type(problem.system).__name__} has "
                "none (deterministic dynamics); use estimator='pathwise'"
            )

    def _estimate(self, problem, theta, keys):
        traj = jax.lax.stop_gradient(rollout_chunk(problem, theta, keys, self.backend))
        n = keys.shape[0]
        targets = traj.cost_to_go()[:, 1:]
        if isinstance(self.baseline, MeanBaseline) and n < 2:
            raise ProblemError("MeanBaseline needs at least n = 2 episodes")
        advantages = jax.lax.stop_gradient(targets - self.baseline(traj, targets, theta, problem))

        def surrogate(theta, states, alive, advantage, terminal_weight):
            lp = problem.system.path_log_prob(states, theta)
            costs = jax.vmap(problem.step_cost, in_axes=(0, None))(states[:-1], theta)
            value = jnp.where(alive[:-1], costs, 0.0) @ traj.step_weights
            value = value + jnp.sum(jnp.where(alive[:-1], lp, 0.0) * advantage)
            if problem.terminal_cost is not None:
                ended = ~alive
                end = jnp.where(jnp.any(ended), jnp.argmax(ended), traj.horizon)
                value = value + terminal_weight * problem.terminal_cost(states[end], theta)
            return value

        grads = jax.vmap(jax.grad(surrogate), in_axes=(None, 0, 0, 0, 0))(
            theta, traj.states, traj.alive, advantages, traj.terminal_weights
        )
        mean, stderr = mean_and_stderr(grads)
        obj = traj.objective
        return Estimate(mean, stderr, jnp.mean(obj), jnp.std(obj, ddof=1) / jnp.sqrt(n))


def score_gradient(
    problem: Problem, theta: PyTree, *, key: jax.Array, n: int, baseline: AbstractBaseline | None = None
) -> Estimate:
    """Score-function estimate of :math:`\\nabla J` from ``n`` episodes; see :class:`Score`."""
    return Score(baseline if baseline is not None else MeanBaseline()).estimate(problem, theta, key=key, n=n)
