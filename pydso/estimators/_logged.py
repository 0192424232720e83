r"""Off-policy ("off-chain") estimation from logged transitions (DESIGN.md §1.8).

Data logged under a *behaviour* chain :math:`B(x' \mid x)` (an old :math:`\theta`, another system, passive
dynamics) are reweighted to the target chain :math:`P(x' \mid x, \theta)` by the per-transition ratios

.. math:: r_t = \frac{P(x_{t+1} \mid x_t, \theta)}{B(x_{t+1} \mid x_t)}, \qquad
          W_t = \prod_{j<t} r_j \quad (W_0 = 1),

the *per-decision* importance weights of Precup, Sutton & Singh (2000, *Eligibility traces for off-policy policy
evaluation*, ICML): the step cost :math:`L(x_t)` depends on :math:`x_0..x_t` only, so it needs the ratios up to
:math:`t` and no further. The initial distribution is shared, so :math:`x_0` carries no ratio. Then

.. math:: \hat J(\theta) = \sum_t w_t W_t L(x_t, \theta) + w_{end} W_{end} \Phi(x_{end}, \theta)

is an unbiased estimate of :math:`J(\theta)` (``w_t`` are the setting's step weights, e.g. :math:`\gamma^t`), and
its score gradient (DESIGN.md §1.1 with IS) is

.. math:: \hat g = \sum_t w_t W_t \nabla L(x_t) + \sum_t W_{t+1}\, s_t\, (\hat G_{t+1} - b_t), \qquad
          W_{t+1}\hat G_{t+1} = C^W_{t+1} = \sum_{k>t} w_k W_k L(x_k) + w_{end} W_{end}\Phi,

with :math:`s_t = \nabla \log P(x_{t+1} \mid x_t, \theta)` and any baseline :math:`b_t` that does not depend on
the episode's own future (:math:`E_B[W_{t+1} s_t b_t] = E_\theta[s_t]\,b_t = 0`).

Variants: ``weight_clip=c`` truncates the cumulative weights, :math:`\min(W_t, c)` (truncated IS, Ionides 2008: bias for
bounded variance); ``normalize=True`` uses the *weighted* (self-normalised) per-decision weights
:math:`W_t / \frac1n\sum_i W^{(i)}_t` (Precup et al. 2000, consistent, biased, usually far lower variance).
:func:`effective_sample_size` :math:`(\sum w)^2/\sum w^2` (Kong 1992) diagnoses weight degeneracy.

Value fitting (:func:`fit_value_linear`, :func:`fit_value_network`) uses importance-weighted Monte-Carlo
returns :math:`G_t = L_t + \gamma r_t G_{t+1}` (per-decision, Precup et al. 2000) or off-policy LSTD(λ)
(Bradtke & Barto 1996; Yu 2010, *Convergence of least squares temporal difference methods under general
conditions*): traces :math:`z_t = d_t\phi_t + \gamma\lambda r_{t-1} z_{t-1}`,
:math:`A = \sum_t z_t(\phi_t - \gamma r_t \phi_{t+1})^\top`, :math:`b = \sum_t z_t L_t`, :math:`V = \phi^\top A^{-1} b`.

Data are a :class:`LoggedBatch` (in memory), a :class:`~pydso.Trajectories` (its ``log_probs`` are taken as the
behaviour log-densities, i.e. the rollout parameters are the behaviour), or an ``xarray.Dataset`` of the pydso
schema (:mod:`pydso.data`) with a ``behavior_logp`` variable, which is streamed with
:func:`pydso.data.iter_chunks` — statistics are accumulated per chunk and the store is never loaded whole.
"""

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._checks import check_key
from .._errors import ProblemError
from ..engine import Trajectories
from ..systems import Episodic, Problem
from ._base import Estimate

PyTree = Any

__all__ = [
    "LoggedBatch",
    "as_batch",
    "iter_batches",
    "log_ratios",
    "importance_weights",
    "effective_sample_size",
    "ess_report",
    "offpolicy_objective",
    "offpolicy_gradient",
    "LinearValue",
    "fit_value_linear",
    "fit_value_network",
]

DEFAULT_EPISODES_PER_CHUNK = 4096


