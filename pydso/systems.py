r"""Problem definitions: transition laws, costs, settings and initial distributions.

A DSO problem (DESIGN.md §1) is a closed-loop system with parameters ``theta`` (any pytree):

* a transition law :math:`P(x' \mid x, \theta)` — a discrete-time chain (:class:`MarkovChain`,
  :class:`GaussianChain`, :class:`TabularChain`, :class:`DeterministicMap`) or a continuous-time system
  (:class:`ODESystem`, :class:`SDESystem`) observed every ``dt``;
* a step cost :math:`L(x, \theta)` and an optional terminal cost :math:`\Phi(x, \theta)`;
* a setting: :class:`Episodic` (discount :math:`\gamma`, horizon, terminal set), :class:`AverageCost`,
  :class:`FiniteHorizon`;
* an initial distribution :math:`P_0` (:class:`Fixed`, :class:`Normal`, :class:`Uniform`,
  :class:`Categorical`, :class:`Empirical`).

:class:`Problem` bundles them and checks their consistency once, with errors that name the problem.

**Time.** Internally every chain is sampled as ``system.sample(key, t, x, theta)`` and every transition density is
``system.log_prob(t, x, x_next, theta)``, where ``t`` is the time of ``x`` (``k * system.time_step`` as a float: the
step index ``k`` for chains, ``k * dt`` for ODE/SDE systems). Time-varying transitions :math:`P_t` are declared with
``time_varying=True`` on the chain, whose user callables then receive ``t`` first (``sample_fn(key, t, x, theta)``,
``mean_fn(t, x, theta)``, ``transition_fn(t, theta)``, ...); time-varying costs :math:`L_t`, :math:`\Phi` with
``Problem(..., time_varying=True)`` (``cost(t, x, theta)``, ``terminal_cost(t, x, theta)``). ODE/SDE vector fields
always receive ``t``. Do not push time into the state: a noise-free time component has no transition density.
"""

import abc
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_finite_tree, check_positive_int
from ._errors import ProblemError, StabilityWarning
from ._typing import PyTree

__all__ = [
    "AbstractSystem",
    "AbstractChain",
    "MarkovChain",
    "GaussianChain",
    "TabularChain",
    "DeterministicMap",
    "ReparameterizedChain",
    "ODESystem",
    "SDESystem",
    "AbstractSetting",
    "Episodic",
    "AverageCost",
    "FiniteHorizon",
    "AbstractInitial",
    "Fixed",
    "Normal",
    "Uniform",
    "Categorical",
    "Empirical",
    "Problem",
]


# --------------------------------------------------------------------------------------------- systems
class AbstractSystem(eqx.Module):
    r"""A closed-loop transition law. Subclasses are final and declare three flags: ``stochastic``,
    ``reparameterized`` (sampling differentiable in theta with the key fixed) and ``has_log_prob``.

    Every system has one transition log-density signature, :meth:`log_prob` ``(t, x, x_next, theta)``, where ``t``
    is the time of ``x`` (the step index for discrete-time chains, ``k * dt`` for ODE/SDE systems).
    """

    stochastic: eqx.AbstractClassVar[bool]
    reparameterized: eqx.AbstractClassVar[bool]
    has_log_prob: eqx.AbstractClassVar[bool]

    @property
    def time_step(self) -> float:
        """The time between two recorded states: ``dt`` for continuous-time systems, 1 for chains."""
        return getattr(self, "dt", 1)

    def log_prob(self, t: jax.Array, x: jax.Array, x_next: jax.Array, theta: PyTree) -> jax.Array:
        r""":math:`\log P(x' \mid x, \theta)` of one transition from time ``t``; the only thing the score
        estimator needs."""
        raise ProblemError(f"{type(self).__name__} has no transition log-density; use Pathwise()")

    def path_log_prob(self, states: jax.Array, theta: PyTree) -> jax.Array:
        r""":math:`\log P(x_{k+1}\mid x_k,\theta)` along one episode's states ``(H+1, ...)``, shape ``(H,)``.
        The states are held fixed (``stop_gradient``): the result is differentiable in ``theta`` only."""
        states = jax.lax.stop_gradient(states)
        ts = jnp.arange(states.shape[0] - 1, dtype=jnp.result_type(float)) * self.time_step
        return jax.vmap(self.log_prob, in_axes=(0, 0, 0, None))(ts, states[:-1], states[1:], theta)


