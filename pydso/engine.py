r"""Simulation: compiled rollouts of a :class:`~pydso.Problem` into :class:`Trajectories`.

The engine owns orchestration — keys, chunks, sharding over devices, finiteness checks, recording to a store — and
leaves the numerics of each chunk to a backend (:mod:`pydso.backends`; by default :class:`~pydso.backends.JaxBackend`,
which runs fixed-step ODE/SDE problems as one struct-of-arrays kernel over the whole chunk and everything else through
diffrax or a scan). Everything is compiled once per problem (``equinox.filter_jit``: the problem's callables are
static, arrays are traced), and large ensembles run in chunks of ``chunk_size`` episodes of one compiled shape.

Randomness: ``key`` is split into one key per episode *before* chunking, so the same ``key`` gives the same
trajectories whatever ``chunk_size`` is.
"""

import os
import shutil
import uuid

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_key, check_positive_int
from ._errors import DivergenceError, ProblemError
from ._io import check_writable_dir
from ._progress import progress_bar
from ._typing import PyTree
from .backends import AbstractBackend, EpisodeBatch, get_backend
from .systems import GaussianChain, Problem, SDESystem, TabularChain

__all__ = [
    "Trajectories",
    "rollout",
    "episode_keys",
    "shard_episodes",
    "check_key",
    "check_log_densities",
]


class Trajectories(eqx.Module):
    r"""A batch of ``n`` episodes of horizon ``H`` (a pytree; index it like ``traj[i]`` with ``jax.tree``).

    **Attributes:**

    - ``states``: ``(n, H+1, *state_shape)``; frozen after absorption in a terminal set. None when the rollout
      was asked for the costs only (:func:`rollout` with ``save="costs"``).
    - ``costs``: ``(n, H)`` step costs :math:`L(x_t,\theta)` (interval integrals for ODE/SDE), zero after absorption.
    - ``terminal_costs``: ``(n,)`` :math:`\Phi` at the episode's last state (0 without a terminal cost).
    - ``log_probs``: ``(n, H)`` :math:`\log P(x_{t+1}\mid x_t,\theta)`, zero after absorption or without a density.
    - ``alive``: ``(n, H+1)`` True while the episode has not entered the terminal set.
    - ``step_weights``: ``(H,)`` the setting's weights :math:`w_t`.
    - ``terminal_weights``: ``(n,)`` the weight applied to ``terminal_costs`` (:math:`w` at the end time).
    """

    states: jax.Array
    costs: jax.Array
    terminal_costs: jax.Array
    log_probs: jax.Array
    alive: jax.Array
    step_weights: jax.Array
    terminal_weights: jax.Array

    @property
    def n_episodes(self) -> int:
        return self.costs.shape[0]

    @property
    def horizon(self) -> int:
        return self.costs.shape[1]

    @property
    def objective(self) -> jax.Array:
        r"""Per-episode objective :math:`\sum_t w_t L(x_t) + w_{end}\Phi`, shape ``(n,)``; its mean estimates J."""
        return self.costs @ self.step_weights + self.terminal_weights * self.terminal_costs

    def cost_to_go(self) -> jax.Array:
        r""":math:`C_t = \sum_{k\ge t} w_k L(x_k) + w_{end}\Phi`, shape ``(n, H+1)`` (weights from time 0)."""
        weighted = self.costs * self.step_weights
        tail = jnp.cumsum(weighted[:, ::-1], axis=1)[:, ::-1]
        end = (self.terminal_weights * self.terminal_costs)[:, None]
        return jnp.concatenate([tail, jnp.zeros_like(end)], axis=1) + end


def episode_keys(key: jax.Array, n: int) -> jax.Array:
    """One independent key per episode: ``jax.random.split(key, n)``."""
    return jax.random.split(key, n)


