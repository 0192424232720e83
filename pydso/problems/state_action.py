r"""The state-action chain of an MDP (DESIGN.md §1.3): :func:`state_action_chain`.

An MDP with a stochastic policy :math:`\pi_\theta(a \mid s)` has two DSO chains. The *marginal* chain on states,
:math:`P(s' \mid s) = \sum_a \pi(a \mid s)\,p(s' \mid s, a)` (:func:`pydso.exact.mdp_problem`), and the
*state-action* chain built here, on the augmented state :math:`z = (s, a)`:

.. math::
    P_\theta\big((s', a') \mid (s, a)\big) = p(s' \mid s, a)\,\pi_\theta(a' \mid s'), \qquad L(s, a) = c(s, a).

Its score is :math:`\nabla\log P = \nabla\log\pi_\theta(a' \mid s')` — the plant's :math:`p` drops out — so the DSO
score gradient on this chain *is* REINFORCE / actor-critic, and its chain Fisher
:math:`\sum_z \rho(z)\sum_{z'} P\,ss^\top = \sum_s d(s)\,\mathbb E_{a\sim\pi}[\nabla\log\pi\,\nabla\log\pi^\top]`
is Kakade's (2002) policy Fisher, with :math:`d` the (discounted) state occupancy: the chain natural gradient of
the state-action chain is Kakade's natural policy gradient. The Fisher of the *marginal* chain,
:math:`\sum_s d(s)\sum_{s'} P(s'|s)\,\nabla\log P(s'|s)\nabla\log P(s'|s)^\top`, is a different matrix (it only sees
the policy through the state distribution it induces), so its natural gradient differs from Kakade's — by a
relative difference of order one or more on generic MDPs (20.7 on the random 5-state, 3-action MDP of
``tests/test_state_action.py``).
Both chains have the same objective and the same gradient.

**The start step.** The first action :math:`a_0 \sim \pi_\theta(\cdot \mid s_0)` would make the initial
distribution depend on :math:`\theta`, which DSO problems do not allow (:math:`P_0` is fixed). The chain therefore
starts in an extra *start state* :math:`z_\star` whose transition draws :math:`s_0 \sim p_0`,
:math:`a_0 \sim \pi_\theta(\cdot\mid s_0)` and costs nothing; to keep the objective equal to the MDP's, the
costs of the other states are divided by :math:`\gamma` in the episodic setting (the start step delays every cost
by one discount factor). So :math:`J_{\text{chain}}(\theta) = J_{\text{MDP}}(\theta)` exactly, for
:class:`~pydso.Episodic` (:math:`\gamma<1`) and :class:`~pydso.AverageCost` (where the start state is transient),
and an episode of ``horizon`` steps covers ``horizon - 1`` MDP steps.

Tabular MDPs give a :class:`~pydso.TabularChain` on :math:`S A + 1` states (index :math:`s A + a`, the start state
last), so :mod:`pydso.exact` computes everything about it. Continuous MDPs (dynamics :math:`x' = f(x, a) +
\sigma\varepsilon`, a Gaussian policy :math:`a \sim N(\mu_\theta(x), \operatorname{diag}\sigma_\theta(x)^2)`) give a
reparameterised :class:`~pydso.MarkovChain` on :math:`z = (x, a, \text{started})`; its ``log_prob`` is the density
of :math:`(x', a')` after the start step and of :math:`a'` alone on it (:math:`x` is copied, a
:math:`\theta`-free point mass), which is all the score estimator needs.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import exact
from .._errors import ProblemError
from .._typing import PyTree
from ..systems import (
    AbstractInitial,
    AverageCost,
    Categorical,
    Episodic,
    MarkovChain,
    Problem,
    TabularChain,
)
from ._contract import AbstractConstructedProblem

__all__ = ["StateActionChain", "state_action_chain"]


class StateActionChain(AbstractConstructedProblem):
    r"""What :func:`state_action_chain` returns (the contract of :mod:`pydso.problems`).

    **Attributes:**

    - ``problem``: the :class:`~pydso.Problem` on the augmented states (module docstring).
    - ``theta0``: the initial policy parameters.
    - ``tabular``: whether the MDP is tabular (then ``n_states``, ``n_actions`` are set and the chain's state
      ``s * n_actions + a`` is :meth:`encode` d; the start state is ``n_states * n_actions``).
    - ``gamma``: the discount (1.0 for the average-cost setting).
    """

    chain_problem: Problem
    theta0: PyTree
    tabular: bool = eqx.field(static=True)
    gamma: float = eqx.field(static=True)
    n_states: int | None = eqx.field(static=True, default=None)
    n_actions: int | None = eqx.field(static=True, default=None)

    @property
    def problem(self) -> Problem:
        return self.chain_problem

    def encode(self, s, a):
        """The chain state of the pair ``(s, a)`` (tabular): ``s * n_actions + a``."""
        return s * self.n_actions + a

    def decode(self, z):
        """``(s, a)`` of a chain state ``z < n_states * n_actions`` (tabular)."""
        return z // self.n_actions, z % self.n_actions

    def result(self, theta: PyTree, **info) -> dict:
        """Tabular: ``{"objective": J(theta)}`` computed exactly by :mod:`pydso.exact` (plus ``info``).
        Continuous: raises (estimate :math:`J` with :func:`pydso.rollout` instead)."""
        if not self.tabular:
            raise ProblemError("result() computes exact objectives of tabular MDPs only; use pydso.rollout")
        return {"objective": float(exact.objective(self.chain_problem, theta)), **info}


class _StartState(AbstractInitial):
    """The start state (x0, a = 0, started = 0) of the continuous state-action chain, x0 from ``base``."""

    base: AbstractInitial
    action_size: int = eqx.field(static=True)

    def sample(self, key):
        x = self.base.sample(key)
        return jnp.concatenate([x, jnp.zeros((self.action_size + 1,), x.dtype)])


def _check_setting(setting) -> float:
    if isinstance(setting, Episodic):
        if setting.terminal is not None:
            raise ProblemError("setting: state_action_chain does not support terminal sets; use absorbing states")
        return float(setting.gamma)
    if isinstance(setting, AverageCost):
        return 1.0
    raise ProblemError(f"setting must be Episodic or AverageCost, got {type(setting).__name__}")


def _tabular(policy, p, c, p0, setting, theta0, name) -> StateActionChain:
    p, c, p0 = (jnp.asarray(np.asarray(a, dtype=float)) for a in (p, c, p0))
    if p.ndim != 3 or p.shape[0] != p.shape[2]:
        raise ProblemError(f"p must be the transition tensor p[s, a, s'] of shape (S, A, S), got {p.shape}")
    S, A, _ = p.shape
    if c.shape != (S, A):
        raise ProblemError(f"c must be the cost c[s, a] of shape (S, A) = {(S, A)}, got {c.shape}")
    if p0.shape != (S,):
        raise ProblemError(f"p0 must be the initial distribution of shape (S,) = {(S,)}, got {p0.shape}")
    if np.any(np.asarray(p) < 0) or np.any(np.abs(np.asarray(p).sum(-1) - 1) > 1e-8):
        raise ProblemError("p is not stochastic: p[s, a, :] must be >= 0 and sum to 1")
    if np.any(np.asarray(p0) < 0) or abs(float(np.sum(p0)) - 1) > 1e-8:
        raise ProblemError("p0 must be a probability vector")
    gamma = _check_setting(setting)
    if theta0 is not None:
        pol = jax.eval_shape(policy, theta0)
        if pol.shape != (S, A):
            raise ProblemError(f"policy(theta) must return the (S, A) = {(S, A)} action probabilities, got {pol.shape}")
    n = S * A
    cost_vec = jnp.concatenate([c.reshape(n) / gamma, jnp.zeros((1,), c.dtype)])

    def transition_fn(theta):
        pi = policy(theta)  # (S, A)
        body = jnp.einsum("sat,tb->satb", p, pi).reshape(n, n)  # (s,a) -> (s',a')
        start = (p0[:, None] * pi).reshape(1, n)
        P = jnp.concatenate([body, start], axis=0)
        return jnp.concatenate([P, jnp.zeros((n + 1, 1), P.dtype)], axis=1)

    def cost(z, theta):
        return cost_vec[z]

    initial = Categorical(np.eye(n + 1)[n])
    problem = Problem(TabularChain(transition_fn), cost, setting, initial, name=name)
    return StateActionChain(chain_problem=problem, theta0=theta0, tabular=True, gamma=gamma, n_states=S, n_actions=A)


def _continuous(policy, dynamics, noise_scale, cost, initial, setting, theta0, action_size, name) -> StateActionChain:
    if not callable(dynamics):
        raise ProblemError("dynamics must be a callable dynamics(x, a) -> mean of x'")
    if not callable(cost):
        raise ProblemError("cost must be a callable cost(x, a) -> scalar")
    if not isinstance(initial, AbstractInitial):
        raise ProblemError(f"initial must be a pydso initial distribution over x, got {type(initial).__name__}")
    if not isinstance(action_size, int) or action_size < 1:
        raise ProblemError(f"action_size must be a positive int (the dimension of a), got {action_size!r}")
    noise = np.asarray(noise_scale, dtype=float)
    if not np.all(np.isfinite(noise)) or np.any(noise <= 0):
        raise ProblemError(f"noise_scale must be positive (the plant noise std), got {noise_scale!r}")
    gamma = _check_setting(setting)
    x_shape = tuple(jax.eval_shape(initial.sample, jax.random.key(0)).shape)
    if len(x_shape) != 1:
        raise ProblemError(f"initial must draw vector states x of shape (d,), got shape {x_shape}")
    d, m = x_shape[0], action_size
    sig = jnp.broadcast_to(jnp.asarray(noise), (d,))

    def split(z):
        return z[:d], z[d : d + m], z[d + m]

    def act(x, theta):
        mean, std = policy(x, theta)
        return jnp.reshape(mean, (m,)), jnp.broadcast_to(std, (m,))

    def gauss_logp(y, mean, std):
        zz = (y - mean) / std
        return jnp.sum(-0.5 * zz**2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi))

    def sample_fn(key, z, theta):
        x, a, started = split(z)
        kx, ka = jax.random.split(key)
        x_next = jnp.where(started > 0.5, dynamics(x, a) + sig * jax.random.normal(kx, (d,), z.dtype), x)
        mean, std = act(x_next, theta)
        a_next = mean + std * jax.random.normal(ka, (m,), z.dtype)
        return jnp.concatenate([x_next, a_next, jnp.ones((1,), z.dtype)])

    def log_prob_fn(z, z_next, theta):
        x, a, started = split(z)
        x_next, a_next, _ = split(z_next)
        mean, std = act(x_next, theta)
        lp_plant = jnp.where(started > 0.5, gauss_logp(x_next, dynamics(x, a), sig), 0.0)
        return lp_plant + gauss_logp(a_next, mean, std)

    def chain_cost(z, theta):
        x, a, started = split(z)
        return jnp.where(started > 0.5, cost(x, a) / gamma, 0.0)

    system = MarkovChain(sample_fn, log_prob_fn, reparameterized=True)
    problem = Problem(system, chain_cost, setting, _StartState(initial, m), name=name, theta_example=theta0)
    return StateActionChain(chain_problem=problem, theta0=theta0, tabular=False, gamma=gamma)


def state_action_chain(
    policy: Callable,
    setting: Episodic | AverageCost,
    *,
    theta0: "PyTree | None" = None,
    p=None,
    c=None,
    p0=None,
    dynamics: Callable | None = None,
    noise_scale=None,
    cost: Callable | None = None,
    initial: AbstractInitial | None = None,
    action_size: int | None = None,
    name: str = "state_action",
) -> StateActionChain:
    r"""The state-action chain of an MDP under a stochastic policy (module docstring), as a DSO problem.

    **Arguments (tabular MDP):**

    - `policy`: ``policy(theta) -> (S, A)`` action probabilities :math:`\pi_\theta(a \mid s)` (rows sum to 1,
      e.g. ``jax.nn.softmax(theta, axis=1)``).
    - `p`: the transition tensor :math:`p(s' \mid s, a)`, shape ``(S, A, S)``; `c`: the costs ``(S, A)``;
      `p0`: the initial distribution ``(S,)``.

    **Arguments (continuous MDP):**

    - `policy`: ``policy(x, theta) -> (mean, std)`` of the Gaussian action, shapes ``(m,)`` (std may be a scalar).
    - `dynamics`: ``dynamics(x, a) -> (d,)``, the mean of :math:`x'`; `noise_scale`: the plant noise standard
      deviation :math:`\sigma` (scalar or ``(d,)``, positive); `cost`: ``cost(x, a) -> scalar``;
      `initial`: the distribution of :math:`x_0` (a pydso initial distribution); `action_size`: :math:`m`.

    **Common arguments:**

    - `setting`: :class:`~pydso.Episodic` (no terminal set) or :class:`~pydso.AverageCost`.
    - `theta0`: initial policy parameters (used to check shapes; returned as ``theta0``).
    - `name`: the problem's name.

    **Returns:**

    A :class:`StateActionChain`; ``chain.problem`` is solved by :func:`pydso.minimize` like any problem. Use it to
    get REINFORCE-type estimators (the score involves :math:`\pi` only, not the plant) and Kakade's natural
    gradient (:class:`~pydso.NaturalGradient` on this chain). When not to use it: with a plant density that is
    known and a deterministic policy (use the marginal chain and the pathwise gradient), or when actions are not
    observable in logged data.
    """
    if not callable(policy):
        raise ProblemError("policy must be a callable: policy(theta) (tabular) or policy(x, theta) (continuous)")
    tabular = p is not None or c is not None or p0 is not None
    if tabular:
        if dynamics is not None or cost is not None or initial is not None:
            raise ProblemError("give either p, c, p0 (tabular MDP) or dynamics, cost, initial (continuous), not both")
        if p is None or c is None or p0 is None:
            raise ProblemError("a tabular MDP needs all of p (S, A, S), c (S, A) and p0 (S,)")
        return _tabular(policy, p, c, p0, setting, theta0, name)
    if dynamics is None or cost is None or initial is None or noise_scale is None or action_size is None:
        raise ProblemError(
            "a continuous MDP needs dynamics, noise_scale, cost, initial and action_size "
            "(or give p, c, p0 for a tabular MDP)"
        )
    return _continuous(policy, dynamics, noise_scale, cost, initial, setting, theta0, action_size, name)
