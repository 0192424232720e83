r"""Control tasks as policy-optimisation problems: :func:`pendulum`, :func:`cart_pole`, :func:`two_link_arm`.

A control task is a plant :math:`x_{t+1} = f(x_t, u_t)` closed by a parametric policy :math:`u_t = \pi_\theta(x_t)`:
the closed loop :math:`x_{t+1} = f(x_t, \pi_\theta(x_t))` is a :class:`pydso.DeterministicMap` (randomness in the
initial state only), with a step cost :math:`L(x, \pi_\theta(x))`. Each constructor returns a
:class:`ControlTask` (the contract of :mod:`pydso.problems`): ``task.problem`` is the *training* problem (a short,
discounted horizon from a wide start distribution: well conditioned for the pathwise gradient, DESIGN.md §3),
``task.theta0`` the policy's arrays, and ``task.result(theta, key=...)`` the report on the *task itself* (its own
start distribution, its full undiscounted horizon, its success criterion). Train with the package's methods::

    task = pydso.problems.control.cart_pole(key=jax.random.key(0))
    out = pydso.minimize(task.problem, task.theta0, key=key, steps=..., method=pydso.Gradient(...))
    print(task.result(out.theta, key=jax.random.key(1)))

or with the shortcut :meth:`ControlTask.fit` (the same ``minimize`` with clipped, cosine-decayed Adam).

Policies are equinox modules: :class:`MLPPolicy` (``limit * tanh(MLP(observe(x)))``) and :class:`LinearPolicy`
(:math:`u = -Kx`); ``theta`` is their array leaves (``eqx.partition(policy, eqx.is_inexact_array)``), the rest is
``task.static``. The success criteria:

=====================  =======================================================================================
task                   success of one episode (judged at its last state)
=====================  =======================================================================================
:func:`pendulum`       gymnasium's Pendulum-v1, 200 steps: :math:`|\theta| \le 10^\circ` from upright and
                       :math:`|\dot\theta| \le 1` rad/s (the task counts as solved at a mean return of about -200)
:func:`cart_pole`      swing-up from hanging down: pole within 10 degrees of upright and the cart within the
                       track bounds :math:`|x| \le 2.4` m at the end of the episode (the task: >= 90% of episodes)
:func:`two_link_arm`   planar two-link arm reaching a random target: hand within 5 cm of the target and joint
                       speeds below 0.5 rad/s at the end of the episode
=====================  =======================================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._checks import check_key, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..engine import rollout
from ..estimators import Pathwise
from ..optimize import Gradient, OptimizeResult, minimize
from ..systems import AbstractInitial, DeterministicMap, Episodic, Problem, Uniform
from ._contract import AbstractConstructedProblem

__all__ = [
    "MLPPolicy",
    "LinearPolicy",
    "split_policy",
    "ControlTask",
    "ControlResult",
    "pendulum",
    "pendulum_problem",
    "pendulum_plant",
    "cart_pole_plant",
    "cart_pole_accelerations",
    "two_link_arm_plant",
    "pendulum_observe",
    "angle_normalize",
    "cart_pole",
    "two_link_arm",
    "PENDULUM",
]


# --------------------------------------------------------------------------------------------- policies
class MLPPolicy(eqx.Module):
    r"""A multilayer-perceptron policy :math:`u = c\,\tanh(\mathrm{MLP}(o(x)))` (or :math:`\mathrm{MLP}(o(x))`
    without a limit :math:`c`), with an observation map :math:`o` (default: the state itself).

    **Arguments:**

    - `in_size`: size of the observation :math:`o(x)`.
    - `out_size`: size of the action, or ``"scalar"`` for a scalar action.
    - `key`: PRNG key of the initial weights (keyword-only).
    - `width`, `depth`: hidden width and number of hidden layers (default 64, 2).
    - `limit`: the bound :math:`c` of the action (``None``: unbounded, linear output).
    - `observe`: ``observe(x) -> o`` (a pure function, e.g. angles to cos/sin); default identity.
    - `activation`: hidden activation (default ``jnp.tanh``).

    Do not use it where a linear gain is the right class (LQR-like problems): :class:`LinearPolicy` is exact there
    and far better conditioned.
    """

    mlp: eqx.nn.MLP
    limit: float | None = eqx.field(static=True)
    observe: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int | str,
        *,
        key: jax.Array,
        width: int = 64,
        depth: int = 2,
        limit: float | None = None,
        observe: Callable | None = None,
        activation: Callable = jnp.tanh,
    ):
        self.mlp = eqx.nn.MLP(in_size, out_size, width, depth, activation=activation, key=key)
        self.limit = None if limit is None else float(limit)
        self.observe = observe

    def act(self, obs: jax.Array) -> jax.Array:
        """The action from an observation."""
        y = self.mlp(jnp.asarray(obs, jnp.result_type(float)))
        return y if self.limit is None else self.limit * jnp.tanh(y)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The action from the state."""
        return self.act(x if self.observe is None else self.observe(x))


