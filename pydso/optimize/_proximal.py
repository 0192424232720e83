r"""Proximal improvement: the TRPO/PPO analog for chains, a method of :func:`pydso.minimize` (DESIGN.md §1.6).

One step collects episodes at :math:`\theta_k` (and/or uses a logged dataset), freezes the surrogate
:math:`\hat S(\cdot;\theta_k)` of :mod:`pydso.estimators._surrogate` on them, and minimises it by ``epochs`` passes
of minibatch optax updates; the clipped or KL-penalised variants keep :math:`\theta` close to :math:`\theta_k`, where
the surrogate is accurate (:math:`\nabla\hat S(\theta_k)` is the score gradient). The data may come from any
behaviour chain: per-decision importance weights reweight them to :math:`\theta_k`, so a fixed log can be reused
for several improvements — until its effective sample size collapses. References: Schulman et al. 2015 (TRPO),
2017 (PPO); Kakade & Langford 2002.

Average cost (:class:`~pydso.AverageCost`): the TD advantages use a differential critic :math:`h` with discount 1
(:func:`td_discount`), e.g. the one :class:`~pydso.PolicyIteration` fits by average-cost LSTD.
"""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import check_positive_int
from .._errors import ProblemError
from .._progress import progress_bar
from ..estimators import (
    AbstractBaseline,
    MeanBaseline,
    StreamingMoments,
    as_batch,
    check_baseline,
    ess_report,
    is_dataset,
    iter_batches,
    prepare,
    surrogate,
)
from ..systems import AverageCost
from ._improve import AbstractDataMethod, describe_fields

__all__ = ["Proximal", "adam", "td_discount"]

_VARIANTS = ("clip", "kl", "plain")
_RATIOS = ("one_step", "per_decision")
_ADVANTAGES = ("returns", "td")


@functools.lru_cache(maxsize=64)
def adam(learning_rate: float) -> optax.GradientTransformation:
    """``optax.adam(learning_rate)``, one instance per rate: the compiled improvement steps, keyed on the optimizer,
    are then reused from step to step and run to run."""
    return optax.adam(learning_rate)


def td_discount(problem) -> float | None:
    r"""The discount of TD advantages: ``1.0`` for the :class:`~pydso.AverageCost` setting, where the critic is a
    differential value :math:`h` (:func:`pydso.estimators.fit_differential_value`) and the TD error
    :math:`L_t + h(x_{t+1}) - h(x_t)` differs from the average-cost TD error :math:`L_t - J + h(x_{t+1}) - h(x_t)`
    by a function of :math:`x_t` only, which multiplies a score of mean zero: the surrogate's gradient at
    :math:`\theta_k` is unchanged (:math:`\nabla J = \sum_x \pi(x)[\nabla L + \sum_{x'}\nabla P\, h]`);
    ``None`` (the problem's own discount) otherwise."""
    return 1.0 if isinstance(problem.setting, AverageCost) else None


@eqx.filter_jit
def _prepare_chunk(problem, theta_k, batch, settings, value_fn):
    advantage, baseline, weight_clip, kw = settings
    sdata = prepare(
        problem,
        theta_k,
        batch,
        advantage=advantage,
        baseline=baseline,
        value_fn=value_fn,
        weight_clip=weight_clip,
        gamma=td_discount(problem),
    )
    grad = jax.grad(surrogate, argnums=1)(problem, theta_k, sdata, **kw)
    return sdata, StreamingMoments.of(sdata.objective), grad


@eqx.filter_jit
def _epoch(problem, optimizer, kw, minibatch, theta, opt_state, sdata, key):
    n = sdata.batch.n_episodes
    m = n if minibatch is None else min(minibatch, n)
    nb = n // m
    perm = jax.random.permutation(key, n)[: nb * m].reshape(nb, m)
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


