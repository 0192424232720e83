r"""Approximate policy iteration for chains (DESIGN.md §1.7; Bertsekas & Tsitsiklis 1996, *Neuro-Dynamic
Programming*, §6.2; Bertsekas 2011, *Approximate policy iteration: a survey*).

Each iteration :math:`k`:

1. **collect** (optional): ``collect`` fresh episodes under :math:`\theta_k`, appended to the data. Old episodes
   are kept (``reuse=True``) and reweighted to :math:`\theta_k` by their stored behaviour log-densities
   (per-decision IS, :mod:`pydso.offpolicy`), so data are reused across iterations;
2. **evaluate**: fit :math:`V_k \approx V_{\theta_k}` on all data with linear features, by off-policy LSTD(λ)
   (``evaluate="td"``) or IS Monte-Carlo returns (``evaluate="mc"``) (:func:`pydso.offpolicy.fit_value_linear`);
3. **improve**: ``improve="lookahead"`` (finite chains, :class:`~pydso.TabularChain`): minimise the one-step
   lookahead through the *known* chain on the visited states,

   .. math:: \hat S(\theta) = \sum_x \hat\rho_k(x)\Big[L(x,\theta) + \gamma\sum_{x'}P(x' \mid x,\theta)\,V_k(x')\Big],

   with :math:`\hat\rho_k(x) = \frac1n\sum_{i,t} w_t W_t\,1[x_t = x]` the IS-weighted discounted occupancy
   of :math:`\theta_k` — policy iteration's greedy step, made by ``improve_steps`` optax steps (for an MDP with a
   softmax policy it approaches the greedy deterministic policy); or ``improve="proximal"``: minimise the
   clipped surrogate of :mod:`pydso.proximal` with TD advantages from :math:`V_k` (any chain with a density).

Returns the final parameters and a history (IS objective estimate at each :math:`\theta_k`, per-episode ESS of
the reused data, number of episodes).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import ProblemError
from .._progress import progress_bar
from ..engine import check_key, rollout
from ..estimators._logged import (
    _gamma,
    _is_terms,
    as_batch,
    concatenate_batches,
    ess_report,
    fit_value_linear,
    offpolicy_objective,
)
from ..systems import Problem, TabularChain
from ._proximal import improve as proximal_improve

PyTree = Any

__all__ = ["policy_iteration", "lookahead_improve"]


def lookahead_improve(
    problem: Problem,
    theta_k: PyTree,
    batch,
    value_fn: Callable,
    *,
    steps: int = 100,
    optimizer: optax.GradientTransformation | None = None,
    weight_clip: float | None = None,
) -> PyTree:
    r"""Minimise the one-step lookahead :math:`\hat S(\theta)` (module docstring) through a known finite chain."""
    if not isinstance(problem.system, TabularChain):
        raise ProblemError(
            f"improve='lookahead' enumerates next states and needs a TabularChain, got "
            f"{type(problem.system).__name__}; use improve='proximal'"
        )
    batch = as_batch(batch, problem)
    gamma = _gamma(problem, None)
    W = _is_terms(problem, theta_k, batch, weight_clip, False)[0]
    P0 = problem.system.transition_fn(theta_k)
    S = P0.shape[0]
    occ = jnp.where(batch.valid, batch.step_weights * W[:, :-1], 0.0)
    x = batch.states[:, :-1]
    rho = jnp.zeros(S).at[x.reshape(-1)].add(occ.reshape(-1)) / batch.n_episodes
    V = jax.vmap(lambda s: value_fn(s, theta_k))(jnp.arange(S))
    optimizer = optax.adam(0.3) if optimizer is None else optimizer

    def objective(theta):
        P = problem.system.transition_fn(theta)
        L = jax.vmap(lambda s: problem.cost(s, theta))(jnp.arange(S))
        return rho @ (L + gamma * P @ V)

    @eqx.filter_jit
    def run(theta):
        def body(carry, _):
            th, st = carry
            g = jax.grad(objective)(th)
            upd, st = optimizer.update(g, st, th)
            return (optax.apply_updates(th, upd), st), None

        (th, _), _ = jax.lax.scan(body, (theta, optimizer.init(theta)), None, length=steps)
        return th

    return run(jax.tree.map(jnp.asarray, theta_k))


def policy_iteration(
    problem: Problem,
    theta0: PyTree,
    *,
    key: jax.Array,
    features: Callable,
    iterations: int = 10,
    data=None,
    collect: int = 256,
    reuse: bool = True,
    evaluate: str = "td",
    lam: float = 0.0,
    improve: str = "lookahead",
    improve_steps: int = 100,
    optimizer: optax.GradientTransformation | None = None,
    weight_clip: float | None = None,
    proximal_options: dict | None = None,
    callback: Callable[[int, PyTree, dict], bool | None] | None = None,
    progress: bool | None = None,
) -> tuple[PyTree, dict[str, np.ndarray]]:
    r"""Approximate policy iteration (module docstring).

    Args:
        problem: the DSO problem (transition density needed).
        theta0: initial parameters.
        key: PRNG key (iteration ``k`` collects with ``fold_in(key, k)``).
        features: ``phi(x) -> (f,)`` features of the linear value fit (e.g. ``jax.nn.one_hot(x, S)``).
        iterations: number of evaluate/improve rounds.
        data: initial logged data (Trajectories / LoggedBatch / in-memory dataset) with behaviour log-densities.
        collect: fresh episodes per iteration (0: learn from ``data`` alone, fully off-policy).
        reuse: keep earlier episodes (reweighted by IS) instead of only the newest.
        evaluate: ``"td"`` (LSTD(``lam``)) or ``"mc"``.
        improve: ``"lookahead"`` (finite chains) or ``"proximal"``.
        improve_steps: optimiser steps of the lookahead improvement (``epochs`` of the proximal one).
        optimizer: optax transformation for the improvement.
        weight_clip: truncation of the cumulative IS weights.
        proximal_options: extra keyword arguments of :func:`pydso.proximal.improve`.
        callback: ``callback(k, theta, record)``; returning True stops.

    Returns:
        ``(theta, history)`` with arrays ``objective`` and ``objective_stderr`` (IS estimate of :math:`J(\theta_k)`
        from the data), ``ess`` (per-episode ESS at :math:`\theta_k`), ``episodes``.
    """
    key = check_key(key)
    problem.check_theta(theta0)
    if collect == 0 and data is None:
        raise ProblemError("policy_iteration needs logged data or collect > 0")
    batches = [] if data is None else [as_batch(data, problem)]
    theta = jax.tree.map(jnp.asarray, theta0)
    hist: dict[str, list] = {"objective": [], "objective_stderr": [], "ess": [], "episodes": []}
    for k in progress_bar(range(iterations), total=iterations, desc="api", enable=progress):
        if collect:
            traj = rollout(problem, theta, key=jax.random.fold_in(key, k), n=collect)
            new = as_batch(traj, problem)
            batches = [*batches, new] if reuse else [new]
        batch = batches[0] if len(batches) == 1 else concatenate_batches(batches)
        V = fit_value_linear(problem, theta, batch, features, method=evaluate, lam=lam, weight_clip=weight_clip)
        J, J_se = offpolicy_objective(problem, theta, batch, weight_clip=weight_clip)
        ess = ess_report(problem, theta, batch, warn_below=None)["episode"]
        hist["objective"].append(J)
        hist["objective_stderr"].append(J_se)
        hist["ess"].append(ess)
        hist["episodes"].append(batch.n_episodes)
        if improve == "lookahead":
            theta = lookahead_improve(
                problem, theta, batch, V, steps=improve_steps, optimizer=optimizer, weight_clip=weight_clip
            )
        elif improve == "proximal":
            opts = {"epochs": improve_steps, "variant": "clip", **(proximal_options or {})}
            theta, _ = proximal_improve(
                problem,
                theta,
                batch,
                key=jax.random.fold_in(key, 10**6 + k),
                optimizer=optimizer,
                advantage="td",
                value_fn=V,
                weight_clip=weight_clip,
                **opts,
            )
        else:
            raise ProblemError(f"improve must be 'lookahead' or 'proximal', got {improve!r}")
        if callback is not None and callback(k, theta, {name: v[-1] for name, v in hist.items()}):
            break
    return theta, {name: np.asarray(v) for name, v in hist.items()}
