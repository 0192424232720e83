r"""Proximal policy improvement on a fixed dataset: the TRPO/PPO analog for chains (DESIGN.md §1.6).

Around the current parameters :math:`\theta_k` the surrogate

.. math:: S(\theta; \theta_k) = E_{\rho_k}\Big[L(x, \theta) + \gamma\, E_{P_k}\big[r\, V_k(x')\big]\Big],
          \qquad r = \frac{P(x' \mid x, \theta)}{P(x' \mid x, \theta_k)},

agrees with :math:`J` to first order at :math:`\theta_k` (:math:`\nabla_\theta r = r\,\nabla\log P`, so
:math:`\nabla S(\theta_k) = E_{\rho_k}[\nabla L + \gamma E_{P_k}[s V_k]] = \nabla J(\theta_k)`; Kakade & Langford
2002; Schulman et al. 2015, *Trust region policy optimization*). It is estimated from logged episodes in its
**rollout form** (what :func:`surrogate` computes, per episode, averaged over episodes)

.. math:: \hat S(\theta) = \sum_t \Big[w_t W_t\, L(x_t, \theta) + c_t\, r_t(\theta)\Big]
          + w_{end} W_{end}\,\Phi(x_{end},\theta),

where :math:`W_t` are the per-decision weights of the behaviour data relative to :math:`\theta_k`
(all 1 when the data were logged at :math:`\theta_k`; :mod:`pydso.offpolicy`), and the "advantage weights"
:math:`c_t` are either

* ``advantage="returns"``: :math:`c_t = C^W_{t+1} - W_{t+1} b_t` (IS cost-to-go minus a baseline), so that
  :math:`\nabla\hat S(\theta_k)` *is* the per-decision IS score gradient (:func:`pydso.offpolicy.offpolicy_gradient`);
* ``advantage="td"``: :math:`c_t = w_t W_{t+1}\,(L_t + \gamma V_k(x_{t+1}) - V_k(x_t))` with a fitted
  :math:`V_k` (the DESIGN form with baseline :math:`b = (V_k - L)/\gamma`, an actor-critic surrogate).

Ratios: ``ratio="one_step"`` (above; first-order accurate, bounded variance: the TRPO/PPO choice) or
``ratio="per_decision"``: :math:`\hat S(\theta) = \sum_t w_t W_t R_t(\theta) L(x_t,\theta) + \ldots` with the
cumulative ratio :math:`R_t = \prod_{j<t} r_j`, an unbiased estimate of :math:`J(\theta)` itself for every
:math:`\theta` (Precup et al. 2000) but with variance growing with the horizon and the step.

Variants (Schulman et al. 2017, *Proximal policy optimization algorithms*): ``variant="clip"`` replaces
:math:`c_t r_t` by the *pessimistic* :math:`\max(c_t r_t,\ c_t\,\mathrm{clip}(r_t, 1-\epsilon, 1+\epsilon))` —
**max**, not PPO's min, because we minimise cost; ``variant="kl"`` adds
:math:`\beta \sum_t w_t W_{t+1}\,[(r_t - 1) - \log r_t]`, a non-negative sample estimate of the
:math:`\rho_k`-weighted :math:`\mathrm{KL}(P_k \,\|\, P_\theta)`; ``variant="plain"`` uses neither.
:func:`improve` runs several epochs of minibatch optax updates of :math:`\hat S` on the fixed dataset.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import ProblemError
from ..engine import check_key
from ..estimators._logged import (
    LoggedBatch,
    _absorbed,
    _baseline_values,
    _costs,
    _gamma,
    _is_terms,
    _target_logp,
    _terminal,
    ess_report,
    iter_batches,
)
from ..systems import Problem

PyTree = Any

__all__ = ["SurrogateData", "prepare", "surrogate", "improve", "tabular_surrogate", "Proximal"]


class SurrogateData(eqx.Module):
    r"""A logged batch with the quantities of :math:`\hat S(\cdot;\theta_k)` frozen at :math:`\theta_k`.

    Attributes: ``batch``; ``state_weight`` :math:`w_t W_t` ``(n, H)``; ``adv_weight`` :math:`c_t` ``(n, H)``;
    ``logp_old`` :math:`\log P(x_{t+1} \mid x_t, \theta_k)` ``(n, H)``; ``kl_weight`` :math:`w_t W_{t+1}`
    ``(n, H)``; ``end_weight`` :math:`w_{end} W_{end}` ``(n,)``; ``behavior_weight`` :math:`W_t` ``(n, H+1)``.
    """

    batch: LoggedBatch
    state_weight: jax.Array
    adv_weight: jax.Array
    logp_old: jax.Array
    kl_weight: jax.Array
    end_weight: jax.Array
    behavior_weight: jax.Array


def prepare(
    problem: Problem,
    theta_k: PyTree,
    batch: LoggedBatch,
    *,
    advantage: str = "returns",
    baseline: "str | Callable | None" = "mean",
    value_fn: Callable | None = None,
    weight_clip: float | None = None,
    gamma: float | None = None,
) -> SurrogateData:
    """Freeze the surrogate's weights at ``theta_k`` for a :class:`~pydso.offpolicy.LoggedBatch` (traceable)."""
    W, W_end, costs, C, _ = _is_terms(problem, theta_k, batch, weight_clip, False)
    w = batch.step_weights
    if advantage == "returns":
        b = _baseline_values(value_fn if value_fn is not None else baseline, problem, theta_k, batch, W, costs, C)
        c = C[:, 1:] - W[:, 1:] * b
    elif advantage == "td":
        if value_fn is None:
            raise ProblemError("advantage='td' needs a fitted value function value_fn(x, theta) (V_k)")
        g = _gamma(problem, gamma)
        v = jax.vmap(jax.vmap(lambda x: value_fn(x, theta_k)))(batch.states)
        absorbed = _absorbed(problem, batch)
        if problem.terminal_cost is not None:
            phi = jax.vmap(jax.vmap(problem.terminal_cost, in_axes=(0, None)), in_axes=(0, None))(
                batch.states[:, 1:], theta_k
            )
        else:
            phi = jnp.zeros_like(costs)
        v_next = jnp.where(absorbed, phi, v[:, 1:])
        delta = costs + g * v_next - v[:, :-1]
        c = jnp.where(batch.valid, w * W[:, 1:] * delta, 0.0)
    else:
        raise ProblemError(f"advantage must be 'returns' or 'td', got {advantage!r}")
    logp_old = _target_logp(problem, theta_k, batch)
    sg = jax.lax.stop_gradient
    return SurrogateData(
        batch,
        sg(jnp.where(batch.valid, w * W[:, :-1], 0.0)),
        sg(jnp.where(batch.valid, c, 0.0)),
        sg(logp_old),
        sg(jnp.where(batch.valid, w * W[:, 1:], 0.0)),
        sg(batch.terminal_weights * W_end),
        sg(W),
    )


