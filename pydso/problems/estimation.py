r"""State-estimator learning as a DSO problem constructor (the contract of :mod:`pydso.problems`).

A plant with process and measurement noise,

.. math::
    x_{k+1} = f(x_k) + w_k,\quad w_k \sim N(0, Q), \qquad y_{k+1} = h(x_{k+1}) + v_{k+1},\quad v \sim N(0, R),

is observed by a recursive filter with parameters :math:`\theta` (a gain, a network, ...) and internal state
:math:`s_k` whose estimate is :math:`\hat x_k = e(s_k, \theta)`, updated by :math:`s_{k+1} = u(s_k, y_{k+1}, \theta)`.
The closed loop is the chain on :math:`z = (x, s)`; its step cost is the estimation error
:math:`L(z) = \sum_i c_i (x_i - \hat x_i)^2` (``error_weights`` :math:`c`, default 1) and the setting is the average
cost after a burn-in, i.e. the steady-state mean squared error. Learning the filter is minimising it with the
package's methods (pathwise gradients through the chain).

The joint noise of :math:`z` is correlated (the filter sees :math:`w` through the measurement) and degenerate
(its rank is at most :math:`n + m` in dimension :math:`n + \dim s`), so the chain has no density in :math:`z`: it
is a :class:`pydso.systems.ReparameterizedChain`, sampled as :math:`w = L_Q\varepsilon_1`,
:math:`v = L_R\varepsilon_2` with the per-step key split in two. The true states and measurements therefore depend
on the key only, never on the filter: two problems built from the same plant with different filters, rolled out
with the same key, see the same data (this is how a learned filter is compared with the EKF).

Filters (:class:`AbstractFilter`): :class:`GainObserver` (constant-gain predictor–corrector, learned),
:class:`ExtendedKalmanFilter` (the reference, no parameters). For a linear-Gaussian plant the optimal constant gain
is the steady-state Kalman gain :math:`K = P C^\top (C P C^\top + R)^{-1}` with :math:`P` the stabilising solution
of the filter Riccati equation; :meth:`EstimationProblem.kalman_gain` computes it and
:meth:`EstimationProblem.steady_state_error` the exact steady-state error of any stable constant gain.

References: R. E. Kalman, "A new approach to linear filtering and prediction problems", 1960; B. D. O. Anderson and
J. B. Moore, *Optimal Filtering*, Prentice Hall 1979 (steady-state gains, the EKF).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from .._checks import check_key, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..engine import rollout
from ..systems import AbstractInitial, AverageCost, Problem, ReparameterizedChain
from ._contract import AbstractConstructedProblem

__all__ = [
    "NoisyStateSpace",
    "AbstractFilter",
    "GainObserver",
    "ExtendedKalmanFilter",
    "EstimationProblem",
    "EstimationResult",
    "estimation",
]


# --------------------------------------------------------------------------------------------- checks
def _covariance(value, name: str, dim: int | None) -> np.ndarray:
    """Check a covariance (matrix, or a positive scalar/vector meaning a diagonal) and return it as (d, d)."""
    a = np.asarray(value)
    if a.dtype == object or not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ProblemError(f"{name} must be a real covariance matrix (d, d), got {value!r}")
    a = a.astype(np.float64)
    if a.ndim == 0 and dim is not None:
        a = np.eye(dim) * a
    elif a.ndim == 1:
        a = np.diag(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ProblemError(f"{name} must be a square covariance matrix (d, d), got shape {a.shape}")
    if dim is not None and a.shape[0] != dim:
        raise ProblemError(f"{name} must have shape {(dim, dim)} to match the state/measurement, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ProblemError(f"{name} contains non-finite values")
    if not np.allclose(a, a.T, rtol=1e-10, atol=1e-12):
        raise ProblemError(f"{name} must be symmetric; got {a.tolist()}")
    try:
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        eig = np.linalg.eigvalsh(a)
        raise ProblemError(
            f"{name} must be positive definite (smallest eigenvalue {eig.min():.3g}); add a small multiple of the "
            "identity to noise that is degenerate in some direction"
        ) from None
    return a


def _as_map(value, name: str, signature: str) -> tuple[Callable, np.ndarray | None]:
    """A matrix ``M`` becomes ``x -> M @ x`` (and is returned too); a callable is returned as is."""
    if callable(value):
        return value, None
    a = np.asarray(value)
    if a.dtype == object or not np.issubdtype(a.dtype, np.number) or a.ndim != 2:
        raise ProblemError(f"{name} must be a callable {signature} or a 2-D matrix, got {value!r}")
    if not np.all(np.isfinite(a)):
        raise ProblemError(f"{name} contains non-finite values")
    M = jnp.asarray(a, dtype=jnp.result_type(float))
    return (lambda x: M @ x), a.astype(np.float64)


# --------------------------------------------------------------------------------------------- plant
class NoisyStateSpace(eqx.Module):
    r"""The plant of a state-estimation problem: :math:`x' = f(x) + w`, :math:`y' = h(x') + v`, with
    :math:`w \sim N(0, Q)`, :math:`v \sim N(0, R)` and :math:`x_0 \sim N(\mu_0, P_0)`; filters read it.

    Built by :func:`estimation`; ``transition`` :math:`f` and ``measurement`` :math:`h` are callables of one state
    vector; ``process_tril``, ``measurement_tril``, ``initial_tril`` are the Cholesky factors of :math:`Q, R, P_0`.
    ``A`` and ``C`` hold the matrices of a linear plant (None otherwise).
    """

    transition: Callable = eqx.field(static=True)
    measurement: Callable = eqx.field(static=True)
    process_tril: jax.Array
    measurement_tril: jax.Array
    initial_mean: jax.Array
    initial_tril: jax.Array
    A: jax.Array | None = None
    C: jax.Array | None = None

    @property
    def state_size(self) -> int:
        return int(self.initial_mean.shape[0])

    @property
    def measurement_size(self) -> int:
        return int(self.measurement_tril.shape[0])

    @property
    def Q(self) -> jax.Array:
        return self.process_tril @ self.process_tril.T

    @property
    def R(self) -> jax.Array:
        return self.measurement_tril @ self.measurement_tril.T

    @property
    def linear(self) -> bool:
        return self.A is not None and self.C is not None


# --------------------------------------------------------------------------------------------- filters
class AbstractFilter(eqx.Module):
    r"""A recursive state estimator: internal state :math:`s` (a vector), started by :meth:`init`, updated with
    each measurement by :meth:`update`, read out by :meth:`estimate`. ``theta`` is what is learned.

    Subclasses define ``state_size``, ``init``, ``update`` and ``estimate``, and ``theta0`` (the default start)."""

    @abc.abstractmethod
    def state_size(self, plant: NoisyStateSpace) -> int:
        """The length of the filter state :math:`s`."""

    @abc.abstractmethod
    def init(self, plant: NoisyStateSpace) -> jax.Array:
        """The filter state before the first measurement (from the prior :math:`N(\\mu_0, P_0)`)."""

    @abc.abstractmethod
    def update(self, plant: NoisyStateSpace, s: jax.Array, y: jax.Array, theta: PyTree) -> jax.Array:
        """:math:`s' = u(s, y', \\theta)`: predict one step and correct with the new measurement ``y``."""

    @abc.abstractmethod
    def estimate(self, plant: NoisyStateSpace, s: jax.Array, theta: PyTree) -> jax.Array:
        """The state estimate :math:`\\hat x = e(s, \\theta)`, shape ``(n,)``."""

    @abc.abstractmethod
    def theta0(self, plant: NoisyStateSpace) -> PyTree:
        """The default initial parameters."""


class GainObserver(AbstractFilter):
    r"""A constant-gain predictor–corrector (Luenberger form of the Kalman filter):

    .. math:: \hat x^- = f(\hat x), \qquad \hat x' = \hat x^- + K\,(y' - h(\hat x^-)),

    with the gain :math:`K` (``theta = {"gain": (n, m)}``) learned. Its state is :math:`\hat x` itself. For a
    linear-Gaussian plant the best constant gain is the steady-state Kalman gain. When not to use it: when the
    right gain varies strongly along the trajectory (then a state-dependent gain or the EKF does better).

    **Arguments:**

    - `gain`: the initial gain (default zeros: the open-loop predictor).
    """

    gain: jax.Array | None = None

    def state_size(self, plant):
        return plant.state_size

    def init(self, plant):
        return plant.initial_mean

    def update(self, plant, s, y, theta):
        prior = plant.transition(s)
        return prior + theta["gain"] @ (y - plant.measurement(prior))

    def estimate(self, plant, s, theta):
        return s

    def theta0(self, plant):
        shape = (plant.state_size, plant.measurement_size)
        if self.gain is None:
            return {"gain": jnp.zeros(shape)}
        g = np.asarray(self.gain, dtype=np.float64)
        if g.shape != shape:
            raise ProblemError(f"GainObserver.gain must have shape (n, m) = {shape}, got {g.shape}")
        return {"gain": jnp.asarray(g)}


class ExtendedKalmanFilter(AbstractFilter):
    r"""The extended Kalman filter (reference; nothing is learned: ``theta = {}``). With :math:`F = \partial f/
    \partial x(\hat x)`, :math:`H = \partial h/\partial x(\hat x^-)` (by ``jax.jacfwd``):

    .. math::
        \hat x^- = f(\hat x),\ P^- = F P F^\top + Q,\ K = P^- H^\top (H P^- H^\top + R)^{-1},\
        \hat x' = \hat x^- + K (y' - h(\hat x^-)),\ P' = (I - KH) P^- (I - KH)^\top + K R K^\top.

    Its state is :math:`(\hat x, P)` flattened. Exact (the Kalman filter) for a linear plant.
    """

    def state_size(self, plant):
        n = plant.state_size
        return n + n * n

    def init(self, plant):
        P0 = plant.initial_tril @ plant.initial_tril.T
        return jnp.concatenate([plant.initial_mean, P0.ravel()])

    def update(self, plant, s, y, theta):
        n = plant.state_size
        x, P = s[:n], s[n:].reshape(n, n)
        F = jax.jacfwd(plant.transition)(x)
        prior = plant.transition(x)
        P = F @ P @ F.T + plant.Q
        H = jax.jacfwd(plant.measurement)(prior)
        S = H @ P @ H.T + plant.R
        K = jnp.linalg.solve(S, H @ P).T
        x_new = prior + K @ (y - plant.measurement(prior))
        IKH = jnp.eye(n, dtype=P.dtype) - K @ H
        P_new = IKH @ P @ IKH.T + K @ plant.R @ K.T
        return jnp.concatenate([x_new, (0.5 * (P_new + P_new.T)).ravel()])

    def estimate(self, plant, s, theta):
        return s[: plant.state_size]

    def theta0(self, plant):
        return {}


# --------------------------------------------------------------------------------------------- problem
class _JointInitial(AbstractInitial):
    """:math:`z_0 = (x_0, s_0)` with :math:`x_0 \\sim N(\\mu_0, L_0 L_0^\\top)` and the filter's fixed start."""

    mean: jax.Array
    tril: jax.Array
    filter_state: jax.Array

    def sample(self, key):
        x0 = self.mean + self.tril @ jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return jnp.concatenate([x0, self.filter_state])


