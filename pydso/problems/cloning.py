r"""Behavioural cloning as a DSO problem: :func:`cloning` returns a :class:`CloningProblem`.

The learner :math:`\pi_\theta` closes the loop of the plant, :math:`x_{t+1} = f(x_t, \pi_\theta(x_t)) + w_t`, and the
step cost is the imitation residual *on the states the learner visits*:

.. math::

    J(\theta) = \mathbb E\Big[\sum_t w_t\,\tfrac12\|r(x_t, \theta)\|^2\Big],\qquad
    r(x, \theta) = (\pi_\theta(x) - \pi_E(x)) / s

with the setting's weights :math:`w_t` and action scales :math:`s`. Because the expectation is over the learner's
own closed loop, the gradient of :math:`J` accounts for where the learner's mistakes take it (the compounding
errors that open-loop regression on the expert's states ignores: Ross and Bagnell 2010, Ross et al. 2011 —
DAgger corrects them by re-labelling visited states; here the re-labelled loss is simply optimised as a DSO
problem). In the realisable case (:math:`\pi_E = \pi_{\theta_E}`) :math:`J \ge 0` vanishes at :math:`\theta_E`, so
:math:`\theta_E` is a minimiser whatever the visited distribution.

Two kinds of expert:

* **a policy** ``expert(x) -> u``: queried at every visited state (the loss above);
* **a demonstration dataset** (a :mod:`pydso.data` dataset or store with ``state`` and ``input``): the expert
  cannot be queried off its own states, so the loss is *tracking of the demonstrations*: episode :math:`i` of the
  learner starts at demonstration :math:`i`'s first state and pays, at step :math:`t`,
  :math:`\tfrac12\|(\pi_\theta(x_t) - u^E_{i,t})/s\|^2 + \tfrac12\lambda\|(x_t - x^E_{i,t})/\sigma\|^2` (state
  weight :math:`\lambda`, state scales :math:`\sigma`). It vanishes at the expert for a deterministic plant and
  penalises the learner's drift away from the demonstrated path. **Limitations:** the plant must be deterministic
  (``noise=0``: a noisy plant cannot reproduce a demonstration's noise realisation, so the loss would have a floor
  and a bias), the horizon is at most the demonstrations' length, and the learner is only trained near the
  demonstrated paths (it cannot learn what the expert would do elsewhere). The state of this problem is augmented
  to :math:`(x, t, i)` (step index and demonstration index); the policy sees :math:`x` only.

Solve with the package's methods only: ``pydso.minimize(p.problem, p.theta0, key=key, method=pydso.Gradient(...))``
(pathwise, or :class:`pydso.Score` / :class:`pydso.NaturalGradient` on a noisy plant), or — the imitation loss
being a sum of squares — Gauss–Newton / Levenberg–Marquardt on the residuals over a fixed set of episode keys
(:meth:`CloningProblem.least_squares`, a sample-average approximation of :math:`J`). The second-order methods
converge in a handful of steps where Adam stalls (an LQR gain to machine precision takes Gauss–Newton 9 steps;
Adam reaches 0.16 relative error in 1,000; :meth:`CloningProblem.fit` is that Gauss–Newton solve as one compiled
loop). On chaotic plants (the pendulum swing-up) use short discounted horizons from a wide start distribution
(20 steps, :math:`\gamma = 0.9`), as for policy optimisation (DESIGN.md §3). The baseline, open-loop regression
on the expert's data, is :func:`regression` (a one-step DSO problem).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_key, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..data import DatasetError, episode_lengths
from ..data import open as open_store
from ..engine import episode_keys, rollout, rollout_chunk
from ..optimize import AbstractLeastSquares, GaussNewton, LeastSquaresSolution, solve_least_squares
from ..systems import AbstractInitial, DeterministicMap, Empirical, Episodic, GaussianChain, Problem
from ._contract import AbstractConstructedProblem
from .control import split_policy

__all__ = [
    "cloning",
    "CloningProblem",
    "CloningResult",
    "ImitationLeastSquares",
    "regression",
    "demonstrations",
]


def demonstrations(expert, *, name: str = "expert") -> tuple[np.ndarray, np.ndarray]:
    """``(states (E, T, d), actions (E, T-1, m))`` of a demonstration dataset: an ``xarray.Dataset`` in the
    :mod:`pydso.data` schema or the path of a pydso store, with variables ``state`` and ``input`` (``input[:, t]``
    is the expert's action at ``state[:, t]``). Ragged episodes are cut to the shortest one."""
    import xarray as xr

    if isinstance(expert, str | os.PathLike):
        try:
            expert = open_store(expert, chunks=None)
        except DatasetError as e:
            raise DatasetError(f"{name}: cannot open the demonstration store: {e}") from e
    if not isinstance(expert, xr.Dataset):
        raise ProblemError(f"{name} must be a policy (callable), an xarray Dataset or a pydso store path")
    for var in ("state", "input"):
        if var not in expert:
            raise DatasetError(
                f"{name}: the demonstration dataset has no {var!r} variable; behavioural cloning needs the expert's "
                "states ('state') and actions ('input', input[:, t] taken at state[:, t])"
            )
    length = int(np.min(episode_lengths(expert)))
    if length < 2:
        raise DatasetError(f"{name}: every demonstration needs at least 2 recorded states, the shortest has {length}")
    states = np.asarray(expert["state"].values[:, :length], dtype=float)
    actions = np.asarray(expert["input"].values[:, : length - 1], dtype=float)
    if not (np.all(np.isfinite(states)) and np.all(np.isfinite(actions))):
        raise DatasetError(f"{name}: the demonstrations contain non-finite states or actions")
    return states, actions


def _check_scale(value, size: int, name: str) -> jax.Array:
    a = np.asarray(value, dtype=float)
    try:
        a = np.broadcast_to(a, (size,))
    except ValueError:
        raise ProblemError(
            f"{name} must be a positive scalar or an array of size {size}, got shape {a.shape}"
        ) from None
    if not (np.all(np.isfinite(a)) and np.all(a > 0)):
        raise ProblemError(f"{name} must be positive and finite, got {value!r}")
    return jnp.asarray(a)


def _flat(u):
    return jnp.reshape(u, (-1,))


@dataclasses.dataclass(frozen=True)
class CloningResult:
    """The report of :meth:`CloningProblem.result`.

    **Attributes:** ``imitation_loss`` (the objective :math:`J` on ``n`` fresh closed-loop episodes of the learner)
    and its standard error ``imitation_stderr``; ``rms_action_error`` (root mean square of the scaled action residual
    over the visited states); ``mode`` (``"policy"``, ``"data"`` or ``"regression"``); ``info`` (how theta was
    obtained)."""

    imitation_loss: float
    imitation_stderr: float
    rms_action_error: float
    mode: str
    info: dict


class CloningProblem(AbstractConstructedProblem):
    r"""Behavioural cloning as a DSO problem (module docstring), built by :func:`cloning`.

    **Attributes:** ``closed_loop`` (also ``problem``: the :class:`pydso.Problem` under the learner), ``theta0``
    and ``static`` (the learner split into its arrays and the rest), ``mode``, ``residual_fn`` (the per-step
    residual ``r(x, theta)``, 1-D; the step cost is :math:`\tfrac12\|r\|^2`), ``action_fn`` (the scaled action
    residual only).
    """

    closed_loop: Problem
    theta0: PyTree
    static: PyTree
    residual_fn: Callable = eqx.field(static=True)
    action_fn: Callable = eqx.field(static=True)
    mode: str = eqx.field(static=True)

    @property
    def problem(self) -> Problem:
        return self.closed_loop

    def policy(self, theta: PyTree):
        """The learner with parameters ``theta``."""
        return eqx.combine(theta, self.static)

    def least_squares(self, *, key: jax.Array, n: int = 32) -> ImitationLeastSquares:
        r"""The imitation objective over ``n`` fixed episode keys as a least-squares problem
        :math:`\tfrac12\|R(\theta)\|^2 = \frac1n\sum_{i,t} w_t \tfrac12\|r(x^i_t(\theta),\theta)\|^2` (the sample
        average of :math:`J` with common random numbers: same starts, same noise), for
        :class:`pydso.GaussNewton` / :class:`pydso.LevenbergMarquardt`. The states :math:`x^i_t(\theta)` are
        re-simulated under :math:`\theta` at every evaluation: the loss stays on the learner's visited states."""
        keys = episode_keys(check_key(key), check_positive_int(n, "n"))
        return ImitationLeastSquares(self, keys)

    def fit(self, *, key: jax.Array, n: int = 32, method=None, max_steps: int = 50) -> LeastSquaresSolution:
        r"""Shortcut: :func:`pydso.optimize.solve_least_squares` on :meth:`least_squares` ``(key=key, n=n)`` from
        ``theta0`` with ``method`` (default :class:`pydso.GaussNewton`; ``pydso.LevenbergMarquardt(scale=False)``
        is the safer choice far from the expert), the same steps as ``pydso.minimize(p.least_squares(...),
        p.theta0, method=...)`` compiled as one loop. For few parameters (linear gains, small networks): the
        Jacobian is dense, :math:`(n H m) \times p`."""
        return solve_least_squares(
            self.least_squares(key=key, n=n),
            self.theta0,
            method=GaussNewton() if method is None else method,
            max_steps=check_positive_int(max_steps, "max_steps"),
        )

    def result(self, theta: PyTree, *, key: jax.Array | None = None, n: int = 256, **info) -> CloningResult:
        """The imitation loss of the learner ``theta`` on ``n`` fresh closed-loop episodes (key default
        ``jax.random.key(1)``) and the RMS scaled action error on the visited states."""
        key = jax.random.key(1) if key is None else check_key(key)
        traj = rollout(self.closed_loop, theta, key=key, n=check_positive_int(n, "n"))
        per_episode = np.asarray(traj.costs @ traj.step_weights)
        states = traj.states[:, :-1].reshape((-1,) + traj.states.shape[2:])
        action_err = np.asarray(jax.vmap(self.action_fn, in_axes=(0, None))(states, theta))
        return CloningResult(
            float(per_episode.mean()),
            float(per_episode.std(ddof=1) / np.sqrt(len(per_episode))) if len(per_episode) > 1 else 0.0,
            float(np.sqrt(np.mean(action_err**2))),
            self.mode,
            dict(info),
        )


class ImitationLeastSquares(AbstractLeastSquares):
    r"""The imitation objective of a :class:`CloningProblem` on fixed episode keys as least squares (see
    :meth:`CloningProblem.least_squares`): residuals :math:`\sqrt{w_t/n}\,r(x^i_t(\theta), \theta)` stacked over
    episodes :math:`i` and steps :math:`t`."""

    cloning: CloningProblem
    keys: jax.Array

    @property
    def name(self) -> str:
        return self.cloning.closed_loop.name + " (least squares)"

    def residuals(self, theta: PyTree) -> jax.Array:
        traj = rollout_chunk(self.cloning.closed_loop, theta, self.keys)
        n, horizon = traj.costs.shape
        states = traj.states[:, :horizon]
        r = jax.vmap(jax.vmap(self.cloning.residual_fn, in_axes=(0, None)), in_axes=(0, None))(states, theta)
        w = jnp.sqrt(traj.step_weights / n).astype(r.dtype)
        return (r * w[None, :, None]).reshape(-1)


def regression(expert, policy, *, action_scale=1.0, name: str = "open-loop regression") -> CloningProblem:
    r"""Open-loop regression of ``policy`` on the demonstrations ``expert`` (dataset or store path, see
    :func:`demonstrations`): the classical behavioural-cloning baseline, as a DSO problem without dynamics.

    The state is a recorded pair :math:`(x^E_k, u^E_k)` drawn uniformly (:class:`pydso.Empirical`), the horizon is
    one step and the cost :math:`\tfrac12\|(\pi_\theta(x^E_k) - u^E_k)/s\|^2`: :math:`J(\theta)` is the mean
    squared regression error over the data, and ``pydso.minimize(p.problem, p.theta0, key=key,
    method=pydso.Gradient(optax.adam(...), n=minibatch))`` is minibatch regression. It fits the expert on the
    expert's own states only, so a learner that errs drifts to states never demonstrated (compounding errors):
    the comparison :func:`cloning` is for. **Returns:** a :class:`CloningProblem` with ``mode="regression"``.
    """
    states, actions = demonstrations(expert)
    theta0, static = _learner(policy)
    d, m = states.shape[-1], actions.shape[-1]
    _check_dims(static, theta0, d, m)
    s = _check_scale(action_scale, m, "action_scale")
    pairs = np.concatenate([states[:, :-1].reshape(-1, d), actions.reshape(-1, m)], axis=1)

    def action_fn(z, theta):
        return (_flat(eqx.combine(theta, static)(z[:d])) - z[d:]) / s

    def cost(z, theta):
        return 0.5 * jnp.sum(action_fn(z, theta) ** 2)

    problem = Problem(DeterministicMap(lambda z, theta: z), cost, Episodic(1.0, 1), Empirical(pairs), name=name)
    problem.check_theta(theta0)
    return CloningProblem(
        closed_loop=problem, theta0=theta0, static=static, residual_fn=action_fn, action_fn=action_fn, mode="regression"
    )


def _learner(policy):
    if not callable(policy):
        raise ProblemError(f"policy must be a callable policy module (policy(x) -> u), got {type(policy).__name__}")
    theta0, static = split_policy(policy)
    if not jax.tree.leaves(theta0):
        raise ProblemError(
            "policy has no floating-point array parameters to learn; pass an equinox module such as "
            "pydso.problems.control.MLPPolicy or LinearPolicy"
        )
    return theta0, static


def _action_size(fn, d: int, what: str) -> int:
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((d,), jnp.result_type(float)))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ProblemError(f"{what} cannot be evaluated on a state of shape ({d},): {type(e).__name__}: {e}") from e
    if not hasattr(out, "shape") or len(out.shape) > 1:
        raise ProblemError(f"{what} must return a scalar or a 1-D action, got {getattr(out, 'shape', type(out))}")
    return int(np.prod(out.shape, dtype=int))


