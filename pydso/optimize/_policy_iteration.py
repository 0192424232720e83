r"""Approximate policy iteration for chains, a method of :func:`pydso.minimize` (DESIGN.md §1.7; Bertsekas &
Tsitsiklis 1996, *Neuro-Dynamic Programming*, §6.2; Bertsekas 2011, *Approximate policy iteration: a survey*).

Each step :math:`k` is one evaluate/improve round:

1. **collect**: ``n`` fresh episodes under :math:`\theta_k` (``n=0``: none), joined to the fixed log ``data``
   and — with ``reuse=True`` (default) — to the episodes of earlier steps, reweighted to :math:`\theta_k` by their
   stored behaviour log-densities (per-decision IS), so data are reused across rounds;
2. **evaluate**: fit :math:`V_k \approx V_{\theta_k}` on all data with linear ``features``, by off-policy LSTD(λ)
   (``evaluate="td"``) or IS Monte-Carlo returns (``evaluate="mc"``) (:func:`pydso.estimators.fit_value_linear`);
3. **improve**: ``improve="lookahead"`` (finite chains, :class:`~pydso.TabularChain`): minimise the one-step
   lookahead through the *known* chain on the visited states (:func:`lookahead_improve`),

   .. math:: \hat S(\theta) = \sum_x \hat\rho_k(x)\Big[L(x,\theta) + \gamma\sum_{x'}P(x' \mid x,\theta)\,V_k(x')\Big],

   with :math:`\hat\rho_k(x) = \frac1n\sum_{i,t} w_t W_t\,1[x_t = x]` the IS-weighted discounted occupancy
   of :math:`\theta_k` — policy iteration's greedy step, made by ``epochs`` optax steps (for an MDP with a softmax
   policy it approaches the greedy deterministic policy); or ``improve="proximal"`` / a
   :class:`~pydso.optimize.Proximal` object: minimise the clipped surrogate with TD advantages from :math:`V_k`
   (any chain with a density).

Each step reports the IS estimate of :math:`J(\theta_k)` from the data, and ``ess`` and ``episodes``.

**Average cost** (:class:`~pydso.AverageCost`): the evaluation fits the differential value :math:`h_k` and the
average cost jointly by average-cost LSTD (:func:`pydso.estimators.fit_differential_value`, ``evaluate="td"``), the
lookahead is :math:`\sum_x \hat\pi_k(x)[L(x,\theta) + \sum_{x'}P(x'\mid x,\theta)\,h_k(x')]` (the average-cost
policy-improvement step, Puterman 1994, §8.6, with :math:`\hat\pi_k` the visit frequencies after the burn-in), and
the proximal improvement uses TD advantages of :math:`h_k` (:func:`pydso.optimize.td_discount`).
"""

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..estimators import (
    as_batch,
    discount,
    ess_report,
    fit_value_linear,
    log_ratios,
    offpolicy_objective,
    weighted_returns,
)
from ..systems import AverageCost, Problem, TabularChain
from ._improve import AbstractDataMethod, describe_fields
from ._proximal import Proximal, adam

__all__ = ["PolicyIteration", "lookahead_improve"]


@eqx.filter_jit
def _lookahead_run(problem, optimizer, rho, V, gamma, theta, epochs):
    S = rho.shape[0]

    def objective(theta):
        P = problem.system.matrix(0.0, theta)
        L = jax.vmap(lambda s: problem.running_cost(0.0, s, theta))(jnp.arange(S))
        return rho @ (L + gamma * P @ V)

    g0 = jax.grad(objective)(theta)

    def body(carry, _):
        th, st = carry
        g = jax.grad(objective)(th)
        upd, st = optimizer.update(g, st, th)
        return (optax.apply_updates(th, upd), st), None

    (theta, _), _ = jax.lax.scan(body, (theta, optimizer.init(theta)), None, length=epochs)
    return theta, optax.tree.norm(g0)


def lookahead_improve(
    problem: Problem,
    theta_k: PyTree,
    data,
    value_fn: Callable,
    *,
    epochs: int = 100,
    optimizer: optax.GradientTransformation | None = None,
    weight_clip: float | None = None,
) -> PyTree:
    r"""Minimise the one-step lookahead :math:`\hat S(\theta)` (module docstring) through a known finite chain.

    **Arguments:**

    - ``problem``: a problem on a :class:`~pydso.TabularChain` (episodic with a discount, or average cost with a
      differential ``value_fn``).
    - ``theta_k``: the parameters of the round (the occupancy weights and :math:`V_k` belong to them).
    - ``data``: logged episodes (in memory) giving the occupancy :math:`\hat\rho_k`.
    - ``value_fn``: :math:`V_k(x, \theta)`.
    - ``epochs``: optax steps on :math:`\hat S` (each a pass over the data's occupancy).
    - ``optimizer``: default ``optax.adam(0.3)``.
    - ``weight_clip``: truncation of the per-decision weights.

    **Returns:** the improved parameters.
    """
    return _lookahead(problem, theta_k, data, value_fn, epochs, optimizer, weight_clip)[0]


