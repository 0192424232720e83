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
Time-varying systems carry time in the state (append ``t`` as a component); this keeps one mechanism for all.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_finite_tree, check_positive_int
from ._errors import ProblemError
from ._typing import PyTree

__all__ = [
    "AbstractSystem",
    "AbstractChain",
    "MarkovChain",
    "GaussianChain",
    "TabularChain",
    "DeterministicMap",
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
        raise ProblemError(f"{type(self).__name__} has no transition log-density; use the pathwise estimator")

    def path_log_prob(self, states: jax.Array, theta: PyTree) -> jax.Array:
        r""":math:`\log P(x_{k+1}\mid x_k,\theta)` along one episode's states ``(H+1, ...)``, shape ``(H,)``.
        The states are held fixed (``stop_gradient``): the result is differentiable in ``theta`` only."""
        states = jax.lax.stop_gradient(states)
        ts = jnp.arange(states.shape[0] - 1, dtype=jnp.result_type(float)) * self.time_step
        return jax.vmap(self.log_prob, in_axes=(0, 0, 0, None))(ts, states[:-1], states[1:], theta)


class AbstractChain(AbstractSystem):
    r"""A discrete-time Markov chain :math:`x_{t+1} \sim P(\cdot \mid x_t, \theta)`."""

    @abc.abstractmethod
    def sample(self, key: jax.Array, x: jax.Array, theta: PyTree) -> jax.Array:
        """Draw :math:`x' \\sim P(\\cdot\\mid x,\\theta)`; differentiable in ``theta`` if reparameterised."""


class MarkovChain(AbstractChain):
    r"""A general chain given by a sampler and its log-density.

    ``sample_fn(key, x, theta) -> x_next`` and ``log_prob_fn(x, x_next, theta) -> scalar``. Set
    ``reparameterized=True`` only if ``sample_fn`` is differentiable in ``theta`` with the key fixed
    (then the pathwise estimator may be used); otherwise use the score estimator (DESIGN.md §1.1).
    """

    sample_fn: Callable = eqx.field(static=True)
    log_prob_fn: Callable = eqx.field(static=True)
    reparameterized: bool = eqx.field(static=True, default=False)
    stochastic: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = True

    def sample(self, key, x, theta):
        return self.sample_fn(key, x, theta)

    def log_prob(self, t, x, x_next, theta):
        return self.log_prob_fn(x, x_next, theta)


class GaussianChain(AbstractChain):
    r"""Gaussian transitions :math:`x' = m(x,\theta) + \sigma(x,\theta)\odot\varepsilon`, with
    :math:`\varepsilon\sim N(0,I)`.

    ``mean_fn(x, theta)`` gives the mean; ``scale`` is a positive float, an array broadcastable to the state,
    or a callable ``scale(x, theta)`` (diagonal noise). The log-density is closed form and sampling is
    reparameterised, so both the score and the pathwise estimators apply. For noise-free dynamics use
    :class:`DeterministicMap` (a zero scale has no density).
    """

    mean_fn: Callable = eqx.field(static=True)
    scale: Any = 1.0
    stochastic: ClassVar[bool] = True
    reparameterized: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = True

    def _scale(self, x, theta):
        s = self.scale(x, theta) if callable(self.scale) else jnp.asarray(self.scale)
        return jnp.broadcast_to(s, jnp.shape(x))

    def sample(self, key, x, theta):
        mean = self.mean_fn(x, theta)
        return mean + self._scale(x, theta) * jax.random.normal(key, jnp.shape(mean), jnp.result_type(mean))

    def log_prob(self, t, x, x_next, theta):
        mean = self.mean_fn(x, theta)
        s = self._scale(x, theta)
        z = (x_next - mean) / s
        return jnp.sum(-0.5 * z**2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi))


