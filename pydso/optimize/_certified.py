r"""Safe improvement from a fixed log: ESS-controlled steps and certified acceptance (:func:`certified_improve`).

Learning from logged episodes alone (no new data) has two failure modes. The importance weights of the log degenerate
as :math:`\theta` moves away from the behaviour chain, so every later estimate is noise; and the optimiser fits that
noise, so the *last* iterate is often worse than an earlier one. :func:`certified_improve` wraps any data method
(:class:`~pydso.optimize.Proximal`, :class:`~pydso.optimize.NaturalGradient`, :class:`~pydso.optimize.PolicyIteration`)
with two safeguards (after Thomas, Theocharous & Ghavamzadeh 2015, *High confidence policy improvement*, ICML):

**ESS-safe steps** (:class:`ESSBudget`). Each proposed step :math:`\theta_k \to \theta'` is accepted only if the
per-episode effective sample size of the log reweighted to :math:`\theta'`,
:math:`\mathrm{ESS} = (\sum_i W_i)^2 / \sum_i W_i^2` (Kong 1992; :math:`W_i` the whole-episode importance weight
relative to the behaviour that logged the data), stays at or above

.. math:: \mathrm{ESS}_{\min} = \max(\texttt{ess\_min},\ \texttt{ess\_fraction}\cdot n)

(:math:`n` logged episodes; defaults 10 and 0.1). Otherwise the step is backtracked,
:math:`\theta_k + s\,(\theta' - \theta_k)` with :math:`s = \texttt{shrink}^j`, :math:`j = 1, \dots,
\texttt{max\_backtracks}` (for a TRPO-length natural step this is the KL budget times :math:`s^2`); if no
shrunken step keeps the ESS, the iteration stops there.

**Certified acceptance** (:class:`BootstrapBound`, :class:`StudentTBound`). The log is split at random into a
*proposal* part (``1 - holdout`` of the episodes; the method learns from it) and a *certification* part, never seen
by the method. For every iterate :math:`\theta_k` a lower confidence bound :math:`\underline\Delta_k` on the
improvement :math:`\Delta_k = J(\theta_0) - J(\theta_k)` over the starting parameters is computed from the
certification episodes at level :math:`1 - \delta/K` (:math:`\delta = 1 -` ``confidence``, :math:`K` iterations: a
Bonferroni correction, so that all :math:`K` bounds hold together with probability :math:`\ge 1-\delta` if each
bound is valid). An iterate is *certified* if :math:`\underline\Delta_k > ` ``min_improvement`` (default 0). The
result is the certified iterate with the largest bound, or :math:`\theta_0` if none is certified.

Validity: the certification episodes are independent of the iterates (the split), so the only approximations are
those of the bound itself: the Student-t bound assumes the per-episode importance-weighted differences are close to
normal (heavy-tailed weights make it optimistic); the percentile bootstrap is asymptotically valid; its weighted
(self-normalised) importance-sampling estimate has an :math:`O(1/n)` bias that typically pulls :math:`\hat J(\theta)`
towards the behaviour's cost (conservative for an improvement over the behaviour). Neither is an exact finite-sample
guarantee (a concentration bound that is, e.g. Thomas et al. 2015's, is far looser). Measured on a tabular chain
(tests/test_certified.py): over 100 logs, every certified iterate was a true improvement under :mod:`pydso.exact`.
"""

import abc
import dataclasses
import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._checks import check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..estimators import (
    LoggedBatch,
    as_batch,
    effective_sample_size,
    importance_weights,
    log_ratios,
    step_costs,
    terminal_costs,
)
from ._improve import AbstractDataMethod

__all__ = [
    "ESSBudget",
    "AbstractImprovementBound",
    "BootstrapBound",
    "StudentTBound",
    "CertifiedResult",
    "certified_improve",
    "episode_terms",
]


# ------------------------------------------------------------------------------------------- per-episode terms
@eqx.filter_jit
def _terms(problem, theta, batch):
    W = importance_weights(log_ratios(problem, theta, batch))  # (n, H+1), relative to the behaviour
    costs = step_costs(problem, theta, batch) * batch.step_weights  # (n, H), w_t L_t
    W_end = W[:, -1]  # weights are constant after an episode's end: W_end = W_H
    term = terminal_costs(problem, theta, batch)  # (n,), w_end Phi
    return W[:, :-1], costs * W[:, :-1], W_end, term * W_end