@dataclass
class EstimationResult:
    """The report of a state-estimation problem at ``theta`` (:meth:`EstimationProblem.result`).

    **Attributes:**

    - ``theta``: the filter parameters.
    - ``mse``, ``mse_stderr``: Monte-Carlo steady-state mean (weighted) squared error and its standard error.
    - ``rmse``: root mean squared error per state component after the burn-in, ``(n,)``.
    - ``exact_mse``: for a linear plant and a :class:`GainObserver`, the exact steady-state error of the gain
      (None otherwise, or for an unstable error dynamics: inf).
    - ``kalman_mse``: for a linear plant, the exact steady-state error of the Kalman filter (the optimum).
    - ``info``: how ``theta`` was obtained.
    """

    theta: PyTree
    mse: float
    mse_stderr: float
    rmse: np.ndarray
    exact_mse: float | None = None
    kalman_mse: float | None = None
    info: dict = field(default_factory=dict)


class EstimationProblem(AbstractConstructedProblem):
    r"""A state-estimator learning problem (see the module docstring): :attr:`problem` is the
    :class:`pydso.Problem` on :math:`z = (x, s)` with a :class:`~pydso.systems.ReparameterizedChain`, the error
    cost and an :class:`~pydso.AverageCost` setting. Solve it with
    ``pydso.minimize(p.problem, p.theta0, key=key, method=pydso.Gradient(...))`` (pathwise gradients; the chain
    has no density, so the score estimator refuses it).
    """

    dso: Problem
    theta0: PyTree
    plant: NoisyStateSpace
    filter: AbstractFilter
    error_weights: jax.Array

    @property
    def problem(self) -> Problem:
        return self.dso

    @property
    def state_size(self) -> int:
        return self.plant.state_size

    def split(self, states: jax.Array, theta: PyTree) -> tuple[jax.Array, jax.Array]:
        r"""True states and estimates ``(..., n)`` from joint states ``(..., n + dim s)``."""
        n = self.plant.state_size
        flat = states.reshape(-1, states.shape[-1])
        est = jax.vmap(lambda s: self.filter.estimate(self.plant, s, theta))(flat[:, n:])
        return states[..., :n], est.reshape(states.shape[:-1] + (n,))

    def errors(self, theta: PyTree, *, key: jax.Array, n: int = 256) -> tuple[jax.Array, jax.Array]:
        r"""Estimation errors :math:`x_k - \hat x_k` of ``n`` episodes, ``(n, H+1, state)``, and the true states
        ``(n, H+1, state)``. The data depend on ``key`` only (not on the filter), so filters built on the same plant
        are compared on identical data by passing the same key."""
        traj = rollout(self.dso, theta, key=check_key(key), n=check_positive_int(n, "n"), progress=False)
        x, xhat = self.split(traj.states, theta)
        return x - xhat, x

    def steady_state_error(self, gain) -> float:
        r"""Exact steady-state :math:`\mathbb E[\sum_i c_i e_i^2]` of a constant gain :math:`K` on a linear plant:
        the error obeys :math:`e' = (I-KC)(Ae + w) - Kv`, so its covariance solves the discrete Lyapunov equation
        :math:`\Sigma = M\Sigma M^\top + (I-KC)Q(I-KC)^\top + KRK^\top`, :math:`M = (I-KC)A`. ``inf`` if
        :math:`M` is not stable."""
        if not self.plant.linear:
            raise ProblemError("steady_state_error needs a linear plant (transition and measurement given as matrices)")
        A, C = np.asarray(self.plant.A), np.asarray(self.plant.C)
        Q, R = np.asarray(self.plant.Q), np.asarray(self.plant.R)
        K = np.asarray(gain, dtype=np.float64)
        if K.shape != (A.shape[0], C.shape[0]):
            raise ProblemError(f"gain must have shape (n, m) = {(A.shape[0], C.shape[0])}, got {K.shape}")
        IKC = np.eye(A.shape[0]) - K @ C
        M = IKC @ A
        if np.max(np.abs(np.linalg.eigvals(M))) >= 1:
            return float("inf")
        S = scipy.linalg.solve_discrete_lyapunov(M, IKC @ Q @ IKC.T + K @ R @ K.T)
        return float(np.sum(np.asarray(self.error_weights) * np.diag(S)))

    def kalman_gain(self) -> np.ndarray:
        r"""The steady-state Kalman gain :math:`K = P C^\top (C P C^\top + R)^{-1}` of a linear plant, with
        :math:`P` the stabilising solution of :math:`P = APA^\top - APC^\top(CPC^\top+R)^{-1}CPA^\top + Q`
        (``scipy.linalg.solve_discrete_are``)."""
        if not self.plant.linear:
            raise ProblemError("kalman_gain needs a linear plant (transition and measurement given as matrices)")
        A, C = np.asarray(self.plant.A), np.asarray(self.plant.C)
        Q, R = np.asarray(self.plant.Q), np.asarray(self.plant.R)
        P = scipy.linalg.solve_discrete_are(A.T, C.T, Q, R)
        return np.linalg.solve(C @ P @ C.T + R, C @ P).T

    def result(self, theta: PyTree, *, key: jax.Array | None = None, n: int = 256, **info) -> EstimationResult:
        """The report at ``theta``: Monte-Carlo errors from ``n`` fresh episodes (``key``, default
        ``jax.random.key(0)``) and, for linear plants, the exact steady-state errors (see
        :class:`EstimationResult`)."""
        key = jax.random.key(0) if key is None else key
        err, _ = self.errors(theta, key=key, n=n)
        burn_in = self.dso.setting.burn_in
        e = np.asarray(err[:, burn_in:-1])
        per_episode = np.mean(np.sum(np.asarray(self.error_weights) * e**2, axis=-1), axis=1)
        exact = kalman = None
        if self.plant.linear:
            kalman = self.steady_state_error(self.kalman_gain())
            if isinstance(self.filter, GainObserver):
                exact = self.steady_state_error(np.asarray(theta["gain"]))
        return EstimationResult(
            theta=theta,
            mse=float(per_episode.mean()),
            mse_stderr=float(per_episode.std(ddof=1) / np.sqrt(len(per_episode))) if len(per_episode) > 1 else 0.0,
            rmse=np.sqrt(np.mean(e**2, axis=(0, 1))),
            exact_mse=exact,
            kalman_mse=kalman,
            info=dict(info),
        )