# ------------------------------------------------------------------------------------------------- data
class LoggedBatch(eqx.Module):
    r"""A batch of ``n`` logged episodes of ``H`` transitions, in the form the off-policy estimators use.

    Attributes:
        states: ``(n, H+1, *state_shape)``; states after an episode's end are a copy of its last state.
        behavior_logp: ``(n, H)`` :math:`\log B(x_{t+1} \mid x_t)` (0 on unrecorded steps).
        valid: ``(n, H)`` True where the transition :math:`x_t \to x_{t+1}` was recorded.
        step_weights: ``(H,)`` the setting's weights :math:`w_t`.
        end_index: ``(n,)`` index of the state at which the terminal cost is paid (number of recorded steps).
        terminal_weights: ``(n,)`` the weight :math:`w_{end}` of the terminal cost.
    """

    states: jax.Array
    behavior_logp: jax.Array
    valid: jax.Array
    step_weights: jax.Array
    end_index: jax.Array
    terminal_weights: jax.Array

    @property
    def n_episodes(self) -> int:
        return self.states.shape[0]

    @property
    def horizon(self) -> int:
        return self.behavior_logp.shape[1]


def _setting_weights(problem: Problem, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Step weights ``(H,)`` and end weights ``(H+1,)`` for a logged horizon ``H``."""
    setting = problem.setting
    if isinstance(setting, Episodic):
        w = setting.gamma ** np.arange(horizon + 1, dtype=np.float64)
        return w[:-1], w
    w, w_end = setting.weights()
    if len(w) != horizon:
        raise ProblemError(
            f"the logged episodes have {horizon} transitions but the {type(setting).__name__} setting of problem "
            f"{problem.name!r} has horizon {len(w)}; they must agree (only Episodic settings adapt)"
        )
    return np.asarray(w, float), np.append(w, w_end)


def _from_trajectories(traj: Trajectories, problem: Problem, behavior_logp=None) -> LoggedBatch:
    valid = jnp.asarray(traj.alive[:, :-1])
    horizon = valid.shape[1]
    end = jnp.where(jnp.any(~traj.alive, axis=1), jnp.argmax(~traj.alive, axis=1), horizon)
    blp = traj.log_probs if behavior_logp is None else jnp.asarray(behavior_logp)
    if blp.shape != valid.shape:
        raise ProblemError(f"behavior_logp must have shape (n, H) = {valid.shape}, got {blp.shape}")
    return LoggedBatch(
        jnp.asarray(traj.states),
        jnp.where(valid, blp, 0.0),
        valid,
        jnp.asarray(traj.step_weights),
        end,
        jnp.asarray(traj.terminal_weights),
    )


def _from_dataset(ds, problem: Problem) -> LoggedBatch:
    if "behavior_logp" not in ds.data_vars:
        raise ProblemError(
            "the dataset has no 'behavior_logp' variable: off-policy estimation needs the log-density of each logged "
            "transition under the behaviour chain (record it with pydso.data.to_dataset from a rollout, or compute "
            "log B(x_(t+1) | x_t) for the logging system and add it as an (episode, time) variable)"
        )
    spec = jax.eval_shape(problem.initial.sample, jax.random.key(0))
    state = np.asarray(ds["state"].values)
    n, n_time = state.shape[:2]
    if n_time < 2:
        raise ProblemError("the dataset needs at least two time indices (one transition) per episode")
    state = state.reshape((n, n_time, *spec.shape)) if spec.shape else state[..., 0]
    mask = np.asarray(ds["mask"].values, bool) if "mask" in ds.data_vars else np.ones((n, n_time), bool)
    valid = mask[:, :-1] & mask[:, 1:]
    last = mask.sum(axis=1) - 1
    # Fill unrecorded (possibly NaN) states with the episode's last recorded state.
    fill = state[np.arange(n), last]
    m = mask.reshape(mask.shape + (1,) * (state.ndim - 2))
    state = np.where(m, state, fill[:, None])
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        state = np.rint(state).astype(spec.dtype)
    blp = np.asarray(ds["behavior_logp"].values, float)[:, :-1]
    if not np.all(np.isfinite(blp[valid])):
        raise ProblemError("variable 'behavior_logp' has non-finite values on recorded transitions")
    blp = np.where(valid, blp, 0.0)
    horizon = n_time - 1
    w, w_full = _setting_weights(problem, horizon)
    end = valid.sum(axis=1)
    return LoggedBatch(
        jnp.asarray(state),
        jnp.asarray(blp),
        jnp.asarray(valid),
        jnp.asarray(w),
        jnp.asarray(end),
        jnp.asarray(w_full[end]),
    )


def _is_dataset(data) -> bool:
    return hasattr(data, "data_vars") and hasattr(data, "sizes")


def as_batch(data, problem: Problem, *, behavior_logp=None) -> LoggedBatch:
    """Convert in-memory data to a :class:`LoggedBatch`: a batch (returned as is), :class:`~pydso.Trajectories`
    (behaviour = the rollout's parameters, or the given ``behavior_logp`` ``(n, H)``), or a dataset.

    A lazily opened store is read into memory whole here. The functions that stream a store chunk by chunk are
    :func:`offpolicy_gradient`, :func:`offpolicy_objective`, :func:`ess_report`, :func:`fit_value_linear` and
    :func:`pydso.proximal.improve`; the natural-gradient functions and :func:`pydso.api.policy_iteration` call
    this and need the logged data to fit in memory."""
    if isinstance(data, LoggedBatch):
        return data
    if isinstance(data, Trajectories):
        return _from_trajectories(data, problem, behavior_logp)
    if _is_dataset(data):
        return _from_dataset(data, problem)
    raise ProblemError(
        f"data must be a pydso.Trajectories, a LoggedBatch or an xarray.Dataset of the pydso schema, got "
        f"{type(data).__name__}"
    )


def iter_batches(data, problem: Problem, episodes_per_chunk: int | None = None) -> Iterator[LoggedBatch]:
    """Yield :class:`LoggedBatch` chunks: one for in-memory data, one per :func:`pydso.data.iter_chunks` chunk
    for a dataset (lazily opened stores are read one chunk at a time)."""
    if _is_dataset(data):
        from ..data import iter_chunks

        if "behavior_logp" not in data.data_vars:
            _from_dataset(data, problem)  # raises the explanatory error
        for chunk in iter_chunks(data, episodes_per_chunk or DEFAULT_EPISODES_PER_CHUNK):
            yield _from_dataset(chunk, problem)
    else:
        yield as_batch(data, problem)


def concatenate_batches(batches: list[LoggedBatch]) -> LoggedBatch:
    """Join batches of the same horizon along episodes."""
    first = batches[0]
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches)
    return eqx.tree_at(lambda b: b.step_weights, joined, first.step_weights)


# ------------------------------------------------------------------------------------------------- weights
def _costs(problem: Problem, theta, batch: LoggedBatch):
    """``L(x_t, theta)`` on recorded steps (0 elsewhere), ``(n, H)``."""
    c = jax.vmap(jax.vmap(problem.step_cost, in_axes=(0, None)), in_axes=(0, None))(batch.states[:, :-1], theta)
    return jnp.where(batch.valid, c, 0.0)


def _terminal(problem: Problem, theta, batch: LoggedBatch):
    """``w_end * Phi(x_end, theta)``, ``(n,)`` (zeros without a terminal cost)."""
    if problem.terminal_cost is None:
        return jnp.zeros(batch.n_episodes)
    x_end = jax.vmap(lambda s, e: s[e])(batch.states, batch.end_index)
    return batch.terminal_weights * jax.vmap(problem.terminal_cost, in_axes=(0, None))(x_end, theta)


def _target_logp(problem: Problem, theta, batch: LoggedBatch):
    lp = jax.vmap(lambda s: problem.system.path_log_prob(s, theta))(batch.states)
    return jnp.where(batch.valid, lp, 0.0)


def log_ratios(problem: Problem, theta: PyTree, batch: LoggedBatch) -> jax.Array:
    r"""Per-transition log-ratios :math:`\log P(x_{t+1} \mid x_t, \theta) - \log B(x_{t+1} \mid x_t)`,
    shape ``(n, H)``, zero on unrecorded steps. Differentiable in ``theta``."""
    if not problem.system.has_log_prob:
        raise ProblemError(
            f"off-policy reweighting needs the transition log-density of the target chain, but "
            f"{type(problem.system).__name__} has none"
        )
    return jnp.where(batch.valid, _target_logp(problem, theta, batch) - batch.behavior_logp, 0.0)


def importance_weights(
    log_ratio: jax.Array, *, weight_clip: float | None = None, normalize: bool = False, per_decision: bool = True
) -> jax.Array:
    r"""Cumulative importance weights :math:`W_t = \prod_{j<t} r_j`, shape ``(n, H+1)`` from ``(n, H)`` log-ratios.

    ``per_decision=False`` gives the ordinary (whole-trajectory) weight :math:`W_H` at every ``t``.
    ``weight_clip=c`` truncates: :math:`\min(W_t, c)`. ``normalize=True`` self-normalises each time step over the
    episodes, :math:`W_t/\overline{W_t}` (weighted per-decision IS, Precup et al. 2000).
    """
    n = log_ratio.shape[0]
    logw = jnp.concatenate([jnp.zeros((n, 1), log_ratio.dtype), jnp.cumsum(log_ratio, axis=1)], axis=1)
    if not per_decision:
        logw = jnp.broadcast_to(logw[:, -1:], logw.shape)
    if weight_clip is not None:
        logw = jnp.minimum(logw, jnp.log(weight_clip))
    w = jnp.exp(logw)
    if normalize:
        w = w / jnp.mean(w, axis=0, keepdims=True)
    return w


def effective_sample_size(weights, axis: int = 0, *, warn_below: float | None = None, what: str = "") -> jax.Array:
    r"""Kish/Kong effective sample size :math:`(\sum_i w_i)^2 / \sum_i w_i^2` along ``axis`` (episodes).

    Pass the final weights ``W[:, -1]`` for the per-episode ESS (a scalar) or the ``(n, H+1)`` per-decision
    weights for one ESS per time step. With ``warn_below=f`` a :class:`UserWarning` is issued if the smallest
    ESS is below the fraction ``f`` of the number of samples (concrete values only).
    """
    w = jnp.asarray(weights)
    ess = jnp.sum(w, axis=axis) ** 2 / jnp.maximum(jnp.sum(w**2, axis=axis), jnp.finfo(w.dtype).tiny)
    if warn_below is not None and not isinstance(ess, jax.core.Tracer):
        n = w.shape[axis]
        low = float(jnp.min(ess))
        if low < warn_below * n:
            warnings.warn(
                f"effective sample size{(' (' + what + ')') if what else ''} is {low:.1f} of {n} samples "
                f"({100 * low / n:.1f}% < {100 * warn_below:.0f}%): the importance weights are degenerate; the "
                "target parameters are too far from the behaviour chain (collect new data, clip the weights, or "
                "take smaller steps)",
                stacklevel=2,
            )
    return ess


class _Sums(eqx.Module):
    """Streaming sums of per-episode quantities: count, sum and sum of squares."""

    n: Any
    s1: Any
    s2: Any

    @staticmethod
    def of(samples):
        return _Sums(
            jax.tree.leaves(samples)[0].shape[0],
            jax.tree.map(lambda a: jnp.sum(a, 0), samples),
            jax.tree.map(lambda a: jnp.sum(a**2, 0), samples),
        )

    def __add__(self, other):
        return _Sums(
            self.n + other.n, jax.tree.map(jnp.add, self.s1, other.s1), jax.tree.map(jnp.add, self.s2, other.s2)
        )

    def mean_stderr(self):
        n = self.n
        mean = jax.tree.map(lambda s: s / n, self.s1)
        var = jax.tree.map(lambda s1, s2: jnp.maximum(s2 - s1**2 / n, 0.0) / max(n - 1, 1), self.s1, self.s2)
        return mean, jax.tree.map(lambda v: jnp.sqrt(v / n), var)


@eqx.filter_jit
def _ess_stats(problem, theta, batch, weight_clip):
    w = importance_weights(log_ratios(problem, theta, batch), weight_clip=weight_clip)
    return jnp.sum(w, 0), jnp.sum(w**2, 0), jnp.sum(w[:, -1]), jnp.sum(w[:, -1] ** 2)


def ess_report(
    problem: Problem,
    theta: PyTree,
    data,
    *,
    weight_clip: float | None = None,
    warn_below: float | None = 0.05,
    episodes_per_chunk: int | None = None,
) -> dict[str, Any]:
    r"""Effective sample sizes of ``data`` reweighted to ``theta`` (streamed for datasets).

    Returns a dict: ``n`` episodes, ``episode`` (ESS of the whole-trajectory weights :math:`W_H`),
    ``per_decision`` (``(H+1,)`` ESS of :math:`W_t` per time step), ``min_fraction`` (smallest per-decision ESS
    over ``n``). Warns when the per-episode ESS fraction is below ``warn_below``.
    """
    tot = None
    n = 0
    for batch in iter_batches(data, problem, episodes_per_chunk):
        s = _ess_stats(problem, theta, batch, weight_clip)
        tot = s if tot is None else tuple(a + b for a, b in zip(tot, s, strict=True))
        n += batch.n_episodes
    s1, s2, e1, e2 = (np.asarray(a) for a in tot)
    per_decision = s1**2 / np.maximum(s2, 1e-300)
    episode = float(e1**2 / max(float(e2), 1e-300))
    if warn_below is not None and episode < warn_below * n:
        warnings.warn(
            f"effective sample size (per episode) is {episode:.1f} of {n} episodes ({100 * episode / n:.1f}%): the "
            "importance weights are degenerate; theta is too far from the behaviour chain",
            stacklevel=2,
        )
    return {"n": n, "episode": episode, "per_decision": per_decision, "min_fraction": float(per_decision.min() / n)}


# ------------------------------------------------------------------------------------------------- gradient
def _value_baseline(value_fn, problem, theta, batch, costs):
    v = jax.vmap(jax.vmap(lambda x: value_fn(x, theta)))(batch.states[:, :-1])
    return batch.step_weights * (jax.lax.stop_gradient(v) - costs)


def _is_terms(problem, theta, batch, weight_clip, normalize, weight_norm=None):
    """Per-decision weights ``W`` (n, H+1), costs, the IS cost-to-go ``C^W`` (n, H+1) and objective (n,)."""
    lr = jax.lax.stop_gradient(log_ratios(problem, theta, batch))
    W = importance_weights(lr, weight_clip=weight_clip)
    if normalize:
        norm = jnp.mean(W, axis=0, keepdims=True) if weight_norm is None else weight_norm
        W = W / norm
    costs = jax.lax.stop_gradient(_costs(problem, theta, batch))
    W_end = jax.vmap(lambda w, e: w[e])(W, batch.end_index)
    term = jax.lax.stop_gradient(_terminal(problem, theta, batch)) * W_end
    weighted = costs * batch.step_weights * W[:, :-1]
    tail = jnp.cumsum(weighted[:, ::-1], axis=1)[:, ::-1]
    C = jnp.concatenate([tail, jnp.zeros_like(term)[:, None]], axis=1) + term[:, None]
    return W, W_end, costs, C, C[:, 0]


def _baseline_values(baseline, problem, theta, batch, W, costs, C):
    """b_t (n, H) in cost-to-go units (see module docstring)."""
    if baseline is None:
        return jnp.zeros_like(costs)
    if isinstance(baseline, str):
        if baseline != "mean":
            raise ProblemError(f"unknown baseline {baseline!r}: use None, 'mean' or a value function V(x, theta)")
        n = W.shape[0]
        if n < 2:
            raise ProblemError("the 'mean' baseline needs at least 2 episodes per chunk")
        num = jnp.sum(C[:, 1:], 0, keepdims=True) - C[:, 1:]
        den = jnp.sum(W[:, 1:], 0, keepdims=True) - W[:, 1:]
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    if callable(baseline):
        return _value_baseline(baseline, problem, theta, batch, costs)
    raise ProblemError(f"baseline must be None, 'mean' or a callable V(x, theta), got {type(baseline).__name__}")


def _per_episode(problem, theta, batch, baseline, weight_clip, normalize, weight_norm=None):
    W, W_end, costs, C, obj = _is_terms(problem, theta, batch, weight_clip, normalize, weight_norm)
    b = _baseline_values(baseline, problem, theta, batch, W, costs, C)
    adv = jax.lax.stop_gradient(C[:, 1:] - W[:, 1:] * b)
    wL = jax.lax.stop_gradient(batch.step_weights * W[:, :-1])

    def surrogate(theta, states, valid, adv, wl, end, tw, w_end):
        lp = jnp.where(valid, problem.system.path_log_prob(states, theta), 0.0)
        c = jnp.where(valid, jax.vmap(problem.step_cost, in_axes=(0, None))(states[:-1], theta), 0.0)
        out = jnp.sum(wl * c) + jnp.sum(lp * adv)
        if problem.terminal_cost is not None:
            out = out + jax.lax.stop_gradient(tw * w_end) * problem.terminal_cost(states[end], theta)
        return out

    grads = jax.vmap(jax.grad(surrogate), in_axes=(None, 0, 0, 0, 0, 0, 0, 0))(
        theta, batch.states, batch.valid, adv, wL, batch.end_index, batch.terminal_weights, W_end
    )
    return grads, obj


@eqx.filter_jit
def _gradient_sums(problem, theta, batch, baseline, weight_clip, normalize, weight_norm):
    grads, obj = _per_episode(problem, theta, batch, baseline, weight_clip, normalize, weight_norm)
    return _Sums.of(grads), _Sums.of(obj)


@eqx.filter_jit
def _weight_sums(problem, theta, batch, weight_clip):
    return jnp.sum(importance_weights(log_ratios(problem, theta, batch), weight_clip=weight_clip), axis=0)


def offpolicy_gradient(
    problem: Problem,
    theta: PyTree,
    data,
    *,
    baseline: "str | Callable | None" = "mean",
    weight_clip: float | None = None,
    normalize: bool = False,
    episodes_per_chunk: int | None = None,
) -> Estimate:
    r"""Per-decision importance-sampled score gradient of :math:`J` at ``theta`` from data logged under a
    behaviour chain (see the module docstring for the estimator).

    Args:
        problem: the DSO problem (its system must have a transition density).
        theta: target parameters.
        data: :class:`LoggedBatch`, :class:`~pydso.Trajectories` or an ``xarray.Dataset`` (streamed by chunks).
        baseline: ``"mean"`` (leave-one-out self-normalised mean of :math:`\hat G_{t+1}` over the *other*
            episodes of the chunk: unbiased), ``None``, or a value function ``V(x, theta)`` giving
            :math:`b_t = w_t(V(x_t) - L(x_t))`.
        weight_clip: truncate the cumulative weights at ``weight_clip`` (biased, bounded variance).
        normalize: self-normalised (weighted) per-decision weights (biased, consistent).
        episodes_per_chunk: chunk size when streaming a dataset.

    Returns:
        :class:`~pydso.Estimate`: the mean of per-episode estimates and their standard errors, and the
        per-decision IS estimate of :math:`J(\theta)`.
    """
    if not problem.system.has_log_prob:
        raise ProblemError(
            f"the off-policy score gradient needs a transition log-density, but {type(problem.system).__name__} "
            "has none"
        )
    problem.check_theta(theta)
    weight_norm = None
    if normalize:
        tot, n = None, 0
        for batch in iter_batches(data, problem, episodes_per_chunk):
            s = _weight_sums(problem, theta, batch, weight_clip)
            tot = s if tot is None else tot + s
            n += batch.n_episodes
        weight_norm = (tot / n)[None, :]
    gsum = osum = None
    for batch in iter_batches(data, problem, episodes_per_chunk):
        g, o = _gradient_sums(problem, theta, batch, baseline, weight_clip, normalize, weight_norm)
        gsum = g if gsum is None else gsum + g
        osum = o if osum is None else osum + o
    grad, grad_se = gsum.mean_stderr()
    obj, obj_se = osum.mean_stderr()
    return Estimate(grad, grad_se, obj, obj_se)


def offpolicy_objective(
    problem: Problem, theta: PyTree, data, *, weight_clip=None, normalize=False, episodes_per_chunk=None
) -> tuple[float, float]:
    r"""Per-decision IS estimate of :math:`J(\theta)` and its standard error from logged data."""
    est = offpolicy_gradient(
        problem,
        theta,
        data,
        baseline=None,
        weight_clip=weight_clip,
        normalize=normalize,
        episodes_per_chunk=episodes_per_chunk,
    )
    return float(est.objective), float(est.objective_stderr)


# ------------------------------------------------------------------------------------------------- values
class LinearValue(eqx.Module):
    r"""A linear value function :math:`V(x) = \phi(x)^\top \beta`; callable as ``V(x, theta)`` (ignores theta),
    so it can be used as a baseline."""

    coef: jax.Array
    features: Callable = eqx.field(static=True)

    def __call__(self, x, theta=None):
        return jnp.dot(self.features(x), self.coef)


def _gamma(problem, gamma):
    if gamma is not None:
        return float(gamma)
    if isinstance(problem.setting, Episodic):
        return float(problem.setting.gamma)
    raise ProblemError(
        f"value fitting needs a discount: the {type(problem.setting).__name__} setting has none; pass gamma=..."
    )


def _absorbed(problem, batch):
    """(n, H) True where x_{t+1} entered the terminal set on a recorded step."""
    terminal = problem.setting.terminal_set()
    if terminal is None:
        return jnp.zeros(batch.valid.shape, bool)
    hit = jax.vmap(jax.vmap(lambda x: jnp.asarray(terminal(x), bool)))(batch.states[:, 1:])
    return hit & batch.valid


def _td_inputs(problem, theta, batch, weight_clip, weighting):
    lr = log_ratios(problem, theta, batch)
    r = jnp.exp(lr)
    if weight_clip is not None:
        r = jnp.minimum(r, weight_clip)
    costs = _costs(problem, theta, batch)
    absorbed = _absorbed(problem, batch)
    if problem.terminal_cost is not None:
        phi_next = jax.vmap(jax.vmap(problem.terminal_cost, in_axes=(0, None)), in_axes=(0, None))(
            batch.states[:, 1:], theta
        )
        term = jnp.where(absorbed, phi_next, 0.0)
    else:
        term = jnp.zeros_like(costs)
    if weighting == "uniform":
        d = jnp.ones_like(costs)
    elif weighting == "behavior":
        d = jnp.broadcast_to(batch.step_weights / batch.step_weights[0], costs.shape)
    elif weighting == "target":
        W = importance_weights(lr, weight_clip=weight_clip)[:, :-1]
        d = W * batch.step_weights / batch.step_weights[0]
    else:
        raise ProblemError(f"state_weighting must be 'behavior', 'target' or 'uniform', got {weighting!r}")
    return r, costs, absorbed, term, jnp.where(batch.valid, d, 0.0)


@eqx.filter_jit
def _lstd_stats(problem, theta, batch, features, gamma, lam, weight_clip, weighting, method):
    r, costs, absorbed, term, d = _td_inputs(problem, theta, batch, weight_clip, weighting)
    phi = jax.vmap(jax.vmap(features))(batch.states)  # (n, H+1, f)
    valid = batch.valid
    f = phi.shape[-1]
    if method == "mc":
        # G_t = L_t + gamma r_t [(1-abs) G_{t+1} + abs Phi]; G after the last step is 0 (truncated return).
        def back(G_next, inp):
            c, rr, ab, tm, v = inp
            G = jnp.where(v, c + gamma * rr * jnp.where(ab, tm, G_next), 0.0)
            return G, G

        _, G = jax.lax.scan(back, jnp.zeros(costs.shape[0]), (costs.T, r.T, absorbed.T, term.T, valid.T), reverse=True)
        G = G.T
        p = phi[:, :-1] * d[..., None]
        A = jnp.einsum("ntf,ntg->fg", p, phi[:, :-1])
        b = jnp.einsum("ntf,nt->f", p, G)
        return A, b
    nxt = jnp.where((valid & ~absorbed)[..., None], phi[:, 1:], 0.0)
    diff = phi[:, :-1] - gamma * r[..., None] * nxt  # (n, H, f)
    reward = costs + gamma * r * term

    def fwd(z, inp):
        ph, dd, r_prev, v = inp
        z = jnp.where(v[:, None], dd[:, None] * ph + gamma * lam * r_prev[:, None] * z, 0.0)
        return z, z

    r_prev = jnp.concatenate([jnp.zeros((r.shape[0], 1)), jnp.where(absorbed, 0.0, r)[:, :-1]], axis=1)
    _, z = jax.lax.scan(fwd, jnp.zeros((costs.shape[0], f)), (phi[:, :-1].swapaxes(0, 1), d.T, r_prev.T, valid.T))
    z = z.swapaxes(0, 1)
    A = jnp.einsum("ntf,ntg->fg", z, diff)
    b = jnp.einsum("ntf,nt->f", z, reward)
    return A, b


def fit_value_linear(
    problem: Problem,
    theta: PyTree,
    data,
    features: Callable,
    *,
    method: str = "td",
    lam: float = 0.0,
    gamma: float | None = None,
    ridge: float = 1e-8,
    weight_clip: float | None = None,
    state_weighting: str = "behavior",
    episodes_per_chunk: int | None = None,
) -> LinearValue:
    r"""Fit :math:`V_\theta(x) \approx \phi(x)^\top\beta` of the target chain from logged data, in closed form.

    ``method="td"``: off-policy LSTD(λ) (``lam`` = λ; λ=0 is importance-weighted TD(0)'s fixed point,
    :math:`E[d_t \phi_t (L_t + \gamma r_t V(x_{t+1}) - V(x_t))] = 0`). ``method="mc"``: weighted least squares on
    per-decision IS returns :math:`G_t = L_t + \gamma r_t G_{t+1}` (truncated at the logged horizon: bias
    :math:`O(\gamma^{H-t})`). States are weighted by ``state_weighting``: ``"behavior"`` (:math:`d_t = w_t/w_0`, the
    behaviour's discounted occupancy: low variance, and late truncated returns get little weight), ``"uniform"``
    (:math:`d_t = 1`) or ``"target"`` (:math:`d_t = W_t w_t/w_0`, the target's discounted occupancy
    :math:`\rho_\theta`). With tabular (one-hot) features both give the exact values of
    the visited states. Sufficient statistics :math:`A, b` are accumulated chunk by chunk; then
    :math:`\beta = (A + \text{ridge}\,I)^{-1} b`. Entering a terminal set bootstraps with the terminal cost.

    Returns:
        a :class:`LinearValue` (callable ``V(x, theta)``).
    """
    if method not in ("td", "mc"):
        raise ProblemError(f"method must be 'td' or 'mc', got {method!r}")
    g = _gamma(problem, gamma)
    A = b = None
    for batch in iter_batches(data, problem, episodes_per_chunk):
        a_, b_ = _lstd_stats(problem, theta, batch, features, g, float(lam), weight_clip, state_weighting, method)
        A, b = (a_, b_) if A is None else (A + a_, b + b_)
    coef = jnp.linalg.solve(A + ridge * jnp.eye(A.shape[0], dtype=A.dtype), b)
    return LinearValue(coef, features)


def fit_value_network(
    model: eqx.Module,
    problem: Problem,
    theta: PyTree,
    data,
    *,
    key: jax.Array,
    method: str = "mc",
    gamma: float | None = None,
    steps: int = 500,
    minibatch: int = 256,
    optimizer: optax.GradientTransformation | None = None,
    weight_clip: float | None = None,
    target_update: int = 50,
) -> eqx.Module:
    r"""Fit an equinox network ``model(x) -> scalar`` to :math:`V_\theta` from in-memory logged data with optax.

    ``method="mc"``: regression on per-decision IS returns :math:`G_t` (behaviour state weighting).
    ``method="td"``: importance-weighted semi-gradient TD(0), loss
    :math:`\sum_t (V(x_t) - [L_t + \gamma r_t \bar V(x_{t+1})])^2` with a target network :math:`\bar V` refreshed
    every ``target_update`` steps (Mnih et al. 2015). Minibatches of transitions are drawn with ``key``.
    """
    key = check_key(key)
    g = _gamma(problem, gamma)
    batch = as_batch(data, problem)
    r, costs, absorbed, term, d = _td_inputs(problem, theta, batch, weight_clip, "behavior")
    x = batch.states[:, :-1].reshape((-1, *batch.states.shape[2:]))
    xn = batch.states[:, 1:].reshape((-1, *batch.states.shape[2:]))
    valid = batch.valid.reshape(-1)
    idx = jnp.flatnonzero(valid)
    x, xn = x[idx], xn[idx]
    r, costs, absorbed, term = (a.reshape(-1)[idx] for a in (r, costs, absorbed, term))
    if method == "mc":

        def back(G_next, inp):
            c, rr, ab, tm, v = inp
            G = jnp.where(v, c + g * rr * jnp.where(ab, tm, G_next), 0.0)
            return G, G

        r2, c2, a2, t2 = _td_inputs(problem, theta, batch, weight_clip, "behavior")[:4]
        _, G = jax.lax.scan(back, jnp.zeros(c2.shape[0]), (c2.T, r2.T, a2.T, t2.T, batch.valid.T), reverse=True)
        targets_mc = G.T.reshape(-1)[idx]
    elif method != "td":
        raise ProblemError(f"method must be 'mc' or 'td', got {method!r}")
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    m = x.shape[0]

    @eqx.filter_jit
    def step(params, target_params, opt_state, k):
        sel = jax.random.randint(k, (min(minibatch, m),), 0, m)
        net = eqx.combine(params, static)
        if method == "mc":
            y = targets_mc[sel]
        else:
            tnet = eqx.combine(target_params, static)
            v_next = jax.vmap(tnet)(xn[sel])
            y = costs[sel] + g * r[sel] * jnp.where(absorbed[sel], term[sel], v_next)
        y = jax.lax.stop_gradient(y)

        def loss(p):
            return jnp.mean((jax.vmap(eqx.combine(p, static))(x[sel]) - y) ** 2)

        lval, grads = jax.value_and_grad(loss)(params)
        del net
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, lval

    target = params
    for i in range(steps):
        if i % target_update == 0:
            target = params
        params, opt_state, _ = step(params, target, opt_state, jax.random.fold_in(key, i))
    return eqx.combine(params, static)
