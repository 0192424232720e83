r"""``minimize``: the one optimisation loop of pydso, running any step strategy (a *method*).

:math:`\theta_{k+1}, s_{k+1} = M(\theta_k, s_k; \xi_k)` for ``steps`` steps, where :math:`M` is the method
(:class:`~pydso.optimize.AbstractMethod`: :class:`~pydso.optimize.Gradient`, :class:`~pydso.optimize.NaturalGradient`,
:class:`~pydso.optimize.Proximal`, :class:`~pydso.optimize.PolicyIteration`, Gauss–Newton / Levenberg–Marquardt),
:math:`s_k` its state and :math:`\xi_k` the step's randomness, drawn with the key ``fold_in(key, k)``. Everything
that is not the step itself is shared by all methods:

* **reproducibility**: the same key gives the same run;
* **checkpoint and resume** (:mod:`pydso.optimize._checkpoint`): with ``checkpoint=path`` the parameters, the
  method's state (leaf by leaf), the best parameters, the history and the step counter are written atomically every
  ``checkpoint_every`` steps, at the end and on interruption; calling ``minimize`` again with the same arguments
  resumes and ends bit-identical to an uninterrupted run. A checkpoint of another run (other key, pytree structure,
  problem — system, cost, terminal cost, setting, initial distribution — or method settings such as the learning
  rate or ``n``: :func:`~pydso.optimize.run_fingerprint`) is refused, naming what changed. The checkpoint path is
  checked for writability before the first step;
* **progress bar** (on a terminal by default), **divergence guard** (a non-finite objective, gradient or parameter,
  or a method state that overflows although the gradient is finite — Adam's second moment of a gradient of
  ``1e200`` is ``inf`` and would freeze theta silently — stops the run with :class:`~pydso.DivergenceError`
  carrying the best parameters and, where simulating the step's episodes fails, the episode and step),
  **callback** with a :class:`StepInfo` after every step (returning ``True`` stops), and one result type,
  :class:`OptimizeResult`.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_finite_tree, check_key, check_positive_int
from .._errors import DivergenceError, ProblemError
from .._io import check_writable_file
from .._progress import progress_bar
from .._typing import PyTree
from ._base import AbstractMethod
from ._checkpoint import Checkpoint, load_checkpoint, run_fingerprint, save_checkpoint
from ._gradient import Gradient

__all__ = ["minimize", "OptimizeResult", "StepInfo"]

_DEFAULT_METHOD = Gradient()
_CORE = ("objective", "objective_stderr", "grad_norm")


@dataclass(frozen=True)
class StepInfo:
    """What a callback receives after each step.

    **Attributes:**

    - ``step``: the 0-based index of the step just taken.
    - ``theta``: the parameters after the update.
    - ``objective``, ``objective_stderr``: the estimate of :math:`J` at the parameters *before* the update, and its
      standard error.
    - ``grad_norm``: the norm of the gradient (estimate) the step used.
    - ``extra``: the method's extra scalars of this step (see :class:`~pydso.optimize.StepStats`).
    """

    step: int
    theta: PyTree
    objective: float
    objective_stderr: float
    grad_norm: float
    extra: dict = field(default_factory=dict)


@dataclass
class OptimizeResult:
    """The outcome of :func:`minimize` (whatever the method).

    **Attributes:**

    - ``theta``: the final parameters.
    - ``best_theta``: the parameters with the lowest objective estimate seen (estimates are noisy: re-evaluate).
    - ``best_objective``: that estimate.
    - ``history``: dict of arrays, one entry per step: ``objective``, ``objective_stderr``, ``grad_norm`` and the
      method's extra scalars.
    - ``steps``: the number of steps taken (a resumed run counts the steps before the interruption too).
    - ``message``: why the run stopped.
    - ``state``: the method's final state (optimiser moments, retained episodes, ...).
    """

    theta: PyTree
    best_theta: PyTree
    best_objective: float
    history: dict[str, np.ndarray] = field(default_factory=dict)
    steps: int = 0
    message: str = ""
    state: "PyTree | None" = None

    def plot(self, ax=None, label: str | None = None):
        """Plot the learning curve (objective estimate ± 2 s.e. per step) with matplotlib; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        j = self.history["objective"]
        se = self.history["objective_stderr"]
        steps = np.arange(len(j))
        ax.plot(steps, j, label=label)
        ax.fill_between(steps, j - 2 * se, j + 2 * se, alpha=0.25)
        ax.set_xlabel("step")
        ax.set_ylabel("J estimate")
        ax.grid(True, alpha=0.3)
        return ax


