r"""Simulation: compiled rollouts of a :class:`~pydso.Problem` into :class:`Trajectories`.

Discrete-time chains run as one ``lax.scan`` over time, vectorised over episodes with ``vmap``; ODE and SDE
systems go through :func:`diffrax.diffeqsolve` with the system's solver, step-size controller and adjoint.
Everything is compiled once per problem (``equinox.filter_jit``: the problem's callables are static, arrays
are traced), and large ensembles run in chunks of ``chunk_size`` episodes of one compiled shape.

Randomness: ``key`` is split into one key per episode *before* chunking, so the same ``key`` gives the same
trajectories whatever ``chunk_size`` is.
"""

import os
import shutil
import uuid
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from ._errors import DivergenceError, ProblemError
from ._fastpath import euler_maruyama_ensemble, fixed_step_ensemble
from ._progress import progress_bar
from .systems import AbstractChain, ODESystem, Problem, SDESystem

PyTree = Any

__all__ = [
    "Trajectories",
    "rollout",
    "episode_keys",
    "shard_episodes",
    "simulate_episode",
    "check_key",
    "checkpointed_scan",
]


class Trajectories(eqx.Module):
    r"""A batch of ``n`` episodes of horizon ``H`` (a pytree; index it like ``traj[i]`` with ``jax.tree``).

    Attributes:
        states: ``(n, H+1, *state_shape)``; frozen after absorption in a terminal set.
        costs: ``(n, H)`` step costs :math:`L(x_t,\theta)` (interval integrals for ODE/SDE), zero after absorption.
        terminal_costs: ``(n,)`` :math:`\Phi` at the episode's last state (0 without a terminal cost).
        log_probs: ``(n, H)`` :math:`\log P(x_{t+1}\mid x_t,\theta)`, zero after absorption or without a density.
        alive: ``(n, H+1)`` True while the episode has not entered the terminal set.
        step_weights: ``(H,)`` the setting's weights :math:`w_t`.
        terminal_weights: ``(n,)`` the weight applied to ``terminal_costs`` (:math:`w` at the end time).
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
        return self.states.shape[0]

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


def check_key(key) -> jax.Array:
    """Return ``key`` as a typed PRNG key, or raise a clear error if it is not one."""
    if key is None:
        raise ProblemError("a PRNG key is required: pass key=jax.random.key(seed)")
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ProblemError(f"key must be a single PRNG key, got a batch of shape {key.shape}")
        return key
    if isinstance(key, jax.Array | np.ndarray) and key.shape == (2,) and key.dtype == np.uint32:
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise ProblemError(f"key must be a JAX PRNG key (jax.random.key(seed)), got {type(key).__name__} {key!r}")


def _check_n(n, name="n"):
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ProblemError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


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


# -------------------------------------------------------------------------------- one episode, any system
def _chain_episode(problem: Problem, theta, key, checkpoints=None):
    system: AbstractChain = problem.system
    horizon = problem.setting.horizon
    terminal = problem.setting.terminal_set()
    key0, key_steps = jax.random.split(key)
    x0 = problem.initial.sample(key0)

    def is_terminal(x):
        return jnp.asarray(terminal(x), bool) if terminal is not None else jnp.asarray(False)

    alive0 = ~is_terminal(x0)

    def step(carry, k):
        x, alive = carry
        cost = jnp.where(alive, problem.cost(x, theta), 0.0)
        x_new = system.sample(k, x, theta)
        x_new = jnp.where(alive, x_new, x)
        if system.has_log_prob:
            lp = system.log_prob(jax.lax.stop_gradient(x), jax.lax.stop_gradient(x_new), theta)
            lp = jnp.where(alive, lp, 0.0)
        else:
            lp = jnp.zeros(())
        alive_new = alive & ~is_terminal(x_new)
        return (x_new, alive_new), (x_new, cost, lp, alive_new)

    _, (xs, costs, lps, alives) = checkpointed_scan(
        step, (x0, alive0), jax.random.split(key_steps, horizon), checkpoints
    )
    states = jnp.concatenate([x0[None], xs], axis=0)
    alive = jnp.concatenate([alive0[None], alives], axis=0)
    return states, costs, lps, alive


def checkpointed_scan(step, carry, xs, checkpoints: int | None = None):
    """``lax.scan(step, carry, xs)``, optionally split into ``checkpoints`` segments whose internals are
    rematerialised in the backward pass (``jax.checkpoint``): reverse-mode memory falls from O(H) to
    O(checkpoints + H / checkpoints) at the price of one extra forward pass. Results are identical."""
    length = jax.tree.leaves(xs)[0].shape[0]
    if not checkpoints or checkpoints <= 1 or checkpoints >= length:
        return jax.lax.scan(step, carry, xs)
    seg = length // checkpoints
    main = seg * checkpoints

    @jax.checkpoint
    def segment(c, xs_seg):
        return jax.lax.scan(step, c, xs_seg)

    head = jax.tree.map(lambda a: a[:main].reshape(checkpoints, seg, *a.shape[1:]), xs)
    carry, ys = jax.lax.scan(segment, carry, head)
    ys = jax.tree.map(lambda a: a.reshape(main, *a.shape[2:]), ys)
    if main < length:
        carry, ys_tail = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[main:], xs))
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_tail)
    return carry, ys


def _ode_episode(problem: Problem, theta, key):
    system: ODESystem = problem.system
    horizon = problem.setting.horizon
    x0 = problem.initial.sample(key)
    if system.uses_fastpath and x0.ndim == 1:  # the fast path works on vector states
        states, costs = fixed_step_ensemble(
            system.vector_field,
            x0[None],
            theta,
            dt=system.dt,
            n_steps=horizon,
            solver=system.solver,
            cost=problem.cost,
        )
        return states[0], costs[0], jnp.zeros((horizon,)), jnp.ones((horizon + 1,), bool)
    t1 = horizon * system.dt
    ts = jnp.linspace(0.0, t1, horizon + 1)

    # theta goes in through ``args`` (not a closure) so that every diffrax adjoint, BacksolveAdjoint's
    # custom VJP included, differentiates with respect to it.
    def field(t, y, theta):
        x, _ = y
        return system.vector_field(t, x, theta), problem.cost(x, theta)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        system.solver,
        t0=0.0,
        t1=t1,
        dt0=system.dt,
        y0=(x0, jnp.zeros((), x0.dtype)),
        args=theta,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=system.stepsize_controller,
        adjoint=system.adjoint,
        max_steps=system.max_steps,
        throw=False,
    )
    states, running = sol.ys
    costs = jnp.diff(running)
    ok = sol.result == diffrax.RESULTS.successful
    states = jnp.where(ok, states, jnp.nan)
    return states, costs, jnp.zeros((horizon,)), jnp.ones((horizon + 1,), bool)


def _sde_episode(problem: Problem, theta, key):
    system: SDESystem = problem.system
    horizon = problem.setting.horizon
    key0, key_bm = jax.random.split(key)
    x0 = problem.initial.sample(key0)
    t1 = horizon * system.dt
    ts = jnp.linspace(0.0, t1, horizon + 1)
    if system.uses_fastpath and x0.ndim == 1:  # the fast path works on vector states
        states, _ = euler_maruyama_ensemble(
            system.drift, system.diffusion, x0[None], theta, dt=system.dt, n_steps=horizon, key=key_bm
        )
        states = states[0]
    else:
        states = _sde_diffrax(system, theta, x0, key_bm, ts)
    # Left-point (Euler) rule for the running cost: the Euler-Maruyama discretisation of the cost integral.
    costs = jax.vmap(problem.step_cost, in_axes=(0, None))(states[:-1], theta)
    lps = jax.vmap(system.log_prob, in_axes=(0, 0, 0, None))(
        ts[:-1], jax.lax.stop_gradient(states[:-1]), jax.lax.stop_gradient(states[1:]), theta
    )
    return states, costs, lps, jnp.ones((horizon + 1,), bool)


def _sde_diffrax(system: SDESystem, theta, x0, key_bm, ts):
    """The reference path: :func:`diffrax.diffeqsolve` on a virtual Brownian tree (NaN states on failure)."""
    horizon = ts.shape[0] - 1
    t1 = horizon * system.dt
    bm = diffrax.VirtualBrownianTree(0.0, t1, tol=system.dt / 4, shape=x0.shape, key=key_bm)

    def diffusion(t, x, theta):
        return lineax.DiagonalLinearOperator(jnp.broadcast_to(system.diffusion(t, x, theta), x.shape))

    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, x, theta: system.drift(t, x, theta)), diffrax.ControlTerm(diffusion, bm)
    )
    sol = diffrax.diffeqsolve(
        terms,
        system.solver,
        t0=0.0,
        t1=t1,
        dt0=system.dt,
        y0=x0,
        args=theta,
        saveat=diffrax.SaveAt(ts=ts),
        adjoint=system.adjoint,
        max_steps=horizon + 16,
        throw=False,
    )
    ok = sol.result == diffrax.RESULTS.successful
    return jnp.where(ok, sol.ys, jnp.nan)


def simulate_episode(problem: Problem, theta: PyTree, key: jax.Array, checkpoints: int | None = None):
    """Simulate one episode; returns ``(states, costs, log_probs, alive, terminal_cost, terminal_weight)``.

    Pure and differentiable (pathwise through reparameterised sampling and diffrax adjoints). ``checkpoints``
    rematerialises discrete-time rollouts in that many segments (see :func:`checkpointed_scan`); for ODE/SDE
    systems choose the adjoint on the system instead (``diffrax.RecursiveCheckpointAdjoint(checkpoints=...)``).
    """
    if isinstance(problem.system, ODESystem):
        states, costs, lps, alive = _ode_episode(problem, theta, key)
    elif isinstance(problem.system, SDESystem):
        states, costs, lps, alive = _sde_episode(problem, theta, key)
    else:
        states, costs, lps, alive = _chain_episode(problem, theta, key, checkpoints)
    w, w_end = problem.setting.weights()
    w_full = jnp.asarray(np.append(w, w_end), costs.dtype)
    # The terminal cost is paid once, at the first absorbed state, or at x_H for episodes that never end.
    ended = ~alive
    end_index = jnp.where(jnp.any(ended), jnp.argmax(ended), problem.setting.horizon)
    if problem.terminal_cost is not None:
        terminal_cost = problem.terminal_cost(states[end_index], theta)
        end_weight = w_full[end_index]
    else:
        terminal_cost = end_weight = jnp.zeros((), costs.dtype)
    return states, costs, lps, alive, terminal_cost, end_weight


@eqx.filter_jit
def _rollout_chunk(problem: Problem, theta, keys):
    states, costs, lps, alive, tc, tw = jax.vmap(simulate_episode, in_axes=(None, None, 0))(problem, theta, keys)
    w, _ = problem.setting.weights()
    return Trajectories(states, costs, tc, lps, alive, jnp.asarray(w, costs.dtype), tw)


def rollout(
    problem: Problem,
    theta: PyTree,
    key: jax.Array,
    n: int,
    *,
    chunk_size: int | None = None,
    progress: bool | None = None,
    check: bool = True,
    record: "str | os.PathLike | None" = None,
):
    r"""Simulate ``n`` independent episodes of ``problem`` under parameters ``theta``.

    Args:
        problem: the DSO problem.
        theta: parameter pytree (checked for finiteness and shape-compatibility with the system).
        key: a JAX PRNG key; the same key gives bit-identical trajectories, independent of ``chunk_size``.
        n: number of episodes.
        chunk_size: run at most this many episodes per compiled call (for ensembles larger than memory).
            Chunks share one compiled shape (the last one is padded).
        progress: show a progress bar over chunks (default: only for several chunks on a TTY).
        check: raise :class:`~pydso.DivergenceError` if a state is non-finite (a diverging or failed solve).
        record: path of a :mod:`pydso.data` zarr store. Each chunk is written as soon as it is simulated, with
            the behaviour log-density of every transition, and is not kept in memory, so ``n`` may exceed memory.
            Chunks go to a hidden staging store first; only a complete recording is committed (renamed into
            place, or appended to an existing store as one atomic part), so a divergence or an interruption
            leaves the store exactly as it was.

    Returns:
        :class:`Trajectories` with leading dimension ``n``; with ``record``, the store opened lazily
        (:func:`pydso.data.open`) instead.
    """
    key = check_key(key)
    n = _check_n(n)
    problem.check_theta(theta)
    keys = episode_keys(key, n)
    chunk = min(n if chunk_size is None else _check_n(chunk_size, "chunk_size"), n)
    n_chunks = -(-n // chunk)
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
            piece = _rollout_chunk(problem, theta, shard_episodes(k))
            if pad:
                piece = _take(piece, slice(0, chunk - pad))
            if check:
                _check_finite_states(piece, offset=i * chunk, n=n)
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
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.recording-{uuid.uuid4().hex[:12]}")


def _commit_recording(staging: str, path):
    """Make a complete recording visible at once: rename it into place (new store) or append it as one part."""
    from . import data

    if os.path.exists(path):
        data.append(path, data.open(staging))
    else:
        os.replace(staging, path)
    return data.open(path)


def _check_finite_states(traj: "Trajectories", offset: int, n: int) -> None:
    m = traj.states.shape[0]
    finite = np.isfinite(np.asarray(traj.states, dtype=float)).reshape(m, traj.states.shape[1], -1).all(-1)
    if not finite.all():
        ep, t = np.argwhere(~finite)[0]
        raise DivergenceError(
            f"rollout diverged: non-finite state in episode {ep + offset} at step {t} "
            f"({int((~finite.all(1)).sum())} of {m} episodes of this chunk of {n} affected). Reduce dt, tighten "
            "the solver tolerances, raise max_steps, or check theta."
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