def surrogate(
    problem: Problem,
    theta: PyTree,
    data: SurrogateData,
    *,
    variant: str = "clip",
    clip_eps: float = 0.2,
    kl_coef: float = 1.0,
    ratio: str = "one_step",
) -> jax.Array:
    r"""The rollout-form surrogate :math:`\hat S(\theta;\theta_k)`, mean over the episodes of ``data``
    (see the module docstring). Its gradient at :math:`\theta_k` is the off-policy score gradient."""
    batch = data.batch
    n = batch.n_episodes
    logr = jnp.where(batch.valid, _target_logp(problem, theta, batch) - data.logp_old, 0.0)
    r = jnp.exp(logr)
    costs = _costs(problem, theta, batch)
    terminal = _terminal(problem, theta, batch)  # w_end * Phi
    if ratio == "one_step":
        adv = data.adv_weight * r
        if variant == "clip":
            adv = jnp.maximum(adv, data.adv_weight * jnp.clip(r, 1.0 - clip_eps, 1.0 + clip_eps))
        out = jnp.sum(data.state_weight * costs) + jnp.sum(adv)
        out = out + jnp.sum(
            terminal * data.end_weight / jnp.where(batch.terminal_weights != 0, batch.terminal_weights, 1.0)
        )
    elif ratio == "per_decision":
        if variant == "clip":
            raise ProblemError("variant='clip' is defined for ratio='one_step' only; use 'kl' or 'plain'")
        R = jnp.exp(jnp.concatenate([jnp.zeros((n, 1)), jnp.cumsum(logr, axis=1)], axis=1))
        R_end = jax.vmap(lambda a, e: a[e])(R, batch.end_index)
        out = jnp.sum(data.state_weight * R[:, :-1] * costs)
        out = out + jnp.sum(
            terminal * R_end * data.end_weight / jnp.where(batch.terminal_weights != 0, batch.terminal_weights, 1.0)
        )
    else:
        raise ProblemError(f"ratio must be 'one_step' or 'per_decision', got {ratio!r}")
    if variant == "kl":
        out = out + kl_coef * jnp.sum(data.kl_weight * ((r - 1.0) - logr))
    elif variant not in ("clip", "plain"):
        raise ProblemError(f"variant must be 'clip', 'kl' or 'plain', got {variant!r}")
    return out / n


