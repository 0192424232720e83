r"""Mechanism design (co-design) as a DSO problem: :func:`design` returns a :class:`DesignProblem`.

The plant has design parameters :math:`\phi` (a gear ratio, a length, an actuator size, ...), the policy
:math:`\pi_\vartheta` its own parameters, and both are optimised together as one
:math:`\theta = (\phi, \vartheta)`:

.. math::

    J(\theta) = \mathbb E\Big[\sum_t w_t\,L(x_t, \pi_\vartheta(x_t), \phi)\Big] + D(\phi),\qquad
    x_{t+1} = f(x_t, \pi_\vartheta(x_t), \phi) + \sigma\varepsilon_t

with the task cost :math:`L`, the setting's weights :math:`w_t` and a design cost :math:`D` (the price of the
hardware). :math:`D` is paid once per episode: it enters the step cost as :math:`D(\phi)/\sum_t w_t`, so the
objective of the :class:`pydso.Problem` is exactly :math:`J`. Bounded design parameters are optimised in
unconstrained coordinates :math:`z` with :math:`\phi = \ell + (h-\ell)\,\mathrm{sigmoid}(z)`; ``theta`` is
``{"design": z, "policy": policy arrays}`` and :meth:`DesignProblem.physical` maps it back.

Solve with the package's methods, e.g. ``pydso.minimize(p.problem, p.theta0, key=key,
method=pydso.Gradient(optax.adam(...), n=...))`` (pathwise: the plant must be differentiable in :math:`\phi`), and
report with ``p.result(theta)``. Because the policy is re-optimised jointly, the design is judged with the
controller it deserves, not with a controller tuned for another design (Fathy et al. 2001, "On the coupling
between the plant and controller optimization problems").

When not to use it: a design that changes the state space or is discrete (a number of links) — enumerate such
designs and optimise each; a design cost that is not differentiable (use the score estimator on a stochastic
design distribution instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_finite_tree, check_key, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..engine import rollout
from ..systems import AbstractInitial, DeterministicMap, Episodic, GaussianChain, Problem
from ._contract import AbstractConstructedProblem
from .control import split_policy

__all__ = ["design", "DesignProblem", "DesignResult"]


@dataclasses.dataclass(frozen=True)
class DesignResult:
    """The report of :meth:`DesignProblem.result`.

    **Attributes:** ``design`` (the physical design parameters, a pytree like ``design0``), ``objective`` and
    ``objective_stderr`` (the estimate of :math:`J` on ``n`` fresh episodes), ``task_cost`` (:math:`J - D`),
    ``design_cost`` (:math:`D(\\phi)`), ``info`` (how theta was obtained)."""

    design: PyTree
    objective: float
    objective_stderr: float
    task_cost: float
    design_cost: float
    info: dict


class DesignProblem(AbstractConstructedProblem):
    r"""Co-design of plant and policy (module docstring), built by :func:`design`.

    **Attributes:** ``closed_loop`` (also ``problem``), ``theta0`` (``{"design": z0, "policy": arrays}``),
    ``static`` (the policy's non-array parts), ``lower``/``upper`` (the bounds, pytrees like ``design0``, or
    ``None``), ``design_cost_fn``.
    """

    closed_loop: Problem
    theta0: PyTree
    static: PyTree
    lower: PyTree
    upper: PyTree
    design_cost_fn: Callable = eqx.field(static=True)

    @property
    def problem(self) -> Problem:
        return self.closed_loop

    def physical(self, theta: PyTree) -> PyTree:
        r"""The physical design :math:`\phi` of ``theta`` (``theta["design"]`` mapped through the bounds)."""
        return _to_physical(theta["design"], self.lower, self.upper)

    def policy(self, theta: PyTree):
        """The policy module of ``theta``."""
        return eqx.combine(theta["policy"], self.static)

    def result(self, theta: PyTree, *, key: jax.Array | None = None, n: int = 1024, **info) -> DesignResult:
        """The physical design of ``theta`` and :math:`J` estimated on ``n`` fresh episodes (key default
        ``jax.random.key(1)``)."""
        key = jax.random.key(1) if key is None else check_key(key)
        traj = rollout(self.closed_loop, theta, key=key, n=check_positive_int(n, "n"))
        per_episode = np.asarray(traj.costs @ traj.step_weights + traj.terminal_costs * traj.terminal_weights)
        phi = self.physical(theta)
        d = float(self.design_cost_fn(phi))
        mean = float(per_episode.mean())
        stderr = float(per_episode.std(ddof=1) / np.sqrt(len(per_episode))) if len(per_episode) > 1 else 0.0
        return DesignResult(jax.tree.map(np.asarray, phi), mean, stderr, mean - d, d, dict(info))


def _to_physical(z, lower, upper):
    if lower is None:
        return z
    return jax.tree.map(lambda z, lo, hi: lo + (hi - lo) * jax.nn.sigmoid(z), z, lower, upper)


def _to_unconstrained(phi, lower, upper):
    if lower is None:
        return phi
    return jax.tree.map(lambda p, lo, hi: jnp.log((p - lo) / (hi - p)), phi, lower, upper)


def _check_bounds(bounds, design0):
    """``(lower, upper)`` pytrees like ``design0`` from ``bounds`` (a pytree like ``design0`` whose leaves are
    ``(low, high)`` pairs), checked: finite, low < high, design0 strictly inside."""
    if bounds is None:
        return None, None
    treedef = jax.tree.structure(design0)
    try:
        pairs = treedef.flatten_up_to(bounds)
    except (ValueError, TypeError) as e:
        raise ProblemError(
            f"bounds must have the structure of design0 with a (low, high) pair at every leaf: {e}"
        ) from None
    lows, highs = [], []
    for (path, leaf), pair in zip(jax.tree_util.tree_flatten_with_path(design0)[0], pairs, strict=True):
        where = f"bounds{jax.tree_util.keystr(path)}"
        try:
            low, high = pair
        except (TypeError, ValueError):
            raise ProblemError(f"{where} must be a (low, high) pair, got {pair!r}") from None
        shape = np.shape(leaf)
        low = np.broadcast_to(np.asarray(low, dtype=float), shape)
        high = np.broadcast_to(np.asarray(high, dtype=float), shape)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ProblemError(f"{where} must be finite (leave a parameter out of the bounds by giving no bounds)")
        if np.any(low >= high):
            raise ProblemError(f"{where}: low must be < high, got ({low}, {high})")
        value = np.asarray(leaf, dtype=float)
        if np.any(value <= low) or np.any(value >= high):
            raise ProblemError(f"design0{jax.tree_util.keystr(path)} = {value} must lie strictly inside {where}")
        lows.append(jnp.asarray(low))
        highs.append(jnp.asarray(high))
    return treedef.unflatten(lows), treedef.unflatten(highs)


def design(
    *,
    plant: Callable,
    policy,
    design0: PyTree,
    cost: Callable,
    initial: AbstractInitial,
    horizon: int,
    gamma: float = 1.0,
    design_cost: Callable | None = None,
    bounds: PyTree | None = None,
    noise=0.0,
    name: str = "mechanism design",
) -> DesignProblem:
    r"""Joint optimisation of plant design and policy (module docstring).

    **Arguments:**

    - `plant`: ``plant(x, u, phi) -> x_next``, the discrete-time plant (its mean for a noisy plant) with design
      ``phi`` (a pytree like `design0`), differentiable in ``phi``.
    - `policy`: the policy, an equinox module ``policy(x) -> u`` (its floating-point arrays are optimised).
    - `design0`: the initial physical design, a pytree of floats/arrays (e.g. ``{"b": 1.0}``).
    - `cost`: the task's step cost ``cost(x, u, phi) -> scalar``.
    - `initial`, `horizon`, `gamma`: initial distribution, episode length and discount (``Episodic``).
    - `design_cost`: :math:`D(\phi)`, paid once per episode (default 0).
    - `bounds`: a pytree like `design0` with a ``(low, high)`` pair at every leaf (default: unconstrained);
      `design0` must lie strictly inside.
    - `noise`: process noise standard deviation (scalar or per component; 0: deterministic plant).

    **Returns:** a :class:`DesignProblem` with ``theta0 = {"design": z0, "policy": arrays}``. Raises
    :class:`pydso.ProblemError` naming the argument (bounds not containing the design, non-finite design0,
    shapes that do not close the loop, ...).
    """
    for name_, f in (("plant", plant), ("cost", cost)):
        if not callable(f):
            raise ProblemError(f"{name_} must be a callable, got {type(f).__name__}")
    if design_cost is not None and not callable(design_cost):
        raise ProblemError(f"design_cost must be a callable design_cost(phi) -> scalar or None, got {design_cost!r}")
    if not isinstance(initial, AbstractInitial):
        raise ProblemError("initial must be a pydso initial distribution (pydso.Normal(...), pydso.Uniform(...), ...)")
    if not callable(policy):
        raise ProblemError(f"policy must be a callable policy module (policy(x) -> u), got {type(policy).__name__}")
    horizon = check_positive_int(horizon, "horizon")
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not (0.0 < gamma <= 1.0):
        raise ProblemError(f"gamma must lie in (0, 1], got {gamma!r}")
    if not jax.tree.leaves(design0):
        raise ProblemError("design0 must be a non-empty pytree of design parameters, e.g. {'b': 1.0}")
    check_finite_tree(design0, "design0")
    design0 = jax.tree.map(lambda v: jnp.asarray(v, dtype=jnp.result_type(float)), design0)
    lower, upper = _check_bounds(bounds, design0)
    noise_arr = np.asarray(noise, dtype=float)
    if not (np.all(np.isfinite(noise_arr)) and np.all(noise_arr >= 0)):
        raise ProblemError(f"noise must be a non-negative standard deviation, got {noise!r}")
    policy_theta, static = split_policy(policy)
    if not jax.tree.leaves(policy_theta):
        raise ProblemError("policy has no floating-point array parameters to optimise")
    d_cost = (lambda phi: jnp.zeros((), jnp.result_type(float))) if design_cost is None else design_cost
    setting = Episodic(gamma, horizon)
    w, w_end = setting.weights()
    total_weight = float(np.sum(w))

    def parts(x, theta):
        phi = _to_physical(theta["design"], lower, upper)
        return phi, eqx.combine(theta["policy"], static)(x)

    def step(x, theta):
        phi, u = parts(x, theta)
        return plant(x, u, phi)

    def step_cost(x, theta):
        phi, u = parts(x, theta)
        return cost(x, u, phi) + d_cost(phi) / total_weight

    system = GaussianChain(step, jnp.asarray(noise_arr)) if np.any(noise_arr > 0) else DeterministicMap(step)
    theta0 = {"design": _to_unconstrained(design0, lower, upper), "policy": policy_theta}
    try:
        dc = jax.eval_shape(d_cost, design0)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ProblemError(f"design_cost cannot be evaluated on design0: {type(e).__name__}: {e}") from e
    if getattr(dc, "shape", None) != ():
        raise ProblemError(f"design_cost(phi) must return a scalar, got {getattr(dc, 'shape', type(dc))}")
    closed_loop = Problem(system, step_cost, setting, initial, name=name)
    try:
        closed_loop.check_theta(theta0)
    except ProblemError as e:
        raise ProblemError(f"plant/cost/policy: the closed loop is inconsistent: {e}") from e
    return DesignProblem(
        closed_loop=closed_loop, theta0=theta0, static=static, lower=lower, upper=upper, design_cost_fn=d_cost
    )