def shard_episodes(keys: jax.Array) -> jax.Array:
    """Spread per-episode keys over all local devices (``jax.sharding``), so the compiled, vmapped rollout
    runs data-parallel on every GPU; a no-op on one device or when ``n`` is not a multiple of the device count."""
    devices = jax.devices()
    if len(devices) < 2 or keys.shape[0] % len(devices):
        return keys
    mesh = jax.sharding.Mesh(np.array(devices), ("episode",))
    return jax.device_put(keys, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("episode")))


@eqx.filter_jit
def rollout_chunk(
    problem: Problem,
    theta: PyTree,
    keys: jax.Array,
    backend: "str | AbstractBackend | None" = None,
    save: str = "all",
):
    """Simulate one episode per key with ``backend`` and wrap the result as :class:`Trajectories` (without the states
    for ``save="costs"``, see :func:`rollout`). Not compiled by itself: it is traceable, and estimators call it
    inside their own compiled functions."""
    return _trajectories(problem, get_backend(backend).simulate(problem, theta, keys), save)


def _trajectories(problem: Problem, b: EpisodeBatch, save: str = "all") -> Trajectories:
    w, _ = problem.setting.weights()
    return Trajectories(
        b.states if save == "all" else None,
        b.costs,
        b.terminal_costs,
        b.log_probs,
        b.alive,
        jnp.asarray(w, b.costs.dtype),
        b.terminal_weights,
    )


@eqx.filter_jit
def _rollout_chunk_checked(
    problem: Problem, theta: PyTree, keys: jax.Array, backend: AbstractBackend, save: str = "all"
):
    """:func:`rollout_chunk` plus, per episode, whether all its states are finite: tracked by the backend during the
    solve where it can (:attr:`EpisodeBatch.finite`), else one compiled pass over the states (not a NumPy pass on
    the host). With ``save="costs"`` the states are not returned, so XLA never writes them (on the fast path they
    exist only as the kernel's carry)."""
    b = backend.simulate(problem, theta, keys)
    finite = b.finite
    if finite is None:
        finite = jnp.all(jnp.isfinite(b.states).reshape(b.states.shape[0], -1), axis=1)
    if problem.system.has_log_prob:  # a non-finite log-density flags a bad noise scale or transition matrix
        finite = finite & jnp.all(jnp.isfinite(b.log_probs), axis=1)
    return _trajectories(problem, b, save), finite


_SAVE = ("all", "costs")


