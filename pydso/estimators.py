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

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._errors import ProblemError
from .engine import Trajectories, _check_n, _rollout_chunk, check_key, episode_keys, shard_episodes, simulate_episode
from .systems import Problem, SDESystem

PyTree = Any

__all__ = [
    "Estimate",
    "AbstractEstimator",
    "Score",
    "Pathwise",
    "AbstractBaseline",
    "NoBaseline",
    "MeanBaseline",
    "StateValueBaseline",
    "score_gradient",
    "pathwise_gradient",
    "as_estimator",
]


class Estimate(eqx.Module):
    """A Monte-Carlo gradient estimate.

    Attributes:
        gradient: mean of the per-episode gradient estimates (pytree like theta).
        stderr: standard error of ``gradient`` (same pytree).
        objective: mean per-episode objective, an unbiased estimate of :math:`J(\\theta)`.
        objective_stderr: its standard error.
    """

    gradient: PyTree
    stderr: PyTree
    objective: jax.Array
    objective_stderr: jax.Array


def _mean_and_stderr(samples: PyTree) -> tuple[PyTree, PyTree]:
    n = jax.tree.leaves(samples)[0].shape[0]
    mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), samples)
    std = jax.tree.map(lambda a: jnp.std(a, axis=0, ddof=1) / jnp.sqrt(n), samples)
    return mean, std


# ---------------------------------------------------------------------------------------- baselines
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


# ---------------------------------------------------------------------------------------- estimators
class AbstractEstimator(eqx.Module):
    """A gradient estimator: ``estimate(problem, theta, key, n) -> Estimate``."""

    @abc.abstractmethod
    def _estimate(self, problem: Problem, theta: PyTree, keys: jax.Array) -> Estimate:
        """Traceable core, given one key per episode."""

    def check(self, problem: Problem) -> None:
        """Raise :class:`~pydso.ProblemError` if this estimator cannot be used on ``problem``."""

    def estimate(self, problem: Problem, theta: PyTree, key: jax.Array, n: int) -> Estimate:
        """Estimate :math:`\\nabla J(\\theta)` from ``n`` fresh episodes (compiled once per problem and n)."""
        key = check_key(key)
        n = _check_n(n)
        self.check(problem)
        problem.check_theta(theta)
        return _jit_estimate(self, problem, theta, shard_episodes(episode_keys(key, n)))


@eqx.filter_jit
def _jit_estimate(estimator, problem, theta, keys):
    return estimator._estimate(problem, theta, keys)


def _transition_log_probs(system, states, theta):
    r""":math:`\log P(x_{t+1}\mid x_t,\theta)` along one episode's fixed states, shape ``(H,)``."""
    states = jax.lax.stop_gradient(states)
    if isinstance(system, SDESystem):
        ts = jnp.arange(states.shape[0] - 1) * system.dt
        return jax.vmap(system.log_prob, in_axes=(0, 0, 0, None))(ts, states[:-1], states[1:], theta)
    return jax.vmap(system.log_prob, in_axes=(0, 0, None))(states[:-1], states[1:], theta)


class Score(AbstractEstimator):
    r"""The score (likelihood-ratio) gradient of DESIGN.md §1.1 with a ``baseline``
    (:class:`MeanBaseline` by default).

    Needs a transition density (:class:`~pydso.MarkovChain`, :class:`~pydso.GaussianChain`,
    :class:`~pydso.TabularChain`, :class:`~pydso.SDESystem` with Euler–Maruyama). Unbiased for any baseline
    that ignores the episode's own future. Reference: Williams (1992); Sutton et al. (2000).
    """

    baseline: AbstractBaseline = eqx.field(default_factory=MeanBaseline)

    def check(self, problem):
        if not problem.system.has_log_prob:
            raise ProblemError(
                f"the score estimator needs a transition log-density, but {type(problem.system).__name__} has "
                "none (deterministic dynamics); use estimator='pathwise'"
            )

    def _estimate(self, problem, theta, keys):
        traj = jax.lax.stop_gradient(_rollout_chunk(problem, theta, keys))
        n = keys.shape[0]
        targets = traj.cost_to_go()[:, 1:]
        if isinstance(self.baseline, MeanBaseline) and n < 2:
            raise ProblemError("MeanBaseline needs at least n = 2 episodes")
        advantages = jax.lax.stop_gradient(targets - self.baseline(traj, targets, theta, problem))

        def surrogate(theta, states, alive, advantage, terminal_weight):
            lp = _transition_log_probs(problem.system, states, theta)
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
        mean, stderr = _mean_and_stderr(grads)
        obj = traj.objective
        return Estimate(mean, stderr, jnp.mean(obj), jnp.std(obj, ddof=1) / jnp.sqrt(n))


