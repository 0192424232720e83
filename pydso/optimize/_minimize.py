r"""``minimize``: stochastic first-order optimisation of :math:`J(\theta)` with any estimator and optax optimiser.

Each step draws ``n`` fresh episodes with key ``fold_in(key, step)``, estimates :math:`\nabla J` (pathwise or score)
and applies one optax update; the whole step is one compiled function. Runs are reproducible (same key, same
result) and resumable: with ``checkpoint=path`` the state (theta, optimiser state, step, history) is written
atomically every ``checkpoint_every`` steps, and calling ``minimize`` again with the same arguments resumes from
it and ends bit-identical to an uninterrupted run.

Do not use it for deterministic least-squares fits (system identification): Gauss–Newton/Levenberg–Marquardt
in :mod:`pydso.problems.sysid` converges in far fewer steps.
"""

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._checks import check_key, check_positive_int
from .._errors import DivergenceError, ProblemError
from .._progress import progress_bar
from ..engine import episode_keys
from ..estimators import AbstractEstimator, as_estimator, jit_estimate
from ..systems import Problem

PyTree = Any

__all__ = ["minimize", "OptimizeResult", "StepInfo"]

_CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class StepInfo:
    """What a callback receives after each step: ``step`` (0-based), ``theta`` (after the update), the
    objective estimate at the pre-update parameters and its standard error, and the gradient norm."""

    step: int
    theta: PyTree
    objective: float
    objective_stderr: float
    grad_norm: float


@dataclass
class OptimizeResult:
    """The outcome of :func:`minimize`.

    Attributes:
        theta: final parameters.
        best_theta: parameters with the lowest objective estimate seen (estimates are noisy: re-evaluate).
        best_objective: that estimate.
        history: dict of arrays ``objective``, ``objective_stderr``, ``grad_norm`` (one entry per step).
        steps: number of steps taken.
        message: why the run stopped.
    """

    theta: PyTree
    best_theta: PyTree
    best_objective: float
    history: dict[str, np.ndarray] = field(default_factory=dict)
    steps: int = 0
    message: str = ""

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


def _tree_structure_signature(tree: PyTree) -> list:
    return [(tuple(np.shape(x)), str(np.asarray(x).dtype)) for x in jax.tree.leaves(tree)]


def _save_checkpoint(path: str, state: dict) -> None:
    """Write arrays to ``path`` (npz) atomically: temp file in the same directory, fsync, then rename."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for name in ("theta", "opt_state", "best_theta"):
        for i, leaf in enumerate(jax.tree.leaves(state[name])):
            arrays[f"{name}/{i}"] = np.asarray(leaf)
    for name, values in state["history"].items():
        arrays[f"history/{name}"] = np.asarray(values)
    meta = {
        "format": _CHECKPOINT_FORMAT,
        "step": state["step"],
        "best_objective": state["best_objective"],
        "key": np.asarray(jax.random.key_data(state["key"])).tolist(),
        "fingerprint": state["fingerprint"],
        "signature": {k: _tree_structure_signature(state[k]) for k in ("theta", "opt_state")},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _describe(estimator) -> str:
    """A process-independent description of an estimator (its class and its baseline's class, if any)."""
    baseline = getattr(estimator, "baseline", None)
    return type(estimator).__name__ + (f"({type(baseline).__name__})" if baseline is not None else "")


def _load_checkpoint(path: str, template: dict, key: jax.Array, fingerprint: dict) -> dict:
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as e:  # noqa: BLE001
        raise ProblemError(f"checkpoint {path!r} is not a readable pydso checkpoint: {e}") from e
    if meta.get("format") != _CHECKPOINT_FORMAT:
        raise ProblemError(f"checkpoint {path!r} has unknown format {meta.get('format')!r}")
    for name in ("theta", "opt_state"):
        expected = _tree_structure_signature(template[name])
        found = [(tuple(s), d) for s, d in meta["signature"][name]]
        if expected != found:
            raise ProblemError(
                f"checkpoint {path!r} does not match this run: its {name} has leaves {found}, this run expects "
                f"{expected} (different theta pytree structure or optimizer?)"
            )
    if meta["key"] != np.asarray(jax.random.key_data(key)).tolist():
        raise ProblemError(
            f"checkpoint {path!r} was written by a run with a different key; pass the same key to resume, "
            "or delete the checkpoint to start afresh"
        )
    stored = meta.get("fingerprint", {})
    changed = {k: (stored.get(k), v) for k, v in fingerprint.items() if stored.get(k) != v}
    if changed:
        what = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in changed.items())
        raise ProblemError(
            f"checkpoint {path!r} does not match this run ({what}); resume with the same settings, or delete the "
            "checkpoint to start afresh"
        )
    out = {"step": meta["step"], "best_objective": meta["best_objective"]}
    for name in ("theta", "opt_state", "best_theta"):
        treedef = jax.tree.structure(template["theta" if name == "best_theta" else name])
        leaves = [jnp.asarray(arrays[f"{name}/{i}"]) for i in range(treedef.num_leaves)]
        out[name] = jax.tree.unflatten(treedef, leaves)
    out["history"] = {k.split("/", 1)[1]: list(v) for k, v in arrays.items() if k.startswith("history/")}
    return out


@eqx.filter_jit
def _step(estimator, problem, optimizer, n, key, theta, opt_state, step):
    """One compiled optimisation step (module level, so repeated or resumed runs reuse the compilation)."""
    keys = episode_keys(jax.random.fold_in(key, step), n)
    est = jit_estimate(estimator, problem, theta, keys)
    updates, opt_state = optimizer.update(est.gradient, opt_state, theta)
    new_theta = optax.apply_updates(theta, updates)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_theta)]))
    return new_theta, opt_state, est.objective, est.objective_stderr, optax.tree.norm(est.gradient), finite