def tabular_surrogate(problem: Problem, theta: PyTree, theta_k: PyTree) -> jax.Array:
    r"""The surrogate with exact expectations on a finite chain (a reference for tests and teaching):
    :math:`S(\theta;\theta_k) = \sum_x \rho_k(x)\,[L(x,\theta) + \gamma\sum_{x'} P_k(x'|x)\, r(x,x')\, V_k(x')]`,
    :math:`\rho_k, P_k, V_k` from :mod:`pydso.exact` at ``theta_k``. :math:`\nabla S(\theta_k) = \nabla J(\theta_k)`.
    """
    from .. import exact

    P_k, _, _ = exact.chain(problem, theta_k)
    rho = exact.occupancy(problem, theta_k)
    V = exact.value(problem, theta_k)
    gamma = _gamma(problem, None)
    P = jnp.asarray(problem.system.transition_fn(theta))
    S = P.shape[0]
    L = jax.vmap(lambda x: problem.cost(x, theta))(jnp.arange(S))
    r = jnp.where(P_k > 0, P / jnp.where(P_k > 0, P_k, 1.0), 0.0)
    return rho @ (L + gamma * jnp.einsum("xy,xy,y->x", P_k, r, V))


# --------------------------------------------------------------------------------------------- improve
class Proximal(eqx.Module):
    """Settings of a proximal improvement (see :func:`improve`): a small strategy object for loops."""

    epochs: int = eqx.field(static=True, default=10)
    minibatch: int | None = eqx.field(static=True, default=None)
    variant: str = eqx.field(static=True, default="clip")
    clip_eps: float = eqx.field(static=True, default=0.2)
    kl_coef: float = eqx.field(static=True, default=1.0)
    ratio: str = eqx.field(static=True, default="one_step")
    advantage: str = eqx.field(static=True, default="returns")
    baseline: Any = eqx.field(static=True, default="mean")
    weight_clip: float | None = eqx.field(static=True, default=None)
    learning_rate: float = eqx.field(static=True, default=1e-2)

    def __call__(self, problem, theta_k, data, *, key, value_fn=None, optimizer=None, episodes_per_chunk=None):
        return improve(
            problem,
            theta_k,
            data,
            key=key,
            epochs=self.epochs,
            minibatch=self.minibatch,
            optimizer=optimizer or optax.adam(self.learning_rate),
            variant=self.variant,
            clip_eps=self.clip_eps,
            kl_coef=self.kl_coef,
            ratio=self.ratio,
            advantage=self.advantage,
            baseline=self.baseline,
            value_fn=value_fn,
            weight_clip=self.weight_clip,
            episodes_per_chunk=episodes_per_chunk,
        )


