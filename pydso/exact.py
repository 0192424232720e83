r"""Tabular reference implementation: everything about a finite chain in closed form.

For a :class:`~pydso.TabularChain` on states :math:`0, \dots, S-1` the transition law is a row-stochastic matrix
:math:`P(\theta)` with :math:`P_{xx'} = P(x' \mid x, \theta)`, the step cost a vector :math:`L(\theta)` with
:math:`L_x = L(x, \theta)` and the initial distribution a vector :math:`p_0`. Then (DESIGN.md §1)

* **episodic** (discount :math:`\gamma < 1`, infinite horizon):
  :math:`V = L + \gamma P V`, i.e. :math:`V = (I - \gamma P)^{-1} L`; :math:`J = p_0^\top V`; discounted state
  density :math:`\rho^\top = p_0^\top (I - \gamma P)^{-1}` (so :math:`\sum_x \rho(x) = 1/(1-\gamma)` and
  :math:`J = \rho^\top L`);
* **average cost** (unichain / ergodic :math:`P`): stationary distribution :math:`\pi^\top P = \pi^\top`,
  :math:`J = \pi^\top L`, differential value :math:`h` with :math:`h + J\mathbf 1 = L + P h` and
  :math:`\pi^\top h = 0` (Puterman 1994, *Markov Decision Processes*, §8.2).
* **first exit** (:class:`~pydso.Episodic` with a terminal set, :math:`\gamma \le 1`): a terminal state pays
  :math:`\Phi` once and is absorbed; with :math:`\tilde P` the matrix with the terminal rows zeroed and
  :math:`\tilde L = L` off the set, :math:`\Phi` on it, :math:`V = \tilde L + \gamma \tilde P V` and every
  episodic formula holds with :math:`(\tilde P, \tilde L)`. With :math:`\gamma = 1` the set must be reached with
  probability 1 from the initial distribution (checked on the support of :math:`P`);
* **finite horizon** (:class:`~pydso.FiniteHorizon`; time-varying chains or costs under any setting; an
  :class:`~pydso.Episodic` terminal cost without a terminal set — see :func:`is_finite_horizon`): the backward
  recursion :math:`\tilde U_H = w_H \Phi_H`, :math:`U_t = w_t L_t + P_t \tilde U_{t+1}`,
  :math:`\tilde U_t = m\,w_t\Phi_t + (1-m)\,U_t` with the setting's weights and the terminal-set indicator
  :math:`m` (for :class:`~pydso.FiniteHorizon`: :math:`V_T = \Phi`, :math:`V_t = L_t + P_t V_{t+1}`). There
  :func:`value` returns :math:`\tilde U` of shape ``(H+1, S)``, :func:`value_gradient` ``(H+1, S, p)``,
  :func:`occupancy` the time-:math:`t` marginals of the episodes not yet absorbed ``(H+1, S)``, :func:`chain`
  ``(P_t (H, S, S), L_t (H, S), p0)``; the gradient and Hessian differentiate the recursion with the model
  derivatives, and the Fisher matrix is :math:`\sum_t c_t \sum_x \mu_t(x) \sum_{x'} P_t\, s_t s_t^\top`
  (:math:`c_t = \gamma^t` for :class:`~pydso.Episodic`, else 1).

Gradients, Hessians and the Fisher matrix are computed by the **formulas** of DESIGN.md §1 from the derivatives
of the *model* — :math:`\nabla P`, :math:`\nabla^2 P`, :math:`\nabla L`, :math:`\nabla^2 L`, obtained with
:func:`jax.jacobian` / :func:`jax.hessian` of ``transition_fn`` and of the cost vector — never by differentiating
:math:`J`. The tests check them against autodiff of the closed form and finite differences, and the Monte-Carlo
estimators of pydso are checked against this module. It therefore imports nothing of pydso but the problem
types and the error class, and shares no code with the estimators.

Parameters ``theta`` are any pytree. Gradients are returned as pytrees shaped like ``theta``; matrices (value
Jacobian, Hessian, Fisher) are over the flat parameter vector in :func:`jax.flatten_util.ravel_pytree` order.
All functions are pure and may be traced (``jax.jit``, ``jax.grad``); the input checks (row-stochastic matrix,
ergodicity) run only when the values are concrete.

Scores :math:`s = \nabla \log P(x' \mid x)` are formed as :math:`\nabla P / P` on the support of :math:`P`
and set to zero off it (where a smooth non-negative :math:`P` has :math:`\nabla P = 0` anyway).
"""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._errors import ProblemError
from ._typing import PyTree
from .systems import AverageCost, Categorical, Episodic, FiniteHorizon, Problem, TabularChain

__all__ = [
    "chain",
    "stationary",
    "value",
    "objective",
    "occupancy",
    "gradient",
    "value_gradient",
    "hessian",
    "fisher",
    "natural_gradient",
    "mdp_problem",
    "policy_gradient_theorem",
    "is_finite_horizon",
]

_STOCHASTIC_TOL = 1e-8
_ERGODIC_COND = 1e12


# --------------------------------------------------------------------------------------------- checks
def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _where(problem: Problem) -> str:
    return f"problem {problem.name!r}"


