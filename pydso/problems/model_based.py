r"""Model-based improvement from a log: identify the plant, optimise the policy on the model, check against the log.

:func:`model_based_improve` is one pipeline of three existing pieces:

1. **identify** the plant :math:`x_{t+1} = f(x_t, u_t, \varphi)` from the logged transitions with
   :func:`pydso.problems.sysid.fit` and the one-step prediction loss (the logged states are the measured outputs;
   the inputs are the dataset's ``input`` or, if it has none, :math:`u_t = \pi(x_t, \theta_b)` recomputed with the
   behaviour parameters);
2. **optimise** the policy by DSO on the identified closed loop ``make_problem(params)`` with
   :func:`pydso.minimize` (any method: the pathwise gradient by default) from :math:`\theta_b`;
3. **check** the result against the log with importance weights: the per-decision weights of the logged
   transitions under the *identified* chain at :math:`\hat\theta` relative to the recorded behaviour density, the
   per-episode ESS, and a high-confidence lower bound on :math:`J(\theta_b) - J(\hat\theta)`
   (:class:`~pydso.optimize.BootstrapBound`, weighted importance sampling). Model error shows up here: the check
   uses only logged transitions, so an optimiser that exploits a wrong model is not certified.

Identifiability: data logged in closed loop under a *linear* feedback :math:`u = -Kx` without input excitation
identify only :math:`A - BK` of a linear plant; fix what is known (``fit_options={"fixed": ["B"]}``) or log with
exploration. The fit's intervals (``fit.ci_low`` / ``fit.ci_high``) are infinite for non-identifiable parameters.
With process noise, sysid's residual whiteness test (run on free-run simulation residuals) fails and warns
(:class:`~pydso.problems.sysid.SysIdWarning`); the one-step estimate is still consistent, its intervals then come
from the AR sandwich covariance.

When not to use it: plants outside the model class (the check will say so, but the optimum is then the model's);
logs whose inputs cannot be recomputed (no ``input`` and an unknown behaviour policy).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ProblemError
from .._typing import PyTree
from ..estimators import as_batch, is_dataset
from ..optimize import (
    AbstractImprovementBound,
    BootstrapBound,
    ESSBudget,
    OptimizeResult,
    episode_terms,
    minimize,
)
from .sysid import fit as sysid_fit

__all__ = ["ModelBasedResult", "model_based_improve"]


@dataclasses.dataclass(frozen=True)
class ModelBasedResult:
    r"""The result of :func:`model_based_improve`.

    **Attributes:**

    - ``theta``: the policy parameters optimised on the identified model.
    - ``fit``: the system-identification result (``SysIdResult``: ``params``, ``estimate``, ``ci_low`` /
      ``ci_high``, ``rmse``, ``fit_percent``, ...).
    - ``problem``: the identified closed loop ``make_problem(fit.params)``.
    - ``optimization``: the :class:`~pydso.OptimizeResult` of the DSO run on the model.
    - ``model_objective``: ``(J_model(theta_b), J_model(theta))`` estimated on fresh model rollouts.
    - ``check``: the off-policy check against the log: ``lower_bound`` and ``estimate`` of
      :math:`J(\theta_b) - J(\hat\theta)`, ``ess`` (per-episode ESS of the log at ``theta`` under the model),
      ``ess_behaviour`` (the same at ``theta_b``: below ``n`` when the model's density differs from the logged
      one), ``n``, ``ess_floor``, ``certified`` (lower bound > 0 *and* ``ess >= ess_floor``: a bound carried by a
      handful of episodes is not trusted) and ``confidence``.
    """

    theta: PyTree
    fit: Any
    problem: Any
    optimization: OptimizeResult
    model_objective: tuple[float, float]
    check: dict


def _ess(W_end) -> float:
    w = np.asarray(W_end)
    return float(w.sum() ** 2 / max(float((w**2).sum()), 1e-300))


def model_based_improve(
    log,
    theta_b: PyTree,
    *,
    key: jax.Array,
    model,
    make_problem: Callable[[PyTree], Any],
    policy_input: Callable[[jax.Array, PyTree], jax.Array] | None = None,
    steps: int = 100,
    method=None,
    eval_episodes: int = 1000,
    bound: AbstractImprovementBound | None = None,
    confidence: float = 0.95,
    fit_options: dict | None = None,
    budget: ESSBudget | None = None,
) -> ModelBasedResult:
    r"""Identify the plant from ``log``, optimise the policy on the model from ``theta_b``, check it on the log
    (module docstring).

    **Arguments:**

    - ``log``: a pydso dataset (``xarray.Dataset``, e.g. ``pydso.data.to_dataset`` of a rollout, or a store opened
      with :func:`pydso.data.open`) with ``state`` and ``behavior_logp`` (and ``input`` if recorded); complete,
      equal-length episodes.
    - ``theta_b``: the behaviour policy's parameters (the start of the optimisation and the reference of the check).
    - ``key``: PRNG key (the DSO run and the bootstrap).
    - ``model``: a :class:`pydso.problems.sysid.DiscreteModel` of the plant, :math:`x_{t+1} = f(x_t, u_t,
      \varphi)`, whose output is the full state (``h=None``).
    - ``make_problem``: ``params -> pydso.Problem``, the closed loop on the plant with physical parameters
      ``params`` under the policy parameters ``theta`` (its system needs a transition density for the check).
    - ``policy_input``: ``(x, theta) -> u``, the policy, used to recompute the inputs when ``log`` has no ``input``.
    - ``steps``, ``method``: the :func:`pydso.minimize` run on the model (default method ``pydso.Gradient()``).
    - ``eval_episodes``: model rollouts for ``model_objective``.
    - ``bound``, ``confidence``: the lower bound of the check (default :class:`~pydso.optimize.BootstrapBound`).
    - ``fit_options``: further keywords of :func:`pydso.problems.sysid.fit` (e.g. ``max_steps``).
    - ``budget``: the ESS floor of the check, :meth:`~pydso.optimize.ESSBudget.threshold` of the ``n`` logged
      episodes (default ``ESSBudget()``: max(10, 0.1 n)). The bootstrap bound is unreliable when a few episodes carry
      the weight, so below the floor the result is not certified whatever the bound says.

    **Returns:** a :class:`ModelBasedResult`.
    """
    if not is_dataset(log):
        raise ProblemError(
            f"log must be a pydso dataset (xarray.Dataset; pydso.data.to_dataset(rollout, problem, theta) makes one "
            f"from Trajectories), got {type(log).__name__}"
        )
    if "behavior_logp" not in log.data_vars:
        raise ProblemError("log has no 'behavior_logp': the off-policy check needs the logged transition densities")
    if not callable(make_problem):
        raise ProblemError("make_problem must be a function params -> pydso.Problem")
    state = np.asarray(log["state"].values, float)
    if "input" in log.data_vars:
        ds = log
    else:
        if policy_input is None:
            raise ProblemError(
                "log has no 'input' variable: pass policy_input=(x, theta) -> u so the behaviour's inputs can be "
                "recomputed from the logged states"
            )
        u = jax.vmap(jax.vmap(lambda x: jnp.atleast_1d(policy_input(x, theta_b))))(jnp.asarray(state))
        ds = log.assign(input=(("episode", "time", "input_dim"), np.asarray(u, float)))
    ds = ds.assign(output=(("episode", "time", "output_dim"), state))
    fit = sysid_fit(model, ds, loss="prediction", **(fit_options or {}))
    problem = make_problem(fit.params)
    if not problem.system.has_log_prob:
        raise ProblemError("make_problem(params) must return a problem with a transition density (for the check)")
    k_opt, k_eval, k_bound = jax.random.split(key, 3)
    if method is None:
        from ..optimize import Gradient

        method = Gradient()
    opt = minimize(problem, theta_b, key=k_opt, steps=steps, method=method, progress=False)
    theta = opt.theta

    def j_model(th):
        from ..engine import rollout

        return float(jnp.mean(rollout(problem, th, key=k_eval, n=eval_episodes).objective))

    batch = as_batch(log, problem)
    bound = BootstrapBound() if bound is None else bound
    ref, new = episode_terms(problem, theta_b, batch), episode_terms(problem, theta, batch)
    lower, estimate = bound.lower(ref, new, 1.0 - confidence, key=k_bound)
    ess, floor = _ess(new[2]), (ESSBudget() if budget is None else budget).threshold(batch.n_episodes)
    check = {
        "lower_bound": lower,
        "estimate": estimate,
        "ess": ess,
        "ess_behaviour": _ess(ref[2]),
        "n": batch.n_episodes,
        "ess_floor": floor,
        "certified": bool(lower > 0 and ess >= floor),
        "confidence": confidence,
    }
    return ModelBasedResult(theta, fit, problem, opt, (j_model(theta_b), j_model(theta)), check)