class Proximal(AbstractDataMethod):
    r"""Proximal improvement steps (module docstring): each step minimises the surrogate
    :math:`\hat S(\theta;\theta_k)` built from the step's episodes by ``epochs`` passes of minibatch updates.

    **Arguments:**

    - ``n``: fresh episodes collected at :math:`\theta_k` per step (``0``: learn from ``data`` alone).
    - ``epochs``: passes over the step's episodes.
    - ``minibatch``: episodes per update (default: all episodes of a chunk, one update per chunk and epoch); they
      are reshuffled every epoch; a remainder smaller than ``minibatch`` is dropped.
    - ``variant``: ``"clip"`` (pessimistic clipped ratio, ``clip_eps``), ``"kl"`` (KL penalty ``kl_coef``) or
      ``"plain"``; ``ratio``: ``"one_step"`` or ``"per_decision"``
      (:mod:`pydso.estimators._surrogate`).
    - ``advantage``: ``"returns"`` (IS cost-to-go minus ``baseline``) or ``"td"`` (TD errors of the critic
      ``value_fn(x, theta)``).
    - ``baseline``: :class:`~pydso.MeanBaseline` (default), :class:`~pydso.NoBaseline` or
      :class:`~pydso.StateValueBaseline`.
    - ``weight_clip``: truncation of the per-decision weights of the data relative to :math:`\theta_k`.
    - ``learning_rate``: of the default optimizer ``optax.adam(learning_rate)``; ``optimizer``: any optax
      transformation instead. Its state starts afresh at every step.
    - ``data``: a fixed log (:class:`~pydso.Trajectories`, :class:`~pydso.estimators.LoggedBatch` or a dataset with
      ``behavior_logp``; a dataset is streamed chunk by chunk when it is the only source).
    - ``reuse``: keep the episodes collected at earlier steps (reweighted by importance weights).
    - ``episodes_per_chunk``: chunk size when streaming a dataset.

    When not to use it: deterministic dynamics (no density: use :class:`Gradient` with the pathwise estimator);
    a log far from the current parameters (per-episode ESS of a few percent: the surrogate is then noise).
    """

    n: int = eqx.field(static=True, default=256)
    epochs: int = eqx.field(static=True, default=10)
    minibatch: int | None = eqx.field(static=True, default=None)
    variant: str = eqx.field(static=True, default="clip")
    clip_eps: float = eqx.field(static=True, default=0.2)
    kl_coef: float = eqx.field(static=True, default=1.0)
    ratio: str = eqx.field(static=True, default="one_step")
    advantage: str = eqx.field(static=True, default="returns")
    baseline: AbstractBaseline = eqx.field(default_factory=MeanBaseline)
    value_fn: Callable | None = None
    weight_clip: float | None = eqx.field(static=True, default=None)
    learning_rate: float = eqx.field(static=True, default=1e-2)
    optimizer: optax.GradientTransformation | None = eqx.field(static=True, default=None)
    data: object = None
    reuse: bool = eqx.field(static=True, default=False)
    episodes_per_chunk: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_positive_int(self.epochs, "Proximal.epochs")
        if self.minibatch is not None:
            check_positive_int(self.minibatch, "Proximal.minibatch")
        for name, value, allowed in (
            ("variant", self.variant, _VARIANTS),
            ("ratio", self.ratio, _RATIOS),
            ("advantage", self.advantage, _ADVANTAGES),
        ):
            if value not in allowed:
                raise ProblemError(f"Proximal.{name} must be one of {allowed}, got {value!r}")
        if self.variant == "clip" and self.ratio == "per_decision":
            raise ProblemError("variant='clip' is defined for ratio='one_step' only; use 'kl' or 'plain'")
        check_baseline(self.baseline)
        if self.optimizer is not None and not isinstance(self.optimizer, optax.GradientTransformation):
            raise ProblemError(f"optimizer must be an optax GradientTransformation, got {type(self.optimizer)}")

    def check(self, problem, theta):
        super().check(problem, theta)
        if self.advantage == "td" and self.value_fn is None:
            raise ProblemError("Proximal(advantage='td') needs a critic value_fn(x, theta) (see PolicyIteration)")

    def improve_from(self, problem, theta, data, *, key, progress=False):
        """Minimise :math:`\\hat S(\\cdot;\\theta)` built from ``data`` at ``theta`` (see
        :meth:`AbstractDataMethod.improve_from`). ``info`` also holds ``ess_final`` (the per-episode ESS of the data
        at the result), ``surrogate_start`` and ``surrogate_last_epoch`` (the surrogate on the first chunk at the
        start of the first and of the last epoch)."""
        optimizer = self.optimizer if self.optimizer is not None else adam(self.learning_rate)
        kw = {"variant": self.variant, "clip_eps": self.clip_eps, "kl_coef": self.kl_coef, "ratio": self.ratio}
        settings = (self.advantage, self.baseline, self.weight_clip, kw)
        theta_k = jax.tree.map(jnp.asarray, theta)
        theta, opt_state = theta_k, optimizer.init(theta_k)
        chunk = self.episodes_per_chunk

        def chunks():
            for b in iter_batches(data, problem, chunk):
                yield _prepare_chunk(problem, theta_k, b, settings, self.value_fn)

        cached = None if is_dataset(data) else list(chunks())
        if cached is None:  # a dataset is streamed: statistics at theta_k come from the first epoch's pass
            data_for_ess = data
        else:
            data_for_ess = as_batch(data, problem)
        moments, grad_sum, episodes, history = None, None, 0, []
        for e in progress_bar(range(self.epochs), total=self.epochs, desc="proximal", enable=progress):
            for i, (sdata, mom, grad) in enumerate(cached if cached is not None else chunks()):
                if e == 0:
                    m = sdata.batch.n_episodes
                    moments = mom if moments is None else moments + mom
                    scaled = jax.tree.map(lambda g, m=m: m * g, grad)
                    grad_sum = scaled if grad_sum is None else jax.tree.map(jnp.add, grad_sum, scaled)
                    episodes += m
                theta, opt_state, s0 = _epoch(
                    problem,
                    optimizer,
                    kw,
                    self.minibatch,
                    theta,
                    opt_state,
                    sdata,
                    jax.random.fold_in(key, e * 100003 + i),
                )
                if i == 0:
                    history.append(float(s0))
        obj, obj_se = moments.mean_stderr()
        grad_norm = optax.tree.norm(jax.tree.map(lambda g: g / episodes, grad_sum))
        ess_start = ess_report(problem, theta_k, data_for_ess, warn_below=None, episodes_per_chunk=chunk)["episode"]
        ess_end = ess_report(problem, theta, data_for_ess, warn_below=None, episodes_per_chunk=chunk)["episode"]
        info = {
            "objective": float(obj),
            "objective_stderr": float(obj_se),
            "grad_norm": float(grad_norm),
            "episodes": episodes,
            "ess": ess_start,
            "ess_final": ess_end,
            "surrogate_start": history[0],
            "surrogate_last_epoch": history[-1],
        }
        return theta, info

    def describe(self) -> str:
        names = ("n", "epochs", "minibatch", "variant", "clip_eps", "kl_coef", "ratio", "advantage", "baseline")
        names += ("value_fn", "weight_clip", "learning_rate", "optimizer", "data", "reuse")
        return describe_fields(self, names)
