r"""The JAX backend's simulation of one episode of any system (vmapped over episodes by :class:`JaxBackend`)."""

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from ..._typing import PyTree
from ...systems import AbstractChain, ODESystem, Problem, SDESystem
from ._fastpath import euler_maruyama_ensemble, fixed_step_ensemble


def _chain_episode(problem: Problem, theta, key, checkpoints=None):
    system: AbstractChain = problem.system
    horizon = problem.setting.horizon
    terminal = problem.setting.terminal_set()
    key0, key_steps = jax.random.split(key)
    x0 = problem.initial.sample(key0)

    def is_terminal(x):
        return jnp.asarray(terminal(x), bool) if terminal is not None else jnp.asarray(False)

    alive0 = ~is_terminal(x0)

    def step(carry, inputs):
        x, alive = carry
        t, k = inputs
        cost = jnp.where(alive, problem.cost(x, theta), 0.0)
        x_new = system.sample(k, x, theta)
        x_new = jnp.where(alive, x_new, x)
        if system.has_log_prob:
            lp = system.log_prob(t, jax.lax.stop_gradient(x), jax.lax.stop_gradient(x_new), theta)
            lp = jnp.where(alive, lp, 0.0)
        else:
            lp = jnp.zeros(())
        alive_new = alive & ~is_terminal(x_new)
        return (x_new, alive_new), (x_new, cost, lp, alive_new)

    _, (xs, costs, lps, alives) = checkpointed_scan(
        step, (x0, alive0), (jnp.arange(horizon), jax.random.split(key_steps, horizon)), checkpoints
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