class LinearPolicy(eqx.Module):
    r"""A linear state feedback :math:`u = -Kx` (``gain`` :math:`K` of shape ``(m, d)``, or ``(d,)`` for a scalar
    action :math:`u = -k^\top x`). The class of LQR controllers."""

    gain: jax.Array

    def __init__(self, gain):
        g = jnp.asarray(gain, dtype=jnp.result_type(float))
        if g.ndim not in (1, 2):
            raise ProblemError(f"LinearPolicy.gain must have shape (m, d) or (d,), got {g.shape}")
        self.gain = g

    def __call__(self, x: jax.Array) -> jax.Array:
        return -(self.gain @ x)


def split_policy(policy) -> tuple[PyTree, PyTree]:
    """``(theta, static)`` of a policy module: ``theta`` its floating-point arrays (what pydso optimises),
    ``static`` the rest; ``eqx.combine(theta, static)`` rebuilds it."""
    return eqx.partition(policy, eqx.is_inexact_array)


def _check_policy(policy, name: str = "policy") -> None:
    if not callable(policy):
        raise ProblemError(f"{name} must be a callable policy module (policy(x) -> u), got {type(policy).__name__}")
    if not jax.tree.leaves(eqx.filter(policy, eqx.is_inexact_array)):
        raise ProblemError(
            f"{name} has no floating-point array parameters to optimise; pass an equinox module such as "
            "pydso.problems.control.MLPPolicy or LinearPolicy"
        )


# --------------------------------------------------------------------------------------------- the task type
@dataclasses.dataclass(frozen=True)
class ControlResult:
    """The report of :meth:`ControlTask.result` on the task's own episodes.

    **Attributes:** ``mean_return`` and ``std_return`` (return = minus the undiscounted sum of step costs),
    ``success_rate`` (fraction of episodes meeting the task's success criterion), ``returns`` and ``success``
    (per episode), ``final_states`` (``(n, d)``), ``criterion`` (the criterion in words) and ``info`` (how theta
    was obtained)."""

    mean_return: float
    std_return: float
    success_rate: float
    returns: np.ndarray
    success: np.ndarray
    final_states: np.ndarray
    criterion: str
    info: dict