def _locate_divergence(problem, theta, method, key) -> str:
    """'; rollout: <the engine's DivergenceError message>' if simulating this step's episodes at ``theta`` fails
    (naming the episode and step), else ''."""
    n = getattr(method, "n", None)
    if not (isinstance(n, int) and n > 0) or not hasattr(problem, "initial"):
        return ""
    try:
        from ..engine import rollout

        rollout(problem, theta, key=key, n=n)
    except DivergenceError as e:
        return f"; {e}"
    except Exception:  # noqa: BLE001 - locating is best effort: the divergence itself is reported anyway
        return ""
    return ""


def minimize(
    problem,
    theta: PyTree,
    *,
    key: jax.Array,
    method: AbstractMethod = _DEFAULT_METHOD,
    steps: int = 100,
    callback: Callable[[StepInfo], bool | None] | None = None,
    checkpoint: "str | os.PathLike | None" = None,
    checkpoint_every: int = 10,
    progress: bool | None = None,
) -> OptimizeResult:
    r"""Minimise :math:`J(\theta)` of ``problem`` from ``theta`` by ``steps`` steps of ``method`` (module docstring).

    **Arguments:**

    - ``problem``: a :class:`~pydso.Problem` (or, for the least-squares methods, an
      :class:`~pydso.optimize.AbstractLeastSquares`).
    - ``theta``: initial parameters (any pytree of float arrays, e.g. an equinox module's arrays).
    - ``key``: PRNG key; step ``k`` uses ``jax.random.fold_in(key, k)``.
    - ``method``: the step strategy: :class:`Gradient` (default: Adam on pathwise estimates from 64 episodes),
      :class:`NaturalGradient`, :class:`Proximal`, :class:`PolicyIteration`, :class:`GaussNewton`,
      :class:`LevenbergMarquardt`, or your own :class:`AbstractMethod`.
    - ``steps``: total number of steps (a resumed run continues up to this number).
    - ``callback``: called with a :class:`StepInfo` after every step; returning ``True`` stops the run.
    - ``checkpoint``: path of an ``.npz`` checkpoint; resumed from if it exists (same key, method and structure
      required).
    - ``checkpoint_every``: steps between checkpoint writes (also written at the end and on interruption).
    - ``progress``: progress bar (default: only on a terminal).

    **Returns:** an :class:`OptimizeResult`.

    **Raises:** :class:`~pydso.DivergenceError` when the objective, gradient or parameters become non-finite
    (``best_theta`` and ``history`` attached; the last good state is in the checkpoint);
    :class:`~pydso.ProblemError` for bad arguments or a checkpoint of another run.
    """
    key = check_key(key)
    steps = check_positive_int(steps, "steps")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    if not isinstance(method, AbstractMethod):
        raise ProblemError(
            f"method must be a pydso.optimize method (pydso.Gradient(...), pydso.NaturalGradient(...), "
            f"pydso.Proximal(...), pydso.PolicyIteration(...), ...), got {type(method).__name__}"
        )
    check_finite_tree(theta, "theta")
    method.check(problem, theta)

    checkpoint = None if checkpoint is None else check_writable_file(checkpoint, "checkpoint")

    # Strong dtypes: a weakly typed leaf (``jnp.array(1.0)``) would become strong after the first update and make
    # every compiled step trace and compile twice.
    theta = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.result_type(a)), theta)
    state = method.init(problem, theta)
    fingerprint = None if checkpoint is None else run_fingerprint(problem, theta, method)
    # Everything a checkpoint needs is replaced as ONE object after each step, so an interruption can never pair
    # the parameters of one step with the step counter of another (resume stays bit-identical).
    committed = Checkpoint(theta, state, theta, float("inf"), {name: [] for name in _CORE}, 0)
    if checkpoint is not None and os.path.exists(checkpoint):
        committed = load_checkpoint(checkpoint, theta=theta, state=state, key=key, fingerprint=fingerprint)

    def save(c: Checkpoint) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, c, key=key, fingerprint=fingerprint)

    message = f"completed {steps} steps"
    start = committed.step
    bar = progress_bar(range(start, steps), total=steps, initial=start, desc="minimize", enable=progress)
    try:
        for k in bar:
            c = committed
            # One call: the step (key fold_in(key, k)) and the divergence guard's tests of its result (for Gradient:
            # one compiled function shared by every step), then one transfer of the scalars to the host.
            new_theta, new_state, stats, flags = method.checked_step(problem, c.theta, c.state, key=key, index=k)
            core, extra, (finite, state_ok) = jax.device_get(
                ((stats.objective, stats.objective_stderr, stats.grad_norm), stats.extra, flags)
            )
            obj, obj_se, gnorm = (float(v) for v in core)
            extra = {name: float(v) for name, v in extra.items()}
            if not (np.isfinite(obj) and np.isfinite(gnorm) and bool(finite) and bool(state_ok)):
                save(c)
                if not np.isfinite(obj):
                    what = "the objective became non-finite"
                elif not np.isfinite(gnorm):
                    what = (
                        "the gradient became non-finite, or so large that its norm overflows (any optimiser state "
                        "built from its square, such as Adam's, is then inf and the update silently zero)"
                    )
                elif not bool(finite):
                    what = "theta became non-finite"
                else:
                    what = (
                        f"the method's state (optimiser moments) overflowed to inf/NaN although the gradient is finite "
                        f"(grad_norm={gnorm:.3g}): the update would silently stall or corrupt theta"
                    )
                where = _locate_divergence(problem, c.theta, method, jax.random.fold_in(key, k))
                raise DivergenceError(
                    f"minimize diverged at step {k}: {what} (objective={obj}, grad_norm={gnorm}){where}. Lower the "
                    "learning rate, clip gradients (optax.clip_by_global_norm), shorten the horizon or lower gamma. "
                    "The best parameters are attached as .best_theta.",
                    best_theta=c.best_theta,
                    history={name: np.asarray(v[:k]) for name, v in c.history.items()},
                )
            best_theta, best_obj = (c.theta, obj) if obj < c.best_objective else (c.best_theta, c.best_objective)
            history = {name: list(v[:k]) for name, v in c.history.items()}
            for name, value in zip(_CORE, (obj, obj_se, gnorm), strict=True):
                history[name].append(value)
            for name, value in extra.items():
                history.setdefault(name, [np.nan] * k).append(value)
            committed = Checkpoint(new_theta, new_state, best_theta, best_obj, history, k + 1)
            bar.set_postfix(J=f"{obj:.4g}", refresh=False)
            if (k + 1) % checkpoint_every == 0:
                save(committed)
            if callback is not None and callback(StepInfo(k, new_theta, obj, obj_se, gnorm, extra)):
                message = f"stopped by callback after step {k}"
                break
            if method.converged(new_state):
                message = f"converged after step {k} ({method.describe()})"
                break
    except KeyboardInterrupt:
        save(committed)
        raise
    finally:
        bar.close()
    save(committed)
    c = committed
    return OptimizeResult(
        theta=c.theta,
        best_theta=c.best_theta,
        best_objective=c.best_objective,
        history={name: np.asarray(v[: c.step]) for name, v in c.history.items()},
        steps=c.step,
        message=message,
        state=c.state,
    )
