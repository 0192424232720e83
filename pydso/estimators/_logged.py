r"""Logged episodes in the form every data-driven estimator uses: :class:`LoggedBatch` (DESIGN.md §1.8).

A batch holds ``n`` episodes of ``H`` transitions :math:`x_t \to x_{t+1}` recorded under a *behaviour* chain
:math:`B(x'\mid x)` together with :math:`\log B(x_{t+1}\mid x_t)` of every recorded transition, which is what
importance weighting needs (:mod:`pydso.estimators._weights`). Fresh rollouts are the special case
:math:`B = P_\theta`: their ``log_probs`` are the behaviour log-densities.

Sources (:func:`as_batch`, :func:`iter_batches`):

* :class:`~pydso.Trajectories` from :func:`pydso.rollout` (in memory);
* a :class:`LoggedBatch` (returned as is);
* an ``xarray.Dataset`` of the pydso schema (:mod:`pydso.data`) with a ``behavior_logp`` variable — streamed by
  :func:`iter_batches` one :func:`pydso.data.iter_chunks` chunk at a time, or read whole by :func:`as_batch`.

The functions :func:`step_costs`, :func:`terminal_costs`, :func:`transition_log_probs` and :func:`absorbed`
evaluate the problem's cost, terminal cost, transition log-density and terminal set on a batch's fixed states;
they are the building blocks of the score gradient, the proximal surrogate, value fitting and the Fisher matrix.
"""

from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..engine import Trajectories, episode_keys, rollout_chunk
from ..systems import Episodic, Problem

__all__ = [
    "DEFAULT_EPISODES_PER_CHUNK",
    "LoggedBatch",
    "as_batch",
    "iter_batches",
    "concatenate_batches",
    "empty_batch",
    "is_dataset",
    "setting_weights",
    "step_costs",
    "terminal_costs",
    "transition_log_probs",
    "absorbed",
]

DEFAULT_EPISODES_PER_CHUNK = 4096
"""Episodes per chunk when a dataset is streamed and no chunk size is given."""


class LoggedBatch(eqx.Module):
    r"""A batch of ``n`` logged episodes of ``H`` transitions (a pytree of arrays).

    **Attributes:**

    - ``states``: ``(n, H+1, *state_shape)``; states after an episode's end are a copy of its last state.
    - ``behavior_logp``: ``(n, H)``, :math:`\log B(x_{t+1} \mid x_t)` (0 on unrecorded steps).
    - ``valid``: ``(n, H)`` bool, True where the transition :math:`x_t \to x_{t+1}` was recorded.
    - ``step_weights``: ``(H,)``, the setting's weights :math:`w_t` (shared by all episodes).
    - ``end_index``: ``(n,)``, index of the state at which the terminal cost is paid (number of recorded steps).
    - ``terminal_weights``: ``(n,)``, the weight :math:`w_{end}` of the terminal cost.
    """

    states: jax.Array
    behavior_logp: jax.Array
    valid: jax.Array
    step_weights: jax.Array
    end_index: jax.Array
    terminal_weights: jax.Array

    @property
    def n_episodes(self) -> int:
        """The number ``n`` of episodes."""
        return self.states.shape[0]

    @property
    def horizon(self) -> int:
        """The number ``H`` of transitions per episode."""
        return self.behavior_logp.shape[1]