def rollout(
    problem: Problem,
    theta: PyTree,
    *,
    key: jax.Array,
    n: int,
    chunk_size: int | None = None,
    backend: "str | AbstractBackend | None" = None,
    progress: bool | None = None,
    check: bool = True,
    record: "str | os.PathLike | None" = None,
    save: str = "all",
):
    r"""Simulate ``n`` independent episodes of ``problem`` under parameters ``theta``.

    **Arguments:**

    - ``problem``: the DSO problem.
    - ``theta``: parameter pytree (checked for finiteness and shape-compatibility with the system).
    - ``key``: a JAX PRNG key, split into one key per episode before chunking: the same key gives the same
      trajectories whatever ``chunk_size`` is (bit-identical for chains; for the fixed-step ODE/SDE kernel equal to
      rounding, since XLA may fuse multiply-adds differently for other array widths).
    - ``n``: number of episodes.
    - ``backend``: where the episodes are computed: a registered name (default ``"jax"``) or an
      :class:`~pydso.backends.AbstractBackend` instance such as ``JaxBackend(integrator="diffrax")``.
    - ``chunk_size``: run at most this many episodes per compiled call (for ensembles larger than memory).
      Chunks share one compiled shape (the last one is padded).
    - ``progress``: show a progress bar over chunks (default: only for several chunks on a TTY).
    - ``check``: raise :class:`~pydso.DivergenceError` if a state is non-finite (a diverging or failed solve).
    - ``record``: path of a :mod:`pydso.data` zarr store. Each chunk is written as soon as it is simulated, with
      the behaviour log-density of every transition, and is not kept in memory, so ``n`` may exceed memory.
      Chunks go to a hidden staging store first; only a complete recording is committed (renamed into
      place, or appended to an existing store as one atomic part), so a divergence or an interruption
      leaves the store exactly as it was.
    - ``save``: what is kept. ``"all"`` (default): every state, step cost, log-density and alive flag.
      ``"costs"``: everything but the states (``states`` is None), for objective estimates: the compiled rollout
      then never writes the ``(n, H+1, d)`` state array, which on the fixed-step fast path is most of its memory
      traffic (see ``benchmarks/bench_user_jobs.py``). Divergences are still detected (the kernel tracks
      finiteness in its carry) and named by re-simulating the offending chunk with its states. Not with
      ``record`` (a store holds the states).

    **Returns:**

    :class:`Trajectories` with leading dimension ``n``; with ``record``, the store opened lazily
    (:func:`pydso.data.open`) instead.
    """
    key = check_key(key)
    n = check_positive_int(n, "n")
    if save not in _SAVE:
        raise ProblemError(f"save must be one of {_SAVE}, got {save!r}")
    if save == "costs" and record is not None:
        raise ProblemError("save='costs' drops the states, which record= must store; use save='all' with record")
    problem.check_theta(theta)
    backend = get_backend(backend)
    backend.check(problem)
    keys = episode_keys(key, n)
    chunk = min(n if chunk_size is None else check_positive_int(chunk_size, "chunk_size"), n)
    n_chunks = -(-n // chunk)
    if record is not None:  # before the simulation: an unwritable store path must not waste the run
        check_writable_dir(record, "record")
        if os.path.isdir(record) and not os.path.exists(os.path.join(record, "pydso.json")):  # a store's manifest
            raise ProblemError(
                f"record: {os.fspath(record)!r} is a directory but not a pydso trajectory store (no pydso.json); "
                "pass a new path (the store is created) or an existing store (the episodes are appended)"
            )
    staging = _staging_path(record) if record is not None else None
    pieces = []
    try:
        for i in progress_bar(
            range(n_chunks), total=n_chunks, desc="rollout", enable=progress if n_chunks > 1 else False
        ):
            k = keys[i * chunk : (i + 1) * chunk]
            pad = chunk - k.shape[0]
            if pad:
                k = jnp.concatenate([k, jnp.broadcast_to(k[:1], (pad,))])
            if check:
                piece, finite = _rollout_chunk_checked(problem, theta, shard_episodes(k), backend, save)
            else:
                piece = rollout_chunk(problem, theta, shard_episodes(k), backend, save)
            if pad:
                piece = _take(piece, slice(0, chunk - pad))
            if check and not bool(np.all(np.asarray(finite)[: chunk - pad])):
                full = piece
                if save == "costs":  # name the step: the same chunk again, with its states (only on failure)
                    full = _take(_rollout_chunk_checked(problem, theta, k, backend)[0], slice(0, chunk - pad))
                _check_finite_states(full, offset=i * chunk, n=n)
                check_log_densities(problem, theta, full, offset=i * chunk)
            if staging is not None:
                _record(piece, problem, theta, staging)
            else:
                pieces.append(piece if n_chunks == 1 else jax.device_get(piece))
        if staging is not None:
            return _commit_recording(staging, record)
    finally:
        if staging is not None and os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return pieces[0] if n_chunks == 1 else _concatenate(pieces)


def _staging_path(path) -> str:
    """A hidden sibling of ``path`` where a recording is written before it is committed."""
    path = os.path.abspath(os.fspath(path))
    name = f".{os.path.basename(path)}.recording-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # pid: see data._store
    return os.path.join(os.path.dirname(path), name)


def _commit_recording(staging: str, path):
    """Make a complete recording visible at once: rename it into place (new store) or append it as one part."""
    from . import data

    if os.path.exists(path):
        data.append(path, data.open(staging))
    else:
        try:
            os.replace(staging, path)  # refuses a non-empty directory: never replaces another writer's store
        except OSError:
            if not os.path.isdir(path):
                raise
            data.append(path, data.open(staging))  # created meanwhile by another writer: append to it
    return data.open(path)


def _check_finite_states(traj: "Trajectories", offset: int, n: int) -> None:
    """Raise :class:`DivergenceError` naming the first non-finite state (called only when there is one)."""
    m = traj.states.shape[0]
    finite = np.isfinite(np.asarray(traj.states, dtype=float)).reshape(m, traj.states.shape[1], -1).all(-1)
    if not finite.all():
        ep, t = np.argwhere(~finite)[0]
        raise DivergenceError(
            f"rollout diverged: non-finite state in episode {ep + offset} at step {t} "
            f"({int((~finite.all(1)).sum())} of {m} episodes of this chunk of {n} affected). Reduce dt, tighten "
            "the solver tolerances, raise max_steps, or check theta."
        )


def check_log_densities(problem: Problem, theta: PyTree, traj: "Trajectories", offset: int = 0) -> None:
    r"""Raise :class:`~pydso.ProblemError` if a transition log-density of ``traj`` is non-finite because of a bad
    definition, naming it: a :class:`~pydso.GaussianChain` ``scale``/``scale_tril`` that is not positive, an
    :class:`~pydso.SDESystem` ``diffusion`` that is negative, or a :class:`~pydso.TabularChain` row that is not a
    probability vector, at the state where it happened (episode ``offset + e``, step ``t``). Other non-finite
    log-densities (e.g. a zero SDE diffusion, which has no density) are left to the caller. Runs on the host; call
    it only when a non-finite value was seen (:func:`rollout` with ``check=True`` does)."""
    system = problem.system
    lp = np.asarray(traj.log_probs)
    if not system.has_log_prob or np.all(np.isfinite(lp)):
        return
    for e, t in np.argwhere(~np.isfinite(lp))[:16]:  # the first few places are enough to diagnose
        x = jnp.asarray(traj.states[e, t])
        time = jnp.asarray(float(t) * system.time_step)
        where = f"in episode {int(e) + offset} at step {int(t)}"
        if isinstance(system, GaussianChain):
            sc = np.asarray(system.noise_scale(time, x, theta))
            name = "scale"
            if system.scale_tril is not None:
                sc, name = np.diag(sc), "scale_tril (its diagonal)"
            if not (np.all(np.isfinite(sc)) and np.all(sc > 0)):
                raise ProblemError(
                    f"GaussianChain.{name} is {sc} (not positive) {where}: the transition has no density; make it "
                    "positive (e.g. softplus or exp of a parameter)"
                )
        elif isinstance(system, SDESystem):
            g = np.asarray(system.diffusion(time, x, theta))
            if np.any(g < 0) or not np.all(np.isfinite(g)):
                raise ProblemError(
                    f"SDESystem.diffusion is {g} (negative) {where}: the diffusion of a diagonal-noise SDE must be "
                    "non-negative (use its absolute value, or softplus of a parameter)"
                )
        elif isinstance(system, TabularChain):
            row = np.asarray(system.matrix(time, theta))[int(x)]
            raise ProblemError(
                f"TabularChain.transition_fn row {int(x)} is {row} {where}: rows must be probability vectors "
                "(entries >= 0 summing to 1); pydso never renormalises silently"
            )


def _record(traj: "Trajectories", problem: Problem, theta, path) -> None:
    """Write one simulated chunk to a pydso store (create it, or append to it)."""
    from . import data

    ds = data.to_dataset(jax.device_get(traj), problem, theta)
    if os.path.exists(path):
        data.append(path, ds)
    else:
        data.save(ds, path)


def _take(traj: Trajectories, index) -> Trajectories:
    """Select episodes of a batch (the per-step weights are shared and kept)."""
    w = traj.step_weights
    out = jax.tree.map(lambda a: a[index], traj)
    return eqx.tree_at(lambda t: t.step_weights, out, w)


def _concatenate(pieces: list[Trajectories]) -> Trajectories:
    """Join batches along the episode axis (the per-step weights are shared and kept once)."""
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)
    return eqx.tree_at(lambda t: t.step_weights, joined, pieces[0].step_weights)
