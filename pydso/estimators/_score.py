r"""The score (likelihood-ratio) gradient, on-policy and off-policy: one implementation (DESIGN.md §1.1, §1.8).

For a batch of episodes logged under a behaviour chain :math:`B` with per-decision weights :math:`W_t`
(:mod:`pydso.estimators._weights`; :math:`W = 1` for fresh rollouts, where :math:`B = P_\theta`), the per-episode
estimate is

.. math:: \hat g = \sum_t w_t W_t \nabla L(x_t) + \sum_t s_t\, (C^W_{t+1} - W_{t+1} b_t)
          + w_{end} W_{end} \nabla\Phi(x_{end}),
          \qquad C^W_{t+1} = \sum_{k>t} w_k W_k L(x_k) + w_{end} W_{end}\Phi,

with :math:`s_t = \nabla \log P(x_{t+1} \mid x_t, \theta)` and a baseline :math:`b_t`
(:mod:`pydso.estimators._baselines`). On-policy with :math:`w_t=\gamma^t` this is the rollout form of DESIGN.md
§1.1, :math:`\sum_t\gamma^t[\nabla L + \gamma\nabla\log P\,(G_{t+1} - b)]`; off-policy it is its per-decision
importance-sampled version (Precup et al. 2000), unbiased for any baseline that ignores the episode's own future
(:math:`E_B[W_{t+1} s_t b_t] = E_\theta[s_t]\,b_t = 0`). :math:`\hat J = C^W_0` estimates the objective.

Entry points: :class:`Score` / :func:`score_gradient` roll out ``n`` fresh episodes, build a
:class:`~pydso.estimators.LoggedBatch` and call :func:`per_episode_score_gradients` with log-ratios exactly zero;
:func:`offpolicy_gradient` calls the same function on logged data, streaming a stored dataset chunk by chunk.
Works for any chain with a density, discrete ones included; the variance grows with the horizon (use a baseline),
and off-policy with the distance between :math:`\theta` and the behaviour (watch :func:`ess_report`).
References: Williams (1992); Sutton et al. (2000); Precup, Sutton & Singh (2000).
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import DivergenceError, ProblemError
from .._typing import PyTree
from ..backends import AbstractBackend
from ..engine import rollout_chunk
from ..systems import Problem
from ._base import AbstractEstimator, Estimate, mean_and_stderr
from ._baselines import AbstractBaseline, MeanBaseline, check_baseline
from ._logged import LoggedBatch, as_batch, iter_batches
from ._weights import StreamingMoments, WeightedReturns, importance_weights, log_ratios, weighted_returns

__all__ = [
    "Score",
    "score_gradient",
    "score_advantages",
    "per_episode_score_gradients",
    "offpolicy_gradient",
    "offpolicy_objective",
]

_MEAN_BASELINE = MeanBaseline()  # the default baseline (one immutable instance)


def _check_density(problem: Problem, what: str) -> None:
    if not problem.system.has_log_prob:
        raise ProblemError(
            f"{what} needs a transition log-density, but {type(problem.system).__name__} has no transition "
            "log-density; use Pathwise()"
        )


def score_advantages(
    problem: Problem, theta: PyTree, batch: LoggedBatch, returns: WeightedReturns, baseline: AbstractBaseline
) -> jax.Array:
    r"""The coefficients :math:`c_t = C^W_{t+1} - W_{t+1} b_t` of the scores :math:`s_t` in the score gradient,
    shape ``(n, H)``, held fixed (``stop_gradient``)."""
    b = baseline(problem, theta, batch, returns)
    return jax.lax.stop_gradient(returns.cost_to_go[:, 1:] - returns.weights[:, 1:] * b)


def per_episode_score_gradients(
    problem: Problem, theta: PyTree, batch: LoggedBatch, returns: WeightedReturns, baseline: AbstractBaseline
) -> tuple[PyTree, jax.Array]:
    r"""The score gradient of every episode of a batch (module docstring); traceable, the one implementation
    behind :class:`Score` and :func:`offpolicy_gradient`.

    **Arguments:**

    - ``problem``, ``theta``: the target chain.
    - ``batch``: ``n`` episodes (:class:`~pydso.estimators.LoggedBatch`).
    - ``returns``: their :class:`~pydso.estimators.WeightedReturns` at ``theta`` (weights :math:`W`).
    - ``baseline``: a baseline object.

    **Returns:** ``(gradients, objectives)``: a pytree like ``theta`` with a leading axis of ``n`` per-episode
    gradients, and the ``(n,)`` per-episode objective estimates :math:`C^W_0`.
    """
    adv = score_advantages(problem, theta, batch, returns, baseline)
    wL = jax.lax.stop_gradient(batch.step_weights * returns.weights[:, :-1])

    def surrogate(theta, states, valid, adv, wl, end, tw, w_end):
        ts = jnp.arange(states.shape[0], dtype=jnp.result_type(float)) * problem.system.time_step
        lp = jnp.where(valid, problem.system.path_log_prob(states, theta), 0.0)
        c = jnp.where(valid, jax.vmap(problem.step_cost, in_axes=(0, 0, None))(ts[:-1], states[:-1], theta), 0.0)
        out = jnp.sum(wl * c) + jnp.sum(lp * adv)
        if problem.terminal_cost is not None:
            out = out + jax.lax.stop_gradient(tw * w_end) * problem.final_cost(ts[end], states[end], theta)
        return out

    grads = jax.vmap(jax.grad(surrogate), in_axes=(None, 0, 0, 0, 0, 0, 0, 0))(
        theta, batch.states, batch.valid, adv, wL, batch.end_index, batch.terminal_weights, returns.end_weights
    )
    return grads, returns.objective


class Score(AbstractEstimator):
    r"""The on-policy score (likelihood-ratio) gradient of DESIGN.md §1.1 (module docstring) from ``n`` fresh
    episodes, with a ``baseline`` (:class:`MeanBaseline` by default).

    **Arguments:**

    - ``baseline``: :class:`NoBaseline`, :class:`MeanBaseline` or :class:`StateValueBaseline`.
    - ``backend``: the simulation backend (name or instance; default ``"jax"``).

    Needs a transition density (:class:`~pydso.MarkovChain`, :class:`~pydso.GaussianChain`,
    :class:`~pydso.TabularChain`, :class:`~pydso.SDESystem` with Euler–Maruyama). Unbiased for any baseline that
    ignores the episode's own future. Prefer :class:`~pydso.Pathwise` when the dynamics are reparameterised and the
    horizon is not chaotic: its variance is usually far lower. Reference: Williams (1992); Sutton et al. (2000).
    """

    baseline: AbstractBaseline = eqx.field(default_factory=MeanBaseline)
    backend: "str | AbstractBackend | None" = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_baseline(self.baseline)

    def check(self, problem):
        _check_density(problem, "the score estimator")

    def _estimate(self, problem, theta, keys):
        traj = jax.lax.stop_gradient(rollout_chunk(problem, theta, keys, self.backend))
        batch = as_batch(traj, problem)
        returns = weighted_returns(problem, theta, batch, jnp.zeros_like(batch.behavior_logp))  # W = 1 exactly
        grads, obj = per_episode_score_gradients(problem, theta, batch, returns, self.baseline)
        mean, stderr = mean_and_stderr(grads)
        n = keys.shape[0]
        return Estimate(mean, stderr, jnp.mean(obj), jnp.std(obj, ddof=1) / jnp.sqrt(n))


def score_gradient(
    problem: Problem, theta: PyTree, *, key: jax.Array, n: int, baseline: AbstractBaseline = _MEAN_BASELINE
) -> Estimate:
    r"""Score-function estimate of :math:`\nabla J(\theta)` from ``n`` fresh episodes; see :class:`Score`.

    **Returns:** an :class:`~pydso.Estimate` (gradient and objective with standard errors).
    """
    return Score(check_baseline(baseline)).estimate(problem, theta, key=key, n=n)


@eqx.filter_jit
def _gradient_sums(problem, theta, batch, baseline, weight_clip, normalize, weight_norm):
    returns = weighted_returns(
        problem,
        theta,
        batch,
        log_ratios(problem, theta, batch),
        weight_clip=weight_clip,
        normalize=normalize,
        weight_norm=weight_norm,
    )
    grads, obj = per_episode_score_gradients(problem, theta, batch, returns, baseline)
    return StreamingMoments.of(grads), StreamingMoments.of(obj)


@eqx.filter_jit
def _objective_sums(problem, theta, batch, weight_clip, normalize, weight_norm):
    lr = log_ratios(problem, theta, batch)
    returns = weighted_returns(
        problem, theta, batch, lr, weight_clip=weight_clip, normalize=normalize, weight_norm=weight_norm
    )
    return StreamingMoments.of(returns.objective)


@eqx.filter_jit
def _weight_sums(problem, theta, batch, weight_clip):
    return jnp.sum(importance_weights(log_ratios(problem, theta, batch), weight_clip=weight_clip), axis=0)


def _weight_norm(problem, theta, data, weight_clip, episodes_per_chunk):
    """``(1, H+1)`` mean weights over all episodes of ``data`` (self-normalisation of a streamed dataset)."""
    tot, n = None, 0
    for batch in iter_batches(data, problem, episodes_per_chunk):
        s = _weight_sums(problem, theta, batch, weight_clip)
        tot = s if tot is None else tot + s
        n += batch.n_episodes
    return (tot / n)[None, :]


def offpolicy_gradient(
    problem: Problem,
    theta: PyTree,
    data,
    *,
    baseline: AbstractBaseline = _MEAN_BASELINE,
    weight_clip: float | None = None,
    normalize: bool = False,
    episodes_per_chunk: int | None = None,
) -> Estimate:
    r"""Per-decision importance-sampled score gradient of :math:`J` at ``theta`` from data logged under a
    behaviour chain (module docstring).

    **Arguments:**

    - ``problem``: the DSO problem (its system must have a transition density).
    - ``theta``: target parameters.
    - ``data``: :class:`~pydso.estimators.LoggedBatch`, :class:`~pydso.Trajectories` or an ``xarray.Dataset`` with
      ``behavior_logp`` (streamed by chunks).
    - ``baseline``: :class:`MeanBaseline` (default: self-normalised leave-one-out mean over the *other* episodes
      of the chunk), :class:`NoBaseline` or :class:`StateValueBaseline`.
    - ``weight_clip``: truncate the cumulative weights (biased, bounded variance).
    - ``normalize``: self-normalised (weighted) per-decision weights (biased, consistent).
    - ``episodes_per_chunk``: chunk size when streaming a dataset.

    **Returns:** an :class:`~pydso.Estimate`: the mean of the per-episode estimates and their standard errors, and
    the per-decision IS estimate of :math:`J(\theta)`.

    On-policy data (logged at ``theta``) give the same numbers as :class:`Score` on those episodes.
    """
    _check_density(problem, "the off-policy score gradient")
    baseline = check_baseline(baseline)
    problem.check_theta(theta)
    weight_norm = _weight_norm(problem, theta, data, weight_clip, episodes_per_chunk) if normalize else None
    gsum = osum = None
    for batch in iter_batches(data, problem, episodes_per_chunk):
        g, o = _gradient_sums(problem, theta, batch, baseline, weight_clip, normalize, weight_norm)
        gsum = g if gsum is None else gsum + g
        osum = o if osum is None else osum + o
    grad, grad_se = gsum.mean_stderr()
    obj, obj_se = osum.mean_stderr()
    _check_finite_offpolicy([obj, *jax.tree.leaves(grad)], "offpolicy_gradient")
    return Estimate(grad, grad_se, obj, obj_se)


def _check_finite_offpolicy(values, what: str) -> None:
    """Raise :class:`~pydso.DivergenceError` if an off-policy estimate is non-finite (overflowing weights/costs).
    Nothing is checked inside a trace (values unknown there)."""
    if any(isinstance(v, jax.core.Tracer) for v in values):
        return
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in values):
        raise DivergenceError(
            f"{what}: the estimate at theta is non-finite: the importance weights or the costs of the logged "
            "episodes overflowed. Pass weight_clip=..., move theta closer to the behaviour chain, or check the cost."
        )


def offpolicy_objective(
    problem: Problem,
    theta: PyTree,
    data,
    *,
    weight_clip: float | None = None,
    normalize: bool = False,
    episodes_per_chunk: int | None = None,
) -> tuple[float, float]:
    r"""Per-decision IS estimate of :math:`J(\theta)` from logged data (streamed), and its standard error.

    **Returns:** ``(J, stderr)`` as floats.
    """
    _check_density(problem, "the off-policy objective")
    problem.check_theta(theta)
    weight_norm = _weight_norm(problem, theta, data, weight_clip, episodes_per_chunk) if normalize else None
    total = None
    for batch in iter_batches(data, problem, episodes_per_chunk):
        s = _objective_sums(problem, theta, batch, weight_clip, normalize, weight_norm)
        total = s if total is None else total + s
    obj, obj_se = total.mean_stderr()
    _check_finite_offpolicy([obj], "offpolicy_objective")
    return float(obj), float(obj_se)
