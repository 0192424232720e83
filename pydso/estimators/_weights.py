r"""Importance weights of logged transitions, effective sample sizes and streaming sums (DESIGN.md §1.8).

Data logged under a *behaviour* chain :math:`B(x' \mid x)` (an old :math:`\theta`, another system, passive
dynamics) are reweighted to the target chain :math:`P(x' \mid x, \theta)` by the per-transition ratios

.. math:: r_t = \frac{P(x_{t+1} \mid x_t, \theta)}{B(x_{t+1} \mid x_t)}, \qquad
          W_t = \prod_{j<t} r_j \quad (W_0 = 1),

the *per-decision* importance weights of Precup, Sutton & Singh (2000, *Eligibility traces for off-policy policy
evaluation*, ICML): the step cost :math:`L(x_t)` depends on :math:`x_0..x_t` only, so it needs the ratios up to
:math:`t` and no further. The initial distribution is shared, so :math:`x_0` carries no ratio. Then

.. math:: \hat J(\theta) = \sum_t w_t W_t L(x_t, \theta) + w_{end} W_{end} \Phi(x_{end}, \theta)

is an unbiased estimate of :math:`J(\theta)` (:math:`w_t` are the setting's step weights, e.g. :math:`\gamma^t`).
On-policy data (:math:`B = P_\theta`) have :math:`r_t = 1` and :math:`W_t = 1`.

Variants: ``weight_clip=c`` truncates the cumulative weights, :math:`\min(W_t, c)` (truncated IS, Ionides 2008:
bias for bounded variance); ``normalize=True`` uses the *weighted* (self-normalised) per-decision weights
:math:`W_t / \frac1n\sum_i W^{(i)}_t` (Precup et al. 2000: consistent, biased, usually far lower variance).
:func:`effective_sample_size` :math:`(\sum w)^2/\sum w^2` (Kong 1992) diagnoses weight degeneracy.
"""

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ProblemError
from .._typing import PyTree
from ..systems import Problem
from ._logged import LoggedBatch, iter_batches, step_costs, terminal_costs, transition_log_probs

__all__ = [
    "log_ratios",
    "importance_weights",
    "effective_sample_size",
    "ess_report",
    "WeightedReturns",
    "weighted_returns",
    "StreamingMoments",
]


def log_ratios(problem: Problem, theta: PyTree, batch: LoggedBatch) -> jax.Array:
    r"""Per-transition log-ratios :math:`\log P(x_{t+1} \mid x_t, \theta) - \log B(x_{t+1} \mid x_t)`.

    **Returns:** ``(n, H)``, zero on unrecorded steps; differentiable in ``theta``.
    """
    return jnp.where(batch.valid, transition_log_probs(problem, theta, batch) - batch.behavior_logp, 0.0)