def _check_dims(static, theta0, d: int, m: int | None) -> int:
    size = _action_size(eqx.combine(theta0, static), d, "policy")
    if m is not None and size != m:
        raise ProblemError(
            f"expert: the demonstrations have {m} action component(s) (input_dim) but the policy returns {size}; "
            "give a policy with the expert's action size"
        )
    return size


def cloning(
    *,
    expert,
    policy,
    plant: Callable,
    initial: AbstractInitial | None = None,
    horizon: int | None = None,
    gamma: float = 1.0,
    noise=0.0,
    action_scale=1.0,
    state_weight: float = 1.0,
    state_scale=1.0,
    name: str = "behavioural cloning",
) -> CloningProblem:
    r"""Behavioural cloning of ``expert`` by the learner ``policy`` on the closed loop of ``plant`` (module
    docstring).

    **Arguments:**

    - `expert`: a policy ``expert(x) -> u`` (a pure JAX function or module), or demonstrations: an
      ``xarray.Dataset`` in the :mod:`pydso.data` schema or a pydso store path, with ``state`` ``(E, T, d)`` and
      ``input`` ``(E, T, m)``.
    - `policy`: the learner, an equinox module ``policy(x) -> u`` (e.g.
      :class:`pydso.problems.control.MLPPolicy`, :class:`~pydso.problems.control.LinearPolicy`); ``theta`` is its
      floating-point arrays.
    - `plant`: the discrete-time plant ``plant(x, u) -> x_next`` (its mean, for a noisy plant).
    - `initial`: the initial distribution of the learner's episodes (required with a policy expert; with
      demonstrations: their first states, one episode per demonstration drawn uniformly).
    - `horizon`, `gamma`: the episodes' length and discount (``Episodic(gamma, horizon)``); with demonstrations the
      horizon defaults to (and may not exceed) their number of steps.
    - `noise`: process noise standard deviation (scalar or per state component): ``x' = plant(x, u) + noise *
      eps`` (a :class:`pydso.GaussianChain`); 0 (default) gives a :class:`pydso.DeterministicMap`. Must be 0 with
      demonstrations.
    - `action_scale`: scales :math:`s` of the action residual (scalar or per component).
    - `state_weight`, `state_scale`: :math:`\lambda` and :math:`\sigma` of the state-tracking term (demonstrations
      only).

    **Returns:** a :class:`CloningProblem`. Raises :class:`pydso.ProblemError` (or :class:`pydso.DatasetError`)
    naming the argument: wrong data dimensions against the policy, missing ``initial`` or ``horizon``, noise with
    demonstrations, a horizon longer than the demonstrations.

    When not to use it: when a task cost is available, optimise it directly (policy optimisation); cloning can
    only be as good as the expert.
    """
    if not callable(plant):
        raise ProblemError(f"plant must be a callable plant(x, u) -> x_next, got {type(plant).__name__}")
    theta0, static = _learner(policy)
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not (0.0 < gamma <= 1.0):
        raise ProblemError(f"gamma must lie in (0, 1], got {gamma!r}")
    if not (isinstance(state_weight, int | float) and np.isfinite(state_weight) and state_weight >= 0):
        raise ProblemError(f"state_weight must be a non-negative number, got {state_weight!r}")
    noise_arr = np.asarray(noise, dtype=float)
    if not (np.all(np.isfinite(noise_arr)) and np.all(noise_arr >= 0)):
        raise ProblemError(f"noise must be a non-negative standard deviation (scalar or per component), got {noise!r}")

    def learner(x, theta):
        return _flat(eqx.combine(theta, static)(x))

    if callable(expert) and not isinstance(expert, str | os.PathLike):
        if initial is None or not isinstance(initial, AbstractInitial):
            raise ProblemError(
                "initial must be a pydso initial distribution (pydso.Uniform(...), pydso.Normal(...), ...) of the "
                "learner's episodes when the expert is a policy"
            )
        if horizon is None:
            raise ProblemError("horizon is required when the expert is a policy: pass horizon=number_of_steps")
        d = int(np.prod(jax.eval_shape(initial.sample, jax.random.key(0)).shape, dtype=int))
        m = _check_dims(static, theta0, d, None)
        m_expert = _action_size(expert, d, "expert")
        if m_expert != m:
            raise ProblemError(
                f"expert returns {m_expert} action component(s) but the policy returns {m}; they must agree"
            )
        s = _check_scale(action_scale, m, "action_scale")

        def action_fn(x, theta):
            return (learner(x, theta) - _flat(expert(x))) / s

        residual_fn = action_fn

        def mean(x, theta):
            return plant(x, eqx.combine(theta, static)(x))

        if np.any(noise_arr > 0):
            system = GaussianChain(mean, jnp.asarray(np.broadcast_to(noise_arr, (d,)) if noise_arr.ndim else noise))
        else:
            system = DeterministicMap(mean)
        mode = "policy"
    else:
        states, actions = demonstrations(expert)
        n_demo, length, d = states.shape
        m = actions.shape[-1]
        _check_dims(static, theta0, d, m)
        if np.any(noise_arr > 0):
            raise ProblemError(
                "noise must be 0 when the expert is given as demonstrations: a noisy plant cannot reproduce a "
                "demonstration's noise, so tracking it would be biased (give the expert as a policy instead)"
            )
        steps = length - 1
        horizon = steps if horizon is None else check_positive_int(horizon, "horizon")
        if horizon > steps:
            raise ProblemError(f"horizon={horizon} exceeds the demonstrations' {steps} steps; pass horizon <= {steps}")
        if initial is not None:
            raise ProblemError(
                "initial must be None with demonstrations: each episode starts at a demonstration's first state"
            )
        s = _check_scale(action_scale, m, "action_scale")
        sigma = _check_scale(state_scale, d, "state_scale")
        xs, us = jnp.asarray(states), jnp.asarray(actions)
        lam = float(np.sqrt(state_weight))

        def unpack(z):
            return z[:d], z[d].astype(jnp.int32), z[d + 1].astype(jnp.int32)

        def action_fn(z, theta):
            x, t, i = unpack(z)
            return (learner(x, theta) - us[i, jnp.minimum(t, steps - 1)]) / s

        def residual_fn(z, theta):
            x, t, i = unpack(z)
            return jnp.concatenate([action_fn(z, theta), lam * (x - xs[i, t]) / sigma])

        def step(z, theta):
            x = z[:d]
            x_next = plant(x, eqx.combine(theta, static)(x))
            return jnp.concatenate([jnp.reshape(x_next, (d,)), z[d:] + jnp.array([1.0, 0.0], z.dtype)])

        system = DeterministicMap(step)
        starts = np.concatenate([states[:, 0], np.zeros((n_demo, 1)), np.arange(n_demo, dtype=float)[:, None]], 1)
        initial = Empirical(starts)
        mode = "data"

    def cost(x, theta):
        return 0.5 * jnp.sum(residual_fn(x, theta) ** 2)

    horizon = check_positive_int(horizon, "horizon")
    closed_loop = Problem(system, cost, Episodic(gamma, horizon), initial, name=name)
    try:
        closed_loop.check_theta(theta0)
    except ProblemError as e:
        raise ProblemError(f"plant: the closed loop plant(x, policy(x)) is inconsistent with the state: {e}") from e
    return CloningProblem(
        closed_loop=closed_loop,
        theta0=theta0,
        static=static,
        residual_fn=residual_fn,
        action_fn=action_fn,
        mode=mode,
    )