def setting_weights(problem: Problem, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Step weights ``(H,)`` and end weights ``(H+1,)`` (the weight of a terminal cost paid at state ``t``) of
    ``problem``'s setting for a logged horizon ``H``.

    :class:`~pydso.Episodic` settings adapt to any ``H`` (:math:`w_t = \gamma^t`); the other settings raise
    :class:`~pydso.ProblemError` unless ``H`` is their own horizon.
    """
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


def _from_trajectories(traj: Trajectories, behavior_logp=None) -> LoggedBatch:
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
    size = int(np.prod(spec.shape, dtype=np.int64))
    if state.ndim != 3 or state.shape[2] != size:
        raise ProblemError(
            f"the dataset's 'state' has {state.shape[2] if state.ndim == 3 else '?'} features per time step "
            f"(state_dim), but the problem's initial distribution draws states of shape {tuple(spec.shape)} "
            f"({size} features): the data were logged from another system, or the problem's initial distribution "
            "has the wrong dimension"
        )
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
    w, w_full = setting_weights(problem, n_time - 1)
    end = valid.sum(axis=1)
    return LoggedBatch(
        jnp.asarray(state),
        jnp.asarray(blp),
        jnp.asarray(valid),
        jnp.asarray(w),
        jnp.asarray(end),
        jnp.asarray(w_full[end]),
    )


def is_dataset(data) -> bool:
    """True if ``data`` looks like an ``xarray.Dataset`` (duck-typed: pydso does not import xarray here)."""
    return hasattr(data, "data_vars") and hasattr(data, "sizes")


def as_batch(data, problem: Problem, *, behavior_logp=None) -> LoggedBatch:
    r"""Convert logged data to one in-memory :class:`LoggedBatch`.

    **Arguments:**

    - ``data``: a :class:`LoggedBatch` (returned as is), :class:`~pydso.Trajectories` (behaviour = the rollout's
      parameters, or the given ``behavior_logp``) or an ``xarray.Dataset`` of the pydso schema.
    - ``problem``: the problem whose setting gives the step weights of a dataset.
    - ``behavior_logp``: ``(n, H)`` behaviour log-densities overriding those of ``Trajectories``.

    **Returns:** a :class:`LoggedBatch`. Traceable for ``Trajectories`` (the on-policy score estimator calls it
    inside its compiled function).

    A lazily opened store is read into memory whole here: to stream a store chunk by chunk use the functions
    that accept it directly (:func:`offpolicy_gradient`, :func:`offpolicy_objective`, :func:`ess_report`,
    :func:`fit_value_linear`, :func:`pydso.optimize.improve` with :class:`~pydso.optimize.Proximal`).
    """
    if isinstance(data, LoggedBatch):
        return data
    if isinstance(data, Trajectories):
        return _from_trajectories(data, behavior_logp)
    if is_dataset(data):
        return _from_dataset(data, problem)
    raise ProblemError(
        f"data must be a pydso.Trajectories, a LoggedBatch or an xarray.Dataset of the pydso schema, got "
        f"{type(data).__name__}"
    )


def iter_batches(data, problem: Problem, episodes_per_chunk: int | None = None) -> Iterator[LoggedBatch]:
    """Yield :class:`LoggedBatch` chunks of ``data``: one for in-memory data, one per :func:`pydso.data.iter_chunks`
    chunk (at most ``episodes_per_chunk`` episodes, default :data:`DEFAULT_EPISODES_PER_CHUNK`) for a dataset,
    read one chunk at a time."""
    if is_dataset(data):
        from ..data import iter_chunks

        if "behavior_logp" not in data.data_vars:
            _from_dataset(data, problem)  # raises the explanatory error
        if episodes_per_chunk is not None:
            check_positive_int(episodes_per_chunk, "episodes_per_chunk")
        for chunk in iter_chunks(
            data, DEFAULT_EPISODES_PER_CHUNK if episodes_per_chunk is None else episodes_per_chunk
        ):
            yield _from_dataset(chunk, problem)
    else:
        yield as_batch(data, problem)


def concatenate_batches(batches: list[LoggedBatch]) -> LoggedBatch:
    """Join batches of the same horizon along episodes (the step weights are the first batch's)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    horizons = {b.horizon for b in batches}
    if len(horizons) != 1:
        raise ProblemError(f"cannot join logged batches of different horizons {sorted(horizons)}")
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches)
    return eqx.tree_at(lambda b: b.step_weights, joined, first.step_weights)


def empty_batch(problem: Problem, theta: PyTree) -> LoggedBatch:
    """A :class:`LoggedBatch` of zero episodes with the shapes and dtypes of ``problem``'s rollouts under ``theta``
    (nothing is simulated): the initial value of a growing store of episodes."""
    spec = jax.eval_shape(lambda th: rollout_chunk(problem, th, episode_keys(jax.random.key(0), 1)), theta)
    spec = jax.eval_shape(_from_trajectories, spec)
    batch = jax.tree.map(lambda s: jnp.zeros((0, *s.shape[1:]), s.dtype), spec)
    w, _ = problem.setting.weights()
    return eqx.tree_at(lambda b: b.step_weights, batch, jnp.asarray(w, spec.step_weights.dtype))


def step_costs(problem: Problem, theta: PyTree, batch: LoggedBatch) -> jax.Array:
    r""":math:`L(x_t, \theta)` as it enters the objective (:meth:`pydso.Problem.step_cost`) on the recorded steps,
    0 elsewhere; shape ``(n, H)``. Differentiable in ``theta``."""
    ts = jnp.arange(batch.states.shape[1] - 1, dtype=jnp.result_type(float)) * problem.system.time_step
    c = jax.vmap(jax.vmap(problem.step_cost, in_axes=(0, 0, None)), in_axes=(None, 0, None))(
        ts, batch.states[:, :-1], theta
    )
    return jnp.where(batch.valid, c, 0.0)


def terminal_costs(problem: Problem, theta: PyTree, batch: LoggedBatch) -> jax.Array:
    r""":math:`w_{end}\,\Phi(x_{end}, \theta)` per episode, shape ``(n,)`` (zeros without a terminal cost)."""
    if problem.terminal_cost is None:
        return jnp.zeros(batch.n_episodes)
    x_end = jax.vmap(lambda s, e: s[e])(batch.states, batch.end_index)
    t_end = batch.end_index.astype(jnp.result_type(float)) * problem.system.time_step
    return batch.terminal_weights * jax.vmap(problem.final_cost, in_axes=(0, 0, None))(t_end, x_end, theta)


def transition_log_probs(problem: Problem, theta: PyTree, batch: LoggedBatch) -> jax.Array:
    r""":math:`\log P(x_{t+1} \mid x_t, \theta)` of the target chain on the recorded transitions (0 elsewhere),
    shape ``(n, H)``; differentiable in ``theta`` (the states are held fixed)."""
    if not problem.system.has_log_prob:
        raise ProblemError(
            f"reweighting logged transitions needs the transition log-density of the target chain, but "
            f"{type(problem.system).__name__} has none"
        )
    lp = jax.vmap(lambda s: problem.system.path_log_prob(s, theta))(batch.states)
    return jnp.where(batch.valid, lp, 0.0)


def absorbed(problem: Problem, batch: LoggedBatch) -> jax.Array:
    """``(n, H)`` bool: True where :math:`x_{t+1}` entered the setting's terminal set on a recorded step."""
    terminal = problem.setting.terminal_set()
    if terminal is None:
        return jnp.zeros(batch.valid.shape, bool)
    hit = jax.vmap(jax.vmap(lambda x: jnp.asarray(terminal(x), bool)))(batch.states[:, 1:])
    return hit & batch.valid