class ControlTask(AbstractConstructedProblem):
    r"""A control task (module docstring): a training problem, the task's own evaluation problem, the policy
    split into ``theta0`` (arrays) and ``static``, and a success criterion on the final state.

    **Attributes:**

    - ``train_problem`` (also ``problem``): the :class:`pydso.Problem` the optimiser minimises.
    - ``eval_problem``: the task as defined (its start distribution, its horizon, undiscounted).
    - ``theta0``, ``static``: the initial policy's arrays and the rest of it.
    - ``success_fn``: ``success_fn(final_state) -> bool``; ``criterion``: the criterion in words.
    - ``fit_defaults``: the task's full-size training settings used by :meth:`fit` (``(name, value)`` pairs).
    """

    train_problem: Problem
    eval_problem: Problem
    theta0: PyTree
    static: PyTree
    success_fn: Callable = eqx.field(static=True)
    criterion: str = eqx.field(static=True)
    name: str = eqx.field(static=True)
    fit_defaults: tuple = eqx.field(static=True, default=())

    @property
    def problem(self) -> Problem:
        return self.train_problem

    def policy(self, theta: PyTree):
        """The policy module with parameters ``theta``."""
        return eqx.combine(theta, self.static)

    def result(self, theta: PyTree, *, key: jax.Array | None = None, n: int = 100, **info) -> ControlResult:
        """Simulate ``n`` fresh episodes of the task (``eval_problem``, key default ``jax.random.key(1)``) and
        report their returns and success (:class:`ControlResult`)."""
        key = jax.random.key(1) if key is None else check_key(key)
        traj = rollout(self.eval_problem, theta, key=key, n=check_positive_int(n, "n"))
        returns = -np.asarray(traj.costs).sum(axis=1) - np.asarray(traj.terminal_costs)
        final = np.asarray(traj.states[:, -1])
        success = np.asarray(jax.vmap(self.success_fn)(jnp.asarray(final)), dtype=bool)
        return ControlResult(
            float(returns.mean()),
            float(returns.std()),
            float(success.mean()),
            returns,
            success,
            final,
            self.criterion,
            dict(info),
        )

    def fit(
        self,
        *,
        key: jax.Array,
        steps: int | None = None,
        n: int | None = None,
        lr: float | None = None,
        clip: float = 1.0,
        final_lr_fraction: float = 0.1,
        theta: PyTree | None = None,
        callback=None,
        progress: bool | None = None,
    ) -> OptimizeResult:
        r"""Shortcut: ``pydso.minimize(task.problem, theta0, key=key, steps=steps, method=Gradient(clip + Adam
        with a cosine-decayed rate from lr to final_lr_fraction * lr, Pathwise(), n))``. Nothing else.
        ``steps``, ``n`` and ``lr`` default to the task's full-size settings (``task.fit_defaults``)."""
        defaults = {"steps": 300, "n": 64, "lr": 1e-2, **dict(self.fit_defaults)}
        steps = defaults["steps"] if steps is None else steps
        n = defaults["n"] if n is None else n
        lr = defaults["lr"] if lr is None else lr
        schedule = optax.cosine_decay_schedule(lr, check_positive_int(steps, "steps"), alpha=final_lr_fraction)
        optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))
        return minimize(
            self.problem,
            self.theta0 if theta is None else theta,
            key=key,
            steps=steps,
            method=Gradient(optimizer, estimator=Pathwise(), n=n),
            callback=callback,
            progress=progress,
        )


def _closed_loop(static, step: Callable, cost: Callable, limit: float | None):
    """``(step(x, theta), cost(x, theta))`` of the plant ``step(x, u)``, ``cost(x, u)`` under the policy."""

    def action(x, theta):
        u = eqx.combine(theta, static)(x)
        return u if limit is None else jnp.clip(u, -limit, limit)

    return (lambda x, theta: step(x, action(x, theta))), (lambda x, theta: cost(x, action(x, theta)))


def _task(policy, *, key, default_policy, step, cost, limit, train, evaluate, success, criterion, name, fit):
    if policy is None:
        if key is None:
            raise ProblemError(f"{name}: pass key=jax.random.key(seed) to initialise the policy, or policy=...")
        policy = eqx.filter_jit(default_policy)(check_key(key))
    _check_policy(policy)
    theta0, static = split_policy(policy)
    f, c = _closed_loop(static, step, cost, limit)
    problems = []
    for (gamma, horizon, initial), what in ((train, "training"), (evaluate, "task")):
        problems.append(Problem(DeterministicMap(f), c, Episodic(gamma, horizon), initial, name=f"{name} ({what})"))
    problems[0].check_theta(theta0)
    return ControlTask(
        train_problem=problems[0],
        eval_problem=problems[1],
        theta0=theta0,
        static=static,
        success_fn=success,
        criterion=criterion,
        name=name,
        fit_defaults=tuple(fit.items()),
    )


def _check_horizon_gamma(gamma, horizon, name):
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not (0.0 < gamma <= 1.0):
        raise ProblemError(f"{name}: gamma must lie in (0, 1], got {gamma!r}")
    return check_positive_int(horizon, "horizon")


# --------------------------------------------------------------------------------------------- pendulum
PENDULUM = dict(g=10.0, m=1.0, l=1.0, dt=0.05, max_speed=8.0, max_torque=2.0, episode_steps=200)
"""gymnasium's Pendulum-v1 constants."""


