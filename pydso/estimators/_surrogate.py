r"""The proximal surrogate of a chain: the TRPO/PPO analog's objective (DESIGN.md §1.6).

Around the current parameters :math:`\theta_k` the surrogate

.. math:: S(\theta; \theta_k) = E_{\rho_k}\Big[L(x, \theta) + \gamma\, E_{P_k}\big[r\, V_k(x')\big]\Big],
          \qquad r = \frac{P(x' \mid x, \theta)}{P(x' \mid x, \theta_k)},

agrees with :math:`J` to first order at :math:`\theta_k` (:math:`\nabla_\theta r = r\,\nabla\log P`, so
:math:`\nabla S(\theta_k) = E_{\rho_k}[\nabla L + \gamma E_{P_k}[s V_k]] = \nabla J(\theta_k)`; Kakade & Langford
2002; Schulman et al. 2015, *Trust region policy optimization*). :func:`tabular_surrogate` computes it exactly on a
finite chain. From logged episodes it is estimated in its **rollout form** (:func:`surrogate`, per episode,
averaged over episodes)

.. math:: \hat S(\theta) = \sum_t \Big[w_t W_t\, L(x_t, \theta) + c_t\, r_t(\theta)\Big]
          + w_{end} W_{end}\,\Phi(x_{end},\theta),

where :math:`W_t` are the per-decision weights of the behaviour data relative to :math:`\theta_k`
(all 1 when the data were logged at :math:`\theta_k`), and the "advantage weights" :math:`c_t` are either

* ``advantage="returns"``: :math:`c_t = C^W_{t+1} - W_{t+1} b_t` (IS cost-to-go minus a baseline object), so that
  :math:`\nabla\hat S(\theta_k)` *is* the per-decision IS score gradient
  (:func:`~pydso.estimators.offpolicy_gradient`);
* ``advantage="td"``: :math:`c_t = w_t W_{t+1}\,(L_t + \gamma V_k(x_{t+1}) - V_k(x_t))` with a fitted
  :math:`V_k` (the DESIGN form with baseline :math:`b = (V_k - L)/\gamma`, an actor-critic surrogate).

Ratios: ``ratio="one_step"`` (above; first-order accurate, bounded variance: the TRPO/PPO choice) or
``ratio="per_decision"``: :math:`\hat S(\theta) = \sum_t w_t W_t R_t(\theta) L(x_t,\theta) + \ldots` with the
cumulative ratio :math:`R_t = \prod_{j<t} r_j`, an unbiased estimate of :math:`J(\theta)` itself for every
:math:`\theta` (Precup et al. 2000) but with variance growing with the horizon and the step.

Variants (Schulman et al. 2017, *Proximal policy optimization algorithms*): ``variant="clip"`` replaces
:math:`c_t r_t` by the *pessimistic* :math:`\max(c_t r_t,\ c_t\,\mathrm{clip}(r_t, 1-\epsilon, 1+\epsilon))` —
**max**, not PPO's min, because we minimise cost; ``variant="kl"`` adds
:math:`\beta \sum_t w_t W_{t+1}\,[(r_t - 1) - \log r_t]`, a non-negative sample estimate of the
:math:`\rho_k`-weighted :math:`\mathrm{KL}(P_k \,\|\, P_\theta)`; ``variant="plain"`` uses neither.
:class:`pydso.optimize.Proximal` minimises :math:`\hat S` by minibatch epochs.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import ProblemError
from .._typing import PyTree
from ..systems import Problem
from ._baselines import AbstractBaseline, MeanBaseline, check_baseline
from ._logged import LoggedBatch, absorbed, step_costs, terminal_costs, transition_log_probs
from ._score import score_advantages
from ._values import discount
from ._weights import log_ratios, weighted_returns

__all__ = ["SurrogateData", "prepare", "surrogate", "tabular_surrogate"]

_MEAN_BASELINE = MeanBaseline()  # the default baseline (one immutable instance)


class SurrogateData(eqx.Module):
    r"""A logged batch with the quantities of :math:`\hat S(\cdot;\theta_k)` frozen at :math:`\theta_k`
    (every array has a leading episode axis except ``batch.step_weights``).

    **Attributes:**

    - ``batch``: the :class:`~pydso.estimators.LoggedBatch`.
    - ``state_weight``: :math:`w_t W_t`, ``(n, H)``.
    - ``adv_weight``: :math:`c_t`, ``(n, H)``.
    - ``logp_old``: :math:`\log P(x_{t+1} \mid x_t, \theta_k)`, ``(n, H)``.
    - ``kl_weight``: :math:`w_t W_{t+1}`, ``(n, H)``.
    - ``end_weight``: :math:`w_{end} W_{end}`, ``(n,)``.
    - ``behavior_weight``: :math:`W_t`, ``(n, H+1)``.
    - ``objective``: the per-episode IS estimate of :math:`J(\theta_k)`, ``(n,)``.
    """

    batch: LoggedBatch
    state_weight: jax.Array
    adv_weight: jax.Array
    logp_old: jax.Array
    kl_weight: jax.Array
    end_weight: jax.Array
    behavior_weight: jax.Array
    objective: jax.Array


def prepare(
    problem: Problem,
    theta_k: PyTree,
    batch: LoggedBatch,
    *,
    advantage: str = "returns",
    baseline: AbstractBaseline = _MEAN_BASELINE,
    value_fn: Callable | None = None,
    weight_clip: float | None = None,
    gamma: float | None = None,
) -> SurrogateData:
    r"""Freeze the surrogate's weights at ``theta_k`` for a batch (traceable).

    **Arguments:**

    - ``problem``, ``theta_k``: the chain and the parameters at which the surrogate is built.
    - ``batch``: logged episodes (any behaviour; :math:`W` reweights them to ``theta_k``).
    - ``advantage``: ``"returns"`` (with ``baseline``) or ``"td"`` (with ``value_fn``), module docstring.
    - ``baseline``: a baseline object (``advantage="returns"``).
    - ``value_fn``: the critic :math:`V_k(x, \theta)` (``advantage="td"``).
    - ``weight_clip``: truncation of the behaviour weights :math:`W`.
    - ``gamma``: discount of the TD advantages (default: the problem's).

    **Returns:** a :class:`SurrogateData`.
    """
    returns = weighted_returns(problem, theta_k, batch, log_ratios(problem, theta_k, batch), weight_clip=weight_clip)
    W = returns.weights
    w = batch.step_weights
    if advantage == "returns":
        c = score_advantages(problem, theta_k, batch, returns, check_baseline(baseline))
    elif advantage == "td":
        if value_fn is None:
            raise ProblemError("advantage='td' needs a fitted value function value_fn(x, theta) (V_k)")
        g = discount(problem, gamma)
        v = jax.vmap(jax.vmap(lambda x: value_fn(x, theta_k)))(batch.states)
        if problem.terminal_cost is not None:
            t1 = jnp.arange(1, batch.states.shape[1], dtype=jnp.result_type(float)) * problem.system.time_step
            phi = jax.vmap(jax.vmap(problem.final_cost, in_axes=(0, 0, None)), in_axes=(None, 0, None))(
                t1, batch.states[:, 1:], theta_k
            )
        else:
            phi = jnp.zeros_like(returns.costs)
        v_next = jnp.where(absorbed(problem, batch), phi, v[:, 1:])
        delta = returns.costs + g * v_next - v[:, :-1]
        c = w * W[:, 1:] * delta
    else:
        raise ProblemError(f"advantage must be 'returns' or 'td', got {advantage!r}")
    sg = jax.lax.stop_gradient
    return SurrogateData(
        batch,
        sg(jnp.where(batch.valid, w * W[:, :-1], 0.0)),
        sg(jnp.where(batch.valid, c, 0.0)),
        sg(transition_log_probs(problem, theta_k, batch)),
        sg(jnp.where(batch.valid, w * W[:, 1:], 0.0)),
        sg(batch.terminal_weights * returns.end_weights),
        sg(W),
        sg(returns.objective),
    )


def surrogate(
    problem: Problem,
    theta: PyTree,
    data: SurrogateData,
    *,
    variant: str = "clip",
    clip_eps: float = 0.2,
    kl_coef: float = 1.0,
    ratio: str = "one_step",
) -> jax.Array:
    r"""The rollout-form surrogate :math:`\hat S(\theta;\theta_k)`, mean over the episodes of ``data``
    (module docstring). Its gradient at :math:`\theta_k` is the off-policy score gradient.

    **Arguments:**

    - ``problem``, ``theta``: the chain and the candidate parameters.
    - ``data``: :func:`prepare`'s output at :math:`\theta_k`.
    - ``variant``: ``"clip"``, ``"kl"`` or ``"plain"``; ``clip_eps`` :math:`\epsilon`; ``kl_coef`` :math:`\beta`.
    - ``ratio``: ``"one_step"`` or ``"per_decision"``.

    **Returns:** a scalar, differentiable in ``theta``.
    """
    batch = data.batch
    n = batch.n_episodes
    logr = jnp.where(batch.valid, transition_log_probs(problem, theta, batch) - data.logp_old, 0.0)
    r = jnp.exp(logr)
    costs = step_costs(problem, theta, batch)
    terminal = terminal_costs(problem, theta, batch)  # w_end * Phi
    end_factor = data.end_weight / jnp.where(batch.terminal_weights != 0, batch.terminal_weights, 1.0)
    if ratio == "one_step":
        adv = data.adv_weight * r
        if variant == "clip":
            adv = jnp.maximum(adv, data.adv_weight * jnp.clip(r, 1.0 - clip_eps, 1.0 + clip_eps))
        out = jnp.sum(data.state_weight * costs) + jnp.sum(adv) + jnp.sum(terminal * end_factor)
    elif ratio == "per_decision":
        if variant == "clip":
            raise ProblemError("variant='clip' is defined for ratio='one_step' only; use 'kl' or 'plain'")
        R = jnp.exp(jnp.concatenate([jnp.zeros((n, 1)), jnp.cumsum(logr, axis=1)], axis=1))
        R_end = jax.vmap(lambda a, e: a[e])(R, batch.end_index)
        out = jnp.sum(data.state_weight * R[:, :-1] * costs) + jnp.sum(terminal * R_end * end_factor)
    else:
        raise ProblemError(f"ratio must be 'one_step' or 'per_decision', got {ratio!r}")
    if variant == "kl":
        out = out + kl_coef * jnp.sum(data.kl_weight * ((r - 1.0) - logr))
    elif variant not in ("clip", "plain"):
        raise ProblemError(f"variant must be 'clip', 'kl' or 'plain', got {variant!r}")
    return out / n


def tabular_surrogate(problem: Problem, theta: PyTree, theta_k: PyTree) -> jax.Array:
    r"""The surrogate with exact expectations on a finite chain (a reference for tests and teaching):
    :math:`S(\theta;\theta_k) = \sum_x \rho_k(x)\,[L(x,\theta) + \gamma\sum_{x'} P_k(x'|x)\, r(x,x')\, V_k(x')]`,
    with :math:`\rho_k, P_k, V_k` from :mod:`pydso.exact` at ``theta_k``. :math:`\nabla S(\theta_k) =
    \nabla J(\theta_k)`. Needs a :class:`~pydso.TabularChain` with an :class:`~pydso.Episodic` setting."""
    from .. import exact

    P_k, _, _ = exact.chain(problem, theta_k)
    rho = exact.occupancy(problem, theta_k)
    V = exact.value(problem, theta_k)
    gamma = discount(problem)
    P = jnp.asarray(problem.system.matrix(0.0, theta))
    S = P.shape[0]
    L = jax.vmap(lambda x: problem.running_cost(0.0, x, theta))(jnp.arange(S))
    r = jnp.where(P_k > 0, P / jnp.where(P_k > 0, P_k, 1.0), 0.0)
    return rho @ (L + gamma * jnp.einsum("xy,xy,y->x", P_k, r, V))