def estimation(
    transition,
    measurement,
    *,
    process_noise,
    measurement_noise,
    initial_mean,
    initial_cov=0.0,
    filter: AbstractFilter | None = None,
    error_weights=None,
    horizon: int = 200,
    burn_in: int = 50,
    theta0: PyTree | None = None,
    name: str = "estimation",
) -> EstimationProblem:
    r"""Build a state-estimator learning problem (module docstring): the chain of (true state, filter state), the
    weighted squared estimation error as the cost, its average after ``burn_in`` steps as the objective.

    **Arguments:**

    - `transition`: the plant's mean transition :math:`f`: a callable ``f(x) -> (n,)`` or an ``(n, n)`` matrix
      :math:`A` (linear plant).
    - `measurement`: the sensor :math:`h`: a callable ``h(x) -> (m,)`` or an ``(m, n)`` matrix :math:`C`.
    - `process_noise`: :math:`Q`, ``(n, n)`` symmetric positive definite (a vector or scalar means a diagonal).
    - `measurement_noise`: :math:`R`, ``(m, m)`` symmetric positive definite.
    - `initial_mean`: :math:`\mu_0`, ``(n,)``; the filter starts from it.
    - `initial_cov`: :math:`P_0` (default 0: every episode starts at :math:`\mu_0`); positive semi-definite.
    - `filter`: the estimator, an :class:`AbstractFilter` (default :class:`GainObserver`).
    - `error_weights`: :math:`c`, ``(n,)`` non-negative weights of the squared errors (default ones).
    - `horizon`, `burn_in`: episode length and the steps excluded from the average (transient of the filter).
    - `theta0`: initial filter parameters (default: the filter's ``theta0``).

    **Returns:**

    An :class:`EstimationProblem`. Raises :class:`pydso.ProblemError` naming the argument for inconsistent
    dimensions, covariances that are not symmetric positive definite, or a bad filter.

    When not to use it: for a linear-Gaussian plant the Kalman filter is known in closed form
    (:meth:`EstimationProblem.kalman_gain`); learning is for checking that, or for plants and filter classes
    without a closed form.
    """
    if filter is None:
        filter = GainObserver()
    if not isinstance(filter, AbstractFilter):
        raise ProblemError(
            f"filter must be a pydso.problems.AbstractFilter (GainObserver(), ExtendedKalmanFilter(), ...), got "
            f"{type(filter).__name__}"
        )
    mu0 = np.asarray(initial_mean)
    if mu0.dtype == object or not np.issubdtype(mu0.dtype, np.number) or mu0.ndim != 1 or mu0.size == 0:
        raise ProblemError(f"initial_mean must be a non-empty state vector (n,), got {initial_mean!r}")
    if not np.all(np.isfinite(mu0)):
        raise ProblemError("initial_mean contains non-finite values")
    n = mu0.shape[0]
    f, A = _as_map(transition, "transition", "f(x) -> (n,)")
    h, C = _as_map(measurement, "measurement", "h(x) -> (m,)")
    dtype = jnp.result_type(float)
    x_spec = jax.ShapeDtypeStruct((n,), dtype)
    for fn, nm in ((f, "transition"), (h, "measurement")):
        try:
            out = jax.eval_shape(fn, x_spec)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ProblemError(f"{nm} cannot be evaluated on a state of shape {(n,)}: {type(e).__name__}: {e}") from e
        if not hasattr(out, "shape") or out.ndim != 1:
            raise ProblemError(f"{nm} must return a vector, got {getattr(out, 'shape', type(out))}")
        if nm == "transition" and out.shape != (n,):
            raise ProblemError(f"transition must map a state (n,) = {(n,)} to the same shape, got {out.shape}")
        if nm == "measurement":
            m = out.shape[0]
    Q = _covariance(process_noise, "process_noise", n)
    R = _covariance(measurement_noise, "measurement_noise", m)
    P0 = np.asarray(initial_cov, dtype=np.float64)
    P0 = np.eye(n) * P0 if P0.ndim == 0 else (np.diag(P0) if P0.ndim == 1 else P0)
    if P0.shape != (n, n) or not np.all(np.isfinite(P0)) or not np.allclose(P0, P0.T):
        raise ProblemError(f"initial_cov must be a symmetric (n, n) = {(n, n)} matrix (or scalar/diagonal)")
    w, V = np.linalg.eigh(P0)
    if w.min() < -1e-10 * max(1.0, abs(w).max()):
        raise ProblemError(f"initial_cov must be positive semi-definite (smallest eigenvalue {w.min():.3g})")
    L0 = V * np.sqrt(np.clip(w, 0.0, None))  # L0 L0^T = P0, also for singular P0
    c = np.ones(n) if error_weights is None else np.asarray(error_weights, dtype=np.float64)
    if c.shape != (n,) or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ProblemError(
            f"error_weights must be {n} non-negative finite weights (one per state), got {error_weights!r}"
        )
    horizon = check_positive_int(horizon, "horizon")
    if isinstance(burn_in, bool) or not isinstance(burn_in, int | np.integer) or not 0 <= burn_in < horizon:
        raise ProblemError(f"burn_in must be an integer in [0, horizon) = [0, {horizon}), got {burn_in!r}")

    plant = NoisyStateSpace(
        f,
        h,
        jnp.asarray(np.linalg.cholesky(Q)),
        jnp.asarray(np.linalg.cholesky(R)),
        jnp.asarray(mu0, dtype=dtype),
        jnp.asarray(L0, dtype=dtype),
        None if A is None else jnp.asarray(A),
        None if C is None else jnp.asarray(C),
    )
    s0 = jnp.asarray(filter.init(plant), dtype=dtype)
    if s0.shape != (filter.state_size(plant),):
        raise ProblemError(f"filter.init returned shape {s0.shape}, expected ({filter.state_size(plant)},)")
    weights = jnp.asarray(c)

    def sample(key, z, theta):
        x, s = z[:n], z[n:]
        kw, kv = jax.random.split(key)
        x_next = f(x) + plant.process_tril @ jax.random.normal(kw, (n,), z.dtype)
        y = h(x_next) + plant.measurement_tril @ jax.random.normal(kv, (m,), z.dtype)
        return jnp.concatenate([x_next, filter.update(plant, s, y, theta)])

    def cost(z, theta):
        e = z[:n] - filter.estimate(plant, z[n:], theta)
        return jnp.sum(weights * e**2)

    theta0 = filter.theta0(plant) if theta0 is None else theta0
    problem = Problem(
        ReparameterizedChain(sample),
        cost,
        AverageCost(horizon=horizon, burn_in=int(burn_in)),
        _JointInitial(plant.initial_mean, plant.initial_tril, s0),
        name=name,
        theta_example=theta0,
    )
    return EstimationProblem(dso=problem, theta0=theta0, plant=plant, filter=filter, error_weights=weights)