class TabularChain(AbstractChain):
    r"""A finite chain on states ``0..S-1``: ``transition_fn(theta)`` returns the row-stochastic ``(S, S)`` matrix.

    The state is an integer scalar. :mod:`pydso.exact` computes everything about it in closed form; the
    Monte-Carlo estimators are tested against that. Not reparameterisable: use the score estimator.
    """

    transition_fn: Callable = eqx.field(static=True)
    stochastic: ClassVar[bool] = True
    reparameterized: ClassVar[bool] = False
    has_log_prob: ClassVar[bool] = True

    def sample(self, key, x, theta):
        p = self.transition_fn(theta)[x]
        return jax.random.categorical(key, jnp.log(p)).astype(jnp.asarray(x).dtype)

    def log_prob(self, t, x, x_next, theta):
        return jnp.log(self.transition_fn(theta)[x, x_next])


class DeterministicMap(AbstractChain):
    r"""A deterministic closed loop :math:`x_{t+1} = f(x_t, \theta)` (randomness only in :math:`P_0`).

    Use the pathwise estimator (backpropagation through the rollout, DESIGN.md §1.2).
    """

    step_fn: Callable = eqx.field(static=True)
    stochastic: ClassVar[bool] = False
    reparameterized: ClassVar[bool] = True
    has_log_prob: ClassVar[bool] = False

    def sample(self, key, x, theta):
        return self.step_fn(x, theta)


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