def improve(
    problem: Problem,
    theta_k: PyTree,
    data,
    *,
    epochs: int = 10,
    minibatch: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    key: jax.Array,
    variant: str = "clip",
    clip_eps: float = 0.2,
    kl_coef: float = 1.0,
    ratio: str = "one_step",
    advantage: str = "returns",
    baseline: "str | Callable | None" = "mean",
    value_fn: Callable | None = None,
    weight_clip: float | None = None,
    episodes_per_chunk: int | None = None,
    progress=None,
) -> tuple[PyTree, dict]:
    r"""Minimise :math:`\hat S(\theta;\theta_k)` over ``epochs`` passes of minibatch updates on a fixed dataset.

    Args:
        problem: the DSO problem (transition density needed).
        theta_k: current parameters; the surrogate's weights are frozen here.
        data: logged episodes (:class:`~pydso.Trajectories`, :class:`~pydso.offpolicy.LoggedBatch`, or a
            dataset streamed chunk by chunk each epoch) with behaviour log-densities.
        epochs: passes over the data.
        minibatch: episodes per update (default: all episodes of a chunk: one update per chunk and epoch);
            episodes are reshuffled every epoch with ``key``; a remainder smaller than ``minibatch`` is dropped.
        optimizer: optax transformation (default ``adam(1e-2)``); its state persists over epochs.
        key: PRNG key for the shuffling.
        variant, clip_eps, kl_coef, ratio, advantage, baseline, value_fn, weight_clip: see the module docstring.

    Returns:
        ``(theta, info)`` with ``info["surrogate"]`` (the surrogate at the start of each epoch, first chunk) and
        ``info["ess"]`` (per-episode ESS of the data at ``theta_k`` and at the result).
    """
    key = check_key(key)
    problem.check_theta(theta_k)
    if not problem.system.has_log_prob:
        raise ProblemError(
            f"proximal improvement needs a transition log-density; {type(problem.system).__name__} has none"
        )
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    theta = jax.tree.map(jnp.asarray, theta_k)
    opt_state = optimizer.init(theta)
    kw = dict(variant=variant, clip_eps=clip_eps, kl_coef=kl_coef, ratio=ratio)

    @eqx.filter_jit
    def prep(batch):
        return prepare(
            problem, theta_k, batch, advantage=advantage, baseline=baseline, value_fn=value_fn, weight_clip=weight_clip
        )

    @eqx.filter_jit
    def epoch(theta, opt_state, sdata, k):
        n = sdata.batch.n_episodes
        m = n if minibatch is None else min(minibatch, n)
        nb = n // m
        perm = jax.random.permutation(k, n)[: nb * m].reshape(nb, m)
        s0 = surrogate(problem, theta, sdata, **kw)

        def body(carry, idx):
            th, st = carry
            sub = jax.tree.map(lambda a: a[idx], sdata)
            sub = eqx.tree_at(lambda s: s.batch.step_weights, sub, sdata.batch.step_weights)
            g = jax.grad(surrogate, argnums=1)(problem, th, sub, **kw)
            upd, st = optimizer.update(g, st, th)
            return (optax.apply_updates(th, upd), st), None

        (theta, opt_state), _ = jax.lax.scan(body, (theta, opt_state), perm)
        return theta, opt_state, s0

    history = []
    from .._progress import progress_bar

    cached = None if _streaming(data) else [prep(b) for b in iter_batches(data, problem)]
    for e in progress_bar(range(epochs), total=epochs, desc="improve", enable=progress):
        chunks = cached if cached is not None else (prep(b) for b in iter_batches(data, problem, episodes_per_chunk))
        for i, sdata in enumerate(chunks):
            theta, opt_state, s0 = epoch(theta, opt_state, sdata, jax.random.fold_in(key, e * 100003 + i))
            if i == 0:
                history.append(float(s0))
    for leaf in jax.tree.leaves(theta):
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ProblemError(
                "proximal improvement produced non-finite parameters: lower the learning rate or "
                "use variant='clip'/'kl'"
            )
    info = {
        "surrogate": np.asarray(history),
        "ess_start": ess_report(problem, theta_k, data, warn_below=None, episodes_per_chunk=episodes_per_chunk),
        "ess_end": ess_report(problem, theta, data, warn_below=None, episodes_per_chunk=episodes_per_chunk),
    }
    return theta, info


def _streaming(data) -> bool:
    return hasattr(data, "data_vars")