def angle_normalize(x: jax.Array) -> jax.Array:
    r"""An angle wrapped to :math:`[-\pi, \pi)`."""
    return ((x + jnp.pi) % (2 * jnp.pi)) - jnp.pi


def pendulum_observe(x: jax.Array) -> jax.Array:
    """gymnasium's observation ``(cos th, sin th, thdot)``, rounded to float32 like the environment's."""
    th, thdot = x[0], x[1]
    obs = jnp.stack([jnp.cos(th), jnp.sin(th), thdot])
    return obs.astype(jnp.float32).astype(x.dtype)


def _pendulum_step(x, u):
    p = PENDULUM
    th, thdot = x[0], x[1]
    newthdot = thdot + (3 * p["g"] / (2 * p["l"]) * jnp.sin(th) + 3.0 / (p["m"] * p["l"] ** 2) * u) * p["dt"]
    newthdot = jnp.clip(newthdot, -p["max_speed"], p["max_speed"])
    newth = th + newthdot * p["dt"]
    return jnp.stack([newth, newthdot])


def pendulum_plant(x: jax.Array, u: jax.Array) -> jax.Array:
    """One step of Pendulum-v1 from state ``x = (th, thdot)`` under torque ``u`` (clipped to the limit)."""
    return _pendulum_step(x, jnp.clip(u, -PENDULUM["max_torque"], PENDULUM["max_torque"]))


def _pendulum_cost(x, u):
    return angle_normalize(x[0]) ** 2 + 0.1 * x[1] ** 2 + 0.001 * u**2


_PENDULUM_LOW, _PENDULUM_HIGH = (-np.pi, -1.0), (np.pi, 1.0)


def pendulum_problem(static, *, gamma: float = 1.0, horizon: int = 200, low=_PENDULUM_LOW, high=_PENDULUM_HIGH):
    r"""gymnasium's ``Pendulum-v1`` closed by the policy ``eqx.combine(theta, static)`` as a :class:`pydso.Problem`.

    Exactly the environment: g = 10, m = l = 1, dt = 0.05, torque clipped to :math:`\pm 2`, speed clipped to
    :math:`\pm 8`, semi-implicit Euler, step cost :math:`\mathrm{wrap}(\theta)^2 + 0.1\dot\theta^2 + 0.001u^2` on
    the clipped torque, starts :math:`\theta\sim U[-\pi,\pi]`, :math:`\dot\theta\sim U[-1,1]` (``low``, ``high``).
    With the defaults the objective of one episode is minus gymnasium's 200-step return.
    """
    f, c = _closed_loop(static, _pendulum_step, _pendulum_cost, PENDULUM["max_torque"])
    return Problem(DeterministicMap(f), c, Episodic(gamma, horizon), Uniform(low, high), name="Pendulum-v1")


def _pendulum_success(x):
    return (jnp.abs(angle_normalize(x[0])) <= jnp.deg2rad(10.0)) & (jnp.abs(x[1]) <= 1.0)


def pendulum(
    policy=None,
    *,
    key: jax.Array | None = None,
    gamma: float = 0.93,
    horizon: int = 50,
    train_speed: float = 3.0,
    width: int = 64,
    depth: int = 2,
) -> ControlTask:
    r"""Pendulum swing-up: gymnasium's ``Pendulum-v1`` (:func:`pendulum_problem`) as a :class:`ControlTask`.

    **Arguments:**

    - `policy`: a policy module ``policy(x) -> torque``; default an :class:`MLPPolicy` of gymnasium's observation
      ``(cos th, sin th, thdot)`` with ``width`` x ``depth`` tanh layers and output ``2 tanh(.)``, initialised
      with `key`.
    - `gamma`, `horizon`: discount and horizon of the training problem (default 0.93 and 50: long, weakly
      discounted horizons make the pathwise gradient explode on this chaotic system).
    - `train_speed`: training starts :math:`\dot\theta \sim U[-s, s]` (wider than the task's :math:`[-1, 1]`), so
      that the fast states of a swing-up are seen from the first step.

    **Returns:** a :class:`ControlTask`; its evaluation problem is the exact 200-step task. Success of an episode:
    :math:`|\theta| \le 10^\circ` from upright and :math:`|\dot\theta| \le 1` at the end.
    """
    horizon = _check_horizon_gamma(gamma, horizon, "pendulum")
    if not (isinstance(train_speed, int | float) and train_speed > 0):
        raise ProblemError(f"pendulum: train_speed must be a positive number, got {train_speed!r}")
    p = PENDULUM

    def default(k):
        return MLPPolicy(3, "scalar", key=k, width=width, depth=depth, limit=p["max_torque"], observe=pendulum_observe)

    return _task(
        policy,
        key=key,
        default_policy=default,
        step=_pendulum_step,
        cost=_pendulum_cost,
        limit=p["max_torque"],
        train=(gamma, horizon, Uniform([-np.pi, -train_speed], [np.pi, train_speed])),
        evaluate=(1.0, p["episode_steps"], Uniform(_PENDULUM_LOW, _PENDULUM_HIGH)),
        success=_pendulum_success,
        criterion="|angle| <= 10 deg from upright and |speed| <= 1 rad/s after 200 steps",
        name="pendulum",
        fit=dict(steps=200, n=64, lr=1e-2),
    )


