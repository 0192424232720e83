r"""Hessian-vector products of :math:`J(\theta)` from rollouts, in score and pathwise form (DESIGN.md §1.4).

**Score form.** With the path log-density :math:`\ell(\theta) = \sum_t \log P(x_{t+1} \mid x_t, \theta)` and the
weighted path cost :math:`C(\theta) = \sum_t w_t L(x_t, \theta) + w_{end}\Phi(x_{end}, \theta)`,
differentiating :math:`J = \mathbb E_\theta[C]` twice gives

.. math::
    \nabla^2 J = \mathbb E\big[\nabla^2 C + \nabla C\, \nabla\ell^\top + \nabla\ell\, \nabla C^\top
                 + C\,(\nabla^2 \ell + \nabla\ell\,\nabla\ell^\top)\big],

the path form of DESIGN.md §1.4 (whose per-state form :math:`\mathbb E_\rho[\nabla^2 L + \gamma\mathbb E[(\nabla^2
\log P + s s^\top)V' + s\,dV'^\top + dV'\,s^\top]]` is :func:`pydso.exact.hessian`). pydso uses its causal version:
with the per-episode score gradient :math:`g(\theta) = \sum_t w_t\nabla L(x_t) + \sum_t s_t\, C_{t+1}(\theta)`
(:math:`s_t = \nabla\log P(x_{t+1}\mid x_t)`, :math:`C_{t+1}` the weighted cost after :math:`t`), which satisfies
:math:`\mathbb E_\theta[g] = \nabla J` for every :math:`\theta`, the score trick once more gives
:math:`\nabla^2 J = \mathbb E[\nabla g + g\,\nabla\ell^\top]`. Per episode :math:`i` the symmetrised estimate of
:math:`Hv` is

.. math::
    \hat h_i = \tfrac12\big[(\nabla g_i + \nabla g_i^\top)\,v + (g_i - \bar g_{-i})(\nabla\ell_i\cdot v)
               + \nabla\ell_i\,((g_i - \bar g_{-i})\cdot v)\big],

with :math:`\bar g_{-i}` the mean of the other episodes' :math:`g` (a control variate: :math:`\mathbb E[\nabla
\ell_i] = 0` and :math:`\bar g_{-i}` is independent of episode :math:`i`). :math:`\nabla g\,v` is a
forward-over-reverse product (:func:`jax.jvp` of :func:`jax.grad`) and :math:`\nabla g^\top v` a
reverse-over-reverse one; no matrix is formed.

**Pathwise form.** For reparameterised dynamics, :math:`Hv = \mathbb E[\nabla^2 \hat J(\theta;\varepsilon)\,v]` with
the noise held fixed: forward-over-reverse autodiff of the simulated objective (the pathwise gradient's
computation, DESIGN.md §1.2), per group of episodes as in :class:`~pydso.Pathwise` (batch-means standard errors).

:func:`local_model` gives the quadratic model (objective, gradient, Hessian-vector product on the SAME episodes)
that the Newton–CG method :class:`pydso.NewtonCG` minimises.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._checks import check_key, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..backends import get_backend
from ..engine import episode_keys, rollout_chunk, shard_episodes
from ..systems import Problem
from ._base import AbstractEstimator, Estimate
from ._logged import LoggedBatch, as_batch, step_costs, terminal_costs, transition_log_probs
from ._pathwise import Pathwise
from ._score import Score
from ._select import as_estimator
from ._weights import log_ratios, weighted_returns

__all__ = ["hessian_vector", "LocalModel", "local_model", "hessian_estimator"]


# --------------------------------------------------------------------------------------------- helpers
def hessian_estimator(problem: Problem, method: "AbstractEstimator | str | None" = None) -> AbstractEstimator:
    """The estimator whose form the Hessian uses: ``method`` as given (``"score"``, ``"pathwise"``, a
    :class:`~pydso.Score` or :class:`~pydso.Pathwise` instance), or by default :class:`~pydso.Pathwise` for
    reparameterised systems and :class:`~pydso.Score` otherwise. Checked against ``problem``."""
    if method is None:
        method = Pathwise() if problem.system.reparameterized else Score()
    est = as_estimator(method)
    if not isinstance(est, Score | Pathwise):
        raise ProblemError(f"method must be 'score', 'pathwise', Score() or Pathwise(), got {type(est).__name__}")
    est.check(problem)
    return est


def _one_episode(batch: LoggedBatch, i_fields) -> LoggedBatch:
    states, blp, valid, end, tw = i_fields
    return LoggedBatch(states[None], blp[None], valid[None], batch.step_weights, end[None], tw[None])


def _episode_fields(batch: LoggedBatch):
    return (batch.states, batch.behavior_logp, batch.valid, batch.end_index, batch.terminal_weights)


def _loo_mean(a: jax.Array) -> jax.Array:
    """Leave-one-out means over the leading axis: row i is the mean of the other rows."""
    n = a.shape[0]
    return (jnp.sum(a, axis=0, keepdims=True) - a) / jnp.maximum(n - 1, 1)


class _ScoreParts(eqx.Module):
    """Per-episode score-form quantities over the flat parameters of a fixed batch."""

    problem: Problem
    batch: LoggedBatch
    unravel: Callable = eqx.field(static=True)

    def f(self, phi_a, phi_b, ep):
        """f(a; b) = C(a) + sum_t log P_t(a) C_{t+1}(b): its a-gradient at a = b is the causal score gradient."""
        one = _one_episode(self.batch, ep)
        ta, tb = self.unravel(phi_a), self.unravel(phi_b)
        w = one.step_weights
        ca = jnp.sum(step_costs(self.problem, ta, one)[0] * w) + terminal_costs(self.problem, ta, one)[0]
        cb = step_costs(self.problem, tb, one)[0] * w
        term_b = terminal_costs(self.problem, tb, one)[0]
        after = jnp.cumsum(cb[::-1])[::-1]  # sum_{k >= t}
        C_next = jnp.concatenate([after[1:], jnp.zeros((1,), cb.dtype)]) + term_b  # C_{t+1}
        lp = transition_log_probs(self.problem, ta, one)[0]
        return ca + jnp.sum(lp * C_next)

    def g(self, phi, ep):
        return jax.grad(self.f, argnums=0)(phi, phi, ep)

    def ell(self, phi, ep):
        return jnp.sum(transition_log_probs(self.problem, self.unravel(phi), _one_episode(self.batch, ep))[0])

    def objective(self, phi, ep):
        one = _one_episode(self.batch, ep)
        th = self.unravel(phi)
        costs = step_costs(self.problem, th, one)[0]
        return jnp.sum(costs * one.step_weights) + terminal_costs(self.problem, th, one)[0]

    def per_episode(self, phi):
        eps = _episode_fields(self.batch)
        G = jax.vmap(self.g, in_axes=(None, 0))(phi, eps)
        S = jax.vmap(jax.grad(self.ell), in_axes=(None, 0))(phi, eps)
        obj = jax.vmap(self.objective, in_axes=(None, 0))(phi, eps)
        return G, S, obj

    def hvp_per_episode(self, phi, G, S, v):
        eps = _episode_fields(self.batch)
        Gc = G - _loo_mean(G)

        def one(ep):
            gfun = lambda p: self.g(p, ep)  # noqa: E731
            jv = jax.jvp(gfun, (phi,), (v,))[1]
            jtv = jax.vjp(gfun, phi)[1](v)[0]
            return jv + jtv

        sym = jax.vmap(one)(eps)
        return 0.5 * (sym + Gc * (S @ v)[:, None] + S * (Gc @ v)[:, None])


def _score_batch(problem, theta, keys, backend) -> LoggedBatch:
    traj = jax.lax.stop_gradient(rollout_chunk(problem, theta, keys, backend))
    return as_batch(traj, problem)


class _PathwiseParts(eqx.Module):
    """Group means of the simulated objective over fixed keys, as in :class:`~pydso.Pathwise`."""

    problem: Problem
    keys: jax.Array
    mask: jax.Array
    frac: jax.Array
    estimator: Pathwise
    unravel: Callable = eqx.field(static=True)

    @staticmethod
    def build(problem, keys, estimator, unravel):
        backend = get_backend(estimator.backend)
        n = keys.shape[0]
        groups = backend.gradient_groups(problem, n) if estimator.groups is None else estimator.groups
        m = -(-n // min(groups, n))
        G = -(-n // m)
        m = backend.group_size(problem, m, G)
        pad = G * m - n
        if pad:
            keys = jnp.concatenate([keys, keys[:pad]])
        keys = keys.reshape((G, m) + keys.shape[1:])
        mask = (jnp.arange(G * m) < n).reshape(G, m)
        frac = mask.sum(axis=1) / n
        return _PathwiseParts(problem, keys, mask, frac, estimator, unravel)

    def values(self, theta, keys_g):
        backend = get_backend(self.estimator.backend)
        b = backend.simulate(self.problem, theta, keys_g, checkpoints=self.estimator.checkpoints)
        w = jnp.asarray(self.problem.setting.weights()[0])
        return b.costs @ w.astype(b.costs.dtype) + b.terminal_weights * b.terminal_costs

    def group_mean(self, phi, keys_g, mask_g):
        values = self.values(self.unravel(phi), keys_g)
        return jnp.sum(jnp.where(mask_g, values, 0.0)) / jnp.sum(mask_g, dtype=values.dtype)

    def total(self, phi):
        means = jax.vmap(self.group_mean, in_axes=(None, 0, 0))(phi, self.keys, self.mask)
        return jnp.sum(self.frac.astype(means.dtype) * means)

    def per_group_hvp(self, phi, v):
        """``(G, p)`` group means of the Hessian-vector products, and the ``(G, m)`` episode objectives."""

        def one(keys_g, mask_g):
            def grad_and_values(p):
                def mean_and_values(p):
                    values = self.values(self.unravel(p), keys_g)
                    mean = jnp.sum(jnp.where(mask_g, values, 0.0)) / jnp.sum(mask_g, dtype=values.dtype)
                    return mean, values

                return jax.grad(mean_and_values, has_aux=True)(p)

            _, hv, values = jax.jvp(grad_and_values, (phi,), (v,), has_aux=True)
            return hv, values

        return jax.vmap(one)(self.keys, self.mask)


def _batch_means(g: jax.Array, frac: jax.Array) -> tuple[jax.Array, jax.Array]:
    G = g.shape[0]
    f = frac.astype(g.dtype)[:, None]
    mean = jnp.sum(f * g, axis=0)
    var = G / (G - 1) * jnp.sum(f**2 * (g - mean) ** 2, axis=0) if G > 1 else jnp.full_like(mean, jnp.nan)
    return mean, jnp.sqrt(var)


def _masked_mean_se(vals: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = jnp.sum(mask, dtype=vals.dtype)
    o = jnp.sum(jnp.where(mask, vals, 0.0)) / n
    return o, jnp.sqrt(jnp.sum(jnp.where(mask, (vals - o) ** 2, 0.0)) / jnp.maximum(n - 1, 1) / n)


def _mean_se(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = a.shape[0]
    return jnp.mean(a, axis=0), jnp.std(a, axis=0, ddof=1) / jnp.sqrt(n)


# --------------------------------------------------------------------------------------------- public
@eqx.filter_jit
def _hvp_estimate(problem, theta, v, keys, estimator):
    flat, unravel = ravel_pytree(theta)
    vflat, _ = ravel_pytree(v)
    vflat = vflat.astype(flat.dtype)
    if isinstance(estimator, Score):
        parts = _ScoreParts(problem, _score_batch(problem, theta, keys, estimator.backend), unravel)
        G, S, obj = parts.per_episode(flat)
        h, h_se = _mean_se(parts.hvp_per_episode(flat, G, S, vflat))
        o, o_se = _mean_se(obj)
    else:
        parts = _PathwiseParts.build(problem, keys, estimator, unravel)
        hv, vals = parts.per_group_hvp(flat, vflat)
        h, h_se = _batch_means(hv, parts.frac)
        o, o_se = _masked_mean_se(vals.reshape(-1), parts.mask.reshape(-1))
    return Estimate(unravel(h), unravel(h_se), o, o_se)


def hessian_vector(
    problem: Problem,
    theta: PyTree,
    v: PyTree,
    *,
    key: jax.Array,
    n: int,
    method: "AbstractEstimator | str | None" = None,
) -> Estimate:
    r"""Monte-Carlo estimate of the Hessian-vector product :math:`\nabla^2 J(\theta)\,v` (module docstring).

    **Arguments:**

    - `problem`, `theta`: the DSO problem and its parameters (any pytree).
    - `v`: the direction, a pytree like ``theta``.
    - `key`: PRNG key (keyword-only); `n`: episodes (at least 2, for the standard errors).
    - `method`: ``"score"`` / :class:`~pydso.Score` (any chain with a transition density; the estimator's
      ``backend`` is used, its baseline is not: the score form uses its own leave-one-out control variate) or
      ``"pathwise"`` / :class:`~pydso.Pathwise` (reparameterised dynamics; its ``backend``, ``checkpoints`` and
      ``groups`` are used). Default: pathwise when the system is reparameterised, score otherwise.

    **Returns:**

    An :class:`~pydso.Estimate` whose ``gradient`` field holds :math:`\hat H v` (a pytree like ``theta``) and
    ``stderr`` its standard errors; ``objective`` is the estimate of :math:`J(\theta)`.

    When not to use it: with a terminal set and the pathwise form (the exit-time dependence is not
    differentiated); with long horizons and the score form, whose variance grows with the horizon (as the score
    gradient's does, squared). For a tabular chain :func:`pydso.exact.hessian` gives the exact matrix.
    """
    key = check_key(key)
    n = check_positive_int(n, "n")
    if n < 2:
        raise ProblemError(f"n must be at least 2 for standard errors, got {n}")
    estimator = hessian_estimator(problem, method)
    problem.check_theta(theta)
    flat, _ = ravel_pytree(theta)
    vflat, _ = ravel_pytree(v)
    if jax.tree.structure(v) != jax.tree.structure(theta) or vflat.shape != flat.shape:
        raise ProblemError("v must be a pytree with the same structure and shapes as theta")
    return _hvp_estimate(problem, theta, v, shard_episodes(episode_keys(key, n)), estimator)


class LocalModel(eqx.Module):
    r"""The sampled second-order model of :math:`J` around :math:`\theta`, all on the same ``n`` episodes
    (common random numbers), over the flat parameter vector (:func:`jax.flatten_util.ravel_pytree` order):

    :math:`m(d) = \hat J + \hat g^\top d + \tfrac12 d^\top \hat H d`.

    **Attributes:**

    - ``objective``, ``objective_stderr``: :math:`\hat J(\theta)` and its standard error.
    - ``gradient``, ``gradient_stderr``: :math:`\hat g` (flat) and its standard errors.
    - ``flat``: :math:`\theta` flat; ``unravel``: back to the pytree.

    **Methods:** :meth:`hvp` (:math:`\hat H d`, the symmetrised estimate of the module docstring, linearised once
    with :func:`jax.linearize` so that repeated products do not re-run the forward pass), :meth:`objective_at`
    (:math:`\hat J` at another flat :math:`\theta`, on the same episodes: the same keys for the pathwise form,
    per-decision importance weights of the recorded transitions for the score form).
    """

    objective: jax.Array
    objective_stderr: jax.Array
    gradient: jax.Array
    gradient_stderr: jax.Array
    flat: jax.Array
    hvp_fn: Callable
    objective_fn: Callable
    unravel: Callable = eqx.field(static=True)

    def hvp(self, d: jax.Array) -> jax.Array:
        r""":math:`\hat H d` for a flat direction ``d``."""
        return self.hvp_fn(d)

    def objective_at(self, flat: jax.Array) -> jax.Array:
        r""":math:`\hat J` at the flat parameters ``flat``, on this model's episodes."""
        return self.objective_fn(flat)


def local_model(problem: Problem, theta: PyTree, keys: jax.Array, estimator: AbstractEstimator) -> LocalModel:
    r"""The :class:`LocalModel` of ``problem`` at ``theta`` from the episodes of ``keys`` (one key per episode),
    in the form of ``estimator`` (:class:`~pydso.Score` or :class:`~pydso.Pathwise`, see
    :func:`hessian_estimator`). Traceable: call it inside a compiled step (:class:`pydso.NewtonCG` does).
    The score form's gradient is the causal score gradient without baseline, :math:`\frac1n\sum_i g_i`."""
    flat, unravel = ravel_pytree(theta)
    if isinstance(estimator, Score):
        parts = _ScoreParts(problem, _score_batch(problem, theta, keys, estimator.backend), unravel)
        eps = _episode_fields(parts.batch)
        G, lin = jax.linearize(lambda p: jax.vmap(parts.g, in_axes=(None, 0))(p, eps), flat)
        lin_t = jax.linear_transpose(lin, flat)
        S = jax.vmap(jax.grad(parts.ell), in_axes=(None, 0))(flat, eps)
        obj = jax.vmap(parts.objective, in_axes=(None, 0))(flat, eps)
        Gc = G - _loo_mean(G)
        n = G.shape[0]

        def hvp(d):
            jv = jnp.mean(lin(d), axis=0)
            jtv = lin_t(jnp.broadcast_to(d, G.shape) / n)[0]
            cross = jnp.mean(Gc * (S @ d)[:, None] + S * (Gc @ d)[:, None], axis=0)
            return 0.5 * (jv + jtv + cross)

        def objective_at(p):
            th = unravel(p)
            lr = log_ratios(problem, th, parts.batch)
            return jnp.mean(weighted_returns(problem, th, parts.batch, lr).objective)

        g, g_se = _mean_se(G)
        o, o_se = _mean_se(obj)
        return LocalModel(o, o_se, g, g_se, flat, hvp, objective_at, unravel)
    parts = _PathwiseParts.build(problem, keys, estimator, unravel)

    def group(phi, keys_g, mask_g):
        values = parts.values(unravel(phi), keys_g)
        return jnp.sum(jnp.where(mask_g, values, 0.0)) / jnp.sum(mask_g, dtype=values.dtype), values

    def group_grads(phi):
        (_, vals), grads = jax.vmap(jax.value_and_grad(group, has_aux=True), in_axes=(None, 0, 0))(
            phi, parts.keys, parts.mask
        )
        return grads, vals

    grads, lin, vals = jax.linearize(group_grads, flat, has_aux=True)
    frac = parts.frac.astype(grads.dtype)
    g, g_se = _batch_means(grads, parts.frac)
    o, o_se = _masked_mean_se(vals.reshape(-1), parts.mask.reshape(-1))
    return LocalModel(o, o_se, g, g_se, flat, lambda d: frac @ lin(d), parts.total, unravel)