def _check_problem(problem: Problem) -> None:
    if not isinstance(problem, Problem):
        raise ProblemError(f"pydso.exact needs a pydso.Problem, got {type(problem).__name__}")
    where = _where(problem)
    if not isinstance(problem.system, TabularChain):
        raise ProblemError(
            f"{where}: pydso.exact handles finite chains only (system must be a TabularChain), "
            f"got {type(problem.system).__name__}"
        )
    if not isinstance(problem.initial, Categorical):
        raise ProblemError(
            f"{where}: pydso.exact needs a Categorical initial distribution over the states, "
            f"got {type(problem.initial).__name__}"
        )
    setting = problem.setting
    if is_finite_horizon(problem):
        if isinstance(setting, AverageCost) and setting.terminal_set() is not None:
            raise ProblemError(f"{where}: the AverageCost setting has no terminal set")
        return
    if problem.terminal_cost is not None and not isinstance(setting, Episodic):
        raise ProblemError(f"{where}: the AverageCost setting pays no terminal cost; remove terminal_cost")
    if isinstance(setting, Episodic):
        if setting.gamma >= 1.0 and setting.terminal is None:
            raise ProblemError(
                f"{where}: exact episodic values need gamma < 1 or a terminal set; with gamma = 1 and no terminal "
                "set the Bellman system (I - gamma P) V = L is singular; use gamma < 1, Episodic(terminal=...), "
                "FiniteHorizon or AverageCost"
            )
    elif not isinstance(setting, AverageCost):
        raise ProblemError(
            f"{where}: pydso.exact supports the Episodic, FiniteHorizon and AverageCost settings, "
            f"got {type(setting).__name__}"
        )


def is_finite_horizon(problem: Problem) -> bool:
    r"""Whether :mod:`pydso.exact` treats ``problem`` by the finite-horizon backward recursion (its objective
    depends on the horizon): a :class:`~pydso.FiniteHorizon` setting, a time-varying chain or cost (any setting,
    truncated at its horizon with its weights :math:`w_t`), or an :class:`~pydso.Episodic` problem with a
    ``terminal_cost`` and no terminal set (paid at the horizon). Otherwise :class:`~pydso.Episodic` is the
    infinite-horizon discounted (or first-exit) problem and :class:`~pydso.AverageCost` the stationary one."""
    if isinstance(problem.setting, FiniteHorizon):
        return True
    if getattr(problem.system, "time_varying", False) or problem.time_varying:
        return True
    return (
        isinstance(problem.setting, Episodic) and problem.terminal_cost is not None and problem.setting.terminal is None
    )


def _check_stochastic(P: jax.Array, where: str) -> None:
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ProblemError(f"{where}: the transition matrix must be square (S, S), got shape {P.shape}")
    if not _concrete(P):
        return
    a = np.asarray(P)
    if not np.all(np.isfinite(a)):
        raise ProblemError(f"{where}: the transition matrix contains non-finite values")
    if np.any(a < 0):
        i, j = np.argwhere(a < 0)[0]
        raise ProblemError(
            f"{where}: the transition matrix is not row-stochastic: it has negative entries (P[{i}, {j}] = {a[i, j]})"
        )
    err = np.abs(a.sum(axis=1) - 1.0)
    if np.any(err > _STOCHASTIC_TOL):
        i = int(np.argmax(err))
        raise ProblemError(
            f"{where}: the transition matrix is not row-stochastic: row {i} sums to {a[i].sum()!r} "
            f"(rows must sum to 1 within {_STOCHASTIC_TOL})"
        )


def _stationary(P: jax.Array, where: str) -> jax.Array:
    S = P.shape[0]
    # pi^T (I - P + 1 1^T) = 1^T; the matrix is non-singular iff the chain has a single closed class.
    A = jnp.eye(S, dtype=P.dtype) - P + jnp.ones((S, S), P.dtype)
    if _concrete(A):
        cond = np.linalg.cond(np.asarray(A))
        if not np.isfinite(cond) or cond > _ERGODIC_COND:
            raise ProblemError(
                f"{where}: the chain is not ergodic (more than one closed class of states), so the stationary "
                f"distribution is not unique and the average-cost system is singular "
                f"(cond(I - P + 1 1^T) = {cond:.3g})"
            )
    return jnp.linalg.solve(A.T, jnp.ones((S,), P.dtype))


def _terminal_mask(problem: Problem, S: int) -> jax.Array | None:
    """``(S,)`` bool: the states of the setting's terminal set (None without one)."""
    terminal = problem.setting.terminal_set()
    if terminal is None:
        return None
    try:
        mask = jax.vmap(lambda x: jnp.asarray(terminal(x), bool))(jnp.arange(S))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ProblemError(
            f"{_where(problem)}: Episodic.terminal(x) must map a state index to a boolean: {type(e).__name__}: {e}"
        ) from e
    if mask.shape != (S,):
        raise ProblemError(f"{_where(problem)}: Episodic.terminal(x) must return a scalar boolean per state")
    return mask