# --------------------------------------------------------------------------------------------- cart-pole
CART_POLE = dict(g=9.8, cart_mass=1.0, pole_mass=0.1, half_length=0.5, max_force=20.0, dt=0.05, substeps=2, track=2.4)
"""Cart-pole constants (Barto, Sutton and Anderson 1983; the equations of Florian 2007, frictionless)."""


def cart_pole_accelerations(x: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cart's and the pole's accelerations ``(xacc, thacc)`` at ``x`` under force ``u`` (Florian 2007)."""
    p = CART_POLE
    th, om = x[1], x[3]
    total = p["cart_mass"] + p["pole_mass"]
    sin, cos = jnp.sin(th), jnp.cos(th)
    temp = (u + p["pole_mass"] * p["half_length"] * om**2 * sin) / total
    thacc = (p["g"] * sin - cos * temp) / (p["half_length"] * (4.0 / 3.0 - p["pole_mass"] * cos**2 / total))
    xacc = temp - p["pole_mass"] * p["half_length"] * thacc * cos / total
    return xacc, thacc


def _cart_pole_step(x, u):
    p = CART_POLE
    h = p["dt"] / p["substeps"]
    for _ in range(p["substeps"]):  # semi-implicit Euler substeps
        xacc, thacc = cart_pole_accelerations(x, u)
        vel, om = x[2] + h * xacc, x[3] + h * thacc
        x = jnp.stack([x[0] + h * vel, x[1] + h * om, vel, om])
    return x


def cart_pole_plant(x: jax.Array, u: jax.Array) -> jax.Array:
    """One 0.05 s step of the cart-pole from ``x = (pos, angle, speed, angular speed)`` under force ``u``
    (clipped to the limit)."""
    return _cart_pole_step(x, jnp.clip(u, -CART_POLE["max_force"], CART_POLE["max_force"]))


def _cart_pole_cost(x, u):
    return (1.0 - jnp.cos(x[1])) + 0.05 * x[0] ** 2 + 0.005 * (x[2] ** 2 + 0.1 * x[3] ** 2) + 1e-4 * u**2


def _cart_pole_observe(x):
    return jnp.stack([x[0] / 2.0, jnp.cos(x[1]), jnp.sin(x[1]), x[2] / 2.0, x[3] / 5.0])


def _cart_pole_success(x):
    return (jnp.abs(angle_normalize(x[1])) <= jnp.deg2rad(10.0)) & (jnp.abs(x[0]) <= CART_POLE["track"])


def cart_pole(
    policy=None,
    *,
    key: jax.Array | None = None,
    gamma: float = 0.95,
    horizon: int = 40,
    episode_steps: int = 100,
    width: int = 64,
    depth: int = 2,
) -> ControlTask:
    r"""Cart-pole swing-up as a :class:`ControlTask`.

    The plant (constants in ``CART_POLE``): cart mass 1 kg, pole mass 0.1 kg, pole half-length 0.5 m,
    frictionless (Florian 2007), force :math:`|u| \le 20` N, state :math:`(x, \theta, \dot x, \dot\theta)` with
    :math:`\theta = 0` upright, sampled every 0.05 s with two semi-implicit Euler substeps. Step cost
    :math:`1 - \cos\theta + 0.05x^2 + 0.005(\dot x^2 + 0.1\dot\theta^2) + 10^{-4}u^2`.

    The task: starts hanging down (:math:`\theta \sim \pi + U[-0.2, 0.2]`, :math:`x \sim U[-0.5, 0.5]`, small
    speeds), ``episode_steps`` steps (default 100 = 5 s). Success of an episode: the pole within 10 degrees of
    upright and :math:`|x| \le 2.4` m at its end; the task asks for 90% successful episodes.

    Training (``task.problem``): horizon `horizon` (default 40 steps = 2 s) discounted by `gamma` (0.95) from
    starts spread over the whole state space (:math:`\theta\sim U[-\pi,\pi]`, :math:`x\sim U[-1,1]`, speeds
    :math:`U[-1,1]` and :math:`U[-3,3]`), so that both the swing and the balance are seen from the first step.
    Default policy: :class:`MLPPolicy` of :math:`(x/2, \cos\theta, \sin\theta, \dot x/2, \dot\theta/5)` with
    output :math:`20\tanh(\cdot)`. ``task.fit()`` (400 steps of 64 episodes, Adam 2e-2) reaches 100% success;
    250 steps of 32 episodes suffice for the 90% criterion.
    """
    horizon = _check_horizon_gamma(gamma, horizon, "cart_pole")
    episode_steps = check_positive_int(episode_steps, "episode_steps")
    p = CART_POLE

    def default(k):
        return MLPPolicy(5, "scalar", key=k, width=width, depth=depth, limit=p["max_force"], observe=_cart_pole_observe)

    return _task(
        policy,
        key=key,
        default_policy=default,
        step=_cart_pole_step,
        cost=_cart_pole_cost,
        limit=p["max_force"],
        train=(gamma, horizon, Uniform([-1.0, -np.pi, -1.0, -3.0], [1.0, np.pi, 1.0, 3.0])),
        evaluate=(1.0, episode_steps, Uniform([-0.5, np.pi - 0.2, -0.1, -0.1], [0.5, np.pi + 0.2, 0.1, 0.1])),
        success=_cart_pole_success,
        criterion=f"pole within 10 deg of upright and |cart| <= {p['track']} m after {episode_steps} steps",
        name="cart-pole swing-up",
        fit=dict(steps=400, n=64, lr=2e-2),
    )


# --------------------------------------------------------------------------------------------- two-link arm
TWO_LINK_ARM = dict(
    l1=0.3, l2=0.33, m2=1.1, s2=0.16, i1=0.025, i2=0.045, damping=0.05, max_torque=2.0, dt=0.05, substeps=5
)
"""Planar two-link arm constants (Li and Todorov 2004), no gravity (horizontal plane), joint damping."""


def _arm_hand(q):
    p = TWO_LINK_ARM
    return jnp.stack(
        [
            p["l1"] * jnp.cos(q[0]) + p["l2"] * jnp.cos(q[0] + q[1]),
            p["l1"] * jnp.sin(q[0]) + p["l2"] * jnp.sin(q[0] + q[1]),
        ]
    )


def _arm_step(x, u):
    p = TWO_LINK_ARM
    a1 = p["i1"] + p["i2"] + p["m2"] * p["l1"] ** 2
    a2 = p["m2"] * p["l1"] * p["s2"]
    a3 = p["i2"]
    h = p["dt"] / p["substeps"]
    q, dq, target = x[0:2], x[2:4], x[4:6]
    for _ in range(p["substeps"]):  # semi-implicit Euler substeps
        c2, s2 = jnp.cos(q[1]), jnp.sin(q[1])
        mass = jnp.array([[a1 + 2 * a2 * c2, a3 + a2 * c2], [a3 + a2 * c2, a3]])
        coriolis = a2 * s2 * jnp.stack([-dq[1] * (2 * dq[0] + dq[1]), dq[0] ** 2])
        ddq = jnp.linalg.solve(mass, u - coriolis - p["damping"] * dq)
        dq = dq + h * ddq
        q = q + h * dq
    return jnp.concatenate([q, dq, target])


def two_link_arm_plant(x: jax.Array, u: jax.Array) -> jax.Array:
    """One 0.05 s step of the two-link arm from ``x = (q1, q2, dq1, dq2, target_x, target_y)`` under torques ``u``
    (clipped to the limit)."""
    return _arm_step(x, jnp.clip(u, -TWO_LINK_ARM["max_torque"], TWO_LINK_ARM["max_torque"]))


def _arm_cost(x, u):
    err = _arm_hand(x[0:2]) - x[4:6]
    return 100.0 * jnp.sum(err**2) + 0.1 * jnp.sum(x[2:4] ** 2) + 1e-3 * jnp.sum(u**2)


def _arm_observe(x):
    q, dq, target = x[0:2], x[2:4], x[4:6]
    return jnp.concatenate([jnp.cos(q), jnp.sin(q), dq, 5.0 * (target - _arm_hand(q))])


class _ArmStart(AbstractInitial):
    """Joint angles and target joint angles uniform in ``[0.3, 1.2] x [0.5, 2]``, speeds uniform in
    ``[-speed, speed]``; the state holds the target's hand position."""

    speed: float = eqx.field(static=True)

    def sample(self, key):
        kq, kt, kv = jax.random.split(key, 3)
        low, high = jnp.array([0.3, 0.5]), jnp.array([1.2, 2.0])
        q = jax.random.uniform(kq, (2,), minval=low, maxval=high)
        target = _arm_hand(jax.random.uniform(kt, (2,), minval=low, maxval=high))
        dq = self.speed * jax.random.uniform(kv, (2,), minval=-1.0, maxval=1.0)
        return jnp.concatenate([q, dq, target])


def _arm_success(x):
    err = jnp.linalg.norm(_arm_hand(x[0:2]) - x[4:6])
    return (err <= 0.05) & (jnp.max(jnp.abs(x[2:4])) <= 0.5)


def two_link_arm(
    policy=None,
    *,
    key: jax.Array | None = None,
    gamma: float = 0.97,
    horizon: int = 40,
    episode_steps: int = 40,
    width: int = 64,
    depth: int = 2,
) -> ControlTask:
    r"""Reaching with a planar two-link arm (Li and Todorov 2004 constants, horizontal plane) as a
    :class:`ControlTask`.

    State :math:`(q_1, q_2, \dot q_1, \dot q_2, p^*_x, p^*_y)`: joint angles and speeds and the target hand
    position :math:`p^*` (constant in an episode), dynamics :math:`M(q)\ddot q + C(q,\dot q)\dot q + B\dot q =
    \tau` with torques :math:`|\tau_i| \le 2` N m, sampled every 0.05 s with five semi-implicit Euler substeps.
    Step cost :math:`100\|p(q) - p^*\|^2 + 0.1\|\dot q\|^2 + 10^{-3}\|\tau\|^2`.

    The task: start at rest at :math:`q \sim U([0.3, 1.2] \times [0.5, 2])`, target drawn as the hand position of
    :math:`q^* \sim U([0.3, 1.2] \times [0.5, 2])` (inside the workspace), ``episode_steps`` steps (2 s).
    Success: hand within 5 cm of the target and joint speeds below 0.5 rad/s at the end. Default policy:
    :class:`MLPPolicy` of :math:`(\cos q, \sin q, \dot q, 5(p^* - p(q)))` with output :math:`2\tanh(\cdot)`.
    """
    horizon = _check_horizon_gamma(gamma, horizon, "two_link_arm")
    episode_steps = check_positive_int(episode_steps, "episode_steps")
    p = TWO_LINK_ARM

    def default(k):
        return MLPPolicy(8, 2, key=k, width=width, depth=depth, limit=p["max_torque"], observe=_arm_observe)

    return _task(
        policy,
        key=key,
        default_policy=default,
        step=_arm_step,
        cost=_arm_cost,
        limit=p["max_torque"],
        train=(gamma, horizon, _ArmStart(speed=1.0)),
        evaluate=(1.0, episode_steps, _ArmStart(speed=0.0)),
        success=_arm_success,
        criterion=f"hand within 5 cm of the target and joint speeds <= 0.5 rad/s after {episode_steps} steps",
        name="two-link arm reaching",
        fit=dict(steps=200, n=64, lr=1e-2),
    )