def importance_weights(
    log_ratio: jax.Array, *, weight_clip: float | None = None, normalize: bool = False, per_decision: bool = True
) -> jax.Array:
    r"""Cumulative importance weights :math:`W_t = \prod_{j<t} r_j`.

    **Arguments:**

    - ``log_ratio``: ``(n, H)`` per-transition log-ratios (:func:`log_ratios`).
    - ``weight_clip``: truncate, :math:`\min(W_t, c)`.
    - ``normalize``: self-normalise each time step over the episodes, :math:`W_t/\overline{W_t}` (weighted
      per-decision IS, Precup et al. 2000).
    - ``per_decision``: ``False`` gives the ordinary (whole-trajectory) weight :math:`W_H` at every ``t``.

    **Returns:** ``(n, H+1)`` weights, :math:`W_0 = 1`.
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

    **Arguments:**

    - ``weights``: the final weights ``W[:, -1]`` for the per-episode ESS (a scalar result) or the ``(n, H+1)``
      per-decision weights for one ESS per time step.
    - ``warn_below``: issue a :class:`UserWarning` if the smallest ESS is below this fraction of the number of
      samples (concrete values only).
    - ``what``: a label for the warning.

    **Returns:** the ESS (between 1 and the number of samples).
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


class StreamingMoments(eqx.Module):
    r"""Streaming sums of per-episode samples (any pytree with a leading episode axis): the count, the sum and the
    sum of squares, added chunk by chunk with ``+``; :meth:`mean_stderr` gives the mean and its standard error
    :math:`s/\sqrt n` (sample standard deviation with ``ddof=1``), as :func:`mean_and_stderr` does in one pass."""

    n: Any
    s1: Any
    s2: Any

    @staticmethod
    def of(samples: PyTree) -> "StreamingMoments":
        """The sums of one chunk of samples (leading axis: episodes)."""
        return StreamingMoments(
            jax.tree.leaves(samples)[0].shape[0],
            jax.tree.map(lambda a: jnp.sum(a, 0), samples),
            jax.tree.map(lambda a: jnp.sum(a**2, 0), samples),
        )

    def __add__(self, other: "StreamingMoments") -> "StreamingMoments":
        return StreamingMoments(
            self.n + other.n, jax.tree.map(jnp.add, self.s1, other.s1), jax.tree.map(jnp.add, self.s2, other.s2)
        )

    def mean_stderr(self) -> tuple[PyTree, PyTree]:
        """``(mean, stderr)`` pytrees like one sample. With a single sample the standard error is undefined: it is
        NaN (not 0, which would claim certainty) and a :class:`UserWarning` says so."""
        n = self.n
        mean = jax.tree.map(lambda s: s / n, self.s1)
        if n < 2:
            warnings.warn(
                "a standard error from a single episode is undefined: it is reported as NaN; use at least two "
                "episodes for error bars",
                UserWarning,
                stacklevel=3,
            )
            return mean, jax.tree.map(lambda s: jnp.full_like(s, jnp.nan), self.s1)
        var = jax.tree.map(lambda s1, s2: jnp.maximum(s2 - s1**2 / n, 0.0) / (n - 1), self.s1, self.s2)
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
    r"""Effective sample sizes of logged ``data`` reweighted to ``theta`` (a dataset is streamed by chunks).

    **Arguments:**

    - ``problem``, ``theta``: the target chain.
    - ``data``: :class:`LoggedBatch`, :class:`~pydso.Trajectories` or an ``xarray.Dataset`` with ``behavior_logp``.
    - ``weight_clip``: truncation of the cumulative weights.
    - ``warn_below``: warn when the per-episode ESS is below this fraction of the episodes (``None``: never).
    - ``episodes_per_chunk``: chunk size when streaming a dataset.

    **Returns:** a dict: ``n`` (episodes), ``episode`` (ESS of the whole-trajectory weights :math:`W_H`),
    ``per_decision`` (``(H+1,)`` ESS of :math:`W_t` per time step), ``min_fraction`` (smallest per-decision ESS
    over ``n``).
    """
    problem.check_theta(theta)  # a NaN theta would make every weight NaN and the ESS silently 0
    if weight_clip is not None and (
        isinstance(weight_clip, bool) or not isinstance(weight_clip, int | float | np.number) or not weight_clip > 0
    ):
        raise ProblemError(f"weight_clip must be a positive number or None, got {weight_clip!r}")
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


class WeightedReturns(eqx.Module):
    r"""The importance-weighted costs of a batch at :math:`\theta` (all held fixed: no gradient flows).

    **Attributes:**

    - ``weights``: ``(n, H+1)`` per-decision weights :math:`W_t` (clipped / normalised as requested).
    - ``end_weights``: ``(n,)`` :math:`W_{end}`, the weight at the state where the terminal cost is paid.
    - ``costs``: ``(n, H)`` step costs :math:`L(x_t,\theta)` (0 on unrecorded steps).
    - ``cost_to_go``: ``(n, H+1)`` :math:`C^W_t = \sum_{k\ge t} w_k W_k L(x_k) + w_{end} W_{end}\Phi`.
    - ``objective``: ``(n,)`` :math:`C^W_0`, the per-episode IS estimate of :math:`J(\theta)`.
    """

    weights: jax.Array
    end_weights: jax.Array
    costs: jax.Array
    cost_to_go: jax.Array
    objective: jax.Array


def weighted_returns(
    problem: Problem,
    theta: PyTree,
    batch: LoggedBatch,
    log_ratio: jax.Array,
    *,
    weight_clip: float | None = None,
    normalize: bool = False,
    weight_norm: jax.Array | None = None,
) -> WeightedReturns:
    r"""The :class:`WeightedReturns` of ``batch`` at ``theta`` (traceable).

    **Arguments:**

    - ``problem``, ``theta``, ``batch``: the target chain and the logged episodes.
    - ``log_ratio``: ``(n, H)`` log-ratios of the transitions (:func:`log_ratios`; zeros for on-policy data, which
      makes every weight exactly 1).
    - ``weight_clip``, ``normalize``: as in :func:`importance_weights`.
    - ``weight_norm``: ``(1, H+1)`` normalising means when ``normalize`` is set and the normalisation runs over more
      episodes than this batch (a streamed dataset); default: this batch's means.
    """
    W = importance_weights(jax.lax.stop_gradient(log_ratio), weight_clip=weight_clip)
    if normalize:
        W = W / (jnp.mean(W, axis=0, keepdims=True) if weight_norm is None else weight_norm)
    costs = jax.lax.stop_gradient(step_costs(problem, theta, batch))
    W_end = jax.vmap(lambda w, e: w[e])(W, batch.end_index)
    term = jax.lax.stop_gradient(terminal_costs(problem, theta, batch)) * W_end
    weighted = costs * batch.step_weights * W[:, :-1]
    tail = jnp.cumsum(weighted[:, ::-1], axis=1)[:, ::-1]
    C = jnp.concatenate([tail, jnp.zeros_like(term)[:, None]], axis=1) + term[:, None]
    return WeightedReturns(W, W_end, costs, C, C[:, 0])