class Pathwise(AbstractEstimator):
    r"""The pathwise (reparameterisation) gradient of DESIGN.md §1.2: per episode,
    :math:`\nabla_\theta` of the simulated objective with the noise held fixed, by reverse-mode autodiff
    through the rollout (``lax.scan``) or through :func:`diffrax.diffeqsolve` with the system's adjoint.

    Needs reparameterised dynamics (:class:`~pydso.DeterministicMap`, :class:`~pydso.GaussianChain`,
    :class:`~pydso.ODESystem`, :class:`~pydso.SDESystem`, or a :class:`~pydso.MarkovChain` declared
    ``reparameterized=True``). Terminal sets make the objective discontinuous in :math:`\theta`: the pathwise
    gradient then ignores the change of the exit time (use :class:`Score`).

    ``checkpoints=k`` rematerialises discrete-time rollouts in ``k`` segments so reverse-mode memory grows like
    ``k + H/k`` instead of ``H`` (long horizons); the gradient is unchanged.
    """

    checkpoints: int | None = eqx.field(static=True, default=None)

    def check(self, problem):
        if not problem.system.reparameterized:
            raise ProblemError(
                f"the pathwise estimator needs reparameterised dynamics, but {type(problem.system).__name__} "
                "samples are not differentiable in theta; use estimator='score'"
            )

    def _estimate(self, problem, theta, keys):
        def objective(theta, key):
            states, costs, _, alive, tc, tw = simulate_episode(problem, theta, key, self.checkpoints)
            w, _ = problem.setting.weights()
            return costs @ jnp.asarray(w, costs.dtype) + tw * tc

        values, grads = jax.vmap(jax.value_and_grad(objective), in_axes=(None, 0))(theta, keys)
        mean, stderr = _mean_and_stderr(grads)
        n = keys.shape[0]
        return Estimate(mean, stderr, jnp.mean(values), jnp.std(values, ddof=1) / jnp.sqrt(n))


def as_estimator(estimator: "str | AbstractEstimator") -> AbstractEstimator:
    """``"pathwise"`` -> :class:`Pathwise`, ``"score"`` -> :class:`Score` (mean baseline); objects pass through."""
    if isinstance(estimator, AbstractEstimator):
        return estimator
    if estimator == "pathwise":
        return Pathwise()
    if estimator == "score":
        return Score()
    raise ProblemError(f"unknown estimator {estimator!r}: use 'pathwise', 'score' or an estimator object")


def score_gradient(
    problem: Problem, theta: PyTree, key: jax.Array, n: int, *, baseline: AbstractBaseline | None = None
) -> Estimate:
    """Score-function estimate of :math:`\\nabla J` from ``n`` episodes; see :class:`Score`."""
    return Score(baseline if baseline is not None else MeanBaseline()).estimate(problem, theta, key, n)


def pathwise_gradient(problem: Problem, theta: PyTree, key: jax.Array, n: int) -> Estimate:
    """Pathwise estimate of :math:`\\nabla J` from ``n`` episodes; see :class:`Pathwise`."""
    return Pathwise().estimate(problem, theta, key, n)
