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
from .systems import AverageCost, Categorical, Episodic, Problem, TabularChain

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
    if problem.terminal_cost is not None:
        raise ProblemError(f"{where}: pydso.exact computes infinite-horizon values and does not model a terminal_cost")
    setting = problem.setting
    if isinstance(setting, Episodic):
        if setting.terminal is not None:
            raise ProblemError(
                f"{where}: pydso.exact does not model terminal sets; make terminal states absorbing with zero "
                "cost in transition_fn instead"
            )
        if setting.gamma >= 1.0:
            raise ProblemError(
                f"{where}: exact episodic values need gamma < 1; with gamma = 1 the Bellman system "
                "(I - gamma P) V = L is singular unless the chain ends in a terminal (absorbing, zero-cost) set, "
                "which pydso.exact does not model; use gamma < 1 or the AverageCost setting"
            )
    elif not isinstance(setting, AverageCost):
        raise ProblemError(
            f"{where}: pydso.exact supports the Episodic (infinite horizon, gamma < 1) and AverageCost settings, "
            f"got {type(setting).__name__}"
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


def _validate(problem: Problem, theta: PyTree) -> None:
    """Checks that need concrete values, run eagerly before the compiled computation (skipped under tracing)."""
    _check_problem(problem)
    where = _where(problem)
    P = jnp.asarray(problem.system.transition_fn(theta))
    _check_stochastic(P, where)
    if isinstance(problem.setting, AverageCost) and _concrete(P):
        _stationary(P, where)


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

    def __init__(self, problem: Problem, theta: PyTree):
        _check_problem(problem)
        self.problem = problem
        self.where = _where(problem)
        self.flat, self.unravel = ravel_pytree(theta)
        self.P = jnp.asarray(problem.system.transition_fn(theta))
        _check_stochastic(self.P, self.where)
        self.S = self.P.shape[0]
        self.L = self.cost_vector(self.flat)
        if self.L.shape != (self.S,):
            raise ProblemError(f"{self.where}: cost(x, theta) must be a scalar for each of the {self.S} states")
        self.p0 = jnp.asarray(problem.initial.probs, self.P.dtype)
        if self.p0.shape != (self.S,):
            raise ProblemError(
                f"{self.where}: the Categorical initial distribution has {self.p0.shape[0]} states "
                f"but the transition matrix has {self.S}"
            )
        self.average = isinstance(problem.setting, AverageCost)
        self.gamma = 1.0 if self.average else float(problem.setting.gamma)

    def transition(self, flat: jax.Array) -> jax.Array:
        return jnp.asarray(self.problem.system.transition_fn(self.unravel(flat)))

    def cost_vector(self, flat: jax.Array) -> jax.Array:
        th = self.unravel(flat)
        return jax.vmap(lambda s: jnp.asarray(self.problem.cost(s, th)))(jnp.arange(self.S))

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


def _score(P: jax.Array, dP: jax.Array) -> jax.Array:
    """s = grad log P(x'|x) = grad P / P on the support of P, 0 off it; shape (S, S, p)."""
    support = P > 0
    safe = jnp.where(support, P, 1.0)
    return jnp.where(support[..., None], dP / safe[..., None], 0.0)


@_compiled
def chain(problem: Problem, theta: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""The finite chain of ``problem`` at ``theta``: ``(P, L, p0)``.

    :math:`P_{xx'} = P(x' \mid x, \theta)` (``(S, S)``, row-stochastic), :math:`L_x = L(x, \theta)` (``(S,)``) and
    :math:`p_0` the initial probabilities (``(S,)``).

    Raises :class:`~pydso.ProblemError` (naming the problem) if the system is not a
    :class:`~pydso.TabularChain`, the initial distribution is not :class:`~pydso.Categorical`, the setting is not
    :class:`~pydso.Episodic` with :math:`\gamma < 1` and no terminal set or :class:`~pydso.AverageCost`, a
    ``terminal_cost`` is given, or (for concrete values) the matrix has negative entries or rows that do not sum
    to 1 within ``1e-8``.
    """
    m = _Model(problem, theta)
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
    return _Model(problem, theta).value()


@_compiled
def objective(problem: Problem, theta: PyTree) -> jax.Array:
    r"""Objective :math:`J(\theta)`: :math:`p_0^\top V` (episodic) or :math:`\pi^\top L` (average cost)."""
    m = _Model(problem, theta)
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
    return _Model(problem, theta).weights()


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
    m = _Model(problem, theta)
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
    m = _Model(problem, theta)
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
    m = _Model(problem, theta)
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
    m = _Model(problem, theta)
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