class SDESystem(AbstractSystem):
    r"""A closed-loop Itô SDE :math:`dx = f(t,x,\theta)\,dt + g(t,x,\theta)\odot dW` (diagonal noise).

    Simulated with step ``dt`` by ``solver`` (default ``diffrax.Euler()``, i.e. Euler–Maruyama), so the rollout is
    reparameterised and the pathwise estimator applies. How the Brownian increments are drawn is the backend's
    choice (:class:`pydso.backends.JaxBackend`: its own Gaussian increments on the fast path, or a diffrax virtual
    Brownian tree). :meth:`log_prob` is the Euler–Maruyama transition density :math:`N(x + f\,dt,\ g^2\,dt)`,
    exact for the default solver (use the score estimator only with it).
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


class Episodic(AbstractSetting):
    r"""Discounted episodes: :math:`w_t = \gamma^t`, truncated at ``horizon`` steps, optionally ending early when
    ``terminal(x)`` is true (the state is then absorbed at zero cost, its terminal cost paid once).

    With a horizon :math:`H`, the truncation bias of :math:`J` is of order :math:`\gamma^H/(1-\gamma)`; choose
    :math:`H \gg 1/(1-\gamma)` when the infinite-horizon value is meant.
    """

    gamma: float = eqx.field(static=True, default=0.99)
    horizon: int = eqx.field(static=True, default=200)
    terminal: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        g = self.gamma
        if not isinstance(g, int | float) or not np.isfinite(g) or not (0.0 < g <= 1.0):
            raise ProblemError(f"Episodic.gamma must lie in (0, 1], got {g!r}")
        check_positive_int(self.horizon, "horizon")
        if self.terminal is not None and not callable(self.terminal):
            raise ProblemError("Episodic.terminal must be a callable terminal(x) -> bool or None")

    def weights(self):
        return self.gamma ** np.arange(self.horizon, dtype=np.float64), float(self.gamma**self.horizon)

    def terminal_set(self):
        return self.terminal


class AverageCost(AbstractSetting):
    r"""Average cost per step of an ergodic chain: :math:`w_t = 1/(H-B)` for :math:`B \le t < H`
    (``burn_in`` :math:`B`), no terminal cost. The finite-:math:`H` objective converges to the average cost
    :math:`J = \pi^\top L` as :math:`H \to \infty`; its gradient estimators are exact for the finite-H objective.
    """

    horizon: int = eqx.field(static=True, default=1000)
    burn_in: int = eqx.field(static=True, default=0)

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

    horizon: int = eqx.field(static=True, default=100)

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
    r"""A DSO problem: ``system`` + step ``cost(x, theta)`` + ``setting`` + ``initial`` (+ ``terminal_cost``).

    For :class:`ODESystem` / :class:`SDESystem` the cost is a rate, integrated over each interval ``dt``.
    ``theta_example`` (optional) is a parameter pytree used to check shapes at construction: the vector
    field or transition must map a state of the initial distribution's shape to the same shape, and costs
    must be scalars. Errors name the part of the problem that is inconsistent.
    """

    system: AbstractSystem
    cost: Callable = eqx.field(static=True)
    setting: AbstractSetting
    initial: AbstractInitial
    terminal_cost: Callable | None = eqx.field(static=True, default=None)
    name: str = eqx.field(static=True, default="problem")

    def __init__(self, system, cost, setting, initial, terminal_cost=None, *, name="problem", theta_example=None):
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
        if isinstance(system, ODESystem | SDESystem) and setting.terminal_set() is not None:
            raise ProblemError("terminal sets are supported for discrete-time chains only, not for ODE/SDE systems")
        self.system = system
        self.cost = cost
        self.setting = setting
        self.initial = initial
        self.terminal_cost = terminal_cost
        self.name = name
        if theta_example is not None:
            self.check_theta(theta_example)

    def step_cost(self, x: jax.Array, theta: PyTree) -> jax.Array:
        r"""The cost of one recorded step from state ``x`` as it enters the objective: :math:`L(x,\theta)` for
        discrete-time chains, :math:`L(x,\theta)\,dt` for :class:`SDESystem` (the Euler–Maruyama rule of its
        running-cost integral). Every estimator that re-evaluates step costs on fixed states uses this, so that
        it agrees with the rollout's objective. (ODE costs are interval integrals computed by the solver.)"""
        c = self.cost(x, theta)
        return c * self.system.dt if isinstance(self.system, SDESystem) else c

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.initial.sample, jax.random.key(0)).shape)

    def check_theta(self, theta: PyTree) -> None:
        """Raise :class:`ProblemError` unless ``theta`` is finite and the system maps states to states with it."""
        check_finite_tree(theta, "theta")
        x = jax.eval_shape(self.initial.sample, jax.random.key(0))
        key = jax.random.key(0)
        try:
            if isinstance(self.system, ODESystem):
                out = jax.eval_shape(self.system.vector_field, 0.0, x, theta)
                what = "vector_field(t, x, theta)"
            elif isinstance(self.system, SDESystem):
                out = jax.eval_shape(self.system.drift, 0.0, x, theta)
                what = "drift(t, x, theta)"
                g = jax.eval_shape(self.system.diffusion, 0.0, x, theta)
                if jnp.broadcast_shapes(g.shape, x.shape) != x.shape:
                    raise ProblemError(
                        f"diffusion(t, x, theta) has shape {g.shape}, not broadcastable to the state {x.shape}"
                    )
            else:
                out = jax.eval_shape(self.system.sample, key, x, theta)
                what = "the transition sample(key, x, theta)"
            c = jax.eval_shape(self.cost, x, theta)
        except ProblemError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ProblemError(
                f"the system or cost cannot be evaluated with this theta (wrong pytree structure or shapes?): "
                f"{type(e).__name__}: {e}"
            ) from e
        if not hasattr(out, "shape") or out.shape != x.shape:
            shape = getattr(out, "shape", type(out))
            raise ProblemError(
                f"{what} returns shape {shape} but the initial state has shape {x.shape}; "
                "pydso never broadcasts states silently"
            )
        if c.shape != ():
            raise ProblemError(f"cost(x, theta) must return a scalar, got shape {c.shape}")
        if self.terminal_cost is not None:
            tc = jax.eval_shape(self.terminal_cost, x, theta)
            if tc.shape != ():
                raise ProblemError(f"terminal_cost(x, theta) must return a scalar, got shape {tc.shape}")