def _reach(A: jax.Array, start: jax.Array, forward: bool) -> jax.Array:
    """States reachable from (``forward``) or reaching (backward) ``start`` along the edges of boolean ``A``."""
    Af = A.astype(jnp.float32)
    r = start

    def body(_, r):
        step = (r.astype(jnp.float32) @ Af) if forward else (Af @ r.astype(jnp.float32))
        return r | (step > 0)

    return jax.lax.fori_loop(0, A.shape[0], body, r)


def _never_absorbed(P: jax.Array, term: jax.Array) -> jax.Array:
    """Non-terminal states from which the terminal set cannot be reached (traceable: uses the support of P)."""
    A = (P > 0) & ~term[:, None]
    return ~_reach(A, term, forward=False)


def _validate(problem: Problem, theta: PyTree) -> None:
    """Checks that need concrete values, run eagerly before the compiled computation (skipped under tracing)."""
    _check_problem(problem)
    where = _where(problem)
    system = problem.system
    if is_finite_horizon(problem):
        if _concrete(jax.tree_util.tree_leaves(theta)[0] if jax.tree_util.tree_leaves(theta) else 0):
            if system.time_varying:
                ts = jnp.arange(problem.setting.horizon, dtype=jnp.result_type(float)) * system.time_step
                Ps = jax.vmap(lambda t: jnp.asarray(system.matrix(t, theta)))(ts)
            else:
                Ps = jnp.asarray(system.matrix(0.0, theta))[None]
            Ps = np.asarray(Ps)
            for t in range(Ps.shape[0]):
                _check_stochastic(Ps[t], f"{where} (transition at t={t})" if Ps.shape[0] > 1 else where)
        return
    P = jnp.asarray(system.matrix(0.0, theta))
    _check_stochastic(P, where)
    if isinstance(problem.setting, AverageCost) and _concrete(P):
        _stationary(P, where)
    term = _terminal_mask(problem, P.shape[0])
    if term is not None and problem.setting.gamma >= 1.0 and _concrete(P):
        dead = np.asarray(_never_absorbed(P, term))
        p0 = np.asarray(problem.initial.probs)
        A = (P > 0) & ~term[:, None]
        seen = np.asarray(_reach(A, jnp.asarray((p0 > 0) & ~np.asarray(term)), forward=True))
        bad = np.flatnonzero(seen & dead)
        if bad.size:
            raise ProblemError(
                f"{where}: with gamma = 1 the terminal set must be reached with probability 1, but from the "
                f"initial distribution the chain can reach states {bad.tolist()}, from which it never enters the "
                "terminal set (the first-exit cost is infinite); use gamma < 1 or enlarge the terminal set"
            )


