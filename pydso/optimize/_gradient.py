r"""First-order steps on Monte-Carlo gradient estimates: the :class:`Gradient` method of :func:`pydso.minimize`."""

import warnings

import equinox as eqx
import jax
import numpy as np
import optax

from .._checks import check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..engine import episode_keys
from ..estimators import AbstractEstimator, Pathwise, as_estimator, jit_estimate
from ._base import AbstractMethod, StepStats, divergence_flags

__all__ = ["Gradient", "describe_estimator"]

_ADAM = optax.adam(1e-2)  # one shared default instance: runs with the default reuse one compilation
_PATHWISE = Pathwise()


def describe_estimator(estimator: AbstractEstimator) -> str:
    """A process-independent description of an estimator: its class and its baseline's class, if any."""
    baseline = getattr(estimator, "baseline", None)
    return type(estimator).__name__ + (f"({type(baseline).__name__})" if baseline is not None else "")


@eqx.filter_jit
def _gradient_step(estimator, optimizer, n, problem, theta, opt_state, key, index=None):
    """One compiled step: the step's key (``fold_in(key, index)`` when ``index``, a traced integer, is given),
    episodes, gradient estimate, optax update and the divergence guard's tests, all in one function (module level,
    so every step, repeated and resumed runs reuse the one compilation)."""
    if index is not None:
        key = jax.random.fold_in(key, index)
    est = jit_estimate(estimator, problem, theta, episode_keys(key, n))
    updates, new_state = optimizer.update(est.gradient, opt_state, theta)
    stats = StepStats(est.objective, est.objective_stderr, optax.tree.norm(est.gradient))
    new_theta = optax.apply_updates(theta, updates)
    return new_theta, new_state, stats, divergence_flags(opt_state, new_theta, new_state)


@eqx.filter_jit
def _gradient_init(optimizer, theta):
    """The optimizer's initial state as one compiled call (eagerly, every distinct leaf shape would compile its own
    tiny ``zeros`` kernel before the first step)."""
    return optimizer.init(theta)


class Gradient(AbstractMethod):
    r"""Stochastic first-order steps :math:`\theta_{k+1} = \theta_k + U(\hat g_k, s_k)`: each step draws ``n``
    fresh episodes, estimates :math:`\hat g_k \approx \nabla J(\theta_k)` with ``estimator`` and applies one update
    of the optax ``optimizer`` (state :math:`s_k`: its moments). The whole step is one compiled function.

    **Arguments:**

    - ``optimizer``: an optax transformation (default ``optax.adam(1e-2)``; e.g.
      ``optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))``).
    - ``estimator``: :class:`~pydso.Pathwise` (default) or :class:`~pydso.Score` with a baseline (the names
      ``"pathwise"`` and ``"score"`` are accepted too).
    - ``n``: episodes per gradient estimate (``n=1`` warns: a single episode has no standard error, NaN).

    The workhorse for neural policies with reparameterised dynamics. When not to use it: on least-squares fits
    (system identification: :class:`~pydso.LevenbergMarquardt` converges in far fewer steps), and for badly
    conditioned parametrisations of a stochastic chain (softmax logits: :class:`NaturalGradient`).
    """

    optimizer: optax.GradientTransformation = eqx.field(static=True)
    estimator: AbstractEstimator
    n: int = eqx.field(static=True)

    def __init__(
        self,
        optimizer: optax.GradientTransformation = _ADAM,
        estimator: "AbstractEstimator | str" = _PATHWISE,
        n: int = 64,
    ):
        if not isinstance(optimizer, optax.GradientTransformation):
            raise ProblemError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.estimator = as_estimator(estimator)
        self.n = check_positive_int(n, "n")
        if self.n == 1:
            warnings.warn(
                "Gradient(n=1): one episode per step gives no standard error (objective_stderr is NaN in the "
                "history); pass n >= 2 for error bars",
                UserWarning,
                stacklevel=2,
            )

    def check(self, problem, theta: PyTree) -> None:
        self.estimator.check(problem)
        problem.check_theta(theta)

    def init(self, problem, theta: PyTree) -> PyTree:
        return _gradient_init(self.optimizer, theta)

    def step(self, problem, theta: PyTree, state: PyTree, *, key: jax.Array):
        return _gradient_step(self.estimator, self.optimizer, self.n, problem, theta, state, key)[:3]

    def checked_step(self, problem, theta: PyTree, state: PyTree, *, key: jax.Array, index: int):
        # The step index goes in as a (traced) array: a Python int would be static and recompile every step.
        index = np.asarray(index, dtype=np.uint32)
        return _gradient_step(self.estimator, self.optimizer, self.n, problem, theta, state, key, index)

    def describe(self) -> str:
        return f"Gradient(estimator={describe_estimator(self.estimator)}, n={self.n})"