def _lookahead(problem, theta_k, data, value_fn, epochs, optimizer, weight_clip):
    r""":func:`lookahead_improve` and the norm of :math:`\nabla\hat S(\theta_k)`."""
    if not isinstance(problem.system, TabularChain):
        raise ProblemError(
            f"improve='lookahead' enumerates next states and needs a TabularChain, got "
            f"{type(problem.system).__name__}; use improve='proximal'"
        )
    epochs = check_positive_int(epochs, "epochs")
    batch = as_batch(data, problem)
    gamma = 1.0 if isinstance(problem.setting, AverageCost) else discount(problem)
    W = weighted_returns(problem, theta_k, batch, log_ratios(problem, theta_k, batch), weight_clip=weight_clip).weights
    S = problem.system.matrix(0.0, theta_k).shape[0]
    occ = jnp.where(batch.valid, batch.step_weights * W[:, :-1], 0.0)
    x = batch.states[:, :-1]
    rho = jnp.zeros(S).at[x.reshape(-1)].add(occ.reshape(-1)) / batch.n_episodes
    V = jax.vmap(lambda s: value_fn(s, theta_k))(jnp.arange(S))
    optimizer = adam(0.3) if optimizer is None else optimizer
    theta, g0 = _lookahead_run(problem, optimizer, rho, V, gamma, jax.tree.map(jnp.asarray, theta_k), epochs)
    return theta, float(g0)


class PolicyIteration(AbstractDataMethod):
    r"""Approximate policy iteration (module docstring): one evaluate/improve round per step of
    :func:`pydso.minimize`.

    **Arguments:**

    - ``features``: ``phi(x) -> (f,)`` features of the linear value fit (e.g. ``jax.nn.one_hot(x, S)``).
    - ``n``: fresh episodes per round (``0``: learn from ``data`` alone, fully off-policy).
    - ``evaluate``: ``"td"`` (LSTD(``lam``)) or ``"mc"``; ``lam``: λ.
    - ``improve``: ``"lookahead"`` (finite chains), ``"proximal"`` (a clipped :class:`Proximal` improvement of
      ``epochs`` epochs with ``optimizer`` and ``weight_clip``), or a :class:`Proximal` object (its settings; its
      advantage is replaced by the TD errors of :math:`V_k`, its ``n`` and ``data`` are not used).
    - ``epochs``: optax steps of the lookahead (epochs of the default proximal improvement).
    - ``optimizer``: optax transformation of the improvement (default ``adam(0.3)`` for the lookahead,
      ``adam(1e-2)`` for the proximal one).
    - ``weight_clip``: truncation of the per-decision weights (evaluation and improvement).
    - ``data``: initial logged data (in memory); ``reuse``: keep the episodes of earlier rounds (default True).

    When not to use it: the value features cannot represent :math:`V_\theta` (the improvement then follows the fit's
    errors); deterministic dynamics (no density).
    """

    features: Callable = eqx.field(static=True)
    n: int = eqx.field(static=True, default=256)
    evaluate: str = eqx.field(static=True, default="td")
    lam: float = eqx.field(static=True, default=0.0)
    improve: "str | Proximal" = "lookahead"
    epochs: int = eqx.field(static=True, default=100)
    optimizer: optax.GradientTransformation | None = eqx.field(static=True, default=None)
    weight_clip: float | None = eqx.field(static=True, default=None)
    data: object = None
    reuse: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.evaluate not in ("td", "mc"):
            raise ProblemError(f"PolicyIteration.evaluate must be 'td' or 'mc', got {self.evaluate!r}")
        if not (isinstance(self.improve, Proximal) or self.improve in ("lookahead", "proximal")):
            raise ProblemError(
                f"PolicyIteration.improve must be 'lookahead', 'proximal' or a Proximal object, got {self.improve!r}"
            )
        check_positive_int(self.epochs, "PolicyIteration.epochs")

    def check(self, problem, theta):
        super().check(problem, theta)
        if self.improve == "lookahead" and not isinstance(problem.system, TabularChain):
            raise ProblemError(
                f"improve='lookahead' enumerates next states and needs a TabularChain, got "
                f"{type(problem.system).__name__}; use improve='proximal'"
            )

    def _proximal(self, value_fn) -> Proximal:
        if isinstance(self.improve, Proximal):
            base = self.improve
        else:
            base = Proximal(epochs=self.epochs, optimizer=self.optimizer, weight_clip=self.weight_clip)
        return dataclasses.replace(base, advantage="td", value_fn=value_fn)

    def improve_from(self, problem, theta, data, *, key, progress=False):
        """One evaluate/improve round on ``data`` (see :meth:`AbstractDataMethod.improve_from`)."""
        batch = as_batch(data, problem)
        V = fit_value_linear(
            problem, theta, batch, self.features, method=self.evaluate, lam=self.lam, weight_clip=self.weight_clip
        )
        J, J_se = offpolicy_objective(problem, theta, batch, weight_clip=self.weight_clip)
        ess = ess_report(problem, theta, batch, warn_below=None)["episode"]
        if self.improve == "lookahead":
            new, grad_norm = _lookahead(problem, theta, batch, V, self.epochs, self.optimizer, self.weight_clip)
        else:
            new, info = self._proximal(V).improve_from(problem, theta, batch, key=key, progress=progress)
            grad_norm = info["grad_norm"]
        return new, {
            "objective": J,
            "objective_stderr": J_se,
            "grad_norm": grad_norm,
            "episodes": batch.n_episodes,
            "ess": ess,
        }

    def describe(self) -> str:
        improve = self.improve if isinstance(self.improve, str) else self.improve.describe()
        names = ("features", "n", "evaluate", "lam", "epochs", "optimizer", "weight_clip", "data", "reuse")
        return describe_fields(self, names)[:-1] + f", improve={improve})"