class AbstractChain(AbstractSystem):
    r"""A discrete-time Markov chain :math:`x_{t+1} \sim P_t(\cdot \mid x_t, \theta)`.

    Every chain has a static ``time_varying`` flag (default False): when True its user callables receive the
    time ``t`` of the current state first (see each class), so that :math:`P_t` may depend on the step.
    """

    @abc.abstractmethod
    def sample(self, key: jax.Array, t: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        """Draw :math:`x' \\sim P_t(\\cdot\\mid x,\\theta)` from the state ``x`` at time ``t``; differentiable in
        ``theta`` if reparameterised."""

    def _call(self, fn, t, *args, keyed: bool = False):
        """Call a user callable ``fn(*args)``, with the time ``t`` first for time-varying chains (after the key
        for samplers, ``keyed=True``: ``sample_fn(key, t, x, theta)``)."""
        if not getattr(self, "time_varying", False):
            return fn(*args)
        if keyed:
            return fn(args[0], t, *args[1:])
        return fn(t, *args)


class MarkovChain(AbstractChain):
    r"""A general chain given by a sampler and its log-density.

    ``sample_fn(key, x, theta) -> x_next`` and ``log_prob_fn(x, x_next, theta) -> scalar``; with
    ``time_varying=True``: ``sample_fn(key, t, x, theta)`` and ``log_prob_fn(t, x, x_next, theta)``. Set
    ``reparameterized=True`` only if ``sample_fn`` is differentiable in ``theta`` with the key fixed
    (then the pathwise estimator may be used); otherwise use the score estimator (DESIGN.md §1.1).
    """

    sample_fn: Callable = eqx.field(static=True)
    log_prob_fn: Callable = eqx.field(static=True)
    reparameterized: bool = eqx.field(static=True, default=False)
    time_varying: bool = eqx.field(static=True, default=False, kw_only=True)
    stochastic: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = True

    def sample(self, key, t, x, theta):
        return self._call(self.sample_fn, t, key, x, theta, keyed=True)

    def log_prob(self, t, x, x_next, theta):
        return self.log_prob_fn(t, x, x_next, theta) if self.time_varying else self.log_prob_fn(x, x_next, theta)


def _is_default_scale(scale) -> bool:
    return isinstance(scale, int | float) and not isinstance(scale, bool) and scale == 1.0


class GaussianChain(AbstractChain):
    r"""Gaussian transitions :math:`x' = m(x,\theta) + L(x,\theta)\,\varepsilon`, with
    :math:`\varepsilon\sim N(0,I)`: diagonal noise :math:`L = \mathrm{diag}(\sigma)` or a full covariance
    :math:`\Sigma = L L^\top`.

    **Arguments:**

    - `mean_fn`: ``mean_fn(x, theta)`` (``mean_fn(t, x, theta)`` when time-varying), the mean :math:`m`.
    - `scale`: diagonal noise :math:`\sigma`: a positive float, an array broadcastable to the state, or a callable
      ``scale(x, theta)`` (``scale(t, x, theta)``). A constant scale is checked positive at construction; a
      callable one that returns zero or a negative value makes the log-density non-finite, which
      :func:`pydso.rollout` (``check=True``) and the estimators report as an error naming ``scale``.
    - `scale_tril`: keyword-only, a full covariance's lower-triangular Cholesky factor :math:`L` of shape ``(d, d)``
      (vector states ``(d,)`` only), or a callable ``scale_tril(x, theta)`` returning one. Its diagonal must be
      positive (checked at construction where it is a concrete array) and entries above the diagonal must be zero.
      Mutually exclusive with a non-default ``scale``.
    - `time_varying`: keyword-only; when True the callables receive the time ``t`` of ``x`` first.

    The log-density is closed form (a triangular solve for ``scale_tril``:
    :math:`\log p = -\tfrac12\lVert L^{-1}(x'-m)\rVert^2 - \sum_i \log L_{ii} - \tfrac d2 \log 2\pi`) and sampling
    is reparameterised, so both the score and the pathwise estimators apply. For noise-free dynamics use
    :class:`DeterministicMap` (a zero scale has no density).
    """

    mean_fn: Callable = eqx.field(static=True)
    scale: Any = 1.0
    scale_tril: Any = None
    time_varying: bool = eqx.field(static=True, default=False)
    stochastic: ClassVar[bool] = True
    reparameterized: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = True

    def __init__(self, mean_fn, scale=1.0, *, scale_tril=None, time_varying: bool = False):
        if not callable(mean_fn):
            raise ProblemError(f"GaussianChain.mean_fn must be a callable mean_fn(x, theta), got {type(mean_fn)}")
        if scale_tril is not None and not _is_default_scale(scale):
            raise ProblemError(
                "GaussianChain takes either scale (diagonal noise) or scale_tril (full covariance), not both; "
                f"got scale={scale!r} and scale_tril"
            )
        if not callable(scale):
            a = np.asarray(scale)
            if not (np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)):
                raise ProblemError(f"GaussianChain.scale must be a positive number, array or callable, got {scale!r}")
            if not np.all(np.isfinite(a)) or np.any(a <= 0):
                raise ProblemError(
                    f"GaussianChain.scale must be positive and finite, got {scale!r}; a zero scale has no density "
                    "(use DeterministicMap for noise-free dynamics)"
                )
            scale = scale if isinstance(scale, int | float) else jnp.asarray(a, dtype=jnp.result_type(float))
        if scale_tril is not None and not callable(scale_tril):
            a = np.asarray(scale_tril)
            if a.dtype == object or not np.issubdtype(a.dtype, np.number):
                raise ProblemError(f"GaussianChain.scale_tril must be a (d, d) array or callable, got {scale_tril!r}")
            a = a.astype(np.result_type(a.dtype, np.float64)) if not np.issubdtype(a.dtype, np.floating) else a
            if a.ndim != 2 or a.shape[0] != a.shape[1]:
                raise ProblemError(f"GaussianChain.scale_tril must be a square (d, d) array, got shape {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ProblemError("GaussianChain.scale_tril contains non-finite values")
            if np.any(np.triu(a, 1) != 0):
                raise ProblemError(
                    "GaussianChain.scale_tril must be lower triangular (entries above the diagonal are 0)"
                )
            if np.any(np.diag(a) <= 0):
                raise ProblemError(
                    f"GaussianChain.scale_tril must have a positive diagonal, got {np.diag(a)}; it is the Cholesky "
                    "factor of the noise covariance"
                )
            scale_tril = jnp.asarray(a)
        if not isinstance(time_varying, bool):
            raise ProblemError(f"GaussianChain.time_varying must be a bool, got {time_varying!r}")
        self.mean_fn = mean_fn
        self.scale = scale
        self.scale_tril = scale_tril
        self.time_varying = time_varying

    def _scale(self, t, x, theta):
        s = self._call(self.scale, t, x, theta) if callable(self.scale) else jnp.asarray(self.scale)
        return jnp.broadcast_to(s, jnp.shape(x))

    def _tril(self, t, x, theta):
        L = self._call(self.scale_tril, t, x, theta) if callable(self.scale_tril) else self.scale_tril
        L = jnp.asarray(L)
        if jnp.ndim(x) != 1 or L.shape != (x.shape[0], x.shape[0]):
            raise ProblemError(
                f"GaussianChain.scale_tril must have shape (d, d) = {(jnp.size(x),) * 2} for a vector state of "
                f"shape {jnp.shape(x)}, got {L.shape}"
            )
        return jnp.tril(L)

    def noise_scale(self, t: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        r"""The noise at ``(t, x)``: the diagonal scale :math:`\sigma` broadcast to the state, or the Cholesky factor
        :math:`L` (``(d, d)``) when the chain was built with ``scale_tril``."""
        return self._tril(t, x, theta) if self.scale_tril is not None else self._scale(t, x, theta)

    def mean(self, t: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        """The mean :math:`m_t(x, \\theta)` of the next state."""
        return self._call(self.mean_fn, t, x, theta)

    def sample(self, key, t, x, theta):
        mean = self.mean(t, x, theta)
        eps = jax.random.normal(key, jnp.shape(mean), jnp.result_type(mean))
        if self.scale_tril is not None:
            return mean + self._tril(t, x, theta) @ eps
        return mean + self._scale(t, x, theta) * eps

    def log_prob(self, t, x, x_next, theta):
        mean = self.mean(t, x, theta)
        if self.scale_tril is not None:
            L = self._tril(t, x, theta)
            z = jax.scipy.linalg.solve_triangular(L, x_next - mean, lower=True)
            d = jnp.shape(x)[0]
            return -0.5 * jnp.sum(z**2) - jnp.sum(jnp.log(jnp.diagonal(L))) - 0.5 * d * jnp.log(2 * jnp.pi)
        s = self._scale(t, x, theta)
        z = (x_next - mean) / s
        return jnp.sum(-0.5 * z**2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi))


def _check_stochastic_matrix(P, where: str) -> None:
    """Raise :class:`ProblemError` if a concrete ``(S, S)`` matrix is not row-stochastic (no-op on tracers)."""
    if isinstance(P, jax.core.Tracer):
        return
    a = np.asarray(P)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ProblemError(f"{where} must return a square (S, S) matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0) or not np.allclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-8):
        bad = np.flatnonzero(~np.isclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-8) | np.any(a < 0, axis=1))
        raise ProblemError(
            f"{where} must return a row-stochastic matrix (entries >= 0, rows summing to 1); rows {bad.tolist()} "
            "are not. pydso never renormalises silently"
        )


class TabularChain(AbstractChain):
    r"""A finite chain on states ``0..S-1``: ``transition_fn(theta)`` (``transition_fn(t, theta)`` when
    ``time_varying=True``) returns the row-stochastic ``(S, S)`` matrix :math:`P_t`.

    The state is an integer scalar. :mod:`pydso.exact` computes everything about it in closed form; the
    Monte-Carlo estimators are tested against that. Not reparameterisable: use the score estimator.
    Matrices with negative entries or rows that do not sum to 1 are an error (never renormalised): checked where
    they are concrete, and inside compiled rollouts by :func:`pydso.rollout` (``check=True``) and the estimators,
    which see the non-finite log-densities such a matrix produces.
    """

    transition_fn: Callable = eqx.field(static=True)
    time_varying: bool = eqx.field(static=True, default=False, kw_only=True)
    stochastic: ClassVar[bool] = True
    reparameterized: ClassVar[bool] = False
    has_log_prob: ClassVar[bool] = True

    def matrix(self, t: jax.Array, theta: PyTree) -> jax.Array:
        """The transition matrix :math:`P_t(\\theta)` of the step from time ``t``."""
        return self.transition_fn(t, theta) if self.time_varying else self.transition_fn(theta)

    def sample(self, key, t, x, theta):
        p = self.matrix(t, theta)[x]
        return jax.random.categorical(key, jnp.log(p)).astype(jnp.asarray(x).dtype)

    def log_prob(self, t, x, x_next, theta):
        row = self.matrix(t, theta)[x]
        # A row that is not a probability vector gives a NaN log-density (reported by the finiteness checks of
        # rollout and the estimators), never a silently renormalised one.
        ok = jnp.all(row >= 0) & (jnp.abs(jnp.sum(row) - 1) < 1e-8)
        return jnp.where(ok, jnp.log(row[x_next]), jnp.nan)


class DeterministicMap(AbstractChain):
    r"""A deterministic closed loop :math:`x_{t+1} = f(x_t, \theta)` (``step_fn(x, theta)``; ``step_fn(t, x, theta)``
    when ``time_varying=True``), randomness only in :math:`P_0`.

    Use the pathwise estimator (backpropagation through the rollout, DESIGN.md §1.2).
    """

    step_fn: Callable = eqx.field(static=True)
    time_varying: bool = eqx.field(static=True, default=False, kw_only=True)
    stochastic: ClassVar[bool] = False
    reparameterized: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = False

    def sample(self, key, t, x, theta):
        return self.step_fn(t, x, theta) if self.time_varying else self.step_fn(x, theta)


class ReparameterizedChain(AbstractChain):
    r"""A stochastic chain given only by a reparameterised sampler :math:`x' = g(\varepsilon, x, \theta)`:
    ``sample_fn(key, x, theta)`` (``sample_fn(key, t, x, theta)`` when ``time_varying=True``), differentiable in
    ``theta`` with the key fixed, and **no** transition density.

    Use the pathwise estimator (:class:`~pydso.Pathwise`); the score estimator and everything else that needs
    :math:`\log P` raise :class:`~pydso.ProblemError`. Use it for samplers whose density is intractable (e.g. a
    neural sampler, a simulator with internal noise); when the density is available, :class:`MarkovChain` with
    ``reparameterized=True`` allows both estimators.
    """

    sample_fn: Callable = eqx.field(static=True)
    time_varying: bool = eqx.field(static=True, default=False, kw_only=True)
    stochastic: ClassVar[bool] = True
    reparameterized: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = False

    def sample(self, key, t, x, theta):
        return self._call(self.sample_fn, t, key, x, theta, keyed=True)


def _default_adjoint():
    return diffrax.RecursiveCheckpointAdjoint()


class ODESystem(AbstractSystem):
    r"""A closed-loop ODE :math:`\dot x = f(t, x, \theta)` observed every ``dt``.

    The step cost of interval :math:`[t_k, t_{k+1}]` is :math:`\int L(x(t),\theta)\,dt`, integrated with the
    state (an augmented component), so the objective is
    :math:`\sum_k w_k \int_{t_k}^{t_{k+1}} L\,dt + w_H \Phi(x(t_H))` with the setting's weights :math:`w_k`.

    ``solver`` and ``stepsize_controller`` are diffrax objects (default: Tsit5 with a fixed step ``dt``);
    ``adjoint`` picks the gradient method: ``diffrax.RecursiveCheckpointAdjoint()`` (default, discretise-then-
    optimise, exact gradients of the discrete solve) or ``diffrax.BacksolveAdjoint()`` (continuous adjoint,
    O(1) memory, but documented by diffrax as less stable: do not use it for chaotic or stiff systems).

    The system says *what* to solve; *how* is the backend's choice: :class:`pydso.backends.JaxBackend` runs a
    constant-step explicit Runge–Kutta solve with a discretise-then-optimise adjoint on its struct-of-arrays fast
    path (the same discrete solution as diffrax) and everything else through :func:`diffrax.diffeqsolve`
    (``backend=pydso.backends.JaxBackend(integrator="diffrax")`` forces the reference path).

    **Time.** ``vector_field`` and the problem's costs receive the solver's time ``t`` (costs only with
    ``Problem(..., time_varying=True)``); a terminal set is the zero-crossing of ``g(t, x, theta)``
    (:class:`Episodic`), located by a diffrax event on the reference path.

    **Stability.** A fixed step outside the explicit method's stability region gives a finite but wrong
    trajectory, cost and gradient (e.g. RK4 on :math:`\dot x = -\lambda x` with :math:`\lambda\,dt > 2.785`).
    :meth:`pydso.Problem.check_theta` (run by :func:`pydso.rollout` and every estimator) estimates the Jacobian at
    an initial state and warns with :class:`~pydso.StabilityWarning` when :math:`|R(\lambda\,dt)| > 1` for an
    eigenvalue with :math:`\mathrm{Re}\,\lambda \le 0` (:meth:`check_stability`). It is a cheap local check (one
    state, time 0): stiffness that develops along the trajectory is not seen. For stiff systems use an implicit or
    adaptive solver (``diffrax.Kvaerno5()`` with ``diffrax.PIDController``).
    """

    vector_field: Callable = eqx.field(static=True)
    dt: float = eqx.field(static=True, default=0.05)
    solver: diffrax.AbstractSolver = eqx.field(static=True, default_factory=diffrax.Tsit5)
    stepsize_controller: diffrax.AbstractStepSizeController = eqx.field(
        static=True, default_factory=diffrax.ConstantStepSize
    )
    adjoint: diffrax.AbstractAdjoint = eqx.field(static=True, default_factory=_default_adjoint)
    max_steps: int = eqx.field(static=True, default=100_000)
    stochastic: ClassVar[bool] = False
    reparameterized: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = False

    def __check_init__(self):
        if not (isinstance(self.dt, int | float) and np.isfinite(self.dt) and self.dt > 0):
            raise ProblemError(f"ODESystem.dt must be a positive finite number, got {self.dt!r}")

    def check_stability(self, theta: PyTree, x0: jax.Array) -> bool:
        r"""Warn with :class:`~pydso.StabilityWarning` if a fixed-step explicit solve is unstable at ``x0``.

        Estimates the local Jacobian :math:`J = \partial f/\partial x` at ``x0`` (time 0) and checks, for each
        eigenvalue :math:`\lambda` with :math:`\mathrm{Re}\,\lambda \le 0` (a decaying or oscillating mode of the
        true solution), the explicit Runge–Kutta stability function :math:`R(z) = 1 + z\,b^\top(I - zA)^{-1}\mathbf 1`
        at :math:`z = \lambda\,dt`: :math:`|R(z)| > 1` means the discrete solution grows where the true one does not
        (for RK4 on the negative real axis this is :math:`|\lambda\,dt| > 2.785`). A cheap local check: it sees
        only the initial state, and only fixed-step explicit solvers with a Butcher tableau (or ``diffrax.Euler``).
        The warning is given once per vector field, step and solver (an optimisation loop checks every step).

        **Returns:** True if the step is inside the stability region (or the check does not apply).
        """
        if not isinstance(self.stepsize_controller, diffrax.ConstantStepSize) or jnp.ndim(x0) != 1:
            return True
        tableau = _explicit_tableau(self.solver)
        if tableau is None:
            return True
        A, b = tableau
        jac = np.asarray(_local_jacobian(self, x0, theta))
        if not np.all(np.isfinite(jac)):
            return True
        lam = np.linalg.eigvals(jac)
        lam = lam[lam.real <= 0]
        if lam.size == 0:
            return True
        z = lam * self.dt
        ones = np.ones(len(b))
        R = np.array([1 + zi * (b @ np.linalg.solve(np.eye(len(b)) - zi * A, ones)) for zi in z])
        worst = int(np.argmax(np.abs(R)))
        if np.abs(R[worst]) > 1 + 1e-3:
            if (self.vector_field, self.dt, type(self.solver)) in _WARNED_UNSTABLE:
                return False  # warned once for this system already (an optimisation loop checks every step)
            _WARNED_UNSTABLE.add((self.vector_field, self.dt, type(self.solver)))
            warnings.warn(
                f"ODESystem: the fixed step dt={self.dt} is outside the stability region of "
                f"{type(self.solver).__name__} at an initial state (Jacobian eigenvalue {lam[worst]:.4g}, "
                f"|lambda dt| = {abs(z[worst]):.3g}, amplification |R| = {abs(R[worst]):.3g} > 1): the simulated "
                "trajectory, its cost and gradient may be finite but wrong. Reduce dt, or use an implicit or "
                "adaptive solver (e.g. solver=diffrax.Kvaerno5(), stepsize_controller=diffrax.PIDController(...)).",
                StabilityWarning,
                stacklevel=4,
            )
            return False
        return True


_WARNED_UNSTABLE: set = set()


def _explicit_tableau(solver) -> "tuple[np.ndarray, np.ndarray] | None":
    """``(A, b)`` of an explicit Runge–Kutta solver (None when it has no explicit Butcher tableau)."""
    if type(solver) is diffrax.Euler:
        return np.zeros((1, 1)), np.ones(1)
    tab = getattr(solver, "tableau", None)
    if not isinstance(tab, diffrax.ButcherTableau) or tab.a_diagonal is not None:
        return None
    s = len(tab.b_sol)
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a_lower):
        A[i + 1, : len(row)] = np.asarray(row)
    return A, np.asarray(tab.b_sol, dtype=float)


def _jacobian_at_zero(system, x, theta):
    t = jnp.zeros((), x.dtype)
    return jax.jacfwd(lambda y: system.vector_field(t, y, theta))(x)


_jacobian_at_zero_jit = eqx.filter_jit(_jacobian_at_zero)
_EAGER_JACOBIANS: dict = {}  # vector field -> number of eager evaluations so far


def _local_jacobian(system, x, theta):
    """The Jacobian of the vector field at ``(0, x)``: eagerly for the first few checks of a vector field (cheaper
    than a compilation for a one-off rollout), compiled from then on (an optimisation loop checks every step)."""
    n = _EAGER_JACOBIANS.get(system.vector_field, 0)
    if n < 3:
        _EAGER_JACOBIANS[system.vector_field] = n + 1
        return _jacobian_at_zero(system, x, theta)
    return _jacobian_at_zero_jit(system, x, theta)


class SDESystem(AbstractSystem):
    r"""A closed-loop Itô SDE :math:`dx = f(t,x,\theta)\,dt + g(t,x,\theta)\odot dW` (diagonal noise).

    Simulated with step ``dt`` by ``solver`` (default ``diffrax.Euler()``, i.e. Euler–Maruyama), so the rollout is
    reparameterised and the pathwise estimator applies. How the Brownian increments are drawn is the backend's
    choice (:class:`pydso.backends.JaxBackend`: its own Gaussian increments on the fast path, or a diffrax virtual
    Brownian tree). :meth:`log_prob` is the Euler–Maruyama transition density :math:`N(x + f\,dt,\ g^2\,dt)`,
    exact for the default solver (use the score estimator only with it).

    The diffusion must be non-negative: :meth:`pydso.Problem.check_theta` checks it at an initial state and
    :func:`pydso.rollout` (``check=True``) names ``diffusion`` where it turns negative along a path. A terminal set
    (:class:`Episodic`, ``g(t, x, theta)``) stops the solve at its zero-crossing on the diffrax path; the crossing
    step's cost and log-density are charged as a full Euler–Maruyama step, so with exits prefer the pathwise
    estimator.
    """

    drift: Callable = eqx.field(static=True)
    diffusion: Callable = eqx.field(static=True)
    dt: float = eqx.field(static=True, default=0.01)
    solver: diffrax.AbstractSolver = eqx.field(static=True, default_factory=diffrax.Euler)
    adjoint: diffrax.AbstractAdjoint = eqx.field(static=True, default_factory=_default_adjoint)
    stochastic: ClassVar[bool] = True
    reparameterized: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = True

    def __check_init__(self):
        if not (isinstance(self.dt, int | float) and np.isfinite(self.dt) and self.dt > 0):
            raise ProblemError(f"SDESystem.dt must be a positive finite number, got {self.dt!r}")

    def log_prob(self, t, x, x_next, theta):
        mean = x + self.drift(t, x, theta) * self.dt
        s = jnp.broadcast_to(self.diffusion(t, x, theta), jnp.shape(x)) * jnp.sqrt(self.dt)
        z = (x_next - mean) / s
        return jnp.sum(-0.5 * z**2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi))