def _compiled(fn: Callable) -> Callable:
    """``fn(problem, theta, ...)`` validated eagerly, then run as one compiled (``eqx.filter_jit``) computation.

    Compiling the whole computation once per problem is much cheaper than JAX's op-by-op dispatch of the many
    small linear-algebra calls; the functions stay traceable (``jax.jit``, ``jax.grad``) by callers.
    """
    jitted = eqx.filter_jit(fn)

    @functools.wraps(fn)
    def wrapper(problem, theta, *args, **kwargs):
        _validate(problem, theta)
        return jitted(problem, theta, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------- the chain
class _Model:
    """The chain and its model derivatives as functions of the flat parameter vector."""

    finite = False

    def __init__(self, problem: Problem, theta: PyTree):
        _check_problem(problem)
        self.problem = problem
        self.where = _where(problem)
        self.flat, self.unravel = ravel_pytree(theta)
        P = jnp.asarray(problem.system.matrix(0.0, theta))
        _check_stochastic(P, self.where)
        self.S = P.shape[0]
        self.average = isinstance(problem.setting, AverageCost)
        self.gamma = 1.0 if self.average else float(problem.setting.gamma)
        # First exit: terminal states are killed after paying Phi once (their rows of P are zeroed and their "cost"
        # is Phi), so V = L~ + gamma P~ V and every formula below holds with the substochastic P~.
        term = _terminal_mask(problem, self.S)
        self.term = term
        if term is not None and self.gamma >= 1.0:
            term = term | _never_absorbed(P, term)  # unreachable (checked) states that never exit: V = 0 there
        self.killed = term
        self.P = self.transition(self.flat)
        self.L = self.cost_vector(self.flat)
        if self.L.shape != (self.S,):
            raise ProblemError(f"{self.where}: cost(x, theta) must be a scalar for each of the {self.S} states")
        self.p0 = jnp.asarray(problem.initial.probs, self.P.dtype)
        if self.p0.shape != (self.S,):
            raise ProblemError(
                f"{self.where}: the Categorical initial distribution has {self.p0.shape[0]} states "
                f"but the transition matrix has {self.S}"
            )

    def transition(self, flat: jax.Array) -> jax.Array:
        P = jnp.asarray(self.problem.system.matrix(0.0, self.unravel(flat)))
        return P if self.killed is None else jnp.where(self.killed[:, None], 0.0, P)

    def cost_vector(self, flat: jax.Array) -> jax.Array:
        th = self.unravel(flat)
        L = jax.vmap(lambda s: jnp.asarray(self.problem.running_cost(0.0, s, th)))(jnp.arange(self.S))
        if self.term is None:
            return L
        phi = jax.vmap(lambda s: jnp.asarray(self.problem.final_cost(0.0, s, th), L.dtype))(jnp.arange(self.S))
        return jnp.where(self.term, phi, jnp.where(self.killed, 0.0, L))

    # first- and second-order model derivatives, over the flat parameters
    def dP(self) -> jax.Array:  # (S, S, p)
        return jax.jacobian(self.transition)(self.flat)

    def dL(self) -> jax.Array:  # (S, p)
        return jax.jacobian(self.cost_vector)(self.flat)

    def d2P(self) -> jax.Array:  # (S, S, p, p)
        return jax.hessian(self.transition)(self.flat)

    def d2L(self) -> jax.Array:  # (S, p, p)
        return jax.hessian(self.cost_vector)(self.flat)

    # closed-form quantities
    def resolvent_matrix(self) -> jax.Array:
        return jnp.eye(self.S, dtype=self.P.dtype) - self.gamma * self.P

    def pi(self) -> jax.Array:
        return _stationary(self.P, self.where)

    def weights(self) -> jax.Array:
        """rho (episodic, unnormalised discounted occupancy) or pi (average cost)."""
        if self.average:
            return self.pi()
        return jnp.linalg.solve(self.resolvent_matrix().T, self.p0)

    def fundamental(self, pi: jax.Array) -> jax.Array:
        """A = I - P + 1 pi^T, whose inverse is the fundamental matrix Z (Kemeny & Snell 1960)."""
        return jnp.eye(self.S, dtype=self.P.dtype) - self.P + jnp.outer(jnp.ones(self.S, self.P.dtype), pi)

    def value(self) -> jax.Array:
        if self.average:
            pi = self.pi()
            J = pi @ self.L
            return jnp.linalg.solve(self.fundamental(pi), self.L - J)
        return jnp.linalg.solve(self.resolvent_matrix(), self.L)


class _FiniteModel:
    r"""The finite-horizon chain :math:`(P_t, L_t, \Phi_t)_{t \le H}` and its model derivatives over the flat
    parameters, for the backward recursion (time-varying chains and costs, :class:`~pydso.FiniteHorizon`)."""

    finite = True

    def __init__(self, problem: Problem, theta: PyTree):
        _check_problem(problem)
        self.problem = problem
        self.where = _where(problem)
        self.flat, self.unravel = ravel_pytree(theta)
        setting = problem.setting
        self.H = setting.horizon
        w, w_end = setting.weights()
        self.P = self.transitions(self.flat)  # (H, S, S)
        if self.P.ndim != 3 or self.P.shape[1] != self.P.shape[2]:
            raise ProblemError(f"{self.where}: transition_fn must return a square (S, S) matrix")
        self.S = self.P.shape[1]
        dtype = self.P.dtype
        self.w = jnp.asarray(np.append(w, w_end), dtype)  # (H+1,): w_t, and w_H for the terminal cost
        self.occ = jnp.asarray(
            setting.gamma ** np.arange(self.H) if isinstance(setting, Episodic) else np.ones(self.H), dtype
        )
        term = _terminal_mask(problem, self.S)
        self.alive = jnp.ones(self.S, dtype) if term is None else (~term).astype(dtype)
        self.L = self.costs(self.flat)
        if self.L.shape != (self.H, self.S):
            raise ProblemError(f"{self.where}: cost must be a scalar for each of the {self.S} states")
        self.p0 = jnp.asarray(problem.initial.probs, dtype)
        if self.p0.shape != (self.S,):
            raise ProblemError(
                f"{self.where}: the Categorical initial distribution has {self.p0.shape[0]} states "
                f"but the transition matrix has {self.S}"
            )

    def _times(self, n: int) -> jax.Array:
        return jnp.arange(n, dtype=jnp.result_type(float)) * self.problem.system.time_step

    def transitions(self, flat: jax.Array) -> jax.Array:  # (H, S, S)
        th = self.unravel(flat)
        return jax.vmap(lambda t: jnp.asarray(self.problem.system.matrix(t, th)))(self._times(self.H))

    def costs(self, flat: jax.Array) -> jax.Array:  # (H, S)
        th = self.unravel(flat)
        states = jnp.arange(self.S)
        per_t = lambda t: jax.vmap(lambda x: jnp.asarray(self.problem.running_cost(t, x, th)))(states)  # noqa: E731
        return jax.vmap(per_t)(self._times(self.H))

    def finals(self, flat: jax.Array) -> jax.Array:  # (H+1, S)
        th = self.unravel(flat)
        states = jnp.arange(self.S)
        per_t = lambda t: jax.vmap(lambda x: jnp.asarray(self.problem.final_cost(t, x, th)))(states)  # noqa: E731
        return jax.vmap(per_t)(self._times(self.H + 1)).astype(self.P.dtype)

    def derivatives(self, order: int) -> tuple:
        """``(P, L, Phi)`` and their Jacobians (order >= 1) and Hessians (order 2) over the flat parameters."""
        fns = (self.transitions, self.costs, self.finals)
        out = [tuple(f(self.flat) for f in fns)]
        if order >= 1:
            out.append(tuple(jax.jacobian(f)(self.flat) for f in fns))
        if order >= 2:
            out.append(tuple(jax.hessian(f)(self.flat) for f in fns))
        return tuple(out)

    def backward(self, order: int):
        r"""The backward recursion, to derivative ``order``: with :math:`\tilde U_H = w_H \Phi_H`,

        .. math:: U_t = w_t L_t + P_t \tilde U_{t+1}, \qquad
                  \tilde U_t = m\, w_t \Phi_t + (1 - m)\, U_t

        (:math:`m` the terminal-set indicator: an episode entering it at time :math:`t` pays :math:`w_t\Phi_t`
        once), and the recursions of :math:`d\tilde U`, :math:`d^2\tilde U` obtained by differentiating them with
        the model derivatives :math:`dP_t, dL_t, d\Phi_t` (and second derivatives). Returns the stacked
        ``(H+1, S, ...)`` arrays of each order."""
        ders = self.derivatives(order)
        (P, L, Phi) = ders[0]
        m, a, w = 1.0 - self.alive, self.alive, self.w

        def mix(phi_t, u_t, w_t, extra_dims):
            shape = (self.S,) + (1,) * extra_dims
            return m.reshape(shape) * w_t * phi_t + a.reshape(shape) * u_t

        init = [w[-1] * Phi[-1]]
        if order >= 1:
            init.append(w[-1] * ders[1][2][-1])
        if order >= 2:
            init.append(w[-1] * ders[2][2][-1])
        xs = [P, L, Phi[:-1], w[:-1]]
        if order >= 1:
            xs += [ders[1][0], ders[1][1], ders[1][2][:-1]]
        if order >= 2:
            xs += [ders[2][0], ders[2][1], ders[2][2][:-1]]

        def step(carry, x):
            P_t, L_t, Phi_t, w_t = x[:4]
            U1 = carry[0]
            U = w_t * L_t + P_t @ U1
            out = [mix(Phi_t, U, w_t, 0)]
            if order >= 1:
                dP_t, dL_t, dPhi_t = x[4:7]
                dU1 = carry[1]
                dU = w_t * dL_t + jnp.einsum("xyp,y->xp", dP_t, U1) + P_t @ dU1
                out.append(mix(dPhi_t, dU, w_t, 1))
            if order >= 2:
                d2P_t, d2L_t, d2Phi_t = x[7:10]
                d2U1 = carry[2]
                cross = jnp.einsum("xyp,yq->xpq", dP_t, dU1)
                d2U = (
                    w_t * d2L_t
                    + jnp.einsum("xypq,y->xpq", d2P_t, U1)
                    + cross
                    + jnp.swapaxes(cross, -1, -2)
                    + jnp.einsum("xy,ypq->xpq", P_t, d2U1)
                )
                out.append(mix(d2Phi_t, d2U, w_t, 2))
            return out, out

        _, stacked = jax.lax.scan(step, init, xs, reverse=True)
        return [jnp.concatenate([st, last[None]], axis=0) for st, last in zip(stacked, init, strict=True)]

    def marginals(self) -> jax.Array:
        r"""``(H+1, S)``: :math:`\mu_t(x) = \Pr(x_t = x, \text{not yet absorbed})`, forward:
        :math:`\mu_0 = (1-m)\,p_0`, :math:`\mu_{t+1} = (1-m)\,(P_t^\top \mu_t)`."""
        mu0 = self.p0 * self.alive

        def step(mu, P_t):
            nxt = (mu @ P_t) * self.alive
            return nxt, nxt

        _, mus = jax.lax.scan(step, mu0, self.P)
        return jnp.concatenate([mu0[None], mus], axis=0)


def _model(problem: Problem, theta: PyTree) -> "_Model | _FiniteModel":
    _check_problem(problem)
    return _FiniteModel(problem, theta) if is_finite_horizon(problem) else _Model(problem, theta)


def _score(P: jax.Array, dP: jax.Array) -> jax.Array:
    """s = grad log P(x'|x) = grad P / P on the support of P, 0 off it; shape (S, S, p)."""
    support = P > 0
    safe = jnp.where(support, P, 1.0)
    return jnp.where(support[..., None], dP / safe[..., None], 0.0)


@_compiled
def chain(problem: Problem, theta: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""The finite chain of ``problem`` at ``theta``: ``(P, L, p0)``.

    :math:`P_{xx'} = P(x' \mid x, \theta)` (``(S, S)``, row-stochastic), :math:`L_x = L(x, \theta)` (``(S,)``) and
    :math:`p_0` the initial probabilities (``(S,)``). With a terminal set (first exit) ``P`` has the terminal rows
    zeroed and ``L`` holds :math:`\Phi` on the terminal states; for finite-horizon problems ``P`` and ``L`` are
    stacked over time, ``(H, S, S)`` and ``(H, S)`` (module docstring).

    Raises :class:`~pydso.ProblemError` (naming the problem) if the system is not a
    :class:`~pydso.TabularChain`, the initial distribution is not :class:`~pydso.Categorical`, the setting is
    :class:`~pydso.Episodic` with :math:`\gamma = 1` and no terminal set (or a terminal set not reached with
    probability 1), :class:`~pydso.AverageCost` with a terminal set or cost, or (for concrete values) a matrix has
    negative entries or rows that do not sum to 1 within ``1e-8``.
    """
    m = _model(problem, theta)
    return m.P, m.L, m.p0


def stationary(P: jax.Array) -> jax.Array:
    r"""Stationary distribution :math:`\pi` of a row-stochastic matrix: :math:`\pi^\top P = \pi^\top`,
    :math:`\pi^\top \mathbf 1 = 1`.

    Solves :math:`\pi^\top (I - P + \mathbf 1 \mathbf 1^\top) = \mathbf 1^\top`, which is non-singular exactly when
    the chain has a single closed class (unichain; transient states get :math:`\pi = 0`, periodic chains are
    fine). Raises :class:`~pydso.ProblemError` for a non-stochastic matrix or a chain with several closed classes.
    """
    P = jnp.asarray(P)
    _check_stochastic(P, "stationary(P)")
    if _concrete(P):
        _stationary(P, "stationary(P)")  # the ergodicity check, eagerly
    return _stationary_jit(P)


@jax.jit
def _stationary_jit(P: jax.Array) -> jax.Array:
    return _stationary(P, "stationary(P)")


@_compiled
def value(problem: Problem, theta: PyTree) -> jax.Array:
    r"""Value vector, shape ``(S,)``.

    Episodic: :math:`V = L + \gamma P V`, i.e. :math:`V = (I - \gamma P)^{-1} L`.
    Average cost: the differential value :math:`h` with :math:`h + J \mathbf 1 = L + P h` and
    :math:`\pi^\top h = 0`, computed as :math:`h = Z (L - J \mathbf 1)` with the fundamental matrix
    :math:`Z = (I - P + \mathbf 1 \pi^\top)^{-1}` (Puterman 1994, §8.2.1).
    """
    m = _model(problem, theta)
    return m.backward(0)[0] if m.finite else m.value()


@_compiled
def objective(problem: Problem, theta: PyTree) -> jax.Array:
    r"""Objective :math:`J(\theta)`: :math:`p_0^\top V` (episodic) or :math:`\pi^\top L` (average cost)."""
    m = _model(problem, theta)
    if m.finite:
        return m.p0 @ m.backward(0)[0][0]
    if m.average:
        return m.pi() @ m.L
    return m.p0 @ m.value()


@_compiled
def occupancy(problem: Problem, theta: PyTree) -> jax.Array:
    r"""State weighting of the objective, shape ``(S,)``.

    Episodic: discounted occupancy :math:`\rho(x) = \sum_t \gamma^t \Pr(x_t = x)`,
    :math:`\rho^\top = p_0^\top (I - \gamma P)^{-1}`, which sums to :math:`1/(1-\gamma)`.
    Average cost: the stationary distribution :math:`\pi`.
    """
    m = _model(problem, theta)
    return m.marginals() if m.finite else m.weights()


@_compiled
def gradient(problem: Problem, theta: PyTree) -> PyTree:
    r"""DSO gradient :math:`\nabla J` (a pytree like ``theta``) by the formula of DESIGN.md §1.1.

    Episodic: :math:`\nabla J = \sum_x \rho(x) \big[\nabla L(x) + \gamma \sum_{x'} P(x' \mid x)\, s(x, x')\,
    V(x')\big]` with the score :math:`s = \nabla \log P(x' \mid x)` — the chain-level policy-gradient theorem
    (Sutton et al. 2000, *Policy gradient methods for RL with function approximation*, Thm. 1, with the policy
    folded into the transition law).
    Average cost: :math:`\nabla J = \sum_x \pi(x) \big[\nabla L(x) + \sum_{x'} \nabla P(x' \mid x)\, h(x')\big]`
    (Sutton et al. 2000, average-reward case; Cao 2007, *Stochastic Learning and Optimization*, §2.1).

    Only :math:`\nabla P` and :math:`\nabla L` (autodiff of the model) are used, never the derivative of
    :math:`J`.
    """
    m = _model(problem, theta)
    if m.finite:
        return m.unravel(m.p0 @ m.backward(1)[1][0])
    dP, dL = m.dP(), m.dL()
    w, V = m.weights(), m.value()
    if m.average:
        per_state = dL + jnp.einsum("xyp,y->xp", dP, V)
    else:
        s = _score(m.P, dP)
        per_state = dL + m.gamma * jnp.einsum("xy,xyp,y->xp", m.P, s, V)
    return m.unravel(w @ per_state)


def _value_gradient(m: _Model, dP: jax.Array, dL: jax.Array, V: jax.Array) -> jax.Array:
    if not m.average:
        rhs = dL + m.gamma * jnp.einsum("xyp,y->xp", dP, V)
        return jnp.linalg.solve(m.resolvent_matrix(), rhs)
    pi = m.pi()
    A = m.fundamental(pi)
    dJ = pi @ (dL + jnp.einsum("xyp,y->xp", dP, V))
    r = dL + jnp.einsum("xyp,y->xp", dP, V) - dJ[None, :]  # pi^T r = 0
    # d pi^T = pi^T dP Z; the normalisation pi^T h = 0 gives pi^T dh = -d pi^T h.
    Zh = jnp.linalg.solve(A, V)
    dpi_h = jnp.einsum("x,xyp,y->p", pi, dP, Zh)
    return jnp.linalg.solve(A, r) - dpi_h[None, :]


@_compiled
def value_gradient(problem: Problem, theta: PyTree) -> jax.Array:
    r"""Jacobian of the value vector w.r.t. the flat parameters, shape ``(S, p)``.

    Episodic: :math:`dV` solves its own Bellman equation (DESIGN.md §1.4)
    :math:`dV = \nabla L + \gamma\,[(\nabla P) V + P\, dV]`.
    Average cost: the derivative of the normalised :math:`h` (:math:`\pi^\top h = 0`):
    :math:`dh = Z\,[\nabla L + (\nabla P) h - \mathbf 1 \nabla J^\top] - \mathbf 1\,(\pi^\top \nabla P\, Z h)^\top`
    with :math:`Z = (I - P + \mathbf 1 \pi^\top)^{-1}` and :math:`\nabla\pi^\top = \pi^\top \nabla P\, Z`
    (Schweitzer 1968, *Perturbation theory and finite Markov chains*).
    """
    m = _model(problem, theta)
    if m.finite:
        return m.backward(1)[1]
    return _value_gradient(m, m.dP(), m.dL(), m.value())


@_compiled
def hessian(problem: Problem, theta: PyTree) -> jax.Array:
    r"""Hessian :math:`\nabla^2 J`, shape ``(p, p)``, by the formula of DESIGN.md §1.4:

    .. math::
        \nabla^2 J = \sum_x \rho(x) \Big[\nabla^2 L(x) + \gamma \sum_{x'} P(x' \mid x)
        \big((\nabla^2 \log P + s s^\top) V(x') + s\, dV(x')^\top + dV(x')\, s^\top\big)\Big],

    :math:`s = \nabla \log P(x' \mid x)`, :math:`dV` from :func:`value_gradient`. It follows by differentiating
    :math:`V = L + \gamma P V` twice and weighting by :math:`\rho^\top = p_0^\top (I-\gamma P)^{-1}`.
    Average cost: the same with :math:`\gamma = 1`, :math:`\rho \to \pi`, :math:`V \to h`, :math:`dV \to dh`
    (any normalisation of :math:`h` gives the same result since :math:`\sum_{x'} \nabla P(x'|x) = 0`).
    """
    m = _model(problem, theta)
    if m.finite:
        H = jnp.einsum("x,xpq->pq", m.p0, m.backward(2)[2][0])
        return 0.5 * (H + H.T)
    dP, dL, d2P, d2L = m.dP(), m.dL(), m.d2P(), m.d2L()
    V = m.value()
    dV = _value_gradient(m, dP, dL, V)
    w = m.weights()
    s = _score(m.P, dP)
    support = (m.P > 0)[..., None, None]
    hess_log_p = jnp.where(support, d2P / jnp.where(m.P > 0, m.P, 1.0)[..., None, None], 0.0)
    hess_log_p = hess_log_p - jnp.einsum("xyp,xyq->xypq", s, s)
    curvature = jnp.einsum("xy,xypq,y->xpq", m.P, hess_log_p + jnp.einsum("xyp,xyq->xypq", s, s), V)
    cross = jnp.einsum("xy,xyp,yq->xpq", m.P, s, dV)
    inner = curvature + cross + jnp.swapaxes(cross, -1, -2)
    H = jnp.einsum("x,xpq->pq", w, d2L + m.gamma * inner)
    return 0.5 * (H + H.T)


@_compiled
def fisher(problem: Problem, theta: PyTree) -> jax.Array:
    r"""Fisher matrix of the chain, shape ``(p, p)``:
    :math:`F = \sum_x \rho(x) \sum_{x'} P(x' \mid x)\, s s^\top`, :math:`s = \nabla \log P(x' \mid x)`
    (DESIGN.md §1.5; Kakade 2002, *A natural policy gradient*), with :math:`\rho` the discounted occupancy
    (episodic, unnormalised) or :math:`\pi` (average cost). It is the Hessian at :math:`\theta' = \theta` of
    :math:`\sum_x \rho(x)\, \mathrm{KL}(P(\cdot \mid x, \theta) \,\|\, P(\cdot \mid x, \theta'))`; it only sees
    parameters of the transition law (cost-only parameters span its null space).
    """
    m = _model(problem, theta)
    if m.finite:
        s = _score(m.P, jax.jacobian(m.transitions)(m.flat))
        mu = m.marginals()[:-1]
        F = jnp.einsum("t,tx,txy,txyp,txyq->pq", m.occ, mu, m.P, s, s)
        return 0.5 * (F + F.T)
    s = _score(m.P, m.dP())
    F = jnp.einsum("x,xy,xyp,xyq->pq", m.weights(), m.P, s, s)
    return 0.5 * (F + F.T)


@_compiled
def natural_gradient(problem: Problem, theta: PyTree, damping: float = 0.0) -> PyTree:
    r"""Natural gradient :math:`(F + \lambda I)^{-1} \nabla J` as a pytree like ``theta`` (Amari 1998;
    Kakade 2002), with :math:`F` from :func:`fisher`, :math:`\nabla J` from :func:`gradient` and
    :math:`\lambda` = ``damping``.

    With ``damping == 0`` the Moore–Penrose pseudo-inverse :math:`F^+ \nabla J` is used, since :math:`F` is
    singular for redundant parametrisations (e.g. softmax logits, invariant to a shift of each row) and for
    parameters the transition law does not depend on; directions outside the range of :math:`F` then get a zero
    step. Pass ``damping > 0`` to keep them.
    """
    F = fisher(problem, theta)
    g, unravel = ravel_pytree(gradient(problem, theta))
    if isinstance(damping, int | float) and damping == 0:
        step = jnp.linalg.pinv(F, hermitian=True) @ g
    else:
        step = jnp.linalg.solve(F + damping * jnp.eye(F.shape[0], dtype=F.dtype), g)
    return unravel(step)


# --------------------------------------------------------------------------------------------- MDPs
def _check_mdp(p, c, p0) -> tuple[jax.Array, jax.Array, jax.Array]:
    p, c, p0 = jnp.asarray(p), jnp.asarray(c), jnp.asarray(p0)
    if p.ndim != 3 or p.shape[0] != p.shape[2]:
        raise ProblemError(f"MDP transition tensor p must have shape (S, A, S), got {p.shape}")
    S, A, _ = p.shape
    if c.shape != (S, A):
        raise ProblemError(f"MDP cost c must have shape (S, A) = {(S, A)}, got {c.shape}")
    if p0.shape != (S,):
        raise ProblemError(f"MDP initial distribution p0 must have shape (S,) = {(S,)}, got {p0.shape}")
    if _concrete(p):
        a = np.asarray(p)
        if np.any(a < 0) or np.any(np.abs(a.sum(-1) - 1) > _STOCHASTIC_TOL):
            raise ProblemError("MDP transition tensor p is not stochastic: p[s, a, :] must be >= 0 and sum to 1")
    return p, c, p0


def mdp_problem(
    policy_fn: Callable[[PyTree], jax.Array],
    p: jax.Array,
    c: jax.Array,
    p0: jax.Array,
    setting: Episodic | AverageCost,
    *,
    name: str = "mdp",
) -> Problem:
    r"""The DSO problem of an MDP under a parametric policy (DESIGN.md §1.3).

    ``policy_fn(theta)`` gives the ``(S, A)`` action probabilities :math:`\pi(a \mid s, \theta)`, ``p`` the
    ``(S, A, S)`` transition tensor :math:`p(s' \mid s, a)`, ``c`` the ``(S, A)`` costs and ``p0`` the initial
    distribution. The closed loop is the :class:`~pydso.TabularChain` with
    :math:`P(s' \mid s) = \sum_a \pi(a \mid s)\, p(s' \mid s, a)` and cost
    :math:`L(s) = \sum_a \pi(a \mid s)\, c(s, a)`.
    """
    p, c, p0 = _check_mdp(p, c, p0)

    def transition_fn(theta):
        return jnp.einsum("sa,sat->st", policy_fn(theta), p)

    def cost(x, theta):
        return jnp.sum(policy_fn(theta)[x] * c[x])

    return Problem(TabularChain(transition_fn), cost, setting, Categorical(p0), name=name)


def policy_gradient_theorem(
    policy_fn: Callable[[PyTree], jax.Array],
    p: jax.Array,
    c: jax.Array,
    p0: jax.Array,
    gamma: float,
    theta: PyTree,
) -> PyTree:
    r"""Gradient of the discounted MDP objective by the classic policy-gradient theorem (Sutton et al. 2000):

    .. math::
        \nabla J = \sum_s \rho(s) \sum_a \nabla \pi(a \mid s)\, Q(s, a), \qquad
        Q = c + \gamma\, p V,

    with :math:`V`, :math:`\rho` of the closed-loop chain. Computed from the action-level quantities only,
    independently of :func:`gradient`, against which it is a check (DESIGN.md §1.3). Returns a pytree like
    ``theta``.
    """
    p, c, p0 = _check_mdp(p, c, p0)
    if not (0.0 < gamma < 1.0):
        raise ProblemError(f"policy_gradient_theorem needs a discount 0 < gamma < 1, got {gamma!r}")
    return _policy_gradient_theorem(policy_fn, p, c, p0, gamma, theta)


@eqx.filter_jit
def _policy_gradient_theorem(policy_fn, p, c, p0, gamma, theta):
    flat, unravel = ravel_pytree(theta)
    S = p.shape[0]
    pol = policy_fn(theta)
    P = jnp.einsum("sa,sat->st", pol, p)
    L = jnp.sum(pol * c, axis=1)
    M = jnp.eye(S, dtype=P.dtype) - gamma * P
    V = jnp.linalg.solve(M, L)
    rho = jnp.linalg.solve(M.T, p0)
    Q = c + gamma * jnp.einsum("sat,t->sa", p, V)
    dpi = jax.jacobian(lambda f: policy_fn(unravel(f)))(flat)  # (S, A, p)
    return unravel(jnp.einsum("s,sap,sa->p", rho, dpi, Q))