def minimize(
    problem: Problem,
    theta0: PyTree,
    *,
    key: jax.Array,
    steps: int = 100,
    n: int = 64,
    optimizer: optax.GradientTransformation | None = None,
    estimator: "str | AbstractEstimator" = "pathwise",
    callback: Callable[[StepInfo], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    progress: bool | None = None,
) -> OptimizeResult:
    r"""Minimise :math:`J(\theta)` of ``problem`` from ``theta0`` by stochastic gradient steps.

    Args:
        problem: the DSO problem.
        theta0: initial parameters (any pytree of float arrays, e.g. an equinox module's arrays).
        key: PRNG key; step ``k`` uses ``jax.random.fold_in(key, k)``.
        steps: total number of optimisation steps (a resumed run continues up to this number).
        n: episodes per gradient estimate.
        optimizer: an optax transformation (default ``optax.adam(1e-2)``).
        estimator: ``"pathwise"``, ``"score"`` or an estimator object (:class:`~pydso.estimators.Score` with a
            baseline, ...).
        callback: called with a :class:`StepInfo` after every step; returning ``True`` stops the run.
        checkpoint: path of an ``.npz`` checkpoint; resumed from if it exists (same key and structure required).
        checkpoint_every: steps between checkpoint writes (also written at the end and on interruption).
        progress: progress bar (default: only on a TTY).

    Returns:
        :class:`OptimizeResult`.

    Raises:
        DivergenceError: the objective, gradient or parameters became non-finite; ``best_theta`` and
            ``history`` are attached and the last good state is in the checkpoint.
    """
    key = check_key(key)
    steps = check_positive_int(steps, "steps")
    n = check_positive_int(n, "n")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    estimator = as_estimator(estimator)
    estimator.check(problem)
    problem.check_theta(theta0)
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ProblemError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")

    theta = jax.tree.map(jnp.asarray, theta0)
    opt_state = optimizer.init(theta)
    fingerprint = {"n": n, "estimator": _describe(estimator), "problem": problem.name}
    start, best_theta, best_obj = 0, theta, float("inf")
    history: dict[str, list] = {"objective": [], "objective_stderr": [], "grad_norm": []}
    checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if checkpoint is not None and os.path.exists(checkpoint):
        state = _load_checkpoint(checkpoint, {"theta": theta, "opt_state": opt_state}, key, fingerprint)
        start, theta, opt_state = state["step"], state["theta"], state["opt_state"]
        best_theta, best_obj, history = state["best_theta"], state["best_objective"], state["history"]

    # Everything a checkpoint needs is replaced as ONE tuple after each step, so an interruption can never
    # pair the parameters of one step with the step counter of another (resume stays bit-identical).
    committed = (theta, opt_state, best_theta, best_obj, start)

    def save(state):
        theta, opt_state, best_theta, best_obj, done = state
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint,
                {
                    "theta": theta,
                    "opt_state": opt_state,
                    "best_theta": best_theta,
                    "best_objective": best_obj,
                    "history": {name: values[:done] for name, values in history.items()},
                    "step": done,
                    "key": key,
                    "fingerprint": fingerprint,
                },
            )

    message = f"completed {steps} steps"
    bar = progress_bar(range(start, steps), total=steps, initial=start, desc="minimize", enable=progress)
    try:
        for k in bar:
            theta, opt_state, best_theta, best_obj, _ = committed
            new_theta, new_opt_state, obj, obj_se, gnorm, finite_theta = _step(
                estimator, problem, optimizer, n, key, theta, opt_state, jnp.asarray(k)
            )
            obj, obj_se, gnorm, finite_theta = float(obj), float(obj_se), float(gnorm), bool(finite_theta)
            if not (np.isfinite(obj) and np.isfinite(gnorm) and finite_theta):
                save(committed)
                what = "objective" if not np.isfinite(obj) else "gradient" if not np.isfinite(gnorm) else "theta"
                raise DivergenceError(
                    f"minimize diverged at step {k}: the {what} became non-finite (objective={obj}, "
                    f"grad_norm={gnorm}). Lower the learning rate, clip gradients (optax.clip_by_global_norm), "
                    "shorten the horizon or lower gamma. The best parameters are attached as .best_theta.",
                    best_theta=best_theta,
                    history={name: np.asarray(v[:k]) for name, v in history.items()},
                )
            if obj < best_obj:
                best_obj, best_theta = obj, theta
            for name, value in (("objective", obj), ("objective_stderr", obj_se), ("grad_norm", gnorm)):
                del history[name][k:]
                history[name].append(value)
            committed = (new_theta, new_opt_state, best_theta, best_obj, k + 1)
            bar.set_postfix(J=f"{obj:.4g}", refresh=False)
            if (k + 1) % checkpoint_every == 0:
                save(committed)
            if callback is not None and callback(StepInfo(k, new_theta, obj, obj_se, gnorm)):
                message = f"stopped by callback after step {k}"
                break
    except KeyboardInterrupt:
        save(committed)
        raise
    finally:
        bar.close()
    save(committed)
    theta, opt_state, best_theta, best_obj, done = committed
    return OptimizeResult(
        theta=theta,
        best_theta=best_theta,
        best_objective=best_obj,
        history={name: np.asarray(v[:done]) for name, v in history.items()},
        steps=done,
        message=message,
    )