# --------------------------------------------------------------------------------------------- settings
class AbstractSetting(eqx.Module):
    r"""How step costs are weighted: the objective of one episode is
    :math:`\sum_{t<H} w_t L(x_t) + w_H \Phi(x_H)`, and :math:`J(\theta)` is its expectation."""

    horizon: eqx.AbstractVar[int]

    @abc.abstractmethod
    def weights(self) -> tuple[np.ndarray, float]:
        """Step weights ``w`` of shape ``(horizon,)`` and the terminal weight ``w_H``."""

    def terminal_set(self) -> Callable | None:
        return None


def _as_python_scalar(value):
    """NumPy and concrete 0-d JAX scalars (``jnp.float64(0.9)``, ``np.float32(0.9)``) as Python numbers; anything
    else unchanged (and then judged by the field's check)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.generic | np.ndarray) or (isinstance(value, jax.Array) and not _is_tracer(value)):
        a = np.asarray(value)
        if a.shape == () and np.issubdtype(a.dtype, np.integer):
            return int(a)
        if a.shape == () and np.issubdtype(a.dtype, np.floating):
            return float(a)
        return a.tolist()  # never a static array: the field's check then names it
    return value


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _positional_arity(fn) -> int | None:
    """The number of positional parameters ``fn`` takes (None when it cannot be told, or takes ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


class Episodic(AbstractSetting):
    r"""Discounted episodes: :math:`w_t = \gamma^t`, truncated at ``horizon`` steps, optionally ending early in a
    terminal set (first exit): the state is then absorbed at zero cost and its terminal cost paid once.

    **Arguments:**

    - `gamma`: the discount :math:`\gamma \in (0, 1]` (a Python, NumPy or concrete JAX scalar).
    - `horizon`: the number of recorded steps :math:`H`.
    - `terminal`: the terminal set, or None.

      * Discrete-time chains take a **boolean** ``terminal(x)``: the episode ends at the first recorded state where
        it is true.
      * :class:`ODESystem` / :class:`SDESystem` take a **scalar condition** ``g(t, x, theta)`` (or ``g(x)``) whose
        zero-crossing ends the episode: the solve stops at the crossing time, located by a root finder
        (``diffrax.Event`` with ``optimistix.Newton``); the remaining recorded states are absorbed (held at the
        crossing state, zero cost) and the terminal cost is paid at the crossing state (with the weight of the
        first recorded time at or after the crossing). The pathwise gradient accounts for the crossing time
        (diffrax differentiates through the root find). Such problems always run on the diffrax path of the JAX
        backend.

    With a horizon :math:`H`, the truncation bias of :math:`J` is of order :math:`\gamma^H/(1-\gamma)`; choose
    :math:`H \gg 1/(1-\gamma)` when the infinite-horizon value is meant. :math:`\gamma = 1` needs a terminal set
    that is reached with probability 1 for the infinite-horizon value to be finite (:mod:`pydso.exact` checks it).
    """

    gamma: float = eqx.field(static=True, default=0.99, converter=_as_python_scalar)
    horizon: int = eqx.field(static=True, default=200, converter=_as_python_scalar)
    terminal: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, int | float) or not np.isfinite(g) or not (0.0 < g <= 1.0):
            raise ProblemError(f"Episodic.gamma must be a number in (0, 1], got {g!r}")
        check_positive_int(self.horizon, "Episodic.horizon")
        if self.terminal is not None and not callable(self.terminal):
            raise ProblemError(
                "Episodic.terminal must be a callable (terminal(x) -> bool for chains, g(t, x, theta) -> scalar "
                f"for ODE/SDE systems) or None, got {type(self.terminal).__name__}"
            )

    def weights(self):
        return self.gamma ** np.arange(self.horizon, dtype=np.float64), float(self.gamma**self.horizon)

    def terminal_set(self):
        return self.terminal

    def exit_condition(self, t: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        """The scalar condition of a continuous system's terminal set at ``(t, x)``: ``terminal(t, x, theta)``, or
        ``terminal(x)`` for a one-argument callable."""
        if _positional_arity(self.terminal) == 1:
            return self.terminal(x)
        return self.terminal(t, x, theta)


class AverageCost(AbstractSetting):
    r"""Average cost per step of an ergodic chain: :math:`w_t = 1/(H-B)` for :math:`B \le t < H`
    (``burn_in`` :math:`B`), no terminal cost. The finite-:math:`H` objective converges to the average cost
    :math:`J = \pi^\top L` as :math:`H \to \infty`; its gradient estimators are exact for the finite-H objective.
    """

    horizon: int = eqx.field(static=True, default=1000, converter=_as_python_scalar)
    burn_in: int = eqx.field(static=True, default=0, converter=_as_python_scalar)

    def __check_init__(self):
        check_positive_int(self.horizon, "horizon")
        if not isinstance(self.burn_in, int | np.integer) or not (0 <= self.burn_in < self.horizon):
            raise ProblemError(f"AverageCost.burn_in must be an integer in [0, horizon), got {self.burn_in!r}")

    def weights(self):
        w = np.zeros(self.horizon)
        w[self.burn_in :] = 1.0 / (self.horizon - self.burn_in)
        return w, 0.0


class FiniteHorizon(AbstractSetting):
    r"""Undiscounted finite horizon: :math:`w_t = 1` for :math:`t < T` and :math:`w_T = 1`."""

    horizon: int = eqx.field(static=True, default=100, converter=_as_python_scalar)

    def __check_init__(self):
        check_positive_int(self.horizon, "horizon")

    def weights(self):
        return np.ones(self.horizon), 1.0


# --------------------------------------------------------------------------------------------- initial
class AbstractInitial(eqx.Module):
    """An initial distribution :math:`P_0`."""

    @abc.abstractmethod
    def sample(self, key: jax.Array) -> jax.Array: ...


def _float_array(x, name):
    """Check in NumPy (no JAX dispatch or compilation at construction), return a JAX array."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(float)
    if not np.all(np.isfinite(a)):
        raise ProblemError(f"{name} contains non-finite values")
    return jnp.asarray(a)


class Fixed(AbstractInitial):
    """Every episode starts at ``x0``."""

    x0: jax.Array

    def __init__(self, x0):
        self.x0 = jnp.asarray(x0)

    def sample(self, key):
        return self.x0


class Normal(AbstractInitial):
    """:math:`x_0 \\sim N(\\text{mean}, \\text{diag}(\\text{std}^2))`."""

    mean: jax.Array
    std: jax.Array

    def __init__(self, mean, std):
        self.mean = _float_array(mean, "Normal.mean")
        std = np.broadcast_to(np.asarray(_float_array(std, "Normal.std")), self.mean.shape)
        if np.any(std < 0):
            raise ProblemError("Normal.std must be non-negative")
        self.std = jnp.asarray(std)

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class Uniform(AbstractInitial):
    """:math:`x_0 \\sim U[\\text{low}, \\text{high}]` componentwise."""

    low: jax.Array
    high: jax.Array

    def __init__(self, low, high):
        self.low = _float_array(low, "Uniform.low")
        self.high = _float_array(high, "Uniform.high")
        if self.low.shape != self.high.shape:
            raise ProblemError(f"Uniform.low shape {self.low.shape} != Uniform.high shape {self.high.shape}")
        if np.any(np.asarray(self.high) < np.asarray(self.low)):
            raise ProblemError("Uniform.high must be >= Uniform.low componentwise")

    def sample(self, key):
        return jax.random.uniform(key, self.low.shape, self.low.dtype, self.low, self.high)


class Categorical(AbstractInitial):
    """:math:`x_0 \\sim` a categorical distribution ``probs`` over ``0..S-1`` (for :class:`TabularChain`)."""

    probs: jax.Array

    def __init__(self, probs):
        p = np.asarray(_float_array(probs, "Categorical.probs"))
        if p.ndim != 1 or np.any(p < 0) or not abs(np.sum(p) - 1) < 1e-8:
            raise ProblemError("Categorical.probs must be a 1-D probability vector summing to 1")
        self.probs = jnp.asarray(p)

    def sample(self, key):
        return jax.random.categorical(key, jnp.log(self.probs)).astype(jnp.int32)


class Empirical(AbstractInitial):
    """:math:`x_0` drawn uniformly from given ``states`` of shape ``(m, *state_shape)`` (e.g. logged data)."""

    states: jax.Array

    def __init__(self, states):
        self.states = _float_array(states, "Empirical.states")
        if self.states.ndim < 1 or self.states.shape[0] == 0:
            raise ProblemError("Empirical.states must have shape (m, *state_shape) with m >= 1")

    def sample(self, key):
        return self.states[jax.random.randint(key, (), 0, self.states.shape[0])]


# --------------------------------------------------------------------------------------------- problem


class Problem(eqx.Module):
    r"""A DSO problem: ``system`` + step ``cost`` + ``setting`` + ``initial`` (+ ``terminal_cost``).

    **Arguments:**

    - `system`: the transition law (a chain, :class:`ODESystem` or :class:`SDESystem`).
    - `cost`: the running cost :math:`L`: ``cost(x, theta) -> scalar``, or ``cost(t, x, theta)`` with
      ``time_varying=True`` (``t`` the time of ``x``). For :class:`ODESystem` / :class:`SDESystem` it is a rate,
      integrated over each interval ``dt``.
    - `setting`: :class:`Episodic`, :class:`AverageCost` or :class:`FiniteHorizon`.
    - `initial`: the initial distribution :math:`P_0`.
    - `terminal_cost`: optional :math:`\Phi`: ``terminal_cost(x, theta)`` (``terminal_cost(t, x, theta)`` when
      time-varying, ``t`` the time of the state where the episode ends).
    - `name`: a name used in messages and stores.
    - `theta_example`: optional parameter pytree used to check shapes at construction: the vector field or
      transition must map a state of the initial distribution's shape to the same shape, and costs must be scalars.
    - `time_varying`: whether ``cost`` and ``terminal_cost`` receive the time first (default False).

    Code that evaluates costs calls :meth:`running_cost`, :meth:`step_cost` and :meth:`final_cost`, which take the
    time in every case and dispatch on ``time_varying``. Errors name the part of the problem that is inconsistent.
    """

    system: AbstractSystem
    cost: Callable = eqx.field(static=True)
    setting: AbstractSetting
    initial: AbstractInitial
    terminal_cost: Callable | None = eqx.field(static=True, default=None)
    name: str = eqx.field(static=True, default="problem")
    time_varying: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        system,
        cost,
        setting,
        initial,
        terminal_cost=None,
        *,
        name="problem",
        theta_example=None,
        time_varying: bool = False,
    ):
        if not isinstance(system, AbstractSystem):
            raise ProblemError(f"system must be a pydso system (MarkovChain, ODESystem, ...), got {type(system)}")
        if not callable(cost):
            raise ProblemError(f"cost must be a callable cost(x, theta) -> scalar, got {type(cost)}")
        if not isinstance(setting, AbstractSetting):
            raise ProblemError(f"setting must be Episodic, AverageCost or FiniteHorizon, got {type(setting)}")
        if not isinstance(initial, AbstractInitial):
            raise ProblemError(f"initial must be a pydso initial distribution, got {type(initial)}")
        if terminal_cost is not None and not callable(terminal_cost):
            raise ProblemError("terminal_cost must be a callable terminal_cost(x, theta) -> scalar or None")
        if not isinstance(time_varying, bool):
            raise ProblemError(f"time_varying must be a bool, got {time_varying!r}")
        terminal = setting.terminal_set()
        if terminal is not None:
            arity = _positional_arity(terminal)
            if isinstance(system, ODESystem | SDESystem):
                if arity not in (None, 1, 3):
                    raise ProblemError(
                        "Episodic.terminal for an ODE/SDE system must be a scalar condition g(t, x, theta) or g(x) "
                        f"whose zero-crossing ends the episode; got a callable of {arity} arguments"
                    )
            elif arity not in (None, 1):
                raise ProblemError(
                    "Episodic.terminal for a discrete-time chain must be a boolean terminal(x); got a callable of "
                    f"{arity} arguments"
                )
        self.system = system
        self.cost = cost
        self.setting = setting
        self.initial = initial
        self.terminal_cost = terminal_cost
        self.name = name
        self.time_varying = time_varying
        self._check_initial()
        if theta_example is not None:
            self.check_theta(theta_example)

    # ----------------------------------------------------------------------------------------- costs
    def running_cost(self, t: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        r"""The user's running cost :math:`L_t(x, \theta)` at the time ``t`` of ``x`` (a rate for ODE/SDE systems):
        ``cost(t, x, theta)`` if the problem is time-varying, else ``cost(x, theta)``."""
        return self.cost(t, x, theta) if self.time_varying else self.cost(x, theta)

    def step_cost(self, t: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        r"""The cost of one recorded step from state ``x`` at time ``t`` as it enters the objective:
        :math:`L_t(x,\theta)` for discrete-time chains, :math:`L_t(x,\theta)\,dt` for :class:`SDESystem` (the
        Euler–Maruyama rule of its running-cost integral). Every estimator that re-evaluates step costs on fixed
        states uses this, so that it agrees with the rollout's objective. (ODE costs are interval integrals
        computed by the solver.)"""
        c = self.running_cost(t, x, theta)
        return c * self.system.dt if isinstance(self.system, SDESystem) else c

    def final_cost(self, t: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        r"""The terminal cost :math:`\Phi(x, \theta)` at the state ``x`` where the episode ends, at time ``t``
        (zero without a ``terminal_cost``)."""
        if self.terminal_cost is None:
            return jnp.zeros((), jnp.result_type(float))
        return self.terminal_cost(t, x, theta) if self.time_varying else self.terminal_cost(x, theta)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.initial.sample, jax.random.key(0)).shape)

    # ----------------------------------------------------------------------------------------- checks
    def _check_initial(self) -> None:
        """The initial state's dtype must suit the system (floating for continuous systems)."""
        x = jax.eval_shape(self.initial.sample, jax.random.key(0))
        if isinstance(self.system, ODESystem | SDESystem | GaussianChain) and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ProblemError(
                f"initial: a {type(self.system).__name__} needs a floating-point initial state, got dtype {x.dtype}; "
                "pass floats, e.g. Fixed(jnp.array([1.0, 0.0]))"
            )

    def check_theta(self, theta: PyTree) -> None:
        """Raise :class:`ProblemError` unless ``theta`` is finite and the system maps states to states with it.

        Also checks, where they can be evaluated concretely at a sampled initial state: tabular transition
        matrices (row-stochastic), Gaussian noise scales and SDE diffusions (positive, resp. non-negative), and warns
        with :class:`~pydso.StabilityWarning` when a fixed-step explicit ODE solve is outside its stability region
        (:meth:`ODESystem.check_stability`)."""
        check_finite_tree(theta, "theta")
        for path, leaf in jax.tree_util.tree_flatten_with_path(theta)[0]:
            dt = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            if jnp.issubdtype(dt, jnp.integer) and not isinstance(self.system, TabularChain):
                raise ProblemError(
                    f"theta{jax.tree_util.keystr(path)} has integer dtype {dt}; pydso differentiates in theta: pass "
                    "floats (e.g. 2.0, not 2)"
                )
        signature = _shape_signature(theta)
        if not _shapes_checked(self, signature):
            self._check_shapes(theta)
            _remember_shapes_checked(self, signature)
        if not _has_tracer(theta):
            self._check_concrete(theta)

    def _check_shapes(self, theta: PyTree) -> None:
        """The structural checks of :meth:`check_theta` (abstract evaluation only; they depend on theta's pytree
        structure, shapes and dtypes, not its values, so each signature is checked once per problem)."""
        x = jax.eval_shape(self.initial.sample, jax.random.key(0))
        key = jax.random.key(0)
        t0 = jnp.zeros((), jnp.result_type(float))
        try:
            if isinstance(self.system, ODESystem):
                out = jax.eval_shape(self.system.vector_field, t0, x, theta)
                what = "vector_field(t, x, theta)"
            elif isinstance(self.system, SDESystem):
                out = jax.eval_shape(self.system.drift, t0, x, theta)
                what = "drift(t, x, theta)"
                g = jax.eval_shape(self.system.diffusion, t0, x, theta)
                if jnp.broadcast_shapes(g.shape, x.shape) != x.shape:
                    raise ProblemError(
                        f"diffusion(t, x, theta) has shape {g.shape}, not broadcastable to the state {x.shape}"
                    )
            else:
                out = jax.eval_shape(self.system.sample, key, t0, x, theta)
                what = "the transition sample(key, t, x, theta)"
            c = jax.eval_shape(self.running_cost, t0, x, theta)
        except ProblemError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ProblemError(
                f"the system or cost cannot be evaluated at an initial state of shape {x.shape} (from `initial`) "
                f"with this theta: check that `initial` has the system's state dimension and that theta has the "
                f"expected pytree structure and shapes. {type(e).__name__}: {e}"
            ) from e
        if not hasattr(out, "shape") or out.shape != x.shape:
            shape = getattr(out, "shape", type(out))
            raise ProblemError(
                f"{what} returns shape {shape} but the initial state has shape {x.shape}; check that initial has "
                "the system's dimension (pydso never broadcasts states silently)"
            )
        if c.shape != ():
            raise ProblemError(f"cost(x, theta) must return a scalar, got shape {c.shape}")
        if self.terminal_cost is not None:
            tc = jax.eval_shape(self.final_cost, t0, x, theta)
            if tc.shape != ():
                raise ProblemError(f"terminal_cost(x, theta) must return a scalar, got shape {tc.shape}")

    def _check_concrete(self, theta: PyTree) -> None:
        """The value checks of :meth:`check_theta` that need a concrete ``theta`` (a few eager operations)."""
        system = self.system
        if isinstance(system, TabularChain):
            if system.time_varying:  # every P_t, up to ~1e6 entries (later ones: by rollout's log-density check)
                S = int(jax.eval_shape(lambda: system.matrix(0.0, theta)).shape[0])
                n_t = max(1, min(self.setting.horizon, 1_000_000 // max(S * S, 1)))
                ts = jnp.arange(n_t, dtype=jnp.result_type(float))
                Ps = np.asarray(jax.vmap(lambda t: system.matrix(t, theta))(ts))
            else:
                Ps = np.asarray(system.matrix(0.0, theta))[None]
            for t, P in enumerate(Ps):
                _check_stochastic_matrix(P, "TabularChain.transition_fn" + (f" (at t={t})" if len(Ps) > 1 else ""))
            return
        if not isinstance(system, GaussianChain | SDESystem | ODESystem):
            return
        x0 = self.initial.sample(jax.random.key(0))
        if isinstance(system, GaussianChain) and (callable(system.scale) or callable(system.scale_tril)):
            if callable(system.scale):
                s = np.asarray(_eval_noise(system, "scale", x0, theta))
                if not (np.all(np.isfinite(s)) and np.all(s > 0)):
                    raise ProblemError(
                        f"GaussianChain.scale(x, theta) must be positive and finite; at an initial state it is {s}"
                    )
            else:
                d = np.diag(np.asarray(_eval_noise(system, "scale_tril", x0, theta)))
                if not (np.all(np.isfinite(d)) and np.all(d > 0)):
                    raise ProblemError(
                        "GaussianChain.scale_tril(x, theta) must have a positive diagonal; at an initial state it is "
                        f"{d}"
                    )
        elif isinstance(system, SDESystem):
            g = np.asarray(_eval_noise(system, "diffusion", x0, theta))
            if not (np.all(np.isfinite(g)) and np.all(g >= 0)):
                raise ProblemError(
                    f"SDESystem.diffusion(t, x, theta) must be non-negative and finite; at an initial state it is {g}"
                )
        elif isinstance(system, ODESystem):
            system.check_stability(theta, x0)


def _has_tracer(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def _eval_noise(system, which, x, theta):
    """A noise scale at ``(0, x)``, evaluated eagerly (a handful of operations: cheaper than a compilation)."""
    t = jnp.zeros((), x.dtype)
    if which == "diffusion":
        return system.diffusion(t, x, theta)
    return system.noise_scale(t, x, theta)


# Problems whose structural checks passed, per theta signature (treedef, leaf shapes and dtypes): an eager rollout
# of a small batch otherwise spends most of its time re-tracing the same abstract evaluations. Keyed by id with a
# weak reference, so a problem that is garbage-collected leaves no entry (and a reused id is never mistaken).
_SHAPES_CHECKED: dict[int, tuple[weakref.ref, set]] = {}


def _shape_signature(theta: PyTree):
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    return treedef, tuple((tuple(jnp.shape(leaf)), jnp.result_type(leaf)) for leaf in leaves)


def _shapes_checked(problem: "Problem", signature) -> bool:
    entry = _SHAPES_CHECKED.get(id(problem))
    return entry is not None and entry[0]() is problem and signature in entry[1]


def _remember_shapes_checked(problem: "Problem", signature) -> None:
    key = id(problem)
    entry = _SHAPES_CHECKED.get(key)
    if entry is None or entry[0]() is not problem:
        entry = (weakref.ref(problem, lambda _, key=key: _SHAPES_CHECKED.pop(key, None)), set())
        _SHAPES_CHECKED[key] = entry
    entry[1].add(signature)