def episode_terms(problem, theta: PyTree, batch: LoggedBatch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""The per-episode terms of the importance-weighted estimates of :math:`J(\theta)` from a logged batch.

    **Returns:** ``(W, WL, W_end, W_end_Phi)``: ``(n, H)`` per-decision weights :math:`W_t` (relative to the
    behaviour that logged the batch), ``(n, H)`` weighted costs :math:`W_t w_t L(x_t,\theta)`, ``(n,)`` final weights
    and ``(n,)`` weighted terminal costs. The ordinary per-decision IS estimate is
    ``mean(WL.sum(1) + W_end_Phi)``; the weighted (self-normalised) one is
    ``sum_t sum_i WL[i,t] / sum_i W[i,t] + sum_i W_end_Phi[i] / sum_i W_end[i]``.
    """
    return _terms(problem, theta, batch)


def _wis(counts, terms):
    """Weighted per-decision IS estimates for each row of episode ``counts`` (B, n); NaN where every weight of a step
    is zero (the episodes at hand say nothing about it: e.g. weights that underflowed far from the behaviour)."""
    W, WL, W_end, W_end_phi = terms

    def ratio(num, den):
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)

    return jnp.sum(ratio(counts @ WL, counts @ W), axis=-1) + ratio(counts @ W_end_phi, counts @ W_end)


def _supported(terms) -> bool:
    """Whether every step (and the end) of the logged episodes carries some importance weight: where none does, the
    log cannot estimate J (the weighted estimate is undefined, the ordinary one degenerate)."""
    W, _, W_end, _ = terms  # non-negative: a zero sum means no episode carries weight there
    return bool(np.all(np.asarray(W).sum(axis=0) > 0) and np.asarray(W_end).sum() > 0)


def _no_support_warning(what: str) -> None:
    warnings.warn(
        f"{what}: at some step every logged episode has importance weight zero (theta is so far from the behaviour "
        "that the weights underflow, or outside its support), so the log cannot estimate J there; not certified. "
        "Take smaller steps (ESSBudget) or log data nearer this theta.",
        UserWarning,
        stacklevel=3,
    )


# ------------------------------------------------------------------------------------------------ bounds
class AbstractImprovementBound(eqx.Module):
    r"""A high-confidence lower bound on :math:`\Delta = J(\theta_{ref}) - J(\theta)` from logged episodes."""

    @abc.abstractmethod
    def lower(self, ref_terms, new_terms, delta: float, *, key: jax.Array) -> tuple[float, float]:
        r"""``(lower, estimate)``: a level-:math:`1-\delta` lower bound on :math:`\Delta` and its point estimate,
        from the :func:`episode_terms` of the certification episodes at :math:`\theta_{ref}` and :math:`\theta`."""


class BootstrapBound(AbstractImprovementBound):
    r"""Percentile bootstrap of the weighted (self-normalised) per-decision importance-sampling estimate of
    :math:`\Delta`: episodes are resampled with replacement ``resamples`` times, :math:`\hat\Delta^{(b)} =
    \hat J_{WIS}^{(b)}(\theta_{ref}) - \hat J_{WIS}^{(b)}(\theta)` on the same resample (paired), and the bound is
    the :math:`\delta`-quantile of :math:`\hat\Delta^{(b)}` (Efron & Tibshirani 1993; as in Thomas et al. 2015).

    Assumptions: episodes i.i.d.; the bootstrap distribution approximates that of the estimate (asymptotic; poor
    when a handful of episodes carry most of the weight — which :class:`ESSBudget` prevents). Weighted IS is biased
    (consistent) but has far lower variance than ordinary IS. When not to use it: very few episodes (< 20).
    """

    resamples: int = eqx.field(static=True, default=2000)

    def __check_init__(self):
        check_positive_int(self.resamples, "BootstrapBound.resamples")

    def lower(self, ref_terms, new_terms, delta, *, key):
        n = ref_terms[0].shape[0]
        if not (_supported(ref_terms) and _supported(new_terms)):
            _no_support_warning("BootstrapBound")
            return -math.inf, math.nan
        ones = jnp.ones((1, n), ref_terms[0].dtype)
        estimate = float((_wis(ones, ref_terms) - _wis(ones, new_terms))[0])
        idx = jax.random.randint(key, (self.resamples, n), 0, n)
        counts = jax.vmap(lambda i: jnp.zeros(n, ref_terms[0].dtype).at[i].add(1.0))(idx)
        diffs = np.asarray(_wis(counts, ref_terms) - _wis(counts, new_terms))
        if not np.all(np.isfinite(diffs)):  # some resamples hold no weighted episode at some step
            return -math.inf, estimate
        return float(np.quantile(diffs, delta)), estimate


class StudentTBound(AbstractImprovementBound):
    r"""One-sided Student-t bound on the mean of the per-episode differences of *ordinary* per-decision IS returns,
    :math:`d_i = \sum_t w_t L_t (W^{ref}_{it} - W_{it}) + \dots` (unbiased for :math:`\Delta`):
    :math:`\bar d - t_{1-\delta, n-1}\, s_d/\sqrt n` (Thomas et al. 2015, "t-test" variant).

    Assumptions: episodes i.i.d. and :math:`\bar d` close to normal (central limit theorem); heavy-tailed weights
    make it optimistic. Cheaper than :class:`BootstrapBound`; when not to use it: low ESS or few episodes.
    """

    def lower(self, ref_terms, new_terms, delta, *, key):
        del key
        from scipy import stats

        d = np.asarray(
            ref_terms[1].sum(1) + ref_terms[3] - new_terms[1].sum(1) - new_terms[3],
        )
        n = d.shape[0]
        mean = float(d.mean())
        if not (_supported(ref_terms) and _supported(new_terms)):
            _no_support_warning("StudentTBound")
            return -math.inf, math.nan
        if n < 2 or not np.all(np.isfinite(d)):
            return -math.inf, mean
        half = float(stats.t.ppf(1.0 - delta, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
        return mean - half, mean


# ---------------------------------------------------------------------------------------------- step control
class ESSBudget(eqx.Module):
    r"""Effective-sample-size control of the steps of :func:`certified_improve` (module docstring): a step is kept
    only if the per-episode ESS of the whole log at the new parameters is at least
    :math:`\max(\texttt{ess\_min}, \texttt{ess\_fraction}\cdot n)`; otherwise it is shrunk by ``shrink`` up to
    ``max_backtracks`` times, and the iteration stops if that does not help.

    **Arguments:**

    - ``ess_min``: absolute floor (episodes), default 10.
    - ``ess_fraction``: floor as a fraction of the ``n`` logged episodes, default 0.1.
    - ``shrink``: step factor per backtrack, in (0, 1), default 0.5.
    - ``max_backtracks``: default 6.
    """

    ess_min: float = eqx.field(static=True, default=10.0)
    ess_fraction: float = eqx.field(static=True, default=0.1)
    shrink: float = eqx.field(static=True, default=0.5)
    max_backtracks: int = eqx.field(static=True, default=6)

    def __check_init__(self):
        for name in ("ess_min", "ess_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not v >= 0:
                raise ProblemError(f"ESSBudget.{name} must be a non-negative number, got {v!r}")
        if not self.ess_fraction <= 1:
            raise ProblemError(f"ESSBudget.ess_fraction must be at most 1, got {self.ess_fraction!r}")
        s = self.shrink
        if isinstance(s, bool) or not isinstance(s, int | float | np.number) or not 0 < s < 1:
            raise ProblemError(f"ESSBudget.shrink must be a number in (0, 1), got {s!r}")
        if isinstance(self.max_backtracks, bool) or not isinstance(self.max_backtracks, int | np.integer):
            raise ProblemError(f"ESSBudget.max_backtracks must be a non-negative integer, got {self.max_backtracks!r}")
        if self.max_backtracks < 0:
            raise ProblemError(f"ESSBudget.max_backtracks must be a non-negative integer, got {self.max_backtracks!r}")

    def threshold(self, n: int) -> float:
        """The smallest acceptable ESS for ``n`` logged episodes."""
        return max(float(self.ess_min), float(self.ess_fraction) * n)


@eqx.filter_jit
def _episode_ess(problem, theta, batch):
    return effective_sample_size(importance_weights(log_ratios(problem, theta, batch))[:, -1])


# ------------------------------------------------------------------------------------------------- result
@dataclasses.dataclass(frozen=True)
class CertifiedResult:
    r"""The result of :func:`certified_improve`.

    **Attributes:**

    - ``theta``: the certified iterate with the largest lower bound, or the starting parameters if none is certified.
    - ``certified``: whether ``theta`` is a certified improvement (False: ``theta`` is the starting parameters).
    - ``iterate``: index of ``theta`` among the iterates (0: the start).
    - ``lower_bound``, ``estimate``: the bound on and the estimate of :math:`J(\theta_0) - J(\theta)` (0 at the start).
    - ``ess``: per-episode ESS of the whole log at ``theta``; ``ess_threshold``: the ESS floor used.
    - ``reason``: why this ``theta`` was returned, in words.
    - ``iterates``: every accepted iterate, ``iterates[0]`` the start.
    - ``history``: per iterate (same length as ``iterates``) numpy arrays ``lower_bound``, ``estimate``, ``ess``,
      ``step_scale`` (the backtracking factor kept), ``certified`` (bool); and ``stop``: why the iteration ended.
    - ``confidence``: the overall confidence level; ``episodes``: ``(proposal, certification)`` episode counts.
    """

    theta: PyTree
    certified: bool
    iterate: int
    lower_bound: float
    estimate: float
    ess: float
    ess_threshold: float
    reason: str
    iterates: list
    history: dict
    confidence: float
    episodes: tuple[int, int]


def _take(batch: LoggedBatch, idx) -> LoggedBatch:
    per_episode = lambda a: a[idx]
    return LoggedBatch(
        per_episode(batch.states),
        per_episode(batch.behavior_logp),
        per_episode(batch.valid),
        batch.step_weights,
        per_episode(batch.end_index),
        per_episode(batch.terminal_weights),
    )


def _finite(theta) -> bool:
    flat, _ = ravel_pytree(theta)
    return bool(jnp.all(jnp.isfinite(flat)))


def certified_improve(
    problem,
    theta: PyTree,
    data,
    *,
    key: jax.Array,
    method: AbstractDataMethod | None = None,
    iterations: int = 5,
    bound: AbstractImprovementBound | None = None,
    confidence: float = 0.95,
    budget: ESSBudget | None = None,
    holdout: float = 0.5,
    min_improvement: float = 0.0,
) -> CertifiedResult:
    r"""Improve ``theta`` from a fixed log with ESS-safe steps, and return the best *certified* iterate (module
    docstring).

    **Arguments:**

    - ``problem``: the DSO problem (its system needs a transition density).
    - ``theta``: the starting parameters :math:`\theta_0` (usually the behaviour's); improvements are measured
      against :math:`J(\theta_0)`.
    - ``data``: the log: :class:`~pydso.Trajectories`, :class:`~pydso.estimators.LoggedBatch` or a dataset with
      ``behavior_logp`` (read into memory).
    - ``key``: PRNG key (the split, the method's minibatches, the bootstrap).
    - ``method``: any data method (:class:`Proximal` by default, :class:`NaturalGradient`, ...); its
      ``improve_from`` proposes each step from the proposal episodes.
    - ``iterations``: :math:`K`, the number of proposed steps.
    - ``bound``: :class:`BootstrapBound` (default) or :class:`StudentTBound`.
    - ``confidence``: :math:`1-\delta`, the probability that every reported bound holds (each bound is at level
      :math:`1-\delta/K`).
    - ``budget``: the :class:`ESSBudget` (default ``ESSBudget()``: ESS >= max(10, 0.1 n)).
    - ``holdout``: fraction of the episodes kept for certification, in (0, 1) (default 0.5); at least 2 episodes
      on each side.
    - ``min_improvement``: an iterate is certified when its lower bound exceeds this (default 0).

    **Returns:** a :class:`CertifiedResult`.

    When not to use it: on-policy learning with fresh episodes at every step (use :func:`pydso.minimize`: a fresh
    batch is its own check); logs of very few episodes (nothing can be certified).
    """
    from ._proximal import Proximal

    method = Proximal(n=0) if method is None else method
    bound = BootstrapBound() if bound is None else bound
    budget = ESSBudget() if budget is None else budget
    if not isinstance(method, AbstractDataMethod):
        raise ProblemError(
            f"method must be a data method (pydso.Proximal, pydso.NaturalGradient or pydso.PolicyIteration), got "
            f"{type(method).__name__}"
        )
    if not isinstance(bound, AbstractImprovementBound):
        raise ProblemError(f"bound must be a BootstrapBound or StudentTBound, got {type(bound).__name__}")
    if not isinstance(budget, ESSBudget):
        raise ProblemError(f"budget must be an ESSBudget, got {type(budget).__name__}")
    check_positive_int(iterations, "iterations")
    if isinstance(confidence, bool) or not isinstance(confidence, float | int) or not 0 < confidence < 1:
        raise ProblemError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, float | int) or not 0 < holdout < 1:
        raise ProblemError(f"holdout must be a fraction in (0, 1), e.g. 0.5, got {holdout!r}")
    if data is None:
        raise ProblemError("certified_improve needs logged data: Trajectories, a LoggedBatch or a dataset")
    method = dataclasses.replace(method, n=0, data=data, reuse=False)
    method.check(problem, theta)
    batch = as_batch(data, problem)
    n = batch.n_episodes
    n_cert = int(round(holdout * n))
    if n_cert < 2 or n - n_cert < 2:
        raise ProblemError(
            f"the log has {n} episodes: holdout={holdout} leaves {n - n_cert} to propose and {n_cert} to certify; "
            "each side needs at least 2 (log more episodes)"
        )
    k_split, k_run = jax.random.split(key)
    perm = np.asarray(jax.random.permutation(k_split, n))
    train, cert = _take(batch, perm[n_cert:]), _take(batch, perm[:n_cert])
    method = dataclasses.replace(method, data=train)
    delta = (1.0 - float(confidence)) / iterations
    threshold = budget.threshold(n)

    theta0 = jax.tree.map(jnp.asarray, theta)
    ref_terms = episode_terms(problem, theta0, cert)
    iterates = [theta0]
    hist = {
        "lower_bound": [0.0],
        "estimate": [0.0],
        "ess": [float(_episode_ess(problem, theta0, batch))],
        "step_scale": [0.0],
        "certified": [False],
    }
    stop = f"completed {iterations} iterations"
    theta_k = theta0
    for k in range(iterations):
        k_step, k_bound = jax.random.split(jax.random.fold_in(k_run, k))
        proposal, _ = method.improve_from(problem, theta_k, train, key=k_step, progress=False)
        if not _finite(proposal):
            stop = f"iteration {k + 1}: the method proposed non-finite parameters"
            break
        scale, ess = 1.0, float(_episode_ess(problem, proposal, batch))
        candidate = proposal
        for _ in range(budget.max_backtracks):
            if ess >= threshold:
                break
            scale *= budget.shrink
            candidate = jax.tree.map(lambda a, b, s=scale: a + s * (b - a), theta_k, proposal)
            ess = float(_episode_ess(problem, candidate, batch))
        if not ess >= threshold:
            stop = (
                f"iteration {k + 1}: the ESS of the log would fall to {ess:.1f} < {threshold:.1f} even after "
                f"{budget.max_backtracks} backtracks"
            )
            break
        lower, estimate = bound.lower(ref_terms, episode_terms(problem, candidate, cert), delta, key=k_bound)
        iterates.append(candidate)
        hist["lower_bound"].append(lower)
        hist["estimate"].append(estimate)
        hist["ess"].append(ess)
        hist["step_scale"].append(scale)
        hist["certified"].append(bool(lower > min_improvement))
        theta_k = candidate
    history = {name: np.asarray(v) for name, v in hist.items()}
    history["stop"] = stop
    certified = np.flatnonzero(history["certified"])
    level = f"{100 * confidence:g}%"
    if certified.size:
        best = int(certified[np.argmax(history["lower_bound"][certified])])
        reason = (
            f"iterate {best} of {len(iterates) - 1}: J improves on the start by at least "
            f"{history['lower_bound'][best]:.4g} with {level} confidence (estimate {history['estimate'][best]:.4g}, "
            f"ESS {history['ess'][best]:.1f} of {n}); {stop}"
        )
    else:
        best = 0
        reason = f"no iterate certified an improvement > {min_improvement:g} at {level} confidence; {stop}"
    return CertifiedResult(
        theta=iterates[best],
        certified=bool(certified.size),
        iterate=best,
        lower_bound=float(history["lower_bound"][best]),
        estimate=float(history["estimate"][best]),
        ess=float(history["ess"][best]),
        ess_threshold=threshold,
        reason=reason,
        iterates=iterates,
        history=history,
        confidence=float(confidence),
        episodes=(n - n_cert, n_cert),
    )
